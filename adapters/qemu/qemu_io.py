"""Byte patterns written and verified with ``qemu-io``: how tests and the demo prove no data is lost.

qemu-io 7.2 reports command errors ("read failed: ...", "Pattern verification failed ...") on
**stdout**, with exit status 1 for both, so the output text decides, not the status alone.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

from adapters.qemu import qemu_img
from adapters.qemu.qemu_img import QemuImgError

__all__ = ["QEMU_IO", "QemuIoError", "write_pattern", "read_matches", "read_through"]

QEMU_IO: str = os.environ.get("SNAPTREE_QEMU_IO", "qemu-io")


class QemuIoError(QemuImgError):
    """A qemu-io command failed for a reason other than a pattern mismatch."""


def _check_args(offset: int, length: int, pattern: int) -> None:
    if not 0 <= pattern <= 0xFF:
        raise ValueError(f"pattern must be a byte (0..255), got {pattern}")
    if offset < 0 or length <= 0:
        raise ValueError(f"bad range offset={offset} length={length}")


def _io(args: list[str]) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    cmd = [QEMU_IO, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False), cmd


def _detail(res: subprocess.CompletedProcess[str]) -> str:
    for text in (res.stderr, res.stdout):
        for line in text.splitlines():
            if "fail" in line or "error" in line.lower() or "can't" in line:
                return line.removeprefix("qemu-io: ").strip()
    for text in (res.stderr, res.stdout):
        if text.strip():
            return text.strip().splitlines()[0]
    return "(no output)"


def write_pattern(path: str, offset: int, length: int, pattern: int) -> None:
    """Fill guest bytes [offset, offset+length) of the image with the byte ``pattern``."""
    _check_args(offset, length, pattern)
    what = "qemu-io write"
    res, cmd = _io(
        ["-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", os.path.abspath(path)]
    )
    if res.returncode != 0 or f"wrote {length}/{length} bytes" not in res.stdout:
        raise QemuIoError(cmd, res.returncode, res.stderr + res.stdout, what=what, detail=_detail(res))


def read_matches(path: str, offset: int, length: int, pattern: int) -> bool:
    """True when every guest byte in the range equals ``pattern``, as seen through the chain.

    Opens read-only (``-r``) with ``-U`` so the image is never modified and the read also works
    on the images of a running VM (QEMU 7.2 refuses even ``-r`` there without ``-U``).
    """
    _check_args(offset, length, pattern)
    what = "qemu-io read"
    res, cmd = _io(
        ["-r", "-U", "-f", "qcow2", "-c", f"read -P {pattern} {offset} {length}",
         os.path.abspath(path)]
    )
    if "Pattern verification failed" in res.stdout + res.stderr:
        return False
    if res.returncode != 0 or f"read {length}/{length} bytes" not in res.stdout:
        raise QemuIoError(cmd, res.returncode, res.stderr + res.stdout, what=what, detail=_detail(res))
    return True


def read_through(path: str, offset: int, length: int, pattern: int) -> bool:
    """Like read_matches, but through a throw-away overlay on ``path``.

    This reads a frozen snapshot layer exactly as a VM started from it would, while anything
    that might write goes to the temporary overlay: the layer's bytes and mtime stay untouched.
    """
    with tempfile.TemporaryDirectory(prefix="snaptree-read-") as tmp:
        overlay = os.path.join(tmp, "probe.qcow2")
        qemu_img.create_overlay(overlay, os.path.abspath(path))
        return read_matches(overlay, offset, length, pattern)
