"""A scale-out cluster for tests: real `snaptree serve` / `worker stream` processes, one Redis,
one PostgreSQL schema, one data directory path (as every host of a fleet would have).

Each test uses its own Redis key prefix, so tests never see each other's streams; a test that
must lose Redis data starts its own redis-server (`own_redis`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import redis.asyncio as aioredis

from adapters import messages
from adapters.config import open_app
from adapters.qemu import qemu_img
from adapters.redis_streams import Names, id_str
from adapters.storage import DataDir
from domain.application import Snaptree
from domain.tree import NodeKind
from domain.work import pending_work

SNAPTREE = str(Path(sys.executable).parent / "snaptree")
SHARED_REDIS = os.environ.get("SNAPTREE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DISK_SIZE = 16 * 1024 * 1024


@dataclass
class Cluster:
    home: Path
    logs: Path
    env: dict[str, str]
    names: Names
    redis_url: str
    procs: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    # --- processes ---

    def start(self, *args: str, host: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.logs / f"{len(self.procs):02d}-{host}-{'-'.join(a.lstrip('-') for a in args[:2])}.log"
        env = dict(self.env, **(extra_env or {}))
        out = open(log, "wb")
        proc = subprocess.Popen(
            [SNAPTREE, "-v", "--home", str(self.home), "--host", host, *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        out.close()
        self.procs.append((proc, log))
        return proc

    def serve(self, host: str, *extra: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.start("serve", *extra, host=host, extra_env=extra_env)

    def worker(self, host: str, *extra: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.start("worker", "stream", *extra, host=host, extra_env=extra_env)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        for proc, log in self.procs:
            while b"ready" not in log.read_bytes():
                if proc.poll() is not None:
                    raise AssertionError(f"{log.name} exited {proc.returncode}:\n{self.tail(log)}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{log.name} not ready:\n{self.tail(log)}")
                time.sleep(0.05)

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.forget()

    def forget(self) -> None:
        """Delete this test's keys from the Redis it used (never anyone else's)."""
        import redis

        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
            keys = list(client.scan_iter(match=f"{self.names.prefix}:*", count=1000))
            for k in range(0, len(keys), 500):
                client.delete(*keys[k:k + 500])
            client.close()
        except redis.RedisError:
            pass  # a private redis-server that is already gone

    def tail(self, log: Path, n: int = 40) -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])

    def logs_text(self) -> str:
        return "\n".join(f"--- {log.name}\n{self.tail(log)}" for _, log in self.procs)

    # --- the store, read from the test process ---

    def app(self) -> Snaptree:
        return open_app(DataDir.open(self.home))

    def connect(self) -> aioredis.Redis:
        return aioredis.from_url(self.redis_url, decode_responses=False, socket_timeout=15)


def cluster_env(pg_env: dict[str, str], home: Path, prefix: str, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "SNAPTREE_"))}
    env.pop("PERSISTENCE_MODULE", None)
    env.update(pg_env)
    env.update(
        SNAPTREE_HOME=str(home),
        SNAPTREE_REDIS_URL=redis_url,
        SNAPTREE_REDIS_PREFIX=prefix,
        SNAPTREE_CLAIM_IDLE_MS="1000",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def make_cluster(tmp_path: Path, pg_env: dict[str, str], redis_url: str = SHARED_REDIS, **extra: str) -> Cluster:
    prefix = f"st-test-{uuid.uuid4().hex[:10]}"
    home = tmp_path / "home"
    DataDir.open(home)
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    return Cluster(home, logs, cluster_env(pg_env, home, prefix, redis_url, **extra), Names(prefix), redis_url)


def own_disk(tmp_path: Path, name: str) -> str:
    path = str(tmp_path / f"{name}-own.qcow2")
    qemu_img.create_image(path, DISK_SIZE)
    return path


# --- a producer ---


async def call(
    r: aioredis.Redis,
    names: Names,
    command: str,
    vm: str,
    args: dict[str, Any],
    *,
    request_id: str | None = None,
    timeout: float = 60.0,
    attempt: float | None = None,
) -> dict[str, Any]:
    """Submit a command and wait for its reply; resubmit with the same request id after
    `attempt` seconds without one (what a producer does when Redis may have lost the message)."""
    rid = request_id or messages.new_request_id()
    reply_to = names.reply(uuid.uuid4().hex)
    msg = messages.encode_command(command, vm, args, request_id=rid, reply_to=reply_to)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await r.xadd(names.commands, {"msg": msg})
        give_up = min(deadline, time.monotonic() + (attempt or timeout))
        while time.monotonic() < give_up:
            resp = await r.xread({reply_to: "0-0"}, count=1, block=500)
            for _s, items in resp or []:
                for _id, fields in items:
                    await r.delete(reply_to)
                    return messages.decode_reply(fields[b"msg"])
    raise AssertionError(f"no reply to {command} {vm} {args} (request {rid}) in {timeout}s")


async def settled(r: aioredis.Redis, names: Names) -> list[dict[str, Any]]:
    return [messages.unpack(f[b"msg"]) | {"id": id_str(i)} for i, f in await r.xrange(names.settled)]


async def wait_idle(app: Snaptree, vms: list[str], timeout: float = 60.0, cluster: Cluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        busy = [v for v in vms if pending_work(app.get_vm(v))]
        if not busy:
            return
        if time.monotonic() > deadline:
            detail = cluster.logs_text() if cluster else ""
            raise AssertionError(f"VMs {busy} still have work: {[pending_work(app.get_vm(v)) for v in busy]}\n{detail}")
        await asyncio.sleep(0.1)


# --- checking the files ---


def qcow2_backing(path: str) -> str | None:
    """The backing file name in a qcow2 header (fast: no qemu-img process per file)."""
    with open(path, "rb") as f:
        header = f.read(20)
        magic, _version, offset, size = struct.unpack(">4sIQI", header)
        assert magic == b"QFI\xfb", f"{path} is not qcow2"
        if offset == 0:
            return None
        f.seek(offset)
        return f.read(size).decode()


def check_tree_on_disk(app: Snaptree, name: str, data: DataDir) -> None:
    """Every node's files exist, each backing file is its parent's layer, no file is orphaned."""
    vm = app.get_vm(name)
    assert not pending_work(vm), pending_work(vm)
    used: set[str] = set()
    for node in vm.nodes.values():
        for disk, path in node.layers.items():
            used.add(path)
            assert os.path.isfile(path), f"{name}: missing {path}"
            backing = qcow2_backing(path)
            if node.parent is None:
                assert path == vm.disks[disk]
            else:
                assert backing == vm.nodes[node.parent].layers[disk], (name, node.id, backing)
    folder = data.vm_dir(name) / "layers"
    on_disk = {str(p) for p in folder.glob("*")} if folder.exists() else set()
    assert on_disk <= used, f"{name}: orphan files {sorted(on_disk - used)}"


def visible_names(app: Snaptree, name: str) -> list[str]:
    vm = app.get_vm(name)
    return sorted(n.name for n in vm.nodes.values() if n.kind is NodeKind.SNAPSHOT and n.name)


# --- a Redis of one's own (to FLUSHALL, restart or TLS without touching the shared one) ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def own_redis(folder: Path, *, password: str | None = None, tls: dict[str, str] | None = None) -> Iterator[str]:
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    args = [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(folder), "--logfile", str(folder / "redis.log")]
    if tls:
        args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", tls["cert"],
                 "--tls-key-file", tls["key"], "--tls-ca-cert-file", tls["ca"], "--tls-auth-clients", "no"]
    else:
        args += ["--port", str(port)]
    if password:
        args += ["--requirepass", password]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start: {(folder / 'redis.log').read_text()}")
                time.sleep(0.05)
        auth = f":{password}@" if password else ""
        scheme = "rediss" if tls else "redis"
        query = f"?ssl_ca_certs={tls['ca']}" if tls else ""
        yield f"{scheme}://{auth}127.0.0.1:{port}/0{query}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
