"""`audit verify` on a VM with many layers: the pure-Python structure check vs `--deep`.

    .venv/bin/python benchmarks/verify_speed.py [--snapshots 600] [--no-write] [--home DIR]

Builds one VM through the service in-process (real qemu-img layers; the default chain depth
bound flattens as it goes), writing 64 KiB of guest data before each take so that every layer
has an L2 table to scan, then times `verify` (best of 3) and `verify(deep=True)` (once: one
`qemu-img check` per layer). Target: fast verify of 600 nodes <= 2 s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from adapters.qemu import qemu_img, qemu_io
from domain import commands as c
from service.bootstrap import open_service
from service.verify import verify

VM = "vm"
SLOT = 64 * 1024
DISK = 64 * 1024 * 1024


def build(home: Path, snapshots: int, write: bool) -> int:
    svc = open_service(str(home / "home"), "benchhost", environ={})
    own = home / "own.qcow2"
    qemu_img.create_image(str(own), DISK)
    svc.handle(c.CreateVM(VM, disk=(str(own),)))
    started = time.perf_counter()
    for i in range(snapshots):
        if write:
            vm = svc.app.get_vm(VM)
            layer = vm.nodes[vm.current].layers["disk0"]
            qemu_io.write_pattern(layer, (i % (DISK // SLOT)) * SLOT, SLOT, i % 250 + 1)
        svc.handle(c.TakeSnapshot(VM, f"s{i}"))
        if (i + 1) % 100 == 0:
            print(f"  {i + 1} snapshots taken ({time.perf_counter() - started:.1f} s)", flush=True)
    return len(svc.app.get_vm(VM).nodes)


def timed(home: Path, deep: bool) -> tuple[float, int]:
    svc = open_service(str(home / "home"), "benchhost", environ={})
    started = time.perf_counter()
    report = verify(svc.app, svc.data, VM, deep=deep)
    return time.perf_counter() - started, len(report.findings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=600)
    parser.add_argument("--no-write", action="store_true", help="take snapshots of empty layers")
    parser.add_argument("--home", type=Path, help="build here (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="verify-speed-") as tmp:
        home = args.home or Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        print(f"building a VM with {args.snapshots} snapshots in {home} ...", flush=True)
        nodes = build(home, args.snapshots, write=not args.no_write)
        fast = [timed(home, deep=False) for _ in range(3)]
        deep = timed(home, deep=True)
    assert all(n == 0 for _, n in fast) and deep[1] == 0, "the VM should verify clean"
    print()
    print("| nodes | verify fast (s) | verify --deep (s) |")
    print("|------:|----------------:|------------------:|")
    print(f"| {nodes} | {min(t for t, _ in fast):.3f} | {deep[0]:.3f} |")


if __name__ == "__main__":
    main()
