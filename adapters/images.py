"""The service layer's `Disks` port on real qcow2 files (qemu-img, and the qcow2 header reader)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Callable, TypeVar

from adapters.qemu import overlays, qcow2, qemu_img
from adapters.qemu.errors import QemuImgError

Fraction = Callable[[float], None]

CORRUPT = "corrupt"
LEAKS = "leaks"
UNREADABLE = "unreadable"


def check_layer(path: str) -> tuple[str, str] | None:
    """`qemu-img check` of this one layer: (problem, message), or None when clean.

    The image is opened with `"backing": null`: every layer is checked on its own, so a missing
    or broken parent is reported once, at the parent, and never as an error of all its children.
    """
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": os.path.abspath(path)}})
    cmd = [qemu_img.QEMU_IMG, "check", "--output=json", "-U", f"json:{spec}"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode not in (0, 2, 3):
        return UNREADABLE, str(QemuImgError(cmd, res.returncode, res.stderr, what="qemu-img check"))
    try:
        report = json.loads(res.stdout)
    except ValueError:
        return UNREADABLE, f"qemu-img check printed no report (exit {res.returncode})"
    if report.get("corruptions", 0) or res.returncode == 2:
        return CORRUPT, f"qemu-img check: {report.get('corruptions', 0)} corruption(s)"
    if report.get("leaks", 0) or res.returncode == 3:
        return LEAKS, f"qemu-img check: {report.get('leaks', 0)} leaked cluster(s)"
    return None


def _identity(path: str) -> tuple[int, ...] | None:
    """What changes whenever the file's content may have: inode, size, mtime and ctime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


T = TypeVar("T")


def _remembered(table: dict[str, tuple[tuple[int, ...], T]], path: str, ask: Callable[[str], T]) -> T:
    """`ask(path)`, or its answer kept from when the file was as it is now."""
    ident = _identity(path)
    known = table.get(path)
    if known is not None and ident is not None and known[0] == ident:
        return known[1]
    answer = ask(path)
    if ident is not None and _identity(path) == ident:  # unchanged while qemu-img read it
        table[path] = (ident, answer)
    return answer


class QcowImages:
    """qcow2 layer files through qemu-img; every call is one process (or one header read).

    The answers of `check` and `allocated_bytes` are kept per file while the file is unchanged
    (same inode, size, mtime and ctime) and forgotten when this object changes it, so the
    flattens and merges of one drain do not ask qemu-img twice about the same frozen layer. An
    overlay made here from qemu-img's checked, empty template starts known: clean, nothing
    allocated."""

    def __init__(self) -> None:
        self._checks: dict[str, tuple[tuple[int, ...], tuple[str, str] | None]] = {}
        self._sizes: dict[str, tuple[tuple[int, ...], int]] = {}

    def _forget(self, *paths: str) -> None:
        for p in paths:
            self._checks.pop(p, None)
            self._sizes.pop(p, None)

    def chain(self, path: str) -> list[tuple[str, str]]:
        return [(image.filename, image.format) for image in qcow2.backing_chain(path)]

    def create_overlay(self, path: str, backing: str) -> None:
        try:
            qemu_img.create_overlay(path, backing)
        except ValueError as exc:  # a file is in the way: a failure of this step, not a bug
            raise QemuImgError(["qemu-img", "create"], 1, str(exc), what="overlay creation") from None

    def create_overlays(self, pairs: list[tuple[str, str]]) -> None:
        try:
            made = overlays.create_overlays(pairs)
        except ValueError as exc:
            raise QemuImgError(["qemu-img", "create"], 1, str(exc), what="overlay creation") from None
        for path in made:
            ident = _identity(path)
            if ident is not None:
                self._checks[path] = (ident, None)
                self._sizes[path] = (ident, 0)

    def backing_file(self, path: str) -> str | None:
        return qcow2.backing_file(path)

    def allocated_bytes(self, path: str) -> int:
        return _remembered(self._sizes, path, qemu_img.allocated_bytes)

    def commit(self, top: str, progress: Fraction) -> None:
        try:
            below = qcow2.backing_file(top)
        except QemuImgError:
            below = None
        self._forget(top, *([below] if below else []))  # a commit writes into the layer below
        qemu_img.commit(top, progress=progress)

    def rebase_safe(self, path: str, backing: str, progress: Fraction) -> None:
        self._forget(path)
        qemu_img.rebase_safe(path, backing, progress=progress)

    def rebase_unsafe(self, path: str, backing: str) -> None:
        self._forget(path)
        qemu_img.rebase_unsafe(path, backing)

    def repair_leaks(self, path: str) -> None:
        self._forget(path)
        qemu_img.repair_leaks(path)

    def check(self, path: str) -> tuple[str, str] | None:
        return _remembered(self._checks, path, check_layer)

    def remove(self, path: str) -> None:
        self._forget(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)
