"""The worker's loop over one VM: perform its pending work in the order the aggregate asks.

Work is read off the aggregate (`domain.work.pending_work`), so a worker that runs an item twice,
crashes half way or restarts finds exactly what is left. One drain holds the VM's file lock (one
worker per VM across processes), keeps one QMP connection for all its steps, and goes on with the
aggregate it was handed or last saved: it loads the VM only when another process has changed it
meanwhile (a one-row version check per step, not a load).
"""

from __future__ import annotations

import logging
from typing import Callable

from adapters.storage import DataDir
from adapters.vm_lock import vm_lock
from domain.application import Snaptree
from domain.vm import VirtualMachine
from domain.work import pending_work
from service.ports import Disks, Machines
from service import layer_batch, quiesce
from service.steps import Drain

log = logging.getLogger(__name__)

# (VM name, what is happening, fraction done) — for progress bars and logs.
Progress = Callable[[str, str, float], None]
MAX_ITEMS_PER_DRAIN = 100_000


def quiet(vm: str, what: str, fraction: float) -> None:
    pass


class WorkFailed(RuntimeError):
    """Host work of this VM failed; it is recorded on the node it concerns."""

    code = "work_failed"


class Worker:
    def __init__(self, app: Snaptree, data: DataDir, host: str, disks: Disks, machines: Machines,
                 progress: Progress = quiet) -> None:
        self.app = app
        self.data = data
        self.host = host
        self.disks = disks
        self.machines = machines
        self.progress = progress
        self.failures: list[str] = []  # work that failed during this object's life

    def settle(self, vm: str | VirtualMachine) -> VirtualMachine:
        """Drain, and raise WorkFailed when something failed on the way (recorded already)."""
        before = len(self.failures)
        agg = self.drain(vm)
        failed = self.failures[before:]
        if failed:
            raise WorkFailed("; ".join(failed))
        return agg

    def drain(self, vm: str | VirtualMachine) -> VirtualMachine:
        """Perform the VM's pending work until none is left; returns the VM as it ends."""
        name = vm if isinstance(vm, str) else vm.name
        agg = self.fresh(vm) if isinstance(vm, VirtualMachine) else self.app.get_vm(name)
        frozen = quiesce.marked(self.data, name)  # a guest a killed worker may have left frozen
        if not pending_work(agg) and not frozen:
            return agg  # nothing to do: touch no file (a refused command leaves none behind)
        self.data.private_dir(self.data.vm_dir(name))
        with vm_lock(self.data, name):
            agg = self.fresh(agg)
            drain = Drain(self, agg)
            try:
                if frozen:
                    drain.live()  # attaching thaws it, before anything else
                for _ in range(MAX_ITEMS_PER_DRAIN):
                    items = pending_work(drain.vm)
                    if not items:
                        return drain.vm
                    if not layer_batch.run(drain, items):  # queued takes of a stopped VM: at once
                        drain.perform(items[0])
                    drain.vm = self.fresh(drain.vm)
            finally:
                drain.close()
        raise RuntimeError(f"VM {name}: work does not converge")

    def fresh(self, vm: VirtualMachine) -> VirtualMachine:
        """`vm`, or the VM loaded again when another process recorded something since."""
        last = self.app.recorder.select_events(vm.id, desc=True, limit=1)
        if last and last[0].originator_version != vm.version:
            self.app._evict(vm.id)
            return self.app.get_vm(vm.name)
        return vm

    def warned(self, what: str, exc: BaseException, way_out: str = "") -> str:
        """Like `failed`, for work whose failure leaves the command's result whole (a flatten)."""
        log.warning("%s failed: %s%s", what, exc, f"; {way_out}" if way_out else "")
        return str(exc)

    def failed(self, what: str, exc: BaseException, way_out: str = "") -> str:
        """Note a failure for the caller (one line, with the way out); returns what to record."""
        message = f"{what} failed: {exc}" + (f"; {way_out}" if way_out else "")
        log.error("%s", message)
        self.failures.append(message)
        return str(exc)

