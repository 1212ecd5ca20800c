"""Merge bandwidth through snaptree's real path, online and offline, against `cp FILE X && sync`.

    .venv/bin/python benchmarks/bench_merge.py [--mib 256] [--reps 5] [--cli-mib 64] [--cli-reps 5]
        [--dir DIR] [--keep]

One data directory, two VMs (the bare-metal test guest of tests/guest, TCG, 256 MiB RAM):
`online` runs (disks a and b, 1 GiB each), `offline` is stopped (disk a). Each round, for each
direction: the online merge (`bench_live_service.merge_run`: data written through the running
disk device, `DeleteSnapshot` + `settle`; block-stream or active block-commit), one `cp`+`sync`,
the offline merge (data written into the layer files with qemu-io; qemu-img rebase or commit
through the worker), one `cp`+`sync` — interleaved, so a slow minute of the machine hits both.
The regions are sized so the plan picks the wanted direction and moves --mib MiB (data on both
sides of the merge). Bandwidth = the MergeStarted event's bytes / (delete + settle). Baseline:
`cp SRC DST && sync` of the same bytes in the same data directory, SRC in the page cache.
Before every timed merge and every timed copy the page cache is written back (`sync`), so
neither side pays for the other's (or the set-up's) dirty data. On the shared CI host the disk
and CPU swing 3x within a run (every row, cp+sync too, ran 2-3x slower after the first round of
~1.5 GB written): read the ratios of one run, never absolute figures across runs.

Then, on the running VM, `snaptree snapshot delete VM SNAP` with --cli-mib MiB on each side (the
libvirt comparison's row), as whole CLI processes, against `snaptree vm status VM` (the CLI floor:
process start, imports, one aggregate load), interleaved.

`rows()` returns [measure, value, baseline, ratio, target, met?] for run_all.py.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import bench_live_service as bls  # noqa: E402
from adapters.qemu import qemu_img  # noqa: E402
from domain import commands as c  # noqa: E402
from domain.definition import Accel  # noqa: E402
from domain.names import vm_id  # noqa: E402
from service.api import Service  # noqa: E402
from service.bootstrap import open_service  # noqa: E402

MiB = 1 << 20
DIRECTIONS = ("pull-up", "commit-down")
log, med = bls.log, bls.med


def sync() -> None:
    subprocess.run(["sync"], check=True)


def current_layer(svc: Service, vm: str, disk: str) -> str:
    agg = svc.app.get_vm(vm)
    return agg.nodes[agg.current].layers[disk]


def qemu_io(path: str, cmd: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, path], check=True, capture_output=True)


def offline_merge(svc: Service, vm: str, tag: str, n_mib: int, want: str, run: int) -> dict[str, Any]:
    """run_all.offline_merge_run with the page cache written back before the timed delete. Each
    run writes its own byte pattern: `qemu-img rebase` skips clusters that already read the same."""
    p1, p2 = (0x11 + 2 * run) & 0xFF, (0x91 + 2 * run) & 0xFF
    n = n_mib * MiB
    r1, r2 = (n, n + MiB) if want == "pull-up" else (n + MiB, n)
    svc.handle(c.TakeSnapshot(vm, f"pre{tag}", memory=False), wait=False)
    svc.settle(vm)
    qemu_io(current_layer(svc, vm, "a"), f"write -P {p1:#x} 0 {r1}")
    svc.handle(c.TakeSnapshot(vm, f"mrg{tag}", memory=False), wait=False)
    svc.settle(vm)
    qemu_io(current_layer(svc, vm, "a"), f"write -P {p2:#x} {bls.MERGE_REGION2} {r2}")
    version = svc.app.get_vm(vm).version
    sync()
    t0 = time.monotonic()
    svc.handle(c.DeleteSnapshot(vm, f"mrg{tag}"), wait=False)
    svc.settle(vm)
    seconds = time.monotonic() - t0
    events = list(svc.app.events.get(vm_id(vm), gt=version))
    started = [e for e in events if type(e).__name__ == "MergeStarted"]
    if len(started) != 1 or not any(type(e).__name__ == "MergeCompleted" for e in events):
        raise RuntimeError(f"offline merge {tag}: {[type(e).__name__ for e in events]}")
    top = current_layer(svc, vm, "a")
    for at in (0, r1 - MiB):
        qemu_io(top, f"read -P {p1:#x} {at} {MiB}")
    for at in (bls.MERGE_REGION2, bls.MERGE_REGION2 + r2 - MiB):
        qemu_io(top, f"read -P {p2:#x} {at} {MiB}")
    return {"direction": started[0].direction, "bytes": int(started[0].bytes), "seconds": seconds}


def cp_once(work: Path, nbytes: int) -> float:
    """One `cp SRC DST && sync` (bench_live_service.cp_sync: SRC written, synced, in the cache)."""
    sync()
    return bls.cp_sync(work, nbytes, 1)[0]


def cli_env(svc: Service) -> dict[str, str]:
    return dict(os.environ, SNAPTREE_HOME=str(svc.data.root))


def cli(svc: Service, *args: str) -> float:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "adapters.cli", *args], capture_output=True, text=True,
                       env=cli_env(svc), cwd=ROOT)
    secs = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"snaptree {' '.join(args)}: {p.stderr.strip()}")
    return secs


def cli_delete(svc: Service, vm: str, tag: str, n_mib: int) -> tuple[float, float]:
    """The libvirt comparison's row: --cli-mib MiB on each side, `snapshot delete` of the running
    VM's snapshot whose one child is the current state, as a CLI process; then the CLI floor."""
    n = n_mib * MiB
    bls.take(svc, vm, f"cpre{tag}", memory=False)
    bls.write_disk(svc, vm, "a", 0, n, 0x3C)
    bls.take(svc, vm, f"cmrg{tag}", memory=False)
    bls.write_disk(svc, vm, "a", bls.MERGE_REGION2, n, 0xC3)
    sync()
    secs = cli(svc, "snapshot", "delete", vm, f"cmrg{tag}")
    bls.check_disk(svc, vm, "a", 0, n, 0x3C)
    bls.check_disk(svc, vm, "a", bls.MERGE_REGION2, n, 0xC3)
    floor = cli(svc, "vm", "status", vm)
    return secs, floor


def measure(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    kernel = str(bls.guest_build.build_guest(work / "guest"))
    svc = open_service(str(work / "home"), "benchhost", environ={})
    out: dict[str, Any] = {"online": [], "offline": [], "cp": [], "cli": [], "load": bls.loadavg()}
    try:
        disks = []
        for d in ("a", "b"):
            path = work / "disks" / f"online-{d}.qcow2"
            qemu_img.create_image(str(path), 1 << 30)
            disks.append(f"{d}={path}")
        svc.handle(c.CreateVM("online", disk=tuple(disks), memory=256, cpus=1, kernel=kernel,
                              accel=Accel.TCG))
        svc.handle(c.StartVM("online"))
        off = work / "disks" / "offline-a.qcow2"
        qemu_img.create_image(str(off), 1 << 30)
        svc.handle(c.CreateVM("offline", disk=(f"a={off}",)))
        nbytes = args.mib * MiB
        for rep in range(args.reps):
            for i, want in enumerate(DIRECTIONS):
                tag = f"{rep}x{i}"
                sync()
                on = bls.merge_run(svc, "online", tag, args.mib, want, before=sync)
                out["cp"].append(cp_once(work / "home", nbytes))
                offr = offline_merge(svc, "offline", tag, args.mib, want, run=2 * rep + i)
                out["cp"].append(cp_once(work / "home", nbytes))
                for kind, res in (("online", on), ("offline", offr)):
                    if res["direction"] != want:
                        raise RuntimeError(f"{kind}: the worker chose {res['direction']}, expected {want}")
                    out[kind].append(res)
                log(f"{want}: online {on['seconds']:.2f} s, offline {offr['seconds']:.2f} s, "
                    f"cp+sync {out['cp'][-2]:.2f} / {out['cp'][-1]:.2f} s")
        for rep in range(args.cli_reps):
            out["cli"].append(cli_delete(svc, "online", str(rep), args.cli_mib))
            log(f"CLI delete {out['cli'][-1][0]:.2f} s, floor {out['cli'][-1][1]:.2f} s")
    finally:
        if svc.machines.pid("online") is not None:
            bls.stop_qemu(svc, "online")
    out["load_after"] = bls.loadavg()
    return out


def table(res: dict[str, Any], args: argparse.Namespace) -> list[list[str]]:
    rows: list[list[str]] = []
    cps = res["cp"]
    for kind, label in (("online", "online (running VM, block job)"), ("offline", "offline (stopped VM, qemu-img)")):
        for direction in DIRECTIONS:
            mine = [m for m in res[kind] if m["direction"] == direction]
            if not mine or not cps:
                continue
            nbytes = med([m["bytes"] for m in mine])
            cp_bw = nbytes / MiB / med(cps)
            bws = [m["bytes"] / MiB / m["seconds"] for m in mine]
            ratio = med(bws) / cp_bw
            rows.append([f"merge {label}, {direction}",
                         f"{med(bws):.0f} MiB/s ({nbytes / MiB:.0f} MiB, median of {len(bws)}; "
                         f"{min(bws):.0f}-{max(bws):.0f})",
                         f"cp+sync {cp_bw:.0f} MiB/s (median of {len(cps)}; {min(cps):.2f}-{max(cps):.2f} s)",
                         f"{ratio:.2f}x", ">= 1.0x cp+sync", "met" if ratio >= 1.0 else "**missed**"])
    if res["cli"]:
        dels, floors = [d for d, _ in res["cli"]], [f for _, f in res["cli"]]
        rows.append([f"`snapshot delete` with one child, running ({args.cli_mib}+{args.cli_mib} MiB), CLI wall",
                     f"{med(dels):.2f} s (median of {len(dels)}; {min(dels):.2f}-{max(dels):.2f})",
                     f"CLI floor (`vm status`) {med(floors):.2f} s: work {med(dels) - med(floors):.2f} s",
                     "-", "<= 1.0x libvirt (bench_libvirt.py)", "-"])
    return rows


def rows(mib: int = 256, reps: int = 5, cli_mib: int = 64, cli_reps: int = 5) -> list[list[str]]:
    """The merge rows for run_all.py (a temporary work directory, removed afterwards)."""
    args = argparse.Namespace(mib=mib, reps=reps, cli_mib=cli_mib, cli_reps=cli_reps)
    work = Path(tempfile.mkdtemp(prefix="stmerge-")).resolve()
    try:
        return table(measure(work, args), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="MiB moved by each merge (<= 500)")
    ap.add_argument("--reps", type=int, default=5, help="rounds (each: both directions, online and offline)")
    ap.add_argument("--cli-mib", type=int, default=64)
    ap.add_argument("--cli-reps", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="stmerge-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        res = measure(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(bls.render(table(res, args)))
    print(f"\n{time.monotonic() - t0:.0f} s; load average before {res['load']}, after {res['load_after']}")
    print("raw: " + "; ".join(f"{k} {[round(m['seconds'], 3) for m in res[k]]}" for k in ("online", "offline"))
          + f"; cp {[round(x, 3) for x in res['cp']]}; cli {[(round(a, 2), round(b, 2)) for a, b in res['cli']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
