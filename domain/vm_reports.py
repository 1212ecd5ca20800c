"""What workers report back after a side effect: each report is recorded at most once.

A worker may run an item twice or after a restart, so every report first checks that the state
still asks for it; a repeated report records nothing (docs/architecture.md, "Idempotence").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

from domain import recovery
from domain.errors import Conflict, Refused
from domain.lifecycle import RunState
from domain.memory import LiveSwitch, MemoryState
from domain.rules import merge_directions
from domain.tree import MergeDirection, MergeState, Node, ancestors, children

if TYPE_CHECKING:
    from domain.vm import VirtualMachine


class WorkerReports:
    def layers_created(self: VirtualMachine, node_id: UUID, live: LiveSwitch | None = None) -> None:
        node = self.nodes.get(node_id)
        if node is not None and not node.ready:
            self.trigger_event(self.LayersCreated, node_id=node_id, live=live)

    def memory_saved(self: VirtualMachine, node_id: UUID, nbytes: int, seconds: float, sha256: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.memory is not None and node.memory.state is MemoryState.SAVING:
            self.trigger_event(
                self.MemorySaved, node_id=node_id, bytes=nbytes, seconds=seconds, sha256=sha256
            )

    def memory_save_failed(self: VirtualMachine, node_id: UUID, error: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.memory is not None and node.memory.pending:
            self.trigger_event(self.MemorySaveFailed, node_id=node_id, error=error)

    def merge_started(
        self: VirtualMachine, node_id: UUID, into: list[UUID], direction: MergeDirection, nbytes: int
    ) -> None:
        node = self.nodes.get(node_id)
        if node is None or node.merge_state is not MergeState.SCHEDULED:
            raise Conflict(f"node {node_id} has no merge waiting to start")
        running = self.running_merge()
        if running is not None:
            raise Conflict(f"the merge of node {running.id} is still running; one merge at a time")
        flattening = self.running_flatten()
        if flattening is not None:
            raise Conflict(f"the layer of node {flattening.id} is being flattened; merges wait for it")
        deps = sorted(c.id for c in children(self.nodes, node_id))
        if sorted(into) != deps:
            raise Conflict(f"merge of {node_id}: dependents are {deps}, not {sorted(into)}")
        if direction not in merge_directions(dependents=len(into), root=node.parent is None):
            raise Refused(
                f"a merge of node {node_id} into {len(into)} dependent(s) cannot {direction.value}"
                + (" (it holds the VM's own disk, which always takes the data)" if node.parent is None else "")
            )
        self.trigger_event(
            self.MergeStarted, node_id=node_id, into=list(into), direction=direction.value, bytes=nbytes
        )

    def merge_completed(self: VirtualMachine, node_id: UUID) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return  # already recorded: a re-run of the same item
        plan = node.merge_plan
        if node.merge_state is not MergeState.RUNNING or plan is None:
            raise Conflict(f"node {node_id} has no running merge")
        layers: dict[UUID, dict[str, str]] = {}
        if plan.direction is MergeDirection.COMMIT_DOWN:
            (dep_id,) = plan.into
            layers[dep_id] = dict(node.layers)  # the dependent takes the merged file over
            files = list(self.nodes[dep_id].layers.values())
        else:
            for dep_id in plan.into:
                layers[dep_id] = dict(self.nodes[dep_id].layers)
            files = list(node.layers.values())
        self.trigger_event(
            self.MergeCompleted, node_id=node_id, into=list(plan.into),
            direction=plan.direction.value, layers=layers,
            files=[f for f in files if not self.is_own_disk(f)],
        )
        self._follow_up()

    def flatten_started(self: VirtualMachine, node_id: UUID, base_id: UUID, nbytes: int) -> None:
        node = self.nodes.get(node_id)
        if node is None or node.flatten is not MergeState.SCHEDULED:
            raise Conflict(f"node {node_id} has no flatten waiting to start")
        running = self.running_merge()
        if running is not None:
            raise Conflict(f"the merge of node {running.id} is still running; the flatten waits for it")
        if base_id not in {a.id for a in ancestors(self.nodes, node_id)} or base_id == node.parent:
            raise Conflict(f"node {base_id} is not an older ancestor of node {node_id}")
        self.trigger_event(self.FlattenStarted, node_id=node_id, base_id=base_id, bytes=nbytes)

    def flatten_completed(self: VirtualMachine, node_id: UUID) -> None:
        node = self.nodes.get(node_id)
        if node is None or node.flatten is not MergeState.RUNNING or node.flatten_base is None:
            return  # already recorded: a re-run of the same item
        skipped = []
        for above in ancestors(self.nodes, node_id):
            if above.id == node.flatten_base:
                break
            skipped.append(above.level)
        self.trigger_event(self.FlattenCompleted, node_id=node_id, base_id=node.flatten_base,
                           level=max([node.level - 1, *skipped]) + 1)
        self._follow_up()  # hidden layers it skipped may have no dependents any more

    def flatten_cancelled(self: VirtualMachine, node_id: UUID, reason: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.flatten is MergeState.SCHEDULED:
            self.trigger_event(self.FlattenCancelled, node_id=node_id, reason=reason)

    def merge_failed(self: VirtualMachine, node_id: UUID, error: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.merge_state in (MergeState.SCHEDULED, MergeState.RUNNING):
            self.trigger_event(self.MergeFailed, node_id=node_id, error=error)

    def files_removed(self: VirtualMachine, paths: list[str]) -> None:
        gone = [p for p in paths if p in self.garbage]
        if gone:
            self.trigger_event(self.FilesRemoved, paths=gone)

    def step_failed(self: VirtualMachine, kind: str, seq: int, error: str, node_id: UUID | None = None,
                    paths: tuple[str, ...] = ()) -> None:
        """Host work that could not be done: recorded once, until retried or abandoned."""
        key = recovery.failure_key(kind, node_id, seq)
        known = self.failed.get(key)
        if known is None or known.error != error:
            self.trigger_event(self.StepFailed, kind=kind, seq=seq, error=error, node_id=node_id,
                               paths=list(paths))

    def record_run(self: VirtualMachine, state: RunState, pid: int | None = None) -> None:
        """What the host's worker found: QEMU runs (or is paused) with `pid`, or is stopped."""
        if self.run_request is not None or self.run.state is not state or self.run.pid != pid:
            self.trigger_event(self.RunRecorded, state=state, pid=pid)

    def record_import(self: VirtualMachine, nodes: list[Node], current: UUID, source: dict[str, Any]) -> None:
        """Replace a just-registered VM's tree by an imported one (see `Imported`)."""
        if self.version != 1:
            raise Conflict(f"VM {self.name!r} already has a history; import into a new name")
        ids = {n.id for n in nodes}
        if current not in ids or any(n.parent is not None and n.parent not in ids for n in nodes):
            raise Refused("the imported tree is inconsistent: a parent or the current state is missing")
        if sum(1 for n in nodes if n.parent is None) != 1:
            raise Refused("the imported tree must have exactly one root")
        root = next(n for n in nodes if n.parent is None)
        if root.layers != self.disks:
            raise Refused("the imported root's layers must be the VM's own disks")
        self.trigger_event(self.Imported, nodes=nodes, current=current, source=dict(source))
