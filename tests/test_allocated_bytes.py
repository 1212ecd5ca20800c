"""The bytes a layer holds (`qemu_img.allocated_bytes`: a merge plan's and `tree`'s, read in-process
by qcow2_map where it can) against `qemu-img map`, over every kind of layer a plan meets.
Real qemu-img and qemu-io, no mocks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from adapters.qemu import qcow2_map, qemu_img

MiB = 1 << 20


def img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def io(path: Path, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for cmd in cmds:
        argv += ["-c", cmd]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def images(tmp: Path) -> dict[str, Path]:
    """Layers of every kind a plan meets: data, zero clusters (allocated and not), discards in an
    overlay, compressed clusters, compat=0.10, a partial last cluster, more than one L2 table."""
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    img("create", "-q", "-f", "qcow2", str(base), "1000M")
    io(base, "write -P 1 0 3M", "write -z 10M 1M", "write -P 2 999M 1M")
    img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    io(top, "write -P 3 1M 100k", "write -z 20M 64k", "write -z -u 30M 128k", "discard 0 64k")
    odd = tmp / "odd.qcow2"
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(odd), str(10 * MiB + 1234))
    io(odd, f"write -P 4 {10 * MiB} 1234", "write -P 5 0 5k")
    packed = tmp / "packed.qcow2"
    img("convert", "-c", "-O", "qcow2", str(base), str(packed))
    old = tmp / "v2.qcow2"
    img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(old), "64M")
    io(old, "write -P 1 0 1M", "write -z 2M 1M")
    big = tmp / "big.qcow2"
    img("create", "-q", "-f", "qcow2", str(big), "2G")
    io(big, "write -P 1 1023M 2M")
    empty = tmp / "empty.qcow2"
    img("create", "-q", "-f", "qcow2", str(empty), "64M")
    return {p.stem: p for p in (base, top, odd, packed, old, big, empty)}


def test_counts_what_qemu_img_map_counts(tmp_path: Path) -> None:
    for name, path in images(tmp_path).items():
        assert qemu_img.allocated_bytes(str(path)) == qemu_img.map_allocated_bytes(str(path)), name


def test_the_plan_runs_no_map_for_an_ordinary_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = images(tmp_path)["top"]
    expected = qemu_img.map_allocated_bytes(str(path))

    def no_process(args: list[str]) -> None:
        raise AssertionError(f"qemu-img {args[0]} ran")

    monkeypatch.setattr(qemu_img, "_run", no_process)
    assert qemu_img.allocated_bytes(str(path)) == expected


def test_unusual_images_go_to_qemu_img(tmp_path: Path) -> None:
    ext = tmp_path / "ext.qcow2"
    img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(ext), "64M")
    io(ext, "write -P 1 0 1M")
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * MiB)
    assert qcow2_map.allocated_bytes(str(ext)) is None
    assert qcow2_map.allocated_bytes(str(raw)) is None
    assert qcow2_map.allocated_bytes(str(tmp_path / "missing.qcow2")) is None
    assert qemu_img.allocated_bytes(str(ext)) == qemu_img.map_allocated_bytes(str(ext)) == MiB

