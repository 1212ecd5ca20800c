"""Live VMs under snaptree (issue #3), through the service and the worker, on real QEMU (TCG).

The guest is the bare-metal test guest (tests/guest): a heartbeat counter in RAM and 4 MiB it keeps
rewriting. Byte patterns go into the running VM's disks through its own devices (HMP qemu-io).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from adapters.qemu import block_graph, qemu_img, qemu_io
from domain import commands as c
from domain.errors import Conflict
from domain.memory import MemoryState, SaveMethod
from service.api import Service
from service.bootstrap import open_service
from service.steps import Drain
from domain.tree import NodeKind
from domain.work import WorkKind, pending_work
from projections.tree_view import tree_json
from tests.guest import build as guest_build
from tests.guest import probe

SLOT = 64 * 1024


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(guest_build.build_guest(tmp_path_factory.mktemp("guest")))


def make_vm(svc: Service, tmp: Path, kernel: str, name: str = "live") -> None:
    disks = []
    for d in ("a", "b"):
        path = str(tmp / f"{name}-{d}.qcow2")
        qemu_img.create_image(path, 16 << 20)
        disks.append(f"{d}={path}")
    svc.handle(c.CreateVM(name, disk=tuple(disks), memory=64, cpus=1, kernel=kernel))
    svc.handle(c.StartVM(name))


def on_vm(svc: Service, name: str, fn: Any) -> Any:
    async def go() -> Any:
        async with probe.attached(svc.data, svc.app.get_vm(name)) as m:
            return await fn(m)

    return asyncio.run(go())


def write(svc: Service, name: str, pattern: int, slot: int) -> None:
    async def go(m: Any) -> None:
        for disk in ("a", "b"):
            await probe.qemu_io(m, disk, f"write -P {pattern:#x} {slot * SLOT} {SLOT}")

    on_vm(svc, name, go)


def counter(svc: Service, name: str) -> int:
    async def go(m: Any) -> int:
        return await probe.read_counter(m)

    return int(on_vm(svc, name, go))


def take(svc: Service, name: str, *, memory: bool = True, vm: str = "live") -> Any:
    return svc.handle(c.TakeSnapshot(vm, name, memory=memory)).snapshot  # type: ignore[attr-defined]


def status(svc: Service, vm: str = "live") -> dict[str, Any]:
    return svc.handle(c.GetVMStatus(vm)).json()  # type: ignore[no-any-return]


def reads(path: str, pattern: int, slot: int) -> bool:
    return qemu_io.read_through(path, slot * SLOT, SLOT, pattern)


def test_live_take_with_two_disks_saves_memory_while_the_guest_runs(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    write(svc, "live", 0x11, 0)
    node = take(svc, "A")
    vm = svc.app.get_vm("live")
    a = vm.nodes[node]
    mem = a.memory
    assert mem is not None and mem.state is MemoryState.SAVED and mem.bytes and len(mem.sha256 or "") == 64
    assert mem.method in (SaveMethod.BACKGROUND_SNAPSHOT, SaveMethod.PRECOPY)
    assert isinstance(mem.pause_ms, float)  # measured from QEMU's STOP/RESUME events
    assert mem.path is not None and os.path.getsize(mem.path) == mem.bytes
    doc = tree_json(vm)
    snap = next(n for n in doc["nodes"] if n["id"] == str(node))
    assert snap["memory"]["state"] == "saved"
    # The running VM now writes into the new overlays; A's layers hold the old data only.
    write(svc, "live", 0x22, 0)
    for disk, path in a.layers.items():
        assert reads(path, 0x11, 0)
    assert status(svc)["state"] == "running"
    # A disk-only live snapshot records its pause too.
    b = take(svc, "B", memory=False)
    bmem = svc.app.get_vm("live").nodes[b].memory
    assert bmem is not None and bmem.state is MemoryState.NONE and isinstance(bmem.pause_ms, float)


def test_apply_with_memory_resumes_where_the_snapshot_was(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    write(svc, "live", 0x31, 1)
    before = counter(svc, "live")
    take(svc, "S")
    after = counter(svc, "live")
    write(svc, "live", 0x32, 1)  # after the snapshot: must not survive the apply
    old_current = svc.app.get_vm("live").nodes[svc.app.get_vm("live").current].layers
    svc.handle(c.ApplySnapshot("live", "S"))
    assert status(svc)["state"] == "running"
    restored = counter(svc, "live")
    assert restored >= before  # it continues from the saved instant...
    assert not any(Path(p).exists() for p in old_current.values())  # old current discarded

    async def check(m: Any) -> None:
        for disk in ("a", "b"):
            await probe.qemu_io(m, disk, f"read -P 0x31 {SLOT} {SLOT}")

    on_vm(svc, "live", check)
    assert after >= before


def test_apply_paused_and_apply_without_memory_leaves_the_vm_stopped(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    svc.handle(c.TakeSnapshot("live", "M"), wait=False)
    take(svc, "D", memory=False)
    svc.handle(c.ApplySnapshot("live", "M", paused=True))
    assert status(svc)["state"] == "paused"
    svc.handle(c.ApplySnapshot("live", "D"))
    assert status(svc)["state"] == "stopped"


def test_online_merge_of_the_running_current_layer_loses_nothing(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    write(svc, "live", 0x41, 0)
    svc.handle(c.TakeSnapshot("live", "A", memory=False), wait=False)
    write(svc, "live", 0x42, 1)
    take(svc, "B", memory=False)
    write(svc, "live", 0x43, 2)
    svc.handle(c.DeleteSnapshot("live", "B"))  # B's one dependent is the running current layer
    vm = svc.app.get_vm("live")
    assert not [n for n in vm.nodes.values() if n.kind is NodeKind.HIDDEN]
    current = vm.nodes[vm.current]
    assert current.parent == vm.resolve_snapshot("A").id
    write(svc, "live", 0x44, 3)  # the guest keeps writing after the merge

    want_chain = [current.layers["a"], vm.resolve_snapshot("A").layers["a"]]

    async def check_chain(m: Any) -> None:
        chain = await block_graph.chain(m, "a")
        assert [layer.filename for layer in chain][:2] == want_chain

    on_vm(svc, "live", check_chain)

    async def check(m: Any) -> None:
        for slot, pattern in ((0, 0x41), (1, 0x42), (2, 0x43), (3, 0x44)):
            for disk in ("a", "b"):
                await probe.qemu_io(m, disk, f"read -P {pattern:#x} {slot * SLOT} {SLOT}")

    on_vm(svc, "live", check)
    # Deleting A merges into the user's own disk, online, while the guest runs.
    svc.handle(c.DeleteSnapshot("live", "A"))
    vm = svc.app.get_vm("live")
    assert vm.nodes[vm.current].layers == vm.disks
    on_vm(svc, "live", check)


def test_apply_while_saving_waits_for_the_switch_then_for_the_save(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    svc.handle(c.TakeSnapshot("live", "S"), wait=False)  # recorded; the live switch has not happened yet
    with pytest.raises(Conflict):
        # it would discard the overlay the switch goes to
        svc.handle(c.ApplySnapshot("live", "S"), wait=False)
    worker = svc.worker()
    vm = svc.app.get_vm("live")
    first = pending_work(vm)[0]
    assert first.kind is WorkKind.CREATE_LAYERS
    drain = Drain(worker, vm)
    drain.perform(first)  # the switch: S's memory save is now running
    drain.close()
    assert svc.app.get_vm("live").resolve_snapshot("S").memory.state is MemoryState.SAVING  # type: ignore[union-attr]
    # Recorded at once (--no-wait, or the queue); the worker saves S's memory, then restores it.
    svc.handle(c.ApplySnapshot("live", "S"), wait=False)
    svc.settle("live")
    vm = svc.app.get_vm("live")
    assert vm.resolve_snapshot("S").memory.state is MemoryState.SAVED  # type: ignore[union-attr]
    assert status(svc)["state"] == "running"


def test_delete_while_saving_cancels_the_save_and_removes_the_file(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    node = svc.handle(c.TakeSnapshot("live", "S"), wait=False).snapshot  # type: ignore[attr-defined]
    vm = svc.app.get_vm("live")
    state = str(vm.nodes[node].memory.path)  # type: ignore[union-attr]
    svc.handle(c.DeleteSnapshot("live", "S"))
    assert not os.path.exists(state)
    assert status(svc)["state"] == "running"
    assert counter(svc, "live") > 0
    vm = svc.app.get_vm("live")
    assert vm.nodes[vm.current].layers == vm.disks  # S merged into the own disks


def test_snaptree_restart_with_a_vm_running(svc: Service, tmp_path: Path, kernel: str) -> None:
    make_vm(svc, tmp_path, kernel)
    pid = status(svc)["pid"]
    # A new process: a new application on the same data directory, nothing in memory.
    again = open_service(str(svc.data.root), "testhost", environ={})
    assert status(again) == {"vm": "live", "state": "running", "pid": pid, "host": "testhost", "source": "probe",
                             "agent": "absent"}  # the bare-metal guest runs no agent
    take(again, "after-restart")
    snap = again.app.get_vm("live").resolve_snapshot("after-restart")
    assert snap.memory is not None and snap.memory.state is MemoryState.SAVED
    again.handle(c.StopVM("live"))
    assert status(again)["state"] == "stopped"
