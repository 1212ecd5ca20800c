"""Follows the notification log and keeps the three views: tree, pending merges, audit timeline.

Per batch of notifications: decode each VM event, summarise it against the VM as it was, apply it
(`event.mutate`) to an in-memory copy of that VM, and at the end write each touched VM's tree and
pending merges plus one timeline row per event, with the new position, in one transaction
(`projections.store`). Only the views are persisted; the aggregates here are a cache keyed by
version: when the cached copy is not exactly one version behind an event (another process moved
the position, a batch was rolled back, the cache evicted it), the VM is loaded at that version from
the store (aggregate snapshot + events), never taken from the application's shared cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence
from uuid import UUID

from eventsourcing.persistence import Notification

from domain.application import Snaptree
from domain.tree import NodeKind, children
from domain.vm import VirtualMachine
from projections.decoding import Decoder
from projections.store import MergeRow, StalePosition, TreeRow, ViewBatch, ViewStore, open_store
from projections.timeline import event_name, summarize
from projections.tree_view import merges_json, tree_json

VM_TOPIC_PREFIX = f"{VirtualMachine.__module__}:{VirtualMachine.__qualname__}."
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
ZERO = timedelta(0)
BATCH = 1000
CACHE_SIZE = 256


class ProjectionError(RuntimeError):
    """An event the views cannot follow (undecodable, or its `apply` fails): the views stop there."""

    code = "projection_failed"


def iso(ts: datetime) -> str:
    if ts.utcoffset() != ZERO:
        ts = ts.astimezone(timezone.utc)
    return ts.isoformat().replace("+00:00", "Z")


def micros(ts: datetime) -> int:
    return (ts - EPOCH) // timedelta(microseconds=1)  # exact, unlike float seconds


def merge_rows(vm: VirtualMachine) -> list[MergeRow]:
    """`merges --json` rows without byte counts, and the files a reader measures to add them."""
    hidden = {str(n.id): n for n in vm.nodes.values() if n.kind is NodeKind.HIDDEN}
    out = []
    for seq, row in enumerate(merges_json(vm)):
        node = hidden[row["node"]]
        calc = {
            "layers": list(node.layers.values()),
            "dependents": [list(d.layers.values()) for d in children(vm.nodes, node.id)],
            "root": node.parent is None,
        }
        out.append(MergeRow(node=row["node"], seq=seq, row=row, calc=calc))
    return out


class ProjectionRunner:
    def __init__(self, app: Snaptree, *, batch_size: int = BATCH, cache_size: int = CACHE_SIZE) -> None:
        self.app = app
        self.store: ViewStore = open_store(app)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.decoder = Decoder(app)
        self._cache: OrderedDict[UUID, VirtualMachine] = OrderedDict()
        self._ids: dict[UUID, str] = {}  # str(UUID) is slow and every timeline row needs one
        self._lock = threading.Lock()  # one catch-up at a time per runner (the cache is not shared-safe)

    @property
    def position(self) -> int:
        return self.store.position()

    def update(self) -> int:
        """Catch up with the log; returns how many notifications were projected."""
        with self._lock:
            return self._update()

    def _update(self) -> int:
        done = 0
        while True:
            start = self.store.position()
            notifications = self.app.recorder.select_notifications(
                start, self.batch_size, inclusive_of_start=False
            )
            if not notifications:
                return done
            batch = self.project(notifications)
            try:
                self.store.commit(batch, start, notifications[-1].id)
            except StalePosition:
                continue  # another runner got there first; its rows are the same rows
            done += len(notifications)

    def rebuild(self) -> int:
        """Empty the views and project the whole log again from its first notification."""
        with self._lock:
            self.store.reset()
            self._cache.clear()
            return self._update()

    # --- one batch ---

    def project(self, notifications: Sequence[Notification]) -> ViewBatch:
        batch = ViewBatch()
        touched: dict[UUID, VirtualMachine] = {}
        for n in notifications:
            if not n.topic.startswith(VM_TOPIC_PREFIX):
                continue  # not a VM's event (other aggregates may share the log)
            agg = self._apply(n, batch)
            touched[agg.id] = agg
        for agg in touched.values():
            vid = str(agg.id)
            batch.trees.append(TreeRow(vid, agg.name, agg.host, agg.version, tree_json(agg)))
            batch.merges[vid] = (agg.name, merge_rows(agg))
        return batch

    def _apply(self, n: Notification, batch: ViewBatch) -> VirtualMachine:
        vid = n.originator_id
        assert isinstance(vid, UUID)
        try:
            event = self.decoder.event(vid, (n.originator_version, n.topic, n.state))
            before = self._before(vid, n.originator_version)
            summary = summarize(event, before)  # before `mutate`, which changes `before` in place
            agg = event.mutate(before)
        except Exception as exc:
            self._cache.pop(vid, None)  # possibly half-applied
            kind = n.topic.rpartition(".")[2]
            raise ProjectionError(
                f"notification {n.id} (aggregate {vid} version {n.originator_version}, {kind}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        assert isinstance(agg, VirtualMachine)
        self._remember(agg)
        ts = event.timestamp
        request_id: Any = getattr(event, "request_id", None)  # events carry none yet
        batch.timeline.append((
            n.id, self._str_id(vid), agg.name, n.originator_version, iso(ts), micros(ts),
            event_name(event), None if request_id is None else str(request_id), summary,
        ))
        return agg

    def _before(self, vid: UUID, version: int) -> VirtualMachine | None:
        if version == 1:
            return None
        agg = self._cache.get(vid)
        if agg is not None and agg.version == version - 1:
            self._cache.move_to_end(vid)
            return agg
        # A fresh object: `repository.get` with a version never hands out the app's cached one.
        loaded = self.app.repository.get(vid, version=version - 1)
        assert isinstance(loaded, VirtualMachine)
        return loaded

    def _str_id(self, vid: UUID) -> str:
        text = self._ids.get(vid)
        if text is None:
            text = self._ids[vid] = str(vid)
        return text

    def _remember(self, agg: VirtualMachine) -> None:
        self._cache[agg.id] = agg
        self._cache.move_to_end(agg.id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
