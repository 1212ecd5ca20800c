"""Command intake for producers: consumes `<prefix>:commands` (group `commands`).

Each entry's `msg` is decoded and checked (adapters/messages.py). A malformed, unknown, oversized
or unauthorised message goes to `<prefix>:dead` with its reason and the consumer carries on.
A well-formed command runs through `Snaptree.execute`, which records the request id in the same
save as the command's events: a request id takes effect once, however often it is delivered.
The reply — `ok` with the notification ids recorded, or `ok: false` with the domain's error
code and message — goes to the command's `reply_to` stream, then the entry is acknowledged.

Commands for one VM are executed one after another in stream order by a consumer; different
VMs run in parallel (threads: eventsourcing has no asyncio API). Several consumers may run
(one per `snaptree serve`); concurrent saves on one VM are retried on the fresh state
(optimistic concurrency), so no update is lost. A command that fails for a reason outside the
domain (the database is down) stays pending and is retried; after `max_failures` attempts it is
answered `ok: false` (code `failed`) and dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable
from uuid import UUID

import redis.asyncio as aioredis
from eventsourcing.persistence import PersistenceError

from adapters import messages
from adapters.messages import BadMessage, Command
from adapters.redis_streams import COMMAND_GROUP, RedisConfig
from adapters.service import Service
from adapters.storage import DataDir
from domain.application import Snaptree
from domain.errors import Refused, SnaptreeError, UnknownVM, VMExists
from domain.requests import Execution, request_executed
from domain.vm import VirtualMachine
from workers.consumer import Entry, StreamConsumer, consumer_name

log = logging.getLogger(__name__)

REPLY_TTL_S = 86_400
BATCH = 64  # commands of one VM saved together at most


class Transient(Exception):
    """The command could not run now (the store is unavailable): retry it later."""


def _need(agg: VirtualMachine | None, vm: str) -> VirtualMachine:
    if agg is None:
        raise UnknownVM(f"no VM named {vm!r}")
    return agg


def decision(cmd: Command) -> Callable[[VirtualMachine | None, Callable[[VirtualMachine], Any]], tuple[Any, VirtualMachine]]:
    """The aggregate decision a well-formed command asks for (everything but `vm.create`)."""
    a, vm = cmd.args, cmd.vm

    if cmd.command == "snapshot.take":
        def take(agg: VirtualMachine | None, paths: Callable[[VirtualMachine], Any]) -> tuple[Any, VirtualMachine]:
            v = _need(agg, vm)
            return v.take_snapshot(a["name"], paths(v)), v
        return take
    if cmd.command == "snapshot.apply":
        def apply(agg: VirtualMachine | None, paths: Callable[[VirtualMachine], Any]) -> tuple[Any, VirtualMachine]:
            v = _need(agg, vm)
            return v.apply_snapshot(a["snapshot"], paths(v)), v
        return apply
    if cmd.command == "snapshot.revert":
        def revert(agg: VirtualMachine | None, paths: Callable[[VirtualMachine], Any]) -> tuple[Any, VirtualMachine]:
            v = _need(agg, vm)
            return v.revert(paths(v)), v
        return revert
    if cmd.command == "snapshot.delete":
        def delete(agg: VirtualMachine | None, paths: Callable[[VirtualMachine], Any]) -> tuple[Any, VirtualMachine]:
            v = _need(agg, vm)
            return v.delete_snapshot(a["snapshot"], subtree=bool(a.get("subtree", False))), v
        return delete
    if cmd.command == "snapshot.rename":
        def rename(agg: VirtualMachine | None, paths: Callable[[VirtualMachine], Any]) -> tuple[Any, VirtualMachine]:
            v = _need(agg, vm)
            return v.rename_snapshot(a["snapshot"], a["new"]), v
        return rename
    if cmd.command in ("merge.force", "merge"):
        force = cmd.command == "merge.force" or bool(a.get("force", False))

        def merge(agg: VirtualMachine | None, paths: Callable[[VirtualMachine], Any]) -> tuple[Any, VirtualMachine]:
            v = _need(agg, vm)
            return v.merge(a["node"], force=force), v
        return merge
    raise BadMessage(f"unknown command {cmd.command!r}")


class _OnceApp:
    """The application as `Service.create_vm` sees it, with the save going through `execute`.

    So `vm.create` from the queue runs the very checks the CLI runs (the file exists, is qcow2,
    is no other VM's layer, ...) and records the VM together with its request id.
    """

    def __init__(self, app: Snaptree, cmd: Command) -> None:
        self._app = app
        self._cmd = cmd
        self.execution: Execution[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._app, name)

    def create_vm(self, name: str, disks: dict[str, str], host: str, config: dict[str, Any] | None = None) -> UUID:
        def register(agg: VirtualMachine | None, paths: Callable[[VirtualMachine], Any]) -> tuple[Any, VirtualMachine]:
            if agg is not None:
                raise VMExists(f"a VM named {name!r} already exists")
            vm = VirtualMachine.register(name=name, host=host, disks=disks, config=config)
            return vm.id, vm

        (outcome,) = self._app.execute(name, [(self._cmd.request_id, self._cmd.command, register)])
        if isinstance(outcome, Exception):
            raise outcome
        self.execution = outcome
        return outcome.result if not outcome.duplicate else UUID(int=0)

    def get_vm(self, name: str) -> VirtualMachine:
        return self._app.get_vm(name)


class CommandExecutor:
    """Runs one decoded command against the application (synchronously, in a thread)."""

    def __init__(self, app: Snaptree, data: DataDir, host: str) -> None:
        self.app = app
        self.data = data
        self.host = host

    def run(self, cmds: list[Command]) -> list[bytes]:
        """Replies to commands for one VM, in order; raises Transient to retry them all later.

        Consecutive commands go to the application together (one save: a group commit)."""
        replies: list[bytes] = []
        chunk: list[Command] = []
        try:
            for cmd in cmds:
                if cmd.command == "vm.create":
                    replies += self._together(chunk)
                    chunk = []
                    replies.append(self._one_create(cmd))
                else:
                    chunk.append(cmd)
            replies += self._together(chunk)
        except PersistenceError as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from exc
        return replies

    def _together(self, cmds: list[Command]) -> list[bytes]:
        if not cmds:
            return []
        outcomes = self.app.execute(cmds[0].vm, [(c.request_id, c.command, decision(c)) for c in cmds])
        return [self._reply(c, o) for c, o in zip(cmds, outcomes)]

    def _one_create(self, cmd: Command) -> bytes:
        try:
            outcome: Any = self._create(cmd)
        except PersistenceError:
            raise
        except Exception as exc:
            outcome = exc
        return self._reply(cmd, outcome)

    def _reply(self, cmd: Command, outcome: Any) -> bytes:
        if isinstance(outcome, Execution):
            return messages.encode_reply(cmd.request_id, True, events=outcome.events)
        if isinstance(outcome, Refused):
            if request_executed(self.app, cmd.request_id):
                return messages.encode_reply(cmd.request_id, True, events=[])  # a duplicate
            return messages.encode_reply(cmd.request_id, False, error=(outcome.code, outcome.message))
        if isinstance(outcome, PersistenceError):
            raise outcome
        if isinstance(outcome, SnaptreeError):
            return messages.encode_reply(cmd.request_id, False, error=(outcome.code, outcome.message))
        log.error("request %s (%s %s) failed: %r", cmd.request_id, cmd.command, cmd.vm, outcome)
        return messages.encode_reply(cmd.request_id, False, error=("failed", str(outcome)))

    def _create(self, cmd: Command) -> Execution[Any]:
        a = cmd.args
        memory = a.get("memory", 256)
        cpus = a.get("cpus", 1)
        if memory < 16:
            raise Refused("vm.create: memory must be at least 16 (MiB)")
        if not 1 <= cpus <= 64:
            raise Refused("vm.create: cpus must be between 1 and 64")
        once = _OnceApp(self.app, cmd)
        svc = Service(self.data, once, self.host)  # type: ignore[arg-type]
        svc.create_vm(
            cmd.vm, list(a["disk"]), copy=bool(a.get("copy", False)), host=a.get("host"),
            config={"memory_mib": memory, "cpus": cpus},
        )
        assert once.execution is not None
        return once.execution


class CommandConsumer(StreamConsumer):
    def __init__(
        self,
        app: Snaptree,
        data: DataDir,
        host: str,
        r: aioredis.Redis,
        config: RedisConfig,
        *,
        consumer: str | None = None,
        max_threads: int = 8,
    ) -> None:
        super().__init__(r, config, config.names.commands, COMMAND_GROUP, consumer or consumer_name(f"commands:{host}"))
        self.executor = CommandExecutor(app, data, host)
        self._threads = asyncio.Semaphore(max_threads)
        self._parsed: dict[str, Command | BadMessage] = {}
        self._failures: dict[str, int] = {}
        self.dead_lettered = 0

    def key_of(self, entry: Entry) -> str:
        try:
            if set(entry.fields) - {b"msg"}:
                raise BadMessage(f"entry has fields {sorted(k.decode(errors='replace') for k in entry.fields)}, not just msg")
            parsed: Command | BadMessage = messages.decode_command(
                entry.msg, reply_prefix=self.config.names.reply_prefix,
                max_bytes=self.config.max_message_bytes,
            )
        except BadMessage as exc:
            parsed = exc
        self._parsed[entry.id] = parsed
        return parsed.vm if isinstance(parsed, Command) else ""

    async def handle_lane(self, key: str, entries: list[Entry]) -> None:
        good: list[tuple[Entry, Command]] = []
        for entry in entries:
            parsed = self._parsed.pop(entry.id, None)
            if parsed is None:
                self.key_of(entry)
                parsed = self._parsed.pop(entry.id)
            if isinstance(parsed, BadMessage):
                self.dead_lettered += 1
                await self.dead_letter([entry], parsed.reason)
            elif entry.deliveries > self.config.max_failures:
                why = f"request {parsed.request_id}: delivered {entry.deliveries} times without an answer"
                await self._reply(parsed, messages.encode_reply(parsed.request_id, False, error=("failed", why)))
                await self.dead_letter([entry], why)
            else:
                good.append((entry, parsed))
        for k in range(0, len(good), BATCH):
            await self._run(good[k:k + BATCH])

    async def _run(self, batch: list[tuple[Entry, Command]]) -> None:
        try:
            async with self._threads:
                replies = await asyncio.to_thread(self.executor.run, [c for _, c in batch])
        except Transient as exc:
            for entry, cmd in batch:
                attempts = max(self._failures.get(entry.id, 0) + 1, entry.deliveries)
                self._failures[entry.id] = attempts
                log.warning("%s: request %s: attempt %d failed: %s", self.consumer, cmd.request_id, attempts, exc)
                if attempts < self.config.max_failures:
                    self.release([entry])  # stays pending: retried after the idle time
                    continue
                await self._reply(cmd, messages.encode_reply(cmd.request_id, False, error=("failed", str(exc))))
                await self.dead_letter([entry], f"request {cmd.request_id}: failed {attempts} times: {exc}"[:500])
                self._failures.pop(entry.id, None)
            return
        async with self.r.pipeline(transaction=False) as p:
            for (_, cmd), reply in zip(batch, replies):
                p.xadd(cmd.reply_to, {"msg": reply})
                p.expire(cmd.reply_to, REPLY_TTL_S)
            await p.execute()
        await self.ack([e for e, _ in batch])
        for e, _ in batch:
            self._failures.pop(e.id, None)

    async def _reply(self, cmd: Command, reply: bytes) -> None:
        async with self.r.pipeline(transaction=False) as p:
            p.xadd(cmd.reply_to, {"msg": reply})
            p.expire(cmd.reply_to, REPLY_TTL_S)
            await p.execute()
