"""adapters.qemu.qcow2: the qcow2 header reader against images made by the real qemu-img, and
against damaged copies of them (no mocks)."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from adapters.qemu import qcow2, qemu_img
from adapters.qemu.errors import QemuImgError


def qimg(*args: str, cwd: Path | None = None) -> str:
    res = subprocess.run(["qemu-img", *args], capture_output=True, text=True, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return res.stdout


def full_backing(path: Path) -> str | None:
    """What QEMU itself makes of the image's backing file name."""
    info = json.loads(qimg("info", "-U", "--output=json", str(path)))
    backing: str | None = info.get("full-backing-filename")
    return backing


def header_field(path: Path) -> tuple[int, int]:
    offset, size = struct.unpack(">QI", path.read_bytes()[8:20])
    return offset, size


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.qcow2"
    qimg("create", "-q", "-f", "qcow2", str(path), "16M")
    return path


def test_standalone_image_has_no_backing(base: Path) -> None:
    assert qcow2.backing_file(base) is None
    assert qcow2.backing_file(str(base)) is None


def test_absolute_backing_is_returned_as_written(tmp_path: Path, base: Path) -> None:
    top = tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    assert qcow2.backing_file(top) == str(base) == full_backing(top)
    assert qemu_img.backing_file(str(top)) == str(base)      # qemu_img delegates here


def test_relative_backing_is_resolved_against_the_images_directory(
        tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    up = tmp_path / "sub" / "up.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", str(up))
    beside = tmp_path / "beside.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(beside), cwd=tmp_path)
    _, size = header_field(up)
    assert size == len("../base.qcow2")                      # stored relative, as given
    # exactly QEMU's full-backing-filename: the image's directory + the name, not normalised
    assert qcow2.backing_file(up) == str(tmp_path / "sub" / "../base.qcow2") == full_backing(up)
    assert qcow2.backing_file(beside) == str(base) == full_backing(beside)
    assert qcow2.same_file(qcow2.backing_file(up) or "", base)
    # the image's own path may be relative: the result is absolute all the same
    monkeypatch.chdir(tmp_path / "sub")
    assert qcow2.backing_file("up.qcow2") == str(tmp_path / "sub" / "../base.qcow2")


def test_a_file_that_is_not_qcow2_is_refused(tmp_path: Path, base: Path) -> None:
    flipped = tmp_path / "flipped.qcow2"
    data = bytearray(base.read_bytes())
    data[3] ^= 0xFF                                          # QFI\xfb -> QFI\x04
    flipped.write_bytes(bytes(data))
    raw = tmp_path / "disk.raw"
    qimg("create", "-q", "-f", "raw", str(raw), "1M")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for path in (flipped, raw, empty):
        with pytest.raises(qcow2.NotQcow2Error, match="not a qcow2 image") as err:
            qcow2.backing_file(path)
        assert isinstance(err.value, QemuImgError)           # handled like a failing qemu-img
        assert err.value.path == str(path)
    with pytest.raises(qcow2.NotQcow2Error):
        qemu_img.backing_file(str(raw))


def test_a_truncated_header_is_damaged(tmp_path: Path, base: Path) -> None:
    top = tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    data = top.read_bytes()
    short = tmp_path / "short.qcow2"
    short.write_bytes(data[:40])                             # magic fine, header cut
    with pytest.raises(qcow2.DamagedHeaderError, match="truncated"):
        qcow2.backing_file(short)
    offset, size = header_field(top)
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(data[:offset + size // 2])               # the name cut in half
    with pytest.raises(qcow2.DamagedHeaderError, match="cut short"):
        qcow2.backing_file(cut)


@pytest.mark.parametrize("field, value, reason", [
    (slice(4, 8), struct.pack(">I", 4), "unsupported qcow2 version 4"),
    (slice(16, 20), struct.pack(">I", 2000), "too long"),
    (slice(8, 16), struct.pack(">Q", 1 << 40), "invalid backing file offset"),
    (slice(20, 24), struct.pack(">I", 40), "invalid cluster size"),
])
def test_inconsistent_header_fields_are_damaged(tmp_path: Path, base: Path, field: slice,
                                                value: bytes, reason: str) -> None:
    top = tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    data = bytearray(top.read_bytes())
    data[field] = value
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(bytes(data))
    with pytest.raises(qcow2.DamagedHeaderError, match=reason):
        qcow2.backing_file(bad)


def test_a_missing_file_is_a_qcow2_error(tmp_path: Path) -> None:
    with pytest.raises(qcow2.Qcow2Error, match="cannot read"):
        qcow2.backing_file(tmp_path / "missing.qcow2")


def test_backing_chain_sync_and_async(tmp_path: Path, base: Path) -> None:
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
    qimg("create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    for chain in (qcow2.backing_chain(top), asyncio.run(qcow2.backing_chain_async(top))):
        assert [i.filename for i in chain] == [str(top), str(mid), str(base)]
        assert [i.backing for i in chain] == [str(mid), str(base), None]
        assert {i.format for i in chain} == {"qcow2"} and chain[0].virtual_size == 16 << 20
    with pytest.raises(QemuImgError):
        qcow2.backing_chain(tmp_path / "missing.qcow2")
    with pytest.raises(QemuImgError):
        asyncio.run(qcow2.backing_chain_async(tmp_path / "missing.qcow2"))


def test_same_file(tmp_path: Path, base: Path) -> None:
    link = tmp_path / "link.qcow2"
    os.symlink(base, link)
    assert qcow2.same_file(str(base), str(base))
    assert qcow2.same_file(f"{tmp_path}/x/../base.qcow2", base)   # normalised
    assert qcow2.same_file(link, base)                             # symlink resolved
    assert not qcow2.same_file(tmp_path / "other.qcow2", base)
