"""The scale-out pipeline end to end: two hosts, two worker processes per host, one Redis, one
PostgreSQL, real qcow2 files. Commands go in through the commands stream, events come out of the
relay, each host's workers do the disk work of its own VMs, in each VM's version order."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from adapters import messages
from adapters.redis_streams import WORK_GROUP
from adapters.storage import DataDir
from domain import commands as c
from domain.requests import request_uuid
from domain.names import vm_id
from domain.vm import VirtualMachine
from tests.redis_harness import (
    SNAPTREE,
    Cluster,
    call,
    check_tree_on_disk,
    make_cluster,
    own_disk,
    settled,
    visible_names,
    wait_idle,
)


@pytest.fixture
def cluster(tmp_path: Path, pg_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for k, v in pg_env.items():
        monkeypatch.setenv(k, v)
    c = make_cluster(tmp_path, pg_env)
    yield c
    c.stop()


async def test_two_hosts_two_workers_each_do_their_own_vms_in_version_order(cluster: Cluster, tmp_path: Path) -> None:
    # Host A: serve (relay + commands + 1 worker) and one more worker process; the same on B.
    cluster.serve("hostA")
    cluster.worker("hostA")
    cluster.serve("hostB")
    cluster.worker("hostB")
    cluster.wait_ready()
    r = cluster.connect()
    app = cluster.app()
    vms = {"a1": "hostA", "a2": "hostA", "b1": "hostB", "b2": "hostB"}
    try:
        for vm, host in vms.items():
            reply = await call(r, cluster.names, "vm.create", vm, {"disk": [own_disk(tmp_path, vm)], "host": host})
            assert reply["ok"], reply
            assert reply["events"] and all(isinstance(e, int) for e in reply["events"])

        async def flow(vm: str) -> None:
            for cmd, args in [
                ("snapshot.take", {"name": "s1"}),
                ("snapshot.take", {"name": "s2"}),
                ("snapshot.take", {"name": "s3"}),
                ("snapshot.apply", {"snapshot": "s1"}),
                ("snapshot.take", {"name": "s4"}),
                ("snapshot.delete", {"snapshot": "s3"}),  # 0 dependents
                ("snapshot.rename", {"snapshot": "s4", "new": "four"}),
                ("snapshot.delete", {"snapshot": "s1"}),  # 2 dependents: hidden
            ]:
                reply = await call(r, cluster.names, cmd, vm, args)
                assert reply["ok"], (vm, cmd, reply)
            await wait_idle(app, [vm], cluster=cluster)
            reply = await call(r, cluster.names, "snapshot.delete", vm, {"snapshot": "s2"})  # hidden s1 merges
            assert reply["ok"], reply
            reply = await call(r, cluster.names, "snapshot.apply", vm, {"snapshot": "nope"})
            assert reply == {"request_id": reply["request_id"], "ok": False,
                             "error": {"code": "unknown_snapshot", "message": reply["error"]["message"]}}

        await asyncio.gather(*(flow(vm) for vm in vms))
        await wait_idle(app, list(vms), cluster=cluster)
        data = DataDir.open(cluster.home)
        for vm, host in vms.items():
            assert visible_names(app, vm) == ["four"]
            check_tree_on_disk(app, vm, data)
            assert app.get_vm(vm).host == host
            _assert_version_order(app, vm)

        # Every VM's work was done by a worker of its own host, and both hosts' workers worked.
        notes = await settled(r, cluster.names)
        for note in notes:
            assert note["host"] == vms[note["vm"]], note
            assert note["consumer"].startswith(f"worker:{note['host']}:"), note
        assert {n["host"] for n in notes} == {"hostA", "hostB"}

        # The events stream has every domain event once, with entry id <notification id>-0.
        total = len(app.recorder.select_notifications(0, 10_000))
        deadline = time.monotonic() + 20
        while await r.xlen(cluster.names.events) < total:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        entries = await r.xrange(cluster.names.events)
        ids = [int(i.split(b"-")[0]) for i, _ in entries]
        assert ids == sorted(set(ids))
        assert ids == [n.id for n in app.recorder.select_notifications(0, 10_000)]
        first = messages.unpack(entries[0][1][b"msg"])
        assert first["topic"].endswith("VirtualMachine.Registered") and first["vm"] in vms
        # The work streams keep no finished entries (acknowledged, then deleted).
        for host in ("hostA", "hostB"):
            stream = cluster.names.work(host)
            while await r.xlen(stream) or (await r.xpending(stream, WORK_GROUP))["pending"]:
                assert time.monotonic() < deadline, "work items left behind"
                await asyncio.sleep(0.05)
    finally:
        await r.aclose()


def _assert_version_order(app: Any, vm: str) -> None:
    """Overlays were created in the order their nodes were asked for (aggregate version order)."""
    events = list(app.events.get(vm_id(vm)))
    asked = [e.new_current_id for e in events
             if isinstance(e, (VirtualMachine.SnapshotTaken, VirtualMachine.SnapshotApplied))]
    done = [e.node_id for e in events if isinstance(e, VirtualMachine.LayersCreated)]
    assert done == [n for n in asked if n in set(done)], "layers created out of version order"
    for e in events:
        if isinstance(e, VirtualMachine.LayersCreated):
            asked_at = next(x.originator_version for x in events
                            if getattr(x, "new_current_id", None) == e.node_id)
            assert e.originator_version > asked_at


async def test_the_same_command_message_delivered_twice_takes_effect_once(cluster: Cluster, tmp_path: Path) -> None:
    cluster.serve("hostA")
    cluster.serve("hostA", "--no-relay", "--workers", "0")  # a second command consumer
    cluster.wait_ready()
    r = cluster.connect()
    app = cluster.app()
    try:
        assert (await call(r, cluster.names, "vm.create", "web", {"disk": [own_disk(tmp_path, "web")]}))["ok"]
        # The same bytes twice at once (two consumers may each take one), then again later.
        rid = "req-take-once"
        reply_to = cluster.names.reply("dup")
        raw = messages.encode_command("snapshot.take", "web", {"name": "once"}, request_id=rid, reply_to=reply_to)
        await r.xadd(cluster.names.commands, {"msg": raw})
        await r.xadd(cluster.names.commands, {"msg": raw})
        replies = await _replies(r, reply_to, 2)
        await r.xadd(cluster.names.commands, {"msg": raw})
        replies += await _replies(r, reply_to, 3, skip=2)
        assert all(rep["ok"] and rep["request_id"] == rid for rep in replies), replies
        recorded = [rep["events"] for rep in replies if rep["events"]]
        assert len(recorded) == 1, replies  # one execution recorded events; the others were duplicates
        # A duplicate vm.create is a duplicate too, not "VM exists".
        create = messages.encode_command("vm.create", "web", {"disk": ["/nonexistent"]}, request_id="x-create",
                                         reply_to=reply_to)
        await r.xadd(cluster.names.commands, {"msg": create})
        (bad,) = await _replies(r, reply_to, 4, skip=3)
        assert bad["ok"] is False and bad["error"]["code"] in ("vm_exists", "invalid_disk")
        await wait_idle(app, ["web"], cluster=cluster)
        assert visible_names(app, "web") == ["once"]
        vm = app.get_vm("web")
        takes = [e for e in app.events.get(vm.id) if isinstance(e, VirtualMachine.SnapshotTaken)]
        assert len(takes) == 1
        # The dedup is in the event store: one Request aggregate for the request id.
        assert len(app.recorder.select_events(request_uuid(rid))) == 1
        check_tree_on_disk(app, "web", DataDir.open(cluster.home))
    finally:
        await r.aclose()


async def _replies(r: Any, stream: str, total: int, skip: int = 0, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The decisions; a command with host work also gets a "done" reply later (not counted).
        decided = [rep for rep in (messages.decode_reply(f[b"msg"]) for _, f in await r.xrange(stream))
                   if rep.get("stage") != "done"]
        if len(decided) >= total:
            return decided[skip:total]
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {len(await r.xrange(stream))} of {total} replies")


def _cli(cluster: Cluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SNAPTREE, "--home", str(cluster.home), *args], env=cluster.env,
                          capture_output=True, text=True, timeout=timeout)


async def test_cli_submit_waits_for_reply_and_work(cluster: Cluster, tmp_path: Path) -> None:
    cluster.serve("hostA")
    cluster.wait_ready()
    disk = own_disk(tmp_path, "cli")
    res = _cli(cluster, "submit", "vm.create", "cli", f"disk={disk}", "host=hostA", "--json")
    assert res.returncode == 0, res.stderr + cluster.logs_text()
    out = json.loads(res.stdout)
    assert out["ok"] is True and out["events"] and out["settled"] is True
    res = _cli(cluster, "submit", "snapshot.take", "cli", "name=s1", "--json")
    assert res.returncode == 0, res.stderr
    # submit returned after the work: the overlay exists already.
    app = cluster.app()
    vm = app.get_vm("cli")
    assert all(n.ready for n in vm.nodes.values())
    assert os.path.isfile(next(iter(vm.nodes[vm.current].layers.values())))
    # Refused by the domain: exit 2, one line on stderr, the error as JSON.
    res = _cli(cluster, "submit", "snapshot.take", "cli", "name=s1", "--json")
    assert res.returncode == 2
    assert json.loads(res.stdout)["error"]["code"] == "name_taken"
    assert res.stderr.count("\n") == 1
    # Bad usage is caught before anything is sent.
    res = _cli(cluster, "submit", "snapshot.take", "cli", "nom=s2")
    assert res.returncode == 2 and "unknown argument" in res.stderr
    # --no-wait prints the request id at once; the command still takes effect once.
    res = _cli(cluster, "submit", "snapshot.take", "cli", "name=s2", "--no-wait", "--request-id", "fixed-id")
    assert res.returncode == 0 and res.stdout.strip() == "fixed-id"
    res = _cli(cluster, "submit", "snapshot.take", "cli", "name=s2", "--request-id", "fixed-id", "--json")
    assert res.returncode == 0, res.stderr
    await wait_idle(app, ["cli"], cluster=cluster)
    assert visible_names(app, "cli") == ["s1", "s2"]
    # The tree as the CLI shows it.
    tree = json.loads(_cli(cluster, "tree", "cli", "--json").stdout)
    assert sorted(n["name"] for n in tree["nodes"] if n["kind"] == "snapshot") == ["s1", "s2"]


async def test_relay_republish_is_idempotent_and_trimming_keeps_unacknowledged(cluster: Cluster, tmp_path: Path) -> None:
    from adapters.redis_streams import RedisConfig, ensure_group, safe_trim
    from workers.relay import Relay

    app = cluster.app()
    for i in range(3):
        disk = own_disk(tmp_path, f"v{i}")
        from domain.vm import VirtualMachine as VM
        app.save(VM.register(name=f"v{i}", host="h", disks={"disk0": disk}))
        app.decide(c.TakeSnapshot(f"v{i}", "s", memory=False))
    config = RedisConfig.from_env(cluster.env)
    r = cluster.connect()
    try:
        relay = Relay(app, r, config)
        await relay._lead()
        while await relay.step():
            pass
        n_events = await r.xlen(cluster.names.events)
        # First use of this Redis: the relay reconciled first (3 VMs with overlays to create).
        assert relay.reconciled == 3
        assert n_events == 6 and await r.xlen(cluster.names.work("h")) == 3 + 6
        # A crash before the position was saved: a new relay publishes the same ids again.
        again = Relay(app, r, config)
        again.tracking_name = "relay:fresh-position"
        await r.delete(cluster.names.relay_leader)
        await again._lead()
        while await again.step():
            pass
        assert again.published == 0
        assert await r.xlen(cluster.names.events) == n_events
        # Trimming never drops an entry a consumer group has not acknowledged.
        stream = cluster.names.work("h")
        await ensure_group(r, stream, "g")
        got = await r.xreadgroup("g", "c", {stream: ">"}, count=2)
        first_ids = [i for i, _ in got[0][1]]
        await r.xack(stream, "g", first_ids[1])  # the first stays pending
        await r.xreadgroup("g", "c", {stream: ">"}, count=10)
        await safe_trim(r, stream, 0)
        remaining = [i for i, _ in await r.xrange(stream)]
        assert remaining[0] == first_ids[0]
        await r.xack(stream, "g", first_ids[0])
        await safe_trim(r, stream, 1)
        assert len(await r.xrange(stream)) < len(remaining)
    finally:
        await r.aclose()


async def test_sigterm_hands_back_the_item_in_flight_and_exits_0(cluster: Cluster, tmp_path: Path) -> None:
    cluster.env["SNAPTREE_CLAIM_IDLE_MS"] = "20000"  # a hand-back must not wait for the idle time
    cluster.serve("hostA", "--workers", "0")
    slow = cluster.worker("hostA", "--grace", "0.5", extra_env={"SNAPTREE_TEST_ITEM_SLEEP": "30"})
    cluster.wait_ready()
    r = cluster.connect()
    app = cluster.app()
    try:
        create = await call(r, cluster.names, "vm.create", "term", {"disk": [own_disk(tmp_path, "term")], "host": "hostA"})
        stream = cluster.names.work("hostA")
        deadline = time.monotonic() + 20
        while not (await r.xpending(stream, WORK_GROUP))["pending"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        slow.send_signal(signal.SIGTERM)
        assert slow.wait(timeout=15) == 0
        helper = cluster.worker("hostA")  # no sleep hook
        reply = await call(r, cluster.names, "snapshot.take", "term", {"name": "s1"})
        assert reply["ok"]
        await wait_idle(app, ["term"], timeout=15, cluster=cluster)
        # The handed-back item is finished by the other worker, well before the 20 s idle time.
        while not any(n["vm"] == "term" and n["upto"] >= create["events"][-1] for n in await settled(r, cluster.names)):
            assert time.monotonic() - t0 < 15, cluster.logs_text()
            await asyncio.sleep(0.05)
        assert helper.poll() is None
    finally:
        await r.aclose()
