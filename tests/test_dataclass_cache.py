"""adapters/cli/dataclass_cache.py: dataclasses made with the kept code are the dataclasses Python
makes without it (same signatures, docs, annotations and bytecode of every generated method), and
a process with a full table compiles nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Prints a fingerprint of every dataclass the domain, the service and the event library define.
FINGERPRINT = r'''
import sys, dataclasses, inspect
from pathlib import Path
table = sys.argv[1]
if table != "-":
    from adapters.cli import dataclass_cache
    dataclass_cache.TABLE = Path(table)
    dataclass_cache.install()
import domain.commands, domain.vm, domain.requests, domain.memory, domain.tree, service.results
import eventsourcing.domain, eventsourcing.persistence
out = []
for mod in (domain.commands, domain.vm, domain.requests, domain.memory, domain.tree, service.results,
            eventsourcing.domain, eventsourcing.persistence):
    for name, v in sorted(vars(mod).items()):
        for cls in [v] + ([vars(v)[k] for k in sorted(vars(v))] if isinstance(v, type) else []):
            if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == mod.__name__:
                methods = {k: (f.__annotations__, f.__code__.co_code, f.__code__.co_names, f.__defaults__)
                           for k, f in sorted(vars(cls).items()) if inspect.isfunction(f) and k.startswith("__")}
                out.append((cls.__qualname__, str(inspect.signature(cls)), cls.__doc__, repr(methods)))
print(len(out))
print(repr(out))
if table != "-":
    dataclass_cache.save()
    print("missed", dataclass_cache.missed(), file=sys.stderr)
'''


def run(table: str) -> tuple[str, str]:
    res = subprocess.run([sys.executable, "-c", FINGERPRINT, table], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout, res.stderr


def test_the_kept_code_makes_the_same_classes(tmp_path: Path) -> None:
    table = tmp_path / "table.marshal"
    plain, _ = run("-")
    first, missed_first = run(str(table))   # empty table: compiles all, then saves
    again, missed_again = run(str(table))   # full table: compiles nothing
    assert int(plain.split("\n", 1)[0]) > 50
    assert first == plain and again == plain
    assert "missed 0" not in missed_first and "missed 0" in missed_again


def test_a_damaged_or_foreign_table_is_ignored(tmp_path: Path) -> None:
    plain, _ = run("-")
    for i, content in enumerate((b"", b"\x00garbage", b"\xe3" * 64)):
        table = tmp_path / f"bad{i}.marshal"
        table.write_bytes(content)
        out, _ = run(str(table))
        assert out == plain
