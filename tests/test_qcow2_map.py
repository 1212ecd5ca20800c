"""adapters.qemu.qcow2_map: the bytes a layer holds, read from its tables, equal what
`qemu-img map` counts, on images the real qemu-img and qemu-io made (no mocks); what the reader
does not handle answers None, so qemu-img is asked instead."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from adapters.qemu import qcow2_map, qemu_img

KiB, MiB = 1024, 1024 * 1024


def qimg(*args: str) -> None:
    res = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def qio(path: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    res = subprocess.run([*args, str(path)], capture_output=True, text=True)
    assert res.returncode == 0 and "error" not in res.stdout.lower(), res.stdout + res.stderr


def create(path: Path, size: str, *options: str, backing: Path | None = None) -> Path:
    extra = ["-b", str(backing), "-F", "qcow2"] if backing is not None else []
    opts = ["-o", ",".join(options)] if options else []
    qimg("create", "-q", "-f", "qcow2", *opts, *extra, str(path), size)
    return path


def same_as_qemu_img(path: Path) -> int:
    mine = qcow2_map.allocated_bytes(str(path))
    theirs = qemu_img.map_allocated_bytes(str(path))
    assert mine == theirs, f"{path.name}: tables say {mine}, qemu-img map says {theirs}"
    assert qemu_img.allocated_bytes(str(path)) == theirs
    return theirs


@pytest.mark.parametrize("cluster", ["512", "64k", "2M"])
def test_layers_of_a_chain(tmp_path: Path, cluster: str) -> None:
    opt = f"cluster_size={cluster}"
    base = create(tmp_path / "base.qcow2", "24M", opt)
    assert same_as_qemu_img(base) == 0
    qio(base, "write -P 1 0 1M", "write -P 2 5M 64k", "write -P 3 23M 1M")
    assert same_as_qemu_img(base) > 0
    mid = create(tmp_path / "mid.qcow2", "24M", opt, backing=base)
    assert same_as_qemu_img(mid) == 0
    qio(mid, "write -P 4 512k 1M", "write -z 5M 64k", "write -z -u 8M 128k", "discard 23M 64k")
    same_as_qemu_img(mid)
    top = create(tmp_path / "top.qcow2", "24M", opt, backing=mid)
    qio(top, "write -P 5 12345 777")  # inside one cluster, not aligned
    same_as_qemu_img(top)


def test_a_size_that_is_not_a_whole_number_of_clusters(tmp_path: Path) -> None:
    size = 8 * MiB + 12800  # whole sectors (qemu-img rounds a size up to them), not clusters
    base = create(tmp_path / "odd.qcow2", str(size))
    qio(base, f"write -P 7 {8 * MiB} 12800", "write -P 8 0 4k")
    assert same_as_qemu_img(base) == 64 * KiB + 12800
    top = create(tmp_path / "odd-top.qcow2", str(size), backing=base)
    qio(top, f"write -z {8 * MiB} 12800")
    assert same_as_qemu_img(top) == 12800


def test_grown_image_has_tables_past_the_first(tmp_path: Path) -> None:
    base = create(tmp_path / "big.qcow2", "4G", "cluster_size=4k")  # 512 clusters per L2 table
    qio(base, "write -P 1 0 4k", "write -P 2 3G 8k", "write -P 3 4095M 1M")
    same_as_qemu_img(base)


def test_what_it_leaves_to_qemu_img(tmp_path: Path) -> None:
    ext = create(tmp_path / "ext.qcow2", "8M", "extended_l2=on")
    qio(ext, "write -P 1 0 64k")
    old = create(tmp_path / "v2.qcow2", "8M", "compat=0.10")
    qio(old, "write -P 1 0 64k")
    plain = create(tmp_path / "plain.qcow2", "8M")
    qio(plain, "write -P 1 0 1M")
    packed = tmp_path / "packed.qcow2"
    qimg("convert", "-c", "-O", "qcow2", str(plain), str(packed))
    raw = tmp_path / "base.raw"
    qimg("create", "-q", "-f", "raw", str(raw), "8M")
    on_raw = tmp_path / "on-raw.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(on_raw))
    gone = create(tmp_path / "gone.qcow2", "8M")
    orphan = create(tmp_path / "orphan.qcow2", "8M", backing=gone)
    gone.unlink()
    not_qcow2 = tmp_path / "text.qcow2"
    not_qcow2.write_text("hello")
    for path in (ext, old, packed, on_raw, orphan, not_qcow2, tmp_path / "missing.qcow2"):
        assert qcow2_map.allocated_bytes(str(path)) is None, path.name
    qio(on_raw, "write -P 2 1M 64k")
    for path in (ext, old, packed, on_raw):
        assert qemu_img.allocated_bytes(str(path)) == qemu_img.map_allocated_bytes(str(path)) > 0
