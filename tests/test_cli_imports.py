"""What each CLI verb imports: `--help` and `tree VM` load only what they use (a structural test,
not a timing one; benchmarks/bench_cli.py times them).

Each run is a real `snaptree` process (the installed entry point's code, `from adapters.cli import
main`) under `python -X importtime`, which lists every module the process imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from adapters.cli import COMMANDS, load_all, main

# Never for `--help`: the event store library, the queue's and QEMU's clients, the renderer, the
# domain's command and aggregate classes, the service.
HEAVY = ("eventsourcing", "redis", "psycopg", "qemu", "rich", "asyncio", "msgpack", "sqlite3",
         "domain.commands", "domain.vm", "service", "projections", "workers", "adapters.qemu")
# Never for `tree VM` once the views have every event: it reads the tree row and the layers.
NOT_FOR_TREE = ("eventsourcing", "redis", "psycopg", "qemu", "asyncio", "msgpack",
                "domain.commands", "domain.vm", "domain.application", "service.bootstrap",
                "service.handlers", "adapters.machines", "workers")


def imported(args: list[str], env: dict[str, str] | None = None) -> tuple[set[str], str]:
    """Modules a `snaptree ARGS` process imported, and what it printed."""
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from adapters.cli import main; main()", *args],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    names = {line.rsplit("|", 1)[1].strip() for line in res.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    names.discard("imported package")
    return names, res.stdout


def loaded(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


def test_the_table_is_the_commands() -> None:
    """COMMANDS names every top-level command and says what `--help` would say of each."""
    load_all()
    assert set(main.commands) == set(COMMANDS)
    for name, (_, summary) in COMMANDS.items():
        real, listed = main.commands[name], click.Command(name, help=summary)
        for limit in range(20, 200):
            assert listed.get_short_help_str(limit) == real.get_short_help_str(limit), name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_command_loads_whole_from_its_modules(name: str) -> None:
    """The modules listed for a command define it and every one of its subcommands."""
    load_all()
    cmd = main.commands[name]
    expected = sorted(cmd.commands) if isinstance(cmd, click.Group) else []
    code = (f"from adapters.cli.app import load, main; load({name!r}); c = main.commands[{name!r}]; "
            "print(' '.join(sorted(getattr(c, 'commands', {}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == expected


def test_help_imports_no_command_module() -> None:
    names, out = imported(["--help"])
    assert "tree" in out and "snapshot" in out
    assert loaded(names, HEAVY) == []
    assert loaded(names, tuple(m for mods, _ in COMMANDS.values() for m in mods)) == []


def test_tree_reads_the_view_without_the_store_library(tmp_path: Path) -> None:
    home, disk = tmp_path / "data", tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SNAPTREE_", "SQLITE_", "POSTGRES_", "PERSISTENCE_"))}
    env.update(SNAPTREE_HOME=str(home), SNAPTREE_HOST="testhost")
    for args in (["vm", "create", "v", "--disk", str(disk)], ["snapshot", "take", "v", "s1"],
                 ["snapshot", "take", "v", "s2"]):
        subprocess.run([sys.executable, "-m", "adapters.cli", *args], env=env, check=True,
                       capture_output=True, timeout=60)

    # The views are behind the log: the full path catches them up (and needs the library).
    first, text_full = imported(["tree", "v"], env)
    assert "eventsourcing" in first and "domain.vm" in first
    # Now they have every event: the row alone, with the same output.
    names, text = imported(["tree", "v"], env)
    assert loaded(names, NOT_FOR_TREE) == []
    assert text == text_full and "s2" in text
    subprocess.run([sys.executable, "-m", "adapters.cli", "snapshot", "take", "v", "s3"], env=env,
                   check=True, capture_output=True, timeout=60)
    _, json_full = imported(["tree", "v", "--json"], env)
    json_names, as_json = imported(["tree", "v", "--json"], env)
    assert loaded(json_names, NOT_FOR_TREE + ("rich",)) == []
    assert as_json == json_full and '"s3"' in as_json
