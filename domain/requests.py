"""Request-id dedup for the queue, recorded in the event store (not only in Redis).

A producer may deliver the same command twice (a retry after a lost reply, a redelivery after a
crash, Redis losing its data). Each request id takes effect once: a `Request` aggregate whose id
derives from the request id is saved in the SAME save as the command's events, so a second
execution collides on the request's first version and records nothing — whichever process, host
or Redis instance delivered it. The request records a digest of its command, so a request id
re-used for a *different* command is refused instead of being mistaken for a redelivery.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError, PersistenceError

from domain.commands import Command, RegisterVM
from domain.decisions import decide
from domain.errors import Refused, RequestIdReused, VMExists
from domain.names import vm_id
from domain.vm import VirtualMachine

if TYPE_CHECKING:
    from domain.application import Snaptree

REQUEST_NAMESPACE = UUID("0b7c61a4-4f35-4c3c-9d2e-5a51c7f0e3b9")
MAX_ATTEMPTS = 20

T = TypeVar("T")


def request_uuid(request_id: str) -> UUID:
    return uuid.uuid5(REQUEST_NAMESPACE, request_id)


def command_digest(cmd: Command) -> str:
    """What the command asks, independent of how it was spelled on the wire."""

    def plain(v: Any) -> Any:
        if isinstance(v, Enum):
            return v.value
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return sorted((str(k), plain(x)) for k, x in v.items())
        return v

    parts = [type(cmd).__name__] + [(f.name, plain(getattr(cmd, f.name))) for f in dataclasses.fields(cmd)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class Request(Aggregate):
    """One accepted request id. Never changes after it is created."""

    class Event(Aggregate.Event):  # declared here: domain/vm.py says why
        pass

    class Accepted(Aggregate.Created, Event):
        class_version = 1
        request_id: str
        vm: str
        command: str
        digest: str = ""  # empty in the first releases: any command matches

    def __init__(self, request_id: str, vm: str, command: str, digest: str = "") -> None:
        self.request_id = request_id
        self.vm = vm
        self.command = command
        self.digest = digest

    @staticmethod
    def create_id(request_id: str, **_: Any) -> UUID:
        return request_uuid(request_id)

    @classmethod
    def accept(cls, request_id: str, *, vm: str, command: str = "", digest: str = "") -> Request:
        return cls._create(cls.Accepted, request_id=request_id, vm=vm, command=command, digest=digest)


@dataclass(frozen=True)
class Execution(Generic[T]):
    """What `Snaptree.execute` did: the command's result and the notification ids it recorded."""

    result: T | None
    events: list[int] = field(default_factory=list)
    duplicate: bool = False  # the request id had already taken effect: nothing recorded


def executed_digest(app: Any, request_id: str) -> str | None:
    """The digest of the command a request id took effect for (None: not executed; "" unknown)."""
    events = app.recorder.select_events(request_uuid(request_id), limit=1)
    if not events:
        return None
    accepted = app.mapper.to_domain_event(events[0])
    return str(getattr(accepted, "digest", "") or "")


def request_executed(app: Any, request_id: str) -> bool:
    return executed_digest(app, request_id) is not None


class RequestBatch:
    """The commands of one VM from one read of the queue, decided and saved together."""

    def __init__(self, app: Snaptree, vm: str, requests: list[tuple[str, Command]]) -> None:
        self.app = app
        self.vm = vm
        self.requests = requests
        self.digests = [command_digest(cmd) for _, cmd in requests]
        self.outcomes: dict[int, Execution[Any] | Exception] = {}

    def run(self) -> list[Execution[Any] | Exception]:
        todo = list(range(len(self.requests)))
        together = len(todo) > 1
        attempts = 0
        while todo:
            group = todo if together else todo[:1]
            existed = True
            try:
                existed = self._save_group(group)
            except IntegrityError:
                self.app._evict(vm_id(self.vm))
                if self._settle_duplicates(group):
                    pass  # executed before (a redelivery): never again; the rest is retried
                elif not existed and len(group) > 1:
                    together = False  # the VM was created meanwhile: one at a time
                elif not existed and isinstance(self.requests[group[0]][1], RegisterVM):
                    self.outcomes[group[0]] = VMExists(f"a VM named {self.vm!r} already exists")
                else:
                    attempts += 1  # another process saved first: decide again on the new state
                    if attempts >= MAX_ATTEMPTS:
                        raise
            except PersistenceError:
                self.app._evict(vm_id(self.vm))
                raise
            except Exception as exc:
                self.app._evict(vm_id(self.vm))
                if len(group) > 1:
                    together = False  # find the one that failed: one at a time
                else:
                    self.outcomes[group[0]] = exc
            todo = [i for i in todo if i not in self.outcomes]
        return [self.outcomes[i] for i in range(len(self.requests))]

    def _save_group(self, group: list[int]) -> bool:
        """Decide and save; returns whether the VM existed when the group was decided."""
        target: VirtualMachine | None = self.app.find_vm(self.vm)
        existed = target is not None
        decided: dict[int, Any] = {}
        spans: dict[int, tuple[int, int]] = {}
        accepted: list[Request] = []
        seen: set[str] = set()
        for i in group:
            request_id, cmd = self.requests[i]
            if request_id in seen:  # the same request twice in one batch
                decided[i] = self._repeat(i, request_id)
                continue
            before = len(target.pending_events) if target is not None else 0
            try:
                result, target = decide(cmd, target, self.app.layout)
            except Refused as exc:
                if target is not None and len(target.pending_events) != before:
                    raise  # it recorded something before refusing: not in a group
                # A redelivery of a request that took effect is refused by the state it made.
                done = executed_digest(self.app, request_id) is not None
                decided[i] = self._repeat(i, request_id) if done else exc
                continue
            seen.add(request_id)
            decided[i] = result
            spans[i] = (before, len(target.pending_events))
            accepted.append(Request.accept(request_id, vm=self.vm, command=type(cmd).__name__,
                                           digest=self.digests[i]))
        recordings = self.app.save(target, *accepted) if accepted and target is not None else []
        ids = [r.notification.id for r in recordings
               if target is not None and r.domain_event.originator_id == target.id]
        for i in group:
            if isinstance(decided[i], (Exception, Execution)):
                self.outcomes[i] = decided[i]
            else:
                start, stop = spans[i]
                self.outcomes[i] = Execution(decided[i], ids[start:stop])
        return existed

    def _settle_duplicates(self, group: list[int]) -> bool:
        """After a collision: answer the requests that had taken effect before (a redelivery)."""
        found = False
        for i in group:
            request_id = self.requests[i][0]
            if executed_digest(self.app, request_id) is not None:
                self.outcomes[i] = self._repeat(i, request_id)
                found = True
        return found

    def _repeat(self, i: int, request_id: str) -> Execution[Any] | Exception:
        """A request id seen before: the same command is a redelivery, another one a mistake."""
        before = executed_digest(self.app, request_id)
        if before is None:  # twice in one batch: the first one decides
            first = next(j for j, (rid, _) in enumerate(self.requests) if rid == request_id)
            before = self.digests[first]
        if before and before != self.digests[i]:
            return RequestIdReused(
                f"request id {request_id!r} was already used for a different command; use a new id"
            )
        return Execution(None, [], duplicate=True)

