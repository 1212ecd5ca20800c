"""What each handler returns: typed values whose `json()` is exactly what `--json` prints and
what a queue reply carries (docs/queue.md), and whose `text()` is the CLI's one-line summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from domain.memory import MemoryState
from domain.tree import Node, NodeKind
from domain.vm import VirtualMachine
from projections.tree_view import failures_json, memory_json


class Result:
    def json(self) -> Any:
        raise NotImplementedError

    def text(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class VMCreated(Result):
    vm: VirtualMachine

    def json(self) -> dict[str, Any]:
        return {"vm": self.vm.name, "id": str(self.vm.id), "current": str(self.vm.current),
                "disks": dict(self.vm.disks)}

    def text(self) -> str:
        disks = ", ".join(f"{d}={p}" for d, p in self.vm.disks.items())
        return f"created VM {self.vm.name} with disks {disks}"


@dataclass(frozen=True)
class VMStatus(Result):
    vm: str
    state: str  # running | paused | stopped
    pid: int | None
    host: str
    source: str = "probe"  # "probe": asked QEMU on its host; "recorded": what its worker last saw
    failures: list[dict[str, Any]] = field(default_factory=list)
    agent: str | None = None  # connected | absent | unresponsive (asked on the VM's host only)

    def json(self) -> dict[str, Any]:
        out = {"vm": self.vm, "state": self.state, "pid": self.pid, "host": self.host,
               "source": self.source}
        if self.agent is not None:
            out["agent"] = self.agent
        if self.failures:
            out["failures"] = self.failures  # host work waiting for `work retry` / `work abandon`
        return out

    def text(self) -> str:
        seen = "" if self.source == "probe" else " (as last recorded by its host)"
        agent = f"\tagent={self.agent}" if self.agent is not None else ""
        return f"{self.vm}\t{self.state}\tpid={self.pid}\thost={self.host}{agent}{seen}"


@dataclass(frozen=True)
class ConfigSet(Result):
    vm: VirtualMachine

    def json(self) -> dict[str, Any]:
        return {"vm": self.vm.name, "config": dict(self.vm.nodes[self.vm.current].config)}

    def text(self) -> str:
        config = self.vm.nodes[self.vm.current].config
        shown = ", ".join(f"{k}={v}" for k, v in sorted(config.items()) if not isinstance(v, (dict, list)))
        saved = sum(1 for n in self.vm.nodes.values() if n.memory is not None and n.memory.has_file)
        keep = f"; {saved} snapshot(s) with saved memory restore with their own copy" if saved else ""
        return f"VM {self.vm.name}: {shown}\ntakes effect at the next start{keep} (`snaptree vm show {self.vm.name}`)"


@dataclass(frozen=True)
class SnapshotTaken(Result):
    vm: VirtualMachine
    snapshot: UUID

    @property
    def node(self) -> Node:
        return self.vm.nodes[self.snapshot]

    def json(self) -> dict[str, Any]:
        out = {"vm": self.vm.name, "snapshot": str(self.snapshot), "name": self.node.name,
               "memory": memory_json(self.node)}
        q = self.node.quiesce
        if q is not None:
            out["quiesce"] = {"state": q.label(), "filesystems": q.filesystems, "frozen_ms": q.frozen_ms}
        return out

    def text(self) -> str:
        mem = self.node.memory
        detail = ""
        if mem is not None and mem.pause_ms is not None:
            detail = f"; guest paused {mem.pause_ms:.1f} ms"
        if mem is not None and mem.state in (MemoryState.SAVED, MemoryState.SAVING):
            detail += f"; memory {memory_json(self.node)['state']}"
            detail += f" ({mem.bytes} bytes)" if mem.bytes else ""
        elif mem is not None and mem.state is MemoryState.FAILED:
            detail += f"; memory not saved: {mem.error}"
        elif mem is not None and mem.note:
            detail += f"; {mem.note}"
        q = self.node.quiesce
        if q is not None and q.state.value == "frozen":
            detail += f"; {q.filesystems} filesystem(s) frozen {q.frozen_ms:.0f} ms"
            detail += f"; {q.reason}" if q.reason else ""
        elif q is not None and q.state.value != "off":
            detail += f"; crash-consistent (quiesce {q.label()})"
        return f"took snapshot {self.node.name} ({self.snapshot}){detail}"


@dataclass(frozen=True)
class SnapshotApplied(Result):
    vm: VirtualMachine
    snapshot: str
    current: UUID
    revert: bool = False

    def json(self) -> dict[str, Any]:
        if self.revert:
            return {"vm": self.vm.name, "current": str(self.current)}
        return {"vm": self.vm.name, "snapshot": self.snapshot, "current": str(self.current)}

    def text(self) -> str:
        if self.revert:
            return f"reverted: new current state {self.current}"
        return f"applied {self.snapshot}: new current state {self.current}"


@dataclass(frozen=True)
class SnapshotsDeleted(Result):
    vm: str
    deleted: list[UUID]

    def json(self) -> dict[str, Any]:
        return {"vm": self.vm, "deleted": [str(d) for d in self.deleted]}

    def text(self) -> str:
        return f"deleted {len(self.deleted)} snapshot(s)"


@dataclass(frozen=True)
class SnapshotRenamed(Result):
    vm: str
    snapshot: str
    name: str

    def json(self) -> dict[str, Any]:
        return {"vm": self.vm, "snapshot": self.snapshot, "name": self.name}

    def text(self) -> str:
        return f"renamed {self.snapshot} to {self.name}"


@dataclass(frozen=True)
class NodeMerged(Result):
    vm: str
    node: UUID

    def json(self) -> dict[str, Any]:
        return {"vm": self.vm, "node": str(self.node)}

    def text(self) -> str:
        return f"merged node {self.node}"


@dataclass(frozen=True)
class WorkChanged(Result):
    vm: VirtualMachine
    action: str  # "retried" | "rolled back"

    def json(self) -> dict[str, Any]:
        return {"vm": self.vm.name, "action": self.action, "current": str(self.vm.current),
                "failures": failures_json(self.vm)}

    def text(self) -> str:
        left = failures_json(self.vm)
        return f"VM {self.vm.name}: failed work {self.action}" + (
            "; still failing: " + "; ".join(f["message"] for f in left) if left else "")


@dataclass(frozen=True)
class Document(Result):
    """A read: `tree`, `merges`, `vm list`, `audit log` — the JSON is the result itself."""

    data: Any
    host: str | None = None  # for the text rendering of a tree
    lines: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return self.data

    def text(self) -> str:
        return "\n".join(self.lines)


def vm_rows(vms: list[VirtualMachine]) -> Document:
    rows = []
    for agg in vms:
        snaps = sum(1 for n in agg.nodes.values() if n.kind is NodeKind.SNAPSHOT)
        hidden = sum(1 for n in agg.nodes.values() if n.kind is NodeKind.HIDDEN)
        rows.append({"vm": agg.name, "host": agg.host, "snapshots": snaps, "hidden": hidden,
                     "disks": dict(agg.disks)})
    lines = [f"{r['vm']}\thost={r['host']}\tsnapshots={r['snapshots']}\thidden={r['hidden']}" for r in rows]
    return Document(rows, lines=lines or ["no VMs"])
