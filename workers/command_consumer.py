"""Command intake for producers: consumes `<prefix>:commands` (group `commands`).

Each entry's `msg` is decoded into the same command or query value the CLI builds
(adapters/messages.py) and handed to the same handler (`Service.handle_queued` for commands,
`Service.handle` for reads). Every entry ends in exactly one of:
- a reply on its `reply_to` stream: `ok` with the notification ids recorded (commands) or the
  exact JSON the CLI's `--json` prints (reads), or `ok: false` with the error code and message;
- a dead letter in `<prefix>:dead` with the reason, the original entry id and every original
  field — and, when the message was readable far enough, also a reply `ok: false`, code
  `malformed`, so the producer learns at once.
A command whose effect needs the VM's host gets a second reply, `stage: "done"`, once that host's
worker has done the work (or failed it): docs/queue.md, "Knowing the work is done".

Commands for one VM are executed one after another in stream order by a consumer, different VMs
in parallel (threads: eventsourcing has no asyncio API). A command that fails outside the domain
(the database is down) stays pending and is retried; after `max_failures` attempts it is
answered `ok: false` (code `failed`) and dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from eventsourcing.persistence import PersistenceError
from redis.exceptions import ResponseError

from adapters import messages
from adapters.messages import BadMessage, Message
from adapters.redis_streams import COMMAND_GROUP, RedisConfig, vm_turn, watch
from domain.commands import Command, Query
from domain.errors import SnaptreeError
from domain.requests import Execution
from service.api import Service
from workers.consumer import Entry, StreamConsumer, consumer_name

log = logging.getLogger(__name__)

REPLY_TTL_S = 86_400
BATCH = 64  # commands of one VM saved together at most


class Transient(Exception):
    """The command could not run now (the store is unavailable): retry it later."""


class ReplyStreamInvalid(Exception):
    """`reply_to` names a key that is not a stream: no reply can ever be written there."""


def reply_for(msg: Message, outcome: Any) -> bytes:
    """The reply to one message, from what its handler did."""
    if isinstance(outcome, Execution):
        stage = "recorded" if outcome.events and _host_work(msg) else None
        return messages.encode_reply(msg.request_id, True, events=outcome.events, stage=stage,
                                     duplicate=outcome.duplicate)
    if isinstance(outcome, PersistenceError):
        raise outcome
    if isinstance(outcome, SnaptreeError):
        return messages.encode_reply(msg.request_id, False, error=(outcome.code, outcome.message))
    if isinstance(outcome, Exception):
        log.error("request %s (%s %s) failed: %r", msg.request_id, msg.command, msg.vm, outcome)
        return messages.encode_reply(msg.request_id, False, error=(getattr(outcome, "code", "failed"), str(outcome)))
    return messages.encode_reply(msg.request_id, True, result=outcome)


def _host_work(msg: Message) -> bool:
    verb = messages.ALIASES.get(msg.command, (msg.command, {}))[0]
    cls = messages.REQUESTS[verb]
    return issubclass(cls, Command) and cls.host_work


class Intake:
    """Runs decoded messages of one VM through the service (synchronously, in a thread)."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc

    def run(self, msgs: list[Message]) -> list[bytes]:
        """Replies in order; raises Transient to retry them all later. Consecutive commands go
        to the domain together (one save: a group commit); reads are answered in between."""
        replies: list[bytes] = []
        chunk: list[Message] = []
        try:
            for msg in msgs:
                request = msg.request()
                if isinstance(request, Query):
                    replies += self._commands(chunk)
                    chunk = []
                    replies.append(self._read(msg, request))
                else:
                    chunk.append(msg)
            replies += self._commands(chunk)
        except PersistenceError as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from exc
        return replies

    def _commands(self, msgs: list[Message]) -> list[bytes]:
        if not msgs:
            return []
        requests = [(m.request_id, m.request()) for m in msgs]
        outcomes = self.svc.handle_queued(msgs[0].vm, requests)  # type: ignore[arg-type]
        return [reply_for(m, o) for m, o in zip(msgs, outcomes)]

    def _read(self, msg: Message, query: Query) -> bytes:
        try:
            result = self.svc.handle(query)
        except PersistenceError:
            raise
        except Exception as exc:  # noqa: BLE001 - answered, never a crash of the consumer
            return reply_for(msg, exc)
        return reply_for(msg, result.json())


class CommandConsumer(StreamConsumer):
    def __init__(self, svc: Service, r: aioredis.Redis, config: RedisConfig, *,
                 consumer: str | None = None, max_threads: int = 8) -> None:
        super().__init__(r, config, config.names.commands, COMMAND_GROUP,
                         consumer or consumer_name(f"commands:{svc.host}"))
        self.intake = Intake(svc)
        self._threads = asyncio.Semaphore(max_threads)
        self._parsed: dict[str, Message | BadMessage] = {}
        self._failures: dict[str, int] = {}
        self.dead_lettered = 0

    def key_of(self, entry: Entry) -> str:
        try:
            parsed: Message | BadMessage = messages.decode_command(
                entry.msg, reply_prefix=self.config.names.reply_prefix,
                max_bytes=self.config.max_message_bytes,
            )
        except BadMessage as exc:
            parsed = exc
        if set(entry.fields) - {b"msg"}:
            names = sorted(k.decode(errors="replace") for k in entry.fields)
            parsed = BadMessage(f"entry has fields {names}, not just msg", parsed.request_id, parsed.reply_to)
        self._parsed[entry.id] = parsed
        return parsed.vm if isinstance(parsed, Message) else ""

    async def handle_lane(self, key: str, entries: list[Entry]) -> None:
        good: list[tuple[Entry, Message]] = []
        for entry in entries:
            parsed = self._parsed.pop(entry.id, None)
            if parsed is None:
                self.key_of(entry)
                parsed = self._parsed.pop(entry.id)
            if isinstance(parsed, BadMessage):
                await self._malformed(entry, parsed)
            elif entry.deliveries > self.config.max_failures:
                why = f"request {parsed.request_id}: delivered {entry.deliveries} times without an answer"
                await self._answer_and_bury(entry, parsed, ("failed", why), why)
            elif (problem := await self._reply_stream_problem(parsed)) is not None:
                await self.dead_letter([entry], problem, request_id=parsed.request_id)
            else:
                good.append((entry, parsed))
        for k in range(0, len(good), BATCH):
            await self._run(good[k:k + BATCH])

    async def _malformed(self, entry: Entry, bad: BadMessage) -> None:
        self.dead_lettered += 1
        if bad.request_id and bad.reply_to and await self._reply_stream_problem_of(bad.reply_to) is None:
            reply = messages.encode_reply(bad.request_id, False, error=("malformed", bad.reason))
            await self._send(bad.reply_to, [reply])
        await self.dead_letter([entry], bad.reason, request_id=bad.request_id)

    async def _reply_stream_problem(self, msg: Message) -> str | None:
        problem = await self._reply_stream_problem_of(msg.reply_to)
        return f"request {msg.request_id}: {problem}; nothing was done" if problem else None

    async def _reply_stream_problem_of(self, reply_to: str) -> str | None:
        kind = await self.r.type(reply_to)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind in ("none", "stream"):
            return None
        return f"reply_to {reply_to!r} is a Redis {kind}, not a stream"

    async def _run(self, batch: list[tuple[Entry, Message]]) -> None:
        try:
            async with self._threads, vm_turn(self.r, self.config.names, batch[0][1].vm, self.consumer):
                replies = await asyncio.to_thread(self.intake.run, [m for _, m in batch])
        except Transient as exc:
            await self._transient(batch, exc)
            return
        for (entry, msg), reply in zip(batch, replies):
            try:
                await self._send(msg.reply_to, [reply])
            except ReplyStreamInvalid as exc:  # replaced by another key type meanwhile
                await self.dead_letter([entry], f"request {msg.request_id}: took effect, but {exc}",
                                request_id=msg.request_id)
                continue
            await self._watch(msg, messages.decode_reply(reply))
            await self.ack([entry])
            self._failures.pop(entry.id, None)

    async def _transient(self, batch: list[tuple[Entry, Message]], exc: Exception) -> None:
        for entry, msg in batch:
            attempts = max(self._failures.get(entry.id, 0) + 1, entry.deliveries)
            self._failures[entry.id] = attempts
            log.warning("%s: request %s: attempt %d failed: %s", self.consumer, msg.request_id, attempts, exc)
            if attempts < self.config.max_failures:
                self.release([entry])  # stays pending: retried after the idle time
                continue
            why = f"request {msg.request_id}: failed {attempts} times: {exc}"[:500]
            await self._answer_and_bury(entry, msg, ("failed", str(exc)), why)
            self._failures.pop(entry.id, None)

    async def _watch(self, msg: Message, reply: dict[str, Any]) -> None:
        """A recorded command with host work: its host's worker will send the "done" reply."""
        if reply.get("stage") != "recorded":
            return
        upto = max(reply["events"])
        packed = messages.pack({"reply_to": msg.reply_to, "upto": upto})
        if await watch(self.r, self.config.names, msg.vm, msg.request_id, packed, upto):
            await self._send(msg.reply_to, [messages.encode_reply(msg.request_id, True, stage="done")])

    async def _answer_and_bury(self, entry: Entry, msg: Message, error: tuple[str, str], why: str) -> None:
        try:
            await self._send(msg.reply_to, [messages.encode_reply(msg.request_id, False, error=error)])
        except ReplyStreamInvalid as exc:
            why += f"; no reply: {exc}"
        await self.dead_letter([entry], why, request_id=msg.request_id)

    async def _send(self, reply_to: str, replies: list[bytes]) -> None:
        try:
            async with self.r.pipeline(transaction=False) as p:
                for reply in replies:
                    p.xadd(reply_to, {"msg": reply})
                p.expire(reply_to, REPLY_TTL_S)
                await p.execute()
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise ReplyStreamInvalid(f"reply_to {reply_to!r} is not a stream") from exc
            raise
