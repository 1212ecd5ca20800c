"""Through the queue, does disk work keep up with decisions? (issue 13), printed as a table.

Scale-out mode: PostgreSQL store, Redis Streams, real `snaptree serve` / `worker stream`
processes (tests/redis_harness.py), qcow2 overlays made by the real worker.

1. **Settle lag.** 200 `snapshot.take` on one stopped VM, queued at once by one producer, one
   `snaptree serve` (relay, command consumer, one stream worker). Measured: from the first XADD
   to the last `recorded` reply (decisions), and from the last `recorded` reply to the last
   `done` reply (the disk work: overlays created, chain flattens, their records). Target: the
   lag <= 2 s.
2. **Consumer scaling.** 4 VMs, one producer per VM, each keeping WINDOW commands in flight (it
   sends the next take when a reply comes back: a closed loop, as producers that wait for their
   answers are). The commands stream is shared, as the product has it: every consumer of the
   group takes whatever it reads next. Commands/s (`recorded` replies) with 1 and with 4
   command-consumer processes (`serve --no-relay --workers 0`), and the ratio. Target: >= 3x.
3. **Where a queued take's time goes**, per take, measured in this process on the same store:
   the decision (domain), the store commit, the relay (commit -> the work item is in Redis),
   the worker's pick-up and per-item overhead, the qemu-img process, the completion record.

Needs the Redis and PostgreSQL servers of `make test` (127.0.0.1:6379, 127.0.0.1:5432 db `test`).
Usage: .venv/bin/python benchmarks/bench_queue.py [--quick] [--only lag|scale|steps]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tables  # noqa: E402
from bench_redis import Schema  # noqa: E402

from adapters import messages  # noqa: E402
from domain.vm import VirtualMachine  # noqa: E402
from domain.work import pending_work  # noqa: E402
from tests.redis_harness import make_cluster, own_disk  # noqa: E402

HEAD = ["measure", "value", "baseline", "ratio", "target", "met?"]

# Measured by the session that filed issue 13, before this benchmark existed.
EARLIER_DECIDED_S = 3.2
EARLIER_LAG_S = 28.0


@dataclass
class Lag:
    takes: int
    decided_s: float  # first XADD -> last `recorded` reply
    lag_s: float  # last `recorded` reply -> last `done` reply

    @property
    def takes_per_s(self) -> float:
        return self.takes / (self.decided_s + self.lag_s)


async def _replies(r: Any, stream: str, cursor: str) -> tuple[str, list[dict[str, Any]]]:
    got = await r.xread({stream: cursor}, count=1000, block=200)
    out: list[dict[str, Any]] = []
    for _s, items in got or []:
        for entry_id, fields in items:
            cursor = entry_id
            out.append(messages.decode_reply(fields[b"msg"]))
    return cursor, out


async def settle_lag(takes: int = 200, timeout: float = 300.0) -> Lag:
    with Schema() as pg, tempfile.TemporaryDirectory() as tmp:
        cluster = make_cluster(Path(tmp), pg)
        app = cluster.app()
        app.save(VirtualMachine.register(name="one", host="h", disks={"disk0": own_disk(Path(tmp), "one")}))
        cluster.serve("h")
        cluster.wait_ready()
        r = cluster.connect()
        reply_to = cluster.names.reply("lag")
        try:
            await asyncio.sleep(1.0)  # the relay leads, the worker's group exists
            async with r.pipeline(transaction=False) as p:
                for i in range(takes):
                    p.xadd(cluster.names.commands, {"msg": messages.encode_command(
                        "snapshot.take", "one", {"name": f"s{i}"}, request_id=f"lag{i}", reply_to=reply_to)})
                t0 = time.perf_counter()
                await p.execute()
            recorded = done = 0
            t_recorded = t_done = 0.0
            cursor = "0-0"
            deadline = time.monotonic() + timeout
            while done < takes:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{recorded} recorded, {done} done after {timeout}s\n{cluster.logs_text()}")
                cursor, got = await _replies(r, reply_to, cursor)
                now = time.perf_counter()
                for rep in got:
                    assert rep["ok"], rep
                    if rep.get("stage") == "recorded":
                        recorded += 1
                        t_recorded = now
                    elif rep.get("stage") == "done":
                        done += 1
                        t_done = now
            assert recorded == takes, recorded
            vm = app.get_vm("one")
            assert not pending_work(vm), pending_work(vm)
            assert all(os.path.isfile(p) for n in vm.nodes.values() for p in n.layers.values())
            return Lag(takes, t_recorded - t0, t_done - t_recorded)
        finally:
            await r.aclose()
            cluster.stop()


# --- 2. consumer scaling ---


async def _producer(r: Any, names: Any, vm: str, total: int, window: int, tag: str) -> None:
    reply_to = names.reply(f"{tag}-{vm}")
    sent = answered = 0
    cursor = "0-0"

    async def send(n: int) -> None:
        nonlocal sent
        async with r.pipeline(transaction=False) as p:
            for _ in range(n):
                p.xadd(names.commands, {"msg": messages.encode_command(
                    "snapshot.take", vm, {"name": f"s{sent}"}, request_id=f"{tag}-{vm}-{sent}", reply_to=reply_to)})
                sent += 1
            await p.execute()

    await send(min(window, total))
    while answered < total:
        cursor, got = await _replies(r, reply_to, cursor)
        for rep in got:
            assert rep["ok"], rep
        answered += len(got)
        if got and sent < total:
            await send(min(len(got), total - sent))


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _process_cpu(pid: int) -> float:
    """User + system seconds of a live process."""
    stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (float(stat[11]) + float(stat[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Scale:
    rate: float  # commands/s
    machine_cores: float  # cores busy on average during the run (everything: PostgreSQL, Redis, us)
    consumer_cores: float  # cores used by the command-consumer processes together


async def scaling(consumers: int, vms: int = 4, per_vm: int = 250, window: int = 16) -> Scale:
    """Commands/s through `consumers` command-consumer processes (decisions only, no worker)."""
    with Schema() as pg, tempfile.TemporaryDirectory() as tmp:
        cluster = make_cluster(Path(tmp), pg)
        app = cluster.app()
        for v in range(vms):
            app.save(VirtualMachine.register(name=f"v{v}", host="nowhere",
                                             disks={"disk0": own_disk(Path(tmp), f"v{v}")}))
        for _ in range(consumers):
            cluster.serve("bench", "--no-relay", "--workers", "0")
        cluster.wait_ready()
        clients = [cluster.connect() for _ in range(vms)]
        try:
            tag = uuid.uuid4().hex[:6]
            pids = [p.pid for p, _ in cluster.procs]
            cpu0, (busy0, all0) = sum(_process_cpu(p) for p in pids), _machine_busy()
            t0 = time.perf_counter()
            await asyncio.gather(*(_producer(clients[v], cluster.names, f"v{v}", per_vm, window, tag)
                                   for v in range(vms)))
            wall = time.perf_counter() - t0
            cpu1, (busy1, all1) = sum(_process_cpu(p) for p in pids), _machine_busy()
            cores = os.cpu_count() or 1
            return Scale(vms * per_vm / wall, (busy1 - busy0) / (all1 - all0) * cores, (cpu1 - cpu0) / wall)
        finally:
            for c in clients:
                await c.aclose()
            cluster.stop()


# --- 3. where a queued take's time goes ---


class _Clock:
    """Seconds and calls spent in wrapped callables, by label."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - t
                self.calls[label] = self.calls.get(label, 0) + 1
        return timed


def _drain_steps(takes: int, batched: bool) -> tuple[dict[str, float], dict[str, int], float, float]:
    """In this process, on PostgreSQL: decide `takes` takes as the consumer does (64 at a time),
    then drain them with one worker; returns (seconds by step, calls by step, decide s, drain s)."""
    from adapters.qemu import qemu_img
    from service import layer_batch, steps, worker as worker_mod
    from service.bootstrap import open_service
    from domain import commands as c

    with Schema(), tempfile.TemporaryDirectory() as tmp:
        svc = open_service(str(Path(tmp) / "home"), "h")
        app = svc.app
        app.save(VirtualMachine.register(name="one", host="h", disks={"disk0": own_disk(Path(tmp), "one")}))
        clock = _Clock()
        real_save = app.save
        app.save = clock.wrap("store commit", real_save)  # type: ignore[method-assign]
        t0 = time.perf_counter()
        for k in range(0, takes, 64):
            app.execute("one", [(f"r{i}", c.TakeSnapshot("one", f"s{i}")) for i in range(k, min(takes, k + 64))])
        decide_s = time.perf_counter() - t0
        commit_s = clock.spent.pop("store commit")
        clock.calls.pop("store commit")
        clock.spent["decision (domain, in the consumer)"] = decide_s - commit_s
        clock.spent["store commit (the consumer's group commits)"] = commit_s
        w = worker_mod.Worker(app, svc.data, "h", svc.disks, svc.machines)
        patches = [
            (app, "save", clock.wrap("completion records (worker's commits)", real_save)),
            (worker_mod, "pending_work", clock.wrap("reading the pending work off the aggregate", worker_mod.pending_work)),
            (w, "fresh", clock.wrap("store version check per step", w.fresh)),
            (qemu_img, "_run", clock.wrap("qemu-img processes (create, map, rebase)", qemu_img._run)),
            (qemu_img, "_run_with_progress", clock.wrap("qemu-img processes (create, map, rebase)", qemu_img._run_with_progress)),
            (svc.disks, "check", clock.wrap("qemu-img check (before a flatten)", svc.disks.check)),
        ]
        if not batched:
            patches.append((layer_batch, "run", lambda d, items: False))
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        for obj, name, fn in patches:
            setattr(obj, name, fn)
        try:
            t1 = time.perf_counter()
            w.drain("one")
            drain_s = time.perf_counter() - t1
        finally:
            for obj, name, fn in saved:
                setattr(obj, name, fn)
        assert not pending_work(app.get_vm("one"))
        del steps
        return clock.spent, clock.calls, decide_s, drain_s


def step_rows(takes: int = 200) -> list[list[str]]:
    """Per take, item by item (as before) against batched (now), in the same run."""
    before, calls_b, dec_b, drain_b = _drain_steps(takes, batched=False)
    after, calls_a, dec_a, drain_a = _drain_steps(takes, batched=True)
    out: list[list[str]] = []
    for label in after.keys() | before.keys():
        b, a = before.get(label, 0.0) * 1000 / takes, after.get(label, 0.0) * 1000 / takes
        n_b, n_a = calls_b.get(label), calls_a.get(label)
        calls = f" ({n_b} -> {n_a} calls)" if n_b is not None or n_a is not None else ""
        out.append([f"per take: {label}{calls}", f"{a:.2f} ms", f"item by item {b:.2f} ms",
                    f"{a / b:.2f}x" if b else "-", "(none)", "-"])
    out.sort(key=lambda r: r[0])
    out.append([f"per take: the worker's whole drain of {takes} queued takes", f"{drain_a * 1000 / takes:.2f} ms",
                f"item by item {drain_b * 1000 / takes:.2f} ms", f"{drain_a / drain_b:.2f}x", "(none)", "-"])
    return out


# --- the table ---


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def rows(quick: bool = False, only: str | None = None) -> list[list[str]]:
    out: list[list[str]] = []
    if only in (None, "lag"):
        runs = [asyncio.run(settle_lag(200)) for _ in range(1 if quick else 3)]
        lag = statistics.median(r.lag_s for r in runs)
        decided = statistics.median(r.decided_s for r in runs)
        rate = statistics.median(r.takes_per_s for r in runs)
        spread = f" (n={len(runs)}, {min(r.lag_s for r in runs):.2f}-{max(r.lag_s for r in runs):.2f})"
        out.append(["200 takes, one stopped VM: decided (first XADD -> last recorded reply)",
                    f"{decided:.2f} s", f"earlier {EARLIER_DECIDED_S:.1f} s", f"{decided / EARLIER_DECIDED_S:.2f}x",
                    "(none)", "-"])
        out.append(["200 takes, one stopped VM: disk work settled after the last reply",
                    f"{lag:.2f} s{spread}", f"earlier {EARLIER_LAG_S:.0f}-31 s", f"{lag / EARLIER_LAG_S:.2f}x",
                    "<= 2 s", _met(lag <= 2.0)])
        out.append(["200 takes, one stopped VM: takes/s end to end (until the last done reply)",
                    f"{rate:.0f}/s", "earlier 6-7/s", f"{rate / 6.5:.1f}x", "(none)", "-"])
    if only in (None, "scale"):
        per_vm = 100 if quick else 250
        pairs = [(asyncio.run(scaling(1, per_vm=per_vm)), asyncio.run(scaling(4, per_vm=per_vm)))
                 for _ in range(1 if quick else 3)]
        one = statistics.median(a.rate for a, _ in pairs)
        four = statistics.median(b.rate for _, b in pairs)
        ratio = statistics.median(b.rate / a.rate for a, b in pairs)
        what = f"{4 * per_vm} takes, 4 VMs, 4 producers x 16 in flight"

        def cpu(s: list[Scale]) -> str:
            return (f"; machine {statistics.median(x.machine_cores for x in s):.2f} of {os.cpu_count()} cores busy,"
                    f" consumers {statistics.median(x.consumer_cores for x in s):.2f}")

        out.append([f"commands/s, 1 command consumer ({what})", f"{one:.0f}/s{cpu([a for a, _ in pairs])}",
                    "-", "-", "(none)", "-"])
        out.append([f"commands/s, 4 command consumers ({what})", f"{four:.0f}/s{cpu([b for _, b in pairs])}",
                    f"1 consumer: {one:.0f}/s", f"{ratio:.2f}x", ">= 3x", _met(ratio >= 3.0)])
    if only in (None, "steps"):
        out += step_rows(100 if quick else 200)
    return out


def main() -> None:
    quick = "--quick" in sys.argv
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    load = open("/proc/loadavg").read().split()[:3]
    table = rows(quick, only)
    after = open("/proc/loadavg").read().split()[:3]
    print(f"\nthrough the queue (PostgreSQL + Redis Streams), {os.cpu_count()} CPUs, "
          f"load average before {' '.join(load)}, after {' '.join(after)}")
    print(tables.plain(HEAD, table))


if __name__ == "__main__":
    main()
