"""What the command consumer and the stream worker share: one consumer of one stream's group.

- reads new entries (XREADGROUP) and, every `claim_interval`, entries another consumer left
  un-acknowledged for longer than `claim_idle_ms` (XAUTOCLAIM: a dead or stuck consumer);
- hands them to `handle(key, entries)` grouped by a key (the VM): one task per key at a time,
  so a key's entries are handled in stream order by this consumer, others in parallel;
- keeps its in-flight entries from being reclaimed while it works on them (a heartbeat XCLAIM
  that resets their idle time without counting a delivery);
- recreates the stream and group when Redis has lost them (FLUSHALL, restart);
- acknowledges and deletes an entry once handled, so the stream holds only unfinished entries
  (nothing is ever trimmed away unacknowledged);
- on stop: stops reading, lets in-flight entries finish for `grace` seconds, and hands back the
  rest (sets their idle time past the limit so another consumer claims them at once).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.redis_streams import RedisConfig, ensure_group, id_str, is_nogroup

log = logging.getLogger(__name__)


@dataclass
class Entry:
    stream: str
    id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1

    @property
    def msg(self) -> bytes | None:
        return self.fields.get(b"msg")


@dataclass
class _Lane:
    queue: deque[Entry] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


def consumer_name(role: str) -> str:
    return f"{role}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class StreamConsumer:
    """Subclasses implement `key_of(entry)` and `handle_lane(key, entries)`."""

    def __init__(
        self,
        r: aioredis.Redis,
        config: RedisConfig,
        stream: str,
        group: str,
        consumer: str,
        *,
        max_in_flight: int = 256,
        read_count: int = 64,
        block_ms: int = 500,
    ) -> None:
        self.r = r
        self.config = config
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.max_in_flight = max_in_flight
        self.read_count = read_count
        self.block_ms = block_ms
        self._lanes: dict[str, _Lane] = {}
        self._held: dict[str, Entry] = {}  # entry id -> entry, from read until ack
        self.handled = 0

    # --- to implement ---

    def key_of(self, entry: Entry) -> str:
        raise NotImplementedError

    async def handle_lane(self, key: str, entries: list[Entry]) -> None:
        """Handle entries of one key; must ack (or leave pending) each of them."""
        raise NotImplementedError

    # --- the loop ---

    async def run(self, stop: asyncio.Event, grace: float = 30.0) -> None:
        await self._ensure_group()
        tasks = [
            asyncio.create_task(self._read_loop(stop)),
            asyncio.create_task(self._claim_loop(stop)),
            asyncio.create_task(self._heartbeat_loop(stop)),
        ]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._drain_lanes(grace)

    async def _drain_lanes(self, grace: float) -> None:
        running = [lane.task for lane in self._lanes.values() if lane.task is not None]
        if running:
            await asyncio.wait(running, timeout=grace)
        leftover = list(self._held)
        if leftover:
            await self.hand_back(leftover)
        try:
            pending = await self.r.xpending_range(
                self.stream, self.group, "-", "+", 1, consumername=self.consumer
            )
            if not pending:
                await self.r.xgroup_delconsumer(self.stream, self.group, self.consumer)
        except Exception:
            pass

    async def hand_back(self, ids: list[str]) -> None:
        """Make entries immediately claimable by another consumer (without a delivery)."""
        try:
            await self.r.xclaim(
                self.stream, self.group, self.consumer, 0, ids,
                idle=self.config.claim_idle_ms * 10, justid=True,
            )
            log.info("%s: handed back %d entr(ies)", self.consumer, len(ids))
        except Exception as exc:
            log.warning("%s: could not hand back %s: %s", self.consumer, ids, exc)

    async def _ensure_group(self) -> None:
        await ensure_group(self.r, self.stream, self.group)

    async def _guard(self, stop: asyncio.Event, what: Callable[[], Awaitable[None]]) -> None:
        """Run `what` until stopped, surviving Redis outages and lost groups."""
        while not stop.is_set():
            try:
                await what()
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if is_nogroup(exc):
                    log.warning("%s: group %s lost (Redis lost data); recreating", self.consumer, self.group)
                    try:
                        await self._ensure_group()
                    except Exception:
                        await asyncio.sleep(0.2)
                else:
                    log.exception("%s: Redis error", self.consumer)
                    await asyncio.sleep(0.2)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("%s: Redis unavailable (%s); retrying", self.consumer, exc)
                await asyncio.sleep(0.5)
            except Exception:  # a bug must not silently stop the consumer: say it, carry on
                log.exception("%s: unexpected error; carrying on", self.consumer)
                await asyncio.sleep(0.5)

    async def _read_loop(self, stop: asyncio.Event) -> None:
        async def once() -> None:
            room = self.max_in_flight - len(self._held)
            if room <= 0:
                await asyncio.sleep(0.01)
                return
            resp = await self.r.xreadgroup(
                self.group, self.consumer, {self.stream: ">"},
                count=min(self.read_count, room), block=self.block_ms,
            )
            for _stream, items in resp or []:
                self._accept([Entry(self.stream, id_str(i), f or {}, 1) for i, f in items])

        await self._guard(stop, once)

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        async def once() -> None:
            await self.claim()  # at once on start: items handed back or left by a dead consumer
            await asyncio.sleep(self.config.claim_interval)

        await self._guard(stop, once)

    async def claim(self) -> int:
        """Take over entries idle longer than the limit (their consumer died or hung)."""
        start = "0-0"
        claimed: list[Entry] = []
        while True:
            resp = await self.r.xautoclaim(
                self.stream, self.group, self.consumer, self.config.claim_idle_ms,
                start_id=start, count=64,
            )
            nxt, items = resp[0], resp[1]
            fresh = [(id_str(i), f) for i, f in items if f is not None and id_str(i) not in self._held]
            if fresh:
                counts = await self._deliveries([i for i, _ in fresh])
                claimed.extend(Entry(self.stream, i, f, counts.get(i, 2)) for i, f in fresh)
            start = id_str(nxt)
            if start == "0-0":
                break
        if claimed:
            log.info("%s: claimed %d idle entr(ies)", self.consumer, len(claimed))
            self._accept(claimed)
        return len(claimed)

    async def _deliveries(self, ids: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in ids:
            rows = await self.r.xpending_range(self.stream, self.group, i, i, 1)
            for row in rows:
                out[id_str(row["message_id"])] = int(row["times_delivered"])
        return out

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        async def once() -> None:
            await asyncio.sleep(max(0.02, self.config.claim_idle_ms / 3000))
            ids = list(self._held)
            for k in range(0, len(ids), 200):
                await self.r.xclaim(
                    self.stream, self.group, self.consumer, 0, ids[k:k + 200], justid=True
                )

        await self._guard(stop, once)

    # --- lanes ---

    def _accept(self, entries: list[Entry]) -> None:
        for entry in entries:
            self._held[entry.id] = entry
            key = self.key_of(entry)
            lane = self._lanes.setdefault(key, _Lane())
            lane.queue.append(entry)
            if lane.task is None:
                lane.task = asyncio.create_task(self._run_lane(key, lane))

    async def _run_lane(self, key: str, lane: _Lane) -> None:
        try:
            while lane.queue:
                batch = list(lane.queue)
                lane.queue.clear()
                try:
                    await self.handle_lane(key, batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("%s: handling %s failed", self.consumer, key)
                    for e in batch:
                        self._held.pop(e.id, None)  # left pending: reclaimed after the idle time
        finally:
            lane.task = None
            if not lane.queue:
                self._lanes.pop(key, None)

    async def ack(self, entries: list[Entry]) -> None:
        ids = [e.id for e in entries]
        if ids:
            async with self.r.pipeline(transaction=False) as p:
                p.xack(self.stream, self.group, *ids)
                p.xdel(self.stream, *ids)
                await p.execute()
        for i in ids:
            self._held.pop(i, None)
        self.handled += len(ids)

    def release(self, entries: list[Entry]) -> None:
        """Stop holding entries left pending on purpose (retried after the idle time)."""
        for e in entries:
            self._held.pop(e.id, None)

    async def dead_letter(self, entries: list[Entry], reason: str, *, request_id: str | None = None) -> None:
        """Set entries aside in `<prefix>:dead` with the reason, their original entry id and
        stream, the request id where it was readable, and every original field."""
        async with self.r.pipeline(transaction=True) as p:
            for e in entries:
                fields: dict[str | bytes, bytes | str] = {
                    "msg": e.msg if e.msg is not None else b"", "reason": reason,
                    "entry_id": e.id, "stream": self.stream,
                }
                if request_id:
                    fields["request_id"] = request_id
                for key, value in e.fields.items():
                    if key != b"msg":
                        fields[b"field:" + key] = value
                p.xadd(self.config.names.dead, fields)  # type: ignore[arg-type]
            await p.execute()
        await self.ack(entries)
        log.warning("%s: dead-lettered %d entr(ies): %s", self.consumer, len(entries), reason)

async def run_sync(fn: Callable[..., Any], *args: Any) -> Any:
    """eventsourcing has no asyncio API: every call into it runs in a thread."""
    return await asyncio.to_thread(fn, *args)
