"""Benchmark issue #3's targets through snaptree's real path (Service + worker), not the adapter.

    .venv/bin/python benchmarks/bench_live_service.py [--sizes 256,1024] [--takes 5] [--switches 5]
        [--savevm 3] [--migrates 3] [--restores 3] [--merge-mib 256] [--merge-reps 3] [--cp 5]
        [--dir DIR] [--keep] [--out FILE]

Everything goes through a `service.api.Service` on a temporary data directory: one VM per
RAM size (the bare-metal test guest of tests/guest, TCG, 1 vCPU, two 1 GiB qcow2 disks a and b)
created with `svc.handle(CreateVM(..., memory=MiB, cpus=1, kernel=...))` and started with
`svc.handle(StartVM(vm))`.  Half of guest RAM is preloaded with non-zero data first (zero pages
cost nothing to save): the VM's config carries no extra QEMU arguments, so the preload goes through QEMU's
gdbstub (HMP `gdbserver`, then GDB `M` packets writing 8 non-zero bytes into every 4 KiB page of
[16 MiB, 16 MiB + RAM/2)); the guest itself keeps rewriting 4 MiB.  Per VM, in this order:

1. `svc.handle(TakeSnapshot(vm, name), wait=False)` + `svc.settle(vm)` with memory, `--takes`
   times: guest pause = the node's `memory.pause_ms` (QEMU STOP/RESUME event timestamps), save =
   memory bytes / seconds.
2. Alternating, `--switches` times each: `TakeSnapshot(vm, name, memory=False)` (pause from the node)
   and the bare QMP sequence on the same QEMU (overlay files created beforehand with qemu-img,
   `stop`, `transaction` of `blockdev-snapshot-sync` mode=existing for both disks, `cont`, each
   command awaited in turn as a plain client does; pause from STOP/RESUME timestamps).  The bare
   overlays are committed back (active block-commit) so snaptree's view of the chain stays true.
3. HMP `savevm` on the VM's attached machine (`probe.hmp`), pause from STOP/RESUME; `delvm`.
4. Bare migration to a file of the same VM, stopped: `stop`, `migrate exec:cat > FILE`, wait for
   completion and for cat to exit, `cont`.  Bandwidth = file bytes / QEMU's total-time (the same
   clock snaptree's node memory uses).  The target is judged against this one; a live pre-copy of
   the running VM to a file is measured too and shown for reference.
5. Restore: `svc.handle(ApplySnapshot(vm, <last memory snapshot>), wait=False)` + `svc.settle(vm)`
   until the VM runs again.
6. (first size only) Online merge, --merge-reps runs per direction: a fresh current layer (a disk-only
   snapshot), write --merge-mib MiB into disk a through its device (HMP qemu-io), take a disk-only
   snapshot, write into another region of the new current layer, `DeleteSnapshot` (wait=False) +
   `svc.settle`: its one dependent is the running current, so the worker merges online.  The two
   regions are sized so the worker's plan (fewer bytes moved) picks block-stream ("pull-up") in
   one run and active block-commit ("commit-down") in the next, each moving --merge-mib MiB.
   Bytes moved = the MergeStarted event's bytes; seconds = delete + settle (the whole real path).
   Baseline: `cp FILE X && sync` of a file of the same size on the same filesystem (source in the
   page cache, like the merge's source layer).

Prints one markdown table (target and met/missed per row) and writes it to
benchmarks/results_live.md.  Every QEMU started is stopped in `finally`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.qemu import block_graph, block_jobs, hugepages, migration, qemu_img  # noqa: E402
from adapters.qemu.blockdev import node_name  # noqa: E402
from adapters.qemu.machine import QemuMachine  # noqa: E402
from domain import commands as c  # noqa: E402
from domain.definition import Accel  # noqa: E402
from domain.memory import Memory  # noqa: E402
from domain.names import vm_id  # noqa: E402
from service.api import Service  # noqa: E402
from service.bootstrap import open_service  # noqa: E402
from tests.guest import probe  # noqa: E402

_spec = importlib.util.spec_from_file_location("guest_build", ROOT / "tests/guest/build.py")
assert _spec is not None and _spec.loader is not None
guest_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guest_build)

MiB = 1 << 20
PRELOAD_AT = 16 * MiB          # above the guest's code, counter (2 MiB) and dirty region (4-8 MiB)
MERGE_REGION2 = 512 * MiB      # second write region of the merge runs (disk a is 1 GiB)
RESULTS = ROOT / "benchmarks" / "results_live.md"


# ------------------------------------------------------------------ helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(min(xs))}-{fmt.format(max(xs))}"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class LoadSampler:
    """The 1-minute load average every few seconds while the benchmark runs."""

    def __init__(self, every: float = 5.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(float(loadavg().split()[0]))
            self._stop.wait(every)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def event_time(e: dict[str, Any]) -> float:
    ts = e["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


async def pause_ms(m: QemuMachine, seq: int, timeout: float = 300) -> float:
    """STOP -> RESUME of QEMU's own events after `seq`, in ms."""
    stop = await m.wait_event("STOP", after=seq, timeout=timeout)
    resume = await m.wait_event("RESUME", after=seq, timeout=timeout)
    return (event_time(resume) - event_time(stop)) * 1000.0


def on_vm(svc: Service, vm: str, fn: Callable[[QemuMachine], Awaitable[Any]]) -> Any:
    """Run `fn(m)` with the VM's attached machine (QMP connection only for that call)."""
    async def go() -> Any:
        async with probe.attached(svc.data, svc.app.get_vm(vm)) as m:
            return await fn(m)

    return asyncio.run(go())


def stop_qemu(svc: Service, vm: str) -> None:
    """Quit the VM's QEMU (QMP `quit`, then signals) without recording anything: cleanup only."""
    live = svc.machines.attach(svc.app.get_vm(vm))
    if live is not None:
        live.stop()


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        kids += [int(k) for k in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return kids


class PidWatch:
    """When the VM's old QEMU exits and a new one appears (phases of an apply with memory)."""

    def __init__(self, svc: Service, vm: str, old_pid: int | None) -> None:
        self.svc, self.vm, self.old_pid = svc, vm, old_pid
        self.old_gone: float | None = None
        self.new_seen: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            if self.old_gone is None and (self.old_pid is None
                                          or not Path(f"/proc/{self.old_pid}").exists()):
                self.old_gone = now
            if self.new_seen is None:
                pid = self.svc.machines.pid(self.vm)
                if pid is not None and pid != self.old_pid:
                    self.new_seen = now
            self._stop.wait(0.005)

    def __enter__(self) -> "PidWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------ preload via gdbstub
def _gdb_packet(body: bytes) -> bytes:
    return b"$" + body + b"#" + b"%02x" % (sum(body) & 0xFF)


async def preload(m: QemuMachine, sock_path: Path, start: int, length: int) -> float:
    """Write 8 non-zero bytes into every 4 KiB page of [start, start+length) (guest-physical;
    the test guest runs without paging).  QEMU stops the VM while gdb is attached and resumes it
    on detach.  Returns seconds."""
    t0 = time.monotonic()
    out = await probe.hmp(m, f"gdbserver unix:{sock_path},server=on,wait=off")
    if "Waiting" not in out:
        raise RuntimeError(f"gdbserver: {out!r}")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(sock_path))
        addrs = range(start, start + length, 4096)
        batch = 512                       # replies of a batch (~3.5 KB) fit the socket buffers
        for i in range(0, len(addrs), batch):
            chunk = addrs[i:i + batch]
            s.sendall(b"".join(
                _gdb_packet(b"M%x,8:%s" % (a, ((a >> 12) | 0x0101010101010101).to_bytes(8, "little")
                                           .hex().encode()))
                for a in chunk))
            got = b""
            while got.count(b"#") < len(chunk):
                data = s.recv(65536)
                if not data:
                    raise RuntimeError("gdbstub closed the connection")
                got += data
            if b"$E" in got:
                raise RuntimeError(f"gdbstub refused a memory write: {got[:120]!r}")
        s.sendall(_gdb_packet(b"D"))
        s.recv(64)
    finally:
        s.close()
    await asyncio.sleep(0.2)
    if await m.query_status() != "running":
        await m.qmp.execute("cont")
    await probe.hmp(m, "gdbserver none")
    word = await probe.hmp(m, f"xp /1gx {start + length - 4096:#x}")
    if word.strip().endswith("0x0000000000000000"):
        raise RuntimeError(f"preload did not land: {word!r}")
    return time.monotonic() - t0


# ------------------------------------------------------------------ measurements
def memory_dict(mem: Memory | None) -> dict[str, Any]:
    """A node's typed memory as the plain values this benchmark reads (enums by their value)."""
    if mem is None:
        return {}
    return {"state": mem.state.value, "pause_ms": mem.pause_ms, "bytes": mem.bytes,
            "seconds": mem.seconds, "method": mem.method.value if mem.method else None}


def take(svc: Service, vm: str, name: str, *, memory: bool) -> dict[str, Any]:
    taken = svc.handle(c.TakeSnapshot(vm, name, memory=memory), wait=False)  # recorded only
    nid = taken.snapshot  # type: ignore[attr-defined]
    svc.settle(vm)
    mem = memory_dict(svc.app.get_vm(vm).nodes[nid].memory)
    want = "saved" if memory else "none"
    if mem.get("state") != want or mem.get("pause_ms") is None:
        raise RuntimeError(f"take {name}: memory {mem}")
    if memory:
        # QEMU's total-time of this save, read again now that it is over: QEMU 7.2 reports a
        # background snapshot "completed" a moment before it sets total-time, so the worker's
        # memory.seconds (read at that first "completed") can be 0.0.
        # QEMU's own "downtime" of the save is read here too (the worker does not record it).
        async def total_time(m: QemuMachine) -> tuple[float, Any]:
            info = await m.qmp.execute("query-migrate")
            return float(info.get("total-time", 0)) / 1000.0, info.get("downtime")

        mem["qemu_seconds"], mem["qemu_downtime_ms"] = on_vm(svc, vm, total_time)
    return mem


async def bare_switch(m: QemuMachine, work: Path, tag: str) -> float:
    """stop; transaction(blockdev-snapshot-sync x disks, pre-created overlays); cont -> pause ms.

    Then commit the bare overlays back (active block-commit), so QEMU writes into snaptree's
    current layers again."""
    layers = await block_graph.chains(m)
    actions, made = [], []
    for disk, chain in layers.items():
        top = chain[0]
        path = str(work / f"bare-{tag}-{disk}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", top.filename, "-F", "qcow2",
                        path], check=True, capture_output=True)
        made.append(path)
        actions.append({"type": "blockdev-snapshot-sync", "data": {
            "node-name": top.node, "snapshot-file": path,
            "snapshot-node-name": node_name(disk, path), "format": "qcow2", "mode": "existing"}})
    seq = m.event_seq
    await m.qmp.execute("stop")
    await m.qmp.execute("transaction", {"actions": actions})
    await m.qmp.execute("cont")
    pause = await pause_ms(m, seq)
    for disk, chain in layers.items():
        await block_jobs.commit_active(m, disk)
        now = (await block_graph.chain(m, disk))[0].filename
        if now != chain[0].filename:
            raise RuntimeError(f"bare overlay of {disk} not committed back: {now}")
    for path in made:
        os.unlink(path)
    return pause


async def savevm(m: QemuMachine, tag: str) -> tuple[float, float]:
    """HMP savevm: (pause ms from STOP/RESUME, wall s); the internal snapshot is deleted after."""
    await m.qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "background-snapshot", "state": False}]})
    seq = m.event_seq
    t0 = time.monotonic()
    out = await probe.hmp(m, f"savevm {tag}")
    wall = time.monotonic() - t0
    if out.strip():
        raise RuntimeError(f"savevm: {out.strip()}")
    pause = await pause_ms(m, seq)
    out = await probe.hmp(m, f"delvm {tag}")
    if out.strip():
        raise RuntimeError(f"delvm: {out.strip()}")
    return pause, wall


async def bare_migrate(m: QemuMachine, path: Path, stopped: bool = True) -> tuple[int, float, float]:
    """[stop;] migrate exec:cat > FILE; wait (and for cat's exit); cont -> (bytes, QEMU s, wall s).

    stopped=False: a plain live pre-copy of the running VM (QEMU's default 300 ms downtime
    limit), for a baseline whose migration thread competes with the running vCPU like snaptree's
    background snapshot does; the file then also holds re-sent pages."""
    await m.qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "background-snapshot", "state": False},
        {"capability": "pause-before-switchover", "state": False},
        {"capability": "events", "state": True}]})
    await m.qmp.execute("migrate-set-parameters", {"max-bandwidth": migration.MAX_BANDWIDTH,
                                                   "downtime-limit": 300})
    if stopped:
        await m.qmp.execute("stop")
    t0 = time.monotonic()
    await m.qmp.execute("migrate", {"uri": f"exec:exec cat > {shlex.quote(str(path))}"})
    assert m.pid is not None
    writers = children(m.pid)
    info = await migration.wait_save(m)
    while any(Path(f"/proc/{p}").exists() for p in writers):
        await asyncio.sleep(0.005)
    wall = time.monotonic() - t0
    total_ms = float(info.get("total-time", 0))
    for _ in range(100):      # QEMU 7.2 may say "completed" a moment before it sets total-time
        if total_ms > 0:
            break
        await asyncio.sleep(0.01)
        total_ms = float((await m.qmp.execute("query-migrate")).get("total-time", 0))
    seq = m.event_seq
    await m.qmp.execute("cont")
    await m.wait_event("RESUME", after=seq)
    size = path.stat().st_size
    path.unlink()
    return size, (total_ms / 1000.0) if total_ms > 0 else wall, wall


def write_disk(svc: Service, vm: str, disk: str, offset: int, nbytes: int, pattern: int) -> None:
    chunk = 32 * MiB

    async def go(m: QemuMachine) -> None:
        pos = 0
        while pos < nbytes:
            n = min(chunk, nbytes - pos)
            await probe.qemu_io(m, disk, f"write -P {pattern:#x} {offset + pos} {n}", timeout=120)
            pos += n

    on_vm(svc, vm, go)


def check_disk(svc: Service, vm: str, disk: str, offset: int, nbytes: int, pattern: int) -> None:
    """Read back 1 MiB at the start, middle and end of a written region."""
    async def go(m: QemuMachine) -> None:
        for at in (offset, offset + (nbytes // 2 // MiB) * MiB, offset + nbytes - MiB):
            await probe.qemu_io(m, disk, f"read -P {pattern:#x} {at} {MiB}", timeout=60)

    on_vm(svc, vm, go)


def merge_run(svc: Service, vm: str, tag: str, n_mib: int, want: str,
              before: Callable[[], None] | None = None) -> dict[str, Any]:
    """One online merge moving n_mib MiB; `want`: "pull-up" (block-stream) or "commit-down".
    `before` runs just before the timed delete (bench_merge.py writes the page cache back)."""
    n = n_mib * MiB
    r1, r2 = (n, n + MiB) if want == "pull-up" else (n + MiB, n)
    take(svc, vm, f"pre{tag}", memory=False)           # a fresh (empty) current layer
    write_disk(svc, vm, "a", 0, r1, 0x5A)
    take(svc, vm, f"mrg{tag}", memory=False)           # holds r1 bytes
    write_disk(svc, vm, "a", MERGE_REGION2, r2, 0xA5)  # the running current holds r2 bytes
    version = svc.app.get_vm(vm).version
    marks: list[float] = []

    def progress(name: str, what: str, fraction: float) -> None:
        if what.startswith("merge"):
            marks.append(time.monotonic())

    if before is not None:
        before()
    t0, wall0 = time.monotonic(), time.time()
    svc.handle(c.DeleteSnapshot(vm, f"mrg{tag}"), wait=False)
    svc.settle(vm, progress=progress)
    seconds = time.monotonic() - t0
    started = [e for e in svc.app.events.get(vm_id(vm), gt=version)
               if type(e).__name__ == "MergeStarted"]
    if len(started) != 1:
        raise RuntimeError(f"expected one MergeStarted, got {len(started)}")
    ev = started[0]
    completed = [e for e in svc.app.events.get(vm_id(vm), gt=version)
                 if type(e).__name__ == "MergeCompleted"]
    if not completed:
        raise RuntimeError("merge did not complete")
    # delete -> MergeCompleted recorded: the merge without removing the merged-away files after
    to_completed = completed[0].timestamp.timestamp() - wall0
    check_disk(svc, vm, "a", 0, r1, 0x5A)
    check_disk(svc, vm, "a", MERGE_REGION2, r2, 0xA5)
    return {"direction": ev.direction, "bytes": int(ev.bytes), "seconds": seconds,
            "to_completed": to_completed,
            "job_window": (marks[-1] - marks[0]) if len(marks) > 1 else None}


@contextlib.contextmanager
def huge_pages(mib: int) -> Iterator[None]:
    """Reserve `mib` MiB more of free 2 MiB huge pages for the benchmark (root); put the host's
    setting back afterwards."""
    knob = Path("/proc/sys/vm/nr_hugepages")
    before = int(knob.read_text())
    pool = hugepages.pool()
    need = mib // hugepages.PAGE_MIB
    if pool.free < need:
        knob.write_text(str(pool.total + need - pool.free))
        if hugepages.pool().free < need:
            raise RuntimeError(f"could not reserve {need} huge pages (free: {hugepages.pool().free})")
    try:
        yield
    finally:
        knob.write_text(str(before))


def cp_sync(work: Path, nbytes: int, reps: int) -> list[float]:
    """`cp SRC DST && sync` of nbytes (SRC written and synced beforehand, so in the page cache)."""
    src, dst = work / "cp-src.bin", work / "cp-dst.bin"
    block = bytes(range(1, 256)) * (MiB // 255 + 1)
    with open(src, "wb") as f:
        left = nbytes
        while left:
            k = min(left, MiB)
            f.write(block[:k])
            left -= k
        f.flush()
        os.fsync(f.fileno())
    subprocess.run(["sync"], check=True)
    secs = []
    for _ in range(reps):
        t0 = time.monotonic()
        subprocess.run(f"cp {shlex.quote(str(src))} {shlex.quote(str(dst))} && sync",
                       shell=True, check=True)
        secs.append(time.monotonic() - t0)
        dst.unlink()
        subprocess.run(["sync"], check=True)
    src.unlink()
    return secs


# ------------------------------------------------------------------ per VM
def bench_vm(svc: Service, work: Path, kernel: str, mib: int, args: argparse.Namespace,
             with_merge: bool, hugepages: bool = False) -> dict[str, Any]:
    vm = f"bench{mib}" + ("h" if hugepages else "")
    disks = []
    for d in ("a", "b"):
        path = work / "disks" / f"{vm}-{d}.qcow2"
        qemu_img.create_image(str(path), 1 << 30)
        disks.append(f"{d}={path}")
    svc.handle(c.CreateVM(vm, disk=tuple(disks), memory=mib, cpus=1, kernel=kernel, accel=Accel.TCG,
                          hugepages=hugepages))
    svc.handle(c.StartVM(vm))
    r: dict[str, Any] = {"mib": mib, "hugepages": hugepages}

    async def warm(m: QemuMachine) -> float:
        deadline = time.monotonic() + 60
        while await probe.read_counter(m) == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the guest does not run")
            await asyncio.sleep(0.05)
        return await preload(m, work / f"gdb-{mib}.sock", PRELOAD_AT, mib * MiB // 2)

    r["preload_s"] = on_vm(svc, vm, warm)
    log(f"{mib} MiB: VM running, {mib // 2} MiB preloaded in {r['preload_s']:.1f} s")

    # 1 + 3: live snapshots with memory
    mems = []
    for i in range(args.takes):
        # Each save and each bare migration starts with no dirty page cache behind it: neither
        # fsyncs, so a backlog of earlier writes would throttle whichever came later.
        os.sync()
        mems.append(take(svc, vm, f"mem{i}", memory=True))
        time.sleep(0.3)
    r["pause"] = [float(m["pause_ms"]) for m in mems]
    r["save_bytes"] = [int(m["bytes"]) for m in mems]
    r["dict_s"] = [float(m["seconds"]) for m in mems]
    r["dict_zero"] = sum(1 for x in r["dict_s"] if x <= 0)
    # memory.seconds when the worker recorded it, else QEMU's total-time read afterwards
    r["save_s"] = [d if d > 0 else float(m["qemu_seconds"]) for d, m in zip(r["dict_s"], mems)]
    r["save_bw"] = [b / MiB / s for b, s in zip(r["save_bytes"], r["save_s"])]
    r["method"] = sorted({str(m.get("method")) for m in mems})
    r["downtime"] = [m.get("qemu_downtime_ms") for m in mems]
    log(f"{mib} MiB: live+memory pauses ms {[round(p, 1) for p in r['pause']]}, "
        f"save MiB/s {[round(b) for b in r['save_bw']]}, method {r['method']}")

    # 2: disk-only take vs bare QMP sequence, alternating
    r["disk_pause"], r["bare_pause"] = [], []
    for i in range(args.switches):
        order = ("snaptree", "bare") if i % 2 == 0 else ("bare", "snaptree")
        for who in order:
            if who == "snaptree":
                r["disk_pause"].append(float(take(svc, vm, f"disk{i}", memory=False)["pause_ms"]))
            else:
                r["bare_pause"].append(on_vm(svc, vm, lambda m, i=i: bare_switch(m, work, f"{mib}-{i}")))
            time.sleep(0.2)
    log(f"{mib} MiB: disk-only pauses ms {[round(p, 1) for p in r['disk_pause']]}, "
        f"bare {[round(p, 1) for p in r['bare_pause']]}")

    # 1: savevm on the same VM
    r["savevm_pause"], r["savevm_wall"] = [], []
    for i in range(args.savevm):
        p, w = on_vm(svc, vm, lambda m, i=i: savevm(m, f"bench{i}"))
        r["savevm_pause"].append(p)
        r["savevm_wall"].append(w)
    log(f"{mib} MiB: savevm pauses ms {[round(p) for p in r['savevm_pause']]}")

    # 3: bare migrate of the stopped VM to a file
    r["mig_bytes"], r["mig_s"], r["mig_wall"] = [], [], []
    for i in range(args.migrates):
        os.sync()
        b, s, w = on_vm(svc, vm, lambda m, i=i: bare_migrate(m, work / f"bare-{mib}-{i}.state"))
        r["mig_bytes"].append(b)
        r["mig_s"].append(s)
        r["mig_wall"].append(w)
    r["mig_bw"] = [b / MiB / s for b, s in zip(r["mig_bytes"], r["mig_s"])]
    r["live_mig_bytes"], r["live_mig_s"] = [], []
    for i in range(args.migrates):
        os.sync()
        b, s, w = on_vm(svc, vm, lambda m, i=i: bare_migrate(m, work / f"live-{mib}-{i}.state",
                                                            stopped=False))
        r["live_mig_bytes"].append(b)
        r["live_mig_s"].append(s)
    r["live_mig_bw"] = [b / MiB / s for b, s in zip(r["live_mig_bytes"], r["live_mig_s"])]
    log(f"{mib} MiB: bare migrate MiB/s stopped {[round(b) for b in r['mig_bw']]}, "
        f"MiB {[round(b / MiB) for b in r['mig_bytes']]}; running {[round(b) for b in r['live_mig_bw']]}, "
        f"MiB {[round(b / MiB) for b in r['live_mig_bytes']]}")

    # 3: restore (apply with memory until the VM runs again)
    r["restore_s"], r["restore_old_stop_s"], r["restore_new_s"] = [], [], []
    snap = f"mem{args.takes - 1}"
    for _ in range(args.restores):
        old_pid = svc.machines.pid(vm)
        t0 = time.monotonic()
        with PidWatch(svc, vm, old_pid) as watch:
            svc.handle(c.ApplySnapshot(vm, snap), wait=False)
            svc.settle(vm)
            dt = time.monotonic() - t0
        if watch.old_gone is not None:
            r["restore_old_stop_s"].append(watch.old_gone - t0)
        if watch.new_seen is not None:
            r["restore_new_s"].append(t0 + dt - watch.new_seen)
        state = svc.handle(c.GetVMStatus(vm)).state  # type: ignore[attr-defined]
        if state != "running":
            raise RuntimeError(f"after apply of {snap} the VM is {state}")
        r["restore_s"].append(dt)
    log(f"{mib} MiB: restores s {[round(s, 2) for s in r['restore_s']]}")

    # 4: online merges
    if with_merge:
        r["merges"] = []
        for rep in range(args.merge_reps):
            for i, want in enumerate(("pull-up", "commit-down")):
                res = merge_run(svc, vm, f"{rep}x{i}", args.merge_mib, want)
                if res["direction"] != want:
                    raise RuntimeError(f"the worker chose {res['direction']}, expected {want}")
                r["merges"].append(res)
                log(f"{mib} MiB: merge {res}")
        r["cp_s"] = cp_sync(work, args.merge_mib * MiB, args.cp)
        log(f"cp+sync of {args.merge_mib} MiB: s {[round(s, 2) for s in r['cp_s']]}")

    on_vm(svc, vm, lambda m: m.stop())   # QMP quit, straight to QEMU (not a recorded StopVM)
    return r


# ------------------------------------------------------------------ report
def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> list[list[str]]:
    rows: list[list[str]] = []
    for r in results:
        mib = r["mib"]
        p, sv = med(r["pause"]), med(r["savevm_pause"])
        ratio = p / sv if sv else float("nan")
        snap = f"{p:.1f} ms (median of {len(r['pause'])}; {spread(r['pause'])})"
        base = f"`savevm` {sv:.0f} ms (median of {len(r['savevm_pause'])}; {spread(r['savevm_pause'], '{:.0f}')})"
        if mib == 256:
            rows.append([f"1. pause of a live snapshot with memory, {mib} MiB guest", snap, base,
                         f"1/{1 / ratio:.0f}", "<= 20 ms absolute", verdict(p <= 20.0)])
        elif mib == 1024:
            rows.append([f"1. pause of a live snapshot with memory, {mib} MiB guest", snap, base,
                         f"1/{1 / ratio:.0f}", "<= 1/100 of savevm", verdict(ratio <= 0.01)])
        else:
            rows.append([f"1. pause of a live snapshot with memory, {mib} MiB guest", snap, base,
                         f"1/{1 / ratio:.0f}", "-", "-"])
        d, b = med(r["disk_pause"]), med(r["bare_pause"])
        rows.append([f"2. stop -> overlays -> cont, disk-only take, {mib} MiB guest",
                     f"{d:.1f} ms (median of {len(r['disk_pause'])}; {spread(r['disk_pause'])})",
                     f"bare `stop`+`transaction`(blockdev-snapshot-sync)+`cont` {b:.1f} ms "
                     f"(median of {len(r['bare_pause'])}; {spread(r['bare_pause'])})",
                     f"{d / b:.2f}x", "<= 1.2x", verdict(d / b <= 1.2)])
        bw, mbw = med(r["save_bw"]), med(r["mig_bw"])
        rows.append([f"3. memory save, {mib} MiB guest ({', '.join(r['method'])})",
                     f"{bw:.0f} MiB/s: {med(r['save_bytes']) / MiB:.0f} MiB in {med(r['save_s']):.2f} s "
                     f"(median of {len(r['save_bw'])}; {spread(r['save_bw'], '{:.0f}')} MiB/s)",
                     f"bare `migrate exec:cat > FILE`, VM stopped: {mbw:.0f} MiB/s, "
                     f"{med(r['mig_bytes']) / MiB:.0f} MiB in {med(r['mig_s']):.2f} s (median of "
                     f"{len(r['mig_bw'])}; {spread(r['mig_bw'], '{:.0f}')} MiB/s). For reference, "
                     f"running (live pre-copy): {med(r['live_mig_bw']):.0f} MiB/s, "
                     f"{med(r['live_mig_bytes']) / MiB:.0f} MiB in {med(r['live_mig_s']):.2f} s "
                     f"({med(r['save_bw']) / med(r['live_mig_bw']):.2f}x)",
                     f"{bw / mbw:.2f}x", ">= 0.8x", verdict(bw / mbw >= 0.8)])
        if r["dict_zero"]:
            rows[-1][1] += (f"; memory[\"seconds\"] was 0.0 in {r['dict_zero']} of {len(r['dict_s'])}"
                            " takes: QEMU's total-time read after the save used there")
        rows.append([f"3. restore: apply with memory until running, {mib} MiB guest",
                     f"{med(r['restore_s']):.2f} s (median of {len(r['restore_s'])}; "
                     f"{spread(r['restore_s'], '{:.2f}')}); of which stopping the old QEMU "
                     f"{med(r['restore_old_stop_s']):.2f} s, new QEMU start -> wait returned "
                     f"{med(r['restore_new_s']):.2f} s", "-", "-", "(none)", "-"])
        for direction in ("pull-up", "commit-down"):
            runs = [mg for mg in r.get("merges", []) if mg["direction"] == direction]
            if not runs:
                continue
            cps = r["cp_s"]
            nbytes = med([mg["bytes"] for mg in runs])
            cp_bw = nbytes / MiB / med(cps)
            bws = [mg["bytes"] / MiB / mg["seconds"] for mg in runs]
            m_bw = med(bws)
            jobs = [mg["bytes"] / MiB / mg["job_window"] for mg in runs if mg.get("job_window")]
            done = [mg["bytes"] / MiB / mg["to_completed"] for mg in runs]
            job = (f"; delete -> MergeCompleted recorded (before the merged-away files are "
                   f"removed): {med(done):.0f} MiB/s = {med(done) / cp_bw:.2f}x cp")
            job += (f"; block job alone (first to last progress report): {med(jobs):.0f} MiB/s = "
                    f"{med(jobs) / cp_bw:.2f}x cp" if jobs else "")
            kind = "block-stream" if direction == "pull-up" else "active block-commit"
            rows.append([f"4. online merge of the running current, {direction} ({kind}), {mib} MiB guest",
                         f"{m_bw:.0f} MiB/s: {nbytes / MiB:.0f} MiB in "
                         f"{med([mg['seconds'] for mg in runs]):.2f} s (delete + wait, median of "
                         f"{len(runs)}; {spread(bws, '{:.0f}')} MiB/s{job})",
                         f"`cp FILE X && sync` of the same bytes: {cp_bw:.0f} MiB/s "
                         f"({med(cps):.2f} s, median of {len(cps)}; {spread(cps, '{:.2f}')} s)",
                         f"{m_bw / cp_bw:.2f}x", ">= 1.0x", verdict(m_bw / cp_bw >= 1.0)])
    rows.sort(key=lambda row: row[0].split(".")[0])     # by measure number, sizes in order
    return rows


def render(rows: list[list[str]]) -> str:
    head = ["measure (snaptree real path: Service + worker)", "snaptree", "baseline (same VM, same run)",
            "ratio", "target", "met?"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024", help="guest RAM sizes in MiB")
    ap.add_argument("--takes", type=int, default=5, help="live snapshots with memory per size")
    ap.add_argument("--switches", type=int, default=5, help="disk-only takes (and bare sequences)")
    ap.add_argument("--savevm", type=int, default=3)
    ap.add_argument("--migrates", type=int, default=3)
    ap.add_argument("--restores", type=int, default=3)
    ap.add_argument("--merge-mib", type=int, default=256)
    ap.add_argument("--merge-reps", type=int, default=3, help="online merges per direction")
    ap.add_argument("--cp", type=int, default=5, help="cp+sync repetitions")
    ap.add_argument("--dir", default=None, help="work directory (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.takes < 1 or args.merge_mib > 500:
        ap.error("--takes >= 1 and --merge-mib <= 500 (disk a is 1 GiB, region 2 starts at 512 MiB)")

    work = Path(args.dir or tempfile.mkdtemp(prefix="stbs-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    kernel = str(guest_build.build_guest(work / "guest"))
    svc = open_service(str(work / "home"), "benchhost", environ={})
    load_before = loadavg()
    t_start = time.monotonic()
    results: list[dict[str, Any]] = []
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        with LoadSampler() as sampler:
            for i, mib in enumerate(sizes):
                log(f"benchmarking a {mib} MiB guest ...")
                results.append(bench_vm(svc, work, kernel, mib, args, with_merge=(i == 0)))
    finally:
        for name in svc.app.vm_names():          # never leave a QEMU behind
            if svc.machines.pid(name) is not None:
                try:
                    stop_qemu(svc, name)
                except Exception as exc:  # noqa: BLE001
                    print(f"could not stop VM {name}: {exc}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - t_start
    load_after = loadavg()
    rows = table(results, args)
    md = render(rows)
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    samples = sampler.samples
    notes = [
        f"Command: `{cmd}` (cwd {ROOT}), {time.strftime('%Y-%m-%d %H:%M')}, {elapsed:.0f} s total.",
        f"Host: {os.cpu_count()} cores shared with other test runs, {platform.release()}, {qemu}, TCG, "
        f"1 vCPU, 2 qcow2 disks; guest = tests/guest test ELF, half of RAM preloaded non-zero via gdbstub.",
        f"Load average (1/5/15 min): before {load_before}, after {load_after}; 1-min load sampled every 5 s "
        f"during the run: min {min(samples):.2f}, median {med(samples):.2f}, max {max(samples):.2f}.",
        "Pauses are QEMU STOP->RESUME event timestamps; snaptree's come from the snapshot node's "
        "`memory[\"pause_ms\"]`, save bandwidth from its `memory[\"bytes\"] / memory[\"seconds\"]` "
        "(QEMU total-time), the bare migration's from file bytes / QEMU total-time.",
    ]
    raw = []
    for r in results:
        raw.append(f"{r['mib']} MiB raw: pause {[round(x, 1) for x in r['pause']]} ms "
                   f"(QEMU's own downtime {r['downtime']} ms); "
                   f"disk-only {[round(x, 1) for x in r['disk_pause']]} ms; bare {[round(x, 1) for x in r['bare_pause']]} ms; "
                   f"savevm {[round(x) for x in r['savevm_pause']]} ms (wall {[round(x, 2) for x in r['savevm_wall']]} s); "
                   f"save MiB/s {[round(x) for x in r['save_bw']]} (memory[\"seconds\"] {r['dict_s']}); bare migrate MiB/s stopped {[round(x) for x in r['mig_bw']]}, running {[round(x) for x in r['live_mig_bw']]} "
                   f"(wall incl. cat exit {[round(x, 2) for x in r['mig_wall']]} s); restore s {[round(x, 2) for x in r['restore_s']]} (old QEMU gone after {[round(x, 2) for x in r['restore_old_stop_s']]} s)"
                   + (f"; cp+sync s {[round(x, 2) for x in r['cp_s']]}" if "cp_s" in r else "")
                   + "".join(f"; merge {mg['direction']} {mg['bytes'] // MiB} MiB in {mg['seconds']:.2f} s"
                             f" (to MergeCompleted {mg['to_completed']:.2f} s, job window {mg['job_window'] or 0:.2f} s)"
                             for mg in r.get("merges", [])))
    text = "\n".join([md, "", *notes, "", *raw])
    print()
    print(text)
    out = Path(args.out)
    out.write_text("# Live VM benchmark through snaptree's real path (issue #3)\n\n" + text + "\n")
    print(f"\n(written to {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
