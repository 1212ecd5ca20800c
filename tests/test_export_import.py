"""`vm export` / `vm import` on real qcow2 files, through the CLI: a VM with hidden nodes and merges
moves to another data directory under a new name, every snapshot reads its byte patterns there,
`audit verify` is clean, every snapshot can be applied; damaged or hostile bundles are refused
and leave nothing behind."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from adapters import bundle
from adapters.cli.bundle import BIG, progress_printer
from adapters.qemu import qemu_img
from adapters.transcoder import unpackb
from domain import commands as c
from domain.memory import LiveSwitch, SaveMethod
from service import bootstrap
from service.api import Service
from service.verify import verify
from domain.tree import NodeKind
from domain.vm import VirtualMachine
from tests.disk_harness import SLOT, PatternVM

SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


# The installed entry point (what users run); it imports `adapters.cli` as a module.
SNAPTREE = [sys.executable, "-c", "from adapters.cli import main; main()"]


def run_cli(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SNAPTREE_", "SQLITE_", "POSTGRES_", "PERSISTENCE_"))}
    env.update(SNAPTREE_HOME=str(home), SNAPTREE_HOST="testhost")
    return subprocess.run([*SNAPTREE, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def ok_json(home: Path, *args: str) -> Any:
    res = run_cli(home, *args, "--json")
    assert res.returncode == 0, f"{args} -> {res.returncode}: {res.stderr}"
    return json.loads(res.stdout)


def open_service(home: Path) -> Service:
    return bootstrap.open_service(str(home), "testhost", environ={})


def listing(home: Path) -> set[str]:
    return {str(p.relative_to(home)) for p in home.rglob("*") if not p.name.endswith(SQLITE_SIDE_FILES)}


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_source(svc: Service, tmp: Path) -> PatternVM:
    """Two disks; A - B(hidden) - {C, D}; a merged snapshot; writes in every layer."""
    pv = PatternVM.create(svc, tmp, name="vm", ndisks=2)
    pv.take("A")
    pv.write(slot=200, nbytes=3 * SLOT)  # past the slots the harness numbers itself
    pv.take("B")
    pv.take("C")
    pv.apply("B")
    pv.take("D")
    pv.take("M")
    pv.delete("M")  # one dependent: merged
    pv.delete("B")  # two dependents: hidden
    pv.write()
    return pv


@pytest.fixture
def source(service: Service, tmp_path: Path) -> PatternVM:
    return build_source(service, tmp_path)


def export(source: PatternVM, out: Path) -> Path:
    res = ok_json(source.svc.data.root, "vm", "export", "vm", str(out))
    assert res["file"] == str(out) and res["vm"] == "vm"
    return out


@pytest.fixture
def exported(source: PatternVM, tmp_path: Path) -> Path:
    return export(source, tmp_path / "vm.bundle")


@pytest.fixture(scope="module")
def shared_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bundle for the tests that only read it (each works on its own copy)."""
    tmp = tmp_path_factory.mktemp("shared")
    return export(build_source(open_service(tmp / "home"), tmp), tmp / "vm.bundle")


def imported_checker(source: PatternVM, svc: Service, name: str) -> PatternVM:
    """The imported VM with the source's expectations (node ids are kept on import)."""
    vm = svc.app.get_vm(name)
    return PatternVM(svc, name, dict(vm.disks), expected=copy.deepcopy(source.expected),
                     slots_used=set(source.slots_used), next_pattern=source.next_pattern)


def test_round_trip_into_another_data_directory(source: PatternVM, exported: Path, tmp_path: Path) -> None:
    src_vm = source.vm
    own_before = {d: sha256(p) for d, p in src_vm.disks.items()}
    home_b = tmp_path / "home-b"
    res = ok_json(home_b, "vm", "import", str(exported), "--name", "moved")
    assert res["vm"] == "moved" and res["nodes"] == len(src_vm.nodes)

    svc_b = open_service(home_b)
    source.check()
    moved_vm = svc_b.app.get_vm("moved")
    assert set(moved_vm.nodes) == set(src_vm.nodes) and moved_vm.current == src_vm.current
    for node in moved_vm.nodes.values():
        orig = src_vm.nodes[node.id]
        assert (node.parent, node.kind, node.name, node.config) == (orig.parent, orig.kind, orig.name, orig.config)
        assert all(svc_b.data.owns(p) for p in node.layers.values())
    folder = svc_b.data.vm_dir("moved")
    assert moved_vm.disks == {d: str(folder / "disks" / f"{d}.qcow2") for d in src_vm.disks}
    assert any(n.kind is NodeKind.HIDDEN for n in moved_vm.nodes.values())

    # The import references the original history.
    with tarfile.open(exported) as tar:
        f = tar.extractfile(bundle.HISTORY)
        assert f is not None
        history = f.read()
    assert moved_vm.imported_from == {
        "vm_id": str(src_vm.id), "name": "vm", "version": src_vm.version,
        "history_sha256": hashlib.sha256(history).hexdigest(),
        "exported_at": moved_vm.imported_from["exported_at"],  # type: ignore[index]
        "host": "testhost",
    }
    topics = [e.topic.rsplit(".", 1)[-1] for e in svc_b.app.recorder.select_events(moved_vm.id)]
    assert topics == ["Registered", "Imported"]

    moved = imported_checker(source, svc_b, "moved")
    moved.check()  # patterns through every snapshot, backing files, folder contents
    assert run_cli(home_b, "audit", "verify", "moved").returncode == 0
    for name in moved.visible():
        moved.apply(name)
        moved.check()
        rep = verify(svc_b.app, svc_b.data, "moved")
        assert rep.clean, rep.findings

    # The source is untouched and still clean.
    assert {d: sha256(p) for d, p in src_vm.disks.items()} == own_before
    source.check()
    assert verify(source.svc.app, source.svc.data, "vm").clean


def test_bundle_contents(source: PatternVM, exported: Path) -> None:
    vm = source.vm
    with tarfile.open(exported) as tar:
        names = tar.getnames()
        assert names[-1] == bundle.MANIFEST
        manifest = json.loads(tar.extractfile(bundle.MANIFEST).read())  # type: ignore[union-attr]
        for name in names[:-1]:
            data = tar.extractfile(name).read()  # type: ignore[union-attr]
            assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        history = tar.extractfile(bundle.HISTORY).read()  # type: ignore[union-attr]
    layers = {n.id: n for n in vm.nodes.values()}
    assert len(names) == 1 + 1 + sum(len(n.layers) for n in layers.values())
    assert manifest["vm"]["name"] == "vm" and manifest["vm"]["version"] == vm.version
    assert manifest["current"] == str(vm.current)
    assert {n["id"] for n in manifest["nodes"]} == {str(i) for i in layers}
    records = unpackb(history)
    assert [r["originator_version"] for r in records] == list(range(1, vm.version + 1))
    replayed = bundle.replay_history(history)
    assert isinstance(replayed, VirtualMachine)
    assert {i: (n.parent, n.layers) for i, n in replayed.nodes.items()} == \
        {i: (n.parent, n.layers) for i, n in vm.nodes.items()}


def test_an_imported_vm_exports_and_imports_again(source: PatternVM, exported: Path, tmp_path: Path) -> None:
    home_b, home_c = tmp_path / "home-b", tmp_path / "home-c"
    ok_json(home_b, "vm", "import", str(exported), "--name", "moved")
    svc_b = open_service(home_b)
    moved = imported_checker(source, svc_b, "moved")
    moved.write()  # history after the import travels too
    moved.take("after-import")
    again = tmp_path / "again.bundle"
    ok_json(home_b, "vm", "export", "moved", str(again))
    ok_json(home_c, "vm", "import", str(again))  # keeps the name
    svc_c = open_service(home_c)
    twice = PatternVM(svc_c, "moved", dict(svc_c.app.get_vm("moved").disks),
                      expected=copy.deepcopy(moved.expected), slots_used=set(moved.slots_used))
    twice.check()
    assert svc_c.app.get_vm("moved").imported_from["name"] == "moved"  # type: ignore[index]
    assert run_cli(home_c, "audit", "verify", "moved").returncode == 0


def test_tampered_layer_is_refused_and_nothing_is_left(shared_bundle: Path, tmp_path: Path) -> None:
    home_b = tmp_path / "home-b"
    ok_json(home_b, "vm", "list")  # an existing data directory
    before = listing(home_b)
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(shared_bundle.read_bytes())
    with tarfile.open(bad) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("layers/"))
    with open(bad, "r+b") as f:
        f.seek(member.offset_data + member.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    res = run_cli(home_b, "vm", "import", str(bad), "--name", "moved", "--json")
    assert res.returncode == 2, res.stderr
    assert "sha256" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert json.loads(res.stdout)["error"]["code"] == "bad_bundle"
    assert listing(home_b) == before
    assert ok_json(home_b, "vm", "list") == []


def hostile_bundle(exported: Path, out: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(exported) as src, tarfile.open(out, "w") as dst:
        for info in src.getmembers():
            dst.addfile(info, src.extractfile(info))
        dst.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return out


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 4, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size if kind == tarfile.REGTYPE else 0, link
    return info


@pytest.mark.parametrize("member", [
    _info("../evil"),
    _info("layers/../../evil"),
    _info("/tmp/evil-absolute"),
    _info("states/00000000-0000-0000-0000-000000000000.state", tarfile.SYMTYPE, link="/etc/passwd"),
    _info("disks/d9.qcow2", tarfile.LNKTYPE, link="manifest.json"),
    _info("disks/d8.qcow2", tarfile.CHRTYPE),
    _info("evil.sh"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device", "unknown-name"])
def test_hostile_member_is_refused_before_anything_is_written(
    shared_bundle: Path, tmp_path: Path, member: tarfile.TarInfo
) -> None:
    home_b = tmp_path / "home-b"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    ok_json(home_b, "vm", "list")
    before = listing(home_b)
    evil = hostile_bundle(shared_bundle, tmp_path / "evil.bundle", member, b"evil")
    res = run_cli(home_b, "vm", "import", str(evil), "--name", "evil", "--json", cwd=cwd)
    assert res.returncode == 2, res.stderr
    assert json.loads(res.stdout)["error"]["code"] == "bad_bundle"
    assert listing(home_b) == before
    assert not (tmp_path / "evil").exists() and not (home_b.parent / "evil").exists()
    assert not Path("/tmp/evil-absolute").exists() and list(cwd.iterdir()) == []


def test_export_waits_for_the_worker(source: PatternVM, tmp_path: Path) -> None:
    source.svc.handle(c.TakeSnapshot("vm", "queued"), wait=False)  # recorded, overlay not created yet
    out = tmp_path / "x.bundle"
    res = run_cli(source.svc.data.root, "vm", "export", "vm", str(out), "--json")
    assert res.returncode == 2
    assert "wait for the worker" in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".x.bundle*"))
    source.settle()
    assert run_cli(source.svc.data.root, "vm", "export", "vm", str(out)).returncode == 0
    # A second export to the same file is refused; the first stays.
    size = out.stat().st_size
    assert run_cli(source.svc.data.root, "vm", "export", "vm", str(out)).returncode == 2
    assert out.stat().st_size == size


def test_import_refuses_a_taken_name_and_a_non_bundle(source: PatternVM, exported: Path, tmp_path: Path) -> None:
    home = source.svc.data.root
    res = run_cli(home, "vm", "import", str(exported), "--json")  # "vm" exists here
    assert res.returncode == 2 and json.loads(res.stdout)["error"]["code"] == "vm_exists"
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(os.urandom(4096))
    assert run_cli(home, "vm", "import", str(junk), "--name", "j").returncode == 2
    assert not list(home.glob(".import-*"))
    # Into the same data directory under a new name: both VMs live side by side.
    ok_json(home, "vm", "import", str(exported), "--name", "copy")
    copy_vm = imported_checker(source, open_service(home), "copy")
    copy_vm.check()
    source.check()


def test_progress_is_a_percentage_per_large_file(capsys: pytest.CaptureFixture[str]) -> None:
    show = progress_printer(True)
    show("layers/x", 1, 100)  # small files stay quiet
    show("layers/big", BIG // 2, BIG)
    show("layers/big", BIG, BIG)
    err = capsys.readouterr().err
    assert "layers/x" not in err and "100%" in err
    show = progress_printer(False)
    show("layers/big", BIG, BIG)
    assert capsys.readouterr().err == ""


def with_saved_memory(pv: PatternVM, name: str) -> Path:
    """Snapshot `name` with a saved memory state, as a live snapshot records it: what the worker
    of a running VM reports, with a file standing in for what QEMU writes (the VM does not run)."""
    pv.write()
    svc = pv.svc
    taken = svc.handle(c.TakeSnapshot(pv.name, name), wait=False)
    frozen = taken.snapshot  # type: ignore[attr-defined]
    vm = svc.app.get_vm(pv.name)
    for disk, path in vm.nodes[vm.current].layers.items():
        qemu_img.create_overlay(path, vm.nodes[frozen].layers[disk])
    switched = LiveSwitch(pause_ms=5.0, method=SaveMethod.BACKGROUND_SNAPSHOT)
    svc.app.decide(c.RecordLayersCreated(pv.name, vm.current, switched))
    state = Path(svc.data.state_path(pv.name, frozen))
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(os.urandom(300_000))
    svc.app.decide(c.RecordMemorySaved(pv.name, frozen, 300_000, 0.1, sha256(state)))
    pv.settle()
    vm = pv.vm
    pv.expected[vm.current] = copy.deepcopy(pv.expected[frozen])
    return state


def test_memory_state_travels_and_keeps_its_digest(source: PatternVM, tmp_path: Path) -> None:
    state = with_saved_memory(source, "live")
    assert verify(source.svc.app, source.svc.data, "vm").clean
    out = export(source, tmp_path / "mem.bundle")
    home_b = tmp_path / "home-b"
    ok_json(home_b, "vm", "import", str(out), "--name", "moved")
    svc_b = open_service(home_b)
    node = svc_b.app.get_vm("moved").resolve_snapshot("live")
    mem = node.memory
    assert mem is not None and mem.path == svc_b.data.state_path("moved", node.id)
    assert mem.sha256 == sha256(state) == sha256(mem.path)
    assert verify(svc_b.app, svc_b.data, "moved").clean
    imported_checker(source, svc_b, "moved").check()
    os.truncate(mem.path, 1000)
    res = run_cli(home_b, "audit", "verify", "moved", "--json")
    assert res.returncode == 1
    assert [f["kind"] for f in json.loads(res.stdout)["findings"]] == ["state_changed"]


def test_export_refuses_a_changed_memory_state(source: PatternVM, tmp_path: Path) -> None:
    state = with_saved_memory(source, "live")
    with open(state, "r+b") as f:
        f.write(b"\0")
    out = tmp_path / "mem.bundle"
    res = run_cli(source.svc.data.root, "vm", "export", "vm", str(out))
    assert res.returncode == 2 and "audit verify" in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".mem.bundle*"))


def test_a_failure_after_the_files_are_in_place_removes_them(
    shared_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.import_bundle import import_vm

    svc = open_service(tmp_path / "home-b")
    before = listing(svc.data.root)

    def broken_save(*_: Any, **__: Any) -> None:
        assert svc.data.vm_dir("moved").is_dir()  # the files were in place when it failed
        raise OSError("disk full")

    monkeypatch.setattr(svc.app, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        import_vm(svc, str(shared_bundle), "moved")
    assert listing(svc.data.root) == before
    assert svc.app.vm_names() == []
