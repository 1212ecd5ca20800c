"""Before the pause of a live take: everything that can be refused or prepared while the guest
still runs, so that the pause itself is one pipelined burst (see :mod:`adapters.qemu.live_take`).

Refused without any change: overlays not for every disk, an overlay whose qcow2 header does not
name its disk's active layer, a memory save still running, a VM that never ran (with memory), a
state file that cannot fit.  Prepared, and undone again if a later step fails: the overlay nodes
(``blockdev-add`` with ``"backing": null``), the migration parameters and capabilities, the state
file's descriptor passed to QEMU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qemu.qmp import ExecuteError

from adapters.qemu import migration, qcow2, uffd_qemu72
from adapters.qemu.block_graph import chains, drop_nodes
from adapters.qemu.blockdev import layer_options, file_node_name, node_name
from adapters.qemu.errors import LiveError
from adapters.qemu.machine import QemuMachine
from adapters.qemu.migration import FileIdent


@dataclass(frozen=True)
class Prepared:
    """What the pause works with."""

    was_running: bool
    old_nodes: dict[str, str]           # disk -> node of the current active layer
    new_nodes: dict[str, str]           # disk -> node of its overlay (added to QEMU)
    method: str | None = None           # "background-snapshot" | "precopy" | None: no memory
    fdname: str | None = None           # the state file's descriptor in QEMU
    ident: FileIdent | None = None      # the state file's (st_dev, st_ino)

    @property
    def added(self) -> list[str]:
        return list(self.new_nodes.values())

    def actions(self) -> list[dict[str, object]]:
        """The ``transaction`` actions that switch every disk at once."""
        return [{"type": "blockdev-snapshot",
                 "data": {"node": self.old_nodes[d], "overlay": self.new_nodes[d]}}
                for d in self.new_nodes]


async def refuse_early(m: QemuMachine, overlays: dict[str, str], state_path: str | None,
                       method: str | None) -> bool:
    """Every refusal that needs no change to QEMU; returns whether the guest runs."""
    if set(overlays) != set(m.disks):
        raise LiveError(f"overlays for {sorted(overlays)} but the VM has disks {sorted(m.disks)}")
    if method not in (None, "background-snapshot", "precopy"):
        raise ValueError(f"method {method!r}")
    if state_path is not None and (await migration.status(m)).get("status") in migration.ACTIVE:
        raise LiveError("a memory save is still running on this VM")
    runstate = await m.query_status()
    if runstate not in ("running", "paused", "prelaunch"):
        raise LiveError(f"VM is {runstate!r}: no snapshot now")
    if runstate == "prelaunch" and state_path is not None:
        # QEMU 7.2 aborts ("invalid runstate transition: 'prelaunch' -> 'paused'")
        # on a background snapshot of a VM that never ran, and a pre-copy save
        # would leave its disks inactivated: there is nothing to save anyway.
        raise LiveError("VM has never run (started paused): snapshot it without memory")
    if state_path is not None:
        migration.check_space(m, state_path)
    uffd_qemu72.clear(m)
    return runstate == "running"


async def check_overlays(m: QemuMachine, overlays: dict[str, str]
                         ) -> tuple[dict[str, str], dict[str, str]]:
    """Each overlay's header must name its disk's active layer: (old nodes, new node names)."""
    layers = await chains(m)
    olds: dict[str, str] = {}
    news: dict[str, str] = {}
    for disk, path in overlays.items():
        path = os.path.abspath(path)
        top = layers[disk][0]
        try:
            header = qcow2.backing_file(path)
        except qcow2.Qcow2Error as exc:
            raise LiveError(str(exc)) from exc
        if header is None or not qcow2.same_file(header, top.filename):
            raise LiveError(f"overlay {path} has backing {header!r}, but disk {disk!r} "
                            f"writes into {top.filename}")
        olds[disk] = top.node
        news[disk] = node_name(disk, path)
    return olds, news


async def prepare(m: QemuMachine, overlays: dict[str, str], state_path: str | None,
                  method: str | None, max_bandwidth: int, downtime_ms: int) -> Prepared:
    """Refuse or prepare everything; on a failure half way, undo what was added."""
    was_running = await refuse_early(m, overlays, state_path, method)
    olds, news = await check_overlays(m, overlays)
    added: list[str] = []
    fdname = None
    try:
        for disk, path in overlays.items():
            path = os.path.abspath(path)
            extra = layer_options(m.config.disk_options.get(disk))  # the disk's cache and discard
            await m.qmp.execute("blockdev-add", {
                "driver": "qcow2", "node-name": news[disk],
                "file": {"driver": "file", "filename": path,
                         "node-name": file_node_name(disk, path), **extra},
                "backing": None, **extra})
            added.append(news[disk])
        if state_path is None:
            return Prepared(was_running, olds, news)
        await m.qemu_major()                       # cached: no query after the pause
        chosen = await _prepare_migration(m, method, max_bandwidth, downtime_ms)
        fdname, ident = await migration.pass_state_fd(m, os.path.abspath(state_path))
        return Prepared(was_running, olds, news, chosen, fdname, ident)
    except BaseException:
        if fdname:
            await migration.drop_fd(m, fdname)
        await drop_nodes(m, added)
        raise


async def _prepare_migration(m: QemuMachine, method: str | None, max_bandwidth: int,
                             downtime_ms: int) -> str:
    await m.qmp.execute("migrate-set-parameters", {"max-bandwidth": max_bandwidth,
                                                   "downtime-limit": downtime_ms})
    if method in (None, "background-snapshot"):
        try:
            await migration.set_caps(m, events=True, pause_before_switchover=False,
                                     background_snapshot=True)
            return "background-snapshot"
        except ExecuteError:
            if method == "background-snapshot":
                raise
    await migration.set_caps(m, events=True, background_snapshot=False,
                             pause_before_switchover=not m.config.multithreaded_tcg)
    return "precopy"
