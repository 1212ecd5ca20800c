"""Domain throughput on the embedded store (no side effects), printed as a table.

Targets (issue 2): >= 2,000 commands/s through the application on SQLite; loading a VM with
100,000 events <= 2x loading one with 100 (aggregate snapshots); taking a snapshot with 500
snapshots in the tree <= 1.5x taking one with a single snapshot.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from adapters.config import open_app
from adapters.storage import DataDir
from domain import commands as c


def app_in(tmp: str):  # type: ignore[no-untyped-def]
    data = DataDir.open(Path(tmp) / "home")
    return open_app(data, environ={})


def register(app) -> None:  # type: ignore[no-untyped-def]
    """The VM as `vm create` records it, without the disk checks (no file behind it).

    Takes below are of a stopped VM with no memory (`memory=False`): decided and saved only."""
    app.decide(c.RegisterVM("vm", host="bench", disks={"disk0": "/nonexistent/own.qcow2"}, config={}))


def commands_per_second(n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        app = app_in(tmp)
        register(app)
        app.decide(c.TakeSnapshot("vm", "base", memory=False))
        t = time.perf_counter()
        for i in range(n):  # rename: a full command round trip (load, decide, save)
            app.decide(c.RenameSnapshot("vm", "base" if i == 0 else f"n{i - 1}", f"n{i}"))
        return n / (time.perf_counter() - t)


def load_ms(events: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        app = app_in(tmp)
        register(app)
        app.decide(c.TakeSnapshot("vm", "base", memory=False))
        for i in range(events - 2):
            app.decide(c.RenameSnapshot("vm", "base" if i == 0 else f"n{i - 1}", f"n{i}"))
        samples = []
        for _ in range(20):
            fresh = app_in(tmp)  # a new process's view: no cache
            t = time.perf_counter()
            fresh.get_vm("vm")
            samples.append((time.perf_counter() - t) * 1000)
            fresh.close()
        return statistics.median(samples)


def take_ms(existing: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        app = app_in(tmp)
        register(app)
        for i in range(existing):
            app.decide(c.TakeSnapshot("vm", f"s{i}", memory=False))
        samples = []
        for i in range(100):
            t = time.perf_counter()
            app.decide(c.TakeSnapshot("vm", f"t{i}", memory=False))
            samples.append((time.perf_counter() - t) * 1000)
        return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    cps = commands_per_second(3000)
    small, large = load_ms(100), load_ms(args.events)
    take1, take500 = take_ms(1), take_ms(500)
    rows = [
        ("domain commands/s (SQLite)", f"{cps:,.0f}", ">= 2,000", cps >= 2000),
        ("load VM, 100 events (ms)", f"{small:.2f}", "", True),
        (f"load VM, {args.events:,} events (ms)", f"{large:.2f}", "", True),
        ("load ratio", f"{large / small:.2f}x", "<= 2x", large / small <= 2),
        ("take with 1 snapshot (ms)", f"{take1:.2f}", "", True),
        ("take with 500 snapshots (ms)", f"{take500:.2f}", "", True),
        ("take ratio 500 / 1", f"{take500 / take1:.2f}x", "<= 1.5x", take500 / take1 <= 1.5),
    ]
    print(f"{'measure':38} {'value':>12} {'target':>10}  ok")
    for name, value, target, ok in rows:
        print(f"{name:38} {value:>12} {target:>10}  {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
