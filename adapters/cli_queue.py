"""CLI for the scale-out mode (Redis Streams + a shared event store): serve, worker stream, submit.

    snaptree serve [--no-relay] [--no-commands] [--workers N]   relay + command consumer + workers
    snaptree worker stream --host H [--workers N]                 more workers for host H
    snaptree submit COMMAND VM [KEY=VALUE ...] [--no-wait] [--timeout S]
    snaptree queue dead [--count N]                               dead letters, newest first

Configuration by environment (adapters/redis_streams.py): SNAPTREE_REDIS_URL, SNAPTREE_REDIS_PREFIX,
SNAPTREE_CLAIM_IDLE_MS, SNAPTREE_MAX_FAILURES, ...; the event store by the `eventsourcing`
variables (PERSISTENCE_MODULE=eventsourcing.postgres, POSTGRES_*). Every host must see the same
data directory path (SNAPTREE_HOME): layer paths are recorded as absolute paths.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import click

from adapters import messages
from adapters.config import this_host
from adapters.storage import DataDir

if TYPE_CHECKING:
    from adapters.cli import Ctx
    from adapters.redis_streams import RedisConfig

# Redis and the workers are imported when a command of this module runs, not for every CLI call.

REFUSAL_EXIT = 2
FAILURE_EXIT = 1


def _config(redis_url: str | None, prefix: str | None, **overrides: Any) -> RedisConfig:
    from adapters.redis_streams import Names, RedisConfig

    return RedisConfig.from_env(
        url=redis_url, names=Names(prefix) if prefix else None, **overrides
    )


def redis_options(fn: Any) -> Any:
    fn = click.option("--prefix", envvar="SNAPTREE_REDIS_PREFIX", help="Key prefix (default snaptree).")(fn)
    fn = click.option("--redis", "redis_url", envvar="SNAPTREE_REDIS_URL",
                      help="Redis URL (redis://, rediss:// for TLS; password in the URL).")(fn)
    return fn


def _serve(ctx: Ctx, host: str | None, redis_url: str | None, prefix: str | None,
           relay: bool, commands: bool, workers: int, grace: float, claim_idle_ms: int | None) -> None:
    from adapters.cli import fail
    from workers.serve import ServeOptions, run_until_signalled, serve

    from redis.exceptions import RedisError

    config = _config(redis_url, prefix, claim_idle_ms=claim_idle_ms)
    data = DataDir.open(ctx.home)
    opts = ServeOptions(host=host or ctx.host or this_host(), relay=relay, commands=commands,
                        workers=workers, grace=grace)
    try:
        status = run_until_signalled(lambda stop: serve(data, config, opts, stop))
    except RedisError as exc:
        fail(FAILURE_EXIT, "redis", f"Redis at {config.url.split('@')[-1]}: {exc}", False)
        return
    sys.exit(status)


def register(main: click.Group) -> None:
    # adapters.cli imports this module while it registers its extensions: import it lazily.
    from adapters.cli import command, emit, fail

    @main.command("serve")
    @redis_options
    @click.option("--relay/--no-relay", default=True, help="Run the relay (event store -> Redis).")
    @click.option("--commands/--no-commands", default=True, help="Run the command consumer.")
    @click.option("--workers", type=click.IntRange(0, 64), default=1, show_default=True,
                  help="Stream workers for this host.")
    @click.option("--grace", type=click.FloatRange(0), default=30.0, show_default=True,
                  help="Seconds in-flight items may take to finish on SIGTERM.")
    @click.option("--claim-idle-ms", type=click.IntRange(10), default=None,
                  help="Reclaim items idle this long (default SNAPTREE_CLAIM_IDLE_MS or 30000).")
    @command
    def serve_cmd(ctx: Ctx, redis_url: str | None, prefix: str | None, relay: bool, commands: bool,
                  workers: int, grace: float, claim_idle_ms: int | None, as_json: bool) -> None:
        """Relay, command consumer and this host's workers (scale-out mode)."""
        _serve(ctx, None, redis_url, prefix, relay, commands, workers, grace, claim_idle_ms)

    worker_group = main.commands.get("worker")
    if not isinstance(worker_group, click.Group):
        @main.group("worker")
        def worker_group() -> None:  # type: ignore[misc]
            """Workers that perform the disk work."""

    @worker_group.command("stream")
    @click.option("--host", "host", help="The host whose work stream to consume (default: this host).")
    @redis_options
    @click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True)
    @click.option("--grace", type=click.FloatRange(0), default=30.0, show_default=True)
    @click.option("--claim-idle-ms", type=click.IntRange(10), default=None)
    @command
    def worker_stream(ctx: Ctx, host: str | None, redis_url: str | None, prefix: str | None,
                      workers: int, grace: float, claim_idle_ms: int | None, as_json: bool) -> None:
        """Consume HOST's work stream from Redis (scale-out mode); add as many as you like."""
        _serve(ctx, host, redis_url, prefix, False, False, workers, grace, claim_idle_ms)

    @main.command("submit", context_settings={"ignore_unknown_options": False})
    @click.argument("verb", metavar="COMMAND")
    @click.argument("vm_name", metavar="VM")
    @click.argument("pairs", metavar="[KEY=VALUE]...", nargs=-1)
    @redis_options
    @click.option("--no-wait", is_flag=True, help="Print the request id and return at once.")
    @click.option("--timeout", type=click.FloatRange(0.1), default=60.0, show_default=True,
                  help="Seconds to wait for the reply and the work.")
    @click.option("--request-id", help="Use this request id (a retry with the same id takes effect once).")
    @command
    def submit_cmd(ctx: Ctx, verb: str, vm_name: str, pairs: tuple[str, ...], redis_url: str | None,
                   prefix: str | None, no_wait: bool, timeout: float, request_id: str | None,
                   as_json: bool) -> None:
        """Submit COMMAND (e.g. snapshot.take) for VM to the commands stream and wait for it.

        Arguments by the CLI's names: vm.create disk=PATH [disk=PATH] [host=H]; snapshot.take
        name=N; snapshot.apply snapshot=S; snapshot.delete snapshot=S [subtree=true];
        snapshot.rename snapshot=S new=N; snapshot.revert; merge.force node=NODE.
        """
        try:
            args = messages.coerce_cli_args(verb, list(pairs))
            if verb == "vm.create":
                args["disk"] = [_absolute_disk(spec) for spec in args["disk"]]
        except messages.BadMessage as exc:
            fail(REFUSAL_EXIT, "usage", exc.reason, as_json)
            return
        config = _config(redis_url, prefix)
        from redis.exceptions import RedisError

        rid = request_id or messages.new_request_id()
        try:
            result = asyncio.run(submit(config, verb, vm_name, args, rid, wait=not no_wait, timeout=timeout))
        except RedisError as exc:
            fail(FAILURE_EXIT, "redis", f"Redis at {config.url.split('@')[-1]}: {exc}", as_json)
            return
        if no_wait:
            emit({"request_id": rid}, as_json, rid)
            return
        if result.get("error"):
            err = result["error"]
            status = FAILURE_EXIT if err.get("code") in ("failed", "timeout", "merge_failed") else REFUSAL_EXIT
            fail(status, err.get("code", "error"), err.get("message", ""), as_json)
            return
        events = result.get("events") or []
        emit(result, as_json, f"ok: {verb} {vm_name} (request {rid}; {len(events)} event(s)"
             + (", work done)" if result.get("settled") else ")"))

    @main.group("queue")
    def queue() -> None:
        """Inspect the scale-out queues."""

    @queue.command("dead")
    @redis_options
    @click.option("--count", type=click.IntRange(1), default=20, show_default=True)
    @command
    def queue_dead(ctx: Ctx, redis_url: str | None, prefix: str | None, count: int, as_json: bool) -> None:
        """Dead letters (newest first): the original message and why it was set aside."""
        config = _config(redis_url, prefix)
        rows = asyncio.run(dead_letters(config, count))
        emit(rows, as_json, "\n".join(f"{r['id']}\t{r['reason']}" for r in rows) or "no dead letters")


def _absolute_disk(spec: str) -> str:
    """`PATH` or `NAME=PATH`, with PATH made absolute here (the consumer runs elsewhere)."""
    import os

    name, sep, path = spec.partition("=")
    if sep and "/" not in name:
        return f"{name}={os.path.abspath(path)}"
    return os.path.abspath(spec)


async def submit(config: RedisConfig, verb: str, vm: str, args: dict[str, Any], request_id: str,
                 *, wait: bool, timeout: float) -> dict[str, Any]:
    """Submit one command; with `wait`, return its reply once its work is done too."""
    from adapters.redis_streams import id_str

    names = config.names
    r = config.connect()
    try:
        reply_to = names.reply(uuid.uuid4().hex)
        last = await r.xrevrange(names.settled, "+", "-", count=1)
        settled_from = id_str(last[0][0]) if last else "0-0"
        msg = messages.encode_command(verb, vm, args, request_id=request_id, reply_to=reply_to)
        await r.xadd(names.commands, {"msg": msg})
        if not wait:
            return {"request_id": request_id}
        deadline = time.monotonic() + timeout
        reply: dict[str, Any] | None = None
        while reply is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return _timeout(request_id, "no reply")
            resp = await r.xread({reply_to: "0-0"}, count=1, block=max(1, int(min(left, 1.0) * 1000)))
            for _stream, items in resp or []:
                for _id, fields in items:
                    reply = messages.decode_reply(fields[b"msg"])
        await r.delete(reply_to)
        if not reply.get("ok"):
            return reply
        events = reply.get("events") or []
        if not events:
            return reply
        upto = max(events)
        cursor = settled_from
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return _timeout(request_id, "recorded, but its work was not done in time", reply)
            resp = await r.xread({names.settled: cursor}, count=100, block=max(1, int(min(left, 1.0) * 1000)))
            for _stream, items in resp or []:
                for entry_id, fields in items:
                    cursor = id_str(entry_id)
                    note = messages.unpack(fields[b"msg"])
                    if note.get("vm") == vm and int(note.get("upto") or 0) >= upto:
                        out = dict(reply, settled=True)
                        if note.get("error"):
                            out["ok"] = False
                            out["error"] = {"code": "failed", "message": str(note["error"])}
                        return out
    finally:
        await r.aclose()


def _timeout(request_id: str, what: str, reply: dict[str, Any] | None = None) -> dict[str, Any]:
    out = dict(reply or {"request_id": request_id})
    out["ok"] = False
    out["error"] = {"code": "timeout", "message": f"request {request_id}: {what}"}
    return out


async def dead_letters(config: RedisConfig, count: int) -> list[dict[str, Any]]:
    from adapters.redis_streams import id_str

    r = config.connect()
    try:
        rows = []
        for entry_id, fields in await r.xrevrange(config.names.dead, "+", "-", count=count):
            raw = fields.get(b"msg", b"")
            try:
                shown: Any = messages.unpack(raw)
            except Exception:
                shown = raw.hex()
            rows.append({"id": id_str(entry_id), "reason": fields.get(b"reason", b"").decode(errors="replace"),
                         "msg": _jsonable(shown)})
        return rows
    finally:
        await r.aclose()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)
