"""Follows the event log from a durable position and drains each touched VM's pending work.

The position is an `eventsourcing` tracking record in the same store as the events. Work itself
is read off the aggregate (`domain.work.pending_work`), so the position only saves effort: a
worker that restarts from an older position finds the work already done and moves on.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from functools import cached_property
from typing import Iterator
from uuid import UUID

from eventsourcing.persistence import Tracking, TrackingRecorder

from adapters.storage import DataDir
from adapters.vm_lock import vm_lock
from domain.application import Snaptree
from domain.errors import UnknownVM
from domain.vm import VirtualMachine
from domain.work import pending_work
from workers.disk_effects import DiskEffects, Progress, _quiet

log = logging.getLogger(__name__)

BATCH = 500
MAX_ITEMS_PER_DRAIN = 100_000


class Worker:
    def __init__(
        self, app: Snaptree, data: DataDir, host: str, progress: Progress = _quiet
    ) -> None:
        self.app = app
        self.data = data
        self.host = host
        self.effects = DiskEffects(app, data, progress)
        self.position_name = f"worker:{host}"
        self._names: dict[UUID, str | None] = {}

    @cached_property
    def tracking(self) -> TrackingRecorder:
        """Made on first use: an embedded command that only drains its VM never needs it
        (constructing it runs CREATE TABLE)."""
        return self.app.factory.tracking_recorder()

    @property
    def position(self) -> int:
        return self.tracking.max_tracking_id(self.position_name) or 0

    def drain(self, vm_name: str) -> int:
        """Perform the VM's pending work until none is left; returns the number of items done."""
        done = 0
        with self._vm_lock(vm_name):
            while done < MAX_ITEMS_PER_DRAIN:
                vm = self.app.get_vm(vm_name)
                items = pending_work(vm)
                if not items:
                    return done
                self.effects.perform(vm, items[0])
                done += 1
        raise RuntimeError(f"VM {vm_name}: work does not converge")

    def run_once(self) -> int:
        """Process the notifications after the position; returns how many were read."""
        start = self.position
        notifications = self.app.recorder.select_notifications(
            start, BATCH, inclusive_of_start=False
        )
        if not notifications:
            return 0
        touched: list[str] = []
        for n in notifications:
            name = self._vm_name(n.originator_id)
            if name is not None and name not in touched:
                touched.append(name)
        for name in touched:
            vm = self.app.get_vm(name)
            if vm.host == self.host:
                self.drain(name)
        self.tracking.insert_tracking(Tracking(self.position_name, notifications[-1].id))
        return len(notifications)

    def run(self, *, until_idle: bool = False, poll: float = 0.2) -> None:
        while True:
            read = self.run_once()
            if read == 0:
                if until_idle:
                    return
                time.sleep(poll)

    def _vm_name(self, originator_id: UUID) -> str | None:
        if originator_id not in self._names:
            try:
                agg = self.app.repository.get(originator_id)
            except Exception:  # noqa: BLE001 - unreadable: not ours to act on
                agg = None
            # Not a VM (a request record, say): remembered too, so it is never loaded again.
            name = agg.name if isinstance(agg, VirtualMachine) else None
            self._names[originator_id] = name
        return self._names[originator_id]

    @contextmanager
    def _vm_lock(self, vm_name: str) -> Iterator[None]:
        """One worker at a time per VM on this host, across processes (CLI and `worker run`)."""
        self.data.vm_dir(vm_name).mkdir(parents=True, exist_ok=True)
        with vm_lock(self.data, vm_name):
            yield


__all__ = ["Worker", "UnknownVM"]
