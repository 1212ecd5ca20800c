"""The queue's messages (docs/queue.md): commands in, replies out, and what is dead-lettered why.

The schema is generated from the command classes (domain/commands.py): a verb is a class's
`verb`, its arguments are the class's fields by the CLI's parameter names, with their types and
limits. So the queue accepts exactly what the CLI and the Python API can ask, and cannot drift.

A command entry has one field `msg`, a msgpack map:

    {"command": "snapshot.take", "vm": "web", "args": {"name": "before-upgrade"},
     "request_id": "…", "reply_to": "<prefix>:reply:…"}

A message that cannot be decoded, is not a map, lacks a field or has one of the wrong type, names
an unknown command or argument, breaks a length limit, is larger than the limit, or asks for a
reply outside `<prefix>:reply:` is dead-lettered; when its `request_id` and an authorised
`reply_to` could be read, it is also answered `ok: false` with code `malformed`. Plain msgpack
only: no extension types are accepted from producers.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

import msgpack

from domain import commands as c

MAX_ID_LENGTH = 200
MAX_REPLY_TO = 300
FIELDS = ("command", "vm", "args", "request_id", "reply_to")
# Verbs kept for producers written against the first release.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {"merge.force": ("merge", {"force": True})}
VM_OPTIONAL = ("vm.list", "merges")  # `vm` may be "" (all VMs)


class BadMessage(ValueError):
    """Why a message is dead-lettered (`reason`), with what could be read of it."""

    def __init__(self, reason: str, request_id: str | None = None, reply_to: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id
        self.reply_to = reply_to


@dataclass(frozen=True)
class Arg:
    """One argument of a verb, as the queue checks it."""

    type: Any  # str | bool | int | (list, str) for a list of strings | an Enum class
    required: bool = False
    nullable: bool = False
    max_len: int | None = None
    max_items: int | None = None
    min: int | None = None
    max: int | None = None
    help: str = ""


def _arg(cls: type, f: Any) -> Arg:
    hint = typing.get_type_hints(cls)[f.name]
    nullable = False
    if typing.get_origin(hint) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable, hint = True, inner[0]
    kind: Any = (list, str) if typing.get_origin(hint) is tuple else hint
    m = f.metadata
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    return Arg(kind, required=required, nullable=nullable,
               max_len=m.get("max_len"), max_items=m.get("max_items"), min=m.get("min"),
               max=m.get("max"), help=m.get("help", ""))


def _spec(cls: type) -> dict[str, Arg]:
    return {f.name: _arg(cls, f) for f in cls.arguments()}  # type: ignore[attr-defined]


REQUESTS: dict[str, type] = c.by_verb()
COMMANDS: dict[str, dict[str, Arg]] = {verb: _spec(cls) for verb, cls in REQUESTS.items()}
COMMANDS.update({alias: {k: v for k, v in COMMANDS[verb].items() if k not in fixed}
                 for alias, (verb, fixed) in ALIASES.items()})


@dataclass(frozen=True)
class Message:
    command: str
    vm: str
    args: dict[str, Any]
    request_id: str
    reply_to: str

    def request(self) -> c.Command | c.Query:
        """The command or query value this message asks for."""
        verb, fixed = ALIASES.get(self.command, (self.command, {}))
        cls = REQUESTS[verb]
        spec = COMMANDS[verb]
        values = {**self.args, **fixed}
        for name, value in values.items():
            kind = spec[name].type
            if isinstance(kind, tuple):
                values[name] = tuple(value)
            elif isinstance(kind, type) and issubclass(kind, Enum) and value is not None:
                values[name] = kind(value)
        vm = self.vm if self.vm or verb not in VM_OPTIONAL else None
        return cls(vm=vm, **values)  # type: ignore[no-any-return]


def new_request_id() -> str:
    return str(uuid.uuid4())


def encode_command(command: str, vm: str, args: dict[str, Any], *, request_id: str, reply_to: str) -> bytes:
    return msgpack.packb({"command": command, "vm": vm, "args": args, "request_id": request_id,
                          "reply_to": reply_to}, use_bin_type=True)


def decode_command(raw: object, *, reply_prefix: str, max_bytes: int = 65_536) -> Message:
    """The command in an entry's `msg`, or BadMessage with the reason to dead-letter it."""
    data = _decode_map(raw, max_bytes)
    request_id = data.get("request_id")
    rid = request_id if isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_LENGTH else None
    reply_to = data.get("reply_to")
    ok_reply = isinstance(reply_to, str) and reply_to.startswith(reply_prefix) \
        and len(reply_prefix) < len(reply_to) <= MAX_REPLY_TO
    known = (rid, reply_to if ok_reply else None)
    try:
        return _check(data, reply_prefix)
    except BadMessage as exc:
        raise BadMessage(exc.reason, *known) from None


def _decode_map(raw: object, max_bytes: int) -> dict[Any, Any]:
    if not isinstance(raw, (bytes, bytearray)):
        raise BadMessage("entry has no msg field")
    if len(raw) > max_bytes:
        raise BadMessage(f"oversized: {len(raw)} bytes > {max_bytes}")
    try:
        data = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types, all mean "not decodable"
        raise BadMessage((f"undecodable: not one msgpack value ({type(exc).__name__}: {exc}); "
                          "send a msgpack map with the fields " + ", ".join(FIELDS))[:400]) from None
    if not isinstance(data, dict):
        raise BadMessage(f"not a map: {type(data).__name__}")
    return data


def _check(data: dict[Any, Any], reply_prefix: str) -> Message:
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
    if not reply_to.startswith(reply_prefix) or len(reply_to) == len(reply_prefix) or len(reply_to) > MAX_REPLY_TO:
        raise BadMessage(f"unauthorised reply_to {_show(reply_to)}: replies go under {reply_prefix!r}")
    if not isinstance(command, str):
        raise BadMessage("field 'command' must be a string")
    spec = COMMANDS.get(command)
    if spec is None:
        raise BadMessage(f"unknown command {_show(command)}; one of: {', '.join(sorted(COMMANDS))}")
    if not isinstance(vm, str) or (not vm and command not in VM_OPTIONAL):
        raise BadMessage("field 'vm' must be a non-empty string")
    if not isinstance(args, dict):
        raise BadMessage("field 'args' must be a map")
    for name, value in args.items():
        arg = spec.get(name) if isinstance(name, str) else None
        if arg is None:
            raise BadMessage(f"{command}: unknown argument {_show(name)}; known: {', '.join(spec) or 'none'}")
        problem = _misfit(value, arg)
        if problem:
            raise BadMessage(f"{command}: argument {name!r} must be {problem}")
    for name, arg in spec.items():
        if arg.required and name not in args:
            raise BadMessage(f"{command}: missing argument {name!r}")
    return Message(command, vm, dict(args), request_id, reply_to)


def _misfit(value: object, arg: Arg) -> str | None:
    """What `value` should have been, or None when it fits."""
    if value is None and arg.nullable:
        return None
    kind = arg.type
    if isinstance(kind, tuple):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            return "a non-empty list of str"
        if arg.max_items is not None and len(value) > arg.max_items:
            return f"a list of at most {arg.max_items} strings"
        if arg.max_len is not None and any(len(v) > arg.max_len for v in value):
            return f"a list of strings of at most {arg.max_len} characters"
        return None
    if isinstance(kind, type) and issubclass(kind, Enum):
        choices = [m.value for m in kind]
        return None if value in choices else "one of " + ", ".join(repr(ch) for ch in choices)
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if kind is bool:
        return None if isinstance(value, bool) else "a boolean"
    if not isinstance(value, str):
        return "a string"
    if arg.max_len is not None and len(value) > arg.max_len:
        return f"a string of at most {arg.max_len} characters"
    return None


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- replies ---


def encode_reply(request_id: str, ok: bool, *, events: list[int] | None = None,
                 error: tuple[str, str] | None = None, result: Any = None, stage: str | None = None,
                 duplicate: bool = False) -> bytes:
    msg: dict[str, Any] = {"request_id": request_id, "ok": ok}
    if stage is not None:
        msg["stage"] = stage
    if events is not None:
        msg["events"] = list(events)
    if duplicate:
        msg["duplicate"] = True
    if result is not None:
        msg["result"] = result
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
