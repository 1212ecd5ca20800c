"""32 producers x 50 commands on 4 VMs of two hosts, through two command consumers and the
hosts' workers: every command is answered, and the final trees are exactly what the answers say —
optimistic concurrency is retried, no update is lost, and the files match the trees."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from adapters.storage import DataDir
from tests.redis_harness import call, check_tree_on_disk, make_cluster, own_disk, visible_names, wait_idle

PRODUCERS = 32
COMMANDS = 50
TAKE_EVERY = 25  # 2 takes and 48 renames per producer: 16 overlays (chain depth 16) per VM


async def test_32_producers_x_50_commands_on_4_vms(
    tmp_path: Path, pg_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in pg_env.items():
        monkeypatch.setenv(k, v)
    cluster = make_cluster(tmp_path, pg_env)
    # Two hosts, each one `serve` (relay, command consumer, worker): two command consumers take
    # commands for the same VMs at once, so saves collide and are decided again.
    cluster.serve("hostA")
    cluster.serve("hostB")
    cluster.wait_ready()
    r = cluster.connect()
    app = cluster.app()
    vms = {"a1": "hostA", "a2": "hostA", "b1": "hostB", "b2": "hostB"}
    try:
        for vm, host in vms.items():
            assert (await call(r, cluster.names, "vm.create", vm, {"disk": [own_disk(tmp_path, vm)], "host": host}))["ok"]
        order = list(vms)

        async def producer(p: int) -> tuple[str, list[str], list[dict[str, Any]]]:
            vm = order[p % len(order)]
            replies = []
            current = None
            final: list[str] = []
            for k in range(COMMANDS):
                if k % TAKE_EVERY == 0:  # take a snapshot, then rename it again and again
                    name = f"p{p}-{k}"
                    reply = await call(r, cluster.names, "snapshot.take", vm, {"name": name}, timeout=120)
                    if current:
                        final.append(current)
                else:
                    name = f"p{p}-{k}"
                    reply = await call(r, cluster.names, "snapshot.rename", vm, {"snapshot": current, "new": name},
                                       timeout=120)
                replies.append(reply)
                if reply["ok"]:
                    current = name
            final.append(current)
            return vm, final, replies

        t0 = time.monotonic()
        results = await asyncio.gather(*(producer(p) for p in range(PRODUCERS)))
        elapsed = time.monotonic() - t0
        replies = [rep for _, _, reps in results for rep in reps]
        assert len(replies) == PRODUCERS * COMMANDS
        assert all(rep["ok"] for rep in replies), [rep for rep in replies if not rep["ok"]][:5]
        assert len({rep["request_id"] for rep in replies}) == len(replies)
        print(f"{len(replies)} commands answered in {elapsed:.1f} s ({len(replies) / elapsed:.0f}/s)")

        await wait_idle(app, list(vms), timeout=120, cluster=cluster)
        data = DataDir.open(cluster.home)
        for vm in vms:
            expected = sorted(name for v, final, _ in results if v == vm for name in final)
            assert visible_names(app, vm) == expected  # no lost update
            assert len(expected) == PRODUCERS // len(vms) * (COMMANDS // TAKE_EVERY)
            check_tree_on_disk(app, vm, data)
    finally:
        await r.aclose()
        cluster.stop()
