"""How long a `snaptree` command takes as a user runs it: the whole process, start-up included.

Each measure is the median wall time of --runs fresh processes of the installed entry point
(`.venv/bin/snaptree`, beside this Python; `python -m adapters.cli` only where it is missing, and
the table says so), against the embedded default (SQLite in a new data directory, no
configuration). VMs are stopped: what is timed is the Python side of each verb, which is also the
floor of the same verb on a running VM (issue 13: a running VM's `snapshot take` with memory must
return within libvirt's live external snapshot, benchmarks/bench_libvirt.py).

    .venv/bin/python benchmarks/bench_cli.py [--runs 11] [--big 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tables  # noqa: E402

HEAD = ["measure", "value", "target", "met?"]
PACKAGES = ("domain", "adapters", "projections", "service", "workers")


def entry_point() -> tuple[list[str], str]:
    script = Path(sys.executable).parent / "snaptree"
    if script.exists():
        return [str(script)], "snaptree"
    return [sys.executable, "-m", "adapters.cli"], "python -m adapters.cli"


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SNAPTREE_", "SQLITE_", "POSTGRES_", "PERSISTENCE_"))}
    env.update(SNAPTREE_HOME=str(home), SNAPTREE_HOST="bench")
    return env


class Bench:
    def __init__(self, base: Path, runs: int) -> None:
        self.base, self.runs = base, runs
        self.home = base / "data"
        self.env = clean_env(self.home)
        self.cmd, self.how = entry_point()

    def run(self, *args: str) -> float:
        start = time.perf_counter()
        res = subprocess.run([*self.cmd, *args], env=self.env, cwd=self.base, capture_output=True, text=True)
        took = time.perf_counter() - start
        if res.returncode != 0:
            raise RuntimeError(f"snaptree {' '.join(args)} -> {res.returncode}: {res.stderr.strip()}")
        return took

    def median(self, args: Callable[[int], list[str]], warmup: int = 1) -> float:
        for i in range(warmup):
            self.run(*args(-1 - i))
        return statistics.median(self.run(*args(i)) for i in range(self.runs))

    def vm(self, name: str, snapshots: int) -> None:
        disk = self.base / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
        self.run("vm", "create", name, "--disk", str(disk))
        if snapshots <= 5:
            for i in range(snapshots):
                self.run("snapshot", "take", name, f"s{i}")
        else:  # in one process: 500 CLI runs would take minutes
            from domain import commands as c
            from service.bootstrap import open_service

            svc = open_service(str(self.home), "bench", environ=self.env)
            for i in range(snapshots):
                svc.handle(c.TakeSnapshot(name, f"s{i}", memory=False))
        self.run("tree", name)  # the views catch up once, as after any change


def compiled() -> None:
    """Bytecode for snaptree's modules and its dataclasses' methods, as scripts/setup.sh makes
    them (PYTHONDONTWRITEBYTECODE would otherwise have every process compile what changed since)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", *PACKAGES], cwd=ROOT, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "adapters.cli.dataclass_cache"], cwd=ROOT, check=True,
                   capture_output=True)


def row(measure: str, seconds: float, target: float | None) -> list[str]:
    if target is None:
        return [measure, f"{seconds * 1000:.0f} ms", "-", "-"]
    return [measure, f"{seconds * 1000:.0f} ms", f"<= {target * 1000:.0f} ms",
            "yes" if seconds <= target else "no"]


def rows(runs: int = 11, big: int = 500) -> list[list[str]]:
    """[measure, value, target, met?] for each verb: medians of `runs` processes each."""
    compiled()
    with tempfile.TemporaryDirectory(prefix="snaptree-bench-cli-") as tmp:
        b = Bench(Path(tmp), runs)
        b.vm("few", 3)
        b.vm("big", big)
        how = b.how
        out = [
            row(f"`{how} --help`", b.median(lambda i: ["--help"]), 0.100),
            row(f"`{how} tree VM`, 3 snapshots", b.median(lambda i: ["tree", "few"]), 0.150),
            row(f"`{how} tree VM`, {big} snapshots", b.median(lambda i: ["tree", "big"]), None),
            row(f"`{how} vm status VM` (stopped)", b.median(lambda i: ["vm", "status", "few"]), None),
            row(f"`{how} snapshot take VM NAME` (stopped VM)",
                b.median(lambda i: ["snapshot", "take", "few", f"t{i}"]), None),
            # Each deletes a snapshot taken above; it has one child, so its layer merges (stopped VM).
            row(f"`{how} snapshot delete VM NAME` (stopped VM, one child)",
                b.median(lambda i: ["snapshot", "delete", "few", f"t{i}"], warmup=0), None),
        ]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=11, help="processes per measure (median)")
    ap.add_argument("--big", type=int, default=500, help="snapshots of the large VM")
    args = ap.parse_args()
    print(tables.plain(HEAD, rows(args.runs, args.big)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
