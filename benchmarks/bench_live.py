"""Benchmark: guest pause of live_snapshot vs HMP savevm, memory-save bandwidth.

    python benchmarks/bench_live.py [--sizes 256,1024] [--reps 3] [--dir DIR]

One VM per RAM size (the bare-metal test guest, TCG, two qcow2 disks), half
of its RAM preloaded with random bytes (zero pages cost nothing to save) and
4 MiB rewritten continuously by the guest.  On that same VM, in order:

  live (memory)   live_snapshot with memory: guest pause from QEMU's STOP/RESUME
                  event timestamps; save time from `migrate` to the writer's exit
  live (disks)    live_snapshot without memory
  savevm          HMP savevm (internal snapshot incl. vmstate in disk a's active
                  layer): STOP/RESUME pause
  bare migrate    stop; migrate exec:cat > FILE; wait; cont  (plain pre-copy
                  stream of the stopped VM: the bandwidth baseline)
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.qemu import block_graph, live_take, migration  # noqa: E402
from adapters.qemu.hardware import MachineConfig  # noqa: E402
from adapters.qemu.machine import QemuMachine  # noqa: E402
from tests.guest import probe  # noqa: E402

_spec = importlib.util.spec_from_file_location("guest_build", ROOT / "tests/guest/build.py")
guest_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guest_build)

MiB = 1 << 20


def qimg(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def stats(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        kids += [int(k) for k in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return kids


async def pause_of(m: QemuMachine, seq: int) -> float:
    stop = await m.wait_event("STOP", after=seq, timeout=600)
    resume = await m.wait_event("RESUME", after=seq, timeout=600)
    t = lambda e: e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6  # noqa: E731
    return (t(resume) - t(stop)) * 1000.0


async def first_progress_ms(m: QemuMachine) -> float:
    """Time until the guest's heartbeat moves again (write-fault stalls)."""
    t0 = time.monotonic()
    c0 = await probe.read_counter(m)
    while await probe.read_counter(m) == c0:
        if time.monotonic() - t0 > 30:
            break
    return (time.monotonic() - t0) * 1000.0


async def bench_size(mib: int, reps: int, work: Path, kernel: str) -> list[dict]:
    d = work / f"vm{mib}"
    d.mkdir(parents=True, exist_ok=True)
    blob = d / "random.bin"
    with open(blob, "wb") as f:
        for _ in range(mib // 2):
            f.write(os.urandom(MiB))
    disks = {}
    for name in ("a", "b"):
        qimg("create", "-q", "-f", "qcow2", str(d / f"{name}0.qcow2"), "1G")
        disks[name] = str(d / f"{name}0.qcow2")
    cfg = MachineConfig(memory_mib=mib, kernel=kernel, extra_args=[
        "-device", f"loader,file={blob},addr=0x1000000,force-raw=on"])
    m = QemuMachine(d / "run", cfg, disks)
    await m.start()
    rows: list[dict] = []
    try:
        while await probe.read_counter(m) == 0:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        gen = 0

        async def new_overlays() -> dict[str, str]:
            nonlocal gen
            gen += 1
            out = {}
            for disk in ("a", "b"):
                top = (await block_graph.chain(m, disk))[0].filename
                ov = d / f"{disk}{gen}.qcow2"
                qimg("create", "-q", "-f", "qcow2", "-b", top, "-F", "qcow2", str(ov))
                out[disk] = str(ov)
            return out

        # live snapshot with memory
        pauses, downs, rates, stalls, sizes, secs, phases = [], [], [], [], [], [], []
        for i in range(reps):
            ovs = await new_overlays()
            state = d / f"mem{i}.state"
            snap = await live_take.live_snapshot(m, ovs, str(state))
            stalls.append(await first_progress_ms(m))
            size, seconds = await snap.wait_saved(timeout=600)
            pauses.append(snap.pause_ms)
            downs.append(float(snap.qemu_downtime_ms or 0))
            sizes.append(size / MiB)
            secs.append(seconds)
            rates.append(size / MiB / seconds)
            phases.append(snap.timeline)
            state.unlink()
            await asyncio.sleep(0.3)
        rows.append(dict(ram=mib, what=f"live_snapshot+memory ({snap.method})",
                         pause=stats(pauses), down=stats(downs), mib=stats(sizes),
                         secs=stats(secs), rate=stats(rates), stall=stats(stalls)))
        print(f"  {mib} MiB live phases (ms after STOP): {phases}", flush=True)

        # live snapshot, disks only
        pauses = []
        for _ in range(reps):
            snap = await live_take.live_snapshot(m, await new_overlays(), None)
            pauses.append(snap.pause_ms)
        rows.append(dict(ram=mib, what="live_snapshot disks only", pause=stats(pauses)))

        # savevm on the same VM (internal snapshot; vmstate goes into disk a's top)
        pauses, secs = [], []
        for i in range(max(1, reps - 1)):
            seq = m.event_seq
            t0 = time.monotonic()
            out = await probe.hmp(m, f"savevm bench{i}")
            secs.append(time.monotonic() - t0)
            assert not out.strip(), out
            pauses.append(await pause_of(m, seq))
        rows.append(dict(ram=mib, what="HMP savevm", pause=stats(pauses), secs=stats(secs)))

        # bare pre-copy migrate of the stopped VM to a file
        await m.qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "background-snapshot", "state": False},
            {"capability": "pause-before-switchover", "state": False},
            {"capability": "events", "state": True}]})
        await m.qmp.execute("migrate-set-parameters", {"max-bandwidth": migration.MAX_BANDWIDTH})
        rates, sizes, secs = [], [], []
        for i in range(max(1, reps - 1)):
            state = d / f"bare{i}.state"
            await m.qmp.execute("stop")
            seq = m.event_seq
            t0 = time.monotonic()
            await m.qmp.execute("migrate", {"uri": f"exec:exec cat > {state}"})
            writers = children(m.pid)
            await migration.wait_save(m)
            while any(Path(f"/proc/{p}").exists() for p in writers):   # cat flushed
                await asyncio.sleep(0.005)
            seconds = time.monotonic() - t0
            await m.qmp.execute("cont")
            size = state.stat().st_size
            sizes.append(size / MiB)
            secs.append(seconds)
            rates.append(size / MiB / seconds)
            state.unlink()
            await m.wait_event("RESUME", after=seq)
        rows.append(dict(ram=mib, what="bare migrate exec:cat (VM stopped)",
                         pause="= save time", mib=stats(sizes), secs=stats(secs),
                         rate=stats(rates)))
    finally:
        await m.stop()
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="snaptree-bench-"))
    kernel = str(guest_build.build_guest(work / "guest"))
    rows = []
    for mib in (int(s) for s in args.sizes.split(",")):
        print(f"benchmarking {mib} MiB ...", flush=True)
        rows += await bench_size(mib, args.reps, work, kernel)
    cols = [("ram", "RAM MiB"), ("what", "operation"), ("pause", "guest pause ms min/med/max"),
            ("down", "QEMU downtime ms"), ("stall", "heartbeat stall after resume ms"),
            ("mib", "state MiB"), ("secs", "save s"), ("rate", "save MiB/s")]
    table = [[str(r.get(k, "")) for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, (_, h) in enumerate(cols)]
    print()
    print(" | ".join(h.ljust(w) for (_, h), w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for t in table:
        print(" | ".join(c.ljust(w) for c, w in zip(t, widths)))
    print(f"\n(qemu 7.2 TCG, {os.cpu_count()} host cores, work dir {work})")


if __name__ == "__main__":
    asyncio.run(main())
