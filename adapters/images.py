"""The service layer's `Disks` port on real qcow2 files (qemu-img, and the qcow2 header reader)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Callable

from adapters.qemu import qcow2, qemu_img
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


class QcowImages:
    """qcow2 layer files through qemu-img; every call is one process (or one header read)."""

    def chain(self, path: str) -> list[tuple[str, str]]:
        return [(image.filename, image.format) for image in qcow2.backing_chain(path)]

    def create_overlay(self, path: str, backing: str) -> None:
        try:
            qemu_img.create_overlay(path, backing)
        except ValueError as exc:  # a file is in the way: a failure of this step, not a bug
            raise QemuImgError(["qemu-img", "create"], 1, str(exc), what="overlay creation") from None

    def backing_file(self, path: str) -> str | None:
        return qcow2.backing_file(path)

    def allocated_bytes(self, path: str) -> int:
        return qemu_img.allocated_bytes(path)

    def commit(self, top: str, progress: Fraction) -> None:
        qemu_img.commit(top, progress=progress)

    def rebase_safe(self, path: str, backing: str, progress: Fraction) -> None:
        qemu_img.rebase_safe(path, backing, progress=progress)

    def rebase_unsafe(self, path: str, backing: str) -> None:
        qemu_img.rebase_unsafe(path, backing)

    def repair_leaks(self, path: str) -> None:
        qemu_img.repair_leaks(path)

    def check(self, path: str) -> tuple[str, str] | None:
        return check_layer(path)

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)
