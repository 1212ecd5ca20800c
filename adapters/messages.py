"""The queue messages of DESIGN §3b: commands in, replies out, and what is dead-lettered why.

A command entry has one field `msg`, a msgpack map:

    {"command": "snapshot.take", "vm": "web", "args": {"name": "before-upgrade"},
     "request_id": "…", "reply_to": "<prefix>:reply:…"}

A reply entry has one field `msg`: {"request_id", "ok", "events"?, "error"?: {"code", "message"}}.
`events` are the notification ids of the events the command recorded (the same numbers are the
entry ids `<id>-0` in the events stream); a request id that already took effect is answered
`ok: true` with `events: []`.

A message is dead-lettered (never answered) when it cannot be decoded, is not a map, lacks a
field or has one of the wrong type, names an unknown command or argument, is larger than the
limit, or asks for a reply outside `<prefix>:reply:` (unauthorised). A well-formed command that
the domain refuses is answered with `ok: false`.

Plain msgpack only: no extension types are accepted from producers.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import msgpack

MAX_ID_LENGTH = 200


class BadMessage(ValueError):
    """Why a message is dead-lettered (`reason`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Arg:
    type: type | tuple[type, type]  # (list, str): a list of str
    required: bool = False


# Arguments by the CLI's parameter names (DESIGN §3b).
COMMANDS: dict[str, dict[str, Arg]] = {
    "vm.create": {
        "disk": Arg((list, str), required=True),
        "host": Arg(str),
        "copy": Arg(bool),
        "memory": Arg(int),
        "cpus": Arg(int),
    },
    "snapshot.take": {"name": Arg(str, required=True)},
    "snapshot.apply": {"snapshot": Arg(str, required=True)},
    "snapshot.delete": {"snapshot": Arg(str, required=True), "subtree": Arg(bool)},
    "snapshot.rename": {"snapshot": Arg(str, required=True), "new": Arg(str, required=True)},
    "snapshot.revert": {},
    "merge.force": {"node": Arg(str, required=True)},
    "merge": {"node": Arg(str, required=True), "force": Arg(bool)},
}

FIELDS = ("command", "vm", "args", "request_id", "reply_to")


@dataclass(frozen=True)
class Command:
    command: str
    vm: str
    args: dict[str, Any]
    request_id: str
    reply_to: str


def new_request_id() -> str:
    return str(uuid.uuid4())


def encode_command(
    command: str, vm: str, args: dict[str, Any], *, request_id: str, reply_to: str
) -> bytes:
    return msgpack.packb(
        {"command": command, "vm": vm, "args": args, "request_id": request_id, "reply_to": reply_to},
        use_bin_type=True,
    )


def decode_command(raw: object, *, reply_prefix: str, max_bytes: int = 65_536) -> Command:
    """The command in an entry's `msg`, or BadMessage with the reason to dead-letter it."""
    if not isinstance(raw, (bytes, bytearray)):
        raise BadMessage("entry has no msg field")
    if len(raw) > max_bytes:
        raise BadMessage(f"oversized: {len(raw)} bytes > {max_bytes}")
    try:
        data = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types, all mean "not decodable"
        raise BadMessage(f"undecodable: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(data, dict):
        raise BadMessage(f"not a map: {type(data).__name__}")
    for key in data:
        if key not in FIELDS:
            raise BadMessage(f"unexpected field {_show(key)}")
    for key in FIELDS:
        if key not in data:
            raise BadMessage(f"missing field {key!r}")
    command, vm, args = data["command"], data["vm"], data["args"]
    request_id, reply_to = data["request_id"], data["reply_to"]
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_LENGTH:
        raise BadMessage(f"field 'request_id' must be a non-empty string of at most {MAX_ID_LENGTH} characters")
    if not isinstance(reply_to, str):
        raise BadMessage("field 'reply_to' must be a string")
    if not reply_to.startswith(reply_prefix) or len(reply_to) == len(reply_prefix) or len(reply_to) > 300:
        raise BadMessage(f"unauthorised reply_to {_show(reply_to)}: replies go under {reply_prefix!r}")
    if not isinstance(command, str):
        raise BadMessage("field 'command' must be a string")
    spec = COMMANDS.get(command)
    if spec is None:
        raise BadMessage(f"unknown command {_show(command)}")
    if not isinstance(vm, str) or not vm:
        raise BadMessage("field 'vm' must be a non-empty string")
    if not isinstance(args, dict):
        raise BadMessage("field 'args' must be a map")
    for name, value in args.items():
        arg = spec.get(name) if isinstance(name, str) else None
        if arg is None:
            raise BadMessage(f"{command}: unknown argument {_show(name)}")
        if not _fits(value, arg.type):
            raise BadMessage(f"{command}: argument {name!r} must be {_type_name(arg.type)}")
    for name, arg in spec.items():
        if arg.required and name not in args:
            raise BadMessage(f"{command}: missing argument {name!r}")
    return Command(command, vm, dict(args), request_id, reply_to)


def _fits(value: object, kind: type | tuple[type, type]) -> bool:
    if isinstance(kind, tuple):
        outer, inner = kind
        return isinstance(value, outer) and bool(value) and all(_fits(v, inner) for v in value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind: type | tuple[type, type]) -> str:
    if isinstance(kind, tuple):
        return f"a non-empty list of {kind[1].__name__}"
    return {str: "a string", bool: "a boolean", int: "an integer"}.get(kind, kind.__name__)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- replies ---


def encode_reply(
    request_id: str, ok: bool, *, events: list[int] | None = None, error: tuple[str, str] | None = None
) -> bytes:
    msg: dict[str, Any] = {"request_id": request_id, "ok": ok}
    if events is not None:
        msg["events"] = list(events)
    if error is not None:
        msg["error"] = {"code": error[0], "message": error[1]}
    return msgpack.packb(msg, use_bin_type=True)


def decode_reply(raw: bytes) -> dict[str, Any]:
    data = msgpack.unpackb(raw, raw=False)
    if not isinstance(data, dict) or "request_id" not in data or "ok" not in data:
        raise ValueError("not a reply")
    return data


# --- internal streams (written and read by snaptree only) ---


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw: bytes) -> dict[str, Any]:
    data = msgpack.unpackb(raw, raw=False)
    if not isinstance(data, dict):
        raise ValueError("not a map")
    return data


def coerce_cli_args(command: str, pairs: list[str]) -> dict[str, Any]:
    """`k=v` pairs from the command line into a command's args (repeated keys make a list)."""
    spec = COMMANDS.get(command)
    if spec is None:
        raise BadMessage(f"unknown command {command!r}; one of: {', '.join(sorted(COMMANDS))}")
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BadMessage(f"argument {pair!r} is not KEY=VALUE")
        arg = spec.get(key)
        if arg is None:
            raise BadMessage(f"{command}: unknown argument {key!r}; known: {', '.join(spec) or 'none'}")
        if isinstance(arg.type, tuple):
            args.setdefault(key, []).append(value)
        elif arg.type is bool:
            low = value.lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise BadMessage(f"{command}: argument {key!r} must be true or false")
            args[key] = low in ("1", "true", "yes")
        elif arg.type is int:
            try:
                args[key] = int(value)
            except ValueError:
                raise BadMessage(f"{command}: argument {key!r} must be an integer") from None
        else:
            args[key] = value
    for name, arg in spec.items():
        if arg.required and name not in args:
            raise BadMessage(f"{command}: missing argument {name}=...")
    return args
