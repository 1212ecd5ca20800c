"""Live VMs under snaptree (issue #3), through the service and the worker, on real QEMU (TCG).

The guest is the bare-metal test guest (tests/guest): a heartbeat counter in RAM and 4 MiB it keeps
rewriting. Byte patterns go into the running VM's disks through its own devices (HMP qemu-io).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from adapters.config import open_app
from adapters.qemu import live, qemu_img, qemu_io
from adapters.service import Service
from adapters.storage import DataDir
from domain.errors import Conflict
from domain.tree import NodeKind
from domain.work import WorkKind, pending_work
from projections.tree_view import tree_json
from tests.guest import build as guest_build

SLOT = 64 * 1024


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(guest_build.build_guest(tmp_path_factory.mktemp("guest")))


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    data = DataDir.open(tmp_path / "home")
    s = Service(data, open_app(data, environ={}), "testhost")
    yield s
    for name in s.app.vm_names():  # never leave a QEMU behind
        if s.runtime.is_running(name):
            s.runtime.stop(s.app.get_vm(name))


def make_vm(svc: Service, tmp: Path, kernel: str, name: str = "live") -> None:
    disks = []
    for d in ("a", "b"):
        path = str(tmp / f"{name}-{d}.qcow2")
        qemu_img.create_image(path, 16 << 20)
        disks.append(f"{d}={path}")
    svc.create_vm(name, disks, config={"memory_mib": 64, "cpus": 1, "kernel": kernel})
    svc.start_vm(name)


def on_vm(svc: Service, name: str, fn: Any) -> Any:
    async def go() -> Any:
        async with svc.runtime.attached(svc.app.get_vm(name)) as m:
            return await fn(m)

    return asyncio.run(go())


def write(svc: Service, name: str, pattern: int, slot: int) -> None:
    async def go(m: Any) -> None:
        for disk in ("a", "b"):
            await live.qemu_io(m, disk, f"write -P {pattern:#x} {slot * SLOT} {SLOT}")

    on_vm(svc, name, go)


def counter(svc: Service, name: str) -> int:
    async def go(m: Any) -> int:
        return await live.read_counter(m)

    return int(on_vm(svc, name, go))


def reads(path: str, pattern: int, slot: int) -> bool:
    return qemu_io.read_through(path, slot * SLOT, SLOT, pattern)


def test_live_take_with_two_disks_saves_memory_while_the_guest_runs(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    write(svc, "live", 0x11, 0)
    node = svc.take("live", "A")
    svc.wait("live")
    vm = svc.app.get_vm("live")
    a = vm.nodes[node]
    mem = a.memory or {}
    assert mem["state"] == "saved" and mem["bytes"] > 0 and len(mem["sha256"]) == 64
    assert mem["method"] in ("background-snapshot", "precopy")
    assert isinstance(mem["pause_ms"], float)  # measured from QEMU's STOP/RESUME events
    assert os.path.getsize(str(mem["path"])) == mem["bytes"]
    doc = tree_json(vm)
    snap = next(n for n in doc["nodes"] if n["id"] == str(node))
    assert snap["memory"]["state"] == "saved"
    # The running VM now writes into the new overlays; A's layers hold the old data only.
    write(svc, "live", 0x22, 0)
    for disk, path in a.layers.items():
        assert reads(path, 0x11, 0)
    assert svc.status("live")["state"] == "running"
    # A disk-only live snapshot records its pause too.
    b = svc.take("live", "B", memory=False)
    svc.wait("live")
    bmem = svc.app.get_vm("live").nodes[b].memory or {}
    assert bmem.get("state") == "none" and isinstance(bmem.get("pause_ms"), float)


def test_apply_with_memory_resumes_where_the_snapshot_was(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    write(svc, "live", 0x31, 1)
    before = counter(svc, "live")
    svc.take("live", "S")
    svc.wait("live")
    after = counter(svc, "live")
    write(svc, "live", 0x32, 1)  # after the snapshot: must not survive the apply
    old_current = svc.app.get_vm("live").nodes[svc.app.get_vm("live").current].layers
    svc.app.apply("live", "S")
    svc.wait("live")
    assert svc.status("live")["state"] == "running"
    restored = counter(svc, "live")
    assert restored >= before  # it continues from the saved instant...
    assert not any(Path(p).exists() for p in old_current.values())  # old current discarded

    async def check(m: Any) -> None:
        for disk in ("a", "b"):
            await live.qemu_io(m, disk, f"read -P 0x31 {SLOT} {SLOT}")

    on_vm(svc, "live", check)
    assert after >= before


def test_apply_paused_and_apply_without_memory_leaves_the_vm_stopped(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    svc.take("live", "M")
    svc.take("live", "D", memory=False)
    svc.wait("live")
    svc.app.apply("live", "M", paused=True)
    svc.wait("live")
    assert svc.status("live")["state"] == "paused"
    svc.app.apply("live", "D")
    svc.wait("live")
    assert svc.status("live")["state"] == "stopped"


def test_online_merge_of_the_running_current_layer_loses_nothing(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    write(svc, "live", 0x41, 0)
    svc.take("live", "A", memory=False)
    write(svc, "live", 0x42, 1)
    svc.take("live", "B", memory=False)
    svc.wait("live")
    write(svc, "live", 0x43, 2)
    svc.app.delete("live", "B")  # B's one dependent is the running current layer
    svc.wait("live")
    vm = svc.app.get_vm("live")
    assert not [n for n in vm.nodes.values() if n.kind is NodeKind.HIDDEN]
    current = vm.nodes[vm.current]
    assert current.parent == vm.resolve_snapshot("A").id
    write(svc, "live", 0x44, 3)  # the guest keeps writing after the merge

    want_chain = [current.layers["a"], vm.resolve_snapshot("A").layers["a"]]

    async def check_chain(m: Any) -> None:
        chain = await live.chain(m, "a")
        assert [layer.filename for layer in chain][:2] == want_chain

    on_vm(svc, "live", check_chain)

    async def check(m: Any) -> None:
        for slot, pattern in ((0, 0x41), (1, 0x42), (2, 0x43), (3, 0x44)):
            for disk in ("a", "b"):
                await live.qemu_io(m, disk, f"read -P {pattern:#x} {slot * SLOT} {SLOT}")

    on_vm(svc, "live", check)
    # Deleting A merges into the user's own disk, online, while the guest runs.
    svc.app.delete("live", "A")
    svc.wait("live")
    vm = svc.app.get_vm("live")
    assert vm.nodes[vm.current].layers == vm.disks
    on_vm(svc, "live", check)


def test_apply_while_saving_waits_and_no_wait_refuses(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    svc.take("live", "S")  # recorded; the live switch has not happened yet
    with pytest.raises(Conflict):
        svc.app.apply("live", "S")  # it would discard the overlay the switch goes to
    worker = svc.worker()
    vm = svc.app.get_vm("live")
    first = pending_work(vm)[0]
    assert first.kind is WorkKind.CREATE_LAYERS
    worker.effects.perform(vm, first)  # the switch: S's memory save is now running
    assert (svc.app.get_vm("live").resolve_snapshot("S").memory or {})["started"]
    with pytest.raises(Conflict):
        svc.app.apply("live", "S", wait_for_memory=False)  # --no-wait fails clearly
    svc.app.apply("live", "S")
    svc.wait("live")  # saves S's memory first, then restores from it
    vm = svc.app.get_vm("live")
    assert (vm.resolve_snapshot("S").memory or {})["state"] == "saved"
    assert svc.status("live")["state"] == "running"


def test_delete_while_saving_cancels_the_save_and_removes_the_file(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    node = svc.take("live", "S")
    vm = svc.app.get_vm("live")
    state = str((vm.nodes[node].memory or {})["path"])
    svc.app.delete("live", "S")
    svc.wait("live")
    assert not os.path.exists(state)
    assert svc.status("live")["state"] == "running"
    assert counter(svc, "live") > 0
    vm = svc.app.get_vm("live")
    assert vm.nodes[vm.current].layers == vm.disks  # S merged into the own disks


def test_snaptree_restart_with_a_vm_running(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    pid = svc.status("live")["pid"]
    # A new process: a new application on the same data directory, nothing in memory.
    again = Service(svc.data, open_app(svc.data, environ={}), "testhost")
    assert again.status("live") == {"vm": "live", "state": "running", "pid": pid, "host": "testhost"}
    again.take("live", "after-restart")
    again.wait("live")
    snap = again.app.get_vm("live").resolve_snapshot("after-restart")
    assert (snap.memory or {})["state"] == "saved"
    again.stop_vm("live")
    assert again.status("live")["state"] == "stopped"
