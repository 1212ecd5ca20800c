"""Validation of user-given names (VM names become directory names in the data directory)."""

from __future__ import annotations

import unicodedata

from domain.errors import InvalidName

MAX_NAME_LENGTH = 200


def validate_name(name: object, what: str = "name") -> str:
    """Return `name` if it is safe to show and to use as one path component, else refuse."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be a string, not {type(name).__name__}")
    if not name or not name.strip():
        raise InvalidName(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    if "/" in name or "\\" in name:
        raise InvalidName(f"{what} {name!r} must not contain a path separator")
    if name in (".", "..") or ".." in name:
        raise InvalidName(f"{what} {name!r} must not contain '..'")
    if name.startswith("-"):
        raise InvalidName(f"{what} {name!r} must not start with '-'")
    for ch in name:
        if ch == "\0" or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            raise InvalidName(f"{what} {name!r} must not contain control characters")
    return name
