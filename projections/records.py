"""A VM's events as plain records for external tools (`audit export`): JSON lines or msgpack.

One record per event, oldest first:
`{"vm", "vm_id", "version", "type", "topic", "timestamp", "fields": {...}}`. Values are plain in both
formats (UUIDs and datetimes as strings, enums as their values, nodes as maps), so a tool needs no
snaptree code to read either; msgpack is only the more compact framing (a stream of maps).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from enum import Enum
from typing import Any, BinaryIO, Iterable, Iterator
from uuid import UUID

import msgpack

from domain.application import Snaptree
from domain.names import vm_id
from projections.decoding import Decoder
from projections.event_store import event_chunks
from projections.timeline import event_name

ENVELOPE = ("originator_id", "originator_version", "timestamp")
FORMATS = ("jsonl", "msgpack")


def plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, Enum):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(plain(k)): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def event_records(app: Snaptree, vm_name: str) -> Iterator[dict[str, Any]]:
    """Every stored event of the VM (the caller checks the VM exists)."""
    vid = vm_id(vm_name)
    decoder = Decoder(app)
    for chunk in event_chunks(app, vid):
        for row, event in zip(chunk, decoder.events(vid, [chunk])):
            yield _record(vm_name, vid, row[0], row[1], event)


def _record(vm_name: str, vid: UUID, version: int, topic: str, event: Any) -> dict[str, Any]:
    return {
        "vm": vm_name,
        "vm_id": str(vid),
        "version": version,
        "type": event_name(event),
        "topic": topic,
        "timestamp": plain(event.timestamp),
        "fields": {k: plain(v) for k, v in vars(event).items() if k not in ENVELOPE},
    }


def write(records: Iterable[dict[str, Any]], out: BinaryIO, fmt: str) -> int:
    """Write records in `fmt`; returns how many."""
    count = 0
    packer = msgpack.Packer(use_bin_type=True)
    for rec in records:
        if fmt == "jsonl":
            out.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
        else:
            out.write(packer.pack(rec))
        count += 1
    return count


def read(data: bytes, fmt: str) -> list[dict[str, Any]]:
    """The records back (for tests and tools written in Python)."""
    if fmt == "jsonl":
        return [json.loads(line) for line in data.decode().splitlines() if line]
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    return list(unpacker)
