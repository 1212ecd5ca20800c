"""Bounded chains: what a long linear history costs with the depth policy on (issue 10 item 8).

A stopped VM gets N snapshots, a 4 KiB block written into its current layer before each take
(so every layer holds data). At checkpoints it prints: the current state's chain depth, the
time of 2,000 random 4 KiB reads through the current layer (one `qemu-io` process, like a guest
reading its disk), the wall time of one more `snaptree snapshot take` (a CLI process, as a
user runs it) and of `snaptree audit verify`. Depth 1 is the baseline of the read column.

    .venv/bin/python benchmarks/chain_depth.py [--snapshots 600] [--max-depth 16]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters.qemu import qemu_img  # noqa: E402
from domain import commands as c  # noqa: E402
from domain.tree import chain_depth  # noqa: E402
from service.bootstrap import open_service  # noqa: E402

DISK = 64 << 20
READS = 2000


def random_reads(path: str, seed: int = 1) -> float:
    """The best of 5 runs (the machine's noise is of the order of the difference measured)."""
    rng = random.Random(seed)
    cmds: list[str] = []
    for _ in range(READS):
        cmds += ["-c", f"read {rng.randrange(DISK // 4096) * 4096} 4k"]
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run(["qemu-io", "-U", "-r", "-f", "qcow2", *cmds, path], check=True, capture_output=True)
        runs.append(time.perf_counter() - start)
    return min(runs)


def cli(home: str, *args: str) -> float:
    env = dict(os.environ, SNAPTREE_HOME=home)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "adapters.cli", *args], check=True, capture_output=True,
                   env=env, cwd=ROOT)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--snapshots", type=int, default=600)
    ap.add_argument("--max-depth", type=int, default=16)
    args = ap.parse_args()
    checkpoints = sorted({1, 2, 8, 16, 100, 300, args.snapshots} - {0})
    checkpoints = [n for n in checkpoints if n <= args.snapshots]
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="snaptree-depth-") as tmp:
        home = os.path.join(tmp, "home")
        own = os.path.join(tmp, "own.qcow2")
        qemu_img.create_image(own, DISK)
        svc = open_service(home, os.uname().nodename, environ={})
        svc.handle(c.CreateVM("vm", disk=(own,), max_chain_depth=args.max_depth))
        rows = []
        base_read = None
        for i in range(1, args.snapshots + 1):
            vm = svc.app.get_vm("vm")
            layer = vm.nodes[vm.current].layers["disk0"]
            off = rng.randrange(DISK // 4096) * 4096
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {i % 250 + 1} {off} 4k", layer],
                           check=True, capture_output=True)
            svc.handle(c.TakeSnapshot("vm", f"s{i}"))
            if i in checkpoints:
                vm = svc.app.get_vm("vm")
                depth = chain_depth(vm.nodes, vm.current)
                reads = random_reads(vm.nodes[vm.current].layers["disk0"])
                base_read = base_read or reads
                take = cli(home, "snapshot", "take", "vm", f"extra{i}")
                verify = cli(home, "audit", "verify", "vm")
                svc.app._evict(vm.id)  # the CLI recorded events: read the VM again
                rows.append((i, len(svc.app.get_vm("vm").nodes), depth, reads, reads / base_read, take, verify))
        print(f"max_chain_depth {args.max_depth}; {READS} random 4 KiB reads through the current layer")
        print(f"{'snapshots':>9} {'nodes':>6} {'depth':>5} {'reads s':>8} {'x depth1':>8} {'take s':>7} {'verify s':>8}")
        for n, nodes, depth, reads, ratio, take, verify in rows:
            print(f"{n:>9} {nodes:>6} {depth:>5} {reads:>8.3f} {ratio:>8.2f} {take:>7.2f} {verify:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
