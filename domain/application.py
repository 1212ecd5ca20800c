"""The snaptree Application: loads a VM aggregate, lets it decide a command, saves the events.

`decide` is the one command method every entry point reaches (through service/handlers.py): it
loads the VM once — or decides on an aggregate the caller already holds, as the worker does for
the steps of one drain — runs the decision of domain/decisions.py and saves with optimistic
concurrency on the aggregate version. A command that loses a race is decided again on the fresh
state: every decision is pure. `execute` is the same for the queue, with request ids.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError, PersistenceError, Recording

from domain import names
from domain.commands import Command
from domain.decisions import decide
from domain.errors import Refused, UnknownVM
from domain.ports import Layout
from domain.requests import Execution, Request, RequestBatch, command_digest, executed_digest
from domain.names import vm_id
from domain.vm import VirtualMachine

MAX_ATTEMPTS = 20


@dataclass(frozen=True)
class Decided:
    result: Any
    vm: VirtualMachine  # the aggregate as saved: callers go on with it instead of loading it again
    events: list[int]  # notification ids of the recorded events


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
        self.loads = 0  # aggregates loaded from the store (a count the tests and benchmarks read)
        self.read_only = False  # opened as the store is on disk: writes will fail

    # --- queries ---

    def get_vm(self, name: str) -> VirtualMachine:
        name = names.vm_name(name)
        self.loads += 1
        try:
            vm = self.repository.get(vm_id(name))
        except AggregateNotFoundError:
            raise UnknownVM(f"no VM named {name!r}") from None
        assert isinstance(vm, VirtualMachine)
        return vm

    def find_vm(self, name: str) -> VirtualMachine | None:
        try:
            return self.get_vm(name)
        except UnknownVM:
            return None

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
        found: list[str] = []
        start = 0
        while True:
            batch = self.recorder.select_notifications(
                start, 1000, topics=[topic], inclusive_of_start=False
            )
            if not batch:
                return sorted(found)
            for n in batch:
                found.append(self.mapper.to_domain_event(n).name)  # type: ignore[attr-defined]
            start = batch[-1].id

    # --- the command method ---

    def decide(self, cmd: Command, vm: VirtualMachine | None = None) -> Decided:
        """Decide `cmd` on `vm` (loaded here when not given) and save what it records."""
        return self._decide_and_save(names.vm_name(cmd.vm), vm, lambda agg: decide(cmd, agg, self.layout),
                                     self.find_vm)

    def decide_all(self, cmds: list[Command], vm: VirtualMachine, *,
                   decided: VirtualMachine | None = None) -> Decided:
        """Decide several commands of one VM in order and save them together (one commit: a
        worker's reports of one batch). `decided`: a copy of `vm` on which they were decided
        already (only saved, unless the race is lost)."""
        def in_order(agg: VirtualMachine | None) -> tuple[Any, VirtualMachine]:
            result: Any = None
            for cmd in cmds:
                result, agg = decide(cmd, agg, self.layout)
            assert agg is not None
            return result, agg

        return self._decide_and_save(vm.name, vm, in_order, self.get_vm, decided)

    def _decide_and_save(self, name: str, vm: VirtualMachine | None,
                         decide_on: Callable[[VirtualMachine | None], tuple[Any, VirtualMachine]],
                         load: Callable[[str], VirtualMachine | None],
                         decided: VirtualMachine | None = None) -> Decided:
        """Decide on `vm` and save what was recorded; when another process saved first, decide
        again on the fresh state (the store refuses the stale save)."""
        key = vm_id(name)
        with self._lock(key):
            agg = vm
            for attempt in range(MAX_ATTEMPTS):
                if agg is None and decided is None:
                    agg = load(name)
                try:
                    if decided is not None:
                        result, target, decided = None, decided, None
                    else:
                        result, target = decide_on(agg)
                    recordings = self.save(target) if target.pending_events else []
                except IntegrityError:
                    self._evict(key)
                    if attempt == MAX_ATTEMPTS - 1:
                        raise
                    agg = None
                    continue
                except BaseException:
                    self._evict(key)
                    raise
                return Decided(result, target, _ids(recordings, target))
        raise AssertionError("unreachable")

    def execute(self, vm: str, requests: list[tuple[str, Command]]) -> list[Execution[Any] | Exception]:
        """Decide queued commands for VM `vm`, each request id at most once (the queue's intake).

        The commands are decided in order on one aggregate and saved in ONE save together with a
        `Request` aggregate per request id (its id derives from the request id), so a request that
        was executed before collides and never takes effect twice; one save for several commands
        is a group commit. A request id that took effect for another command is refused
        (`request_id_reused`). A stale save is decided again on the fresh state.
        """
        try:
            vm = names.vm_name(vm)
        except Refused as exc:
            return [exc for _ in requests]  # answered as refused, like any other bad argument
        with self._lock(vm_id(vm)):
            return RequestBatch(self, vm, requests).run()

    # --- internals ---

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


def _ids(recordings: list[Recording], vm: VirtualMachine) -> list[int]:
    return [r.notification.id for r in recordings if r.domain_event.originator_id == vm.id]


__all__ = ["Snaptree", "Decided", "PersistenceError", "command_digest", "executed_digest", "Request"]
