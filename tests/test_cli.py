"""The `snaptree` command line, run as a real subprocess against real qcow2 files (no mocks).

Every test gets its own data directory (SNAPTREE_HOME) and host name (SNAPTREE_HOST=testhost);
the VMs' own disks are built with qemu-img next to it. What the CLI prints is checked against
docs/output.md, and `tree --json` is checked against what `qemu-img info --backing-chain` reads off
the files themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest

from adapters.qemu import qemu_io

MiB = 1024 * 1024
DISK_SIZE = 8 * MiB
HOST = "testhost"

NODE_KEYS = {"id", "name", "kind", "parent", "created_at", "disks"}
MERGE_KEYS = {"state", "blocked_by", "bytes"}
MERGES_ROW_KEYS = {"vm", "node", "name", "dependents", "state", "blocked_by", "bytes_held"}
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite's own transient files next to the db


# --------------------------------------------------------------------------------------------
# helpers: disks
# --------------------------------------------------------------------------------------------


def make_qcow2(path: Path, size: int = DISK_SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return path


def write(path: str | Path, offset: int, pattern: int, length: int = MiB) -> None:
    qemu_io.write_pattern(str(path), offset, length, pattern)


def reads(path: str | Path, offset: int, pattern: int, length: int = MiB) -> bool:
    """What a guest reads through `path`'s chain (read-only, -U: the files are not touched)."""
    return qemu_io.read_matches(str(path), offset, length, pattern)


def chain_on_disk(layer: str) -> list[str]:
    """File names of `layer`'s backing chain, top first, as qemu-img itself reads them."""
    res = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "--output=json", "-U", layer],
        capture_output=True, text=True, check=True,
    )
    return [entry["filename"] for entry in json.loads(res.stdout)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# helpers: the CLI
# --------------------------------------------------------------------------------------------


class Cli:
    """`python -m adapters.cli` with its own data dir, host, cwd and TMPDIR."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "data"
        self.cwd = base / "cwd"
        self.tmp = base / "tmp"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SNAPTREE_", "SQLITE_", "POSTGRES_", "PERSISTENCE_"))}
        env.update(SNAPTREE_HOME=str(self.home), SNAPTREE_HOST=HOST, TMPDIR=str(self.tmp))
        self.env = env

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "adapters.cli", *args],
            cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=60,
        )

    def ok(self, *args: str) -> str:
        res = self.run(*args)
        assert res.returncode == 0, f"snaptree {' '.join(args)} -> {res.returncode}\n{res.stderr}"
        return res.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def tree(self, vm: str) -> dict[str, Any]:
        return self.json("tree", vm)

    def merges(self, vm: str | None = None) -> list[dict[str, Any]]:
        return self.json("merges", *([vm] if vm else []))

    # --- what a refused command must leave alone ---

    def event_count(self) -> int:
        con = sqlite3.connect(self.home / "snaptree.sqlite")
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            assert "stored_events" in tables, tables
            return int(con.execute("SELECT COUNT(*) FROM stored_events").fetchone()[0])
        finally:
            con.close()

    def files(self) -> dict[str, tuple[int, int, int]]:
        """Every entry below the data dir: (type, size, mtime_ns).

        The data dir's own mtime is left out: SQLite creates and removes its -wal/-shm files
        there on every open, even for a read-only command.
        """
        out = {}
        for p in sorted(self.home.rglob("*")):
            if p.name.endswith(SQLITE_SIDE_FILES):
                continue
            st = p.lstat()
            out[str(p.relative_to(self.home))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
        return out


def node(tree: dict[str, Any], name: str, kind: str = "snapshot") -> dict[str, Any]:
    found = [n for n in tree["nodes"] if n["name"] == name and n["kind"] == kind]
    assert len(found) == 1, (name, kind, found)
    return found[0]


def current(tree: dict[str, Any]) -> dict[str, Any]:
    (cur,) = [n for n in tree["nodes"] if n["kind"] == "current"]
    return cur


def expected_chain(tree: dict[str, Any], n: dict[str, Any], disk: str) -> list[str]:
    """The node's own layer, then its ancestors' layers, top first."""
    by_id = {x["id"]: x for x in tree["nodes"]}
    chain = []
    while n is not None:
        chain.append(n["disks"][disk])
        n = by_id[n["parent"]] if n["parent"] is not None else None
    return chain


def check_tree_schema(tree: dict[str, Any], vm: str, disks: set[str]) -> None:
    """docs/output.md, `tree VM --json`."""
    assert set(tree) == {"vm", "current", "nodes"}
    assert tree["vm"] == vm
    ids = [n["id"] for n in tree["nodes"]]
    assert len(ids) == len(set(ids))
    assert [n["id"] for n in tree["nodes"] if n["kind"] == "current"] == [tree["current"]]
    assert len([n for n in tree["nodes"] if n["parent"] is None]) == 1
    for n in tree["nodes"]:
        assert NODE_KEYS <= set(n), n
        assert n["kind"] in ("snapshot", "current", "hidden")
        if n["kind"] == "current":
            assert n["name"] is None
        else:
            assert isinstance(n["name"], str) and n["name"]
        assert n["parent"] is None or n["parent"] in ids
        at = datetime.fromisoformat(n["created_at"])
        assert at.utcoffset() == timedelta(0), n["created_at"]
        assert set(n["disks"]) == disks
        assert all(os.path.isabs(p) for p in n["disks"].values()), n["disks"]
        if n.get("ready", True):
            assert all(os.path.isfile(p) for p in n["disks"].values()), n["disks"]
        if n["kind"] == "hidden":
            assert type(n["dependents"]) is int
            assert n["dependents"] == sum(1 for x in tree["nodes"] if x["parent"] == n["id"])
            assert MERGE_KEYS <= set(n["merge"])
            assert n["merge"]["state"] in ("pending", "running", "failed")
            assert n["merge"]["blocked_by"] is None or isinstance(n["merge"]["blocked_by"], str)
            assert type(n["merge"]["bytes"]) is int and n["merge"]["bytes"] >= 0
        if "memory" in n:
            assert n["memory"]["state"] in ("none", "saving", "saved", "failed")


def check_merges_schema(rows: list[dict[str, Any]]) -> None:
    """docs/output.md, `merges --json`."""
    assert isinstance(rows, list)
    for r in rows:
        assert MERGES_ROW_KEYS <= set(r), r
        assert isinstance(r["vm"], str) and isinstance(r["node"], str) and isinstance(r["name"], str)
        assert type(r["dependents"]) is int
        assert r["state"] in ("pending", "running", "failed")
        assert r["blocked_by"] is None or isinstance(r["blocked_by"], str)
        assert type(r["bytes_held"]) is int


def check_tree(cli: Cli, vm: str, disks: set[str], *, idle: bool = True) -> dict[str, Any]:
    """`tree --json` has the schema, and every node's chain is what qemu-img reads on disk."""
    tree = cli.tree(vm)
    check_tree_schema(tree, vm, disks)
    for n in tree["nodes"]:
        for disk in disks:
            assert chain_on_disk(n["disks"][disk]) == expected_chain(tree, n, disk), (n["name"], disk)
    if idle:
        for n in tree["nodes"]:
            assert n.get("ready", True), n
            if n["kind"] == "hidden":
                assert n["dependents"] >= 2, n  # docs/semantics.md invariant once the workers are idle
        # no orphan layer files: each file in the VM's layer folder belongs to a node
        layers = cli.home / "vms" / vm / "layers"
        on_disk = {str(p) for p in layers.iterdir()} if layers.exists() else set()
        owned = {p for n in tree["nodes"] for p in n["disks"].values() if p.startswith(str(cli.home))}
        assert on_disk == owned
    return tree


def assert_one_line(stderr: str) -> None:
    assert stderr.endswith("\n") and stderr.count("\n") == 1 and stderr.strip(), repr(stderr)


def assert_error_json(stdout: str) -> dict[str, Any]:
    data = json.loads(stdout)
    assert set(data) == {"error"}
    assert set(data["error"]) == {"code", "message"}
    assert isinstance(data["error"]["code"], str) and data["error"]["code"]
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    return data["error"]


def assert_nothing_written_outside(cli: Cli, disk_dir: Path, disk_names: set[str]) -> None:
    """Outside the data dir only the VM's own disks exist: nothing next to them, in the CLI's
    cwd or TMPDIR, nor anywhere else in the test's directory."""
    assert set(os.listdir(disk_dir)) == disk_names
    assert os.listdir(cli.cwd) == []
    assert os.listdir(cli.tmp) == []
    assert set(os.listdir(cli.base)) == {"cwd", "data", "tmp", disk_dir.name}


def new_vm(cli: Cli, name: str, disk_dir: Path) -> dict[str, Path]:
    disks = {d: make_qcow2(disk_dir / f"{name}-{d}.qcow2") for d in ("A", "B")}
    cli.ok("vm", "create", name, "--disk", f"A={disks['A']}", "--disk", f"B={disks['B']}")
    return disks


# --------------------------------------------------------------------------------------------
# 1-3. the whole command set on a VM with two disks; tree/merges JSON checked against the disk;
# 6. each scenario ends by checking that nothing was written outside the data dir but the disks
# --------------------------------------------------------------------------------------------


def test_full_command_set_and_tree_matches_disk(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    D = {"A", "B"}
    a, b = make_qcow2(tmp_path / "disks" / "a.qcow2"), make_qcow2(tmp_path / "disks" / "b.qcow2")

    # relative disk paths are taken relative to the CLI's cwd
    created = cli.json("vm", "create", "demo", "--disk", "A=../disks/a.qcow2", "--disk", "B=../disks/b.qcow2")
    assert created["vm"] == "demo" and created["disks"] == {"A": str(a), "B": str(b)}
    listed = cli.json("vm", "list")
    assert [(r["vm"], r["host"], r["snapshots"], r["hidden"]) for r in listed] == [("demo", HOST, 0, 0)]
    tree = check_tree(cli, "demo", D)
    assert current(tree)["disks"] == {"A": str(a), "B": str(b)}  # the own disk is the current layer

    for disk in (a, b):
        write(disk, 0, 0x11)
    cli.ok("snapshot", "take", "demo", "s1")
    tree = check_tree(cli, "demo", D)
    assert node(tree, "s1")["disks"] == {"A": str(a), "B": str(b)}
    for p in current(tree)["disks"].values():
        write(p, MiB, 0x22)
    took = cli.json("snapshot", "take", "demo", "s2")
    assert took["name"] == "s2"
    for p in current(check_tree(cli, "demo", D))["disks"].values():
        write(p, 2 * MiB, 0x33)
    cli.ok("snapshot", "take", "demo", "s3")
    check_tree(cli, "demo", D)

    cli.ok("snapshot", "rename", "demo", "s3", "s3r")
    applied = cli.json("snapshot", "apply", "demo", "s2")
    tree = check_tree(cli, "demo", D)
    assert {n["name"] for n in tree["nodes"]} == {"s1", "s2", "s3r", None}
    assert current(tree)["id"] == applied["current"] == tree["current"]
    assert current(tree)["parent"] == node(tree, "s2")["id"]
    first = current(tree)["id"]

    reverted = cli.json("snapshot", "revert", "demo")
    tree = check_tree(cli, "demo", D)
    assert reverted["current"] == tree["current"] != first
    assert current(tree)["parent"] == node(tree, "s2")["id"]
    assert cli.merges("demo") == []

    # s2 has two dependents (s3r and the current state): it becomes a hidden node
    cli.ok("snapshot", "delete", "demo", "s2")
    tree = check_tree(cli, "demo", D)
    hidden = node(tree, "s2", "hidden")
    assert hidden["dependents"] == 2
    assert hidden["merge"]["state"] == "pending" and "2 dependents" in hidden["merge"]["blocked_by"]
    rows = cli.merges("demo")
    check_merges_schema(rows)
    assert [(r["vm"], r["node"], r["name"], r["dependents"], r["state"]) for r in rows] == [
        ("demo", hidden["id"], "s2", 2, "pending")
    ]
    assert rows[0]["blocked_by"] == "2 dependents"
    assert rows[0]["bytes_held"] > 0
    assert cli.merges() == rows
    assert hidden["id"] in cli.ok("merges", "demo")  # the text form lists it too

    # forced merge by the hidden node's former name: its data is pulled up into both dependents
    merged = cli.json("merge", "demo", "s2", "--force")
    assert merged["node"] == hidden["id"]
    tree = check_tree(cli, "demo", D)
    assert hidden["id"] not in {n["id"] for n in tree["nodes"]}
    s1, s3r = node(tree, "s1"), node(tree, "s3r")
    assert s3r["parent"] == s1["id"] and current(tree)["parent"] == s1["id"]
    assert cli.merges("demo") == []
    for disk in D:
        top = s3r["disks"][disk]
        assert reads(top, 0, 0x11) and reads(top, MiB, 0x22) and reads(top, 2 * MiB, 0x33)
        cur = current(tree)["disks"][disk]
        assert reads(cur, 0, 0x11) and reads(cur, MiB, 0x22) and reads(cur, 2 * MiB, 0)

    # --no-wait records the snapshot; the worker then creates the overlays
    cli.ok("snapshot", "take", "demo", "s4", "--no-wait")
    tree = cli.tree("demo")
    check_tree_schema(tree, "demo", D)
    assert current(tree).get("ready") is False
    assert not any(os.path.exists(p) for p in current(tree)["disks"].values())
    cli.ok("worker", "run", "--until-idle")
    tree = check_tree(cli, "demo", D)
    assert current(tree)["parent"] == node(tree, "s4")["id"]

    # delete the whole tree below (and including) s1: everything merges back into the own disks
    deleted = cli.json("snapshot", "delete", "demo", "s1", "--subtree")
    assert len(deleted["deleted"]) == 3
    tree = check_tree(cli, "demo", D)
    assert [n["kind"] for n in tree["nodes"]] == ["current"]
    assert current(tree)["disks"] == {"A": str(a), "B": str(b)}
    for disk in (a, b):
        assert chain_on_disk(str(disk)) == [str(disk)]
        assert reads(disk, 0, 0x11) and reads(disk, MiB, 0x22) and reads(disk, 2 * MiB, 0)
    assert [(r["snapshots"], r["hidden"]) for r in cli.json("vm", "list")] == [(0, 0)]
    assert "demo" in cli.ok("tree", "demo")  # the human-readable tree renders too
    assert_nothing_written_outside(cli, tmp_path / "disks", {"a.qcow2", "b.qcow2"})


def test_hidden_root_cascade(tmp_path: Path) -> None:
    """A hidden root with 2 dependents waits; when one goes, it commits down into the own disk."""
    cli = Cli(tmp_path)
    D = {"A", "B"}
    own = new_vm(cli, "vm1", tmp_path / "disks")
    for p in own.values():
        write(p, 0, 0x11)
    cli.ok("snapshot", "take", "vm1", "A")
    for p in current(cli.tree("vm1"))["disks"].values():
        write(p, MiB, 0x22)
    cli.ok("snapshot", "take", "vm1", "B")
    cli.ok("snapshot", "apply", "vm1", "A")
    for p in current(cli.tree("vm1"))["disks"].values():
        write(p, 2 * MiB, 0x33)
    cli.ok("snapshot", "delete", "vm1", "A")
    tree = check_tree(cli, "vm1", D)
    root = node(tree, "A", "hidden")
    assert root["parent"] is None and root["dependents"] == 2
    assert root["disks"] == {d: str(p) for d, p in own.items()}
    rows = cli.merges("vm1")
    check_merges_schema(rows)
    assert [(r["node"], r["name"], r["dependents"], r["blocked_by"]) for r in rows] == [
        (root["id"], "A", 2, "2 dependents")
    ]
    assert rows[0]["bytes_held"] > 0

    # the hidden node's name is free again: a new visible "A" is a different node
    cli.ok("snapshot", "take", "vm1", "A")
    tree = check_tree(cli, "vm1", D)
    assert node(tree, "A")["id"] != root["id"] and node(tree, "A", "hidden")["dependents"] == 2

    # B has no dependents: it goes, the root is left with one dependent and merges by itself
    cli.ok("snapshot", "delete", "vm1", "B")
    tree = check_tree(cli, "vm1", D)
    assert root["id"] not in {n["id"] for n in tree["nodes"]}
    new_a = node(tree, "A")
    assert new_a["parent"] is None and new_a["disks"] == {d: str(p) for d, p in own.items()}
    assert cli.merges("vm1") == []
    for p in own.values():
        assert reads(p, 0, 0x11) and reads(p, MiB, 0) and reads(p, 2 * MiB, 0x33)
    assert_nothing_written_outside(cli, tmp_path / "disks", {p.name for p in own.values()})


def test_snapshot_created_at_is_when_it_was_taken(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    new_vm(cli, "vm1", tmp_path / "disks")
    before = datetime.now(timezone.utc)
    cli.ok("snapshot", "take", "vm1", "s1")
    taken = datetime.fromisoformat(node(cli.tree("vm1"), "s1")["created_at"])
    assert taken >= before - timedelta(milliseconds=50)


# --------------------------------------------------------------------------------------------
# 4. refused commands: exit 2, one line on stderr, JSON error; no event, no file touched
# --------------------------------------------------------------------------------------------


class World:
    """VMs for the refused-command cases (built once; a refused command changes nothing).

    v:     A (hidden root, the own disks, 2 dependents: B and the current state) <- B
    w:     s1 <- s2 <- current
    fresh: no snapshot
    """

    def __init__(self, base: Path) -> None:
        self.cli = Cli(base)
        disks = base / "disks"
        self.own = [*new_vm(self.cli, "v", disks).values(), *new_vm(self.cli, "w", disks).values(),
                    *new_vm(self.cli, "fresh", disks).values()]
        for p in self.own:
            write(p, 0, 0x11)
        for args in (("take", "v", "A"), ("take", "v", "B"), ("apply", "v", "A"),
                     ("delete", "v", "A"), ("take", "w", "s1"), ("take", "w", "s2")):
            self.cli.ok("snapshot", *args)
        v = self.cli.tree("v")
        self.hidden_id = node(v, "A", "hidden")["id"]
        self.v_current_id = v["current"]
        self.w_layer = current(self.cli.tree("w"))["disks"]["A"]
        self.spare = make_qcow2(disks / "spare.qcow2")
        self.raw = disks / "raw.img"
        self.raw.write_bytes(b"\0" * MiB)
        self.missing = disks / "missing.qcow2"
        self.directory = disks / "a-directory.qcow2"
        self.directory.mkdir()
        self.outside = [*self.own, self.spare, self.raw]

    def state(self) -> tuple[int, dict[str, Any], dict[str, str], list[str]]:
        cli = self.cli
        return (cli.event_count(), cli.files(), {str(p): sha256(p) for p in self.outside},
                sorted(os.listdir(cli.cwd)) + sorted(os.listdir(self.spare.parent)))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("refused"))


# (a NUL cannot travel in argv: "\x01" stands in for it, next to other control characters)
BAD_NAMES = ["a/b", "a..b", "x\x01y", "x\ny"]


Case = Callable[[World], list[str]]
REFUSED: list[Any] = [
    pytest.param(lambda w: ["snapshot", "take", "nope", "s"], id="unknown-vm-take"),
    pytest.param(lambda w: ["tree", "nope"], id="unknown-vm-tree"),
    pytest.param(lambda w: ["merges", "nope"], id="unknown-vm-merges"),
    pytest.param(lambda w: ["snapshot", "apply", "w", "zz"], id="unknown-snapshot-apply"),
    pytest.param(lambda w: ["snapshot", "delete", "w", "zz"], id="unknown-snapshot-delete"),
    pytest.param(lambda w: ["snapshot", "rename", "w", "zz", "yy"], id="unknown-snapshot-rename"),
    pytest.param(lambda w: ["merge", "w", "zz", "--force"], id="unknown-node-merge"),
    pytest.param(lambda w: ["snapshot", "take", "w", "s1"], id="duplicate-take"),
    pytest.param(lambda w: ["snapshot", "rename", "w", "s2", "s1"], id="duplicate-rename"),
    pytest.param(lambda w: ["snapshot", "apply", "v", "A"], id="apply-hidden-by-name"),
    pytest.param(lambda w: ["snapshot", "apply", "v", w.hidden_id], id="apply-hidden-by-id"),
    pytest.param(lambda w: ["snapshot", "delete", "v", "A"], id="delete-hidden-by-name"),
    pytest.param(lambda w: ["snapshot", "delete", "v", w.hidden_id], id="delete-hidden-by-id"),
    pytest.param(lambda w: ["snapshot", "apply", "v", w.v_current_id], id="apply-current-by-id"),
    pytest.param(lambda w: ["merge", "v", "A", "--force"], id="force-merge-hidden-root-by-name"),
    pytest.param(lambda w: ["merge", "v", w.hidden_id, "--force"], id="force-merge-hidden-root-by-id"),
    pytest.param(lambda w: ["merge", "v", "A"], id="merge-2-dependents-without-force"),
    pytest.param(lambda w: ["merge", "v", "B", "--force"], id="merge-visible-snapshot"),
    pytest.param(lambda w: ["snapshot", "revert", "fresh"], id="revert-no-snapshot"),
    pytest.param(lambda w: ["snapshot", "revert", "v"], id="revert-only-hidden-above"),
    pytest.param(lambda w: ["vm", "create", "w", "--disk", str(w.spare)], id="vm-create-twice"),
    pytest.param(lambda w: ["vm", "create", "n1", "--disk", str(w.raw)], id="disk-raw"),
    pytest.param(lambda w: ["vm", "create", "n1", "--disk", str(w.missing)], id="disk-missing"),
    pytest.param(lambda w: ["vm", "create", "n1", "--disk", str(w.directory)], id="disk-directory"),
    pytest.param(lambda w: ["vm", "create", "n1", "--disk", str(w.spare), "--disk", str(w.raw)],
                 id="disk-second-raw"),
    pytest.param(lambda w: ["vm", "create", "n1", "--disk", w.w_layer], id="disk-inside-data-dir"),
    *[pytest.param(lambda w, n=n: ["vm", "create", n, "--disk", str(w.spare)], id=f"vm-name-{n!r}")
      for n in BAD_NAMES],
    *[pytest.param(lambda w, n=n: ["snapshot", "take", "w", n], id=f"snapshot-name-{n!r}")
      for n in BAD_NAMES],
    pytest.param(lambda w: ["snapshot", "take", "w"], id="usage-missing-argument"),
    pytest.param(lambda w: ["vm", "create", "n1", "--disk", str(w.spare), "--memory", "1"],
                 id="usage-bad-option-value"),
    # last: while the bug lasts this one succeeds and adds a VM n2 to the world
    pytest.param(lambda w: ["vm", "create", "n2", "--disk", str(w.own[0])], id="disk-of-another-vm"),
]


@pytest.mark.parametrize("case", REFUSED)
def test_refused_command_changes_nothing(world: World, case: Case) -> None:
    args = case(world)
    before = world.state()
    res = world.cli.run(*args, "--json")
    assert res.returncode == 2, (args, res.returncode, res.stdout, res.stderr)
    assert_one_line(res.stderr)
    assert_error_json(res.stdout)
    assert world.state() == before


REFUSED_BY_ID = {p.id: p.values[0] for p in REFUSED}


@pytest.mark.parametrize("case_id", ["apply-hidden-by-name", "disk-raw"])
def test_refused_without_json_prints_nothing_on_stdout(world: World, case_id: str) -> None:
    args = REFUSED_BY_ID[case_id](world)
    before = world.state()
    res = world.cli.run(*args)
    assert (res.returncode, res.stdout) == (2, "")
    assert_one_line(res.stderr)
    assert world.state() == before


# --------------------------------------------------------------------------------------------
# 5. a failure while doing the work: exit 1, one line on stderr
# --------------------------------------------------------------------------------------------


def test_take_fails_when_parent_layer_vanished(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    new_vm(cli, "vm1", tmp_path / "disks")
    cli.ok("snapshot", "take", "vm1", "s1")
    os.unlink(current(cli.tree("vm1"))["disks"]["A"])  # behind snaptree's back
    res = cli.run("snapshot", "take", "vm1", "s2", "--json")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert_one_line(res.stderr)
    assert assert_error_json(res.stdout)["code"]
    # nothing of it is left: the take was rolled back, and no work waits
    assert "rolled back" in res.stderr
    assert [n["name"] for n in cli.tree("vm1")["nodes"] if n["kind"] == "snapshot"] == ["s1"]
    res = cli.run("worker", "run", "--until-idle")
    assert res.returncode == 0, res.stderr


def test_take_fails_when_own_disk_is_not_qcow2_any_more(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    own = new_vm(cli, "vm1", tmp_path / "disks")
    own["B"].write_bytes(b"not a qcow2 image")
    res = cli.run("snapshot", "take", "vm1", "s1")
    assert res.returncode == 1 and res.stdout == ""
    assert_one_line(res.stderr)


def test_delete_fails_when_merge_fails(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    new_vm(cli, "vm1", tmp_path / "disks")
    cli.ok("snapshot", "take", "vm1", "s1")
    cli.ok("snapshot", "take", "vm1", "s2")
    os.unlink(current(cli.tree("vm1"))["disks"]["A"])  # s2's one dependent, behind snaptree's back
    res = cli.run("snapshot", "delete", "vm1", "s2", "--json")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert_one_line(res.stderr)
    assert_error_json(res.stdout)
    # the node stays hidden with its merge failed; a retry fails the same way
    (row,) = cli.merges("vm1")
    assert (row["name"], row["state"]) == ("s2", "failed")
    res = cli.run("merge", "vm1", "s2")
    assert res.returncode == 1 and res.stdout == ""
    assert_one_line(res.stderr)


def test_worker_until_idle_fails_when_merge_fails(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    new_vm(cli, "vm1", tmp_path / "disks")
    cli.ok("snapshot", "take", "vm1", "s1")
    cli.ok("snapshot", "take", "vm1", "s2")
    os.unlink(current(cli.tree("vm1"))["disks"]["A"])
    cli.ok("snapshot", "delete", "vm1", "s2", "--no-wait")
    res = cli.run("worker", "run", "--until-idle", "--json")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert_one_line(res.stderr)
    assert_error_json(res.stdout)
