"""Command consumers take turns per VM (adapters/redis_streams.py, `vm_turn`)."""

from __future__ import annotations

import asyncio
import uuid

from adapters.redis_streams import Names, vm_turn
from tests.redis_harness import SHARED_REDIS

import redis.asyncio as aioredis


def test_one_consumer_at_a_time_decides_for_a_vm_and_a_dead_ones_turn_lapses() -> None:
    async def go() -> None:
        r = aioredis.from_url(SHARED_REDIS)
        names = Names(f"st-test-{uuid.uuid4().hex[:10]}")
        order: list[str] = []
        try:
            async def consumer(token: str, hold: float) -> None:
                async with vm_turn(r, names, "web", token):
                    order.append(f"{token} in")
                    await asyncio.sleep(hold)
                    order.append(f"{token} out")

            await asyncio.gather(consumer("a", 0.2), consumer("b", 0.0), consumer("c", 0.0))
            assert len(order) == 6
            for i in range(0, 6, 2):  # turns never overlap: each one ends before the next begins
                who = order[i].split()[0]
                assert order[i:i + 2] == [f"{who} in", f"{who} out"], order
            assert not await r.exists(names.turn("web"))  # given up by the last one
            await r.set(names.turn("web"), "dead-consumer", px=300)  # its holder died
            loop = asyncio.get_running_loop()
            t = loop.time()
            async with vm_turn(r, names, "web", "d"):
                assert await r.get(names.turn("web")) == b"d"
            assert 0.2 < loop.time() - t < 2.0
        finally:
            await r.delete(names.turn("web"))
            await r.aclose()

    asyncio.run(go())
