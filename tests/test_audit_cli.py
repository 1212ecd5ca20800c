"""`snaptree audit log|replay|export` and `snaptree projections ...` as real subprocesses.

One VM on real qcow2 files (the commands do their disk work as usual), its own SNAPTREE_HOME. What
the CLI prints is checked against the application opened in-process on the same data directory.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adapters.config import open_app
from adapters.storage import DataDir
from domain.application import Snaptree
from projections import records
from projections.store import VIEW_TABLES
from projections.tree_view import tree_json

VM = "web"
# The installed entry point (what users run); `python -m adapters.cli` would import the CLI twice.
SNAPTREE = str(Path(sys.executable).parent / "snaptree")


class Cli:
    def __init__(self, base: Path) -> None:
        self.home = base / "data"
        self.cwd = base / "cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SNAPTREE_", "SQLITE_", "POSTGRES_", "PERSISTENCE_"))}
        env.update(SNAPTREE_HOME=str(self.home), SNAPTREE_HOST="testhost")
        self.env = env

    def run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([SNAPTREE, *args], cwd=self.cwd,
                              env=self.env, capture_output=True, timeout=120)

    def ok(self, *args: str) -> bytes:
        res = self.run(*args)
        assert res.returncode == 0, f"snaptree {' '.join(args)} -> {res.returncode}\n{res.stderr.decode()}"
        return res.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def refused(self, *args: str) -> dict[str, Any]:
        """Exit 2, one line on stderr, the error as JSON on stdout."""
        res = self.run(*args, "--json")
        assert res.returncode == 2, (args, res.returncode, res.stderr.decode())
        assert len(res.stderr.decode().strip().splitlines()) == 1, res.stderr
        return json.loads(res.stdout)["error"]  # type: ignore[no-any-return]

    def app(self) -> Snaptree:
        return open_app(DataDir.open(self.home), environ={})

    def views(self) -> dict[str, list[tuple[Any, ...]]]:
        con = sqlite3.connect(self.home / "snaptree.sqlite")
        try:
            return {t: con.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in VIEW_TABLES}
        finally:
            con.close()


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """A VM whose history has snapshots, applies, hidden nodes, a merge and a rename."""
    base = tmp_path_factory.mktemp("audit")
    c = Cli(base)
    disk = base / "web.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "4M"], check=True)
    c.ok("vm", "create", VM, "--disk", str(disk))
    c.ok("snapshot", "take", VM, "A")
    c.ok("snapshot", "take", VM, "B")
    c.ok("snapshot", "apply", VM, "A")
    c.ok("snapshot", "take", VM, "C")
    c.ok("snapshot", "delete", VM, "A")  # 2 dependents: hidden
    c.ok("snapshot", "rename", VM, "B", "B2")
    c.ok("snapshot", "delete", VM, "B2")  # A merges into C
    c.ok("snapshot", "take", VM, "D")
    c.ok("snapshot", "apply", VM, "C")
    c.ok("snapshot", "delete", VM, "C")  # D and the current state depend on it: hidden for good
    return c


def strip_bytes(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree --json` measures merge bytes on disk; a replay knows only what the events say."""
    for n in tree["nodes"]:
        if "merge" in n and "direction" not in n["merge"]:
            n["merge"]["bytes"] = None
        if "next_flatten" in n:
            n["next_flatten"]["bytes"] = None
    return tree


def test_audit_log(cli: Cli) -> None:
    app = cli.app()
    vm = app.get_vm(VM)
    log = cli.json("audit", "log", VM)
    assert [r["version"] for r in log] == list(range(1, vm.version + 1))
    assert {"position", "time", "vm", "version", "event", "request_id", "summary"} <= set(log[0])
    events = [r["event"] for r in log]
    assert events[0] == "Registered"
    assert {"SnapshotTaken", "SnapshotApplied", "SnapshotDeleted", "SnapshotRenamed",
            "MergeScheduled", "MergeStarted", "MergeCompleted", "FilesRemoved"} <= set(events)
    assert all(r["request_id"] is None and r["summary"] for r in log)
    text = cli.ok("audit", "log", VM).decode().splitlines()
    assert len(text) == len(log)
    assert 'renamed snapshot "B" to "B2"' in text[events.index("SnapshotRenamed")]
    app.close()


def test_audit_replay_by_version_and_by_time(cli: Cli) -> None:
    app = cli.app()
    vm = app.get_vm(VM)
    log = cli.json("audit", "log", VM)
    hidden_at = next(r["version"] for r in log if r["event"] == "SnapshotDeleted")
    for v in sorted({1, 2, hidden_at, vm.version - 1}):
        expected = tree_json(app.get_vm_at(VM, v))
        assert cli.json("audit", "replay", VM, "--at-version", str(v)) == expected
        assert cli.json("audit", "replay", VM, "--at-version", str(v), "--events-only") == expected
    row = next(r for r in log if r["version"] == hidden_at)
    by_time = cli.json("audit", "replay", VM, "--at-time", row["time"])
    assert by_time == tree_json(app.get_vm_at(VM, hidden_at))
    # The last version is the tree `tree --json` prints, less what only the disk can say.
    assert cli.json("audit", "replay", VM, "--at-version", str(vm.version)) == strip_bytes(cli.json("tree", VM))
    text = cli.ok("audit", "replay", VM, "--at-version", str(hidden_at)).decode()
    assert f"at version {hidden_at}" in text and "A" in text
    app.close()


def test_audit_replay_refuses_bad_input(cli: Cli) -> None:
    last = cli.app().get_vm(VM).version
    assert cli.refused("audit", "replay", VM, "--at-version", "0")["code"] == "out_of_range"
    assert cli.refused("audit", "replay", VM, "--at-version", str(last + 1))["code"] == "out_of_range"
    assert cli.refused("audit", "replay", VM, "--at-time", "yesterday")["code"] == "invalid_time"
    assert cli.refused("audit", "replay", VM, "--at-time", "2001-01-01T00:00:00Z")["code"] == "out_of_range"
    assert cli.refused("audit", "replay", VM)["code"] == "refused"
    assert cli.refused("audit", "replay", VM, "--at-version", "1", "--at-time", "2001-01-01")["code"] == "refused"
    assert cli.refused("audit", "replay", "nobody", "--at-version", "1")["code"] == "unknown_vm"
    assert cli.refused("audit", "log", "nobody")["code"] == "unknown_vm"
    assert cli.refused("audit", "export", "nobody")["code"] == "unknown_vm"
    assert cli.refused("audit", "log", "../etc")["code"] == "invalid_name"


def test_audit_export_both_formats(cli: Cli, tmp_path: Path) -> None:
    app = cli.app()
    vm = app.get_vm(VM)
    jsonl = records.read(cli.ok("audit", "export", VM, "--format", "jsonl"), "jsonl")
    assert [r["version"] for r in jsonl] == list(range(1, vm.version + 1))
    assert [r["type"] for r in jsonl] == [r["event"] for r in cli.json("audit", "log", VM)]
    assert {"vm", "vm_id", "version", "type", "topic", "timestamp", "fields"} == set(jsonl[0])
    assert jsonl[0]["fields"]["name"] == VM and jsonl[0]["vm_id"] == str(vm.id)
    taken = next(r for r in jsonl if r["type"] == "SnapshotTaken")
    assert taken["fields"]["name"] == "A" and isinstance(taken["fields"]["snapshot_id"], str)
    out = tmp_path / "events.msgpack"
    cli.ok("audit", "export", VM, "--format", "msgpack", "--output", str(out))
    assert records.read(out.read_bytes(), "msgpack") == jsonl
    assert not list(tmp_path.glob("*.part"))
    assert cli.refused("audit", "export", VM, "--format", "xml")["code"] == "usage"
    app.close()


def test_projections_rebuild_is_identical(cli: Cli) -> None:
    first = cli.json("projections", "update")
    assert first["position"] > 0
    before = cli.views()
    assert all(before.values())
    rebuilt = cli.json("projections", "rebuild")
    assert rebuilt["events"] == rebuilt["position"] == first["position"]
    assert cli.views() == before
    assert cli.json("projections", "update")["events"] == 0
    assert cli.json("projections", "status") == {"position": first["position"], "head": first["position"], "behind": 0}
