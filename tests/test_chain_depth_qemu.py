"""Bounded chains on real qemu-img and QEMU (issue 10 item 8): a long history never makes the
current state read through more than `max_chain_depth` layers, and every snapshot still reads
every byte pattern written before it, offline and while the guest runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from adapters.qemu import block_graph, qemu_img
from domain import commands as c
from domain.tree import NodeKind, chain_depth, logical_parent
from service.api import Service
from service.bootstrap import open_service
from tests.disk_harness import PatternVM
from tests.test_live_tree import SLOT, kernel, make_vm, on_vm, reads, write  # noqa: F401 - fixtures

LIMIT = 4


def backing_files(path: str) -> int:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", "--backing-chain", path],
                         check=True, capture_output=True, text=True).stdout
    return len(json.loads(out))


def test_offline_history_with_branches_stays_shallow_and_loses_nothing(tmp_path: Path) -> None:
    svc_ = open_service(str(tmp_path / "home"), "h", environ={})
    pv = PatternVM.create(svc_, tmp_path, ndisks=1)
    svc_.handle(c.SetVM("vm", max_chain_depth=LIMIT))
    for i in range(1, 13):
        pv.take(f"s{i}")
        vm = pv.vm
        assert chain_depth(vm.nodes, vm.current) <= LIMIT
        assert backing_files(vm.nodes[vm.current].layers["disk0"]) <= LIMIT + 1
    pv.check()
    pv.apply("s7")  # a branch from a flattened snapshot
    for i in range(1, 4):
        pv.take(f"b{i}")
    pv.delete("s11")
    pv.delete("s3")
    pv.check()
    vm = pv.vm
    up = logical_parent(vm.nodes, vm.resolve_snapshot("b1"))
    assert up is not None and up.name == "s7"  # the tree is the one the user made
    assert chain_depth(vm.nodes, vm.current) <= LIMIT


def test_a_running_vm_is_flattened_by_a_block_job_and_the_guest_reads_every_byte(
        svc: Service, tmp_path: Path, kernel: str) -> None:  # noqa: F811 - fixtures
    make_vm(svc, tmp_path, kernel)
    svc.handle(c.SetVM("live", max_chain_depth=LIMIT))
    for i in range(1, 8):
        write(svc, "live", 0x40 + i, i)
        svc.handle(c.TakeSnapshot("live", f"s{i}", memory=False))
    vm = svc.app.get_vm("live")
    assert any(n.origin is not None for n in vm.nodes.values()), "something was flattened"
    assert chain_depth(vm.nodes, vm.current) <= LIMIT

    async def check(m: Any) -> None:
        chain = await block_graph.chain(m, "a")
        assert len(chain) <= LIMIT + 1
        from tests.guest import probe
        for i in range(1, 8):
            for disk in ("a", "b"):
                await probe.qemu_io(m, disk, f"read -P {0x40 + i:#x} {i * SLOT} {SLOT}")

    on_vm(svc, "live", check)
    svc.handle(c.StopVM("live"))
    vm = svc.app.get_vm("live")
    for i in range(1, 8):
        snap = vm.resolve_snapshot(f"s{i}")
        for j in range(1, i):  # each snapshot holds what was written before it was taken
            assert reads(snap.layers["a"], 0x40 + j, j), f"s{i} slot {j}"
        assert [n for n in vm.nodes.values() if n.kind is NodeKind.HIDDEN] == []
        want = vm.nodes[snap.parent].layers["a"] if snap.parent is not None else None
        assert qemu_img.backing_file(snap.layers["a"]) == want
