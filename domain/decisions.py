"""The one table that maps each command to the aggregate's decision (docs/architecture.md).

A decision is pure: it reads the aggregate (None when no VM has the command's name yet), asks it
to decide, and returns the result together with the aggregate to save. Every entry point gets
here through the same handler, whichever process or host runs it.
"""

from __future__ import annotations

from typing import Any, Callable
from uuid import UUID

from domain import commands as c
from domain.errors import UnknownVM, VMExists
from domain.lifecycle import RunAction
from domain.ports import Layout
from domain.vm import VirtualMachine

Decision = Callable[[Any, "VirtualMachine | None", Layout], "tuple[Any, VirtualMachine]"]


def layer_paths(layout: Layout, vm: VirtualMachine) -> Callable[[UUID], dict[str, str]]:
    return lambda node_id: {disk: layout.layer_path(vm.name, node_id, disk) for disk in vm.disks}


def _need(vm: VirtualMachine | None, name: str) -> VirtualMachine:
    if vm is None:
        raise UnknownVM(f"no VM named {name!r}")
    return vm


def _register(cmd: c.RegisterVM, vm: VirtualMachine | None, _: Layout) -> tuple[UUID, VirtualMachine]:
    if vm is not None:
        raise VMExists(f"a VM named {cmd.vm!r} already exists")
    new = VirtualMachine.register(name=cmd.vm, host=cmd.host, disks=dict(cmd.disks), config=dict(cmd.config))
    return new.id, new


def _take(cmd: c.TakeSnapshot, vm: VirtualMachine | None, layout: Layout) -> tuple[UUID, VirtualMachine]:
    v = _need(vm, cmd.vm)
    memory = layout.state_path(v.name, v.current) if cmd.memory else None
    nvram = layout.nvram_path(v.name, v.current)
    return v.take_snapshot(cmd.name, layer_paths(layout, v), memory, quiesce=cmd.quiesce, nvram_path=nvram), v


def _apply(cmd: c.ApplySnapshot, vm: VirtualMachine | None, layout: Layout) -> tuple[UUID, VirtualMachine]:
    v = _need(vm, cmd.vm)
    return v.apply_snapshot(cmd.snapshot, layer_paths(layout, v), paused=cmd.paused), v


def _revert(cmd: c.RevertSnapshot, vm: VirtualMachine | None, layout: Layout) -> tuple[UUID, VirtualMachine]:
    v = _need(vm, cmd.vm)
    return v.revert(layer_paths(layout, v), paused=cmd.paused), v


def _on(vm: VirtualMachine | None, name: str, act: Callable[[VirtualMachine], Any]) -> tuple[Any, VirtualMachine]:
    v = _need(vm, name)
    return act(v), v


DECISIONS: dict[type, Decision] = {
    c.RegisterVM: _register,
    c.TakeSnapshot: _take,
    c.ApplySnapshot: _apply,
    c.RevertSnapshot: _revert,
    c.DeleteSnapshot: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.delete_snapshot(cmd.snapshot, subtree=cmd.subtree)),
    c.RenameSnapshot: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.rename_snapshot(cmd.snapshot, cmd.new)),
    c.MergeNode: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.merge(cmd.node, force=cmd.force)),
    c.ChangeConfig: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.set_config(dict(cmd.changes))),
    c.StartVM: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.request_run(RunAction.START, paused=cmd.paused)),
    c.StopVM: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.request_run(RunAction.STOP)),
    c.RetryWork: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.retry_work()),
    c.AbandonWork: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.abandon_work()),
    # what workers report
    c.RecordLayersCreated: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.layers_created(cmd.node_id, cmd.live)),
    c.RecordMemorySaved: lambda cmd, vm, _: _on(
        vm, cmd.vm, lambda v: v.memory_saved(cmd.node_id, cmd.bytes, cmd.seconds, cmd.sha256)),
    c.RecordMemorySaveFailed: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.memory_save_failed(cmd.node_id, cmd.error)),
    c.RecordMergeStarted: lambda cmd, vm, _: _on(
        vm, cmd.vm, lambda v: v.merge_started(cmd.node_id, list(cmd.into), cmd.direction, cmd.bytes)),
    c.RecordMergeCompleted: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.merge_completed(cmd.node_id)),
    c.RecordMergeFailed: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.merge_failed(cmd.node_id, cmd.error)),
    c.RecordFlattenStarted: lambda cmd, vm, _: _on(
        vm, cmd.vm, lambda v: v.flatten_started(cmd.node_id, cmd.base_id, cmd.bytes)),
    c.RecordFlattenCompleted: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.flatten_completed(cmd.node_id)),
    c.RecordFlattenCancelled: lambda cmd, vm, _: _on(
        vm, cmd.vm, lambda v: v.flatten_cancelled(cmd.node_id, cmd.reason)),
    c.RecordFilesRemoved: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.files_removed(list(cmd.paths))),
    c.RecordStepFailed: lambda cmd, vm, _: _on(
        vm, cmd.vm, lambda v: v.step_failed(cmd.kind, cmd.seq, cmd.error, cmd.node_id, tuple(cmd.paths))),
    c.RecordRun: lambda cmd, vm, _: _on(vm, cmd.vm, lambda v: v.record_run(cmd.state, cmd.pid)),
}


def decide(cmd: c.Command, vm: VirtualMachine | None, layout: Layout) -> tuple[Any, VirtualMachine]:
    try:
        decision = DECISIONS[type(cmd)]
    except KeyError:
        raise TypeError(f"{type(cmd).__name__} is not a command the domain decides") from None
    return decision(cmd, vm, layout)
