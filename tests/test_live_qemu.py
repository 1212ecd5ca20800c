"""Live QEMU operations on a real QEMU 7.2 (TCG) running the bare-metal test guest.

Never skipped: a missing QEMU binary, compiler or failure to boot fails loudly.
The guest (tests/guest/guest.c) keeps a heartbeat counter at 0x200000 and
rewrites a 4 MiB region page by page, so memory saves have copy-on-write work.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from adapters.qemu import block_graph, block_jobs, live_take, migration, qcow2
from adapters.qemu.blockdev import node_name
from adapters.qemu.errors import LiveError, MachineError
from adapters.qemu.hardware import MachineConfig
from adapters.qemu.machine import QemuMachine
from adapters.qemu.process import running_pid
from adapters.qemu.session import LiveVM
from tests.guest import probe

_spec = importlib.util.spec_from_file_location(
    "snaptree_test_guest_build", Path(__file__).parent / "guest" / "build.py")
guest_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guest_build)

DISK_SIZE = "64M"
GUEST_MIB = 96
KiB, MiB = 1024, 1024 * 1024


# ----------------------------------------------------------------- helpers
@pytest.fixture(scope="session", autouse=True)
def qemu_tools() -> None:
    missing = [t for t in ("qemu-system-x86_64", "qemu-img", "qemu-io", "gcc", "ld")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"required tools missing: {missing} (these tests never skip)")


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(guest_build.build_guest(tmp_path_factory.mktemp("guest")))


def qimg(*args: str) -> str:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"qemu-img {args}: {proc.stderr}"
    return proc.stdout


def overlay(backing: Path, path: Path) -> Path:
    qimg("create", "-q", "-f", "qcow2", "-b", str(backing.absolute()), "-F", "qcow2", str(path))
    return path


def offline_read(path: Path, pattern: int, offset: int, length: int) -> bool:
    """Pattern check with a separate qemu-io (only valid once QEMU let go)."""
    proc = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c",
                           f"read -P {pattern:#x} {offset} {length}", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return "Pattern verification failed" not in proc.stdout


def backing_of(path: Path) -> str | None:
    info = json.loads(qimg("info", "-U", "--output=json", str(path)))
    return info.get("full-backing-filename")


async def wait_counter(m: QemuMachine, above: int = 0, timeout: float = 10.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe.read_counter(m)
        if value > above:
            return value
        assert loop.time() < deadline, f"guest counter stuck at {value}"
        await asyncio.sleep(0.02)


async def guest_memory(m: QemuMachine, tmp: Path, addr: int, size: int) -> bytes:
    out = tmp / f"pmem-{addr:x}-{os.getpid()}"
    await m.qmp.execute("pmemsave", {"val": addr, "size": size, "filename": str(out)})
    data = out.read_bytes()
    out.unlink()
    return data


async def assert_memory_consistent(m: QemuMachine, tmp: Path) -> int:
    """The guest's memory is one instant: pages agree with the counter."""
    counter = await probe.read_counter(m)
    magic = await probe.read_counter(m, guest_build.MAGIC_ADDR)
    assert magic == guest_build.MAGIC
    words = struct.unpack(f"<{guest_build.DIRTY_SIZE // 4}I",
                          await guest_memory(m, tmp, guest_build.DIRTY_ADDR,
                                             guest_build.DIRTY_SIZE))
    assert max(words) <= counter, "a page is newer than the heartbeat: torn memory image"
    pages = guest_build.DIRTY_SIZE // guest_build.PAGE_SIZE
    per_page = guest_build.PAGE_SIZE // 4
    last = (counter - 1) % pages
    assert set(words[last * per_page:(last + 1) * per_page]) == {counter - 1}
    return counter


class VM:
    """Two 64 MiB disks (a, b) and a running guest, in tmp_path."""

    def __init__(self, tmp: Path, kernel: str, memory_mib: int = GUEST_MIB,
                 random_mib: int = 0):
        self.tmp = tmp
        self.a0, self.b0 = tmp / "a0.qcow2", tmp / "b0.qcow2"
        for disk in (self.a0, self.b0):
            qimg("create", "-q", "-f", "qcow2", str(disk), DISK_SIZE)
        extra = []
        if random_mib:
            # non-zero RAM (zero pages cost nothing to save): a save that takes a while
            blob = tmp / "random.bin"
            blob.write_bytes(os.urandom(random_mib * MiB))
            extra = ["-device", f"loader,file={blob},addr=0x1000000,force-raw=on"]
        self.config = MachineConfig(memory_mib=memory_mib, kernel=kernel, extra_args=extra)
        self.disks = {"a": str(self.a0), "b": str(self.b0)}
        self.m = QemuMachine(tmp / "run", self.config, self.disks)


@pytest.fixture
async def vm(tmp_path: Path, kernel: str):
    v = VM(tmp_path, kernel)
    await v.m.start()
    try:
        await wait_counter(v.m)
        yield v
    finally:
        await v.m.stop()


# ------------------------------------------------------------------- tests
async def test_machine_lifecycle(vm: VM) -> None:
    m = vm.m
    assert m.status() == "running"
    pid = m.pid
    assert pid and int(m.pidfile.read_text()) == pid
    assert stat.S_IMODE(os.stat(m.socket_path).st_mode) == 0o600
    c1 = await wait_counter(m)
    c2 = await wait_counter(m, c1)
    assert c2 > c1
    # stable node names: one per layer file, derived from the path
    assert (await block_graph.chain(m, "a"))[0].node == node_name("a", vm.a0)
    await m.qmp.execute("stop")
    await asyncio.sleep(0.05)
    assert m.status() == "paused"
    await m.qmp.execute("cont")
    await asyncio.sleep(0.05)
    assert m.status() == "running"
    await m.stop()
    assert m.status() == "stopped" and m.pid is None
    assert not m.pidfile.exists() and not m.socket_path.exists()
    await m.stop()                                     # idempotent


async def test_start_paused_and_refuse_second_qemu(tmp_path: Path, kernel: str) -> None:
    v = VM(tmp_path, kernel, memory_mib=32)
    await v.m.start(paused=True)
    try:
        assert v.m.status() == "paused"
        assert await probe.read_counter(v.m) == 0       # never ran
        # never ran: a memory save is refused (QEMU 7.2 would abort), disks only
        a1, b1 = overlay(v.a0, tmp_path / "a1.qcow2"), overlay(v.b0, tmp_path / "b1.qcow2")
        with pytest.raises(LiveError, match="never run"):
            await live_take.live_snapshot(v.m, {"a": str(a1), "b": str(b1)},
                                     str(tmp_path / "p.state"))
        snap = await live_take.live_snapshot(v.m, {"a": str(a1), "b": str(b1)}, None)
        assert snap.pause_ms is None and v.m.status() == "paused"
        # once it ran and was paused, a memory save leaves it paused (QEMU 7.2
        # resumes it by itself once write protection is armed: re-stopped)
        await v.m.qmp.execute("cont")
        await wait_counter(v.m)
        await v.m.qmp.execute("stop")
        a2, b2 = overlay(a1, tmp_path / "a2.qcow2"), overlay(b1, tmp_path / "b2.qcow2")
        snap = await live_take.live_snapshot(v.m, {"a": str(a2), "b": str(b2)},
                                        str(tmp_path / "p.state"))
        assert snap.pause_ms is None and snap.method == "background-snapshot"
        await snap.wait_saved(timeout=60)
        assert v.m.status() == "paused" and await v.m.query_status() == "paused"
        await probe.qemu_io(v.m, "a", "write -P 0x77 0 4k")     # disks usable
        with pytest.raises(MachineError):
            await QemuMachine(v.m.run_dir, v.config, v.disks).start()
    finally:
        await v.m.stop()


async def test_attach_after_restart(vm: VM) -> None:
    pid = vm.m.pid
    await vm.m.detach()                                # snaptree process goes away
    vm.m = m2 = QemuMachine(vm.tmp / "run", vm.config, vm.disks)   # ... and comes back
    await m2.attach()
    try:
        assert m2.pid == pid and m2.status() == "running"
        c = await wait_counter(m2)
        await wait_counter(m2, c)
        a1, b1 = overlay(vm.a0, vm.tmp / "a1.qcow2"), overlay(vm.b0, vm.tmp / "b1.qcow2")
        snap = await live_take.live_snapshot(m2, {"a": str(a1), "b": str(b1)}, None)
        assert snap.method is None and snap.pause_ms is not None
        assert [l.filename for l in await block_graph.chain(m2, "a")] == [str(a1), str(vm.a0)]
    finally:
        await m2.stop()
    assert m2.status() == "stopped"
    with pytest.raises(MachineError):
        await QemuMachine(vm.tmp / "run", vm.config, vm.disks).attach()


async def test_live_snapshot_with_memory_and_restore(vm: VM) -> None:
    m, tmp = vm.m, vm.tmp
    await probe.qemu_io(m, "a", "write -P 0xab 0 128k")
    await probe.qemu_io(m, "b", "write -P 0xba 0 128k")
    a1, b1 = overlay(vm.a0, tmp / "a1.qcow2"), overlay(vm.b0, tmp / "b1.qcow2")
    state = tmp / "snap1.state"

    before = await probe.read_counter(m)
    snap = await live_take.live_snapshot(m, {"a": str(a1), "b": str(b1)}, str(state))
    after = await probe.read_counter(m)
    print(f"pause {snap.pause_ms} ms via {snap.method}")
    assert snap.method == "background-snapshot"
    assert snap.pause_ms is not None and 0 < snap.pause_ms < 1000
    assert m.status() == "running"

    # the overlays are the active layers, the old images their backing
    nodes = {n["node-name"]: n for n in
             await m.qmp.execute("query-named-block-nodes", {"flat": True})}
    for disk, ov, base in (("a", a1, vm.a0), ("b", b1, vm.b0)):
        node = nodes[snap.overlay_nodes[disk]]
        assert node["file"] == str(ov) and node["backing_file"] == str(base)
        assert not node["ro"] and nodes[node_name(disk, base)]["ro"]
        assert [l.filename for l in await block_graph.chain(m, disk)] == [str(ov), str(base)]

    # new writes land in the overlay, the frozen layer keeps the old data
    await probe.qemu_io(m, "a", "write -P 0xcd 0 64k")
    await probe.qemu_io(m, "a", "read -P 0xcd 0 64k")
    await probe.qemu_io(m, "a", "read -P 0xab 64k 64k")         # through the backing
    assert offline_read(vm.a0, 0xab, 0, 128 * KiB)             # frozen: readable now

    size, seconds = await snap.wait_saved(timeout=60)
    assert size == state.stat().st_size > 0 and seconds > 0
    assert await snap.progress() == (size, size)
    later = await wait_counter(m, after + 10_000)
    await m.stop()

    assert offline_read(a1, 0xcd, 0, 64 * KiB) and offline_read(vm.a0, 0xab, 0, 128 * KiB)
    assert offline_read(vm.b0, 0xba, 0, 128 * KiB)
    assert backing_of(a1) == str(vm.a0)

    # apply: fresh overlays on the snapshot's layers + the memory state
    ra, rb = overlay(vm.a0, tmp / "ra.qcow2"), overlay(vm.b0, tmp / "rb.qcow2")
    r = await migration.restore(tmp / "run2", vm.config, {"a": str(ra), "b": str(rb)},
                           str(state), paused=True)
    try:
        assert r.status() == "paused"
        restored = await assert_memory_consistent(r, tmp)
        print(f"counter before {before} restored {restored} after {after} later {later}")
        assert before <= restored <= after < later     # the snapshot instant, not later
        await probe.qemu_io(r, "a", "read -P 0xab 0 128k")     # the snapshot's disk view
        await probe.qemu_io(r, "b", "read -P 0xba 0 128k")
        await r.qmp.execute("cont")
        assert await wait_counter(r, restored) > restored      # and it runs on from there
    finally:
        await r.stop()


@pytest.mark.parametrize("accel", ["tcg,thread=single", "tcg"])
async def test_precopy_fallback(tmp_path: Path, kernel: str, accel: str) -> None:
    """Live pre-copy (single-threaded TCG); stopped pre-copy on MTTCG (exact too)."""
    vm = VM(tmp_path, kernel)
    vm.config.accel = accel
    await vm.m.start()
    try:
        await wait_counter(vm.m)
        await _precopy_case(vm)
    finally:
        await vm.m.stop()


async def _precopy_case(vm: VM) -> None:
    m, tmp = vm.m, vm.tmp
    a1, b1 = overlay(vm.a0, tmp / "a1.qcow2"), overlay(vm.b0, tmp / "b1.qcow2")
    state = tmp / "pre.state"
    await probe.qemu_io(m, "a", "write -P 0x5a 0 64k")
    before = await probe.read_counter(m)
    snap = await live_take.live_snapshot(m, {"a": str(a1), "b": str(b1)}, str(state),
                                    method="precopy")
    after = await probe.read_counter(m)
    print(f"pre-copy pause {snap.pause_ms} ms, QEMU downtime {snap.qemu_downtime_ms} ms")
    assert snap.method == "precopy" and snap.error is None
    assert snap.pause_ms is not None and m.status() == "running"
    assert [l.filename for l in await block_graph.chain(m, "b")] == [str(b1), str(vm.b0)]
    size, _ = await snap.wait_saved(timeout=60)
    assert size == state.stat().st_size > 0
    await probe.qemu_io(m, "a", "write -P 0x6b 0 64k")  # the source took its disks back
    await m.stop()

    ra, rb = overlay(vm.a0, tmp / "ra.qcow2"), overlay(vm.b0, tmp / "rb.qcow2")
    r = await migration.restore(tmp / "run2", vm.config, {"a": str(ra), "b": str(rb)},
                           str(state), paused=True)
    try:
        restored = await assert_memory_consistent(r, tmp)
        assert before <= restored <= after
        await probe.qemu_io(r, "a", "read -P 0x5a 0 64k")
    finally:
        await r.stop()


async def _guest_alive(m: QemuMachine) -> None:
    c = await wait_counter(m)
    assert await wait_counter(m, c, timeout=5) > c and m.status() == "running"


@pytest.fixture
async def busy_vm(tmp_path: Path, kernel: str):
    """A guest with 48 MiB of random RAM: its memory save takes a while."""
    v = VM(tmp_path, kernel, random_mib=48)
    await v.m.start()
    try:
        await wait_counter(v.m)
        yield v
    finally:
        await v.m.stop()


async def test_cancel_save_keeps_everything_else(busy_vm: VM) -> None:
    vm = busy_vm
    m, tmp = vm.m, vm.tmp
    for round_ in range(3):       # QEMU 7.2 froze the guest on most cancels: repeat
        top_a, top_b = (await block_graph.chain(m, "a"))[0], (await block_graph.chain(m, "b"))[0]
        a1 = overlay(Path(top_a.filename), tmp / f"a{round_ + 1}.qcow2")
        b1 = overlay(Path(top_b.filename), tmp / f"b{round_ + 1}.qcow2")
        state = tmp / f"cancel{round_}.state"
        snap = await live_take.live_snapshot(m, {"a": str(a1), "b": str(b1)}, str(state))
        done, total = await snap.progress()
        assert total > 0 and done < total
        assert await migration.cancel_save(m, str(state)) == "cancelled"
        with pytest.raises(LiveError):
            await snap.wait_saved(timeout=10)
        assert not state.exists()
        for path in (vm.a0, vm.b0, a1, b1):
            assert path.exists()
        assert [l.filename for l in await block_graph.chain(m, "a")][:2] == [str(a1), top_a.filename]
        await _guest_alive(m)
    # a later memory save works normally
    a9, b9 = overlay(a1, tmp / "a9.qcow2"), overlay(b1, tmp / "b9.qcow2")
    snap2 = await live_take.live_snapshot(m, {"a": str(a9), "b": str(b9)}, str(tmp / "s2.state"))
    size, _ = await snap2.wait_saved(timeout=60)
    assert size > 48 * MiB
    assert await migration.cancel_save(m) == "completed"           # nothing left to cancel
    await _guest_alive(m)


async def test_failed_save_does_not_freeze_the_guest(busy_vm: VM) -> None:
    vm = busy_vm
    m, tmp = vm.m, vm.tmp
    a1, b1 = overlay(vm.a0, tmp / "a1.qcow2"), overlay(vm.b0, tmp / "b1.qcow2")
    # writing the state fails half-way (ENOSPC): as a full disk would
    snap = await live_take.live_snapshot(m, {"a": str(a1), "b": str(b1)}, "/dev/full")
    assert snap.method == "background-snapshot" and snap.pause_ms is not None
    with pytest.raises(LiveError, match="failed"):
        await snap.wait_saved(timeout=30)
    await _guest_alive(m)
    assert [l.filename for l in await block_graph.chain(m, "a")] == [str(a1), str(vm.a0)]
    a2, b2 = overlay(a1, tmp / "a2.qcow2"), overlay(b1, tmp / "b2.qcow2")
    snap2 = await live_take.live_snapshot(m, {"a": str(a2), "b": str(b2)}, str(tmp / "y.state"))
    assert snap2.method == "background-snapshot"
    assert (await snap2.wait_saved(timeout=60))[0] > 48 * MiB


async def test_stream_and_commit_with_guest_running(vm: VM) -> None:
    m, tmp = vm.m, vm.tmp
    # a0 <- a1 <- a2 (active), one pattern per layer, each MiB apart
    await probe.qemu_io(m, "a", "write -P 0x11 0 1M")
    a1, b1 = overlay(vm.a0, tmp / "a1.qcow2"), overlay(vm.b0, tmp / "b1.qcow2")
    await live_take.live_snapshot(m, {"a": str(a1), "b": str(b1)}, None)
    await probe.qemu_io(m, "a", "write -P 0x22 1M 1M")
    await probe.qemu_io(m, "b", "write -P 0x33 0 1M")
    a2, b2 = overlay(a1, tmp / "a2.qcow2"), overlay(b1, tmp / "b2.qcow2")
    await live_take.live_snapshot(m, {"a": str(a2), "b": str(b2)}, None)
    await probe.qemu_io(m, "a", "write -P 0x44 2M 1M")
    c0 = await probe.read_counter(m)

    # pull a1 up into a2: a2 keeps a0 as backing, a1 drops out of QEMU
    seen: list[tuple[int, int]] = []
    res = await block_jobs.stream_into_active(m, "a", str(vm.a0),
                                        progress=lambda d, t: seen.append((d, t)))
    assert (res.active, res.backing) == (str(a2), str(vm.a0))
    assert seen and seen[-1][0] == seen[-1][1]
    assert [l.filename for l in await block_graph.chain(m, "a")] == [str(a2), str(vm.a0)]
    files = {n["file"] for n in await m.qmp.execute("query-named-block-nodes", {"flat": True})}
    assert str(a1) not in files                        # closed: the caller may delete it
    qimg("info", str(a1))                              # no lock held any more
    for pattern, off in ((0x11, 0), (0x22, MiB), (0x44, 2 * MiB)):
        await probe.qemu_io(m, "a", f"read -P {pattern:#x} {off} 1M")

    # commit a2 down into a0 (active commit): the disk writes into a0 again
    res = await block_jobs.commit_active(m, "a")
    assert (res.active, res.backing) == (str(vm.a0), None)
    assert [l.filename for l in await block_graph.chain(m, "a")] == [str(vm.a0)]
    await probe.qemu_io(m, "a", "write -P 0x55 3M 1M")
    for pattern, off in ((0x11, 0), (0x22, MiB), (0x44, 2 * MiB), (0x55, 3 * MiB)):
        await probe.qemu_io(m, "a", f"read -P {pattern:#x} {off} 1M")

    # disk b: flatten everything into the active layer
    res = await block_jobs.stream_into_active(m, "b", None)
    assert (res.active, res.backing) == (str(b2), None)
    assert await wait_counter(m, c0) > c0              # the guest ran all along
    await m.stop()

    assert backing_of(vm.a0) is None and backing_of(b2) is None
    for pattern, off in ((0x11, 0), (0x22, MiB), (0x44, 2 * MiB), (0x55, 3 * MiB)):
        assert offline_read(vm.a0, pattern, off, MiB)
    assert offline_read(b2, 0x33, 0, MiB)
    subprocess.run(["qemu-img", "check", str(vm.a0)], check=True, capture_output=True)


async def test_refusals_change_nothing(vm: VM, tmp_path: Path) -> None:
    m = vm.m
    wrong = tmp_path / "other.qcow2"
    qimg("create", "-q", "-f", "qcow2", str(wrong), DISK_SIZE)
    bad_a = overlay(wrong, tmp_path / "bad-a.qcow2")          # backing is not the active a0
    b1 = overlay(vm.b0, tmp_path / "b1.qcow2")
    nodes_before = {n["node-name"] for n in
                    await m.qmp.execute("query-named-block-nodes", {"flat": True})}
    with pytest.raises(LiveError, match="backing"):
        await live_take.live_snapshot(m, {"a": str(bad_a), "b": str(b1)}, None)
    with pytest.raises(LiveError):                        # every disk or none
        await live_take.live_snapshot(m, {"b": str(b1)}, None)
    nodes_after = {n["node-name"] for n in
                   await m.qmp.execute("query-named-block-nodes", {"flat": True})}
    assert nodes_after == nodes_before and m.status() == "running"
    with pytest.raises(LiveError):
        await block_jobs.commit_active(m, "a")                       # nothing below a0


async def test_restore_with_other_memory_size_fails_loudly(vm: VM) -> None:
    m, tmp = vm.m, vm.tmp
    a1, b1 = overlay(vm.a0, tmp / "a1.qcow2"), overlay(vm.b0, tmp / "b1.qcow2")
    snap = await live_take.live_snapshot(m, {"a": str(a1), "b": str(b1)}, str(tmp / "s.state"))
    await snap.wait_saved(timeout=60)
    await m.stop()
    wrong = MachineConfig(memory_mib=GUEST_MIB * 2, kernel=vm.config.kernel)
    ra, rb = overlay(vm.a0, tmp / "ra.qcow2"), overlay(vm.b0, tmp / "rb.qcow2")
    with pytest.raises(MachineError) as err:
        await migration.restore(tmp / "run2", wrong, {"a": str(ra), "b": str(rb)},
                           str(tmp / "s.state"))
    assert "mismatch" in str(err.value).lower() or "fail" in str(err.value).lower()
    leftover = QemuMachine(tmp / "run2", wrong, {"a": str(ra), "b": str(rb)})
    assert leftover.status() == "stopped"
    with pytest.raises(MachineError):
        await leftover.attach()


def test_live_vm_facade_keeps_one_connection_for_every_step(tmp_path: Path, kernel: str) -> None:
    """adapters.qemu.session.LiveVM, synchronous: start, attach, take with memory, wait, merge
    online both ways, stop -- the worker's whole drain on one QMP connection."""
    a0, b0 = tmp_path / "a0.qcow2", tmp_path / "b0.qcow2"
    for disk in (a0, b0):
        qimg("create", "-q", "-f", "qcow2", str(disk), DISK_SIZE)
    blob = tmp_path / "random.bin"                # non-zero RAM: the save takes a while
    blob.write_bytes(os.urandom(48 * MiB))
    config = MachineConfig(memory_mib=GUEST_MIB, kernel=kernel, extra_args=[
        "-device", f"loader,file={blob},addr=0x1000000,force-raw=on"])
    disks = {"a": str(a0), "b": str(b0)}
    run = tmp_path / "run"
    assert LiveVM.attach(run, config, disks) is None            # nothing runs there yet
    started = LiveVM.start(run, config, disks)
    try:
        pid = started.pid
        started.close()
        started.close()                                         # idempotent; QEMU runs on
        assert running_pid(run) == pid
        attached = LiveVM.attach(run, config, disks)
        assert attached is not None
        with attached as live:
            assert live.pid == pid and live.run_state() == "running"
            assert live.active_layers() == disks
            a1, b1 = overlay(a0, tmp_path / "a1.qcow2"), overlay(b0, tmp_path / "b1.qcow2")
            state = tmp_path / "mem" / "s.state"                # its folder is made by switch
            done = live.switch({"a": str(a1), "b": str(b1)}, str(state))
            assert done.method == "background-snapshot" and done.memory_error is None
            assert done.pause_ms is not None and 0 < done.pause_ms < 1000
            assert live.active_layers() == {"a": str(a1), "b": str(b1)}
            assert live.saving() == "background-snapshot"
            seen: list[float] = []
            saved = live.wait_saved(str(state), seen.append)
            assert saved.bytes == state.stat().st_size > 48 * MiB and saved.seconds > 0
            assert seen == [1.0] and live.saving() == "background-snapshot"  # the last save, completed
            assert live.cancel_save(str(state)) == "none" and state.exists()   # not QEMU's now
            # active commit of a1 into a0; again: a no-op, a1 has left the chain
            fractions: list[float] = []
            live.commit_online("a", str(a1), str(a0), fractions.append)
            assert live.active_layers()["a"] == str(a0)
            live.commit_online("a", str(a1), str(a0), fractions.append)
            # b0 <- b1 <- b2 (active): pull b1 up into b2; again: a no-op, b2's header names b0
            a2, b2 = overlay(a0, tmp_path / "a2.qcow2"), overlay(b1, tmp_path / "b2.qcow2")
            assert live.switch({"a": str(a2), "b": str(b2)}, None).method is None
            live.stream_online("b", str(b2), str(b0), fractions.append)
            assert live.active_layers()["b"] == str(b2) and qcow2.backing_file(b2) == str(b0)
            live.stream_online("b", str(b2), str(b0), fractions.append)
            assert all(0.0 <= f <= 1.0 for f in fractions)     # (empty layers: no progress)
            assert live.run_state() == "running"
            live.stop()
            assert running_pid(run) is None
            with pytest.raises(MachineError, match="closed"):
                live.run_state()
    finally:
        left = LiveVM.attach(run, config, disks)
        if left is not None:
            left.stop()
