"""kill -9 of the relay and of the command consumer in the middle of a flow (issue 6, part 2:
"the same for the relay and the command consumer").

Real `snaptree serve` processes (tests/redis_harness.py), the shared Redis with a key prefix of
the test's own, a PostgreSQL schema of the test's own, real qcow2 disks.

- The relay (`serve --no-commands --workers 0`) is killed -9 at several moments while the test
  records domain events through the application; each time it is restarted. Every notification
  must then be on `events` (and, for a VM event, on `work:<host>`) exactly once, with entry id
  `<notification id>-0`, in notification order; then a worker does the work and `audit verify`
  is clean.
- The command consumer (`serve --no-relay --workers 0`) is killed -9 2-3 times while two
  producers send 40 takes / renames with request ids, re-sending an unanswered request with the
  same request id. Every request must take effect exactly once and get a reply.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from adapters.redis_streams import COMMAND_GROUP
from adapters.storage import DataDir
from domain import commands as c
from domain.vm import VirtualMachine
from service.verify import verify
from tests.redis_harness import (
    Cluster,
    call,
    check_tree_on_disk,
    make_cluster,
    own_disk,
    visible_names,
    wait_idle,
)
from workers.relay import VM_TOPIC_PREFIX

HOST = "hostA"


@pytest.fixture
def pg(pg_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in pg_env.items():
        monkeypatch.setenv(k, v)
    return pg_env


def _kill9(proc: subprocess.Popen[bytes]) -> None:
    assert proc.poll() is None, "the process died on its own"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def _wait_ready(cluster: Cluster, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    log = next(lg for p, lg in cluster.procs if p is proc)
    deadline = time.monotonic() + timeout
    while b"ready" not in log.read_bytes():
        assert proc.poll() is None, f"{log.name} exited {proc.returncode}:\n{cluster.tail(log)}"
        assert time.monotonic() < deadline, f"{log.name} not ready:\n{cluster.tail(log)}"
        time.sleep(0.02)


def _led_from(cluster: Cluster, proc: subprocess.Popen[bytes]) -> int | None:
    log = next(lg for p, lg in cluster.procs if p is proc)
    m = re.search(rb"leads from notification (\d+)", log.read_bytes())
    return int(m.group(1)) if m else None


async def _wait_for(pred: Any, what: str, cluster: Cluster, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, f"timed out: {what}\n{cluster.logs_text()}"
        await asyncio.sleep(0.01)


def _ids(entries: list[tuple[bytes, Any]]) -> list[str]:
    return [i.decode() for i, _ in entries]


# --- the relay ---


async def test_relay_killed_9_repeatedly_publishes_every_notification_once_in_order(
    tmp_path: Path, pg: dict[str, str]
) -> None:
    cluster = make_cluster(tmp_path, pg)
    relay = cluster.serve(HOST, "--no-commands", "--workers", "0")
    _wait_ready(cluster, relay)
    r = cluster.connect()
    app = cluster.app()
    vms = ["r1", "r2"]
    names = cluster.names
    kills: list[dict[str, Any]] = []
    relays = [relay]
    lock = threading.Lock()
    counter = {"n": 0}

    def produce(count: int, pause: float) -> None:
        """Domain events through the application (the relay's only input), a few ms apart."""
        with lock:
            for _ in range(count):
                k = counter["n"]
                counter["n"] += 1
                vm = vms[k % 2]
                if k % 5 == 4:
                    app.decide(c.RenameSnapshot(vm, f"s{k - 2}", f"n{k - 2}"))
                else:
                    app.decide(c.TakeSnapshot(vm, f"s{k}", memory=False))  # disks only
                if pause:
                    time.sleep(pause)

    async def events_len() -> int:
        return int(await r.xlen(names.events))

    def last_notification() -> int:
        return app.recorder.max_notification_id() or 0

    def leading(proc: subprocess.Popen[bytes]) -> Any:
        async def check() -> bool:
            assert proc.poll() is None, cluster.logs_text()
            return _led_from(cluster, proc) is not None
        return check

    async def start(lead: bool = True) -> None:
        nonlocal relay
        relay = cluster.serve(HOST, "--no-commands", "--workers", "0")
        relays.append(relay)
        _wait_ready(cluster, relay)
        if lead:  # the dead leader's lock expires (5 s) before the new relay takes over
            await _wait_for(leading(relay), "the restarted relay leads", cluster, timeout=15)

    async def kill(point: str) -> None:
        published = await events_len()
        _kill9(relay)
        kills.append({"point": point, "published_at_kill": published, "recorded": last_notification()})

    try:
        await _wait_for(leading(relay), "the first relay leads", cluster)
        for vm in vms:
            app.decide(c.RegisterVM(vm, host=HOST, disks={"disk0": own_disk(tmp_path, vm)}, config={}))

        # 1. Killed right after it published the first entries of a flow (the position may or
        #    may not be saved yet: it is saved at most every 0.5 s).
        await asyncio.to_thread(produce, 10, 0)
        await _wait_for(lambda: _gt(events_len, 0), "first entries published", cluster)
        await kill("after the first entries of a flow")
        await start()

        # 2. Killed in the middle of a steady stream of events (published, position not saved);
        #    the stream goes on while no relay runs.
        producer = asyncio.create_task(asyncio.to_thread(produce, 60, 0.02))
        mark = await events_len()
        await _wait_for(lambda: _gt(events_len, mark + 10), "entries of the steady stream", cluster)
        await kill("mid-stream, while events are being recorded")
        await producer

        # 3. Killed while standing by for the dead leader's lock (a relay that never led).
        await start(lead=False)
        await asyncio.sleep(0.5)
        await kill("standing by for the dead leader's lock")

        # 4. Killed right after its first batch after a restart (a backlog of 100 events recorded
        #    while no relay ran: one batch, the position saved or not).
        await asyncio.to_thread(produce, 100, 0)
        await start()
        await _wait_for(lambda: _ge(events_len, last_notification()), "the backlog published", cluster)
        await kill("right after the batch of a backlog")
        await start()

        # 5. Killed idle, everything published and the position saved.
        await asyncio.sleep(1.2)
        await kill("idle, position saved")
        await start()

        total = last_notification()
        await _wait_for(lambda: _ge(events_len, total), "everything published again", cluster, timeout=30)
        await asyncio.sleep(0.5)  # nothing more may come
        notes = app.recorder.select_notifications(0, 100_000)
        assert notes[-1].id == total
        expected = [f"{n.id}-0" for n in notes]
        events = _ids(await r.xrange(names.events))
        assert events == expected, _diff(events, expected)
        work_expected = [f"{n.id}-0" for n in notes if n.topic.startswith(VM_TOPIC_PREFIX)]
        work = _ids(await r.xrange(names.work(HOST)))
        assert work == work_expected, _diff(work, work_expected)
        # A restarted relay did re-publish entries (its saved position was behind Redis) at
        # least once, and each time added nothing twice.
        led = [_led_from(cluster, p) for p in relays]
        assert any(pos is not None and k["published_at_kill"] > pos
                   for k, pos in zip(kills, led[1:])), (kills, led)

        # The work gets done: a worker on the host, while the relay publishes its events and is
        # killed once more.
        cluster.worker(HOST)
        cluster.wait_ready()
        mark = await events_len()
        await _wait_for(lambda: _gt(events_len, mark), "the work's first events published", cluster)
        await kill("while workers record LayersCreated")
        await start()
        await wait_idle(app, vms, timeout=60, cluster=cluster)
        final = app.recorder.max_notification_id()
        await _wait_for(lambda: _ge(events_len, final), "the work's events published", cluster, timeout=30)
        notes = app.recorder.select_notifications(0, 100_000)
        events = _ids(await r.xrange(names.events))
        assert events == [f"{n.id}-0" for n in notes]
        data = DataDir.open(cluster.home)
        for vm in vms:
            check_tree_on_disk(app, vm, data)
            report = verify(app, data, vm, deep=True)
            assert report.clean, [f.line() for f in report.findings]
        assert len(kills) == 6
        print("relay kills:", kills, "relays led from:", [_led_from(cluster, p) for p in relays])
    finally:
        await r.aclose()
        cluster.stop()


async def _gt(fn: Any, n: int) -> bool:
    return bool(await fn() > n)


async def _ge(fn: Any, n: int) -> bool:
    return bool(await fn() >= n)


def _diff(got: list[str], want: list[str]) -> str:
    dup = sorted({x for x in got if got.count(x) > 1})
    return f"{len(got)} vs {len(want)}; missing {sorted(set(want) - set(got))[:10]}; extra " \
           f"{sorted(set(got) - set(want))[:10]}; duplicated {dup[:10]}"


# --- the command consumer ---


async def test_command_consumer_killed_9_mid_flow_every_request_once_and_answered(
    tmp_path: Path, pg: dict[str, str]
) -> None:
    cluster = make_cluster(tmp_path, pg, SNAPTREE_CLAIM_IDLE_MS="1000")
    cluster.serve(HOST, "--no-commands")  # relay + worker: never killed here
    consumer = cluster.serve(HOST, "--no-relay", "--workers", "0")
    cluster.wait_ready()
    r = cluster.connect()
    app = cluster.app()
    names = cluster.names
    vms = ["c1", "c2"]
    kills: list[str] = []
    answered = 0
    resent = 0
    try:
        for vm in vms:
            reply = await call(r, names, "vm.create", vm, {"disk": [own_disk(tmp_path, vm)], "host": HOST},
                               request_id=f"create-{vm}")
            assert reply["ok"], reply

        def plan(vm: str) -> list[tuple[str, str, dict[str, Any]]]:
            steps = []
            for k in range(14):
                steps.append((f"{vm}-take-{k}", "snapshot.take", {"name": f"{vm}s{k}"}))
                if k % 2 == 1:
                    steps.append((f"{vm}-rename-{k}", "snapshot.rename", {"snapshot": f"{vm}s{k}", "new": f"{vm}n{k}"}))
            return steps[:20]

        replies: dict[str, dict[str, Any]] = {}

        async def producer(vm: str) -> None:
            nonlocal answered, resent
            for rid, command, args in plan(vm):
                t0 = time.monotonic()
                reply = await call(r, names, command, vm, args, request_id=rid, attempt=2.0, timeout=60)
                if time.monotonic() - t0 > 2.0:
                    resent += 1
                replies[rid] = reply
                answered += 1

        async def pending() -> int:
            return int((await r.xpending(names.commands, COMMAND_GROUP))["pending"])

        async def restart(down: float) -> None:
            nonlocal consumer
            await asyncio.sleep(down)
            consumer = cluster.serve(HOST, "--no-relay", "--workers", "0")
            _wait_ready(cluster, consumer)

        async def kill_when_pending(point: str) -> None:
            deadline = time.monotonic() + 5
            while not await pending():
                if time.monotonic() > deadline:
                    point += " (no entry seen pending in 5 s: killed anyway)"
                    break
                await asyncio.sleep(0.001)
            _kill9(consumer)
            kills.append(f"{point}; {await pending()} entries pending at the kill")

        async def killer() -> None:
            while answered < 8:
                await asyncio.sleep(0.005)
            # 1. An entry read and not acknowledged; back at once (its entries reclaimed after 1 s).
            await kill_when_pending("1: entry read, not acknowledged, down 0.3 s")
            await restart(0.3)
            while answered < 18:
                await asyncio.sleep(0.005)
            # 2. The same, then the restarted consumer is killed too as soon as it is ready,
            #    before the idle time lets it reclaim anything (a double crash).
            await kill_when_pending("2: entry read, not acknowledged, down 0.3 s")
            await restart(0.3)
            _kill9(consumer)
            kills.append(f"3: restarted consumer killed when ready, before reclaiming; {await pending()} pending")
            # Down longer than the producers' 2 s: they re-send with the same request ids.
            await restart(2.5)
            while answered < 30:
                await asyncio.sleep(0.005)
            await kill_when_pending("4: entry read, not acknowledged, down 2.5 s")
            await restart(2.5)

        t0 = time.monotonic()
        await asyncio.gather(producer("c1"), producer("c2"), killer())
        elapsed = time.monotonic() - t0
        assert len(kills) == 4 and len(replies) == 40
        assert resent > 0, "no producer had to re-send: the re-send path was not exercised"

        # Every request was answered, ok.
        bad = {rid: rep for rid, rep in replies.items() if not rep["ok"]}
        assert not bad, bad
        await wait_idle(app, vms, timeout=60, cluster=cluster)
        data = DataDir.open(cluster.home)
        for vm in vms:
            steps = plan(vm)
            renamed = {a["snapshot"]: a["new"] for _, c, a in steps if c == "snapshot.rename"}
            taken = [a["name"] for _, c, a in steps if c == "snapshot.take"]
            assert visible_names(app, vm) == sorted(renamed.get(n, n) for n in taken)
            events = list(app.events.get(app.get_vm(vm).id))
            takes = [e.name for e in events if isinstance(e, VirtualMachine.SnapshotTaken)]
            assert sorted(takes) == sorted(taken), "a take recorded twice or not at all"
            renames = [e for e in events if type(e).__name__.startswith("SnapshotRenamed")]
            assert len(renames) == len(renamed), "a rename recorded twice or not at all"
            check_tree_on_disk(app, vm, data)
            report = verify(app, data, vm, deep=True)
            assert report.clean, [f.line() for f in report.findings]
        # Each request recorded its events once: the replies that carried events name distinct ids.
        recorded = [e for rep in replies.values() for e in rep["events"]]
        assert len(recorded) == len(set(recorded))
        dead = await r.xrange(names.dead)
        assert not dead, dead
        print(f"consumer kills: {kills}; re-sent requests: {resent}; flow {elapsed:.1f}s")
    finally:
        await r.aclose()
        cluster.stop()
