"""adapters.qemu.qcow2.validate: the pure-Python structure check, on images made by the real
qemu-img and qemu-io and damaged by hand. Every damage it reports is also one `qemu-img check`
reports (or one `qemu-img info` refuses), so the fast check and the deep one agree."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.qemu import qcow2
from service.api import Service
from service.verify import CORRUPT, LEAKED_CLUSTERS, verify
from tests.disk_harness import PatternVM
from tests.test_audit_verify import run_cli

KiB, MiB = 1 << 10, 1 << 20
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


def qimg(*args: str, cwd: Path | None = None) -> str:
    res = subprocess.run(["qemu-img", *args], capture_output=True, text=True, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return res.stdout


def make(path: Path, *opts: str, size: str = "16M", writes: tuple[int, ...] = (0, MiB)) -> Path:
    """A qcow2 image with 64 KiB of pattern 0x41 written at each offset in `writes`."""
    qimg("create", "-q", "-f", "qcow2", *opts, str(path), size)
    if writes:
        cmds = [arg for at in writes for arg in ("-c", f"write -P 0x41 {at} 64k")]
        subprocess.run(["qemu-io", *cmds, str(path)], check=True, capture_output=True)
    return path


def qemu_check(path: Path) -> int:
    """`qemu-img check`'s exit status: 0 clean, 2 corruptions, 3 leaks only, 1 cannot open."""
    return subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True).returncode


def header(path: Path) -> dict[str, int]:
    raw = path.read_bytes()[:104]
    (_, version, _, _, cluster_bits, _, _, l1_size, l1_offset, rt_offset) = struct.unpack(
        ">4sIQIIQIIQQ", raw[:56])
    return {"version": version, "cluster": 1 << cluster_bits, "l1_size": l1_size,
            "l1_offset": l1_offset, "rt_offset": rt_offset}


def l2_offset(path: Path) -> int:
    """The L2 table the first L1 entry points to."""
    with open(path, "rb") as f:
        f.seek(header(path)["l1_offset"])
        (entry,) = struct.unpack(">Q", f.read(8))
    return entry & OFFSET_MASK


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def img(tmp_path: Path) -> Path:
    return make(tmp_path / "img.qcow2")


def test_a_clean_image_has_no_problems(img: Path) -> None:
    v = qcow2.validate(img)
    assert (v.format, v.version, v.cluster_size, v.virtual_size) == ("qcow2", 3, 64 * KiB, 16 * MiB)
    assert v.problems == () and v.problem_count == 0 and not v.damaged
    assert not v.corrupt and not v.dirty and v.backing is None and v.notes == ()
    assert v.path == str(img) and qemu_check(img) == 0


def test_an_empty_image_and_a_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make(tmp_path / "empty.qcow2", writes=())
    monkeypatch.chdir(tmp_path)
    v = qcow2.validate("empty.qcow2")
    assert not v.damaged and v.path == str(tmp_path / "empty.qcow2")


def test_garbage_in_the_first_l1_entry(img: Path) -> None:
    poke(img, header(img)["l1_offset"], b"\xff" * 16)  # as test_containment's damage_l1
    v = qcow2.validate(img)
    assert v.damaged and "L1 entry 0 points past the end of the file" in v.problems[0]
    assert qemu_check(img) == 2


def test_an_l1_entry_that_is_not_cluster_aligned(img: Path) -> None:
    poke(img, header(img)["l1_offset"], struct.pack(">Q", (1 << 63) | (l2_offset(img) + 512)))
    (problem,) = qcow2.validate(img).problems
    assert "L1 entry 0" in problem and "not cluster aligned" in problem
    assert qemu_check(img) == 2


@pytest.mark.parametrize("cut", ["data", "l2"])
def test_a_truncated_file(img: Path, cut: str) -> None:
    l2 = l2_offset(img)
    # data: keep the tables, lose the last data cluster (1 MiB's); l2: lose the L2 table too
    os.truncate(img, os.path.getsize(img) - 64 * KiB if cut == "data" else l2 + 100)
    v = qcow2.validate(img)
    if cut == "data":
        (problem,) = v.problems
        assert "L2 entry 16 (guest offset 0x100000)" in problem and "past the end" in problem
    else:
        assert v.problems[0] == f"the L2 table of L1 entry 0 (at 0x{l2:x}) runs past the end of the file"
        assert "data cluster at" in v.problems[1]  # what is left of the table is read all the same
    assert qemu_check(img) == 2


def test_a_data_cluster_that_is_not_cluster_aligned(img: Path) -> None:
    l2 = l2_offset(img)
    with open(img, "rb") as f:
        f.seek(l2)
        (entry,) = struct.unpack(">Q", f.read(8))
    poke(img, l2, struct.pack(">Q", entry + 512))
    (problem,) = qcow2.validate(img).problems
    assert "L2 entry 0 (guest offset 0x0)" in problem and "not cluster aligned" in problem
    assert qemu_check(img) == 2


def test_a_refcount_table_past_the_end(img: Path) -> None:
    poke(img, 48, struct.pack(">Q", 64 * MiB))
    (problem,) = qcow2.validate(img).problems
    assert "refcount table offset 0x4000000 is past the end of the file" in problem
    assert qemu_check(img) == 2


def test_many_problems_are_counted_and_a_few_listed(tmp_path: Path) -> None:
    img = make(tmp_path / "big.qcow2", writes=tuple(range(0, 4 * MiB, 64 * KiB)))  # 64 clusters
    os.truncate(img, l2_offset(img) + 64 * KiB)  # keep the L2 table, lose every data cluster
    v = qcow2.validate(img)
    assert v.problem_count == 64 and len(v.problems) == 20


def test_header_damage_qemu_refuses_to_open_raises(img: Path, tmp_path: Path) -> None:
    for field, value, reason in (
            (40, struct.pack(">Q", header(img)["l1_offset"] + 8), "L1 table offset invalid"),
            (48, struct.pack(">Q", 12345), "reference count table offset invalid"),
            (72, struct.pack(">Q", 1 << 20), "unsupported qcow2 feature")):
        bad = tmp_path / f"bad{field}.qcow2"
        bad.write_bytes(img.read_bytes())
        poke(bad, field, value)
        with pytest.raises(qcow2.DamagedHeaderError, match=reason):
            qcow2.validate(bad)
        assert qemu_check(bad) == 1  # qemu-img cannot open it either


def test_the_corrupt_and_dirty_bits(img: Path) -> None:
    poke(img, 72, struct.pack(">Q", 2))  # incompatible_features bit 1
    v = qcow2.validate(img)
    assert v.corrupt and not v.dirty and not v.damaged
    assert json.loads(qimg("info", "-U", "--output=json", str(img)))["format-specific"]["data"]["corrupt"]
    poke(img, 72, struct.pack(">Q", 1))  # bit 0
    v = qcow2.validate(img)
    assert v.dirty and not v.corrupt


def test_a_flipped_magic_is_not_qcow2(img: Path, tmp_path: Path) -> None:
    poke(img, 0, b"XXXX")
    with pytest.raises(qcow2.NotQcow2Error):
        qcow2.validate(img)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * MiB)
    with pytest.raises(qcow2.NotQcow2Error):
        qcow2.validate(raw)
    with pytest.raises(qcow2.Qcow2Error, match="cannot read"):
        qcow2.validate(tmp_path / "missing.qcow2")


def test_a_version_2_image(tmp_path: Path) -> None:
    img = make(tmp_path / "v2.qcow2", "-o", "compat=0.10")
    assert header(img)["version"] == 2
    v = qcow2.validate(img)
    assert v.version == 2 and not v.damaged and not v.corrupt and not v.dirty
    os.truncate(img, os.path.getsize(img) - 64 * KiB)
    assert "past the end" in qcow2.validate(img).problems[0]
    assert qemu_check(img) == 2


def test_backing_files_resolve_as_backing_file_does(tmp_path: Path) -> None:
    base = make(tmp_path / "base.qcow2")
    top = tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    assert qcow2.validate(top).backing == str(base) == qcow2.backing_file(top)
    (tmp_path / "sub").mkdir()
    up = tmp_path / "sub" / "up.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", str(up))
    info = json.loads(qimg("info", "-U", "--output=json", str(up)))
    assert qcow2.validate(up).backing == qcow2.backing_file(up) == info["full-backing-filename"]
    assert qcow2.validate(up).backing == str(tmp_path / "sub" / "../base.qcow2")


def test_extended_l2_entries_are_read_as_pairs(tmp_path: Path) -> None:
    img = make(tmp_path / "ext.qcow2", "-o", "extended_l2=on")
    assert not qcow2.validate(img).damaged  # the subcluster bitmaps are not taken for offsets
    l2 = l2_offset(img)
    # entry 16 (1 MiB at 64 KiB clusters) is the 17th pair: its descriptor is at 16 * 16 bytes
    poke(img, l2 + 16 * 16, struct.pack(">Q", (1 << 63) | 64 * MiB))
    (problem,) = qcow2.validate(img).problems
    assert "L2 entry 16 (guest offset 0x100000)" in problem and "past the end" in problem
    assert qemu_check(img) == 2


def test_compressed_clusters_are_not_taken_for_cluster_offsets(img: Path, tmp_path: Path) -> None:
    packed = tmp_path / "packed.qcow2"
    qimg("convert", "-c", "-O", "qcow2", str(img), str(packed))
    assert not qcow2.validate(packed).damaged and qemu_check(packed) == 0


def test_an_external_data_file_skips_the_data_offsets(tmp_path: Path) -> None:
    img = make(tmp_path / "ext.qcow2", "-o", f"data_file={tmp_path / 'ext.raw'}")
    v = qcow2.validate(img)
    assert not v.damaged and any("external data file" in n for n in v.notes)


def test_safe_on_an_image_another_process_holds_open(img: Path) -> None:
    holder = subprocess.Popen(["qemu-io", "-c", "sleep 3000", str(img)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Wait through /proc, not qemu-img: a probe's own lock would make qemu-io's open fail.
        deadline = time.monotonic() + 5
        while not _has_open(holder.pid, img) and time.monotonic() < deadline:
            time.sleep(0.02)
        # The lock follows the open: wait for it, and fail (never skip) if it never comes.
        while True:
            res = subprocess.run(["qemu-img", "info", str(img)], capture_output=True, text=True)
            if res.returncode != 0 or holder.poll() is not None or time.monotonic() > deadline + 5:
                break
            time.sleep(0.05)
        assert holder.poll() is None and res.returncode != 0, "qemu-io did not hold the image locked"
        assert "lock" in res.stderr
        assert not qcow2.validate(img).damaged  # no lock taken, no lock needed
    finally:
        holder.kill()
        holder.wait()


def _has_open(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())
    except OSError:
        return False


# --- through `audit verify`: the fast check by default, qemu-img check too with deep ---


@pytest.fixture
def pv(service: Service, tmp_path: Path) -> PatternVM:
    pv = PatternVM.create(service, tmp_path, ndisks=1)
    pv.take("A")
    pv.take("B")
    return pv


def kinds(pv: PatternVM, deep: bool) -> list[str]:
    return [f.kind for f in verify(pv.svc.app, pv.svc.data, pv.name, deep=deep).findings]


def test_verify_finds_leaks_only_when_deep(pv: PatternVM) -> None:
    layer = Path(pv.vm.resolve_snapshot("B").layers["disk0"])
    l2 = l2_offset(layer)
    with open(layer, "rb") as f:
        f.seek(l2)
        entries = struct.unpack(">8192Q", f.read(64 * KiB))
    mapped = next(i for i, e in enumerate(entries) if e)
    poke(layer, l2 + 8 * mapped, b"\0" * 8)  # unmap its data cluster: still counted, so leaked
    assert qemu_check(layer) == 3
    assert kinds(pv, deep=False) == []
    assert kinds(pv, deep=True) == [LEAKED_CLUSTERS]
    home = pv.svc.data.root
    assert run_cli(home, "audit", "verify", pv.name).returncode == 0
    res = run_cli(home, "audit", "verify", pv.name, "--deep", "--json")
    assert res.returncode == 1
    assert [f["kind"] for f in json.loads(res.stdout)["findings"]] == [LEAKED_CLUSTERS]


def test_verify_reports_a_damaged_layer_once_fast_or_deep(pv: PatternVM) -> None:
    node = pv.vm.resolve_snapshot("A")
    layer = Path(node.layers["disk0"])
    poke(layer, header(layer)["l1_offset"], b"\xff" * 16)
    for deep in (False, True):
        (f,) = verify(pv.svc.app, pv.svc.data, pv.name, deep=deep).findings
        assert (f.kind, f.node, f.path) == (CORRUPT, str(node.id), str(layer))
        assert f.message.startswith("L1 entry 0 points past the end of the file")


# --- the whole-table shortcut never hides what the per-entry loop finds ---

_ENTRY = st.one_of(
    st.just(0),
    st.integers(1, 200).map(lambda c: (1 << 63) | c << 16),           # a sound data cluster
    st.integers(1, 200).map(lambda c: c << 16 | 1),                    # preallocated zeros
    st.integers(0, (1 << 64) - 1),                                     # anything at all
    st.integers(0, 1 << 20).map(lambda c: 1 << 62 | c),                # compressed
)


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(_ENTRY, min_size=1, max_size=64), words=st.sampled_from([1, 2]),
       check_data=st.booleans())
def test_the_table_shortcut_agrees_with_the_loop(entries: list[int], words: int, check_data: bool) -> None:
    cluster, file_len = 64 * KiB, 100 * 64 * KiB
    entries = entries[: len(entries) // words * words] or [0] * words
    raw = struct.pack(f">{len(entries)}Q", *entries)
    found = qcow2._Problems()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qcow2, "_l2_sound", lambda *_: False)  # the loop alone
        qcow2._check_l2(raw, 8 * words, 0, cluster, file_len, check_data, found)
    if qcow2._l2_sound(raw, words, cluster, file_len, check_data):
        assert found.count == 0, found.listed


def test_two_l1_entries_sharing_an_l2_table(tmp_path: Path) -> None:
    img = make(tmp_path / "two.qcow2", size="2G", writes=(0,))
    entry = struct.pack(">Q", (1 << 63) | l2_offset(img))
    poke(img, header(img)["l1_offset"] + 8, entry)  # L1 entry 1 (guest 512 MiB..1 GiB): the same table
    (problem,) = qcow2.validate(img).problems
    assert problem.startswith("L1 entry 1 points to the L2 table of L1 entry 0")
    assert qemu_check(img) == 2
