"""The export bundle: one uncompressed tar file that moves a VM with its whole tree.

Members (names are made by snaptree, never taken from disk, so they are always safe):

    disks/d<I>.qcow2              the VM's own disk number I (the root's layers), in `vm.disks` order
    layers/<node id>.d<I>.qcow2   every other node's layer of disk I
    states/<node id>.state        saved memory of a node, when it has one
    events.msgpack                the VM's whole event history (see `encode_history`)
    manifest.json                 written last: format, VM, tree, and sha256 + size of every member

Configuration copies travel inside the events and the manifest's nodes. The tar is uncompressed
(qcow2 data hardly compresses) so an importer can seek to the manifest and check every member's
header before it writes a byte.
"""

from __future__ import annotations

import hashlib
import re
from typing import IO, Any, Callable
from uuid import UUID

from eventsourcing.application import project_aggregate
from eventsourcing.persistence import Mapper, StoredEvent

from adapters.transcoder import MsgpackTranscoder, packb, unpackb
from domain.memory import MemoryState
from domain.application import Snaptree
from domain.errors import Refused
from domain.tree import Node
from domain.vm import VirtualMachine

FORMAT = "snaptree-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HISTORY = "events.msgpack"
CHUNK = 1 << 20

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
MEMBER_RE = re.compile(
    rf"^(?:{re.escape(MANIFEST)}|{re.escape(HISTORY)}|disks/d\d{{1,4}}\.qcow2"
    rf"|layers/{_UUID}\.d\d{{1,4}}\.qcow2|states/{_UUID}\.state)$"
)
# Only the aggregate's own events may be rebuilt from a bundle: a topic is a class path.
EVENT_TOPIC_PREFIX = f"{VirtualMachine.__module__}:{VirtualMachine.__qualname__}."

# (what, bytes done, bytes total) for progress display.
Progress = Callable[[str, int, int], None]


class BadBundle(Refused):
    code = "bad_bundle"


def quiet(what: str, done: int, total: int) -> None:
    pass


def own_member(index: int) -> str:
    return f"disks/d{index}.qcow2"


def layer_member(node_id: UUID, index: int) -> str:
    return f"layers/{node_id}.d{index}.qcow2"


def state_member(node_id: UUID) -> str:
    return f"states/{node_id}.state"


def member_of_layer(vm: VirtualMachine, node: Node, disk: str) -> str:
    """The root's layers are the VM's own disks; every other layer is named by its node."""
    index = list(vm.disks).index(disk)
    return own_member(index) if node.parent is None else layer_member(node.id, index)


def has_state(node: Node) -> bool:
    """A saved memory state file travels with its node (a failed save's file is garbage)."""
    mem = node.memory
    return mem is not None and mem.path is not None and mem.state is MemoryState.SAVED


def safe_member_name(name: str) -> bool:
    """Only names of the form above: no absolute path, no `..`, no other folder."""
    return bool(MEMBER_RE.match(name))


class HashingReader:
    """Reads a file for tarfile, hashing and reporting progress on the way (never all in memory)."""

    def __init__(self, f: IO[bytes], what: str, total: int, progress: Progress) -> None:
        self.f, self.what, self.total, self.progress = f, what, total, progress
        self.sha = hashlib.sha256()
        self.done = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.done += len(data)
        self.progress(self.what, self.done, self.total)
        return data


def copy_hashing(src: IO[bytes], dst: IO[bytes], size: int, what: str, progress: Progress) -> str:
    """Copy exactly `size` bytes in chunks; returns their sha256."""
    sha = hashlib.sha256()
    done = 0
    while done < size:
        chunk = src.read(min(CHUNK, size - done))
        if not chunk:
            raise BadBundle(f"{what}: the bundle ends early")
        sha.update(chunk)
        dst.write(chunk)
        done += len(chunk)
        progress(what, done, size)
    return sha.hexdigest()


# --- the event history ---


def encode_history(app: Snaptree, vm: VirtualMachine) -> bytes:
    """Every stored event of the VM, decoded: a msgpack list of
    `{"topic", "class_version", "originator_id", "originator_version", "state"}` where `state`
    is the event's own fields (its `__dict__` minus id and version), with snaptree's msgpack
    extension types (UUID, datetime, enum, tuple, domain dataclasses). Decoded rather than the raw
    stored bytes so the bundle does not depend on the source store's compressor or cipher.
    """
    records = []
    for stored in app.recorder.select_events(vm.id):
        event = app.mapper.to_domain_event(stored)
        state = dict(vars(event))
        state.pop("originator_id")
        state.pop("originator_version")
        records.append({
            "topic": stored.topic,
            "class_version": getattr(type(event), "class_version", 1),
            "originator_id": stored.originator_id,
            "originator_version": stored.originator_version,
            "state": state,
        })
    if len(records) != vm.version:
        raise RuntimeError(f"VM {vm.name}: {len(records)} stored events for version {vm.version}")
    return packb(records)


def replay_history(data: bytes) -> VirtualMachine:
    """Rebuild the aggregate from a bundle's history (upcasting older event versions)."""
    try:
        records = unpackb(data)
    except Exception as exc:  # any decoding error means a bad bundle, not a bug here
        raise BadBundle(f"{HISTORY}: cannot decode the event history: {exc}") from None
    if not isinstance(records, list) or not records:
        raise BadBundle(f"{HISTORY}: no events")
    mapper: Mapper[UUID] = Mapper(transcoder=MsgpackTranscoder())
    events = []
    for i, rec in enumerate(records, start=1):
        topic = rec.get("topic") if isinstance(rec, dict) else None
        if not isinstance(topic, str) or not topic.startswith(EVENT_TOPIC_PREFIX):
            raise BadBundle(f"{HISTORY}: event {i} has an unexpected type {topic!r}")
        if rec.get("originator_version") != i or not isinstance(rec.get("state"), dict):
            raise BadBundle(f"{HISTORY}: event {i} is malformed or out of order")
        state = dict(rec["state"])
        if rec.get("class_version", 1) > 1:
            state["class_version"] = rec["class_version"]
        try:
            stored = StoredEvent(rec["originator_id"], i, topic, packb(state))
            events.append(mapper.to_domain_event(stored))
        except Exception as exc:  # an unknown event class or fields: the bundle's fault
            raise BadBundle(f"{HISTORY}: event {i} cannot be read: {exc}") from None
    try:
        vm = project_aggregate(None, events)
    except Exception as exc:
        raise BadBundle(f"{HISTORY}: the events do not replay: {exc}") from None
    if not isinstance(vm, VirtualMachine):
        raise BadBundle(f"{HISTORY}: the events do not make a VM")
    return vm


def history_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def loads_manifest(raw: bytes) -> dict[str, Any]:
    import json

    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise BadBundle(f"{MANIFEST}: not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadBundle("not a snaptree bundle (no snaptree manifest)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BadBundle(f"bundle format version {manifest.get('format_version')} is not supported")
    nodes = manifest.get("nodes")
    if not (isinstance(manifest.get("vm"), dict) and isinstance(manifest.get("files"), dict)
            and isinstance(nodes, list) and all(isinstance(n, dict) for n in nodes)):
        raise BadBundle(f"{MANIFEST}: malformed (vm, nodes or files)")
    return manifest
