"""The one owner of reading qcow2 backing chains and of comparing backing paths.

- :func:`backing_file`: the backing file named in an image's own qcow2 header, read straight from
  the file (no subprocess, no image lock: safe on the layers of a running VM), made absolute
  exactly as QEMU does (``path_combine``: a relative name is taken relative to the image's
  directory, nothing is normalised), so it equals ``qemu-img info``'s ``full-backing-filename``;
- :func:`backing_chain` / :func:`backing_chain_async`: the whole chain as ``qemu-img info
  --backing-chain --output=json -U`` reports it, top first (QEMU's own view, formats included);
- :func:`same_file`: the one way to compare two backing paths;
- :func:`validate`: the header, the active L1 table and every L2 table checked in pure Python
  (no subprocess, no lock: safe on a running VM's layer), what ``audit verify`` does per layer
  instead of ``qemu-img info`` + ``qemu-img check`` (refcounts, hence leaks, are not checked).

A file that is not qcow2, or whose header is damaged, raises a :class:`Qcow2Error` subclass; it
is a :class:`QemuImgError`, so code that handles a failing ``qemu-img info`` handles it too.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import struct
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, NoReturn, Sequence

from adapters.qemu.errors import QemuImgError

__all__ = [
    "Qcow2Error", "NotQcow2Error", "DamagedHeaderError", "ChainImage", "Validation",
    "backing_file", "backing_chain", "backing_chain_async", "same_file", "validate", "virtual_size",
]

MAGIC = b"QFI\xfb"
_HEADER_V2 = 72                       # bytes of a version 2 header; version 3 adds 32
_HEADER_V3 = 104
_MIN_CLUSTER_BITS, _MAX_CLUSTER_BITS = 9, 21
_MAX_BACKING_NAME = 1023              # QEMU refuses longer names ("Backing file name too long")


class Qcow2Error(QemuImgError):
    """An image's qcow2 header cannot be read. ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str) -> None:
        # Not QemuImgError.__init__: no command ran; the attributes are kept for its handlers.
        self.path, self.reason = path, reason
        self.cmd, self.returncode, self.stderr, self.what = [], 1, reason, "qcow2 header"
        Exception.__init__(self, f"{path}: {reason}")


class NotQcow2Error(Qcow2Error):
    """The file does not start with the qcow2 magic."""


class DamagedHeaderError(Qcow2Error):
    """The file says qcow2 but its header is cut short or inconsistent."""


@dataclass(frozen=True)
class ChainImage:
    """One image of a backing chain, as qemu-img reports it."""

    filename: str
    format: str
    virtual_size: int
    backing: str | None       # absolute backing file name, None at the bottom


def backing_file(path: str | os.PathLike[str]) -> str | None:
    """The backing file named in ``path``'s qcow2 header, made absolute as QEMU does; None if
    the image has none."""
    image = os.path.abspath(os.fspath(path))
    name = _read_backing_name(image)
    if name is None:
        return None
    return _path_combine(image, name)


def virtual_size(path: str | os.PathLike[str]) -> int:
    """The guest-visible size in ``path``'s qcow2 header (no subprocess)."""
    image = os.path.abspath(os.fspath(path))
    try:
        with open(image, "rb") as f:
            head = f.read(_HEADER_V3)
    except OSError as exc:
        raise Qcow2Error(image, f"cannot read: {exc.strerror or exc}") from exc
    if head[:4] != MAGIC:
        raise NotQcow2Error(image, "not a qcow2 image")
    _backing_field(image, head)  # version and header length checked as QEMU does
    return _parse_header(head).virtual_size


def _read_backing_name(image: str) -> str | None:
    try:
        with open(image, "rb") as f:
            head = f.read(_HEADER_V3)
            if head[:4] != MAGIC:
                raise NotQcow2Error(image, "not a qcow2 image")
            offset, size = _backing_field(image, head)
            if offset == 0 or size == 0:
                return None
            f.seek(offset)
            raw = f.read(size)
    except OSError as exc:
        raise Qcow2Error(image, f"cannot read: {exc.strerror or exc}") from exc
    return _decode_backing_name(image, raw, size)


def _decode_backing_name(image: str, raw: bytes, size: int) -> str | None:
    if len(raw) != size:
        raise DamagedHeaderError(image, f"backing file name cut short ({len(raw)} of {size} bytes)")
    raw = raw.split(b"\0", 1)[0]          # QEMU keeps the name as a C string
    return os.fsdecode(raw) or None


def _backing_field(image: str, head: bytes) -> tuple[int, int]:
    """(offset, size) of the backing file name, checked the way QEMU checks them on open."""
    if len(head) < 8:
        raise DamagedHeaderError(image, "truncated qcow2 header")
    (version,) = struct.unpack(">I", head[4:8])
    if version not in (2, 3):
        raise DamagedHeaderError(image, f"unsupported qcow2 version {version}")
    if len(head) < (_HEADER_V2 if version == 2 else _HEADER_V3):
        raise DamagedHeaderError(image, "truncated qcow2 header")
    offset, size, cluster_bits = struct.unpack(">QII", head[8:24])
    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise DamagedHeaderError(image, f"invalid cluster size (2^{cluster_bits})")
    cluster = 1 << cluster_bits
    if offset > cluster:
        raise DamagedHeaderError(image, "invalid backing file offset")
    if offset and size > min(_MAX_BACKING_NAME, cluster - offset):
        raise DamagedHeaderError(image, "backing file name too long")
    return offset, size


def _path_combine(image: str, name: str) -> str:
    """QEMU's path_combine: an absolute name or one with a protocol prefix ("nbd:...",
    "json:{...}") is kept as is, a relative one is appended to the image's directory."""
    if os.path.isabs(name) or _has_protocol(name):
        return name
    return os.path.join(os.path.dirname(image), name)


def _has_protocol(name: str) -> bool:
    cut = len(name)
    for sep in (":", "/"):
        at = name.find(sep)
        if at != -1:
            cut = min(cut, at)
    return name[cut:cut + 1] == ":"


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two backing paths name the same file: equal once normalised, or, failing that,
    once symlinks are resolved (QEMU records the name it was given, not the real path)."""
    a, b = os.fspath(a), os.fspath(b)
    return os.path.normpath(a) == os.path.normpath(b) or os.path.realpath(a) == os.path.realpath(b)


# --- validate: the structure QEMU relies on, read without qemu-img ---

_DIRTY, _CORRUPT, _DATA_FILE, _EXTENDED_L2 = 1 << 0, 1 << 1, 1 << 2, 1 << 4
_KNOWN_INCOMPATIBLE = 0x1F               # dirty, corrupt, data file, compression type, extended L2
_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00     # bits 9..55 of an L1 or standard L2 entry
_L1_RESERVED = 0x7F00_0000_0000_01FF     # QEMU's L1E_RESERVED_MASK
_L2_RESERVED = 0x3F00_0000_0000_01FE     # QEMU's L2E_STD_RESERVED_MASK
_COMPRESSED = 1 << 62                    # an L2 entry of a compressed cluster: no cluster offset
_MAX_L1_BYTES = 32 << 20                 # QEMU's QCOW_MAX_L1_SIZE
_MAX_REFTABLE_BYTES = 8 << 20            # QCOW_MAX_REFTABLE_SIZE
_SNAPSHOT_HEADER, _MAX_SNAPSHOTS = 40, 65536
_MAX_CRYPT_METHOD = 2                    # QCOW_CRYPT_LUKS
_INT64_MAX = (1 << 63) - 1
_MAX_LISTED = 20                         # a truncated file can have thousands: list a few, count all


@dataclass(frozen=True)
class Validation:
    """What :func:`validate` read in one qcow2 image."""

    path: str
    format: str                   # always "qcow2": anything else raises NotQcow2Error
    version: int                  # 2 (compat=0.10) or 3
    cluster_size: int
    virtual_size: int
    backing: str | None           # exactly as backing_file() gives it
    corrupt: bool                 # incompatible bit 1: QEMU found corruption and stopped writing
    dirty: bool                   # incompatible bit 0: not closed cleanly (lazy refcounts)
    problems: tuple[str, ...]     # structural damage, the first _MAX_LISTED of problem_count
    problem_count: int
    notes: tuple[str, ...]        # what was not checked, and why

    @property
    def damaged(self) -> bool:
        return self.problem_count > 0


class _Problems:
    def __init__(self) -> None:
        self.listed: list[str] = []
        self.count = 0

    def add(self, fmt: str, *args: object) -> None:
        self.count += 1
        if len(self.listed) < _MAX_LISTED:      # format only what is kept
            self.listed.append(fmt % args)


def validate(path: str | os.PathLike[str]) -> Validation:
    """Check ``path``'s header, active L1 table and L2 tables without qemu-img.

    Raises :class:`NotQcow2Error` for a file without the qcow2 magic and
    :class:`DamagedHeaderError` for a header QEMU refuses to open (``qemu-img info`` fails on
    it: a misaligned table offset, unknown incompatible features, ...). Damage QEMU would open
    and ``qemu-img check`` report as corruption is listed in ``problems``: table or cluster
    offsets that are misaligned or past the end of the file, reserved bits set, tables cut short.
    Refcounts are not checked (leaks need ``qemu-img check``), nor internal snapshots' tables.
    The file is only read, with no lock: safe while QEMU has it open.
    """
    image = os.path.abspath(os.fspath(path))
    try:
        fd = os.open(image, os.O_RDONLY)
    except OSError as exc:
        raise Qcow2Error(image, f"cannot read: {exc.strerror or exc}") from exc
    try:
        return _validate(image, fd)
    except OSError as exc:
        raise Qcow2Error(image, f"cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


class _Header(NamedTuple):
    version: int
    cluster_bits: int
    virtual_size: int
    crypt: int
    l1_size: int
    l1_offset: int
    rt_offset: int
    rt_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0         # version 3 fields; a version 2 header has their defaults
    refcount_order: int = 4
    header_length: int = _HEADER_V2


def _parse_header(head: bytes) -> _Header:
    (_, version, _, _, *fields) = struct.unpack(">4sIQIIQIIQQIIQ", head[:_HEADER_V2])
    if version == 3:
        incompatible, _, _, refcount_order, length = struct.unpack(">QQQII", head[_HEADER_V2:_HEADER_V3])
        return _Header(version, *fields, incompatible, refcount_order, length)
    return _Header(version, *fields)


def _validate(image: str, fd: int) -> Validation:
    file_len = os.fstat(fd).st_size
    head = os.pread(fd, _HEADER_V3, 0)
    if head[:4] != MAGIC:
        raise NotQcow2Error(image, "not a qcow2 image")
    name_offset, name_size = _backing_field(image, head)     # version, length, cluster bits
    h = _parse_header(head)
    cluster = 1 << h.cluster_bits
    entry_size = 16 if h.incompatible & _EXTENDED_L2 else 8  # extended: descriptor + subcluster bitmap
    _refuse_like_qemu(image, h, entry_size)
    backing = None
    if name_offset and name_size:
        name = _decode_backing_name(image, os.pread(fd, name_size, name_offset), name_size)
        backing = _path_combine(image, name) if name is not None else None

    found, notes = _Problems(), list[str]()
    check_data = not h.incompatible & _DATA_FILE
    if not check_data:
        notes.append("the data is in an external data file: data cluster offsets not checked")
    if h.nb_snapshots:
        notes.append(f"{h.nb_snapshots} internal snapshot(s): their L1 tables are not checked")
    if h.rt_offset >= file_len:
        found.add("refcount table offset 0x%x is past the end of the file (%d bytes)", h.rt_offset, file_len)
    elif h.rt_offset + h.rt_clusters * cluster > file_len:
        found.add("the refcount table (%d cluster(s) at 0x%x) runs past the end of the file",
                  h.rt_clusters, h.rt_offset)
    scanned: dict[int, int] = {}  # L2 table offset -> L1 entry: also bounds the reads by the file size
    for index, entry in _l1_entries(fd, file_len, h.l1_size, h.l1_offset, found):
        l2_offset = entry & _OFFSET_MASK
        if l2_offset >= file_len:
            found.add("L1 entry %d points past the end of the file (L2 table at 0x%x, file %d bytes)",
                      index, l2_offset, file_len)
            continue
        if l2_offset & (cluster - 1):
            found.add("L1 entry %d points to an L2 table at 0x%x that is not cluster aligned",
                      index, l2_offset)
            continue
        if entry & _L1_RESERVED:
            found.add("L1 entry %d has reserved bits set (0x%016x)", index, entry)
        if not l2_offset:
            continue
        if l2_offset in scanned:
            found.add("L1 entry %d points to the L2 table of L1 entry %d (at 0x%x)",
                      index, scanned[l2_offset], l2_offset)
            continue
        scanned[l2_offset] = index
        raw = os.pread(fd, cluster, l2_offset)
        if len(raw) < cluster:  # QEMU writes tables whole: a short one was cut off
            found.add("the L2 table of L1 entry %d (at 0x%x) runs past the end of the file",
                      index, l2_offset)
        _check_l2(raw, entry_size, index, cluster, file_len, check_data, found)
    return Validation(
        path=image, format="qcow2", version=h.version, cluster_size=cluster,
        virtual_size=h.virtual_size, backing=backing, corrupt=bool(h.incompatible & _CORRUPT),
        dirty=bool(h.incompatible & _DIRTY), problems=tuple(found.listed),
        problem_count=found.count, notes=tuple(notes))


def _refuse_like_qemu(image: str, h: _Header, l2_entry_size: int) -> None:
    """The header checks of QEMU's qcow2_do_open: a header failing one cannot be opened at all
    (``qemu-img info`` fails), so it is a DamagedHeaderError, not a problem of an open image."""
    def refuse(reason: str) -> NoReturn:
        raise DamagedHeaderError(image, reason)

    cluster = 1 << h.cluster_bits
    if h.version == 3 and h.header_length < _HEADER_V3:
        refuse("qcow2 header too short")
    if h.header_length > cluster:
        refuse("qcow2 header exceeds cluster size")
    if h.incompatible & ~_KNOWN_INCOMPATIBLE:
        refuse(f"unsupported qcow2 feature(s): 0x{h.incompatible & ~_KNOWN_INCOMPATIBLE:x}")
    if h.refcount_order > 6:
        refuse("reference count entry width too large")
    if h.crypt > _MAX_CRYPT_METHOD:
        refuse(f"unsupported encryption method {h.crypt}")
    _table(refuse, "reference count table", cluster, h.rt_offset, h.rt_clusters, cluster,
           _MAX_REFTABLE_BYTES)
    if h.rt_clusters == 0:
        refuse("image does not contain a reference count table")
    _table(refuse, "snapshot table", cluster, h.snapshots_offset, h.nb_snapshots, _SNAPSHOT_HEADER,
           _SNAPSHOT_HEADER * _MAX_SNAPSHOTS)
    shift = h.cluster_bits + (cluster // l2_entry_size).bit_length() - 1   # bytes one L1 entry maps
    if h.l1_size < (h.virtual_size + (1 << shift) - 1) >> shift:
        refuse("L1 table is too small")
    _table(refuse, "active L1 table", cluster, h.l1_offset, h.l1_size, 8, _MAX_L1_BYTES)


def _table(refuse: Callable[[str], NoReturn], name: str, cluster: int, offset: int,
           entries: int, entry_len: int, max_bytes: int) -> None:
    """QEMU's qcow2_validate_table."""
    if entries > max_bytes // entry_len:
        refuse(f"{name} too large")
    if _INT64_MAX - entries * entry_len < offset or offset & (cluster - 1):
        refuse(f"{name} offset invalid")


def _l1_entries(fd: int, file_len: int, l1_size: int, l1_offset: int,
                found: _Problems) -> list[tuple[int, int]]:
    """(index, entry) of every non-zero entry of the active L1 table."""
    if l1_size == 0:
        return []
    if l1_offset >= file_len:
        found.add("L1 table offset 0x%x is past the end of the file (%d bytes)", l1_offset, file_len)
        return []
    raw = os.pread(fd, l1_size * 8, l1_offset)
    if len(raw) < l1_size * 8:
        found.add("the L1 table (%d entries at 0x%x) runs past the end of the file",
                  l1_size, l1_offset)
    table = _unpack(raw, 1)
    # compress: the empty entries (most of them) are skipped at C speed
    return [(i, table[i]) for i in itertools.compress(range(len(table)), table)]


def _check_l2(raw: bytes, entry_size: int, l1_index: int, cluster: int, file_len: int,
              check_data: bool, found: _Problems) -> None:
    if _l2_sound(raw, entry_size // 8, cluster, file_len, check_data):
        return  # the common case, 5x faster than the loop below on a full table
    table = _unpack(raw, entry_size // 8)
    mask, first = cluster - 1, l1_index * (cluster // entry_size)
    cluster_bits = cluster.bit_length() - 1
    compressed_mask = (1 << (62 - (cluster_bits - 8))) - 1    # the spec's "x": offset bits
    for j in itertools.compress(range(len(table)), table):
        entry = table[j]
        if entry & _COMPRESSED:  # a byte offset (and a sector count), not a cluster offset
            if check_data and entry & compressed_mask >= file_len:
                found.add("L1 entry %d, L2 entry %d (guest offset 0x%x): compressed data at 0x%x is "
                          "past the end of the file", l1_index, j, (first + j) * cluster,
                          entry & compressed_mask)
            continue
        data = entry & _OFFSET_MASK
        if data and check_data and data >= file_len:
            found.add("L1 entry %d, L2 entry %d (guest offset 0x%x): data cluster at 0x%x is past "
                      "the end of the file", l1_index, j, (first + j) * cluster, data)
        elif data and check_data and data & mask:
            found.add("L1 entry %d, L2 entry %d (guest offset 0x%x): data cluster at 0x%x is not "
                      "cluster aligned", l1_index, j, (first + j) * cluster, data)
        elif entry & _L2_RESERVED:
            found.add("L1 entry %d, L2 entry %d (guest offset 0x%x) has reserved bits set (0x%016x)",
                      l1_index, j, (first + j) * cluster, entry)


def _l2_sound(raw: bytes, words: int, cluster: int, file_len: int, check_data: bool) -> bool:
    """Whether no entry of the table has a problem, with big-integer masks over the whole table
    at once: no reserved, compressed or sub-cluster offset bits, every offset before EOF."""
    count = len(raw) // (8 * words)
    raw = raw[:count * 8 * words]
    table = int.from_bytes(raw, "big")
    bad = _L2_RESERVED | (_COMPRESSED | (_OFFSET_MASK & (cluster - 1)) if check_data else 0)
    if table & _repeated(bad, words, count):
        return False
    if not check_data or not count:
        return True
    offsets = (table & _repeated(_OFFSET_MASK, words, count)).to_bytes(len(raw), "big")
    return max(struct.unpack(f">{count * words}Q", offsets)) < file_len


@functools.lru_cache(maxsize=32)
def _repeated(mask: int, words: int, count: int) -> int:
    """``mask`` on the first 64-bit word of each of ``count`` entries of ``words`` words."""
    return int.from_bytes((mask.to_bytes(8, "big") + bytes(8 * (words - 1))) * count, "big")


def _unpack(raw: bytes, words: int) -> Sequence[int]:
    """The table's big-endian 64-bit entries in one unpack; with extended L2 entries (two words
    each) only the first word of each, the cluster descriptor."""
    count = len(raw) // (8 * words) * words
    table = struct.unpack(f">{count}Q", raw[:count * 8])
    return table[::words] if words > 1 else table


def _chain_cmd(path: str | os.PathLike[str]) -> list[str]:
    binary = os.environ.get("SNAPTREE_QEMU_IMG", "qemu-img")      # as qemu_img.QEMU_IMG
    return [binary, "info", "--backing-chain", "--output=json", "-U",
            os.path.abspath(os.fspath(path))]


def _parse_chain(out: str | bytes) -> list[ChainImage]:
    data: Any = json.loads(out)
    images = data if isinstance(data, list) else [data]
    return [ChainImage(
        filename=i["filename"], format=i["format"], virtual_size=int(i["virtual-size"]),
        backing=i.get("full-backing-filename") or i.get("backing-filename") or None,
    ) for i in images]


def backing_chain(path: str | os.PathLike[str]) -> list[ChainImage]:
    """``qemu-img info --backing-chain -U`` of ``path``: every image down the chain, top first."""
    cmd = _chain_cmd(path)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise QemuImgError(cmd, res.returncode, res.stderr)
    return _parse_chain(res.stdout)


async def backing_chain_async(path: str | os.PathLike[str]) -> list[ChainImage]:
    """:func:`backing_chain` without blocking the event loop (a QEMU start reads every disk's)."""
    import asyncio  # only a QEMU start runs a loop; the readers of the views do not pay for it

    cmd = _chain_cmd(path)
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise QemuImgError(cmd, proc.returncode or 1, err.decode(errors="replace"))
    return _parse_chain(out)
