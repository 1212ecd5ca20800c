"""The scale-out mode's commands (Redis Streams + a shared event store): serve, worker stream,
submit, queue dead.

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
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import click

from adapters.cli.app import Ctx, main
from adapters.cli.output import FAILED, REFUSED, command, emit, fail
from adapters.cli.worker import worker as worker_group

if TYPE_CHECKING:
    from adapters.redis_streams import RedisConfig


def _config(redis_url: str | None, prefix: str | None, **overrides: Any) -> RedisConfig:
    from adapters.redis_streams import Names, RedisConfig

    return RedisConfig.from_env(url=redis_url, names=Names(prefix) if prefix else None, **overrides)


def redis_options(fn: Any) -> Any:
    fn = click.option("--prefix", envvar="SNAPTREE_REDIS_PREFIX", help="Key prefix (default snaptree).")(fn)
    fn = click.option("--redis", "redis_url", envvar="SNAPTREE_REDIS_URL",
                      help="Redis URL (redis://, rediss:// for TLS; password in the URL).")(fn)
    return fn


def _serve(ctx: Ctx, host: str | None, redis_url: str | None, prefix: str | None,
           relay: bool, commands: bool, workers: int, grace: float, claim_idle_ms: int | None) -> None:
    from redis.exceptions import RedisError

    from adapters.config import this_host
    from adapters.storage import DataDir
    from workers.serve import ServeOptions, run_until_signalled, serve

    config = _config(redis_url, prefix, claim_idle_ms=claim_idle_ms)
    data = DataDir.open(ctx.home)
    opts = ServeOptions(host=host or ctx.host or this_host(), relay=relay, commands=commands,
                        workers=workers, grace=grace)
    try:
        status = run_until_signalled(lambda stop: serve(data, config, opts, stop))
    except RedisError as exc:
        fail(FAILED, "redis", f"Redis at {config.url.split('@')[-1]}: {exc}", False)
    sys.exit(status)


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


@main.command("submit")
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

    Arguments by the CLI's parameter names, KEY=VALUE (docs/queue.md lists every command):
    vm.create disk=PATH [disk=PATH] [host=H]; snapshot.take name=N [memory=false];
    snapshot.apply snapshot=S [paused=true]; snapshot.delete snapshot=S [subtree=true];
    tree; merges; vm.status; ... A read prints its result, exactly as the CLI's --json does.
    """
    from redis.exceptions import RedisError

    from adapters import messages

    try:
        args = messages.coerce_cli_args(verb, list(pairs))
        if verb == "vm.create":
            args["disk"] = [_absolute_disk(spec) for spec in args["disk"]]
    except messages.BadMessage as exc:
        fail(REFUSED, "usage", exc.reason, as_json)
    config = _config(redis_url, prefix)
    rid = request_id or messages.new_request_id()
    try:
        result = asyncio.run(submit(config, verb, vm_name, args, rid, wait=not no_wait, timeout=timeout))
    except RedisError as exc:
        fail(FAILED, "redis", f"Redis at {config.url.split('@')[-1]}: {exc}", as_json)
    if no_wait:
        emit({"request_id": rid}, as_json, rid)
        return
    if result.get("error"):
        err = result["error"]
        status = FAILED if err.get("code") in ("failed", "timeout", "work_failed", "store") else REFUSED
        fail(status, err.get("code", "error"), err.get("message", ""), as_json)
    if "result" in result:
        emit(result["result"] if as_json else result, as_json, _show(result["result"]))
        return
    events = result.get("events") or []
    emit(result, as_json, f"ok: {verb} {vm_name} (request {rid}; {len(events)} event(s)"
         + (", work done)" if result.get("settled") else ")"))


def _show(result: Any) -> str:
    import json

    return json.dumps(result, indent=2)


def _absolute_disk(spec: str) -> str:
    """`PATH` or `NAME=PATH`, with PATH made absolute here (the consumer runs elsewhere)."""
    name, sep, path = spec.partition("=")
    if sep and "/" not in name:
        return f"{name}={os.path.abspath(path)}"
    return os.path.abspath(spec)


async def submit(config: RedisConfig, verb: str, vm: str, args: dict[str, Any], request_id: str,
                 *, wait: bool, timeout: float) -> dict[str, Any]:
    """Submit one command; with `wait`, return its last reply: the decision, or for a command
    with host work the `stage: "done"` reply that follows once the work is done."""
    from adapters import messages

    names = config.names
    r = config.connect()
    try:
        reply_to = names.reply(uuid.uuid4().hex)
        msg = messages.encode_command(verb, vm, args, request_id=request_id, reply_to=reply_to)
        await r.xadd(names.commands, {"msg": msg})
        if not wait:
            return {"request_id": request_id}
        deadline = time.monotonic() + timeout
        cursor = "0-0"
        first: dict[str, Any] | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                what = "recorded, but its work was not done in time" if first else "no reply"
                return _timeout(request_id, what, first)
            resp = await r.xread({reply_to: cursor}, count=10, block=max(1, int(min(left, 1.0) * 1000)))
            for _stream, items in resp or []:
                for entry_id, fields in items:
                    cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    reply = messages.decode_reply(fields[b"msg"])
                    if reply.get("stage") == "recorded":
                        first = reply
                        continue
                    await r.delete(reply_to)
                    if first is not None:  # the "done" reply: keep the decision's events
                        return dict(first, **reply, events=first.get("events", []), settled=True)
                    # A decision with no host work to wait for (or a read, or a refusal).
                    return dict(reply, settled=True) if reply.get("ok") else reply
    finally:
        await r.aclose()


def _timeout(request_id: str, what: str, reply: dict[str, Any] | None = None) -> dict[str, Any]:
    out = dict(reply or {"request_id": request_id})
    out["ok"] = False
    out["error"] = {"code": "timeout", "message": f"request {request_id}: {what}"}
    return out


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


async def dead_letters(config: RedisConfig, count: int) -> list[dict[str, Any]]:
    from adapters import messages
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
            row = {"id": id_str(entry_id), "reason": fields.get(b"reason", b"").decode(errors="replace"),
                   "msg": _jsonable(shown)}
            for key in ("entry_id", "stream", "request_id"):
                if key.encode() in fields:
                    row[key] = fields[key.encode()].decode(errors="replace")
            rows.append(row)
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
