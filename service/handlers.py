"""The one handler table: every command and query, whichever entry point built it.

A command handler does what needs the disk or this host (checking a disk handed to `vm create`,
refusing a start on the wrong host), lets the domain decide (`Snaptree.decide`, one load, one
save) and, when the caller waits, performs the VM's host work at once with the aggregate it
already holds (`Service.settle`). The queue's intake calls `prepare` and the domain's `execute`
instead of `decide`, so that request ids are recorded with the events; nothing else decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from domain import commands as c
from domain.application import Decided
from domain import recovery
from domain.errors import Conflict, InvalidArgument, Refused, VMExists, WrongHost
from domain.vm import VirtualMachine
from service import definition, queries, quiesce
from service.disk_checks import check_disks, copy_disks, parse_disks
from service.results import (
    ConfigSet, NodeMerged, Result, SnapshotApplied, SnapshotRenamed, SnapshotsDeleted,
    SnapshotTaken, VMCreated, VMStatus, WorkChanged,
)
from service.worker import WorkFailed

if TYPE_CHECKING:
    from service.api import Options, Service

Handler = Callable[[Any, "Service", "Options"], Result]


# --- preparing a command: the checks that need the disk or this host ---


@dataclass(frozen=True)
class Prepared:
    command: c.Command  # what the domain decides
    made: tuple[Path, ...] = ()  # files written for it (`vm create --copy`), removed if refused

    def undo(self) -> None:
        for path in self.made:
            path.unlink(missing_ok=True)


def prepare(cmd: c.Command, svc: Service) -> Prepared:
    """The command to decide, after the checks no pure decision can make (may refuse)."""
    check_limits(cmd)
    if isinstance(cmd, c.CreateVM):
        return _register(cmd, svc)
    if isinstance(cmd, c.SetVM):
        vm = svc.app.get_vm(cmd.vm)
        return Prepared(c.ChangeConfig(cmd.vm, definition.set_changes(cmd, vm.nodes[vm.current].config)))
    return Prepared(cmd)


def check_limits(cmd: c.Command) -> None:
    """A command built in Python gets the same range checks as one off the queue."""
    for f in cmd.arguments():
        value = getattr(cmd, f.name)
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(value, int) and not isinstance(value, bool):
            if low is not None and value < low or high is not None and value > high:
                raise InvalidArgument(
                    f"{cmd.verb or type(cmd).__name__}: {f.name} must be between {low} and {high}, not {value}"
                )


def _register(cmd: c.CreateVM, svc: Service) -> Prepared:
    if not cmd.disk:
        raise Refused("give at least one --disk PATH")
    disks = parse_disks(cmd.disk)
    if svc.app.find_vm(cmd.vm) is not None:
        raise VMExists(f"a VM named {cmd.vm!r} already exists")
    check_disks(svc.app, svc.data, svc.disks, cmd.vm, disks, copy=cmd.copy)
    config = definition.create_config(cmd)
    made: list[Path] = []
    if cmd.copy:
        disks, made = copy_disks(svc.data, cmd.vm, disks)
    return Prepared(c.RegisterVM(cmd.vm, host=cmd.host or svc.host, disks=disks, config=config), tuple(made))


# --- commands ---


def _decide(cmd: c.Command, svc: Service, opts: Options, *, settle_first: bool = False) -> Decided:
    if settle_first and opts.wait:
        svc.settle(cmd.vm, opts.progress)  # earlier work on this VM ends first (a take's save)
    prepared = prepare(cmd, svc)
    try:
        decided = svc.app.decide(prepared.command)
    except BaseException:
        prepared.undo()
        raise
    if opts.wait and type(cmd).host_work:
        vm = svc.settle(decided.vm, opts.progress)
        return Decided(decided.result, vm, decided.events)
    return decided


def create_vm(cmd: c.CreateVM, svc: Service, opts: Options) -> VMCreated:
    return VMCreated(_decide(cmd, svc, opts).vm)


def start_vm(cmd: c.StartVM, svc: Service, opts: Options) -> VMStatus:
    vm = _on_this_host(cmd, svc)
    state, pid = svc.machines.probe(vm)
    if pid is not None and (state == "running" or cmd.paused):
        raise Conflict(f"VM {cmd.vm!r} is already {state} (pid {pid})")
    decided = _decide(cmd, svc, opts, settle_first=True)  # a paused VM's vCPUs run again
    return _status(decided.vm, svc, opts)


def stop_vm(cmd: c.StopVM, svc: Service, opts: Options) -> VMStatus:
    _on_this_host(cmd, svc)
    decided = _decide(cmd, svc, opts)
    return _status(decided.vm, svc, opts)


def _on_this_host(cmd: c.Command, svc: Service) -> VirtualMachine:
    vm = svc.app.get_vm(cmd.vm)
    if vm.host != svc.host:
        raise WrongHost(f"VM {cmd.vm!r} belongs to host {vm.host!r}, not {svc.host!r}")
    return vm


def _status(vm: VirtualMachine, svc: Service, opts: Options) -> VMStatus:
    if not opts.wait:
        return VMStatus(vm.name, vm.run.state.value, vm.run.pid, vm.host, source="recorded")
    state, pid = svc.machines.probe(vm)
    return VMStatus(vm.name, state, pid, vm.host)


def set_vm(cmd: c.SetVM, svc: Service, opts: Options) -> ConfigSet:
    return ConfigSet(_decide(cmd, svc, opts).vm)


def take_snapshot(cmd: c.TakeSnapshot, svc: Service, opts: Options) -> SnapshotTaken:
    if cmd.quiesce is c.Quiesce.ON:
        _need_agent(cmd, svc)
    decided = _undone_if_its_layers_fail(cmd, svc, opts, what=f"snapshot {cmd.name!r}")
    return SnapshotTaken(decided.vm, decided.result)


def apply_snapshot(cmd: c.ApplySnapshot, svc: Service, opts: Options) -> SnapshotApplied:
    decided = _undone_if_its_layers_fail(cmd, svc, opts, what=f"the apply of {cmd.snapshot!r}", settle_first=True)
    return SnapshotApplied(decided.vm, cmd.snapshot, decided.result)


def revert_snapshot(cmd: c.RevertSnapshot, svc: Service, opts: Options) -> SnapshotApplied:
    decided = _undone_if_its_layers_fail(cmd, svc, opts, what="the revert", settle_first=True)
    return SnapshotApplied(decided.vm, "", decided.result, revert=True)


def _undone_if_its_layers_fail(cmd: c.Command, svc: Service, opts: Options, *, what: str,
                               settle_first: bool = False) -> Decided:
    """A take or apply whose new overlay cannot be created is rolled back before the command
    fails, so that a command that exits non-zero leaves nothing behind (the queue's producers
    decide themselves: `work.retry` or `work.abandon`)."""
    try:
        return _decide(cmd, svc, opts, settle_first=settle_first)
    except WorkFailed as failed:
        vm = svc.app.get_vm(cmd.vm)
        held = recovery.blocking(vm)
        if held is None or held.node_id != vm.current:
            raise
        svc.app.decide(c.AbandonWork(cmd.vm), vm=vm)
        svc.settle(cmd.vm, opts.progress)
        raise WorkFailed(f"{failed}; {what} was rolled back: nothing of it is recorded") from None


def _need_agent(cmd: c.TakeSnapshot, svc: Service) -> None:
    """`--quiesce on` refuses before anything is recorded when no agent answers."""
    vm = _on_this_host(cmd, svc)
    live = svc.machines.attach(vm)
    if live is None:
        raise Refused(f"--quiesce on: VM {cmd.vm!r} is not running, so no guest agent can freeze it")
    try:
        state = live.agent_state(quiesce.agent_timeout())
    finally:
        live.close()
    if state != "connected":
        raise Refused(f"--quiesce on: the guest agent of VM {cmd.vm!r} is {state}; nothing was taken"
                      " (`--quiesce auto` takes a crash-consistent snapshot)")


def retry_work(cmd: c.RetryWork, svc: Service, opts: Options) -> WorkChanged:
    decided = _decide(cmd, svc, opts)
    return WorkChanged(decided.vm, "retried")


def abandon_work(cmd: c.AbandonWork, svc: Service, opts: Options) -> WorkChanged:
    decided = _decide(cmd, svc, opts)
    return WorkChanged(decided.vm, "rolled back")


def delete_snapshot(cmd: c.DeleteSnapshot, svc: Service, opts: Options) -> SnapshotsDeleted:
    decided = _decide(cmd, svc, opts)
    return SnapshotsDeleted(cmd.vm, list(decided.result))


def rename_snapshot(cmd: c.RenameSnapshot, svc: Service, opts: Options) -> SnapshotRenamed:
    _decide(cmd, svc, opts)
    return SnapshotRenamed(cmd.vm, cmd.snapshot, cmd.new)


def merge_node(cmd: c.MergeNode, svc: Service, opts: Options) -> NodeMerged:
    decided = _decide(cmd, svc, opts)
    return NodeMerged(cmd.vm, decided.result)


HANDLERS: dict[type, Handler] = {
    c.CreateVM: create_vm,
    c.StartVM: start_vm,
    c.StopVM: stop_vm,
    c.SetVM: set_vm,
    c.TakeSnapshot: take_snapshot,
    c.ApplySnapshot: apply_snapshot,
    c.RevertSnapshot: revert_snapshot,
    c.DeleteSnapshot: delete_snapshot,
    c.RenameSnapshot: rename_snapshot,
    c.MergeNode: merge_node,
    c.RetryWork: retry_work,
    c.AbandonWork: abandon_work,
    c.GetTree: queries.get_tree,
    c.ListMerges: queries.list_merges,
    c.ListVMs: queries.list_vms,
    c.GetVMStatus: queries.vm_status,
    c.GetVMDefinition: queries.vm_show,
    c.GetAuditLog: queries.audit_log,
}
