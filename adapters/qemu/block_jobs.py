"""Online merges: QEMU block jobs (``block-commit``, ``block-stream``) run while the guest runs.

Every job has a fixed id per disk (``commit-DISK``, ``stream-DISK``) and ``auto-dismiss`` off,
so a worker killed mid-job finds it again in ``query-jobs``, drives it to its end and dismisses
it (:func:`finish_left_jobs`) before doing anything else.  Each entry point is re-runnable: a job
already running is not started twice, a merge already done is a no-op.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable

from adapters.qemu.block_graph import chain, chains, find_layer, prune_nodes
from adapters.qemu.blockdev import node_name
from adapters.qemu.errors import LiveError, MachineError
from adapters.qemu.machine import QemuMachine
from domain.names import disk_name

Progress = Callable[[int, int], Any]     # (done, total), bytes


@dataclass(frozen=True)
class ChainResult:
    """A disk's chain after an online merge."""

    active: str               # file the disk now writes into
    backing: str | None       # backing file of the active layer now (recorded in its header)
    bytes: int                # bytes the job copied
    seconds: float


async def run_job(m: QemuMachine, job_id: str, progress: Progress | None,
                  complete_when_ready: bool) -> int:
    """Drive a block job (auto-dismiss off) to its end; returns bytes moved.

    Event-driven (JOB_STATUS_CHANGE) with query-jobs polling as a backstop,
    so it also works when re-entered after a restart.
    """
    last = (0, 0)
    while True:
        seq = m.event_seq
        jobs = {j["id"]: j for j in await m.query("query-jobs")}
        job = jobs.get(job_id)
        if job is None:
            raise LiveError(f"block job {job_id} vanished")
        cur = (job.get("current-progress", 0), job.get("total-progress", 0))
        if progress is not None and cur != last:
            progress(*cur)
            last = cur
        status = job["status"]
        if status == "ready" and complete_when_ready:
            await m.qmp.execute("job-complete", {"id": job_id})
            complete_when_ready = False
            continue
        if status == "concluded":
            await m.qmp.execute("job-dismiss", {"id": job_id})
            if job.get("error"):
                raise LiveError(f"block job {job_id} failed: {job['error']}")
            return int(cur[0])
        with contextlib.suppress(MachineError):
            await m.wait_event("JOB_STATUS_CHANGE", after=seq, timeout=0.25,
                               match=lambda e: e["data"]["id"] == job_id)


async def existing_job(m: QemuMachine, job_id: str) -> bool:
    return any(j["id"] == job_id for j in await m.query("query-jobs"))


async def finish_left_jobs(m: QemuMachine, disk: str, progress: Progress | None) -> None:
    """Drive to its end and dismiss a block job a killed worker left behind.

    Must come before any node query: QEMU 7.2 crashes on `query-named-block-nodes` while a
    concluded block-stream job is still waiting to be dismissed.
    """
    for job in (f"stream-{disk}", f"commit-{disk}"):
        if await existing_job(m, job):
            await run_job(m, job, progress, complete_when_ready=True)
            await prune_nodes(m, disk)


async def _after_job(m: QemuMachine, disk: str, moved: int, t0: float) -> ChainResult:
    await prune_nodes(m, disk)
    after = (await chain(m, disk))[0]
    return ChainResult(after.filename, after.backing, moved, time.monotonic() - t0)


async def stream_into_active(m: QemuMachine, disk: str, base: str | None, *,
                             progress: Progress | None = None) -> ChainResult:
    """block-stream: pull the layers between ``base`` and the active layer into it.

    base: node name or file name of the layer to keep as the new backing,
    None to pull everything (the active layer becomes standalone).  QEMU
    rewrites the active layer's header when the job ends; the layers above
    ``base`` drop out of QEMU's graph (the caller deletes their files).
    """
    disk_name(disk)
    job_id = f"stream-{disk}"
    t0 = time.monotonic()
    if not await existing_job(m, job_id):
        layers = await chain(m, disk)
        top = layers[0]
        args: dict[str, Any] = {"job-id": job_id, "device": top.node, "auto-dismiss": False}
        if base is not None:
            keep = find_layer(layers, base)
            if keep is top:
                raise LiveError("base is the active layer itself")
            if keep.filename == top.backing:
                return ChainResult(top.filename, top.backing, 0, 0.0)
            args["base-node"] = keep.node
            args["backing-file"] = keep.filename
        elif top.backing is None:
            return ChainResult(top.filename, None, 0, 0.0)
        await m.qmp.execute("block-stream", args)
    moved = await run_job(m, job_id, progress, complete_when_ready=False)
    return await _after_job(m, disk, moved, t0)


async def commit_active(m: QemuMachine, disk: str, *,
                        progress: Progress | None = None) -> ChainResult:
    """Active block-commit: write the active layer down into its backing layer.

    When the job is READY (base in sync, guest writes mirrored) it is
    completed; the disk then writes into the former backing layer, and the
    former active layer drops out of QEMU's graph (the caller deletes it).
    """
    disk_name(disk)
    job_id = f"commit-{disk}"
    t0 = time.monotonic()
    if not await existing_job(m, job_id):
        layers = await chain(m, disk)
        if len(layers) < 2:
            raise LiveError(f"disk {disk!r}: the active layer has no backing to commit into")
        await m.qmp.execute("block-commit", {
            "job-id": job_id, "device": layers[0].node, "base-node": layers[1].node,
            "auto-dismiss": False})
    moved = await run_job(m, job_id, progress, complete_when_ready=True)
    return await _after_job(m, disk, moved, t0)


async def commit_intermediate(m: QemuMachine, disk: str, top: str, base: str,
                              progress: Progress | None) -> None:
    """block-commit of the layer file ``top`` (below the active layer) into ``base``."""
    job = f"commit-{disk}"
    if not await existing_job(m, job):
        layers = (await chains(m))[disk]
        await m.qmp.execute("block-commit", {
            "job-id": job, "device": layers[0].node, "top-node": node_name(disk, top),
            "base-node": node_name(disk, base), "backing-file": base, "auto-dismiss": False,
        })
    await run_job(m, job, progress, complete_when_ready=False)
    await prune_nodes(m, disk)


async def stream_intermediate(m: QemuMachine, disk: str, into: str, base: str,
                              progress: Progress | None) -> None:
    """block-stream into the layer file ``into`` (below the active layer) down to ``base``."""
    job = f"stream-{disk}"
    if not await existing_job(m, job):
        await m.qmp.execute("block-stream", {
            "job-id": job, "device": node_name(disk, into), "base-node": node_name(disk, base),
            "backing-file": base, "auto-dismiss": False,
        })
    await run_job(m, job, progress, complete_when_ready=False)
    await prune_nodes(m, disk)
