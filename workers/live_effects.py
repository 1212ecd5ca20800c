"""The side effects of the tree rules on a VM whose QEMU is running, over QMP.

Same contract as `workers.disk_effects`: each step checks the running chain first, so a re-run
after a crash finds the switch made or the job done and moves on.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any, Callable

from adapters.qemu import live, qemu_img
from adapters.qemu.machine import QemuMachine, node_name
from adapters.runtime import Runtime
from domain.tree import MergeDirection, Node, ancestors
from domain.vm import VirtualMachine

Step = Callable[[float], None]


async def active_files(m: QemuMachine) -> dict[str, str]:
    return {disk: layers[0].filename for disk, layers in (await live.chains(m)).items()}


async def switch_to_overlays(
    runtime: Runtime, vm: VirtualMachine, node: Node
) -> dict[str, Any] | None:
    """Make a running VM write into `node`'s overlays (a live take); None if it is not running
    on `node`'s parent any more. Starts the memory save when the frozen snapshot asked for one."""
    assert node.parent is not None
    parent = vm.nodes[node.parent]
    async with runtime.attached(vm) as m:
        active = await active_files(m)
        if active == node.layers:
            return {"pause_ms": None, "method": None, "resumed_after_crash": True}
        if active != parent.layers:
            return None
        mem = parent.memory or {}
        state_path = mem.get("path") if mem.get("state") == "saving" and not mem.get("started") else None
        if state_path is not None:
            os.makedirs(os.path.dirname(str(state_path)), exist_ok=True)
        result = await live.live_snapshot(m, dict(node.layers), state_path)
        if result.error:
            raise live.LiveError(result.error)
        return {
            "pause_ms": round(result.pause_ms, 3) if result.pause_ms is not None else None,
            "method": result.method,
            "qemu_downtime_ms": result.qemu_downtime_ms,
        }


async def wait_memory_saved(runtime: Runtime, vm: VirtualMachine, node: Node,
                            progress: Step) -> tuple[int, float]:
    mem = node.memory or {}
    path = str(mem["path"])
    async with runtime.attached(vm) as m:
        info = await live.wait_save(m, path)
        for _ in range(20):  # QEMU 7.2 reports `completed` a moment before it sets total-time
            if info.get("total-time"):
                break
            await asyncio.sleep(0.05)
            info = await m.qmp.execute("query-migrate")
    size = os.path.getsize(path)
    progress(1.0)
    return size, float(info.get("total-time", 0)) / 1000.0


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


async def restore_into(runtime: Runtime, vm: VirtualMachine, node: Node, resume: str | None) -> dict[str, Any]:
    """Start the VM on `node`'s fresh overlays from its snapshot's saved memory."""
    assert node.parent is not None
    snap = vm.nodes[node.parent]
    mem = snap.memory or {}
    m = await live.restore(
        runtime.run_dir(vm.name),
        runtime.machine(vm, disks=node.layers, config=snap.config).config,
        dict(node.layers),
        str(mem["path"]),
        paused=resume == "paused",
    )
    await m.detach()
    return {"restored_from": str(snap.id)}


async def stop(runtime: Runtime, vm: VirtualMachine) -> None:
    await runtime.stop_async(vm)


async def cancel_memory_save_of(runtime: Runtime, vm: VirtualMachine, path: str) -> str:
    """Cancel the running save only when it writes `path` (another snapshot's save goes on)."""
    async with runtime.attached(vm) as m:
        if not live._qemu_holds(m, live._file_ident(path)):
            return "none"
        return await live.cancel_save(m, path)


def in_running_chain(vm: VirtualMachine, node: Node) -> bool:
    """Whether `node`'s layers are open in the running QEMU (the current state or below it)."""
    return node.id == vm.current or any(a.id == node.id for a in ancestors(vm.nodes, vm.current))


async def merge_online(
    runtime: Runtime, vm: VirtualMachine, hidden: Node, dep: Node, direction: MergeDirection,
    disk: str, step: Step,
) -> None:
    """Merge `hidden` into `dep`, which is in the running chain, with a QEMU block job."""

    def progress(done: int, total: int) -> None:
        step(done / total if total else 0.0)

    async with runtime.attached(vm) as m:
        await finish_left_jobs(m, disk, progress)
        layers = (await live.chains(m))[disk]
        files = [layer.filename for layer in layers]
        top, target = dep.layers[disk], hidden.layers[disk]
        if direction is MergeDirection.COMMIT_DOWN:
            if top not in files:
                return  # done before a crash: the dependent's file left the chain
            if top == files[0]:
                await live.commit_active(m, disk, progress=progress)
            else:
                await _commit_intermediate(m, disk, top, target, progress)
        else:
            assert hidden.parent is not None
            grandparent = vm.nodes[hidden.parent].layers[disk]
            if qemu_img.backing_file(top) == grandparent:
                return
            if top == files[0]:
                await live.stream_into_active(m, disk, grandparent, progress=progress)
            else:
                await _stream_intermediate(m, disk, top, grandparent, progress)


async def finish_left_jobs(m: QemuMachine, disk: str, progress: Callable[[int, int], None]) -> None:
    """Drive to its end and dismiss a block job a killed worker left behind.

    Must come before any node query: QEMU 7.2 crashes on `query-named-block-nodes` while a
    concluded block-stream job is still waiting to be dismissed.
    """
    for job in (f"stream-{disk}", f"commit-{disk}"):
        if await live._existing_job(m, job):
            await live._run_job(m, job, progress, complete_when_ready=True)
            await live.prune_nodes(m, disk)


async def _commit_intermediate(m: QemuMachine, disk: str, top: str, base: str,
                               progress: Callable[[int, int], None]) -> None:
    job = f"commit-{disk}"
    if not await live._existing_job(m, job):
        layers = (await live.chains(m))[disk]
        await m.qmp.execute("block-commit", {
            "job-id": job, "device": layers[0].node, "top-node": node_name(disk, top),
            "base-node": node_name(disk, base), "backing-file": base, "auto-dismiss": False,
        })
    await live._run_job(m, job, progress, complete_when_ready=False)
    await live.prune_nodes(m, disk)


async def _stream_intermediate(m: QemuMachine, disk: str, into: str, base: str,
                               progress: Callable[[int, int], None]) -> None:
    job = f"stream-{disk}"
    if not await live._existing_job(m, job):
        await m.qmp.execute("block-stream", {
            "job-id": job, "device": node_name(disk, into), "base-node": node_name(disk, base),
            "backing-file": base, "auto-dismiss": False,
        })
    await live._run_job(m, job, progress, complete_when_ready=False)
    await live.prune_nodes(m, disk)
