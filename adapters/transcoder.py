"""msgpack encoding for every stored event, aggregate snapshot and queue message.

JSON cannot carry a dict with UUID keys (a merge's per-dependent layers) nor tell a tuple from a
list; msgpack with extension types keeps every value's type across a round trip.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from enum import Enum
from typing import Any
from uuid import UUID

import msgpack
from eventsourcing.persistence import Transcoder
from eventsourcing.utils import get_topic, resolve_topic

EXT_UUID = 1
EXT_DATETIME = 2
EXT_ENUM = 3
EXT_TUPLE = 4
DATACLASS_KEY = "__dataclass__"

# Only these modules' dataclasses and enums may be rebuilt from stored bytes: a topic is a class
# path, and decoding must never import whatever a stored message names.
TRUSTED_PREFIXES = ("domain.",)


def _trusted(topic: str) -> bool:
    return topic.startswith(TRUSTED_PREFIXES)


def _default(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, UUID):
        return msgpack.ExtType(EXT_UUID, obj.bytes)
    if isinstance(obj, datetime):
        return msgpack.ExtType(EXT_DATETIME, obj.isoformat().encode())
    if isinstance(obj, Enum):
        return msgpack.ExtType(EXT_ENUM, packb([get_topic(type(obj)), obj.value]))
    if isinstance(obj, tuple):
        return msgpack.ExtType(EXT_TUPLE, packb(list(obj)))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # A plain map with a marker key: the packer recurses into it, no nested packb per object.
        state = {DATACLASS_KEY: get_topic(type(obj))}
        state.update(obj.__dict__)
        return state
    if isinstance(obj, (str, int, float, bytes, list, dict)):  # subclasses (strict_types)
        base = next(t for t in (str, int, float, bytes, list, dict) if isinstance(obj, t))
        return base(obj)  # type: ignore[no-any-return]
    raise TypeError(f"cannot encode {type(obj).__qualname__} with msgpack")


def ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_UUID:
        return UUID(bytes=data)
    if code == EXT_DATETIME:
        return datetime.fromisoformat(data.decode())
    if code == EXT_TUPLE:
        return tuple(unpackb(data))
    if code == EXT_ENUM:
        topic, value = unpackb(data)
        return resolve_trusted(topic)(value)
    return msgpack.ExtType(code, data)


def object_hook(obj: dict[Any, Any]) -> Any:
    topic = obj.pop(DATACLASS_KEY, None)
    if topic is None:
        return obj
    return resolve_trusted(topic)(**obj)


def resolve_trusted(topic: str) -> Any:
    if not _trusted(topic):
        raise ValueError(f"refusing to decode untrusted type {topic!r}")
    return resolve_topic(topic)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    return msgpack.unpackb(
        data, ext_hook=ext_hook, object_hook=object_hook, strict_map_key=False, raw=False
    )


class MsgpackTranscoder(Transcoder):
    """The `eventsourcing` transcoder for snaptree's stores (set by TRANSCODER_TOPIC)."""

    def encode(self, obj: Any) -> bytes:
        return packb(obj)

    def decode(self, data: bytes) -> Any:
        return unpackb(data)
