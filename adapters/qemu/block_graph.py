"""A running VM's block graph as QEMU has it open: each disk's chain of layers, top first.

QEMU is the authority on what a running disk writes into and reads through (the qcow2 headers
may lag behind a block job by a moment); everything here asks it over QMP.  Node names are the
stable ones of :mod:`adapters.qemu.blockdev`.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any

from qemu.qmp import ExecuteError

from adapters.qemu.blockdev import node_name
from adapters.qemu.errors import LiveError
from adapters.qemu.machine import QemuMachine


@dataclass(frozen=True)
class Layer:
    node: str                 # format node name
    filename: str             # layer file
    format: str
    backing: str | None       # filename of the next layer down, None at the bottom


async def chain(m: QemuMachine, disk: str) -> list[Layer]:
    """The disk's chain as QEMU has it open right now, active layer first."""
    return (await _chains(m, [disk]))[disk]


async def chains(m: QemuMachine) -> dict[str, list[Layer]]:
    """chain() of every disk of the VM (one query-block + one node query)."""
    return await _chains(m, list(m.disks))


async def active_node(m: QemuMachine, disk: str) -> str:
    return (await chain(m, disk))[0].node


async def _chains(m: QemuMachine, disks: list[str]) -> dict[str, list[Layer]]:
    blocks = await m.query("query-block")
    nodes = await m.query("query-named-block-nodes", {"flat": True})
    by_file: dict[str, list[dict[str, Any]]] = {}
    for n in nodes:
        if n["drv"] not in ("file", "host_device"):
            by_file.setdefault(n["file"], []).append(n)
    return {disk: _disk_chain(m, disk, blocks, by_file) for disk in disks}


def _disk_chain(m: QemuMachine, disk: str, blocks: list[dict[str, Any]],
                by_file: dict[str, list[dict[str, Any]]]) -> list[Layer]:
    dev = m.device_id(disk)
    root = None
    for b in blocks:
        qdev = b.get("qdev", "")
        # A device with an id is named by it (scsi-hd, nvme, ide-hd); virtio-blk-pci's backend
        # by its QOM path below the id.
        if qdev in (dev, f"/machine/peripheral/{dev}") or \
                qdev.startswith(f"/machine/peripheral/{dev}/") or b.get("device") == dev:
            root = b.get("inserted")
            break
    if root is None:
        raise LiveError(f"disk {disk!r}: no such device in QEMU")
    layers = []
    image: dict[str, Any] | None = root["image"]
    name = root["node-name"]
    while image is not None:
        filename = image["filename"]
        if name is None:
            # query-block names only the top node: find the others by file, ours first
            cands = by_file.get(filename, [])
            ours = [c for c in cands if c["node-name"] == node_name(disk, filename)]
            picks = ours or cands
            if not picks:
                raise LiveError(f"disk {disk!r}: no node for layer {filename}")
            name = picks[0]["node-name"]
        backing = image.get("backing-image")
        layers.append(Layer(name, filename, image["format"],
                            backing["filename"] if backing else None))
        image, name = backing, None
    return layers


def find_layer(layers: list[Layer], ref: str) -> Layer:
    """The layer named by ``ref``: its node name or its file name."""
    for layer in layers:
        if ref == layer.node or os.path.abspath(ref) == layer.filename:
            return layer
    raise LiveError(f"{ref!r} is not in the chain {[l.filename for l in layers]}")


async def prune_nodes(m: QemuMachine, disk: str, layers: list[Layer] | None = None) -> list[str]:
    """``blockdev-del`` the disk's format nodes that are no longer in its chain.

    A node created by ``-blockdev``/``blockdev-add`` is owned by the monitor:
    when a block job drops it from the chain (the old top after an active
    commit, the streamed-over layers) it stays open -- file still locked and
    held open, and it still claims its backing node, so a later
    ``blockdev-snapshot`` on that backing fails with "node is used as backing
    hd of ...".  Nodes that were only inline children are freed by QEMU
    itself; deleting them is refused and ignored.  Returns the deleted nodes.  ``layers``: the
    disk's chain as the caller has just read it.
    """
    keep = {layer.node for layer in (layers if layers is not None else await chain(m, disk))}
    ours = re.compile(rf"^{re.escape(disk)}-[0-9a-f]{{10}}$")
    deleted = []
    for n in await m.query("query-named-block-nodes", {"flat": True}):
        name = n["node-name"]
        if ours.match(name) and name not in keep:
            try:
                await m.qmp.execute("blockdev-del", {"node-name": name})
                deleted.append(name)
            except ExecuteError:
                pass
    return deleted


async def drop_nodes(m: QemuMachine, nodes: list[str]) -> None:
    """``blockdev-del`` nodes we added for a step that was then refused (best effort)."""
    for node in nodes:
        with contextlib.suppress(ExecuteError):
            await m.qmp.execute("blockdev-del", {"node-name": node})
