"""The steps of one drain: one work item each, on real files and on the running QEMU.

Every step looks at the disk (or QEMU) before it acts, so an item run twice, or run again after a
crash half way, ends in the same files: an overlay that exists with the right backing is kept, a
switch that happened is found, a file is deleted only after the event that frees it is recorded.
The result goes back as a report command (domain/commands.py, `Record...`).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import TYPE_CHECKING

from adapters.config import durable
from adapters.qemu.errors import MachineError
from domain import commands as c, recovery
from domain.lifecycle import RunAction, RunState
from domain.memory import LiveSwitch, MemoryState, Resume
from domain.tree import Node
from domain.vm import VirtualMachine
from domain.work import WorkItem, WorkKind
from service import flattening, merging, quiesce
from service.ports import EFFECT_ERRORS, LiveVM

if TYPE_CHECKING:
    from service.worker import Worker

log = logging.getLogger(__name__)

TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EAGAIN, errno.EBUSY, errno.ENOMEM}
TRANSIENT_TEXT = ("No space left", "Input/output error", "Disk quota exceeded", "Resource temporarily")


def retry_delays() -> list[float]:
    """Pauses before the retries of a transient failure (SNAPTREE_RETRY_DELAYS, seconds)."""
    raw = os.environ.get("SNAPTREE_RETRY_DELAYS", "0.5,2,5")
    return [float(x) for x in raw.split(",") if x.strip()]


def transient(exc: BaseException) -> bool:
    """A failure that may go away by itself: a full disk, an I/O error."""
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    return any(text in str(exc) or text in getattr(exc, "stderr", "") for text in TRANSIENT_TEXT)


def _label(vm: VirtualMachine, node: Node) -> str:
    if node.id == vm.current:
        return "the current state"
    return f"snapshot {node.name}" if node.name else f"node {node.id}"


class Drain:
    """One pass over a VM's pending work, with the aggregate and the QMP connection it holds."""

    def __init__(self, worker: Worker, vm: VirtualMachine) -> None:
        self.w = worker
        self.vm = vm
        self._live: LiveVM | None = None
        self._probed = False

    # --- what the steps share ---

    def live(self) -> LiveVM | None:
        """The VM's running QEMU, attached once per drain (None when it does not run). A guest
        a killed worker left frozen is thawed before anything else (service/quiesce.py)."""
        if not self._probed:
            self._live = self.w.machines.attach(self.vm)
            self._probed = True
            if self._live is not None:
                quiesce.thaw_left_frozen(self.w.data, self.vm.name, self._live)
        return self._live

    def running(self, live: LiveVM | None) -> None:
        self._live, self._probed = live, True

    def close(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None

    def report(self, cmd: c.Command) -> None:
        self.vm = self.w.app.decide(cmd, vm=self.vm).vm

    def progress(self, what: str, fraction: float) -> None:
        self.w.progress(self.vm.name, what, fraction)

    def perform(self, item: WorkItem) -> None:
        """Do one item; a transient error (disk full, I/O error) is retried after a pause, any
        other failure — or a transient one that persists — is recorded on what it concerns."""
        delays = retry_delays()
        for attempt in range(len(delays) + 1):
            node = self.vm.nodes.get(item.node_id) if item.node_id is not None else None
            if item.node_id is not None and node is None:
                return  # gone meanwhile (another process decided): nothing left to do
            try:
                self._do(item, node)
                return
            except (*EFFECT_ERRORS, OSError) as exc:
                if attempt < len(delays) and transient(exc):
                    log.warning("VM %s: %s failed (%s); retrying in %.1f s",
                                self.vm.name, item.kind.value, exc, delays[attempt])
                    time.sleep(delays[attempt])
                    self.vm = self.w.fresh(self.vm)
                    continue
                self._record_failure(item, node, exc)
                return

    def _do(self, item: WorkItem, node: Node | None) -> None:
        if item.kind is WorkKind.CREATE_LAYERS:
            assert node is not None
            self.create_layers(node)
        elif item.kind is WorkKind.SAVE_MEMORY:
            assert node is not None
            self.save_memory(node)
        elif item.kind is WorkKind.REMOVE_FILES:
            self.remove_files(list(item.paths))
        elif item.kind is WorkKind.MERGE:
            assert node is not None
            merging.merge(self, node)
        elif item.kind is WorkKind.FLATTEN:
            assert node is not None
            flattening.flatten(self, node)
        elif item.kind is WorkKind.RUN:
            self.run()

    def _record_failure(self, item: WorkItem, node: Node | None, exc: BaseException) -> None:
        name = self.vm.name
        if item.kind is WorkKind.CREATE_LAYERS:
            assert node is not None
            error = self.w.failed(f"VM {name}: creating the layers of {_label(self.vm, node)}", exc,
                                  f"`snaptree work retry {name}` runs it again, `snaptree work abandon {name}` rolls it back")
            self.report(c.RecordStepFailed(name, recovery.CREATE_LAYERS, item.seq, error, node_id=node.id))
        elif item.kind is WorkKind.SAVE_MEMORY:
            assert node is not None
            error = self.w.failed(f"memory save of snapshot {node.name}", exc)
            self.report(c.RecordMemorySaveFailed(name, node.id, error))
        elif item.kind is WorkKind.REMOVE_FILES:
            error = self.w.failed(f"deleting {len(item.paths)} file(s) of VM {name}", exc,
                                  f"`snaptree work retry {name}` deletes them")
            self.report(c.RecordStepFailed(name, recovery.REMOVE_FILES, item.seq, error, paths=item.paths))
        elif item.kind is WorkKind.MERGE:
            assert node is not None
            error = self.w.failed(f"VM {name}: merge of node {node.name or node.id}", exc,
                                  f"the node stays hidden; `snaptree merge {name} {node.id}` retries it")
            self.report(c.RecordMergeFailed(name, node.id, error))
        elif item.kind is WorkKind.FLATTEN:
            assert node is not None
            error = self.w.warned(f"VM {name}: flattening the layer of {_label(self.vm, node)}", exc,
                                  f"it reads the same, only through more layers; `snaptree work retry {name}`"
                                  " runs it again")
            self.report(c.RecordStepFailed(name, recovery.FLATTEN, item.seq, error, node_id=node.id))
        elif item.kind is WorkKind.RUN:
            self.w.failed(f"start of VM {name}", exc)
            self.running(None)
            self.report(c.RecordRun(name, RunState.STOPPED))

    # --- overlays, and what a running VM does with them ---

    def create_layers(self, node: Node) -> None:
        """Create the node's overlays; on a running VM switch its writes to them (a live take),
        or, for an applied snapshot, restart QEMU on them (from saved memory if any)."""
        assert node.parent is not None, "the root's layers are the VM's own disks"
        parent = self.vm.nodes[node.parent]
        for disk, path in node.layers.items():
            self.w.data.check_owned(path)
            self.w.data.private_dir(os.path.dirname(path))
            self.w.disks.create_overlay(path, parent.layers[disk])
        self.nvram(node, parent)
        live = self.live()
        if node.restore is not None:
            info = self._restore(node, parent, live)
        elif live is not None:
            info = self._switch(node, parent, live)
        else:
            info = LiveSwitch(not_running=True)
        self.report(c.RecordLayersCreated(self.vm.name, node.id, info))

    def nvram(self, node: Node, parent: Node) -> None:
        """A UEFI VM's variable store: a take freezes a copy with the snapshot; an apply puts
        the snapshot's copy back before QEMU restarts on it (or starts next)."""
        current = self.w.data.nvram_path(self.vm.name, None)
        if node.nvram_from is not None:
            if os.path.exists(node.nvram_from):
                self.w.data.copy_private(node.nvram_from, current)
            elif os.path.exists(current):
                os.unlink(current)  # the snapshot was taken before the VM ever ran: fresh variables
        elif parent.nvram is not None and not os.path.exists(parent.nvram) and os.path.exists(current):
            self.w.data.copy_private(current, parent.nvram)

    def _switch(self, node: Node, parent: Node, live: LiveVM) -> LiveSwitch:
        active = live.active_layers()
        asked = parent.memory is not None and parent.memory.state is MemoryState.REQUESTED
        if active == node.layers:  # switched before a worker died
            # Its save runs on, or has completed into this snapshot's own state file.
            written = asked and parent.memory is not None and parent.memory.path is not None \
                and os.path.isfile(parent.memory.path) and os.path.getsize(parent.memory.path) > 0
            method = live.saving() if written else None
            lost = "the memory save did not survive the worker's restart" if asked and method is None else None
            return LiveSwitch(resumed_after_crash=True, method=method, memory_error=lost)
        if active != parent.layers:  # an apply without saved memory: the VM ends stopped
            live.stop()
            self.running(None)
            return LiveSwitch(run_after=RunState.STOPPED)
        state_path = parent.memory.path if asked and parent.memory is not None else None
        if state_path is not None:
            self.w.data.private_dir(os.path.dirname(state_path))
        return quiesce.switch_quiesced(self.w.data, self.vm.name, live, parent.quiesce_mode,
                                       lambda: live.switch(dict(node.layers), state_path))

    def _restore(self, node: Node, parent: Node, live: LiveVM | None) -> LiveSwitch | None:
        if live is not None:  # QEMU still runs on the discarded current state
            live.stop()
            self.running(None)
        mem = parent.memory
        if mem is None or mem.state is not MemoryState.SAVED or mem.path is None:
            return LiveSwitch(run_after=RunState.STOPPED) if live is not None else None
        paused = node.restore is Resume.PAUSED
        restored = self.w.machines.restore(self.vm, dict(node.layers), dict(parent.config), mem.path,
                                           paused=paused)
        self.running(restored)
        clock, thawed = quiesce.after_restore(self.w.data, self.vm.name, restored, parent, paused=paused)
        return LiveSwitch(restored_from=parent.id, pid=restored.pid, clock=clock, thawed=thawed,
                          run_after=RunState.PAUSED if paused else RunState.RUNNING)

    # --- memory ---

    def save_memory(self, node: Node) -> None:
        """Wait for a live snapshot's memory save to end, and record how it ended."""
        mem = node.memory
        assert mem is not None and mem.path is not None
        if mem.state is MemoryState.REQUESTED:
            raise MachineError("the save never started (the VM was not running on this snapshot)")
        live = self.live()
        if live is None:
            raise MachineError("the VM stopped before its memory was saved")
        saved = live.wait_saved(mem.path, lambda f: self.progress(f"save memory of {node.name}", f))
        self.report(c.RecordMemorySaved(self.vm.name, node.id, saved.bytes, saved.seconds, saved.sha256))

    # --- file removal ---

    def remove_files(self, paths: list[str]) -> None:
        vm = self.vm
        in_use = {p for n in vm.nodes.values() for p in n.layers.values()}
        durable(self.w.app)  # the events that freed these files must survive a power cut
        for path in paths:
            if path in in_use or vm.is_own_disk(path):
                # Never happens by the rules; refusing keeps a bug from destroying data.
                raise RuntimeError(f"refusing to delete {path}: a node of VM {vm.name} still uses it")
            self.w.data.check_owned(path)
            live = self.live() if path.endswith(".state") else None
            if live is not None:
                live.cancel_save(path)  # a snapshot deleted while its memory is being saved
            self.w.disks.remove(path)
        self.report(c.RecordFilesRemoved(vm.name, tuple(paths)))

    # --- start and stop ---

    def run(self) -> None:
        request = self.vm.run_request
        assert request is not None
        live = self.live()
        if request.action is RunAction.START:
            if live is None:
                live = self.w.machines.start(self.vm, paused=request.paused)
                self.running(live)
            elif live.run_state() == "paused" and not request.paused:
                live.resume()  # e.g. restored paused from a snapshot's memory
                quiesce.after_resume(self.w.data, self.vm.name, live)
            state = RunState.RUNNING if live.run_state() == "running" else RunState.PAUSED
            self.report(c.RecordRun(self.vm.name, state, live.pid))
        else:
            if live is not None:
                live.stop()
                self.running(None)
            self.report(c.RecordRun(self.vm.name, RunState.STOPPED))
