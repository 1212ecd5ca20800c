"""Projections and audit replay: the issue's targets, measured on the embedded SQLite store.

    .venv/bin/python benchmarks/bench_audit.py [--events 100000] [--home DIR]

Builds a VM with 500 snapshots and enough renames to make `--events` events in its history, plus
a few smaller VMs, then prints one table:
- `tree` of the 500-snapshot VM read from the view (after the catch-up check), target <= 20 ms;
- replay from the events alone (raw rows, decode, `mutate`), target >= 100,000 events/s;
- rebuild of every view from the first notification;
- any VM's tree at a random past version (aggregate snapshot + events), target <= 50 ms.
No disk work: the histories are decisions only (a replay needs no file).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from adapters.config import open_app
from adapters.storage import DataDir
from domain import commands as c
from domain.application import Snaptree
from domain.errors import Refused
from domain.names import vm_id
from domain.vm import VirtualMachine
from projections.decoding import Decoder, fold
from projections.event_store import event_chunks
from projections.read import read_tree, runner_for
from projections.replay import tree_at

BIG = "big"
SNAPSHOTS = 500
SAVE_EVERY = 1000  # events per save: one transaction each, so generation takes seconds


def generate(app: Snaptree, data: DataDir, events: int) -> None:
    def paths(name: str) -> Callable[..., dict[str, str]]:
        return lambda node_id: {"disk0": data.layer_path(name, node_id, "disk0")}

    app.decide(c.RegisterVM(BIG, host="bench", disks={"disk0": "/srv/big.qcow2"}, config={}))
    agg = app.get_vm(BIG)
    for i in range(SNAPSHOTS):
        agg.take_snapshot(f"s{i}", paths(BIG))
    app.save(agg)
    names = [f"s{i}" for i in range(SNAPSHOTS)]
    i = 0
    while agg.version < events:
        slot = i % SNAPSHOTS
        new = f"r{i}"
        agg.rename_snapshot(names[slot], new)
        names[slot] = new
        i += 1
        if i % SAVE_EVERY == 0:
            app.save(agg)
    app.save(agg)
    for k in range(4):  # smaller VMs with applies and hidden nodes: other shapes in the log
        name = f"vm{k}"
        app.decide(c.RegisterVM(name, host="bench", disks={"disk0": f"/srv/{name}.qcow2"}, config={}))
        for j in range(60):
            app.decide(c.TakeSnapshot(name, f"t{j}", memory=False))  # a stopped VM: no memory
            try:
                if j % 7 == 3:
                    app.decide(c.ApplySnapshot(name, f"t{j - 2}"))
                if j % 11 == 5:
                    app.decide(c.DeleteSnapshot(name, f"t{j - 1}"))
            except Refused:
                pass  # that snapshot was deleted already


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall-clock seconds per run."""
    return [pair[0] for pair in timed2(fn, repeat)]


def timed2(fn: Callable[[], object], repeat: int) -> list[tuple[float, float]]:
    """(wall, this process's CPU) seconds per run: on a shared machine the two part ways."""
    out = []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - w, time.process_time() - c))
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.95) - 1)]


Row = tuple[str, str, str, str, bool]


def measure(events: int, home: Path) -> tuple[list[Row], str]:
    """The table's rows and a line saying what was measured (used by main and by run_all)."""
    data = DataDir.open(home)
    writer = open_app(data, environ={})
    t = time.perf_counter()
    if BIG not in writer.vm_names():  # a --home from an earlier run is measured again as it is
        generate(writer, data, events)
    gen_s = time.perf_counter() - t
    writer.close()
    del writer
    gc.collect()  # measure as a reader process would run: without the generator's objects around

    app = open_app(data, environ={})
    big = app.get_vm(BIG)
    total = app.recorder.max_notification_id()
    made = f"generated in {gen_s:.1f} s" if gen_s > 1 else "from an earlier run"
    what = f"{total} events ({big.version} for VM {BIG!r}, {len(big.nodes)} nodes), {made}"

    # Rebuild from zero (also the catch-up every later read starts with).
    runner = runner_for(app)
    ((rebuild_s, rebuild_cpu),) = timed2(runner.rebuild, 1)

    # `tree` from the view.
    doc = read_tree(app, BIG)
    assert doc is not None and sum(n["kind"] == "snapshot" for n in doc["nodes"]) == SNAPSHOTS
    tree = timed2(lambda: read_tree(app, BIG), 50)
    tree_ms = [w * 1000 for w, _ in tree]
    tree_cpu = [c * 1000 for _, c in tree]
    cold_app = open_app(data, environ={})  # another process's first read: new runner, empty cache
    ((cold_s, _),) = timed2(lambda: read_tree(cold_app, BIG), 1)
    cold_ms = cold_s * 1000

    # Replay from the events alone.
    vid = vm_id(BIG)

    def replay() -> None:
        agg = fold(Decoder(app).events(vid, event_chunks(app, vid)))
        assert isinstance(agg, VirtualMachine) and agg.version == big.version

    runs = timed2(replay, 5)
    rate = big.version / med([w for w, _ in runs])
    rate_cpu = big.version / med([c for _, c in runs])

    # Any VM's tree at any past version.
    rng = random.Random(5)
    vms = {name: app.get_vm(name).version for name in app.vm_names()}
    picks = [(name, rng.randint(1, last)) for name, last in vms.items() for _ in range(40)]
    rng.shuffle(picks)
    past = [timed2(lambda: tree_at(app, n, v), 1)[0] for n, v in picks]
    past_ms = [w * 1000 for w, _ in past]
    past_cpu = [c * 1000 for _, c in past]
    big_picks = [(BIG, rng.randint(1, big.version)) for _ in range(40)]
    past_big = [timed2(lambda: tree_at(app, n, v), 1)[0] for n, v in big_picks]
    past_big_ms = [w * 1000 for w, _ in past_big]
    past_big_cpu = [c * 1000 for _, c in past_big]

    def trio(xs: list[float]) -> str:
        return f"{med(xs):.1f} / {p95(xs):.1f} / {max(xs):.1f}"

    rows: list[Row] = [
        ("tree from the view, 500 snapshots, warm: median / p95 ms",
         f"{med(tree_ms):.2f} / {p95(tree_ms):.2f}", f"{med(tree_cpu):.2f} / {p95(tree_cpu):.2f}",
         "<= 20 ms", p95(tree_ms) <= 20),
        ("tree from the view, 500 snapshots, first read of a new process: ms",
         f"{cold_ms:.2f}", "", "<= 20 ms", cold_ms <= 20),
        (f"replay from the events alone, {big.version} events (median of 5): events/s",
         f"{rate:,.0f}", f"{rate_cpu:,.0f}", ">= 100,000/s", rate >= 100_000),
        (f"rebuild of all views, {total} events: s (events/s)",
         f"{rebuild_s:.2f} ({total / rebuild_s:,.0f})", f"{rebuild_cpu:.2f}", "-", True),
        (f"tree at a random past version, {len(picks)} picks, {len(vms)} VMs: median / p95 / max ms",
         trio(past_ms), trio(past_cpu), "<= 50 ms", max(past_ms) <= 50),
        (f"  the 500-snapshot VM only, {len(big_picks)} picks: median / p95 / max ms",
         trio(past_big_ms), trio(past_big_cpu), "<= 50 ms", max(past_big_ms) <= 50),
    ]
    return rows, what


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000, help="events in the big VM's history")
    parser.add_argument("--home", help="data directory (default: a fresh temporary one; "
                                       "one from an earlier run is measured without regenerating)")
    args = parser.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="snaptree-bench-audit-"))
    rows, what = measure(args.events, home)
    print(what)
    width = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    print(f"\n{'measure':<{width}}  {'wall clock':>{w1}}  {'CPU (this process)':>{max(w2, 18)}}  {'target':<12} met (wall)")
    for name, wall, cpu, target, ok in rows:
        print(f"{name:<{width}}  {wall:>{w1}}  {cpu:>{max(w2, 18)}}  {target:<12} {'yes' if ok else 'NO'}")
    print(f"load average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"\ndata directory: {home}")


if __name__ == "__main__":
    main()
