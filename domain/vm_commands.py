"""What users ask of a VM's tree: take, apply, revert, delete, rename, merge, settings, start/stop.

Each method checks everything first and only then triggers events (docs/semantics.md). After
every change the dependents rule runs again over all hidden nodes until nothing moves (the
cascade, domain/rules.py).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable
from uuid import UUID

from domain import names, recovery
from domain.commands import Quiesce
from domain.errors import Conflict, NameTaken, Refused
from domain.lifecycle import RunAction
from domain.memory import MemoryState
from domain.rules import Outcome, max_chain_depth, merge_directions, needs_flatten, next_follow_up
from domain.tree import MergeState, Node, NodeKind, ancestors, children, logical_ancestors, logical_descendants
from domain.vm_queries import kind_phrase

if TYPE_CHECKING:
    from domain.vm import VirtualMachine

LayerPaths = Callable[[UUID], dict[str, str]]


class SnapshotCommands:
    def take_snapshot(
        self: VirtualMachine, name: str, layer_paths: LayerPaths, memory_path: str | None = None,
        quiesce: Quiesce | None = None, nvram_path: str | None = None,
    ) -> UUID:
        """Freeze the current state as snapshot `name`; a new overlay becomes the current state.

        `memory_path`: where the memory goes if the VM runs when the worker switches its disks
        (the intent; the host's worker knows whether it runs).
        """
        name = names.snapshot_name(name)
        self._refuse_while_failed("take a snapshot")
        if self.snapshot_named(name) is not None:
            raise NameTaken(f"VM {self.name!r} already has a snapshot named {name!r}")
        if self.nodes[self.current].restore is not None:
            raise Conflict(f"VM {self.name!r} is still being restored; wait for the worker")
        frozen = self.current
        new_id = uuid.uuid4()
        self.trigger_event(
            self.SnapshotTaken, snapshot_id=frozen, name=name, new_current_id=new_id,
            layers=layer_paths(new_id), memory_path=memory_path, quiesce=quiesce,
            nvram_path=nvram_path if self.nodes[frozen].config.get("firmware") == "uefi" else None,
        )
        self._bound_chain()
        return frozen

    def apply_snapshot(
        self: VirtualMachine, ref: str, layer_paths: LayerPaths, *, revert: bool = False,
        paused: bool = False,
    ) -> UUID:
        """Start from a copy of the snapshot: a fresh overlay on it; the old current is discarded.

        A snapshot with saved memory comes back running (or paused) exactly where it was; one whose
        memory is still being saved is restored once the save ends (work runs in order).
        """
        snap = self.resolve_snapshot(ref)
        self._refuse_while_merging("apply a snapshot")
        self._refuse_while_failed("apply a snapshot")
        current = self.nodes[self.current]
        if not current.ready and current.parent is not None and self.may_run():
            # A take's live switch has not happened yet: the apply would discard the overlay it
            # switches to, and the VM would go on writing into the frozen snapshot's layer.
            taken = self.nodes[current.parent].name
            raise Conflict(f"snapshot {taken!r} is still being taken; wait for the worker first")
        mem = snap.memory
        restores = mem is not None and mem.state in (MemoryState.SAVING, MemoryState.SAVED)
        new_id = uuid.uuid4()
        self.trigger_event(
            self.SnapshotApplied, snapshot_id=snap.id, discarded_id=self.current,
            new_current_id=new_id, layers=layer_paths(new_id), revert=revert,
            resume=("paused" if paused else "running") if restores else None,
        )
        self._follow_up()
        self._bound_chain()
        return new_id

    def revert(self: VirtualMachine, layer_paths: LayerPaths, *, paused: bool = False) -> UUID:
        """Apply the nearest visible snapshot above the current state (hidden nodes are skipped)."""
        for node in logical_ancestors(self.nodes, self.current):
            if node.kind is NodeKind.SNAPSHOT:
                return self.apply_snapshot(str(node.id), layer_paths, revert=True, paused=paused)
        raise Refused(f"VM {self.name!r} has no snapshot above its current state to revert to")

    def delete_snapshot(self: VirtualMachine, ref: str, *, subtree: bool = False) -> list[UUID]:
        """Delete one snapshot, or it and every snapshot below it (leaves first)."""
        snap = self.resolve_snapshot(ref)
        self._refuse_while_merging("delete a snapshot")
        self._refuse_while_failed("delete a snapshot")
        targets = [snap]
        if subtree:
            below = [n for n in logical_descendants(self.nodes, snap.id) if n.kind is NodeKind.SNAPSHOT]
            targets = below + [snap]
        for target in targets:
            if target.flatten is MergeState.RUNNING:
                raise Conflict(
                    f"cannot delete snapshot {target.name!r} of VM {self.name!r} while its layer is being"
                    " flattened; wait for the worker (snaptree worker run)"
                )
        for target in targets:
            self._delete_one(target)
        return [t.id for t in targets]

    def _delete_one(self: VirtualMachine, snap: Node) -> None:
        mem = snap.memory
        files = [mem.path] if mem is not None and mem.has_file and mem.path else []
        self.trigger_event(
            self.SnapshotDeleted, node_id=snap.id, name=snap.name or "",
            dependents=len(children(self.nodes, snap.id)), files=files,
        )
        self._follow_up()

    def rename_snapshot(self: VirtualMachine, ref: str, new_name: str) -> None:
        snap = self.resolve_snapshot(ref)
        new_name = names.snapshot_name(new_name)
        other = self.snapshot_named(new_name)
        if other is not None and other.id != snap.id:
            raise NameTaken(f"VM {self.name!r} already has a snapshot named {new_name!r}")
        if snap.name == new_name:
            return
        self.trigger_event(
            self.SnapshotRenamed, node_id=snap.id, old_name=snap.name or "", new_name=new_name
        )

    def merge(self: VirtualMachine, ref: str, *, force: bool) -> UUID:
        """Ask for a hidden node's merge now: retry a failed one, or force one with 2+ dependents.

        A forced merge pulls the node's data up into each dependent, then deletes it.
        """
        node = self.resolve_node(ref)
        self._refuse_while_failed("merge a node")
        if node.kind is not NodeKind.HIDDEN:
            raise Refused(f"node {ref!r} is {kind_phrase(node)}; only hidden nodes merge")
        if node.merge_state is MergeState.RUNNING:
            raise Conflict(f"the merge of node {node.id} is already running")
        dependents = len(children(self.nodes, node.id))
        if dependents >= 2 and not force:
            raise Refused(
                f"node {ref!r} has {dependents} dependents; `merge --force` pulls its data up into each"
            )
        if not merge_directions(dependents=dependents, root=node.parent is None) and dependents:
            raise Refused(
                f"node {ref!r} holds the VM's own disk; a forced merge would delete the user's file"
            )
        if node.merge_state is MergeState.SCHEDULED and node.merge_forced == (dependents >= 2):
            return node.id
        for above in ancestors(self.nodes, node.id):
            if above.merge_state in (MergeState.SCHEDULED, MergeState.RUNNING):
                # Its merge re-parents or re-files this node (it may even hand it the VM's own
                # disk): decide once it is done.
                raise Conflict(
                    f"the merge of node {above.id} above {ref!r} is pending; try again when the worker is idle"
                )
        self.trigger_event(self.MergeScheduled, node_id=node.id, forced=dependents >= 2)
        return node.id

    def set_config(self: VirtualMachine, changes: dict[str, Any]) -> None:
        """Change the current state's settings; snapshots keep their copies."""
        if not changes:
            raise Refused("nothing to change")
        config = dict(self.nodes[self.current].config)
        config.update(changes)
        config = {k: v for k, v in config.items() if v is not None}
        if config != self.nodes[self.current].config:
            self.trigger_event(self.ConfigChanged, config=config)
            self._bound_chain()

    def request_run(self: VirtualMachine, action: RunAction, *, paused: bool = False) -> None:
        """Ask the VM's host to start or stop its QEMU (after the work recorded before; a stop
        also while failed work holds the rest back)."""
        if action is RunAction.START:
            self._refuse_while_failed("start the VM")
        self.trigger_event(self.RunRequested, action=action, paused=paused)

    def retry_work(self: VirtualMachine) -> None:
        """Run the failed host work again."""
        if not self.failed:
            raise Refused(f"VM {self.name!r} has no failed work to retry")
        self.trigger_event(self.WorkRetried)

    def abandon_work(self: VirtualMachine) -> None:
        """Roll back the take or apply whose overlay could not be created."""
        failure = recovery.blocking(self)
        if failure is None:
            if self.failed:
                raise Refused(f"VM {self.name!r}: files could not be deleted; `snaptree work retry {self.name}`"
                              " deletes them (nothing to roll back)")
            raise Refused(f"VM {self.name!r} has no failed work to abandon")
        plan = recovery.rollback_plan(self, failure)
        if plan is None:
            raise Refused(
                f"VM {self.name!r}: the layers of node {failure.node_id} could not be created and it is not"
                f" the current state, so nothing can be rolled back; repair its backing file and"
                f" `snaptree work retry {self.name}`"
            )
        kind, restored = plan
        node = self.nodes[self.current]
        if kind == "take":
            assert node.parent is not None
            self.trigger_event(self.TakeRolledBack, node_id=node.id, snapshot_id=node.parent)
        else:
            self.trigger_event(self.ApplyRolledBack, node_id=node.id, restored=restored)
            self._follow_up()

    # --- internals ---

    def _follow_up(self: VirtualMachine) -> None:
        """Apply the dependents rule to every hidden node until nothing changes (the cascade)."""
        while (found := next_follow_up(self.nodes)) is not None:
            node, outcome = found
            if outcome is Outcome.REMOVE:
                self.trigger_event(self.NodeRemoved, node_id=node.id, reason="no dependents")
            elif outcome is Outcome.MERGE:
                self.trigger_event(self.MergeScheduled, node_id=node.id, forced=False)
            else:
                deps = len(children(self.nodes, node.id))
                self.trigger_event(self.MergeDeferred, node_id=node.id, dependents=deps)

    def _bound_chain(self: VirtualMachine) -> None:
        """Keep the current state's reads shallow: past the VM's `max_chain_depth`, the snapshot
        under it is flattened (domain/rules.py, "how deep a chain may grow")."""
        current = self.nodes[self.current]
        snap = needs_flatten(self.nodes, self.current, max_chain_depth(current.config))
        if snap is not None and snap.flatten is None:
            depth = sum(1 for _ in ancestors(self.nodes, self.current))  # rare: once per flatten
            self.trigger_event(self.FlattenScheduled, node_id=snap.id, depth=depth)

    def _refuse_while_failed(self: VirtualMachine, what: str) -> None:
        failure = recovery.blocking(self)
        if failure is not None:
            raise Conflict(f"cannot {what} of VM {self.name!r}: {recovery.describe(self, failure)}")

    def _refuse_while_merging(self: VirtualMachine, what: str) -> None:
        running = self.running_merge()
        if running is not None:
            raise Conflict(
                f"cannot {what} of VM {self.name!r} while the merge of node {running.id} is running;"
                " wait for the worker (snaptree worker run)"
            )
