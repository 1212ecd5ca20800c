"""Every failure contained (issue 10), each reproduction as a hostile operator found it, through
the real CLI on real qcow2 files: no VM can corrupt another, damage is never merged away, a
failed step never strands a VM, verify sees what was tampered with, a full disk gives one line,
interrupts stop the children, guest data stays private, names compare as they look."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from adapters.qemu import qemu_io

MiB = 1 << 20
HOST = "testhost"


class Cli:
    def __init__(self, home: Path, **env: str) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SNAPTREE_", "SQLITE_", "POSTGRES_", "PERSISTENCE_"))}
        self.env.update(SNAPTREE_HOME=str(home), SNAPTREE_HOST=HOST, SNAPTREE_RETRY_DELAYS="0.05", **env)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "adapters.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str) -> str:
        res = self.run(*args)
        assert res.returncode == 0, f"{args} -> {res.returncode}\n{res.stderr}"
        return res.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def layer(self, vm: str, snapshot: str | None = None, disk: str = "disk0") -> str:
        tree = self.json("tree", vm)
        if snapshot is None:
            node = next(n for n in tree["nodes"] if n["id"] == tree["current"])
        else:
            node = next(n for n in tree["nodes"] if n["name"] == snapshot and n["kind"] == "snapshot")
        return str(node["disks"][disk])


def one_line(stderr: str) -> None:
    assert stderr.count("\n") == 1 and stderr.startswith("snaptree: "), stderr
    assert "Traceback" not in stderr


def image(path: Path, size: int = 16 * MiB, backing: Path | None = None) -> Path:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        cmd += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*cmd, str(path), str(size)], check=True)
    return path


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home")


# --- 1. another VM's snapshot never changes ---


def test_a_vm_cannot_adopt_a_file_another_vm_reads(cli: Cli, tmp_path: Path) -> None:
    base = image(tmp_path / "base.qcow2")
    qemu_io.write_pattern(str(base), 0, MiB, 0x11)
    a = image(tmp_path / "a.qcow2", backing=base)
    cli.ok("vm", "create", "a", "--disk", str(a))
    cli.ok("snapshot", "take", "a", "a1")
    res = cli.run("vm", "create", "b", "--disk", str(base), "--json")
    assert res.returncode == 2, res.stderr
    one_line(res.stderr)
    assert json.loads(res.stdout)["error"]["code"] == "invalid_disk"
    assert "backing chain of VM 'a'" in res.stderr
    assert qemu_io.read_through(cli.layer("a", "a1"), 0, MiB, 0x11)
    # A VM's own disk may sit on a base image another VM's own disk also sits on: neither writes it.
    b = image(tmp_path / "b.qcow2", backing=base)
    cli.ok("vm", "create", "b", "--disk", str(b))
    # A layer of another VM is refused even through a symlink or as a backing file.
    link = tmp_path / "link.qcow2"
    link.symlink_to(cli.layer("a", "a1"))
    assert cli.run("vm", "create", "c", "--disk", str(link)).returncode == 2
    on_top = image(tmp_path / "on-top.qcow2", backing=Path(cli.layer("a")))
    res = cli.run("vm", "create", "d", "--disk", str(on_top))
    assert res.returncode == 2 and "inside the data directory" in res.stderr


def test_verify_reports_a_file_shared_with_another_vm(cli: Cli, tmp_path: Path) -> None:
    cli.ok("vm", "create", "a", "--disk", str(image(tmp_path / "a.qcow2")))
    cli.ok("snapshot", "take", "a", "a1")
    b = image(tmp_path / "b.qcow2")
    cli.ok("vm", "create", "b", "--disk", str(b))
    assert cli.run("audit", "verify", "b").returncode == 0
    # Behind snaptree's back, b's own disk now reads through a's current layer.
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", cli.layer("a"), str(b)],
                   check=True)
    res = cli.run("audit", "verify", "b", "--json")
    assert res.returncode == 1
    kinds = {f["kind"] for f in json.loads(res.stdout)["findings"]}
    assert "shared_with_vm" in kinds


# --- 2. never merge what is damaged ---


def damage_l1(path: str) -> None:
    with open(path, "r+b") as f:
        header = f.read(48)
        (l1,) = struct.unpack(">Q", header[40:48])
        f.seek(l1)
        f.write(b"\xff" * 16)


@pytest.mark.parametrize("damage", ["l1", "truncate"])
def test_a_damaged_layer_is_never_merged_and_stays_reported(cli: Cli, tmp_path: Path, damage: str) -> None:
    own = image(tmp_path / "own.qcow2")
    cli.ok("vm", "create", "v", "--disk", str(own))
    cli.ok("snapshot", "take", "v", "s1")
    qemu_io.write_pattern(cli.layer("v"), 0, MiB, 0x22)  # into s2's layer-to-be
    cli.ok("snapshot", "take", "v", "s2")
    qemu_io.write_pattern(cli.layer("v"), MiB, MiB, 0x33)  # into s3's
    cli.ok("snapshot", "take", "v", "s3")
    s2, s3 = cli.layer("v", "s2"), cli.layer("v", "s3")
    if damage == "l1":
        damage_l1(s2)
    else:
        os.truncate(s2, 200_000)
    before = {p: sha(p) for p in (str(own), s2, s3)}
    res = cli.run("snapshot", "delete", "v", "s1")
    assert res.returncode == 1, res.stderr
    one_line(res.stderr)
    assert "damaged" in res.stderr and "untouched" in res.stderr
    res = cli.run("snapshot", "delete", "v", "s2")
    assert res.returncode == 1 and "damaged" in res.stderr
    assert {p: sha(p) for p in before} == before  # nothing was touched
    assert qemu_io.read_through(s3, MiB, MiB, 0x33)  # s3's own data is still there
    report = json.loads(cli.run("audit", "verify", "v", "--json").stdout)
    assert "corrupt" in {f["kind"] for f in report["findings"]}
    merges = cli.json("merges", "v")
    assert {m["state"] for m in merges} == {"failed"} and all("damaged" in m["blocked_by"] for m in merges)


# --- 3. a failed step never strands a VM ---


def flip_magic(path: str) -> bytes:
    with open(path, "r+b") as f:
        magic = f.read(4)
        f.seek(0)
        f.write(b"XXXX")
    return magic


def restore_magic(path: str, magic: bytes) -> None:
    with open(path, "r+b") as f:
        f.write(magic)


def test_a_take_that_cannot_make_its_overlay_is_rolled_back(cli: Cli, tmp_path: Path) -> None:
    cli.ok("vm", "create", "v", "--disk", str(image(tmp_path / "own.qcow2")))
    cli.ok("snapshot", "take", "v", "s1")
    cli.ok("snapshot", "take", "v", "s2")
    current = cli.layer("v")
    magic = flip_magic(current)  # the overlay of the next take cannot be created on it
    res = cli.run("snapshot", "take", "v", "s3", "--json")
    assert res.returncode == 1, res.stderr
    one_line(res.stderr)
    assert "rolled back: nothing of it is recorded" in res.stderr
    tree = cli.json("tree", "v")
    assert sorted(n["name"] for n in tree["nodes"] if n["kind"] == "snapshot") == ["s1", "s2"]
    assert cli.layer("v") == current
    restore_magic(current, magic)
    cli.ok("snapshot", "take", "v", "s3")  # the name is free, the VM works
    cli.ok("snapshot", "delete", "v", "s1")
    assert cli.run("audit", "verify", "v").returncode == 0


def test_queued_work_that_fails_holds_only_its_vm_and_says_the_way_out(cli: Cli, tmp_path: Path) -> None:
    cli.ok("vm", "create", "v", "--disk", str(image(tmp_path / "own.qcow2")))
    cli.ok("vm", "create", "w", "--disk", str(image(tmp_path / "other.qcow2")))
    cli.ok("snapshot", "take", "v", "s1")
    magic = flip_magic(cli.layer("v"))
    cli.ok("snapshot", "take", "v", "s2", "--no-wait")  # recorded; the worker will fail it
    cli.ok("snapshot", "take", "w", "w1", "--no-wait")  # another VM's work
    res = cli.run("worker", "run", "--until-idle")
    assert res.returncode == 1 and "work retry v" in res.stderr and "work abandon v" in res.stderr
    one_line(res.stderr)
    w = cli.json("tree", "w")
    assert all(n["ready"] for n in w["nodes"])  # the other VM's overlay was created
    # Commands that would add work are refused at once, with the way out; reads and renames work.
    for args in (("snapshot", "delete", "v", "s1"), ("snapshot", "apply", "v", "s1"),
                 ("snapshot", "take", "v", "s3")):
        res = cli.run(*args, "--json")
        assert res.returncode == 2, (args, res.stderr)
        assert json.loads(res.stdout)["error"]["code"] == "conflict" and "work abandon v" in res.stderr
    cli.ok("snapshot", "rename", "v", "s1", "first")
    node = next(n for n in cli.json("tree", "v")["nodes"] if n["kind"] == "current")
    assert node["failure"]["kind"] == "create_layers"
    assert cli.json("vm", "status", "v")["failures"]
    report = json.loads(cli.run("audit", "verify", "v", "--json").stdout)
    assert "failed_work" in {f["kind"] for f in report["findings"]}
    # Retrying while the cause is still there fails the same way; abandoning rolls the take back.
    assert cli.run("work", "retry", "v").returncode == 1
    out = cli.json("work", "abandon", "v")
    assert out["action"] == "rolled back" and out["failures"] == []
    restore_magic(cli.layer("v"), magic)
    assert sorted(n["name"] for n in cli.json("tree", "v")["nodes"] if n["kind"] == "snapshot") == ["first"]
    cli.ok("snapshot", "take", "v", "s2")
    assert cli.run("audit", "verify", "v").returncode == 0
    assert cli.run("worker", "run", "--until-idle").returncode == 0


# --- 4. verify sees a layer replaced by a symlink ---


def test_verify_reports_a_layer_replaced_by_a_symlink_outside(cli: Cli, tmp_path: Path) -> None:
    cli.ok("vm", "create", "v", "--disk", str(image(tmp_path / "own.qcow2")))
    cli.ok("snapshot", "take", "v", "s1")
    cli.ok("snapshot", "take", "v", "s2")
    layer = cli.layer("v", "s2")
    outside = tmp_path / "elsewhere.qcow2"
    os.rename(layer, outside)
    os.symlink(outside, layer)
    res = cli.run("audit", "verify", "v", "--json")
    assert res.returncode == 1
    kinds = {f["kind"] for f in json.loads(res.stdout)["findings"]}
    assert {"layer_symlink", "layer_outside"} <= kinds


# --- 5. a full disk: one line, nothing recorded, reads keep working ---


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"this test needs root to mount a tmpfs: {res.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_refuses_cleanly_and_reads_keep_working(tmp_path: Path, small_disk: Path) -> None:
    cli = Cli(small_disk / "home")
    cli.ok("vm", "create", "v", "--disk", str(image(tmp_path / "own.qcow2")))
    cli.ok("snapshot", "take", "v", "s1")
    tree_before = cli.json("tree", "v")
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # fill the disk to the last block
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    res = cli.run("snapshot", "take", "v", "s2", "--json")
    assert res.returncode == 1, res.stderr
    one_line(res.stderr)
    assert json.loads(res.stdout)["error"]["code"] in ("store", "work_failed")
    for args in (("tree", "v"), ("merges", "v")):
        res = cli.run(*args, "--json")
        assert res.returncode == 0, (args, res.stderr)
    assert cli.json("tree", "v")["nodes"] == tree_before["nodes"]  # nothing of s2 is recorded
    filler.unlink()
    cli.ok("snapshot", "take", "v", "s2")  # the same name: it was never recorded
    assert cli.run("audit", "verify", "v").returncode == 0


# --- 6. interrupts stop the children and leave the step resumable ---


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_merge_stops_qemu_img_and_resumes(cli: Cli, tmp_path: Path, sig: int, status: int) -> None:
    cli.ok("vm", "create", "v", "--disk", str(image(tmp_path / "own.qcow2", size=512 * MiB)))
    cli.ok("snapshot", "take", "v", "s1")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 0 384M", cli.layer("v")],
                   check=True, capture_output=True)
    cli.ok("snapshot", "take", "v", "s2")
    proc = subprocess.Popen([sys.executable, "-m", "adapters.cli", "snapshot", "delete", "v", "s1"],
                            env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = []
    deadline = time.monotonic() + 60
    while not children and time.monotonic() < deadline:
        children = [p for p in _children(proc.pid) if "qemu-img" in _cmdline(p)]
        time.sleep(0.02)
    assert children, "the merge never started qemu-img"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    one_line(err)
    assert "run the command again" in err
    for child in children:
        assert not Path(f"/proc/{child}").exists() or _state(child) == "Z", "qemu-img left running"
    cli.ok("worker", "run", "--until-idle")  # the recorded merge resumes
    assert cli.run("audit", "verify", "v").returncode == 0
    assert qemu_io.read_matches(cli.layer("v"), 0, MiB, 0x44)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


# --- 7. guest data is the owner's only ---


def test_guest_data_is_private_whatever_the_umask(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    cli = Cli(home)
    old = os.umask(0)
    try:
        res = cli.run("vm", "create", "v", "--disk", str(image(tmp_path / "own.qcow2")))
        assert res.returncode == 0 and "was readable by others" in res.stderr, res.stderr
        cli.ok("snapshot", "take", "v", "s1")
        cli.ok("snapshot", "take", "v", "s2")
        bundle = tmp_path / "v.bundle"
        cli.ok("vm", "export", "v", str(bundle))
    finally:
        os.umask(old)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    for path in [home, *home.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        assert mode == want, f"{path}: {oct(mode)}"


# --- 9. names compare as they look ---


def test_nfc_and_nfd_spellings_are_one_name_and_dot_is_refused_for_what_it_is(cli: Cli, tmp_path: Path) -> None:
    cli.ok("vm", "create", "v", "--disk", str(image(tmp_path / "own.qcow2")))
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    cli.ok("snapshot", "take", "v", nfc)
    res = cli.run("snapshot", "take", "v", nfd, "--json")
    assert res.returncode == 2 and json.loads(res.stdout)["error"]["code"] == "name_taken"
    cli.ok("snapshot", "rename", "v", nfd, "renamed")  # found by either spelling
    res = cli.run("snapshot", "take", "v", ".")
    assert res.returncode == 2 and "must not be '.'" in res.stderr and ".." not in res.stderr.split(":")[-1]
    res = cli.run("vm", "create", "x", "--disk", f"my.disk={tmp_path / 'own.qcow2'}")
    assert res.returncode == 2 and "a letter followed by" in res.stderr
