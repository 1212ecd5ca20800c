"""Hostile input (issue 6, part 3): names that try to leave the data directory, symlinks planted
in it, oversized and malformed queue messages.

Contract (docs/semantics.md, docs/output.md): such input is refused (exit 2 / `ok: false`) or dead-lettered with a
reason; nothing is recorded; nothing is written outside the data directory except the VM's own
disks; the command consumer keeps serving. Where the work itself meets a planted symlink it must
refuse or fail cleanly (exit 1 with one line) and leave the files outside byte-identical.

Everything outside the data directory is compared before/after as a listing of
(type, size, sha256 or link target) per entry, so a file created, changed or removed shows up.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest
import redis
import redis.asyncio as aioredis

from adapters import messages
from adapters.qemu import qemu_img
from adapters.redis_streams import RedisConfig, Names
from domain import commands as c
from domain.errors import InvalidDisk, InvalidName, Refused, SnaptreeError
from service.bootstrap import open_service
from service.worker import WorkFailed
from workers.command_consumer import CommandConsumer

MiB = 1024 * 1024
HOST = "testhost"
REDIS_URL = os.environ.get("SNAPTREE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# Names that must never become a path component. (The CLI cannot carry a NUL in argv.)
ESCAPING = ["../x", "a/../../b", "/tmp/snaptree-hostile-abs", "/", "..", ".", "../../../../etc",
            "a\\..\\b", "..\\x"]
CONTROL = ["x\0y", "x\ny", "x\ry", "x\u2028y", "x\u2029y", "x\u202ey", "x\u0085y", "x\x1b[2Jy"]
LONG = ["a" * 201, "b" * 5000]
BAD_NAMES = ESCAPING + CONTROL + LONG
# (each CLI run costs ~1 s: a representative subset; the API tests cover every name)
CLI_NAMES = ["../x", "a/../../b", "/tmp/snaptree-hostile-abs", "..", "x\ny", "x\u2028y", "b" * 5000]

FAILURES = (OSError, RuntimeError, SnaptreeError, qemu_img.QemuImgError, ValueError)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def tree_state(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, tuple[str, int, str]]:
    """Every entry below `root` (links not followed): (kind, size, sha256 / link target)."""
    out: dict[str, tuple[str, int, str]] = {}
    skipped = {str(s) for s in skip}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skipped]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if p in skipped:
                continue
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", 0, os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", 0, "")
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", os.path.getsize(p), hashlib.sha256(f.read()).hexdigest())
    return out


def make_qcow2(path: Path, size: int = 8 * MiB) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    qemu_img.create_image(str(path), size)
    return path


class World:
    """A data directory at BASE/home, the VMs' own disks at BASE/disks, a decoy dir BASE/outside.

    `outside()` is everything below BASE except the data directory and the own disks (which
    snaptree may legitimately write: a merge reaching the root commits into them)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "home"
        self.disks = base / "disks"
        self.target = base / "outside"
        self.target.mkdir(parents=True, exist_ok=True)
        (self.target / "keep.bin").write_bytes(os.urandom(4096))
        self.svc = open_service(str(self.home), HOST, environ={})
        self.data = self.svc.data

    def disk(self, name: str) -> str:
        return str(make_qcow2(self.disks / f"{name}.qcow2"))

    def create_vm(self, name: str, disks: list[str], *, copy: bool = False) -> Any:
        return self.svc.handle(c.CreateVM(name, disk=tuple(disks), copy=copy))

    def take(self, vm: str, name: str) -> Any:
        """Record a take (its disk work is left to `settle`, as the old `Service.take`)."""
        return self.svc.handle(c.TakeSnapshot(vm, name), wait=False)

    def apply(self, vm: str, snapshot: str) -> Any:
        """The old `Service.apply`: earlier work first, then the apply recorded."""
        self.svc.settle(vm)
        return self.svc.handle(c.ApplySnapshot(vm, snapshot), wait=False)

    def delete(self, vm: str, snapshot: str) -> Any:
        return self.svc.handle(c.DeleteSnapshot(vm, snapshot), wait=False)

    def rename(self, vm: str, snapshot: str, new: str) -> Any:
        return self.svc.handle(c.RenameSnapshot(vm, snapshot, new))

    def settle(self, vm: str) -> Any:
        return self.svc.settle(vm)

    def vm(self, name: str) -> str:
        self.create_vm(name, [self.disk(name)])
        return name

    def outside(self) -> dict[str, tuple[str, int, str]]:
        return tree_state(self.base, skip=(self.home, self.disks))

    def target_state(self) -> dict[str, tuple[str, int, str]]:
        return tree_state(self.target)

    def events(self) -> int:
        return int(self.svc.app.recorder.max_notification_id() or 0)

    def layers_dir(self, vm: str) -> Path:
        return self.data.vm_dir(vm) / "layers"

    def layer(self, vm: str, snapshot: str) -> str:
        agg = self.svc.app.get_vm(vm)
        (node,) = [n for n in agg.nodes.values() if n.name == snapshot]
        (path,) = node.layers.values()
        return path

    def current_layer(self, vm: str) -> str:
        agg = self.svc.app.get_vm(vm)
        (path,) = agg.nodes[agg.current].layers.values()
        return path


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


# --------------------------------------------------------------------------------------------
# 1. names, through the Python API
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_api_vm_name_that_escapes_is_refused(world: World, name: str) -> None:
    disk = world.disk("spare")
    before, events = world.outside(), world.events()
    with pytest.raises(InvalidName):
        world.create_vm(name, [disk])
    with pytest.raises(InvalidName):
        world.create_vm(name, [disk], copy=True)
    with pytest.raises(InvalidName):
        world.data.vm_dir(name)
    assert world.events() == events
    assert world.outside() == before
    assert not (world.home / "vms").exists() or list((world.home / "vms").iterdir()) == []


def test_api_snapshot_names_that_escape_are_refused(world: World) -> None:
    vm = world.vm("v")
    world.take(vm, "s1")
    world.settle(vm)
    before, events = world.outside(), world.events()
    home_before = tree_state(world.home, skip=tuple(world.home.glob("snaptree.sqlite*")))
    for name in BAD_NAMES:
        with pytest.raises(InvalidName):
            world.take(vm, name)
        with pytest.raises(Refused):
            world.rename(vm, "s1", name)
        with pytest.raises(Refused):
            world.apply(vm, name)
        with pytest.raises(Refused):
            world.delete(vm, name)
        with pytest.raises(Refused):  # a VM name that escapes, on every command
            world.take(name, "s2")
    world.settle(vm)
    assert world.events() == events
    assert world.outside() == before
    assert tree_state(world.home, skip=tuple(world.home.glob("snaptree.sqlite*"))) == home_before


@pytest.mark.parametrize("disk", ["../x", "a/../../b", "", "\0", "x\ny"], ids=repr)
def test_api_disk_names_that_escape_are_refused(world: World, disk: str) -> None:
    path = world.disk("spare")
    before, events = world.outside(), world.events()
    with pytest.raises(Refused):
        world.create_vm("v", [f"{disk}={path}"] if "/" not in disk else [path, f"{disk}={path}"])
    with pytest.raises(InvalidName):
        world.data.layer_path("v", uuid.uuid4(), disk)
    assert world.events() == events
    assert world.outside() == before


# --------------------------------------------------------------------------------------------
# 2. names, through the CLI (a real subprocess with SNAPTREE_HOME)
# --------------------------------------------------------------------------------------------


class Cli:
    def __init__(self, world: World) -> None:
        self.world = world
        self.cwd = world.base / "cwd"
        self.cwd.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SNAPTREE_", "SQLITE_", "POSTGRES_", "PERSISTENCE_"))}
        env.update(SNAPTREE_HOME=str(world.home), SNAPTREE_HOST=HOST, TMPDIR=str(world.base / "tmp"))
        (world.base / "tmp").mkdir(exist_ok=True)
        self.env = env

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "adapters.cli", *args, "--json"],
                              cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=60)


def test_cli_names_that_escape_are_refused(world: World) -> None:
    cli = Cli(world)
    vm = world.vm("v")
    world.take(vm, "s1")
    world.settle(vm)
    spare = world.disk("spare")
    # the escape targets, relative to the cwd and to the data dir's vms/ folder, must not appear
    before, events = world.outside(), world.events()
    home_before = tree_state(world.home, skip=tuple(world.home.glob("snaptree.sqlite*")))
    runs = [args for name in CLI_NAMES for args in (["vm", "create", name, "--disk", spare],
                                                    ["snapshot", "take", "v", name])]
    runs += [["snapshot", "take", "../x", "s"], ["snapshot", "rename", "v", "s1", "../x"],
             ["snapshot", "apply", "v", "../../x"], ["snapshot", "delete", "a/../../b", "s1"],
             ["vm", "create", "n", "--disk", f"../../x={spare}"]]
    for args in runs:
        res = cli.run(*args)
        assert res.returncode == 2, (args, res.returncode, res.stdout, res.stderr)
        err = json.loads(res.stdout)["error"]
        assert err["code"] in ("invalid_name", "unknown_vm", "unknown_snapshot", "invalid_disk"), (args, err)
        # one line on stderr, and the hostile name cannot forge a second one
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("snaptree: error:"), res.stderr
    assert world.events() == events
    assert world.outside() == before
    assert tree_state(world.home, skip=tuple(world.home.glob("snaptree.sqlite*"))) == home_before
    assert not Path("/tmp/snaptree-hostile-abs").exists()


# --------------------------------------------------------------------------------------------
# 3. symlinks planted in the data directory
# --------------------------------------------------------------------------------------------


def _two_snapshots(world: World) -> str:
    vm = world.vm("v")
    for s in ("s1", "s2"):
        world.take(vm, s)
    world.settle(vm)
    return vm


def _attempt(fn: Any, *args: Any, **kwargs: Any) -> BaseException | None:
    try:
        fn(*args, **kwargs)
    except FAILURES as exc:
        return exc
    return None


def _refused_outside(exc: BaseException | None) -> bool:
    """The data directory's refusal of a path outside it: the PermissionError itself (raised by
    the worker before any step) or the WorkFailed of the step it stopped, which names it."""
    if isinstance(exc, PermissionError):
        return "outside the data directory" in str(exc)
    return (isinstance(exc, WorkFailed) and "refusing to touch" in str(exc)
            and "outside the data directory" in str(exc))


def _settled(world: World, op: str, vm: str, *args: Any) -> BaseException | None:
    """What the CLI does: record the command, then perform the VM's work right away."""
    exc = _attempt(getattr(world, op), vm, *args)
    return exc if exc is not None else _attempt(world.settle, vm)


@pytest.mark.parametrize("op, arg", [("take", "s3"), ("apply", "s1")])
def test_layers_folder_replaced_by_symlink_take_and_apply_refuse(world: World, op: str, arg: str) -> None:
    """`layers` -> an outside folder holding the layers (so every chain still resolves): a new
    overlay would be created outside; take and apply must refuse it before any file is made.
    (Each on a VM of its own: a refused step is recorded and holds the VM's later work.)"""
    vm = _two_snapshots(world)
    layers = world.layers_dir(vm)
    moved = world.target / "layers"
    shutil.move(str(layers), str(moved))
    layers.symlink_to(moved, target_is_directory=True)
    before = world.outside()
    exc = _settled(world, op, vm, arg)
    assert _refused_outside(exc), (op, exc)
    assert "outside the data directory" in str(exc)
    assert world.outside() == before, op
    assert os.path.islink(layers)


def test_layers_folder_replaced_by_symlink_delete_writes_nothing_outside(world: World) -> None:
    vm = _two_snapshots(world)
    layers = world.layers_dir(vm)
    moved = world.target / "layers"
    shutil.move(str(layers), str(moved))
    layers.symlink_to(moved, target_is_directory=True)
    # the guest wrote into the current state (so a merge has data to move)
    from adapters.qemu import qemu_io
    qemu_io.write_pattern(world.current_layer(vm), 0, MiB, 0x5A)
    before = world.outside()
    exc = _attempt(world.delete, vm, "s2")
    if exc is None:
        exc = _attempt(world.settle, vm)
    assert world.outside() == before
    assert exc is not None


def test_future_layer_path_planted_as_symlink_is_refused(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next snapshot's layer path exists as a link to an outside file before the take."""
    vm = _two_snapshots(world)
    victim = world.target / "victim.qcow2"
    make_qcow2(victim)
    fixed = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
    real_uuid4 = uuid.uuid4
    handed: list[uuid.UUID] = []

    def uuid4() -> uuid.UUID:
        if not handed:
            handed.append(fixed)
            return fixed
        return real_uuid4()

    import domain.vm as domain_vm
    monkeypatch.setattr(domain_vm.uuid, "uuid4", uuid4)
    planted = Path(world.data.layer_path(vm, fixed, "disk0"))
    planted.symlink_to(victim)
    tmp_link = Path(f"{planted}.tmp-{os.getpid()}")
    tmp_link.symlink_to(world.target / "keep.bin")  # a crashed run's temp name, also a link
    before = world.outside()
    exc = _settled(world, "take", vm, "s3")
    monkeypatch.setattr(domain_vm.uuid, "uuid4", real_uuid4)
    assert handed == [fixed], "the take did not use the planted id"
    assert _refused_outside(exc), exc
    assert world.outside() == before
    assert victim.exists() and (world.target / "keep.bin").exists()


def test_vm_folder_replaced_by_symlink_writes_nothing_outside(world: World) -> None:
    vm = world.vm("v")  # no folder yet: the first take would make it
    planted = world.data.vm_dir(vm)
    planted.parent.mkdir(parents=True, exist_ok=True)
    empty = world.target / "vmdir"
    empty.mkdir()
    planted.symlink_to(empty, target_is_directory=True)
    before = world.outside()
    exc = _settled(world, "take", vm, "s1")
    assert exc is not None
    assert world.outside() == before, sorted(set(world.outside()) ^ set(before))


def test_vm_folder_replaced_by_symlink_refuses_overlays(world: World) -> None:
    """The part that holds today: no layer, state or temp file is created through the link."""
    vm = _two_snapshots(world)
    folder = world.data.vm_dir(vm)
    moved = world.target / "vmdir"
    shutil.move(str(folder), str(moved))
    folder.symlink_to(moved, target_is_directory=True)
    before = world.outside()
    for op, args in (("take", (vm, "s3")), ("apply", (vm, "s1"))):
        exc = _settled(world, op, *args)
        assert _refused_outside(exc), (op, exc)
        assert world.outside() == before, op


def test_symlinked_layer_to_outside_file_is_never_deleted_through(world: World) -> None:
    """A snapshot with no dependents is deleted; its layer file was swapped for a link to an
    outside file: removal refuses, and neither the link's target nor the link is touched."""
    vm = _two_snapshots(world)
    world.apply(vm, "s1")  # s2 now has no dependents
    s2_layer = Path(world.layer(vm, "s2"))
    victim = world.target / "victim.qcow2"
    shutil.copyfile(s2_layer, victim)
    s2_layer.unlink()
    s2_layer.symlink_to(victim)
    before = world.outside()
    exc = _attempt(world.delete, vm, "s2")
    if exc is None:
        exc = _attempt(world.settle, vm)
    assert _refused_outside(exc), exc
    assert "outside the data directory" in str(exc)
    assert world.outside() == before
    assert os.path.islink(s2_layer)


def test_symlinked_layer_through_cli_fails_cleanly(world: World) -> None:
    """The same through the CLI: exit 1, one line, a JSON error, nothing outside touched."""
    vm = _two_snapshots(world)
    world.apply(vm, "s1")
    s2_layer = Path(world.layer(vm, "s2"))
    victim = world.target / "victim.qcow2"
    shutil.copyfile(s2_layer, victim)
    s2_layer.unlink()
    s2_layer.symlink_to(victim)
    cli = Cli(world)
    before = world.outside()
    res = cli.run("snapshot", "delete", vm, "s2")
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and "outside the data directory" in res.stderr
    assert json.loads(res.stdout)["error"]["message"]
    assert world.outside() == before


def test_symlinked_state_file_to_outside_is_never_deleted_through(world: World) -> None:
    """A memory-state path (never made for a stopped VM) planted as a link: removing the
    snapshot's files must not unlink through it; the link may stay, the target must."""
    vm = _two_snapshots(world)
    world.apply(vm, "s1")
    agg = world.svc.app.get_vm(vm)
    (node,) = [n for n in agg.nodes.values() if n.name == "s2"]
    state = Path(world.data.state_path(vm, node.id))
    state.parent.mkdir(parents=True, exist_ok=True)
    state.symlink_to(world.target / "keep.bin")
    before = world.outside()
    _attempt(world.delete, vm, "s2")
    _attempt(world.settle, vm)
    assert world.outside() == before
    assert (world.target / "keep.bin").is_file()


def test_disk_given_as_symlink_is_adopted_by_real_path(world: World) -> None:
    real = Path(world.disk("own"))
    link1 = world.base / "links" / "one.qcow2"
    link2 = world.base / "links" / "two.qcow2"
    link1.parent.mkdir()
    link1.symlink_to(real)
    link2.symlink_to(link1)  # a chain of links
    world.create_vm("v", [str(link1)])
    assert world.svc.app.get_vm("v").disks == {"disk0": str(real)}
    events = world.events()
    for spelling in (str(link2), str(real), str(real.parent / "." / real.name),
                     str(real.parent.parent / "disks" / ".." / "disks" / real.name)):
        with pytest.raises(InvalidDisk, match="already is a layer of VM 'v'"):
            world.create_vm("w", [spelling])
    with pytest.raises(Refused):  # the same file twice in one VM, through two links
        world.create_vm("w", [f"a={link1}", f"b={link2}"])
    assert world.events() == events
    # a link into the data directory is a file inside it
    world.take("v", "s1")
    world.settle("v")
    inner = world.base / "links" / "inner.qcow2"
    inner.symlink_to(world.current_layer("v"))
    with pytest.raises(InvalidDisk, match="inside the data directory"):
        world.create_vm("w", [str(inner)])


def test_disk_symlink_through_cli(world: World) -> None:
    cli = Cli(world)
    real = Path(world.disk("own"))
    link1, link2 = world.base / "l1.qcow2", world.base / "l2.qcow2"
    link1.symlink_to(real)
    link2.symlink_to(real)
    res = cli.run("vm", "create", "v", "--disk", str(link1))
    assert res.returncode == 0, res.stderr
    assert world.svc.app.get_vm("v").disks == {"disk0": str(real)}
    res = cli.run("vm", "create", "w", "--disk", str(link2))
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert json.loads(res.stdout)["error"]["code"] == "invalid_disk"


# --------------------------------------------------------------------------------------------
# 4. the Redis command stream (the consumer runs in this process, on a unique key prefix)
# --------------------------------------------------------------------------------------------


class Queue:
    def __init__(self, world: World, max_failures: int = 5) -> None:
        self.world = world
        self.prefix = f"st-hostile-{uuid.uuid4().hex[:10]}"
        self.names = Names(self.prefix)
        self.config = RedisConfig(url=REDIS_URL, names=self.names, claim_idle_ms=200,
                                  max_failures=max_failures)

    def cleanup(self) -> None:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
            for k in range(0, len(keys), 500):
                client.delete(*keys[k:k + 500])
        finally:
            client.close()

    def run(self, body: Any) -> Any:
        """Run `body(r, consumer)` while a CommandConsumer serves the stream."""

        async def main() -> Any:
            r = aioredis.from_url(REDIS_URL, decode_responses=False, socket_timeout=15)
            cr = aioredis.from_url(REDIS_URL, decode_responses=False, socket_timeout=15)
            consumer = CommandConsumer(self.world.svc, cr, self.config)
            stop = asyncio.Event()
            task = asyncio.create_task(consumer.run(stop, grace=5))
            try:
                return await body(r, consumer, task)
            finally:
                stop.set()
                await asyncio.wait_for(task, 20)
                await r.aclose()
                await cr.aclose()

        return asyncio.run(main())

    async def call(self, r: aioredis.Redis, command: str, vm: str, args: dict[str, Any],
                   timeout: float = 20) -> dict[str, Any]:
        reply_to = self.names.reply(uuid.uuid4().hex)
        msg = messages.encode_command(command, vm, args, request_id=messages.new_request_id(),
                                      reply_to=reply_to)
        await r.xadd(self.names.commands, {"msg": msg})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resp = await r.xread({reply_to: "0-0"}, count=1, block=200)
            for _s, items in resp or []:
                for _id, fields in items:
                    await r.delete(reply_to)
                    return messages.decode_reply(fields[b"msg"])
        raise AssertionError(f"no reply to {command} {vm!r} {args}")

    async def dead_after(self, r: aioredis.Redis, entries: list[dict[bytes, bytes]],
                         task: asyncio.Task[Any], timeout: float = 20) -> list[dict[bytes, bytes]]:
        """Add the entries, then wait for each to be dead-lettered; returns the dead entries."""
        last = await r.xrevrange(self.names.dead, count=1)
        cursor = last[0][0] if last else b"0-0"
        for fields in entries:
            await r.xadd(self.names.commands, fields)
        deadline = time.monotonic() + timeout
        while True:
            dead = await r.xrange(self.names.dead, min=b"(" + cursor)
            if len(dead) >= len(entries):
                return [f for _, f in dead]
            assert not task.done(), f"the consumer stopped: {task}"
            assert time.monotonic() < deadline, f"{len(dead)} of {len(entries)} dead-lettered"
            await asyncio.sleep(0.02)


@pytest.fixture
def queue(world: World) -> Iterator[Queue]:
    q = Queue(world)
    try:
        yield q
    finally:
        q.cleanup()


def _cmd(q: Queue, **override: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"command": "snapshot.take", "vm": "v", "args": {"name": "ok"},
                           "request_id": uuid.uuid4().hex, "reply_to": q.names.reply("me")}
    msg.update(override)
    return msg


def _packed(obj: Any) -> dict[bytes, bytes]:
    return {b"msg": msgpack.packb(obj, use_bin_type=True)}


def test_queue_names_that_escape_are_answered_ok_false(world: World, queue: Queue) -> None:
    world.vm("v")
    spare = world.disk("spare")
    before, events = world.outside(), world.events()

    async def body(r: aioredis.Redis, consumer: CommandConsumer, task: Any) -> None:
        for name in BAD_NAMES:
            for command, vm, args in (("vm.create", name, {"disk": [spare]}),
                                      ("vm.create", name, {"disk": [spare], "copy": True}),
                                      ("snapshot.take", "v", {"name": name}),
                                      ("snapshot.rename", "v", {"snapshot": "s", "new": name})):
                reply = await queue.call(r, command, vm, args)
                assert reply["ok"] is False, (command, vm, args, reply)
                if name in LONG and command != "vm.create":
                    # an argument longer than its limit (domain/commands.py NAME_LEN) is
                    # malformed: answered and dead-lettered by the queue, never decided
                    assert reply["error"]["code"] == "malformed", reply
                    assert "at most 200 characters" in reply["error"]["message"], reply
                else:
                    assert reply["error"]["code"] in ("invalid_name", "unknown_snapshot"), reply
                assert reply["error"]["message"]
        assert consumer.dead_lettered == 2 * len(LONG)
        # escaping disk paths: relative ones resolve against the consumer's cwd, none is adopted
        for disk in ("../x.qcow2", "../../../../etc/passwd", "/etc/passwd", "/dev/zero", "",
                     str(world.target), str(world.target / "keep.bin")):
            reply = await queue.call(r, "vm.create", "n", {"disk": [disk]})
            assert reply["ok"] is False and reply["error"]["code"] == "invalid_disk", (disk, reply)
        reply = await queue.call(r, "vm.create", "n", {"disk": [spare], "memory": -5})
        # out of range: refused (InvalidArgument, a Refused) by the same check the CLI gets
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_argument", reply
        assert "memory must be between 16" in reply["error"]["message"], reply
        assert not task.done()

    queue.run(body)
    assert world.events() == events
    assert world.outside() == before
    assert sorted(world.svc.app.vm_names()) == ["v"]
    assert not (world.home / "vms" / "n").exists()


@pytest.mark.parametrize("command, args", [
    ("snapshot.take", {"name": "s"}),
    ("snapshot.apply", {"snapshot": "s"}),
    ("snapshot.revert", {}),
])
def test_queue_invalid_vm_name_on_a_vm_command_is_refused_at_once(
    world: World, command: str, args: dict[str, Any]
) -> None:
    q = Queue(world, max_failures=2)
    world.vm("v")
    before, events = world.outside(), world.events()

    async def body(r: aioredis.Redis, consumer: CommandConsumer, task: Any) -> None:
        for name in ("../x", "x\0y"):
            reply = await q.call(r, command, name, args, timeout=15)
            assert reply["ok"] is False
            assert reply["error"]["code"] == "invalid_name", reply
        reply = await q.call(r, "snapshot.take", "v", {"name": "after"})
        assert reply["ok"] is True

    try:
        q.run(body)
    finally:
        q.cleanup()
    assert world.outside() == before


def test_queue_malformed_messages_are_dead_lettered_and_the_consumer_keeps_serving(
    world: World, queue: Queue
) -> None:
    world.vm("v")
    q = queue
    wrong = [1, -1, 2**63, 1.5, True, None, b"bytes", [], ["a"], {}, {"a": 1}, "x" * 400]
    entries: list[tuple[str, dict[bytes, bytes]]] = []
    for field_name in messages.FIELDS:
        for value in wrong:
            if field_name == "vm" and isinstance(value, str):
                continue  # any string is a well-formed VM name (refused later, not dead-lettered)
            entries.append((f"field {field_name}={value!r:.20}", _packed(_cmd(q, **{field_name: value}))))
    nested: Any = "leaf"
    for _ in range(400):
        nested = {"k": nested}
    entries += [
        ("1MiB msg", {b"msg": os.urandom(MiB + 1)}),
        ("1MiB valid msgpack", _packed(_cmd(q, args={"name": "x" * (MiB + 1)}))),
        ("huge args list", _packed(_cmd(q, command="vm.create", args={"disk": ["/a"] * 200_000}))),
        ("many args", _packed(_cmd(q, args={f"a{i}": i for i in range(20_000)}))),
        ("nested map in args", _packed(_cmd(q, args={"name": nested}))),
        ("deep nesting, raw", {b"msg": b"\x91" * 60_000 + b"\xc0"}),
        ("deep nested maps, raw", {b"msg": b"\x81\xa1k" * 20_000 + b"\xc0"}),
        ("map header lying about size", {b"msg": b"\xdf\xff\xff\xff\xff"}),
        ("str header lying about size", {b"msg": b"\xdb\x7f\xff\xff\xff"}),
        ("not msgpack", {b"msg": b"GET / HTTP/1.1\r\n\r\n"}),
        ("json", {b"msg": json.dumps(_cmd(q)).encode()}),
        ("empty", {b"msg": b""}),
        ("ext type", {b"msg": msgpack.packb(msgpack.ExtType(1, b"\0" * 8))}),
        ("timestamp ext", {b"msg": msgpack.packb(_cmd(q, request_id=msgpack.Timestamp(1, 0)))}),
        ("no msg field", {b"data": b"x"}),
        ("extra field", {b"msg": msgpack.packb(_cmd(q)), b"x": b"1"}),
        ("unknown command", _packed(_cmd(q, command="vm.destroy_all"))),
        ("shell command", _packed(_cmd(q, command="$(rm -rf /)"))),
        ("command with NUL", _packed(_cmd(q, command="snapshot.take\0"))),
        ("unknown arg", _packed(_cmd(q, args={"name": "s", "path": "/etc"}))),
        ("path arg smuggled", _packed(_cmd(q, command="vm.create", args={"disk": ["/a"], "home": "/"}))),
        ("reply_to other prefix", _packed(_cmd(q, reply_to=f"{q.prefix}-other:reply:x"))),
        ("reply_to commands", _packed(_cmd(q, reply_to=q.names.commands))),
        ("reply_to events", _packed(_cmd(q, reply_to=q.names.events))),
        ("reply_to work", _packed(_cmd(q, reply_to=q.names.work(HOST)))),
        ("reply_to dead", _packed(_cmd(q, reply_to=q.names.dead))),
        ("reply_to bare prefix", _packed(_cmd(q, reply_to=q.names.reply_prefix))),
        ("reply_to no colon", _packed(_cmd(q, reply_to=f"{q.prefix}:reply"))),
        ("reply_to too long", _packed(_cmd(q, reply_to=q.names.reply("x" * 400)))),
        ("reply_to in another prefix via suffix", _packed(_cmd(q, reply_to=f"x{q.names.reply('me')}"))),
    ]
    forbidden = [q.names.events, q.names.work(HOST), f"{q.prefix}-other:reply:x",
                 q.names.reply("x" * 400), f"x{q.names.reply('me')}"]
    # A message read far enough to know its request id and an authorised reply_to (reply:me) is
    # also answered `ok: false`, code `malformed`; every other one is only dead-lettered.
    answered = {label for label, _ in entries
                if label.startswith(("field command=", "field vm=", "field args="))}
    answered |= {"nested map in args", "unknown command", "shell command", "command with NUL",
                 "unknown arg", "path arg smuggled", "extra field"}
    request_ids = {label: msgpack.unpackb(e[b"msg"])["request_id"] for label, e in entries
                   if label in answered}
    # The dead letter names the request id wherever it was readable (answered or not).
    readable_rid = answered | {label for label, _ in entries
                               if label.startswith(("field reply_to=", "reply_to "))}
    dead_request_ids = sorted(msgpack.unpackb(e[b"msg"])["request_id"] for label, e in entries
                              if label in readable_rid)
    before, events = world.outside(), world.events()

    async def body(r: aioredis.Redis, consumer: CommandConsumer, task: Any) -> None:
        dead = await q.dead_after(r, [e for _, e in entries], task, timeout=40)
        assert len(dead) == len(entries)
        assert sorted(f.get(b"msg", b"") for f in dead) == sorted(e.get(b"msg", b"") for _, e in entries)
        for f in dead:
            reason = f[b"reason"].decode()
            assert reason and len(reason) < 600, reason
        reasons = {e.get(b"msg", b""): f[b"reason"].decode() for (_, e), f in
                   zip(entries, [next(d for d in dead if d.get(b"msg", b"") == e.get(b"msg", b""))
                                 for _, e in entries])}
        for label, e in entries:
            reason = reasons[e.get(b"msg", b"")]
            if label.startswith("reply_to"):
                assert "unauthorised reply_to" in reason, (label, reason)
            if label.startswith("1MiB") or label == "huge args list" or label == "many args":
                assert "oversized" in reason, (label, reason)
            if label in ("unknown command", "shell command", "command with NUL"):
                assert "unknown command" in reason, (label, reason)
        for key in forbidden:
            assert not await r.exists(key), key
        replies = [messages.decode_reply(f[b"msg"]) for _, f in await r.xrange(q.names.reply("me"))]
        assert sorted(x["request_id"] for x in replies) == sorted(request_ids.values())
        by_rid = {rid: label for label, rid in request_ids.items()}
        for x in replies:
            label = by_rid[x["request_id"]]
            assert x["ok"] is False and x["error"]["code"] == "malformed", (label, x)
            assert x["error"]["message"] == reasons[dict(entries)[label][b"msg"]], (label, x)
        dead_rids = sorted(f[b"request_id"].decode() for f in dead if b"request_id" in f)
        assert dead_rids == dead_request_ids
        assert consumer.dead_lettered == len(entries)
        # still serving: a valid command afterwards is executed
        reply = await q.call(r, "snapshot.take", "v", {"name": "after"})
        assert reply["ok"] is True and reply["events"], reply
        assert not task.done()

    q.run(body)
    assert world.events() > events
    assert world.outside() == before


def test_queue_interleaved_garbage_does_not_block_valid_commands(world: World, queue: Queue) -> None:
    """Garbage before, between and after valid commands of one VM: each valid one is answered,
    in order, and the garbage is dead-lettered."""
    world.vm("v")
    q = queue

    async def body(r: aioredis.Redis, consumer: CommandConsumer, task: Any) -> None:
        garbage = [{b"msg": os.urandom(2 * MiB)}, {b"msg": b"\xc1"},
                   _packed(_cmd(q, command="nope")), _packed(_cmd(q, reply_to=q.names.commands))]
        replies = []
        for i in range(3):
            for g in garbage:
                await r.xadd(q.names.commands, g)
            replies.append(await q.call(r, "snapshot.take", "v", {"name": f"s{i}"}))
        assert [x["ok"] for x in replies] == [True, True, True], replies
        dead = await r.xlen(q.names.dead)
        deadline = time.monotonic() + 10
        while dead < 3 * len(garbage) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            dead = await r.xlen(q.names.dead)
        assert dead == 3 * len(garbage)
        # of the garbage only the unknown command has a readable request id and reply_to: it
        # alone is also answered (`malformed`), once per round
        answered = [messages.decode_reply(f[b"msg"]) for _, f in await r.xrange(q.names.reply("me"))]
        assert [(x["ok"], x["error"]["code"]) for x in answered] == [(False, "malformed")] * 3, answered
        assert not task.done()

    q.run(body)
