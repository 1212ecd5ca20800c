"""Redis Streams for the scale-out mode: configuration, stream names, connection, safe trimming.

Every key lives under one prefix (default `snaptree`, `SNAPTREE_REDIS_PREFIX`), so several
installations or test runs share one Redis without seeing each other:

    <prefix>:commands        producers' commands (group `commands`, see adapters/messages.py)
    <prefix>:reply:<any>     where replies go (a command's `reply_to` must be under this prefix)
    <prefix>:events          every domain event, entry id `<notification id>-0` (the relay)
    <prefix>:work:<host>     wake-ups for the VMs of one host (group `workers`), same ids
    <prefix>:settled         "VM x has no work left as of notification N" (for waiting clients)
    <prefix>:dead            dead letters: fields `msg` (the original bytes) and `reason`
    <prefix>:watch:<vm>      requests waiting for their host work (request id -> reply_to, upto)
    <prefix>:done:<vm>       the highest notification id whose host work on the VM is done
    <prefix>:epoch           present while Redis still holds what the relay wrote (see relay)
    <prefix>:relay:leader    the relay's leader lock

Configuration by environment:

    SNAPTREE_REDIS_URL           redis://[:password@]host:port/db, rediss://... for TLS
                                 (e.g. rediss://:pw@h:6380/0?ssl_ca_certs=/etc/ssl/ca.pem)
    SNAPTREE_REDIS_PREFIX        key prefix (default snaptree)
    SNAPTREE_CLAIM_IDLE_MS       an item un-acknowledged this long is reclaimed (default 30000)
    SNAPTREE_MAX_FAILURES        attempts before an item is dead-lettered (default 5)
    SNAPTREE_MAX_MESSAGE_BYTES   larger command messages are dead-lettered (default 65536)
    SNAPTREE_EVENTS_MAXLEN       entries kept in the events stream (default 100000)
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

DEFAULT_URL = "redis://127.0.0.1:6379/0"
COMMAND_GROUP = "commands"
WORK_GROUP = "workers"


@dataclass(frozen=True)
class Names:
    prefix: str = "snaptree"

    @property
    def commands(self) -> str:
        return f"{self.prefix}:commands"

    @property
    def reply_prefix(self) -> str:
        return f"{self.prefix}:reply:"

    def reply(self, client: str) -> str:
        return f"{self.reply_prefix}{client}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    def work(self, host: str) -> str:
        return f"{self.prefix}:work:{host}"

    @property
    def settled(self) -> str:
        return f"{self.prefix}:settled"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    def watch(self, vm: str) -> str:
        return f"{self.prefix}:watch:{vm}"

    def done(self, vm: str) -> str:
        return f"{self.prefix}:done:{vm}"

    def turn(self, vm: str) -> str:
        return f"{self.prefix}:turn:{vm}"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:epoch"

    @property
    def relay_leader(self) -> str:
        return f"{self.prefix}:relay:leader"


def _int_env(environ: dict[str, str], key: str, default: int, minimum: int = 1) -> int:
    raw = environ.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{key} must be an integer, not {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{key} must be at least {minimum}, not {value}")
    return value


@dataclass(frozen=True)
class RedisConfig:
    url: str = DEFAULT_URL
    names: Names = field(default_factory=Names)
    claim_idle_ms: int = 30_000
    max_failures: int = 5
    max_message_bytes: int = 65_536
    events_maxlen: int = 100_000

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> RedisConfig:
        env = dict(os.environ if environ is None else environ)
        values: dict[str, object] = dict(
            url=env.get("SNAPTREE_REDIS_URL") or DEFAULT_URL,
            names=Names(env.get("SNAPTREE_REDIS_PREFIX") or "snaptree"),
            claim_idle_ms=_int_env(env, "SNAPTREE_CLAIM_IDLE_MS", 30_000, 10),
            max_failures=_int_env(env, "SNAPTREE_MAX_FAILURES", 5),
            max_message_bytes=_int_env(env, "SNAPTREE_MAX_MESSAGE_BYTES", 65_536, 256),
            events_maxlen=_int_env(env, "SNAPTREE_EVENTS_MAXLEN", 100_000),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def claim_interval(self) -> float:
        """How often a consumer looks for items idle longer than `claim_idle_ms` (seconds)."""
        return max(0.05, self.claim_idle_ms / 4000)

    def connect(self) -> aioredis.Redis:
        return connect(self.url)


def connect(url: str) -> aioredis.Redis:
    """A client for `url`: passwords (redis://:pw@...) and TLS (rediss://) come with the URL."""
    # Blocking reads here never block longer than a second or two, well inside the timeout.
    return aioredis.from_url(url, decode_responses=False, health_check_interval=30, socket_timeout=15)


async def ensure_group(r: aioredis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (from the stream's start) and the stream if missing."""
    try:
        await r.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def is_nogroup(exc: BaseException) -> bool:
    """Redis lost the stream or its group (FLUSHALL, restart without persistence)."""
    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


def id_str(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def id_ms(entry_id: bytes | str) -> int:
    return int(id_str(entry_id).split("-", 1)[0])


# Trim a stream without ever dropping an entry that a consumer group has not acknowledged:
# entries below the oldest pending entry of every group, and at or below every group's
# last-delivered id, are the only candidates; of those, only the ones beyond MAXLEN go.
_SAFE_TRIM = """
local key = KEYS[1]
local maxlen = tonumber(ARGV[1])
if redis.call('EXISTS', key) == 0 then return 0 end
local len = redis.call('XLEN', key)
if len <= maxlen then return 0 end
local cut = redis.call('XREVRANGE', key, '+', '-', 'COUNT', maxlen + 1)
local floor = cut[#cut][1]
local function lower(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  if am < bm or (am == bm and as < bs) then return a end
  return b
end
local groups = redis.call('XINFO', 'GROUPS', key)
for _, g in ipairs(groups) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  floor = lower(floor, last)
  local pending = redis.call('XPENDING', key, name)
  if pending[1] > 0 then floor = lower(floor, pending[2]) end
end
return redis.call('XTRIM', key, 'MINID', floor)
"""


async def safe_trim(r: aioredis.Redis, stream: str, maxlen: int) -> int:
    """Keep about `maxlen` entries; never drop one a consumer group has not acknowledged."""
    return int(await r.eval(_SAFE_TRIM, 1, stream, maxlen))


# A request whose host work is still to be done waits in the VM's watch hash. Whoever comes
# second — the command consumer registering it, or the host's worker marking the work done —
# finds the other's mark and posts the "done" reply; HDEL decides who, so it is posted once.
# KEYS[1] = watch hash, KEYS[2] = done key; ARGV = request id, packed watch, upto.
_WATCH = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], 86400000)
local done = tonumber(redis.call('GET', KEYS[2]) or '0')
if done >= tonumber(ARGV[3]) then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""

# KEYS[1] = done key; ARGV[1] = upto. Raises the mark, never lowers it.
_DONE = """
local done = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > done then redis.call('SET', KEYS[1], ARGV[1], 'PX', 86400000) end
return 1
"""


async def watch(r: aioredis.Redis, names: Names, vm: str, request_id: str, packed: bytes, upto: int) -> bool:
    """Register a request for its "done" reply; True when its work is done already (reply now)."""
    return bool(await r.eval(_WATCH, 2, names.watch(vm), names.done(vm), request_id, packed, upto))


async def mark_done(r: aioredis.Redis, names: Names, vm: str, upto: int) -> dict[bytes, bytes]:
    """Record that the VM's host work up to notification `upto` is done; returns the watches
    it settles (request id -> packed watch), each removed so that only this caller replies."""
    await r.eval(_DONE, 1, names.done(vm), upto)
    settled: dict[bytes, bytes] = {}
    for request_id, packed in (await r.hgetall(names.watch(vm))).items():
        try:
            wanted = int(msgpack.unpackb(packed, raw=False)["upto"])
        except Exception:  # noqa: BLE001 - not ours: drop it
            wanted = 0
        if wanted <= upto and await r.hdel(names.watch(vm), request_id):
            settled[request_id] = packed
    return settled


# KEYS[1] = turn key; ARGV[1] = token. Only the holder gives its turn up.
_GIVE_UP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@asynccontextmanager
async def vm_turn(r: aioredis.Redis, names: Names, vm: str, token: str, *,
                  ttl_ms: int = 10_000, wait_s: float = 5.0) -> AsyncIterator[None]:
    """One command consumer at a time decides for a VM. Consumers that decided for the same VM at
    once would lose the save to each other (optimistic concurrency), reload the aggregate and
    decide again, over and over: four consumers were slower than one. The turn is only a way to
    take turns: correctness never rests on it (the event store still refuses a stale save), so a
    turn held by a dead consumer lapses after `ttl_ms`, and one not had within `wait_s` is not
    waited for."""
    key = names.turn(vm)
    deadline = asyncio.get_running_loop().time() + wait_s
    pause = 0.001
    while not await r.set(key, token, nx=True, px=ttl_ms):
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.01)
    try:
        yield
    finally:
        await r.eval(_GIVE_UP, 1, key, token)
