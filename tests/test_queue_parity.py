"""The queue can do what the CLI can, on a real VM: a producer alone (no CLI, no access to the data
directory) creates, starts, snapshots with memory, reads the tree, applies paused, asks the
status and stops a VM — and the queue's defects found from a Node.js producer stay fixed.
Real `snaptree serve`, Redis, PostgreSQL and QEMU (TCG)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest

from adapters import messages
from adapters.machines import QemuMachines
from adapters.storage import DataDir
from tests.guest import build as guest_build
from tests.redis_harness import Cluster, make_cluster, own_disk


@pytest.fixture
def cluster(tmp_path: Path, pg_env: dict[str, str]) -> Iterator[Cluster]:
    c = make_cluster(tmp_path, pg_env)
    c.serve("hostA")
    c.wait_ready()
    try:
        yield c
    finally:
        c.stop()
        app = c.app()
        machines = QemuMachines(DataDir.open(c.home))
        for name in app.vm_names():  # never leave a QEMU behind
            live = machines.attach(app.get_vm(name))
            if live is not None:
                live.stop()


async def send(r: Any, c: Cluster, command: str, vm: str, args: dict[str, Any], *,
               request_id: str | None = None, timeout: float = 90.0) -> list[dict[str, Any]]:
    """Every reply to one command, until the last one (the `done` reply of host work)."""
    reply_to = c.names.reply(uuid.uuid4().hex)
    raw = messages.encode_command(command, vm, args, request_id=request_id or uuid.uuid4().hex,
                                  reply_to=reply_to)
    await r.xadd(c.names.commands, {"msg": raw})
    return await replies(r, reply_to, timeout=timeout)


async def replies(r: Any, reply_to: str, *, timeout: float = 90.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    cursor = "0-0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await r.xread({reply_to: cursor}, count=10, block=500)
        for _stream, items in resp or []:
            for entry_id, fields in items:
                cursor = entry_id
                got.append(messages.decode_reply(fields[b"msg"]))
        if got and got[-1].get("stage") != "recorded":
            return got
    raise AssertionError(f"no final reply on {reply_to}: {got}")


async def test_a_producer_alone_runs_a_vm_and_takes_its_memory(cluster: Cluster, tmp_path: Path) -> None:
    kernel = str(guest_build.build_guest(tmp_path / "guest"))
    r = cluster.connect()
    try:
        (created,) = await send(r, cluster, "vm.create", "web", {
            "disk": [f"my-disk={own_disk(tmp_path, 'web')}"], "memory": 64, "kernel": kernel, "host": "hostA"})
        assert created["ok"], created
        started = await send(r, cluster, "vm.start", "web", {})
        assert [s.get("stage") for s in started] == ["recorded", "done"] and started[-1]["ok"], started
        (status,) = await send(r, cluster, "vm.status", "web", {})
        assert status["result"]["state"] == "running" and status["result"]["pid"]
        taken = await send(r, cluster, "snapshot.take", "web", {"name": "live"})
        assert taken[-1] == {"request_id": taken[-1]["request_id"], "ok": True, "stage": "done"}
        (tree,) = await send(r, cluster, "tree", "web", {})
        snap = next(n for n in tree["result"]["nodes"] if n["name"] == "live")
        assert snap["memory"]["state"] == "saved" and snap["memory"]["bytes"] > 0  # like the CLI's take
        applied = await send(r, cluster, "snapshot.apply", "web", {"snapshot": "live", "paused": True})
        assert applied[-1]["ok"], applied
        (status,) = await send(r, cluster, "vm.status", "web", {})
        assert status["result"]["state"] == "paused"
        (merges,) = await send(r, cluster, "merges", "", {})
        assert merges["result"] == []
        (listed,) = await send(r, cluster, "vm.list", "", {})
        assert [v["vm"] for v in listed["result"]] == ["web"]
        (log,) = await send(r, cluster, "audit.log", "web", {})
        assert any(row["event"] == "MemorySaved" for row in log["result"])
        stopped = await send(r, cluster, "vm.stop", "web", {})
        assert stopped[-1]["ok"]
        (status,) = await send(r, cluster, "vm.status", "web", {})
        assert status["result"]["state"] == "stopped"
    finally:
        await r.aclose()


async def test_queue_defects_end_in_one_reply_or_one_dead_letter(cluster: Cluster, tmp_path: Path) -> None:
    r = cluster.connect()
    names = cluster.names
    try:
        (created,) = await send(r, cluster, "vm.create", "db", {"disk": [own_disk(tmp_path, "db")]})
        assert created["ok"]
        # reply_to names a key that is not a stream: nothing is done, one dead letter.
        bad_reply = names.reply("a-hash")
        await r.hset(bad_reply, "x", "y")
        await r.xadd(names.commands, {"msg": messages.encode_command(
            "snapshot.take", "db", {"name": "never"}, request_id="wrongtype", reply_to=bad_reply)})
        dead = await _dead_letter(r, names.dead, "wrongtype")
        assert b"not a stream" in dead[b"reason"] and dead[b"entry_id"]
        (tree,) = await send(r, cluster, "tree", "db", {})
        assert not [n for n in tree["result"]["nodes"] if n["name"] == "never"]
        # Readable far enough: answered `malformed` at once, and dead-lettered with the request id.
        reply_to = names.reply(uuid.uuid4().hex)
        raw = msgpack.packb({"command": "snapshot.take", "vm": "db", "args": {"name": 5},
                             "request_id": "bad-arg", "reply_to": reply_to})
        await r.xadd(names.commands, {"msg": raw, "extra": b"kept"})
        (answer,) = await replies(r, reply_to, timeout=20)
        assert answer["ok"] is False and answer["error"]["code"] == "malformed"
        dead = await _dead_letter(r, names.dead, "bad-arg")
        assert dead[b"msg"] == raw and dead[b"field:extra"] == b"kept"
        # Undecodable bytes: the reason says what was expected.
        await r.xadd(names.commands, {"msg": b"\xc1not msgpack"})
        deadline = time.monotonic() + 20
        while True:
            rows = [f for _, f in await r.xrange(names.dead) if f[b"msg"] == b"\xc1not msgpack"]
            if rows or time.monotonic() > deadline:
                break
        assert rows and b"msgpack map" in rows[0][b"reason"]
        # A request id re-used for another command is refused.
        first = await send(r, cluster, "snapshot.take", "db", {"name": "a"}, request_id="once")
        assert first[-1]["ok"]
        (again,) = await send(r, cluster, "snapshot.rename", "db", {"snapshot": "a", "new": "b"},
                              request_id="once")
        assert again["ok"] is False and again["error"]["code"] == "request_id_reused"
    finally:
        await r.aclose()


async def _dead_letter(r: Any, stream: str, request_id: str, timeout: float = 20) -> dict[bytes, bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, fields in await r.xrange(stream):
            if fields.get(b"request_id") == request_id.encode():
                return fields  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"no dead letter for {request_id}")
