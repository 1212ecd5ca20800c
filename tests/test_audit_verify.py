"""`audit verify` on real qcow2 files: clean after a scenario of hidden nodes, merges and applies,
and each injected fault found on its own (exactly that finding, nothing else)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from service.verify import (
    CHECK_ERROR,
    CORRUPT,
    HIDDEN_NODE,
    MISSING_LAYER,
    MISSING_STATE,
    ORPHAN_FILE,
    OWN_DISK_NOT_ROOT,
    SHARED_LAYER,
    STATE_CHANGED,
    WRONG_BACKING,
    Report,
    check_memory,
    sha256_file,
    verify,
    verify_vm,
)
from adapters.qemu import qemu_img
from domain import commands as c
from domain.memory import Memory, MemoryState, SaveMethod
from service.api import Service
from domain.tree import MergeState, Node, NodeKind
from domain.vm import VirtualMachine
from tests.disk_harness import PatternVM

FINDING_KEYS = {"kind", "node", "disk", "path", "message"}


# The installed entry point (what users run); it imports `adapters.cli` as a module.
SNAPTREE = [sys.executable, "-c", "from adapters.cli import main; main()"]


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SNAPTREE_", "SQLITE_", "POSTGRES_", "PERSISTENCE_"))}
    env.update(SNAPTREE_HOME=str(home), SNAPTREE_HOST="testhost")
    return subprocess.run([*SNAPTREE, *args], env=env,
                          capture_output=True, text=True, timeout=120)


def scenario(pv: PatternVM) -> None:
    """A - B - {C, D - E}; B hidden (2 dependents); D deleted and merged; E applied; writes everywhere."""
    pv.take("A")
    pv.take("B")
    pv.take("C")
    pv.apply("B")
    pv.take("D")
    pv.take("E")
    pv.delete("B")  # C and D depend on it: hidden, merge-pending
    pv.delete("D")  # one dependent (E): merged
    pv.apply("E")
    pv.write()


@pytest.fixture
def pv(service: Service, tmp_path: Path) -> PatternVM:
    pv = PatternVM.create(service, tmp_path)
    scenario(pv)
    return pv


def report(pv: PatternVM) -> Report:
    return verify(pv.svc.app, pv.svc.data, pv.name)


def only(rep: Report, kind: str) -> dict[str, Any]:
    """The report holds exactly one finding, of this kind."""
    found = [f.__dict__ for f in rep.findings]
    assert [f["kind"] for f in found] == [kind], found
    return found[0]


def snap(pv: PatternVM, name: str) -> Node:
    return pv.vm.resolve_snapshot(name)


def test_clean_tree_is_clean_in_python_text_and_json(pv: PatternVM) -> None:
    pv.check()  # the harness's own view: patterns, backing files and folder all as the tree says
    vm = pv.vm
    assert any(n.kind is NodeKind.HIDDEN for n in vm.nodes.values())
    rep = report(pv)
    assert rep.clean and rep.findings == [] and rep.notes == []
    home = pv.svc.data.root
    text = run_cli(home, "audit", "verify", pv.name)
    assert text.returncode == 0, text.stderr
    assert "clean" in text.stdout
    res = run_cli(home, "audit", "verify", pv.name, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["vm"] == pv.name and data["clean"] is True and data["findings"] == []


def test_deleted_layer(pv: PatternVM) -> None:
    c = snap(pv, "C")
    os.unlink(c.layers["disk1"])
    f = only(report(pv), MISSING_LAYER)
    assert (f["node"], f["disk"], f["path"]) == (str(c.id), "disk1", c.layers["disk1"])


def test_deleted_layer_with_dependents_is_reported_once(pv: PatternVM) -> None:
    hidden = next(n for n in pv.vm.nodes.values() if n.kind is NodeKind.HIDDEN)
    if hidden.parent is None:  # the own disk: pick a frozen layer in the data directory instead
        hidden = snap(pv, "E")
    os.unlink(hidden.layers["disk0"])
    f = only(report(pv), MISSING_LAYER)
    assert f["node"] == str(hidden.id)


def test_stray_file_in_the_vm_folder(pv: PatternVM) -> None:
    folder = pv.svc.data.vm_dir(pv.name)
    stray = folder / "layers" / f"{uuid4()}.disk0.qcow2"
    qemu_img.create_image(str(stray), 1 << 20)
    (folder / "notes.txt").write_text("not snaptree's")
    rep = report(pv)
    assert sorted(f.kind for f in rep.findings) == [ORPHAN_FILE, ORPHAN_FILE]
    assert {f.path for f in rep.findings} == {str(stray), str(folder / "notes.txt")}


def test_lock_file_and_run_dir_are_not_orphans(pv: PatternVM) -> None:
    folder = pv.svc.data.vm_dir(pv.name)
    (folder / ".lock").touch()
    (folder / "run").mkdir(exist_ok=True)
    (folder / "run" / "qemu.log").write_text("log")
    assert report(pv).clean


def test_leftover_temp_file_of_a_crashed_overlay_creation_is_an_orphan(pv: PatternVM) -> None:
    vm = pv.vm
    layer = vm.nodes[vm.current].layers["disk0"]
    Path(f"{layer}.tmp-99999").write_bytes(b"half")
    assert only(report(pv), ORPHAN_FILE)["path"] == f"{layer}.tmp-99999"


def test_files_pending_removal_and_overlays_being_created_are_notes(pv: PatternVM) -> None:
    old = pv.vm.nodes[pv.vm.current].layers["disk0"]
    pv.svc.handle(c.ApplySnapshot(pv.name, "C"), wait=False)  # no wait: the old current is garbage, the new not created
    vm = pv.vm
    Path(f"{vm.nodes[vm.current].layers['disk0']}.tmp-{os.getpid()}").write_bytes(b"")
    rep = report(pv)
    assert rep.clean, rep.findings
    kinds = {n.kind for n in rep.notes}
    assert {"work_pending", "pending_removal", "being_created"} <= kinds
    assert old in {n.path for n in rep.notes if n.kind == "pending_removal"}
    Path(f"{vm.nodes[vm.current].layers['disk0']}.tmp-{os.getpid()}").unlink()
    pv.settle()
    rep = report(pv)
    assert rep.clean and rep.notes == []


def test_layer_rebased_onto_a_wrong_parent(pv: PatternVM) -> None:
    c, a = snap(pv, "C"), snap(pv, "A")
    assert c.parent != a.id
    qemu_img.rebase_unsafe(c.layers["disk0"], a.layers["disk0"])
    f = only(report(pv), WRONG_BACKING)
    assert (f["node"], f["disk"]) == (str(c.id), "disk0")
    assert a.layers["disk0"] in f["message"]


def test_corrupt_qcow2_magic(pv: PatternVM) -> None:
    e = snap(pv, "E")
    with open(e.layers["disk0"], "r+b") as img:
        img.write(b"XXXX")  # the qcow2 magic
    f = only(report(pv), CHECK_ERROR)
    assert (f["node"], f["disk"]) == (str(e.id), "disk0")


def test_qcow2_header_marked_corrupt(pv: PatternVM) -> None:
    e = snap(pv, "E")
    with open(e.layers["disk1"], "r+b") as img:
        img.seek(72)  # incompatible_features (big endian u64); bit 1 = corrupt
        img.write((2).to_bytes(8, "big"))
    f = only(report(pv), CORRUPT)
    assert (f["node"], f["disk"]) == (str(e.id), "disk1")


def test_corrupt_refcount_table_offset(pv: PatternVM) -> None:
    e = snap(pv, "E")
    with open(e.layers["disk0"], "r+b") as img:
        img.seek(48)  # refcount_table_offset: point it into nowhere (not cluster aligned)
        img.write((12345).to_bytes(8, "big"))
    f = only(report(pv), CHECK_ERROR)
    assert f["node"] == str(e.id)


def test_cli_reports_one_line_per_finding_and_exits_1(pv: PatternVM) -> None:
    c = snap(pv, "C")
    os.unlink(c.layers["disk0"])
    (pv.svc.data.vm_dir(pv.name) / "stray").write_text("x")
    home = pv.svc.data.root
    res = run_cli(home, "audit", "verify", pv.name)
    assert res.returncode == 1, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2
    assert any(line.startswith(MISSING_LAYER) and str(c.id) in line for line in lines)
    assert any(line.startswith(ORPHAN_FILE) for line in lines)
    res = run_cli(home, "audit", "verify", pv.name, "--json")
    assert res.returncode == 1
    data = json.loads(res.stdout)
    assert data["vm"] == pv.name and data["clean"] is False
    assert all(set(f) == FINDING_KEYS for f in data["findings"])
    assert sorted(f["kind"] for f in data["findings"]) == [MISSING_LAYER, ORPHAN_FILE]


def test_unknown_vm_is_refused(pv: PatternVM) -> None:
    res = run_cli(pv.svc.data.root, "audit", "verify", "nope", "--json")
    assert res.returncode == 2
    assert json.loads(res.stdout)["error"]["code"] == "unknown_vm"


# --- memory state files and tree invariants, on a copy of the aggregate (nothing is saved) ---


def with_state(pv: PatternVM, name: str, **memory: Any) -> tuple[VirtualMachine, Path]:
    """The VM with a saved memory state on snapshot `name` (as live snapshots record it)."""
    vm = copy.deepcopy(pv.vm)
    node = vm.resolve_snapshot(name)
    path = Path(pv.svc.data.state_path(pv.name, node.id))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(64 * 1024))
    node.memory = Memory(MemoryState.SAVED, path=str(path), method=SaveMethod.BACKGROUND_SNAPSHOT,
                         bytes=64 * 1024, **memory)
    return vm, path


def test_state_file_is_known_and_clean(pv: PatternVM) -> None:
    vm, path = with_state(pv, "C")
    node = vm.nodes[vm.resolve_snapshot("C").id]
    node.memory = node.memory.but(sha256=sha256_file(str(path)))  # type: ignore[union-attr]
    assert verify_vm(vm, pv.svc.data).clean


def test_truncated_state_file_changes_its_digest(pv: PatternVM) -> None:
    vm, path = with_state(pv, "C")
    c = vm.resolve_snapshot("C")
    c.memory = c.memory.but(sha256=sha256_file(str(path)))  # type: ignore[union-attr]
    os.truncate(path, 1000)
    rep = verify_vm(vm, pv.svc.data)
    assert [(f.kind, f.node, f.path) for f in rep.findings] == [(STATE_CHANGED, str(c.id), str(path))]


def test_truncated_state_file_without_digest_is_caught_by_its_size(pv: PatternVM) -> None:
    vm, path = with_state(pv, "C")
    os.truncate(path, 1000)
    (f,) = verify_vm(vm, pv.svc.data).findings
    assert f.kind == STATE_CHANGED and "size" in f.message


def test_missing_state_file(pv: PatternVM) -> None:
    vm, path = with_state(pv, "E")
    path.unlink()
    (f,) = verify_vm(vm, pv.svc.data).findings
    assert f.kind == MISSING_STATE and f.path == str(path)


def test_state_check_on_a_synthetic_node(tmp_path: Path) -> None:
    state = tmp_path / "s.state"
    state.write_bytes(b"memory" * 1000)
    digest = sha256_file(str(state))
    node = Node(id=uuid4(), kind=NodeKind.SNAPSHOT, name="s", parent=None,
                created_at=datetime.now(timezone.utc), layers={},
                memory={"state": "saved", "path": str(state), "sha256": digest, "bytes": 6000})
    assert check_memory(node) == []
    with open(state, "r+b") as f:
        f.write(b"M")  # same size, one byte changed
    assert [f.kind for f in check_memory(node)] == [STATE_CHANGED]
    node.memory = Memory(MemoryState.SAVING, path=str(state))  # still being written: not checked
    assert check_memory(node) == []


def test_hidden_node_with_one_dependent_while_idle(pv: PatternVM) -> None:
    vm = copy.deepcopy(pv.vm)
    e = vm.resolve_snapshot("E")  # one dependent: the current state
    e.kind = NodeKind.HIDDEN
    e.merge_state = MergeState.FAILED
    e.merge_error = "boom"
    (f,) = verify_vm(vm, pv.svc.data).findings
    assert f.kind == HIDDEN_NODE and f.node == str(e.id) and "boom" in f.message


def test_own_disk_below_the_root_and_a_shared_layer(pv: PatternVM) -> None:
    vm = copy.deepcopy(pv.vm)
    c = vm.resolve_snapshot("C")
    c.layers = dict(vm.disks)
    kinds = {f.kind for f in verify_vm(vm, pv.svc.data).findings}
    assert {SHARED_LAYER, OWN_DISK_NOT_ROOT} <= kinds
