"""Benchmark of the scale-out mode (Redis Streams + PostgreSQL), printed as a table:

- event -> worker latency through Redis (commit of an event -> a worker of its host has the item),
  p50 / p99 (targets 5 ms / 50 ms): the relay and a stream worker in this process, commits from a
  thread, one every few milliseconds;
- commands per second through the commands stream with 1 and 4 command-consumer processes
  (`snaptree serve --no-relay --workers 0`), 2,000 `snapshot.take` commands on 16 VMs queued at
  once, until every reply is in;
- recovery after `kill -9` of a worker holding an item: from the kill until another worker of the
  host has finished it, against the configured idle time (target: within 2x).

Needs the Redis and PostgreSQL servers of `make test` (127.0.0.1:6379, 127.0.0.1:5432 db `test`).
Usage: .venv/bin/python benchmarks/bench_redis.py [--quick]
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters import messages  # noqa: E402
from adapters.qemu import qemu_img  # noqa: E402
from adapters.redis_streams import WORK_GROUP, Names, RedisConfig  # noqa: E402
from adapters.storage import DataDir  # noqa: E402
from domain import commands as c  # noqa: E402
from domain.vm import VirtualMachine  # noqa: E402
from tests.redis_harness import call, make_cluster, own_disk, settled  # noqa: E402

PG = {
    "PERSISTENCE_MODULE": "eventsourcing.postgres",
    "POSTGRES_DBNAME": os.environ.get("POSTGRES_DBNAME", "test"),
    "POSTGRES_HOST": os.environ.get("POSTGRES_HOST", "127.0.0.1"),
    "POSTGRES_PORT": os.environ.get("POSTGRES_PORT", "5432"),
    "POSTGRES_USER": os.environ.get("POSTGRES_USER", "postgres"),
    "POSTGRES_PASSWORD": os.environ.get("POSTGRES_PASSWORD", ""),
}


def psql(sql: str) -> None:
    subprocess.run(["psql", "-h", PG["POSTGRES_HOST"], "-p", PG["POSTGRES_PORT"], "-U", PG["POSTGRES_USER"],
                    "-d", PG["POSTGRES_DBNAME"], "-qc", sql], check=True, capture_output=True)


class Schema:
    def __enter__(self) -> dict[str, str]:
        self.name = f"bench_redis_{uuid.uuid4().hex[:10]}"
        psql(f"CREATE SCHEMA {self.name}")
        env = dict(PG, POSTGRES_SCHEMA=self.name)
        # Processes the benchmark starts inherit the schema; restored on exit so that a later
        # benchmark's embedded VM does not find itself pointed at a dropped schema.
        self.saved = dict(os.environ)
        os.environ.update(env)
        return env

    def __exit__(self, *exc: object) -> None:
        os.environ.clear()
        os.environ.update(self.saved)
        psql(f"DROP SCHEMA {self.name} CASCADE")


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


# --- 1. event -> worker latency ---


async def latency(n: int) -> list[float]:
    from adapters.config import open_app
    from service.bootstrap import open_service
    from workers.relay import Relay
    from workers.stream_worker import StreamWorker

    with Schema(), tempfile.TemporaryDirectory() as tmp:
        data = DataDir.open(Path(tmp) / "home")
        config = RedisConfig(names=Names(f"bench-{uuid.uuid4().hex[:8]}"))
        producer = open_app(data)
        disk = str(Path(tmp) / "own.qcow2")
        qemu_img.create_image(disk, 16 * 1024 * 1024)
        producer.save(VirtualMachine.register(name="lat", host="h", disks={"disk0": disk}))
        producer.decide(c.TakeSnapshot("lat", "a", memory=False))
        received: dict[int, float] = {}

        def on_item(vm: str, entries: list[Any]) -> None:
            now = time.perf_counter()
            for e in entries:
                upto = messages.unpack(e.msg).get("upto")
                received.setdefault(int(upto), now)

        r = config.connect()
        stop = asyncio.Event()
        relay = Relay(open_app(data), r, config)
        worker = StreamWorker(open_service(str(data.root), "h"), r, config, on_item=on_item)
        tasks = [asyncio.create_task(relay.run(stop)), asyncio.create_task(worker.run(stop))]
        committed: dict[int, float] = {}

        def produce() -> None:
            names = ["a", "b"]
            for i in range(n):
                old, new = names[i % 2], names[(i + 1) % 2]
                rename = c.RenameSnapshot("lat", old, new)
                (out,) = producer.execute("lat", [(uuid.uuid4().hex, rename)])
                t = time.perf_counter()
                for nid in out.events:
                    committed[nid] = t
                time.sleep(0.01)

        await asyncio.sleep(1.0)  # the relay leads, the worker's group exists
        await asyncio.to_thread(produce)
        deadline = time.monotonic() + 10
        while len(set(committed) & set(received)) < len(committed) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        keys = [k async for k in r.scan_iter(match=f"{config.names.prefix}:*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()
        return [(received[k] - committed[k]) * 1000 for k in committed if k in received]


# --- 2. commands per second ---


async def throughput(consumers: int, total: int, vms: int = 16) -> float:
    with Schema() as pg, tempfile.TemporaryDirectory() as tmp:
        cluster = make_cluster(Path(tmp), pg)
        app = cluster.app()
        for v in range(vms):
            disk = own_disk(Path(tmp), f"v{v}")
            app.save(VirtualMachine.register(name=f"v{v}", host="nowhere", disks={"disk0": disk}))
        for _ in range(consumers):
            cluster.serve("bench", "--no-relay", "--workers", "0")
        cluster.wait_ready()
        r = cluster.connect()
        reply_to = cluster.names.reply("bench")
        try:
            async with r.pipeline(transaction=False) as p:
                for i in range(total):
                    p.xadd(cluster.names.commands, {"msg": messages.encode_command(
                        "snapshot.take", f"v{i % vms}", {"name": f"s{i}"}, request_id=f"b{i}", reply_to=reply_to)})
                t0 = time.perf_counter()
                await p.execute()
            while await r.xlen(reply_to) < total:
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - t0
            replies = [messages.decode_reply(f[b"msg"]) for _, f in await r.xrange(reply_to)]
            assert all(rep["ok"] for rep in replies), [rep for rep in replies if not rep["ok"]][:3]
            return total / elapsed
        finally:
            await r.aclose()
            cluster.stop()


# --- 3. recovery after kill -9 ---


async def recovery(idle_ms: int, runs: int) -> list[float]:
    with Schema() as pg, tempfile.TemporaryDirectory() as tmp:
        cluster = make_cluster(Path(tmp), pg, SNAPTREE_CLAIM_IDLE_MS=str(idle_ms))
        cluster.serve("h", "--workers", "0")
        slow = {"SNAPTREE_TEST_ITEM_SLEEP": "2"}  # every item's first delivery takes 2 s
        workers = [cluster.worker("h", extra_env=slow), cluster.worker("h", extra_env=slow)]
        cluster.wait_ready()
        r = cluster.connect()
        out: list[float] = []
        try:
            created = await call(r, cluster.names, "vm.create", "rec", {"disk": [own_disk(Path(tmp), "rec")], "host": "h"})
            await _settled(r, cluster.names, "rec", created["events"][-1], 60)
            for k in range(runs):
                took = await call(r, cluster.names, "snapshot.take", "rec", {"name": f"s{k}"})
                entry = f"{took['events'][-1]}-0"
                owner = None
                while owner is None:
                    for row in await r.xpending_range(cluster.names.work("h"), WORK_GROUP, "-", "+", 10):
                        if row["message_id"].decode() == entry:
                            owner = row["consumer"].decode()
                    await asyncio.sleep(0.01)
                pid = int(owner.split(":")[3])
                t0 = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                await _settled(r, cluster.names, "rec", took["events"][-1], 30)
                out.append(time.perf_counter() - t0)
                workers = [w for w in workers if w.pid != pid]
                workers.append(cluster.worker("h", extra_env=slow))
                cluster.wait_ready()
                await _quiet(r, cluster.names.work("h"))  # the next run starts with no item in flight
            return out
        finally:
            await r.aclose()
            cluster.stop()


async def _quiet(r: Any, stream: str) -> None:
    while (await r.xpending(stream, WORK_GROUP))["pending"] or await r.xlen(stream):
        await asyncio.sleep(0.05)


async def _settled(r: Any, names: Names, vm: str, upto: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(n["vm"] == vm and n["upto"] >= upto for n in await settled(r, names)):
            return
        await asyncio.sleep(0.005)
    raise TimeoutError(f"{vm} not settled up to {upto}")


def main() -> None:
    quick = "--quick" in sys.argv
    rows: list[tuple[str, str, str]] = []
    lat = asyncio.run(latency(100 if quick else 400))
    rows.append(("event -> worker latency p50", f"{pct(lat, 50):.1f} ms", "<= 5 ms"))
    rows.append(("event -> worker latency p99", f"{pct(lat, 99):.1f} ms", "<= 50 ms"))
    total = 600 if quick else 2000
    for consumers in (1, 4):
        rate = asyncio.run(throughput(consumers, total))
        rows.append((f"commands/s, {consumers} command consumer(s)", f"{rate:.0f}/s", f"({total} takes, 16 VMs)"))
    for idle_ms in (1000, 3000):
        times = asyncio.run(recovery(idle_ms, 2 if quick else 3))
        rows.append((f"recovery after kill -9, idle {idle_ms} ms",
                     f"{statistics.mean(times):.2f} s (max {max(times):.2f})",
                     f"<= {2 * idle_ms / 1000:.0f} s (2x idle)"))
    load = open("/proc/loadavg").read().split()[:3]
    width = max(len(r[0]) for r in rows)
    print(f"\nscale-out mode (Redis Streams + PostgreSQL), {os.cpu_count()} CPUs, load average {' '.join(load)}")
    print(f"{'measure':<{width}}  {'result':<24}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<24}  {target}")



if __name__ == "__main__":
    main()
