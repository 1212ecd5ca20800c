"""One line of plain English per event, for the audit timeline.

A summary is a pure function of the event and the VM as it was just before it (event fields carry
node ids; the names a person recognises come from that state). Event types this module does not
know yet get a generic line listing their fields, so the timeline never stops at a new event.
"""

from __future__ import annotations

from typing import Any, Callable
from uuid import UUID

from domain.memory import LiveSwitch
from domain.tree import Node, NodeKind
from domain.vm import VirtualMachine

MAX_LIST = 3  # file paths shown before "and N more"


def event_name(event: Any) -> str:
    return type(event).__name__


def summarize(event: Any, before: VirtualMachine | None) -> str:
    describe = _SUMMARIES.get(event_name(event))
    if describe is None:
        return _generic(event)
    try:
        return describe(event, before)
    except (AttributeError, KeyError, TypeError):
        # An event this code reads differently than it was written (a newer field layout):
        # still one honest line rather than a stopped projection.
        return _generic(event)


# --- helpers ---


def _short(node_id: UUID | None) -> str:
    return str(node_id)[:8] if node_id is not None else "-"


def _node(vm: VirtualMachine | None, node_id: UUID) -> Node | None:
    return vm.nodes.get(node_id) if vm is not None else None


def _label(vm: VirtualMachine | None, node_id: UUID) -> str:
    """How a person knows the node: 'snapshot "A" (1a2b3c4d)', 'the current state (…)', …"""
    node = _node(vm, node_id)
    if node is None:
        return f"node {_short(node_id)}"
    if node.kind is NodeKind.CURRENT:
        return f"the current state ({_short(node_id)})"
    if node.kind is NodeKind.HIDDEN:
        return f'hidden node "{node.name}" ({_short(node_id)})'
    return f'snapshot "{node.name}" ({_short(node_id)})'


def _files(paths: list[str]) -> str:
    shown = ", ".join(paths[:MAX_LIST])
    more = len(paths) - MAX_LIST
    return shown + (f" and {more} more" if more > 0 else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _generic(event: Any) -> str:
    skip = {"originator_id", "originator_version", "timestamp", "originator_topic"}
    fields = ", ".join(f"{k}={v}" for k, v in vars(event).items() if k not in skip)
    return f"{event_name(event)}: {fields}" if fields else event_name(event)


# --- one function per event type ---


def _registered(e: Any, _: VirtualMachine | None) -> str:
    disks = ", ".join(f"{d}={p}" for d, p in e.disks.items())
    return f'registered VM "{e.name}" on host {e.host} with disks {disks}'


def _taken(e: Any, vm: VirtualMachine | None) -> str:
    memory = " asking for its memory" if getattr(e, "memory_path", None) else ""
    return (
        f'took snapshot "{e.name}" ({_short(e.snapshot_id)}){memory}; '
        f"new current state {_short(e.new_current_id)}"
    )


def _applied(e: Any, vm: VirtualMachine | None) -> str:
    verb = "reverted to" if e.revert else "applied"
    return (
        f"{verb} {_label(vm, e.snapshot_id)}; discarded current state {_short(e.discarded_id)}, "
        f"new current state {_short(e.new_current_id)}"
    )


def _layers_created(e: Any, vm: VirtualMachine | None) -> str:
    live = e.live
    if isinstance(live, dict):
        live = LiveSwitch.from_legacy(live)
    extra = ""
    if live is not None and live.pause_ms is not None:
        extra = f"; guest paused {live.pause_ms:.1f} ms"
    if live is not None and live.method is not None:
        extra += f"; memory save started ({live.method.value})"
    if live is not None and live.memory_error:
        extra += f"; memory not saved: {live.memory_error}"
    if live is not None and live.restored_from is not None:
        extra += f"; restored from the memory of {_label(vm, live.restored_from)}"
    if live is not None and live.not_running:
        extra += "; the VM was not running"
    return f"layer files created for {_label(vm, e.node_id)}{extra}"


def _memory_saved(e: Any, vm: VirtualMachine | None) -> str:
    return f"memory of {_label(vm, e.node_id)} saved: {e.bytes} bytes in {e.seconds:.2f} s"


def _memory_failed(e: Any, vm: VirtualMachine | None) -> str:
    return f"memory save of {_label(vm, e.node_id)} failed: {e.error}"


def _config_changed(e: Any, _: VirtualMachine | None) -> str:
    return "settings of the current state: " + ", ".join(f"{k}={v}" for k, v in e.config.items())


def _deleted(e: Any, vm: VirtualMachine | None) -> str:
    outcome = {0: "its files go", 1: "its layers merge into the dependent"}.get(
        e.dependents, "it stays as a hidden merge-pending node"
    )
    return f'deleted snapshot "{e.name}" ({_short(e.node_id)}): {_plural(e.dependents, "dependent")}, {outcome}'


def _renamed(e: Any, _: VirtualMachine | None) -> str:
    return f'renamed snapshot "{e.old_name}" to "{e.new_name}" ({_short(e.node_id)})'


def _removed(e: Any, vm: VirtualMachine | None) -> str:
    return f"removed {_label(vm, e.node_id)}: {e.reason}"


def _scheduled(e: Any, vm: VirtualMachine | None) -> str:
    forced = "forced merge" if e.forced else "merge"
    return f"{forced} of {_label(vm, e.node_id)} scheduled"


def _deferred(e: Any, vm: VirtualMachine | None) -> str:
    return f"merge of {_label(vm, e.node_id)} waits: {_plural(e.dependents, 'dependent')} again"


def _started(e: Any, vm: VirtualMachine | None) -> str:
    into = ", ".join(_short(i) for i in e.into)
    return f"merge of {_label(vm, e.node_id)} started: {e.direction} into {into}, {e.bytes} bytes"


def _completed(e: Any, vm: VirtualMachine | None) -> str:
    into = ", ".join(_short(i) for i in e.into)
    files = f"; {_plural(len(e.files), 'file')} to remove" if e.files else ""
    return f"merged {_label(vm, e.node_id)} ({e.direction}) into {into}{files}"


def _merge_failed(e: Any, vm: VirtualMachine | None) -> str:
    return f"merge of {_label(vm, e.node_id)} failed: {e.error}"


def _imported(e: Any, _: VirtualMachine | None) -> str:
    snaps = sum(1 for n in e.nodes if n.kind is NodeKind.SNAPSHOT)
    src = e.source or {}
    origin = src.get("name") or src.get("vm") or "?"
    where = f" from host {src['host']}" if src.get("host") else ""
    return (
        f'imported a tree of {_plural(len(e.nodes), "node")} ({_plural(snaps, "snapshot")}) '
        f'of VM "{origin}"{where} at its version {src.get("version", "?")}'
    )


def _run_requested(e: Any, _: VirtualMachine | None) -> str:
    paused = " paused" if e.paused else ""
    return f"asked the VM's host to {e.action.value} it{paused}"


def _run_recorded(e: Any, _: VirtualMachine | None) -> str:
    pid = f" (pid {e.pid})" if e.pid else ""
    return f"the VM's host reports it {e.state.value}{pid}"


def _files_removed(e: Any, _: VirtualMachine | None) -> str:
    return f"removed {_plural(len(e.paths), 'file')}: {_files(list(e.paths))}"


_SUMMARIES: dict[str, Callable[[Any, VirtualMachine | None], str]] = {
    "Registered": _registered,
    "SnapshotTaken": _taken,
    "SnapshotApplied": _applied,
    "LayersCreated": _layers_created,
    "MemorySaved": _memory_saved,
    "MemorySaveFailed": _memory_failed,
    "ConfigChanged": _config_changed,
    "SnapshotDeleted": _deleted,
    "SnapshotRenamed": _renamed,
    "NodeRemoved": _removed,
    "MergeScheduled": _scheduled,
    "MergeDeferred": _deferred,
    "MergeStarted": _started,
    "MergeCompleted": _completed,
    "MergeFailed": _merge_failed,
    "Imported": _imported,
    "FilesRemoved": _files_removed,
    "RunRequested": _run_requested,
    "RunRecorded": _run_recorded,
}
