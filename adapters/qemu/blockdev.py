"""How a VM's disks appear in QEMU: stable node names and the ``-blockdev``/``-device`` options.

* every disk is one ``virtio-blk-pci`` (or ``ide-hd``) device whose qdev id is the disk name;
* every layer of every disk's chain is opened **explicitly** in one nested JSON ``-blockdev``
  (format node ``node_name(disk, path)``, protocol node ``file_node_name(disk, path)``) down to
  ``"backing": null`` at the bottom.  Left to itself QEMU would open the backing chain from the
  qcow2 headers with invented names (``#block123``) that change on every start; naming each
  layer after a hash of its absolute path means the same file always has the same node name, in
  this QEMU, after a restart, and after overlays are added or layers merged away.  The chain is
  read with ``qcow2.backing_chain_async`` before the start, and every layer is opened at its
  ``full-backing-filename``, so QEMU still sees the backing it would have chosen itself
  (filenames stay plain, no ``json:`` pseudo-filenames).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from adapters.qemu.errors import MachineError
from adapters.qemu.qcow2 import ChainImage


def node_name(disk: str, path: str | os.PathLike[str]) -> str:
    """The format node name of the layer file ``path`` of disk ``disk``.

    ``disk`` + 10 hex digits of sha1(absolute path): at most 29 characters
    (QEMU allows 31), the protocol node adds ``-f``.
    """
    digest = hashlib.sha1(os.path.abspath(os.fspath(path)).encode()).hexdigest()[:10]
    return f"{disk}-{digest}"


def file_node_name(disk: str, path: str | os.PathLike[str]) -> str:
    return node_name(disk, path) + "-f"


def cache_options(cache: str | None) -> tuple[dict[str, bool], bool]:
    """QEMU's `cache=` modes as blockdev cache flags, and whether the device's write cache is on."""
    return {
        None: ({}, True), "writeback": ({}, True),
        "none": ({"direct": True, "no-flush": False}, True),
        "writethrough": ({}, False),
        "directsync": ({"direct": True, "no-flush": False}, False),
        "unsafe": ({"direct": False, "no-flush": True}, True),
    }[cache]


def layer_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """What every layer node of a disk is opened with (its cache and discard settings): the
    layers a live take adds get the same (adapters/qemu/take_prepare.py)."""
    options = options or {}
    flags, _ = cache_options(options.get("cache"))
    out: dict[str, Any] = {"cache": flags} if flags else {}
    if options.get("discard") == "unmap":
        out["discard"] = "unmap"
    return out


def blockdev_tree(disk: str, chain: list[ChainImage], top_path: str,
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Nested ``-blockdev`` JSON that opens every layer of ``chain`` with our names."""
    paths = [os.path.abspath(top_path)]
    for layer in chain[:-1]:
        if not layer.backing:
            break
        paths.append(layer.backing)
    extra = layer_options(options)
    node: dict[str, Any] | None = None
    for layer, path in reversed(list(zip(chain, paths))):
        opts: dict[str, Any] = {
            "driver": layer.format,
            "node-name": node_name(disk, path),
            "file": {"driver": "file", "filename": path,
                     "node-name": file_node_name(disk, path), **extra},
            **extra,
        }
        if layer.format == "qcow2":
            opts["backing"] = node          # None at the bottom -> "backing": null
        elif node is not None:
            raise MachineError(f"{path}: format {layer.format} cannot have a backing file")
        node = opts
    assert node is not None
    return node


BUSES = ("virtio", "scsi", "nvme", "ide")


def disk_args(disks: dict[str, str], chains: dict[str, list[ChainImage]], bus: str,
              options: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The ``-blockdev`` and ``-device`` options of every disk, in the disks' order; `bus` is
    the default, `options` per disk may name another bus, a cache mode and discard."""
    options = options or {}
    args: list[str] = []
    if any((options.get(d) or {}).get("bus", bus) == "scsi" for d in disks):
        args += ["-device", "virtio-scsi-pci,id=scsi0,addr=0x0f"]
    for index, (disk, path) in enumerate(disks.items()):
        opts = options.get(disk) or {}
        tree = blockdev_tree(disk, chains[disk], path, opts)
        args += ["-blockdev", json.dumps(tree, separators=(",", ":"))]
        _, write_cache = cache_options(opts.get("cache"))
        wc = "" if write_cache else ",write-cache=off"
        # Fixed addresses: the device layout is part of the migration stream.
        kind = opts.get("bus", bus)
        if kind == "virtio":
            args += ["-device", f"virtio-blk-pci,id={disk},drive={tree['node-name']},addr={0x10 + index:#x}{wc}"]
        elif kind == "scsi":
            args += ["-device", f"scsi-hd,id={disk},drive={tree['node-name']},bus=scsi0.0,channel=0,"
                                f"scsi-id={index},lun=0{wc}"]
        elif kind == "nvme":
            args += ["-device", f"nvme,id={disk},drive={tree['node-name']},serial={disk},"
                                f"addr={0x10 + index:#x}"]
        elif kind == "ide":
            args += ["-device", f"ide-hd,id={disk},drive={tree['node-name']},"
                                f"bus=ide.{index // 2},unit={index % 2}{wc}"]
        else:
            raise MachineError(f"disk {disk}: bus {kind!r} is not one of {', '.join(BUSES)}")
    return args
