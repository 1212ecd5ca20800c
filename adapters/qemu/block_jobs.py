"""Online merges: QEMU block jobs (``block-commit``, ``block-stream``) run while the guest runs.

Every job has a fixed id per disk (``commit-DISK``, ``stream-DISK``) and ``auto-dismiss`` off,
so a worker killed mid-job finds it again in ``query-jobs``, drives it to its end and dismisses
it (:func:`finish_left_jobs`) before doing anything else.  Each entry point is re-runnable: a job
already running is not started twice, a merge already done is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from adapters.qemu.block_graph import Layer, chain, chains, find_layer, prune_nodes
from adapters.qemu.blockdev import file_node_name, layer_options, node_name
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


# Statuses a job passes through on its way to one we act on: an event saying so needs no query.
_PASSING = {"created", "running", "waiting", "pending"}


async def run_job(m: QemuMachine, job_id: str, progress: Progress | None,
                  complete_when_ready: bool) -> int:
    """Drive a block job (auto-dismiss off) to its end; returns bytes moved.

    Event-driven (JOB_STATUS_CHANGE): ``query-jobs`` is asked at the start, when an event says
    the job is ready or concluded, and every 0.25 s without one (progress), so it also works when
    re-entered after a restart.
    """
    last = (0, 0)
    ask = True
    seq = m.event_seq
    while True:
        if ask:
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
        news = [e["data"]["status"] for e in m.events_since(seq, ["JOB_STATUS_CHANGE"])
                if e["data"]["id"] == job_id]
        seq = m.event_seq               # no await since events_since: nothing came in between
        ask = not news or news[-1] not in _PASSING


async def existing_job(m: QemuMachine, job_id: str) -> bool:
    return any(j["id"] == job_id for j in await m.query("query-jobs"))


async def finish_left_jobs(m: QemuMachine, disk: str, progress: Progress | None) -> None:
    """Drive to its end and dismiss a block job a killed worker left behind.

    Must come before any node query: QEMU 7.2 crashes on `query-named-block-nodes` while a
    concluded block-stream job is still waiting to be dismissed.
    """
    left = {j["id"] for j in await m.query("query-jobs")}
    for job in (f"stream-{disk}", f"commit-{disk}"):
        if job in left:
            await run_job(m, job, progress, complete_when_ready=True)
            await prune_nodes(m, disk)


async def flush_layer(m: QemuMachine, disk: str, path: str) -> None:
    """Put the running disk's layer file ``path`` on stable storage: its qcow2 tables (QEMU's
    metadata cache) and its data (the page cache). ``block-stream`` never flushes what it copied,
    and the layers it copied from are deleted next. QMP has no flush command, but
    ``blockdev-reopen`` flushes the node it reopens: here with the options it was opened with
    (adapters/qemu/blockdev.py), its backing and read-only state as they are now, so nothing
    else changes."""
    layers = await chain(m, disk)
    files = [layer.filename for layer in layers]
    if os.path.abspath(path) not in files:
        raise LiveError(f"disk {disk!r}: {path} is not in the chain {files}")
    index = files.index(os.path.abspath(path))
    layer = layers[index]
    nodes = await m.query("query-named-block-nodes", {"flat": True})
    read_only = any(n["node-name"] == layer.node and n.get("ro") for n in nodes)  # a backing layer
    opts: dict[str, Any] = {"driver": layer.format, "node-name": layer.node,
                            "file": file_node_name(disk, layer.filename), "read-only": read_only,
                            **layer_options(m.config.disk_options.get(disk))}
    if layer.format == "qcow2":
        opts["backing"] = layers[index + 1].node if index + 1 < len(layers) else None
    await m.qmp.execute("blockdev-reopen", {"options": [opts]})


async def _after_job(m: QemuMachine, disk: str, moved: int, t0: float) -> ChainResult:
    layers = await chain(m, disk)
    await prune_nodes(m, disk, layers)          # drops only nodes outside the chain
    return ChainResult(layers[0].filename, layers[0].backing, moved, time.monotonic() - t0)


async def stream_into_active(m: QemuMachine, disk: str, base: str | None, *,
                             progress: Progress | None = None,
                             layers: list[Layer] | None = None) -> ChainResult:
    """block-stream: pull the layers between ``base`` and the active layer into it.

    base: node name or file name of the layer to keep as the new backing,
    None to pull everything (the active layer becomes standalone).  QEMU
    rewrites the active layer's header when the job ends; the layers above
    ``base`` drop out of QEMU's graph (the caller deletes their files). ``layers``: the disk's
    chain, from a caller that has just finished any job left on the disk (finish_left_jobs).
    """
    disk_name(disk)
    job_id = f"stream-{disk}"
    t0 = time.monotonic()
    if layers is not None or not await existing_job(m, job_id):
        layers = layers or await chain(m, disk)
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
                        progress: Progress | None = None,
                        layers: list[Layer] | None = None) -> ChainResult:
    """Active block-commit: write the active layer down into its backing layer.

    When the job is READY (base in sync, guest writes mirrored) it is
    completed; the disk then writes into the former backing layer, and the
    former active layer drops out of QEMU's graph (the caller deletes it). ``layers`` as for
    :func:`stream_into_active`.
    """
    disk_name(disk)
    job_id = f"commit-{disk}"
    t0 = time.monotonic()
    if layers is not None or not await existing_job(m, job_id):
        layers = layers or await chain(m, disk)
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
