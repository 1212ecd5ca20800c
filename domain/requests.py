"""Request-id dedup for the queue, recorded in the event store (not only in Redis).

A producer may deliver the same command twice (a retry after a lost reply, a redelivery after a
crash, Redis losing its data). Each request id takes effect once: a `Request` aggregate whose id
derives from the request id is saved in the SAME save as the command's events
(`Snaptree.execute`), so a second execution collides on the request's first version and records
nothing — whichever process, host or Redis instance delivered it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

REQUEST_NAMESPACE = UUID("0b7c61a4-4f35-4c3c-9d2e-5a51c7f0e3b9")

T = TypeVar("T")


def request_uuid(request_id: str) -> UUID:
    return uuid.uuid5(REQUEST_NAMESPACE, request_id)


class Request(Aggregate):
    """One accepted request id. Never changes after it is created."""

    class Accepted(Aggregate.Created):
        class_version = 1
        request_id: str
        vm: str
        command: str

    def __init__(self, request_id: str, vm: str, command: str) -> None:
        self.request_id = request_id
        self.vm = vm
        self.command = command

    @staticmethod
    def create_id(request_id: str, **_: Any) -> UUID:
        return request_uuid(request_id)

    @classmethod
    def accept(cls, request_id: str, *, vm: str, command: str = "") -> Request:
        return cls._create(cls.Accepted, request_id=request_id, vm=vm, command=command)


@dataclass(frozen=True)
class Execution(Generic[T]):
    """What `Snaptree.execute` did: the command's result and the notification ids it recorded."""

    result: T | None
    events: list[int] = field(default_factory=list)
    duplicate: bool = False  # the request id had already taken effect: nothing recorded


def request_executed(app: Any, request_id: str) -> bool:
    """True when a request with this id has taken effect (read from the event store)."""
    return bool(app.recorder.select_events(request_uuid(request_id), limit=1))
