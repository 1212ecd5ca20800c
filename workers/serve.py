"""`snaptree serve` and `snaptree worker stream`: the scale-out processes, in asyncio.

`serve` runs, in one process, the relay (event store -> Redis), the command consumer (commands
stream -> application -> replies) and this host's stream workers; `worker stream --host H` runs
only stream workers, to add capacity on a host. Each part has its own application instance (its
own aggregate cache and database connections); eventsourcing is called through threads.

SIGTERM or SIGINT: stop reading, let in-flight items finish for `grace` seconds, hand the rest
back to the group (another consumer claims them at once), release the relay's lock, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import random
from typing import Awaitable, Callable, TypeVar

from eventsourcing.persistence import PersistenceError

from adapters.config import open_app
from adapters.redis_streams import COMMAND_GROUP, WORK_GROUP, RedisConfig, ensure_group
from adapters.storage import DataDir
from domain.application import Snaptree
from service.api import Service
from service.bootstrap import open_service
from workers.command_consumer import CommandConsumer
from workers.relay import Relay
from workers.stream_worker import StreamWorker

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServeOptions:
    host: str
    relay: bool = True
    commands: bool = True
    workers: int = 1
    grace: float = 30.0


async def serve(data: DataDir, config: RedisConfig, opts: ServeOptions, stop: asyncio.Event) -> None:
    r = config.connect()
    try:
        parts: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if opts.relay:
            relay = await _retrying(lambda: Relay(_open_app(data), r, config))
            parts.append(("relay", lambda: relay.run(stop)))
        if opts.commands:
            await ensure_group(r, config.names.commands, COMMAND_GROUP)
            consumer = CommandConsumer(await _retrying(lambda: _service(data, opts.host)), r, config)
            parts.append((consumer.consumer, lambda: consumer.run(stop, opts.grace)))
        if opts.workers > 0:
            await ensure_group(r, config.names.work(opts.host), WORK_GROUP)
            svc = await _retrying(lambda: _service(data, opts.host))
            for _ in range(opts.workers):
                worker = StreamWorker(svc, r, config)
                parts.append((worker.consumer, _bind(worker, stop, opts.grace)))
        if not parts:
            raise ValueError("nothing to run: give --relay, --commands or --workers N")
        print(
            f"snaptree serve: ready host={opts.host} prefix={config.names.prefix} pid={os.getpid()} "
            + " ".join(name for name, _ in parts),
            file=sys.stderr, flush=True,
        )
        await asyncio.gather(*(run() for _, run in parts))
    finally:
        await r.aclose()


def _open_app(data: DataDir) -> Snaptree:
    return open_app(data)


def _service(data: DataDir, host: str) -> Service:
    """Each role its own service: its own aggregate cache and database connections."""
    return open_service(str(data.root), host)


async def _retrying(make: Callable[[], T]) -> T:
    """Processes starting together race on PostgreSQL's `CREATE OR REPLACE FUNCTION` /
    `CREATE TABLE IF NOT EXISTS` ("tuple concurrently updated"): try again shortly."""
    for attempt in range(10):
        try:
            return await asyncio.to_thread(make)
        except PersistenceError as exc:
            if attempt == 9:
                raise
            log.info("opening the event store: %s; retrying", exc)
            await asyncio.sleep(random.uniform(0.05, 0.3))
    raise AssertionError("unreachable")


def _bind(worker: StreamWorker, stop: asyncio.Event, grace: float) -> Callable[[], Awaitable[None]]:
    return lambda: worker.run(stop, grace)


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `main(stop)`; SIGTERM/SIGINT set `stop`. Returns the exit status (0 on a clean stop)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="snaptree")
    loop.set_default_executor(executor)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(main(stop))
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
    executor.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + 2.0
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    # A side effect still running in a thread after the grace period (its item was handed
    # back): every item is crash-safe, so leave now rather than wait for it.
    if any(t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


__all__ = ["ServeOptions", "serve", "run_until_signalled", "logging"]
