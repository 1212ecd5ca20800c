"""The real Linux test guest (tests/guest/linux) under a plain qemu-system-x86_64, TCG.

Builds the guest from Debian packages (cached in $TMPDIR/snaptree-linux-guest, or
$SNAPTREE_LINUX_GUEST_CACHE), boots it on an empty ext4 data disk and checks what the
project relies on: the console protocol, the web page, the guest agent (fsfreeze,
set-time), that a copy of the disk taken while frozen needs no journal replay while one
taken while running does, that a guest restored from a migration stream keeps writing,
that the numbering continues across a crash and a reboot, and that the disk always
passes the offline check.  Also the same kernel and initramfs through OVMF.

Anything missing (a tool, a package, the network to Debian's mirror) fails the test.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guest.linux import HOST_PACKAGES
from tests.guest.linux.build import LinuxGuest, build_linux_guest, default_cache_dir
from tests.guest.linux.check import LINE_RE, check_layer, parse_log
from tests.guest.linux.disk import make_data_disk
from tests.guest.linux.vm import OVMF_CODE, OVMF_VARS, LinuxVM

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SNAPTREE_LINUX_GUEST_CACHE", default_cache_dir()))
TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "dpkg-query", "ldd", "mkfs.ext4", "dumpe2fs", "e2fsck",
         "debugfs", "qemu-img", "qemu-system-x86_64")
BOOT_TIMEOUT = 120.0  # to the first SNAPTREE-LINE; ~5 s on an idle machine


@pytest.fixture(scope="module")
def guest() -> LinuxGuest:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing host tools {missing}: apt-get install {' '.join(HOST_PACKAGES)}", pytrace=False)
    return build_linux_guest(CACHE)


@dataclass
class Run:
    """The module's guest: one data disk, one serial log, the VM currently running it."""
    work: Path
    disk: Path
    serial: Path
    vm: LinuxVM


@pytest.fixture(scope="module")
def run(guest: LinuxGuest, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("linux-guest")
    disk = make_data_disk(work / "data.qcow2")
    serial = work / "serial.log"
    vm = LinuxVM(guest, disk, work / "vm1", serial_log=serial)
    vm.start()
    r = Run(work, disk, serial, vm)
    try:
        vm.wait_line(0, BOOT_TIMEOUT)
        yield r
    finally:
        r.vm.stop()
        r.vm.kill()


# ----------------------------------------------------------------- build
def read_cpio(data: bytes) -> dict[str, tuple[int, int, bytes]]:
    """{name: (mode, rdev, data)} of a newc archive."""
    out, off = {}, 0
    while True:
        assert data[off:off + 6] == b"070701", f"bad cpio magic at {off}"
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        body = data[off: off + size]
        off = (off + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, (rmaj << 8) | rmin, body)


def test_build_is_complete_and_cached(guest: LinuxGuest) -> None:
    assert guest.kernel.is_file() and guest.kernel.stat().st_size == guest.kernel_size
    assert guest.initrd.is_file() and guest.initrd.stat().st_size == guest.initrd_size
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-cloud-amd64", guest.kernel_version)
    names = dict(guest.packages)
    assert set(names) == {f"linux-image-{guest.kernel_version}", "busybox-static", "qemu-guest-agent"}
    assert all(names.values())

    t = time.monotonic()
    again = build_linux_guest(CACHE)
    assert time.monotonic() - t < 1.0, "a cached build must be instant"
    assert again == guest

    files = read_cpio(gzip.decompress(guest.initrd.read_bytes()))
    init_mode, _, init = files["init"]
    assert init == (REPO / "tests/guest/linux/init.sh").read_bytes() and init_mode & 0o111
    console_mode, rdev, _ = files["dev/console"]
    assert (console_mode >> 12, rdev) == (0o02, (5 << 8) | 1), "the kernel needs /dev/console for init"
    modules = files["etc/snaptree/modules"][2].decode().split()
    assert modules[:5] == ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci"]
    for m in modules:
        assert files[f"lib/modules/{m}.ko"][2][:4] == b"\x7fELF", f"{m}.ko is not a plain ELF module"
    for name in ("bin/busybox", "bin/sh", "sbin/hwclock", "usr/sbin/qemu-ga", "lib64/ld-linux-x86-64.so.2"):
        assert name in files, name
    assert any(n.endswith("/libglib-2.0.so.0") for n in files)


def test_concurrent_builders_agree(guest: LinuxGuest, tmp_path: Path) -> None:
    """Two builders racing on an empty cache (the .debs preloaded) both return the same
    complete guest and leave no temporary directory behind."""
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    for deb in (CACHE / "debs").glob("*.deb"):
        os.link(deb, cache / "debs" / deb.name)
    for memo in CACHE.glob("versions-*.json"):
        shutil.copyfile(memo, cache / memo.name)
    cmd = [sys.executable, "-m", "tests.guest.linux.build", str(cache)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert outs[0][0] == outs[1][0]
    entries = sorted(p.name for p in cache.iterdir())
    assert [e for e in entries if e.startswith(".")] == []
    assert f"guest-{guest.digest}" in entries
    built = cache / f"guest-{guest.digest}"
    assert (built / "initrd.gz").read_bytes() == guest.initrd.read_bytes(), "the build is reproducible"


def test_make_data_disk_refuses_to_overwrite(tmp_path: Path) -> None:
    disk = make_data_disk(tmp_path / "d.qcow2", size_mib=16)
    info = subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True, text=True,
                          check=True).stdout
    assert '"format": "qcow2"' in info and '"virtual-size": 16777216' in info
    before = disk.read_bytes()
    with pytest.raises(FileExistsError):
        make_data_disk(disk)
    assert disk.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.qcow2"]
    r = check_layer(disk, tmp_path / "w")
    assert (r.needs_recovery, r.fsck_clean_before_replay, r.log.found) == (False, True, False)


def test_parse_log_verdicts() -> None:
    b1, b2 = "0d7c5a8e-8d7b-4bd8-9bd5-4b7ee1a1e001", "0d7c5a8e-8d7b-4bd8-9bd5-4b7ee1a1e002"
    good = f"1 1.00 {b1}\n2 1.05 {b1}\n3 0.90 {b2}\n".encode()
    r = parse_log(good)
    assert (r.lines, r.contiguous, r.torn, r.last_n, r.boot_ids) == (3, True, False, 3, (b1, b2))
    r = parse_log(good + b"4 0.9")
    assert (r.lines, r.contiguous, r.torn) == (3, False, True)
    r = parse_log(good.replace(b"2 1.05", b"5 1.05"))
    assert (r.contiguous, r.torn) == (False, False)
    r = parse_log(good + f"4 2.00 {b1}\n".encode())  # boot id b1 comes back after b2
    assert (r.contiguous, r.torn) == (False, False)
    r = parse_log(good.replace(b"2 1.05", b"\0\0\0\0\0\0"))
    assert (r.contiguous, r.torn) == (False, True)
    assert parse_log(None).found is False


# ----------------------------------------------------------------- the running guest
def test_console_shows_boot_and_increasing_lines(run: Run, guest: LinuxGuest) -> None:
    text = run.vm.console_text()
    boot = re.search(r"^SNAPTREE-GUEST boot_id=([0-9a-f-]{36}) kernel=(\S+)$", text, re.M)
    assert boot, run.vm.console_tail()
    assert boot.group(2) == guest.kernel_version
    assert re.search(r"^SNAPTREE-GUEST agent=started$", text, re.M)
    assert "SNAPTREE-GUEST error" not in text
    first = run.vm.console_lines()[-1]
    last = run.vm.wait_line(first + 10, 30)
    lines = run.vm.console_lines()
    assert lines == list(range(1, len(lines) + 1)), "SNAPTREE-LINE must count 1, 2, 3, ..."
    assert last > first


def test_forwarded_port_shows_last_line(run: Run) -> None:
    before = run.vm.console_lines()[-1]
    body = run.vm.http_get("/")
    after = run.vm.console_lines()[-1]
    m = LINE_RE.fullmatch(body.strip().encode())
    assert m, body
    assert before <= int(m.group(1)) <= after + 1
    assert m.group(3).decode() == run.vm.boot_ids()[-1]


def test_guest_agent_freeze_thaw_and_time(run: Run) -> None:
    with run.vm.agent() as ga:
        ga.sync()
        ga.ping()
        assert ga.fsfreeze_status() == "thawed"
        assert ga.fsfreeze_freeze() == 1  # /data (the initramfs and devtmpfs are not frozen)
        try:
            assert ga.fsfreeze_status() == "frozen"
            at_freeze = run.vm.console_lines()[-1]
            time.sleep(1.5)
            # The workload blocks in write(2); a line already fsynced may still be printed.
            assert run.vm.console_lines()[-1] <= at_freeze + 1
        finally:
            assert ga.fsfreeze_thaw() == 1
        assert ga.fsfreeze_status() == "thawed"
        run.vm.wait_line(at_freeze + 5, 30)

        ga.set_time(time.time_ns())  # settimeofday, then hwclock -w
        assert abs(ga.get_time() - time.time_ns()) < 5e9
        ga.set_time()  # hwclock -s
        assert abs(ga.get_time() - time.time_ns()) < 5e9

    # A client that left half a command behind does not confuse the next one.
    ga = run.vm.agent()
    ga._send(b'{"execute": "guest-fsfreeze-fre')
    ga.close()
    with run.vm.agent() as ga:
        assert ga.fsfreeze_status() == "thawed"


def copy_disk(run: Run, name: str, frozen: bool) -> Path:
    """A standalone copy of the data disk taken with the VM paused (QEMU flushed it)."""
    out = run.work / name
    ga = run.vm.agent() if frozen else None
    try:
        if ga:
            assert ga.fsfreeze_freeze() == 1
        run.vm.qmp("stop")
        try:
            subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(run.disk), str(out)],
                           check=True, capture_output=True)
        finally:
            run.vm.qmp("cont")
    finally:
        if ga:
            ga.fsfreeze_thaw()
            ga.close()
    return out


def test_frozen_copy_needs_no_replay_running_copy_does(run: Run) -> None:
    frozen = check_layer(copy_disk(run, "frozen.qcow2", frozen=True), run.work / "check")
    assert frozen.application_consistent, frozen
    assert frozen.lines_before_replay == frozen.lines > 0
    run.vm.wait_line(run.vm.console_lines()[-1] + 3, 30)

    running = check_layer(copy_disk(run, "running.qcow2", frozen=False), run.work / "check")
    # A mounted ext4 keeps needs_recovery set until it is unmounted or frozen.
    assert running.needs_recovery, running
    assert running.ok, running  # crash-consistent once the journal is replayed
    assert running.lines > frozen.lines
    assert running.lines_before_replay <= running.lines
    print(f"\nfrozen copy: {frozen.lines} lines, no replay; running copy: {running.lines} lines, "
          f"{running.lines_before_replay} visible before the replay")


def test_restored_migration_keeps_printing_then_disk_checks(run: Run, guest: LinuxGuest) -> None:
    vm = run.vm
    vm.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
    stream = run.work / "migration.bin"
    vm.qmp("migrate", uri=f"exec:cat > {stream}")
    deadline = time.monotonic() + 60
    while (status := vm.qmp("query-migrate").get("status")) not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, "migration did not finish"
        time.sleep(0.1)
    assert status == "completed"
    last_source = vm.console_lines()[-1]
    vm.stop()

    restored = LinuxVM(guest, run.disk, run.work / "vm2", serial_log=run.serial,
                       incoming=f"exec:cat {stream}")
    run.vm = restored
    restored.start()
    restored.wait_line(last_source + 10, 60)
    lines = restored.console_lines()
    assert lines == list(range(1, len(lines) + 1)), "the restored guest continues the same count"
    assert len(set(restored.boot_ids())) == 1, "no reboot"
    with restored.agent() as ga:
        ga.ping()
    body = restored.http_get("/")
    assert LINE_RE.fullmatch(body.strip().encode()), body

    restored.stop()  # QMP quit: no guest shutdown, so the journal still needs a replay
    last_console = restored.console_lines()[-1]
    r = check_layer(run.disk, run.work / "check")
    assert r.ok, r
    assert r.needs_recovery
    assert r.last_n is not None and r.last_n >= last_console, "every line printed was fsynced"
    assert r.boot_ids == tuple(dict.fromkeys(restored.boot_ids()))


def test_crash_then_reboot_continues_numbering(run: Run, guest: LinuxGuest) -> None:
    before = check_layer(run.disk, run.work / "check")
    assert before.ok and before.last_n
    # No NIC and no agent this time: the guest says so and goes on.
    vm = LinuxVM(guest, run.disk, run.work / "vm3", serial_log=run.work / "serial3.log",
                 net=False, agent=False, interval_ms=0)
    run.vm = vm
    vm.start()
    vm.wait_line(before.last_n + 20, BOOT_TIMEOUT)
    text = vm.console_text()
    assert re.search(r"^SNAPTREE-GUEST agent=absent$", text, re.M)
    assert re.search(rf"^SNAPTREE-GUEST workload=start n={before.last_n + 1} interval_ms=0$", text, re.M)
    assert vm.console_lines()[0] == before.last_n + 1
    new_boot = vm.boot_ids()[-1]
    assert new_boot not in before.boot_ids
    vm.kill()  # SIGKILL: a crash
    last_console = vm.console_lines()[-1]
    r = check_layer(run.disk, run.work / "check")
    assert r.ok, r
    assert r.boot_ids == (*before.boot_ids, new_boot)
    assert r.last_n >= last_console


# ----------------------------------------------------------------- UEFI
def test_boots_through_ovmf(guest: LinuxGuest, tmp_path: Path) -> None:
    for f in (OVMF_CODE, OVMF_VARS):
        assert f.is_file(), f"{f} missing: apt-get install ovmf"
    disk = make_data_disk(tmp_path / "data.qcow2", size_mib=16)
    with LinuxVM(guest, disk, tmp_path, uefi=True) as vm:
        t = time.monotonic()
        vm.wait_line(0, BOOT_TIMEOUT)
        took = time.monotonic() - t
        vm.wait_line(5, 30)
        with vm.agent() as ga:
            ga.ping()
        assert LINE_RE.fullmatch(vm.http_get("/").strip().encode())
    assert "EFI stub" in vm.console_text() or "efi: EFI v" in vm.console_text()
    r = check_layer(disk, tmp_path / "check")
    assert r.ok, r
    print(f"\nOVMF: first SNAPTREE-LINE {took:.1f} s after QEMU started")
