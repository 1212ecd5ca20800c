"""Byte counts the read side shows, measured on the disk (they are not in the events)."""

from __future__ import annotations

from adapters.qemu import qemu_img
from adapters.qemu.errors import QemuImgError


def measure(path: str) -> int:
    """Guest bytes allocated in this one layer (what a merge copies)."""
    try:
        return qemu_img.allocated_bytes(path)
    except (QemuImgError, OSError):
        return 0


def held(path: str) -> int:
    """Bytes the file occupies on disk."""
    try:
        return qemu_img.disk_usage(path)
    except OSError:
        return 0
