"""adapters.qemu.qemu_img / qemu_io against the real qemu-img and qemu-io binaries (no mocks)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from adapters.qemu import qcow2, qemu_img, qemu_io
from adapters.qemu.qemu_img import QemuImgError

MiB = 1024 * 1024
SIZE = 16 * MiB


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    """base <- mid <- top, each layer holding its own pattern in its own MiB."""
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "d" / "mid.qcow2", tmp_path / "top.qcow2"
    qemu_img.create_image(str(base), SIZE)
    qemu_img.create_overlay(str(mid), str(base))
    qemu_img.create_overlay(str(top), str(mid))
    qemu_io.write_pattern(str(base), 0, MiB, 0xAA)
    qemu_io.write_pattern(str(mid), MiB, MiB, 0xBB)
    qemu_io.write_pattern(str(top), 2 * MiB, MiB, 0xCC)
    return base, mid, top


def test_chain_of_three_has_absolute_backing(chain: tuple[Path, Path, Path]) -> None:
    base, mid, top = chain
    assert qemu_img.backing_file(str(base)) is None
    assert qemu_img.backing_file(str(mid)) == str(base)
    assert qemu_img.backing_file(str(top)) == str(mid)
    assert all(qemu_img.virtual_size(str(p)) == SIZE for p in chain)
    infos = qcow2.backing_chain(str(top))
    assert isinstance(infos, list)
    assert [i.backing for i in infos[:2]] == [str(mid), str(base)]
    assert [i.filename for i in infos] == [str(top), str(mid), str(base)] and infos[2].backing is None
    # the whole chain reads through top
    for off, pat in ((0, 0xAA), (MiB, 0xBB), (2 * MiB, 0xCC), (3 * MiB, 0)):
        assert qemu_io.read_matches(str(top), off, MiB, pat)
    assert not qemu_io.read_matches(str(top), 0, MiB, 0xBB)


def test_overlay_with_relative_backing_is_stored_absolute(tmp_path: Path, monkeypatch) -> None:
    qemu_img.create_image(str(tmp_path / "b.qcow2"), SIZE)
    monkeypatch.chdir(tmp_path)
    qemu_img.create_overlay("sub/o.qcow2", "b.qcow2")
    assert qemu_img.backing_file(str(tmp_path / "sub" / "o.qcow2")) == str(tmp_path / "b.qcow2")


def test_create_overlay_idempotent_no_temp_left(tmp_path: Path) -> None:
    base, other, ov = tmp_path / "base.qcow2", tmp_path / "other.qcow2", tmp_path / "ov.qcow2"
    qemu_img.create_image(str(base), SIZE)
    qemu_img.create_image(str(other), SIZE)
    qemu_img.create_overlay(str(ov), str(base))
    qemu_io.write_pattern(str(ov), 0, MiB, 0x11)
    digest = sha256(ov)
    qemu_img.create_overlay(str(ov), str(base))  # retry: nothing happens
    assert sha256(ov) == digest
    with pytest.raises(ValueError):
        qemu_img.create_overlay(str(ov), str(other))
    assert sha256(ov) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.qcow2", "other.qcow2", "ov.qcow2"]


def test_create_overlay_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(QemuImgError):
        qemu_img.create_overlay(str(tmp_path / "ov.qcow2"), str(tmp_path / "missing.qcow2"))
    assert list(tmp_path.iterdir()) == []


def test_create_image_refuses_to_overwrite(tmp_path: Path) -> None:
    img = tmp_path / "disk.qcow2"
    qemu_img.create_image(str(img), "1M")
    with pytest.raises(FileExistsError):
        qemu_img.create_image(str(img), "1M")


def test_is_qcow2(tmp_path: Path) -> None:
    img, raw, junk = tmp_path / "img.qcow2", tmp_path / "raw.img", tmp_path / "junk"
    qemu_img.create_image(str(img), SIZE)
    raw.write_bytes(b"\0" * MiB)
    junk.write_bytes(b"QFI\xfb" + os.urandom(300))  # qcow2 magic, garbage header
    assert qemu_img.is_qcow2(str(img))
    assert not qemu_img.is_qcow2(str(raw))
    assert not qemu_img.is_qcow2(str(junk))
    assert not qemu_img.is_qcow2(str(tmp_path / "missing"))
    assert not qemu_img.is_qcow2(str(tmp_path))


def test_allocated_bytes_counts_this_layer_only(tmp_path: Path) -> None:
    base, ov = tmp_path / "base.qcow2", tmp_path / "ov.qcow2"
    qemu_img.create_image(str(base), SIZE)
    assert qemu_img.allocated_bytes(str(base)) == 0
    qemu_io.write_pattern(str(base), 0, 4 * MiB, 0x01)
    assert qemu_img.allocated_bytes(str(base)) >= 4 * MiB
    qemu_img.create_overlay(str(ov), str(base))
    assert qemu_img.allocated_bytes(str(ov)) == 0
    qemu_io.write_pattern(str(ov), 8 * MiB, MiB, 0x02)
    assert MiB <= qemu_img.allocated_bytes(str(ov)) < 2 * MiB
    qemu_io.write_pattern(str(base), 12 * MiB, MiB, 0x03)  # more backing data changes nothing
    assert MiB <= qemu_img.allocated_bytes(str(ov)) < 2 * MiB
    assert qemu_img.disk_usage(str(ov)) >= MiB


def test_commit_moves_top_into_backing_and_keeps_top(chain: tuple[Path, Path, Path]) -> None:
    base, mid, top = chain
    assert not qemu_io.read_matches(str(mid), 2 * MiB, MiB, 0xCC)
    fractions: list[float] = []
    qemu_img.commit(str(top), progress=fractions.append)
    assert qemu_io.read_matches(str(mid), 2 * MiB, MiB, 0xCC)
    assert qemu_io.read_matches(str(mid), MiB, MiB, 0xBB)
    assert qemu_io.read_matches(str(top), 2 * MiB, MiB, 0xCC)
    assert qemu_img.backing_file(str(top)) == str(mid)
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert not qemu_io.read_matches(str(base), 2 * MiB, MiB, 0xCC)  # only one level down


def test_rebase_safe_onto_grandparent_keeps_guest_view(chain: tuple[Path, Path, Path]) -> None:
    base, mid, top = chain
    before = qemu_img.allocated_bytes(str(top))
    qemu_img.rebase_safe(str(top), str(base))
    assert qemu_img.backing_file(str(top)) == str(base)
    for off, pat in ((0, 0xAA), (MiB, 0xBB), (2 * MiB, 0xCC), (3 * MiB, 0)):
        assert qemu_io.read_matches(str(top), off, MiB, pat)
    assert qemu_img.allocated_bytes(str(top)) >= before + MiB  # mid's MiB was pulled up


def test_rebase_unsafe_changes_backing_only(chain: tuple[Path, Path, Path]) -> None:
    base, mid, top = chain
    alloc = qemu_img.allocated_bytes(str(top))
    qemu_img.rebase_unsafe(str(top), str(base))
    assert qemu_img.backing_file(str(top)) == str(base)
    assert qemu_img.allocated_bytes(str(top)) == alloc
    assert qemu_io.read_matches(str(top), MiB, MiB, 0)  # mid's data is no longer seen


def test_check_clean_image(chain: tuple[Path, Path, Path]) -> None:
    report = qemu_img.check(str(chain[2]))
    assert report["exit_code"] == 0
    assert report["check-errors"] == 0
    assert report["format"] == "qcow2"


def test_read_through_does_not_touch_layer(chain: tuple[Path, Path, Path]) -> None:
    base, mid, top = chain
    digest, mtime = sha256(mid), os.stat(mid).st_mtime_ns
    entries = set(mid.parent.iterdir())
    assert qemu_io.read_through(str(mid), MiB, MiB, 0xBB)
    assert qemu_io.read_through(str(mid), 0, MiB, 0xAA)
    assert not qemu_io.read_through(str(mid), 2 * MiB, MiB, 0xCC)
    assert sha256(mid) == digest and os.stat(mid).st_mtime_ns == mtime
    assert set(mid.parent.iterdir()) == entries


def test_read_errors_raise_not_false(tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    qemu_img.create_image(str(img), SIZE)
    with pytest.raises(QemuImgError):
        qemu_io.read_matches(str(img), SIZE, MiB, 0)  # beyond the end of the disk
    with pytest.raises(QemuImgError):
        qemu_io.read_matches(str(tmp_path / "missing.qcow2"), 0, MiB, 0)
    with pytest.raises(ValueError):
        qemu_io.write_pattern(str(img), 0, MiB, 0x100)


def test_error_message_is_one_clear_line(tmp_path: Path) -> None:
    img = tmp_path / "alone.qcow2"
    qemu_img.create_image(str(img), SIZE)
    with pytest.raises(QemuImgError) as exc:
        qemu_img.commit(str(img))
    err = exc.value
    assert str(err) == "qemu-img commit failed (exit 1): Image does not have a backing file"
    assert err.returncode == 1 and err.cmd[1] == "commit" and str(img) in err.cmd
    assert "backing file" in err.stderr
    with pytest.raises(QemuImgError, match=r"^qemu-img info failed \(exit 1\): "):
        qemu_img.info(str(tmp_path / "missing.qcow2"))
