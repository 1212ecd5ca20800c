"""A worker of one host in the scale-out mode: consumes `<prefix>:work:<host>` (group `workers`).

A work item only names a VM (and the notification id that asked for it). The worker calls
the service's worker (service/worker.py), which reads the VM's pending work off the aggregate under
the per-VM file lock and performs it in aggregate-version order. So with any number of workers
per host a VM's work takes effect in version order, and an item delivered twice, or after the
work was already done, finds nothing left to do. Items for one VM that arrive while it is being
drained are coalesced into one more drain.

When a VM is idle again the worker adds `{vm, host, consumer, upto}` to `<prefix>:settled`
(`upto` = the highest notification id whose work is now done) and sends the `stage: "done"`
reply to every request that waits for this VM's work (adapters/redis_streams.py, `watch`).

An item whose drain raises is retried (after the idle time, by any worker of the host); after
`max_failures` attempts it goes to `<prefix>:dead` with the reason. A merge that keeps failing
this way is also recorded as failed on its node (`snaptree merges` shows it, `merge VM NODE`
retries it).

Test hook: `SNAPTREE_TEST_ITEM_SLEEP=<seconds>` sleeps inside an item on its first delivery
(to kill a worker with an item in flight).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

import redis.asyncio as aioredis

from adapters import messages
from adapters.redis_streams import WORK_GROUP, RedisConfig, mark_done
from domain.commands import RecordMergeFailed
from domain.errors import UnknownVM
from domain.tree import MergeState
from domain.work import WorkKind, pending_work
from service.api import Service
from service.worker import Worker
from workers.consumer import Entry, StreamConsumer, consumer_name

log = logging.getLogger(__name__)

TEST_SLEEP_ENV = "SNAPTREE_TEST_ITEM_SLEEP"


class StreamWorker(StreamConsumer):
    def __init__(
        self,
        svc: Service,
        r: aioredis.Redis,
        config: RedisConfig,
        *,
        consumer: str | None = None,
        on_item: Callable[[str, list[Entry]], None] | None = None,
        max_threads: int = 8,
    ) -> None:
        host = svc.host
        super().__init__(
            r, config, config.names.work(host), WORK_GROUP, consumer or consumer_name(f"worker:{host}")
        )
        self.svc = svc
        self.host = host
        self.on_item = on_item
        self._threads = asyncio.Semaphore(max_threads)
        self._failures: dict[str, int] = {}  # entry id -> failed attempts seen by this process
        self._test_sleep = float(os.environ.get(TEST_SLEEP_ENV) or 0)

    def key_of(self, entry: Entry) -> str:
        try:
            vm = messages.unpack(entry.msg or b"").get("vm")
        except Exception:
            vm = None
        return vm if isinstance(vm, str) else ""

    async def handle_lane(self, vm: str, entries: list[Entry]) -> None:
        if self.on_item is not None:
            self.on_item(vm, entries)
        if not vm:
            await self.dead_letter(entries, f"work item from {self.stream} names no VM")
            return
        worn = [e for e in entries if e.deliveries > self.config.max_failures]
        if worn:
            await self._give_up(vm, worn, f"delivered {max(e.deliveries for e in worn)} times without completing")
            entries = [e for e in entries if e not in worn]
            if not entries:
                return
        if self._test_sleep and max(e.deliveries for e in entries) == 1:
            await asyncio.sleep(self._test_sleep)
        svc = self.svc
        worker = Worker(svc.app, svc.data, svc.host, svc.disks, svc.machines)  # one per drain: own failures
        failures_before = 0
        try:
            async with self._threads:
                await asyncio.to_thread(worker.drain, vm)
        except UnknownVM:
            await self.ack(entries)  # no such VM (any more): nothing to do
            return
        except Exception as exc:
            await self._failed(vm, entries, exc)
            return
        new_failures = worker.failures[failures_before:]
        await self.ack(entries)
        for e in entries:
            self._failures.pop(e.id, None)
        await self._settled(vm, entries, "; ".join(new_failures) or None)

    async def _failed(self, vm: str, entries: list[Entry], exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:500]
        attempts = 0
        for e in entries:
            self._failures[e.id] = self._failures.get(e.id, 0) + 1
            attempts = max(attempts, self._failures[e.id], e.deliveries)
        log.warning("%s: VM %s: attempt %d failed: %s", self.consumer, vm, attempts, reason)
        if attempts >= self.config.max_failures:
            await self._give_up(vm, entries, f"failed {attempts} times: {reason}")
        else:
            self.release(entries)  # stays pending: any worker of this host retries it after the idle time

    async def _give_up(self, vm: str, entries: list[Entry], why: str) -> None:
        reason = f"work item for VM {vm!r} from {self.stream}: {why}"
        await asyncio.to_thread(self._record_failed_merge, vm, reason)
        await self.dead_letter(entries, reason)
        for e in entries:
            self._failures.pop(e.id, None)
        await self._settled(vm, entries, reason)

    def _record_failed_merge(self, vm: str, reason: str) -> None:
        """A merge that cannot complete shows up as failed in `snaptree merges`."""
        try:
            agg = self.svc.app.get_vm(vm)
            items = pending_work(agg)
            if items and items[0].kind is WorkKind.MERGE and items[0].node_id is not None:
                node = agg.nodes[items[0].node_id]
                if node.merge_state in (MergeState.SCHEDULED, MergeState.RUNNING):
                    self.svc.app.decide(RecordMergeFailed(vm, node.id, reason), vm=agg)
        except Exception:
            log.exception("%s: could not record the failed merge of VM %s", self.consumer, vm)

    async def _settled(self, vm: str, entries: list[Entry], error: str | None) -> None:
        upto = 0
        for e in entries:
            try:
                value = messages.unpack(e.msg or b"").get("upto")
            except Exception:
                value = None
            if isinstance(value, int):
                upto = max(upto, value)
        msg: dict[str, Any] = {"vm": vm, "host": self.host, "consumer": self.consumer, "upto": upto}
        if error:
            msg["error"] = error
        await self.r.xadd(self.config.names.settled, {"msg": messages.pack(msg)})  # trimmed by the relay
        for request_id, packed in (await mark_done(self.r, self.config.names, vm, upto)).items():
            waiting = messages.unpack(packed)
            rid = request_id.decode()
            reply = (messages.encode_reply(rid, False, stage="done", error=("work_failed", error)) if error
                     else messages.encode_reply(rid, True, stage="done"))
            try:
                async with self.r.pipeline(transaction=False) as p:
                    p.xadd(str(waiting["reply_to"]), {"msg": reply})
                    p.expire(str(waiting["reply_to"]), 86_400)
                    await p.execute()
            except Exception as exc:  # noqa: BLE001 - the producer replaced its stream: nothing to tell
                log.warning("%s: done reply to %s lost: %s", self.consumer, rid, exc)
