"""The name rules, one validator per kind of name (docs/semantics.md, "Names").

Every name is normalised to Unicode NFC before it is compared or stored, so two spellings that
look the same (an "é" typed as one code point or as "e" plus a combining accent) are one name.
A VM name becomes a directory in the data directory and a snapshot name is shown everywhere, so
both must be one safe path component. A disk name also becomes a QEMU id and part of QEMU node
names (31 characters at most), hence its narrower rule. Each refusal says which rule it broke.
"""

from __future__ import annotations

import re
import unicodedata
from uuid import UUID, uuid5

from domain.errors import InvalidName

MAX_NAME_LENGTH = 200
DISK_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,17}$"
_DISK_NAME = re.compile(DISK_NAME_PATTERN)


def normalize(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def validate_name(name: object, what: str = "name") -> str:
    """The NFC form of `name` if it is safe to show and to use as one path component."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be a string, not {type(name).__name__}")
    name = normalize(name)
    if not name or not name.strip():
        raise InvalidName(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    if "/" in name or "\\" in name:
        raise InvalidName(f"{what} {name!r} must not contain a path separator ('/' or '\\')")
    if name == ".":
        raise InvalidName(f"{what} must not be '.' (it names the directory itself)")
    if ".." in name:
        raise InvalidName(f"{what} {name!r} must not contain '..'")
    if name.startswith("-"):
        raise InvalidName(f"{what} {name!r} must not start with '-' (it would read as an option)")
    for ch in name:
        if ch == "\0" or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            raise InvalidName(f"{what} {name!r} must not contain control or format characters")
    return name


def vm_name(name: object) -> str:
    return validate_name(name, "VM name")


def snapshot_name(name: object) -> str:
    return validate_name(name, "snapshot name")


def host_name(name: object) -> str:
    return validate_name(name, "host name")


def disk_name(name: object) -> str:
    """A disk name: also a QEMU device id and the stem of QEMU node names."""
    if not isinstance(name, str):
        raise InvalidName(f"disk name must be a string, not {type(name).__name__}")
    name = normalize(name)
    if not _DISK_NAME.match(name):
        raise InvalidName(
            f"disk name {name!r} must be a letter followed by at most 17 letters, digits,"
            " '_' or '-' (it becomes a QEMU device id)"
        )
    return name


# VM ids derive from names, so a name finds its aggregate without an index and a second
# `vm create` of the same name collides on the aggregate's first version.
VM_NAMESPACE = UUID("5d0c6c1e-3b0e-4b8e-9a53-6e1f0f2b7a11")


def vm_id(name: str) -> UUID:
    return uuid5(VM_NAMESPACE, normalize(name))
