"""Checks on the disks a user hands to `vm create`, before anything is recorded.

A VM writes into its own disks (a merge that reaches the root commits into them) and reads
through their backing chains. Two VMs may share a base image that neither writes, but never a
file one of them writes: adopting a disk is refused when the new VM would write a file another
VM reads, or read a file another VM writes, and when any file of its chain lies inside the data
directory (those belong to snaptree's own trees). docs/semantics.md, "The VM's own disks".
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from adapters.qemu.errors import QemuImgError
from adapters.storage import DataDir
from domain import names
from domain.definition import parse_disk
from domain.application import Snaptree
from domain.errors import InvalidDisk, Refused
from domain.vm import VirtualMachine
from service.ports import Disks


def parse_disks(specs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`[NAME=]PATH[,options]` per disk (domain.definition.parse_disk); unnamed disks are disk0,
    disk1, ... in order."""
    disks: dict[str, str] = {}
    for i, spec in enumerate(specs):
        name, path, _ = parse_disk(spec, i)
        name = names.disk_name(name)
        if name in disks:
            raise Refused(f"disk name {name!r} given twice")
        if not path:
            raise InvalidDisk(f"disk {name}: no path given")
        # The real path: a symlink or a second spelling must not make one file two disks.
        disks[name] = os.path.realpath(path)
    return disks


@dataclass(frozen=True)
class Claim:
    vm: str
    writes: bool  # a layer of that VM's tree (its own disks included), not just a base below


def claims(app: Snaptree, images: Disks, skip: str | None = None) -> dict[str, Claim]:
    """Every file another VM writes or reads (real paths)."""
    out: dict[str, Claim] = {}
    for other in app.vm_names():
        if other == skip:
            continue
        vm = app.get_vm(other)
        for path in _reads_below_own_disks(vm, images):
            out.setdefault(path, Claim(other, writes=False))
        for node in vm.nodes.values():
            for path in node.layers.values():
                out[os.path.realpath(path)] = Claim(other, writes=True)
    return out


def _reads_below_own_disks(vm: VirtualMachine, images: Disks) -> list[str]:
    found: list[str] = []
    for path in vm.disks.values():
        try:
            chain = images.chain(path)
        except QemuImgError:
            continue  # a missing own disk is audit verify's finding, not this VM's problem
        found += [os.path.realpath(filename) for filename, _ in chain[1:]]
    return found


def check_disks(app: Snaptree, data: DataDir, images: Disks, vm: str, disks: dict[str, str], *,
                copy: bool) -> None:
    """Refuse (InvalidDisk, nothing recorded) any disk the new VM must not adopt."""
    taken = claims(app, images, skip=vm)
    for disk, path in disks.items():
        if not images.exists(path) or os.path.isdir(path):
            raise InvalidDisk(f"disk {disk}: {path} does not exist or is not a file")
        try:
            chain = images.chain(path)
        except QemuImgError as exc:
            raise InvalidDisk(f"disk {disk}: {path} cannot be opened: {exc}") from None
        if chain[0][1] != "qcow2":
            raise InvalidDisk(f"disk {disk}: {path} is not a qcow2 image ({chain[0][1]})")
        if copy and len(chain) > 1:
            raise InvalidDisk(f"disk {disk}: {path} has a backing file; --copy takes standalone images")
        for depth, (filename, _) in enumerate(chain):
            real = os.path.realpath(filename)
            what = f"disk {disk}: {path}" if depth == 0 else f"disk {disk}: its backing file {real}"
            if data.owns(real) and not (copy and depth == 0):
                hint = "; pass --copy" if depth == 0 else ""
                raise InvalidDisk(f"{what} lies inside the data directory {data.root}{hint}")
            claim = taken.get(real)
            if claim is None or copy:
                continue
            if depth == 0:  # the new VM would write it
                role = "a layer" if claim.writes else "in the backing chain"
                raise InvalidDisk(f"{what} already is {role} of VM {claim.vm!r}")
            if claim.writes:  # the new VM would read what another VM writes
                raise InvalidDisk(f"{what} is a layer of VM {claim.vm!r}, which writes into it")


def copy_disks(data: DataDir, vm: str, disks: dict[str, str]) -> tuple[dict[str, str], list[Path]]:
    """`--copy`: the disks copied into the VM's folder (fsynced, renamed into place)."""
    folder = data.private_dir(data.vm_dir(vm) / "disks")
    copied: dict[str, str] = {}
    made: list[Path] = []
    try:
        for disk, path in disks.items():
            target = folder / f"{disk}.qcow2"
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(path, tmp)
            data.make_private(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
            made.append(target)
            copied[disk] = str(target)
    except BaseException:
        for m in made:
            m.unlink(missing_ok=True)
        raise
    return copied, made
