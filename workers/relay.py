"""The outbox relay: the event store's notification log -> Redis Streams.

Follows the notification log from a durable position (an `eventsourcing` tracking record in the
event store, `relay:<prefix>`) and, for every notification N, adds in one atomic script:

- to `<prefix>:events` the domain event (msgpack: id, topic, originator, version, vm, host and the
  stored event state), entry id `N-0`;
- to `<prefix>:work:<host>` a wake-up naming the VM, entry id `N-0` (VM events only).

An explicit id makes a re-publish after any crash idempotent: XADD refuses an id that is not
greater than the stream's last one, and the script ignores exactly that refusal. The position is
saved only after Redis took the batch, so nothing is skipped.

The script first checks `<prefix>:epoch`. When it is missing Redis has lost data (or this is its
first use): the relay reconciles (re-creates the pending work from the aggregates, see
workers/reconciler.py), sets the epoch and only then publishes again. Several relays may run
(one per `snaptree serve`); a leader lock in Redis lets one publish at a time, the others stand by.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from typing import Any
from uuid import UUID

import redis.asyncio as aioredis
from eventsourcing.persistence import IntegrityError, Notification, Tracking
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters import messages
from adapters.redis_streams import RedisConfig, safe_trim
from domain.application import Snaptree
from domain.vm import VirtualMachine
from workers.reconciler import reconcile

log = logging.getLogger(__name__)

SAVE_EVERY = 0.5  # seconds between saves of the relay's position while busy

VM_TOPIC_PREFIX = f"{VirtualMachine.__module__}:{VirtualMachine.__qualname__}."
REGISTERED_TOPIC = f"{VirtualMachine.Registered.__module__}:{VirtualMachine.Registered.__qualname__}"

# KEYS[1] = epoch, KEYS[2..] = streams; ARGV = count, then (id, key index, msg) per entry.
_PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local added = 0
local j = 2
for _ = 1, tonumber(ARGV[1]) do
  local res = redis.pcall('XADD', KEYS[tonumber(ARGV[j + 1])], ARGV[j], 'msg', ARGV[j + 2])
  j = j + 3
  if type(res) == 'table' and res.err then
    if not string.find(res.err, 'equal or smaller', 1, true) then return redis.error_reply(res.err) end
  else
    added = added + 1
  end
end
return added
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Relay:
    def __init__(
        self,
        app: Snaptree,
        r: aioredis.Redis,
        config: RedisConfig,
        *,
        batch: int = 500,
        lock_ttl_ms: int = 5000,
        poll: float | None = None,
    ) -> None:
        self.app = app
        self.r = r
        self.config = config
        self.names = config.names
        self.batch = batch
        self.lock_ttl_ms = lock_ttl_ms
        self.tracking = app.factory.tracking_recorder()
        self.tracking_name = f"relay:{self.names.prefix}"
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._vms: dict[UUID, tuple[str, str]] = {}  # originator id -> (VM name, host)
        self._listen = _has_listen(app)
        self.poll = poll if poll is not None else (0.25 if self._listen else 0.02)
        self.position = 0
        self._saved = 0
        self._saved_at = 0.0
        self.published = 0
        self.reconciled = 0

    # --- the loop ---

    async def run(self, stop: asyncio.Event) -> None:
        wake = asyncio.Event()
        listener_stop = threading.Event()
        listener = None
        if self._listen:
            loop = asyncio.get_running_loop()
            listener = threading.Thread(
                target=self._listen_thread, args=(loop, wake, listener_stop), daemon=True
            )
            listener.start()
        try:
            while not stop.is_set():
                try:
                    if not await self._lead():
                        await _sleep_or_stop(stop, self.lock_ttl_ms / 3000)
                        continue
                    await self._follow(stop, wake)
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    log.warning("relay: Redis unavailable (%s); retrying", exc)
                    await _sleep_or_stop(stop, 0.5)
        finally:
            listener_stop.set()
            try:
                await self.save_position()
            except Exception:
                pass
            try:
                await self.r.eval(_RELEASE, 1, self.names.relay_leader, self.token)
            except Exception:
                pass

    async def _lead(self) -> bool:
        if await self.r.eval(_RENEW, 1, self.names.relay_leader, self.token, self.lock_ttl_ms):
            return True
        got = await self.r.set(self.names.relay_leader, self.token, nx=True, px=self.lock_ttl_ms)
        if got:
            # A new term: read the durable position (another relay may have moved it on).
            self.position = self._saved = await asyncio.to_thread(self._saved_position)
            log.info("relay %s leads from notification %d", self.token, self.position)
        return bool(got)

    async def _follow(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        """Publish while leader; returns to renew the lock about every third of its lifetime."""
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + self.lock_ttl_ms / 3000
        last_check = 0.0
        last_trim = loop.time()
        while not stop.is_set() and loop.time() < renew_at:
            wake.clear()
            published = await self.step()
            now = loop.time()
            if now - last_trim > 5.0:
                last_trim = now
                await self.trim()
            if published:
                continue
            if self.position > self._saved and now - self._saved_at > SAVE_EVERY:
                await self.save_position()
            if now - last_check > 1.0:
                last_check = now
                if not await self.r.exists(self.names.epoch):
                    await self.recover()
            try:
                await asyncio.wait_for(wake.wait(), timeout=self.poll)
            except asyncio.TimeoutError:
                pass

    async def step(self) -> int:
        """Publish the next batch; returns how many notifications it covered."""
        notifications = await asyncio.to_thread(
            self.app.recorder.select_notifications, self.position, self.batch, inclusive_of_start=False
        )
        if not notifications:
            return 0
        keys, argv = await asyncio.to_thread(self._entries, notifications)
        added = await self.r.eval(_PUBLISH, len(keys), *keys, *argv)
        if added == -1:
            await self.recover()
            added = await self.r.eval(_PUBLISH, len(keys), *keys, *argv)
            if added == -1:
                return 0  # lost again at once; the next step tries again
        self.position = notifications[-1].id
        self.published += int(added)
        if asyncio.get_running_loop().time() - self._saved_at > SAVE_EVERY:
            await self.save_position()
        return len(notifications)

    async def save_position(self) -> None:
        """Make the position durable. Saved at most every SAVE_EVERY seconds (and when idle or
        stopping): a relay that restarts from an older position re-publishes, which is harmless."""
        self._saved_at = asyncio.get_running_loop().time()
        if self.position <= self._saved:
            return
        try:
            await asyncio.to_thread(self.tracking.insert_tracking, Tracking(self.tracking_name, self.position))
        except IntegrityError:
            pass  # another relay (a former leader) saved a position at or past this one
        self._saved = self.position

    async def recover(self) -> None:
        """Redis has lost data (or is new): re-create pending work, then mark the epoch."""
        self.reconciled += await reconcile(self.app, self.r, self.names, self.position)
        await self.r.set(self.names.epoch, self.token)

    async def trim(self) -> None:
        await safe_trim(self.r, self.names.events, self.config.events_maxlen)
        await safe_trim(self.r, self.names.settled, 10_000)
        await safe_trim(self.r, self.names.dead, 100_000)

    # --- encoding (in a thread: may load aggregates) ---

    def _entries(self, notifications: list[Notification]) -> tuple[list[str], list[Any]]:
        keys = [self.names.epoch, self.names.events]
        index = {self.names.events: 2}
        argv: list[Any] = [0]
        count = 0

        def add(stream: str, entry_id: str, msg: bytes) -> None:
            nonlocal count
            if stream not in index:
                keys.append(stream)
                index[stream] = len(keys)
            argv.extend([entry_id, index[stream], msg])
            count += 1

        for n in notifications:
            vm = self._vm_of(n)
            event = {
                "id": n.id,
                "topic": n.topic,
                "originator_id": str(n.originator_id),
                "version": n.originator_version,
                "state": n.state,
            }
            if vm is not None:
                event["vm"], event["host"] = vm
            entry_id = f"{n.id}-0"
            add(self.names.events, entry_id, messages.pack(event))
            if vm is not None:
                name, host = vm
                item = {"vm": name, "upto": n.id, "version": n.originator_version,
                        "topic": n.topic.rsplit(".", 1)[-1]}
                add(self.names.work(host), entry_id, messages.pack(item))
        argv[0] = count
        return keys, argv

    def _vm_of(self, n: Notification) -> tuple[str, str] | None:
        if not n.topic.startswith(VM_TOPIC_PREFIX):
            return None
        oid = n.originator_id
        found = self._vms.get(oid)  # type: ignore[arg-type]
        if found is None:
            if n.topic == REGISTERED_TOPIC:
                event = self.app.mapper.to_domain_event(n)
                found = (event.name, event.host)  # type: ignore[attr-defined]
            else:
                agg = self.app.repository.get(oid)
                found = (agg.name, agg.host)
            self._vms[oid] = found  # type: ignore[index]
        return found

    def _saved_position(self) -> int:
        return self.tracking.max_tracking_id(self.tracking_name) or 0

    # --- PostgreSQL LISTEN: a commit wakes the relay at once ---

    def _listen_thread(
        self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event, stop: threading.Event
    ) -> None:
        from psycopg.sql import SQL, Identifier

        recorder: Any = self.app.recorder
        while not stop.is_set():
            try:
                with recorder.datastore.get_connection() as conn:
                    conn.execute(SQL("LISTEN {0}").format(Identifier(recorder.channel_name)))
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=0.2, stop_after=1):
                            loop.call_soon_threadsafe(wake.set)
            except Exception as exc:  # the database went away: poll until it is back
                log.warning("relay: LISTEN failed (%s); polling", exc)
                stop.wait(1.0)


def _has_listen(app: Snaptree) -> bool:
    recorder = app.recorder
    return hasattr(recorder, "channel_name") and hasattr(getattr(recorder, "datastore", None), "get_connection")


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
