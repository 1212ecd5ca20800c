"""The code of the methods `@dataclass` generates, compiled once and kept like a .pyc file.

`dataclasses` writes each generated method (__init__, __repr__, __eq__, __hash__, a frozen
class's __setattr__ and __delattr__) as source text and compiles it when the class is made. A
`snaptree` command makes ~150 dataclasses (the command values, the aggregate's events, the
libraries' own), and compiling those texts is about a quarter of the whole process. A text
depends only on the class's field names and options, and compiling it is deterministic, so the
code object can be kept: `dataclasses` compiles through the name `exec` of its own module, and
`install()` gives it one that looks the text up in a table first and compiles only what it lacks.
What runs is exactly what would have run; only the compiling is skipped.

The table is in this package's __pycache__ (marshal, per interpreter version), written by
`python -m adapters.cli.dataclass_cache` (scripts/setup.sh) and after a run that missed
something, unless Python may not write bytecode here (PYTHONDONTWRITEBYTECODE).
"""

from __future__ import annotations

import atexit
import builtins
import marshal
import os
import sys
from importlib.util import MAGIC_NUMBER
from pathlib import Path
from types import CodeType
from typing import Any

TABLE = Path(__file__).parent / "__pycache__" / f"dataclass-code.{sys.implementation.cache_tag}.marshal"

_table: dict[str, CodeType] = {}
_missed: list[str] = []


def _exec(source: Any, globals: Any = None, locals: Any = None, /) -> None:  # noqa: A002
    if isinstance(source, str):
        code = _table.get(source)
        if code is None:
            # dont_inherit: as `dataclasses` compiles it, not with this module's __future__ flags
            code = _table[source] = compile(source, "<string>", "exec", dont_inherit=True)
            _missed.append(source)
        source = code
    builtins.exec(source, globals, locals)


def install() -> None:
    """Make `dataclasses` compile through the table (once per process; harmless to repeat)."""
    import dataclasses

    if dataclasses.__dict__.get("exec") is _exec:
        return
    try:
        magic, loaded = marshal.loads(TABLE.read_bytes())
    except (OSError, EOFError, ValueError, TypeError):
        magic, loaded = None, {}
    if magic == MAGIC_NUMBER and isinstance(loaded, dict):  # bytecode of this very interpreter
        _table.update(loaded)
    dataclasses.exec = _exec  # type: ignore[attr-defined]
    if not sys.dont_write_bytecode:
        atexit.register(_save_if_missed)


def missed() -> int:
    """Texts compiled in this process because the table did not have them."""
    return len(_missed)


def save() -> None:
    """Write the table (beside it first, then renamed: a reader never sees half of it)."""
    TABLE.parent.mkdir(exist_ok=True)
    tmp = TABLE.with_name(f"{TABLE.name}.{os.getpid()}.tmp")
    tmp.write_bytes(marshal.dumps((MAGIC_NUMBER, _table)))
    os.replace(tmp, TABLE)


def _save_if_missed() -> None:
    if _missed:
        try:
            save()
        except OSError:
            pass  # as with a .pyc: a directory we may not write is no error


def build() -> int:
    """Import every module of snaptree (as compileall compiles them), then write the table;
    returns its size."""
    import importlib
    import pkgutil

    install()
    root = Path(__file__).resolve().parents[2]
    for package in ("domain", "adapters", "projections", "service", "workers"):
        for info in pkgutil.walk_packages([str(root / package)], prefix=f"{package}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    save()
    return len(_table)


if __name__ == "__main__":
    print(f"{TABLE}: {build()} compiled dataclass methods")
