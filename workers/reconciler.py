"""Re-creates the work that Redis forgot: the event store is the only truth.

When Redis loses data (a restart without persistence, FLUSHALL) the work streams lose the items
nobody had taken yet. The aggregates still say what is pending (`domain.work.pending_work`), so
the relay, before it publishes anything into the new, empty Redis, calls `reconcile`: one wake-up
item per VM that has pending work, in its host's work stream. Workers drain a VM from its
aggregate, so one item per VM is enough, and an item for work already done costs one read.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis

from adapters import messages
from adapters.redis_streams import Names
from domain.application import Snaptree
from domain.errors import UnknownVM
from domain.work import pending_work

log = logging.getLogger(__name__)

# XADD with an id that keeps every later relay id (<notification id>-0, > position) valid:
# <max(position, last-generated ms)>-<next sequence>.
_ADD_AFTER = """
local key = KEYS[1]
local ms = tonumber(ARGV[1])
if redis.call('EXISTS', key) == 1 then
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local last = tonumber(string.match(info[i + 1], '^(%d+)-'))
      if last > ms then ms = last end
    end
  end
end
return redis.call('XADD', key, ms .. '-*', 'msg', ARGV[2])
"""


def vms_with_work(app: Snaptree) -> list[tuple[str, str]]:
    """(VM name, host) of every VM whose aggregate still asks for side effects."""
    found: list[tuple[str, str]] = []
    for name in app.vm_names():
        try:
            vm = app.get_vm(name)
        except UnknownVM:
            continue
        if pending_work(vm):
            found.append((name, vm.host))
    return found


async def reconcile(app: Snaptree, r: aioredis.Redis, names: Names, position: int) -> int:
    """Queue one wake-up per VM with pending work; returns how many were queued."""
    found = await asyncio.to_thread(vms_with_work, app)
    for name, host in found:
        msg = messages.pack({"vm": name, "upto": position, "reconcile": True})
        await r.eval(_ADD_AFTER, 1, names.work(host), position, msg)
    if found:
        log.info("reconciled %d VM(s) with pending work after Redis lost data", len(found))
    return len(found)


__all__: list[Any] = ["reconcile", "vms_with_work"]
