"""Overlays made in a batch from qemu-img's template are the files qemu-img itself writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from adapters.images import QcowImages
from adapters.qemu import overlays, qcow2, qemu_img
from adapters.qemu.errors import QemuImgError


def _reference(tmp_path: Path, backing: str, name: str) -> bytes:
    ref = str(tmp_path / "ref" / name)
    qemu_img.create_overlay(ref, backing)
    return Path(ref).read_bytes()


@pytest.mark.parametrize("size", [16 * 1024 * 1024, 5 * 1024**4 + 512])
def test_batch_overlays_are_byte_for_byte_qemu_imgs(tmp_path: Path, size: int) -> None:
    base = str(tmp_path / "base.qcow2")
    qemu_img.create_image(base, size)
    deep = tmp_path / ("d" * 200) / ("e" * 200)
    pairs = [(str(tmp_path / "a.qcow2"), base), (str(tmp_path / "b.qcow2"), str(tmp_path / "a.qcow2")),
             (str(deep / "c.qcow2"), str(tmp_path / "b.qcow2"))]
    assert overlays.create_overlays(pairs) == [p for p, _ in pairs]
    for path, backing in pairs:
        assert Path(path).read_bytes() == _reference(tmp_path, backing, os.path.basename(path))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert qcow2.backing_file(path) == backing
        assert qcow2.virtual_size(path) == qemu_img.virtual_size(path) == size
    assert qemu_img.check(pairs[-1][0])["exit_code"] == 0
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_a_retry_keeps_what_is_in_place_and_refuses_what_is_not(tmp_path: Path) -> None:
    base = str(tmp_path / "base.qcow2")
    other = str(tmp_path / "other.qcow2")
    qemu_img.create_image(base, 16 * 1024 * 1024)
    qemu_img.create_image(other, 16 * 1024 * 1024)
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    Path(f"{b}.tmp-999999").write_bytes(b"left by a killed worker")
    assert overlays.create_overlays([(a, base)]) == [a]
    assert overlays.create_overlays([(a, base), (b, a)]) == [b]  # a found in place, b made
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(ValueError, match="backing file"):
        overlays.create_overlays([(a, other)])
    with pytest.raises(QemuImgError):  # a backing that does not exist: nothing is made
        overlays.create_overlays([(str(tmp_path / "c.qcow2"), str(tmp_path / "missing.qcow2"))])
    assert not os.path.exists(tmp_path / "c.qcow2")


def test_the_disks_port_knows_a_fresh_overlay_and_forgets_a_changed_one(tmp_path: Path) -> None:
    base = str(tmp_path / "base.qcow2")
    qemu_img.create_image(base, 16 * 1024 * 1024)
    disks = QcowImages()
    a = str(tmp_path / "a.qcow2")
    disks.create_overlays([(a, base)])
    assert disks.check(a) is None and disks.allocated_bytes(a) == 0 == qemu_img.allocated_bytes(a)
    qemu_img._run(["resize", "-f", "qcow2", a, "32M"])  # changed behind its back
    assert disks.allocated_bytes(a) == qemu_img.allocated_bytes(a)
    assert disks.check(a) is None
