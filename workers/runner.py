"""`snaptree worker run`: follows the event log from a durable position and drains each touched
VM of this host (the embedded mode's worker; service/worker.py does the work).

The position is an `eventsourcing` tracking record in the same store as the events. Work itself
is read off the aggregate, so the position only saves effort: a worker that restarts from an
older position finds the work already done and moves on.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from functools import cached_property
from uuid import UUID

from eventsourcing.persistence import PersistenceError, Tracking, TrackingRecorder

from domain import recovery
from domain.tree import MergeState
from domain.vm import VirtualMachine
from service.api import Service

log = logging.getLogger(__name__)

BATCH = 500


class LogFollower:
    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.position_name = f"worker:{svc.host}"
        self._names: dict[UUID, str | None] = {}

    @cached_property
    def tracking(self) -> TrackingRecorder:
        return self.svc.app.factory.tracking_recorder()

    @property
    def position(self) -> int:
        return self.tracking.max_tracking_id(self.position_name) or 0

    @property
    def failures(self) -> list[str]:
        return self.svc.worker().failures

    def run_once(self) -> int:
        """Process the notifications after the position; returns how many were read."""
        app = self.svc.app
        notifications = app.recorder.select_notifications(self.position, BATCH, inclusive_of_start=False)
        if not notifications:
            return 0
        touched: list[str] = []
        for n in notifications:
            name = self._vm_name(n.originator_id)
            if name is not None and name not in touched:
                touched.append(name)
        for name in touched:
            vm = app.get_vm(name)
            if vm.host != self.svc.host:
                continue
            try:
                self.svc.worker().drain(vm)
            except Exception as exc:  # noqa: BLE001 - one VM's trouble never stops the others
                log.exception("VM %s: the worker failed", name)
                self.svc.worker().failures.append(f"VM {name}: {type(exc).__name__}: {exc}")
        self.tracking.insert_tracking(Tracking(self.position_name, notifications[-1].id))
        return len(notifications)

    def run(self, *, until_idle: bool = False, poll: float = 0.2) -> None:
        """Follow the log; a long-running worker outlives a store that is briefly unavailable
        (disk full, locked): it says so and tries again, with growing pauses."""
        pause = poll
        while True:
            try:
                read = self.run_once()
            except (PersistenceError, sqlite3.Error, OSError) as exc:
                if until_idle:
                    raise
                log.warning("worker: %s; trying again in %.1f s", exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, 30.0)
                continue
            pause = poll
            if read == 0:
                if until_idle:
                    return
                time.sleep(poll)

    def outstanding(self) -> list[str]:
        """Failed work of this host's VMs that waits for an operator (retry, abandon, merge)."""
        out: list[str] = []
        app = self.svc.app
        for name in app.vm_names():
            vm = app.get_vm(name)
            if vm.host != self.svc.host:
                continue
            out += [f"VM {name}: {recovery.describe(vm, f)}" for f in vm.failed.values()]
            out += [f"VM {name}: the merge of hidden node {n.name or n.id} failed: {n.merge_error};"
                    f" `snaptree merge {name} {n.id}` retries it"
                    for n in vm.nodes.values() if n.merge_state is MergeState.FAILED]
        return out

    def _vm_name(self, originator_id: UUID) -> str | None:
        if originator_id not in self._names:
            try:
                agg = self.svc.app.repository.get(originator_id)
            except Exception:  # noqa: BLE001 - unreadable: not ours to act on
                agg = None
            # Not a VM (a request record, say): remembered too, so it is never loaded again.
            self._names[originator_id] = agg.name if isinstance(agg, VirtualMachine) else None
        return self._names[originator_id]
