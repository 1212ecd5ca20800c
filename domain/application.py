"""The snaptree Application: the command methods every entry point (CLI, Python API, queue) calls.

It loads a VM aggregate, lets it decide, and saves the new events with optimistic concurrency on
the aggregate version. A command that loses a race is simply run again on the fresh state: every
command is a pure decision on the state it is given.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, ClassVar, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError, PersistenceError

from domain.errors import Refused, UnknownVM, VMExists
from domain.names import validate_name
from domain.ports import Layout
from domain.requests import Execution, Request, request_executed
from domain.tree import MergeDirection
from domain.vm import VirtualMachine, vm_id

T = TypeVar("T")

MAX_ATTEMPTS = 20


class Snaptree(Application[UUID]):
    name = "snaptree"
    # Aggregate snapshots keep loading a VM with a long history as fast as loading a new one.
    snapshotting_intervals: ClassVar[dict[type, int]] = {VirtualMachine: 100}
    # Commands work on the cached aggregate itself (no deep copy of a tree with hundreds of
    # nodes per command); a command that fails evicts it, and a per-VM lock keeps threads apart.
    env: ClassVar[dict[str, str]] = {
        "AGGREGATE_CACHE_MAXSIZE": "256",
        "DEEPCOPY_FROM_AGGREGATE_CACHE": "n",
    }

    def __init__(self, layout: Layout, env: dict[str, str] | None = None) -> None:
        super().__init__(env=env)
        self.layout = layout
        self._locks: dict[UUID, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # --- queries ---

    def get_vm(self, name: str) -> VirtualMachine:
        validate_name(name, "VM name")
        try:
            vm = self.repository.get(vm_id(name))
        except AggregateNotFoundError:
            raise UnknownVM(f"no VM named {name!r}") from None
        assert isinstance(vm, VirtualMachine)
        return vm

    def get_vm_at(self, name: str, version: int) -> VirtualMachine:
        latest = self.get_vm(name).version
        if not 1 <= version <= latest:
            raise Refused(f"VM {name!r} has versions 1 to {latest}, not {version}")
        vm = self.repository.get(vm_id(name), version=version)
        assert isinstance(vm, VirtualMachine)
        return vm

    def vm_names(self) -> list[str]:
        """Every registered VM, read off the notification log's `Registered` events."""
        topic = f"{VirtualMachine.Registered.__module__}:{VirtualMachine.Registered.__qualname__}"
        names: list[str] = []
        start = 0
        while True:
            batch = self.recorder.select_notifications(
                start, 1000, topics=[topic], inclusive_of_start=False
            )
            if not batch:
                return sorted(names)
            for n in batch:
                names.append(self.mapper.to_domain_event(n).name)  # type: ignore[attr-defined]
            start = batch[-1].id

    # --- commands ---

    def create_vm(
        self, name: str, disks: dict[str, str], host: str, config: dict[str, Any] | None = None
    ) -> UUID:
        vm = VirtualMachine.register(name=name, host=host, disks=disks, config=config)
        try:
            self.save(vm)
        except IntegrityError:
            raise VMExists(f"a VM named {name!r} already exists") from None
        return vm.id

    def take(self, vm: str, name: str, *, with_memory: bool = False) -> UUID:
        """`with_memory`: the VM is running and its memory is to be saved with the snapshot."""

        def decide(agg: VirtualMachine) -> UUID:
            memory = self.layout.state_path(agg.name, agg.current) if with_memory else None
            return agg.take_snapshot(name, self._paths(agg), memory)

        return self._command(vm, decide)

    def apply(self, vm: str, snapshot: str, *, paused: bool = False, wait_for_memory: bool = True) -> UUID:
        return self._command(
            vm,
            lambda agg: agg.apply_snapshot(
                snapshot, self._paths(agg), paused=paused, wait_for_memory=wait_for_memory
            ),
        )

    def set_config(self, vm: str, changes: dict[str, Any]) -> None:
        self._command(vm, lambda agg: agg.set_config(changes))

    def revert(self, vm: str) -> UUID:
        return self._command(vm, lambda agg: agg.revert(self._paths(agg)))

    def delete(self, vm: str, snapshot: str, *, subtree: bool = False) -> list[UUID]:
        return self._command(vm, lambda agg: agg.delete_snapshot(snapshot, subtree=subtree))

    def rename(self, vm: str, snapshot: str, new_name: str) -> None:
        self._command(vm, lambda agg: agg.rename_snapshot(snapshot, new_name))

    def merge(self, vm: str, node: str, *, force: bool = False) -> UUID:
        return self._command(vm, lambda agg: agg.merge(node, force=force))

    # --- results reported by workers ---

    def layers_created(self, vm: str, node_id: UUID, live: dict[str, Any] | None = None) -> None:
        self._command(vm, lambda agg: agg.layers_created(node_id, live))

    def memory_saved(self, vm: str, node_id: UUID, nbytes: int, seconds: float, sha256: str) -> None:
        self._command(vm, lambda agg: agg.memory_saved(node_id, nbytes, seconds, sha256))

    def memory_save_failed(self, vm: str, node_id: UUID, error: str) -> None:
        self._command(vm, lambda agg: agg.memory_save_failed(node_id, error))

    def merge_started(
        self, vm: str, node_id: UUID, into: list[UUID], direction: MergeDirection, nbytes: int
    ) -> None:
        self._command(vm, lambda agg: agg.merge_started(node_id, into, direction, nbytes))

    def merge_completed(self, vm: str, node_id: UUID) -> None:
        self._command(vm, lambda agg: agg.merge_completed(node_id))

    def merge_failed(self, vm: str, node_id: UUID, error: str) -> None:
        self._command(vm, lambda agg: agg.merge_failed(node_id, error))

    def files_removed(self, vm: str, paths: list[str]) -> None:
        self._command(vm, lambda agg: agg.files_removed(paths))

    def execute(self, vm: str, requests: list[tuple[str, str, Callable[..., Any]]]) -> list[Any]:
        """Run queued commands for VM `vm`, each request id at most once (the queue's intake).

        `requests` are `(request_id, command, decide)`; `decide(vm_or_None, layer_paths)` decides
        on the aggregate (None when no VM has that name: `vm.create`) and returns `(result,
        aggregate to save)`. Returns per request a `domain.requests.Execution` (the result and
        the notification ids it recorded; `duplicate=True` when the request id had already taken
        effect) or the exception that refused it.

        The commands are decided in order on one aggregate and saved in ONE save together with a
        `Request` aggregate per request id (its id derives from the request id): a request that
        was executed before collides, so it never takes effect twice. One save for several
        commands is a group commit. A stale save (another process saved first) is decided again
        on the fresh state.
        """
        try:
            validate_name(vm, "VM name")
        except Refused as exc:
            return [exc for _ in requests]  # answered as refused, like any other bad argument
        outcomes: dict[int, Any] = {}
        todo = list(range(len(requests)))
        together = len(todo) > 1
        attempts = 0
        with self._lock(vm_id(vm)):
            while todo:
                group = todo if together else todo[:1]
                try:
                    agg: VirtualMachine | None = self.get_vm(vm)
                except UnknownVM:
                    agg = None
                target, decided, accepted, spans = agg, {}, [], {}
                seen: set[str] = set()
                try:
                    for i in group:
                        request_id, command, decide = requests[i]
                        if request_id in seen:  # the same request twice in one batch
                            decided[i] = Execution(None, [], duplicate=True)
                            continue
                        before = len(target.pending_events) if target is not None else 0
                        try:
                            result, target = decide(target, self._paths)
                        except Refused as exc:
                            if target is not None and len(target.pending_events) != before:
                                raise  # it recorded something before refusing: not in a group
                            decided[i] = exc
                            continue
                        seen.add(request_id)
                        decided[i] = result
                        spans[i] = (before, len(target.pending_events))
                        accepted.append(Request.accept(request_id, vm=vm, command=command))
                    recordings = self.save(target, *accepted) if accepted else []
                except IntegrityError:
                    self._evict(vm_id(vm))
                    done = [i for i in group if request_executed(self, requests[i][0])]
                    for i in done:  # executed before (a redelivery): never again
                        outcomes[i] = Execution(None, [], duplicate=True)
                    if done:
                        todo = [i for i in todo if i not in outcomes]
                        continue
                    if agg is None:  # the VM was created meanwhile
                        if len(group) > 1:
                            together = False
                            continue
                        outcomes[group[0]] = VMExists(f"a VM named {vm!r} already exists")
                        todo.remove(group[0])
                        continue
                    attempts += 1
                    if attempts >= MAX_ATTEMPTS:
                        raise
                    continue  # another process saved first: decide again on the new state
                except Exception as exc:
                    self._evict(vm_id(vm))
                    if isinstance(exc, PersistenceError):
                        raise
                    if len(group) > 1:
                        together = False  # find the one that failed: one at a time
                        continue
                    outcomes[group[0]] = exc
                    todo.remove(group[0])
                    continue
                ids = [r.notification.id for r in recordings if target is not None
                       and r.domain_event.originator_id == target.id]
                for i in group:
                    if isinstance(decided[i], (Exception, Execution)):
                        outcomes[i] = decided[i]
                    else:
                        start, stop = spans[i]
                        outcomes[i] = Execution(decided[i], ids[start:stop])
                todo = [i for i in todo if i not in outcomes]
        return [outcomes[i] for i in range(len(requests))]


    # --- internals ---

    def _paths(self, vm: VirtualMachine) -> Callable[[UUID], dict[str, str]]:
        return lambda node_id: {
            disk: self.layout.layer_path(vm.name, node_id, disk) for disk in vm.disks
        }

    def _command(self, vm: str, decide: Callable[[VirtualMachine], T]) -> T:
        validate_name(vm, "VM name")
        with self._lock(vm_id(vm)):
            for attempt in range(MAX_ATTEMPTS):
                agg = self.get_vm(vm)
                try:
                    result = decide(agg)
                    self.save(agg)
                except IntegrityError:
                    self._evict(agg.id)
                    if attempt == MAX_ATTEMPTS - 1:
                        raise
                    continue  # another process saved first: decide again on the new state
                except BaseException:
                    self._evict(agg.id)
                    raise
                return result
        raise AssertionError("unreachable")

    def _evict(self, aggregate_id: UUID) -> None:
        cache = self.repository.cache
        if cache is not None:
            try:
                cache.get(aggregate_id, evict=True)
            except KeyError:
                pass

    def _lock(self, aggregate_id: UUID) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(aggregate_id, threading.Lock())
