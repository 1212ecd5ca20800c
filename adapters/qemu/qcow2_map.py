"""Bytes allocated in one qcow2 layer, read from its L1/L2 tables in pure Python.

What ``qemu-img map --output=json -U -f qcow2`` counts at depth 0 (data, or zero clusters that
hide the backing's data), without a subprocess: `tree` and `merges` measure every layer of the
current chain, and a qemu-img process costs ~25 ms each. Anything this reader does not fully
understand — extended L2 entries, an external data file, encryption, compressed clusters, a
table with odd bits, a backing chain qemu-img could not open — answers None, and the caller asks
qemu-img as before, so the number is always the one qemu-img would give.
"""

from __future__ import annotations

import os

from adapters.qemu import qcow2
from adapters.qemu.qcow2 import (
    _CORRUPT, _DATA_FILE, _EXTENDED_L2, _HEADER_V3, MAGIC, Qcow2Error, _l1_entries,
    _l2_sound, _OFFSET_MASK, _parse_header, _Problems, _refuse_like_qemu, _unpack,
)

_MAX_CHAIN = 4096  # a longer (or looping) chain: leave it to qemu-img


def allocated_bytes(path: str) -> int | None:
    """Guest bytes allocated in this layer only, as ``qemu_img.allocated_bytes``; None: not
    known here (ask qemu-img)."""
    image = os.path.abspath(path)
    try:
        if not _chain_opens(image):
            return None
        fd = os.open(image, os.O_RDONLY)
        try:
            return _count(image, fd)
        finally:
            os.close(fd)
    except (OSError, Qcow2Error):
        return None


def _chain_opens(image: str) -> bool:
    """Whether every backing file below `image` exists and is a qcow2 image with a plain file
    name: qemu-img opens the whole chain and fails when one is missing."""
    seen = {image}
    backing = qcow2.backing_file(image)
    while backing is not None:
        if backing in seen or len(seen) > _MAX_CHAIN or not os.path.isfile(backing):
            return False
        seen.add(backing)
        backing = qcow2.backing_file(backing)  # raises for a raw (or damaged) backing file
    return True


def _count(image: str, fd: int) -> int | None:
    file_len = os.fstat(fd).st_size
    head = os.pread(fd, _HEADER_V3, 0)
    if len(head) < _HEADER_V3 or head[:4] != MAGIC:
        return None
    h = _parse_header(head)
    if h.version != 3 or h.crypt or h.incompatible & (_EXTENDED_L2 | _DATA_FILE | _CORRUPT):
        return None
    _refuse_like_qemu(image, h, 8)
    cluster = 1 << h.cluster_bits
    per_table = cluster // 8
    clusters = -(-h.virtual_size // cluster)  # the last one may be cut short by the size
    found = _Problems()
    total = 0
    for index, entry in _l1_entries(fd, file_len, h.l1_size, h.l1_offset, found):
        l2_offset = entry & _OFFSET_MASK
        first = index * per_table
        if first >= clusters:
            continue
        if not l2_offset or l2_offset & (cluster - 1) or l2_offset >= file_len:
            return None
        raw = os.pread(fd, cluster, l2_offset)
        if len(raw) < cluster or not _l2_sound(raw, 1, cluster, file_len, True):
            return None  # compressed clusters, reserved bits: qemu-img's answer
        table = _unpack(raw, 1)[:clusters - first]
        total += (len(table) - table.count(0)) * cluster
        last = clusters - 1 - first
        if last < len(table) and table[last] and h.virtual_size % cluster:
            total -= cluster - h.virtual_size % cluster
    if found.count:
        return None
    return total
