"""Failures of the scale-out mode: a worker killed with an item in flight, Redis losing all its
data in the middle of a flow, an item that keeps failing, and Redis behind a password and TLS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from adapters.redis_streams import WORK_GROUP
from adapters.storage import DataDir
from domain.vm import VirtualMachine
from tests.redis_harness import (
    SNAPTREE,
    Cluster,
    call,
    check_tree_on_disk,
    make_cluster,
    own_disk,
    own_redis,
    settled,
    visible_names,
    wait_idle,
)


@pytest.fixture
def pg(pg_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in pg_env.items():
        monkeypatch.setenv(k, v)
    return pg_env


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own (with a password): the only one a test may flush."""
    yield from own_redis(tmp_path / "redis", password="s3cret pw")


async def _wait_settled(cluster: Cluster, r: Any, vm: str, upto: int, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for note in await settled(r, cluster.names):
            if note["vm"] == vm and note["upto"] >= upto:
                return note
        await asyncio.sleep(0.05)
    raise AssertionError(f"{vm} not settled up to {upto}\n{cluster.logs_text()}")


async def test_kill_9_of_a_worker_with_an_item_in_flight_another_worker_finishes_it(
    tmp_path: Path, pg: dict[str, str]
) -> None:
    idle_ms = 1000
    cluster = make_cluster(tmp_path, pg, SNAPTREE_CLAIM_IDLE_MS=str(idle_ms))
    cluster.serve("hostA", "--workers", "0")
    slow = {"SNAPTREE_TEST_ITEM_SLEEP": "2"}  # every item sleeps 2 s on its first delivery
    workers = [cluster.worker("hostA", extra_env=slow), cluster.worker("hostA", extra_env=slow)]
    cluster.wait_ready()
    r = cluster.connect()
    app = cluster.app()
    try:
        created = await call(r, cluster.names, "vm.create", "k9", {"disk": [own_disk(tmp_path, "k9")], "host": "hostA"})
        await _wait_settled(cluster, r, "k9", created["events"][-1])
        took = await call(r, cluster.names, "snapshot.take", "k9", {"name": "s1"})
        assert took["ok"]
        entry_id = f"{took['events'][-1]}-0"
        stream = cluster.names.work("hostA")
        owner = None
        deadline = time.monotonic() + 10
        while owner is None:
            assert time.monotonic() < deadline, "the item was never taken"
            for row in await r.xpending_range(stream, WORK_GROUP, "-", "+", 10):
                if row["message_id"].decode() == entry_id:
                    owner = row["consumer"].decode()
            await asyncio.sleep(0.02)
        pid = int(owner.split(":")[3])
        victim = next(p for p in workers if p.pid == pid)
        assert not app.get_vm("k9").nodes[app.get_vm("k9").current].ready  # in flight, not done
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        victim.wait()
        note = await _wait_settled(cluster, r, "k9", took["events"][-1], timeout=10 * idle_ms / 1000)
        recovery = time.monotonic() - t0
        assert note["consumer"] != owner and f":{pid}:" not in note["consumer"]
        assert recovery < 2 * idle_ms / 1000 + 1.5, recovery  # target 2x the idle time (+ slack for a loaded CI)
        await wait_idle(app, ["k9"], cluster=cluster)
        check_tree_on_disk(app, "k9", DataDir.open(cluster.home))
    finally:
        await r.aclose()
        cluster.stop()


async def test_redis_flushall_in_the_middle_of_a_flow_loses_nothing(
    tmp_path: Path, pg: dict[str, str], private_redis: str
) -> None:
    cluster = make_cluster(tmp_path, pg, private_redis, SNAPTREE_TEST_ITEM_SLEEP="0.2")
    cluster.serve("hostA")
    cluster.worker("hostA")
    cluster.wait_ready()
    r = cluster.connect()
    app = cluster.app()
    vms = ["f1", "f2"]
    try:
        for vm in vms:
            assert (await call(r, cluster.names, "vm.create", vm, {"disk": [own_disk(tmp_path, vm)], "host": "hostA"}))["ok"]
        answered = 0
        flushed = asyncio.Event()

        async def producer(vm: str, tag: str) -> list[str]:
            nonlocal answered
            names = []
            for k in range(8):
                name = f"{tag}{k}"
                # A producer that hears nothing resubmits with the same request id.
                reply = await call(r, cluster.names, "snapshot.take", vm, {"name": name}, attempt=3.0, timeout=90)
                assert reply["ok"], reply
                names.append(name)
                answered += 1
                if answered == 12 and not flushed.is_set():
                    flushed.set()
                    await r.flushall()
            return names

        results = await asyncio.gather(
            producer("f1", "a"), producer("f1", "b"), producer("f2", "c"), producer("f2", "d")
        )
        assert flushed.is_set()
        # Work recorded but not yet done when Redis forgets everything: the reconciler re-creates it.
        last = await call(r, cluster.names, "snapshot.take", "f2", {"name": "last"}, attempt=3.0)
        assert last["ok"]
        await r.flushall()
        await wait_idle(app, vms, timeout=60, cluster=cluster)
        expected = {"f1": sorted(results[0] + results[1]), "f2": sorted(results[2] + results[3] + ["last"])}
        data = DataDir.open(cluster.home)
        for vm in vms:
            assert visible_names(app, vm) == expected[vm]
            takes = [e for e in app.events.get(app.get_vm(vm).id) if isinstance(e, VirtualMachine.SnapshotTaken)]
            assert len(takes) == len(expected[vm])  # every request took effect exactly once
            check_tree_on_disk(app, vm, data)
        assert await r.exists(cluster.names.epoch)  # the relay noticed and reconciled
    finally:
        await r.aclose()
        cluster.stop()


async def test_an_item_that_keeps_failing_is_dead_lettered_and_the_rest_goes_on(
    tmp_path: Path, pg: dict[str, str]
) -> None:
    cluster = make_cluster(tmp_path, pg, SNAPTREE_CLAIM_IDLE_MS="300", SNAPTREE_MAX_FAILURES="2")
    cluster.serve("hostA")
    cluster.wait_ready()
    r = cluster.connect()
    app = cluster.app()
    try:
        bad_disk = own_disk(tmp_path, "bad")
        assert (await call(r, cluster.names, "vm.create", "bad", {"disk": [bad_disk]}))["ok"]
        assert (await call(r, cluster.names, "vm.create", "good", {"disk": [own_disk(tmp_path, "good")]}))["ok"]
        await wait_idle(app, ["bad", "good"], cluster=cluster)
        with open(bad_disk, "r+b") as f:  # the VM's own disk is broken: no overlay can be made on it
            f.write(b"\0" * 512)
        took = await call(r, cluster.names, "snapshot.take", "bad", {"name": "s1"})
        assert took["ok"]  # the decision is recorded; the side effect is what fails
        note = await _wait_settled(cluster, r, "bad", took["events"][-1])
        # A failing side effect is a recorded state with a way out, not retried for ever.
        assert "creating the layers of the current state failed" in note["error"]
        failed = list(app.get_vm("bad").failed.values())
        assert [f.kind for f in failed] == ["create_layers"]
        # An item whose drain itself keeps failing (here: the VM's folder is not a folder) is
        # retried, then dead-lettered.
        folder = DataDir.open(cluster.home).vm_dir("good2")
        assert (await call(r, cluster.names, "vm.create", "good2", {"disk": [own_disk(tmp_path, "good2")]}))["ok"]
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.write_text("in the way")
        took = await call(r, cluster.names, "snapshot.take", "good2", {"name": "s1"})
        note = await _wait_settled(cluster, r, "good2", took["events"][-1])
        assert "failed 2 times" in note["error"]
        dead = await r.xrange(cluster.names.dead)
        assert any(b"VM 'good2'" in f[b"reason"] and b"failed 2 times" in f[b"reason"] for _, f in dead), dead
        # The other VM's work goes on.
        assert (await call(r, cluster.names, "snapshot.take", "good", {"name": "g1"}))["ok"]
        await wait_idle(app, ["good"], cluster=cluster)
        # The dead letter is visible from the CLI.
        res = subprocess.run([SNAPTREE, "queue", "dead", "--json"], env=cluster.env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        rows = json.loads(res.stdout)
        assert rows[0]["msg"]["vm"] == "good2" and "failed 2 times" in rows[0]["reason"]
    finally:
        await r.aclose()
        cluster.stop()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    folder = tmp_path / "tls"
    folder.mkdir()

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=snaptree-test-ca")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    tls = {"cert": str(folder / "server.crt"), "key": str(folder / "server.key"), "ca": str(folder / "ca.crt")}
    yield from own_redis(tmp_path / "redis", password="tls-pw", tls=tls)


async def test_password_and_tls_urls_work(tmp_path: Path, pg: dict[str, str], tls_redis: str) -> None:
    assert tls_redis.startswith("rediss://:tls-pw@")
    cluster = make_cluster(tmp_path, pg, tls_redis)
    cluster.serve("hostA")
    cluster.wait_ready()
    try:
        disk = own_disk(tmp_path, "tls")
        res = subprocess.run([SNAPTREE, "--home", str(cluster.home), "submit", "vm.create", "tls", f"disk={disk}",
                              "--json", "--timeout", "30"], env=cluster.env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr + cluster.logs_text()
        res = subprocess.run([SNAPTREE, "submit", "snapshot.take", "tls", "name=s1", "--json"],
                             env=cluster.env, capture_output=True, text=True)
        assert res.returncode == 0 and json.loads(res.stdout)["settled"] is True, res.stderr
        app = cluster.app()
        assert visible_names(app, "tls") == ["s1"]
        # A wrong password is a clear failure (exit 1), not a hang.
        env = dict(cluster.env, SNAPTREE_REDIS_URL=tls_redis.replace("tls-pw", "wrong"))
        res = subprocess.run([SNAPTREE, "submit", "snapshot.take", "tls", "name=s2"], env=env,
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    finally:
        cluster.stop()
