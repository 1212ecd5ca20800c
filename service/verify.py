"""`audit verify`: the tree derived from the events, compared with what is on disk.

Read-only: every finding is reported, nothing is repaired. Checks, per docs/semantics.md "Invariants":
missing layer files, orphan files in the VM's folder, wrong qcow2 backing files, damaged qcow2
structure (header, L1 and L2 tables, read in Python by `qcow2.validate`, no process per layer;
`deep` adds `qemu-img check` of every layer, which also finds leaked clusters), memory state
files that are missing or changed, layer files shared by two nodes, the VM's own disks anywhere
but at the root, and hidden nodes with < 2 dependents once no work is pending.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from adapters import images
from adapters.images import QcowImages
from adapters.machines import QemuMachines, sha256_file
from adapters.qemu import qcow2, qemu_img
from adapters.storage import DataDir
from adapters.vm_lock import LOCK_NAME, vm_lock
from domain.application import Snaptree
from domain import recovery
from domain.memory import MemoryState
from domain.tree import MergeState, Node, NodeKind, dependents_count
from domain.vm import VirtualMachine
from domain.work import pending_work
from service.disk_checks import Claim, claims

RUN_DIR = "run"  # adapters/machines.py: a running QEMU's socket, pidfile and logs

# Finding kinds (stable: scripts match on them).
MISSING_LAYER = "missing_layer"
ORPHAN_FILE = "orphan_file"
WRONG_BACKING = "wrong_backing"
CHECK_ERROR = "check_error"  # the image cannot be opened (not qcow2, a header QEMU refuses) or checked
CORRUPT = "corrupt"  # damaged tables, qemu-img check found corruption, or the image is marked corrupt
LEAKED_CLUSTERS = "leaked_clusters"
MISSING_STATE = "missing_state"
STATE_CHANGED = "state_changed"
SHARED_LAYER = "shared_layer"
OWN_DISK_NOT_ROOT = "own_disk_not_root"
HIDDEN_NODE = "hidden_node"
LAYER_SYMLINK = "layer_symlink"  # a layer file replaced by a symbolic link
LAYER_OUTSIDE = "layer_outside"  # a layer that resolves outside the VM's folder
SHARED_WITH_VM = "shared_with_vm"  # a file this VM writes or reads that another VM writes
FAILED_WORK = "failed_work"  # host work that failed and waits for `work retry` / `work abandon`


@dataclass(frozen=True)
class Finding:
    kind: str
    node: str | None
    disk: str | None
    path: str | None
    message: str

    def line(self) -> str:
        where = " ".join(
            f"{k}={v}" for k, v in (("node", self.node), ("disk", self.disk), ("path", self.path)) if v
        )
        return f"{self.kind} {where}: {self.message}" if where else f"{self.kind}: {self.message}"


@dataclass
class Report:
    vm: str
    findings: list[Finding]
    notes: list[Finding]  # not faults: files pending removal, overlays being created, work pending

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "clean": self.clean,
            "findings": [asdict(f) for f in self.findings],
            "notes": [asdict(f) for f in self.notes],
        }


def verify(app: Snaptree, data: DataDir, vm_name: str, *, deep: bool = False) -> Report:
    """Verify one VM while holding its lock (shared), so no worker moves files under us.
    `deep` also runs `qemu-img check` on every layer (one process each: slow on big trees)."""
    with vm_lock(data, vm_name, shared=True):
        vm = app.get_vm(vm_name)
        others = claims(app, QcowImages(), skip=vm.name)
        return verify_vm(vm, data, running=QemuMachines(data).pid(vm_name) is not None,
                         others=others, deep=deep)


def verify_vm(vm: VirtualMachine, data: DataDir, *, running: bool = False,
              others: dict[str, Claim] | None = None, deep: bool = False) -> Report:
    findings: list[Finding] = []
    notes: list[Finding] = []
    work = pending_work(vm)
    if work:
        notes.append(Finding("work_pending", None, None, None,
                             f"{len(work)} work item(s) pending; files of nodes not yet created are not checked"))
    if running:
        how = ("are not run through qemu-img check" if deep
               else "were checked read-only (header and tables)")
        notes.append(Finding("running", str(vm.current), None, None, f"the VM runs: its current layers {how}"))
    findings += check_ownership(vm)
    findings += check_places(vm, data)
    findings += check_failures(vm)
    shared, base_notes = check_shared(vm, others or {})
    findings += shared
    notes += base_notes
    for node in vm.nodes.values():
        findings += check_layers(vm, node, deep=deep and not (running and node.id == vm.current))
        findings += check_memory(node)
    if not work:
        findings += check_hidden(vm)
    orphans, pending = scan_folder(vm, data)
    return Report(vm.name, findings + orphans, notes + pending)


# --- invariants on the tree itself ---


def check_ownership(vm: VirtualMachine) -> list[Finding]:
    """Every layer file belongs to exactly one node; own disks only at the root."""
    out: list[Finding] = []
    owners: dict[str, list[tuple[Node, str]]] = {}
    for node in vm.nodes.values():
        for disk, path in node.layers.items():
            owners.setdefault(os.path.realpath(path), []).append((node, disk))
    for path, users in owners.items():
        if len(users) > 1:
            names = ", ".join(f"{n.id}/{d}" for n, d in users)
            out.append(Finding(SHARED_LAYER, str(users[0][0].id), users[0][1], path,
                               f"layer file used by {len(users)} nodes: {names}"))
    own = {os.path.realpath(p) for p in vm.disks.values()}
    for node in vm.nodes.values():
        for disk, path in node.layers.items():
            if node.parent is not None and os.path.realpath(path) in own:
                out.append(Finding(OWN_DISK_NOT_ROOT, str(node.id), disk, path,
                                   "the VM's own disk is the layer of a node that is not the root"))
            if node.parent is None and path != vm.disks.get(disk):
                out.append(Finding(OWN_DISK_NOT_ROOT, str(node.id), disk, path,
                                   f"the root's layer is not the VM's own disk {vm.disks.get(disk)}"))
    return out


def check_places(vm: VirtualMachine, data: DataDir) -> list[Finding]:
    """Every layer is a plain file where it must be: snaptree's own layers in the VM's folder."""
    out: list[Finding] = []
    folder = os.path.realpath(data.vm_dir(vm.name))
    for node in vm.nodes.values():
        if not node.ready:
            continue
        for disk, path in node.layers.items():
            if os.path.islink(path):
                out.append(Finding(LAYER_SYMLINK, str(node.id), disk, path,
                                   f"the layer file is a symbolic link to {os.readlink(path)}"))
            if node.parent is not None and not os.path.realpath(path).startswith(folder + os.sep):
                out.append(Finding(LAYER_OUTSIDE, str(node.id), disk, path,
                                   f"the layer resolves to {os.path.realpath(path)}, outside {folder}"))
    return out


def check_failures(vm: VirtualMachine) -> list[Finding]:
    return [Finding(FAILED_WORK, str(f.node_id) if f.node_id else None, None,
                    f.paths[0] if f.paths else None, recovery.describe(vm, f)) for f in vm.failed.values()]


def check_shared(vm: VirtualMachine, others: dict[str, Claim]) -> tuple[list[Finding], list[Finding]]:
    """Files this VM shares with another VM: a finding when either of them writes it; a note for
    a base image below both VMs' own disks, which neither writes."""
    findings: list[Finding] = []
    notes: list[Finding] = []
    writes = {os.path.realpath(p): (n, d) for n in vm.nodes.values() for d, p in n.layers.items()}
    for path, (node, disk) in writes.items():
        claim = others.get(path)
        if claim is not None:
            role = "writes it (a layer of its tree)" if claim.writes else "reads it (in its backing chain)"
            findings.append(Finding(SHARED_WITH_VM, str(node.id), disk, path,
                                    f"this VM writes the file and VM {claim.vm!r} {role}"))
    for disk, own in vm.disks.items():
        try:
            below = [os.path.realpath(f) for f, _ in QcowImages().chain(own)[1:]]
        except qemu_img.QemuImgError:
            continue  # reported as a missing or broken layer
        for path in below:
            claim = others.get(path)
            if claim is not None and claim.writes:
                findings.append(Finding(SHARED_WITH_VM, None, disk, path,
                                        f"this VM reads the file and VM {claim.vm!r} writes it"))
            elif claim is not None:
                notes.append(Finding("shared_base", None, disk, path,
                                     f"a base image below the own disks of this VM and of VM {claim.vm!r}; neither writes it"))
    return findings, notes


def check_hidden(vm: VirtualMachine) -> list[Finding]:
    """Once no work is pending, a hidden node must have 2+ dependents (else it merged or went)."""
    counts = dependents_count(vm.nodes)
    out: list[Finding] = []
    for node in vm.nodes.values():
        deps = counts.get(node.id, 0)
        if node.kind is NodeKind.HIDDEN and deps < 2:
            why = f"; its merge failed: {node.merge_error}" if node.merge_state is MergeState.FAILED else ""
            out.append(Finding(HIDDEN_NODE, str(node.id), None, None,
                               f"hidden node {node.name!r} has {deps} dependent(s) and no pending work{why}"))
    return out


# --- files ---


def check_layers(vm: VirtualMachine, node: Node, *, deep: bool = False) -> list[Finding]:
    """The node's layer files: present, qcow2, structurally sound, backed by the parent's layer.
    `deep` adds `qemu-img check` (leaked clusters, refcounts) for a layer that looks sound."""
    if not node.ready:
        return []  # the worker has yet to create them (reported as pending work)
    out: list[Finding] = []
    for disk, path in node.layers.items():
        nid = str(node.id)
        if not os.path.isfile(path):
            out.append(Finding(MISSING_LAYER, nid, disk, path, "layer file is missing"))
            continue
        try:
            image = qcow2.validate(path)
        except qcow2.NotQcow2Error:
            out.append(Finding(CHECK_ERROR, nid, disk, path, "not a qcow2 image (no qcow2 magic)"))
            continue  # its backing file means nothing
        except qcow2.Qcow2Error as exc:  # a header QEMU would refuse to open
            out.append(Finding(CHECK_ERROR, nid, disk, path, str(exc)))
            continue
        if image.corrupt:
            out.append(Finding(CORRUPT, nid, disk, path, "the image is marked corrupt"))
        if image.damaged:
            out.append(Finding(CORRUPT, nid, disk, path, _damage(image)))
        elif deep:  # a damaged layer is reported once; qemu-img check would only repeat it
            problem = check_image(path)
            if problem is not None:
                out.append(Finding(problem[0], nid, disk, path, problem[1]))
        backing = image.backing
        if node.parent is not None:
            want = vm.nodes[node.parent].layers[disk]
            if backing is None or not qcow2.same_file(backing, want):
                out.append(Finding(WRONG_BACKING, nid, disk, path,
                                   f"backing file is {backing}, the parent's layer is {want}"))
        elif backing is not None and os.path.realpath(backing) in _layers(vm):
            # An own disk may sit on a base image of the user's, but never on a layer of the tree.
            out.append(Finding(WRONG_BACKING, nid, disk, path,
                               f"the root's layer is backed by {backing}, a layer of this tree"))
    return out


def _damage(image: qcow2.Validation) -> str:
    shown = image.problems[:3]
    more = image.problem_count - len(shown)
    return "; ".join(shown) + (f"; and {more} more problem(s)" if more else "")


def check_image(path: str) -> tuple[str, str] | None:
    """`qemu-img check` of this one layer on its own: (finding kind, message), None when clean."""
    problem = images.check_layer(path)
    if problem is None:
        return None
    kind = {images.CORRUPT: CORRUPT, images.LEAKS: LEAKED_CLUSTERS}.get(problem[0], CHECK_ERROR)
    return kind, problem[1]


def check_memory(node: Node) -> list[Finding]:
    """A saved memory state must exist and still have the digest (or size) recorded for it."""
    mem = node.memory
    if mem is None or mem.path is None or mem.state is not MemoryState.SAVED:
        return []
    path, nid = mem.path, str(node.id)
    if not os.path.isfile(path):
        return [Finding(MISSING_STATE, nid, None, path, "memory state file is missing")]
    want_sha = mem.sha256
    if want_sha:
        got = sha256_file(path)
        if got != want_sha:
            return [Finding(STATE_CHANGED, nid, None, path, f"sha256 is {got}, recorded {want_sha}")]
        return []
    want_size = mem.bytes
    if isinstance(want_size, int):
        size = os.path.getsize(path)
        if size != want_size:
            return [Finding(STATE_CHANGED, nid, None, path, f"size is {size} bytes, recorded {want_size}")]
    return []


def scan_folder(vm: VirtualMachine, data: DataDir) -> tuple[list[Finding], list[Finding]]:
    """Files in the VM's folder that no node uses: orphans, or notes for expected leftovers.

    `.lock` is the worker's lock and `run/` holds a running QEMU's socket, pidfile and logs. A file the events made garbage is pending removal. A
    `LAYER.tmp-PID` file is an overlay being created only while that layer's node is not ready;
    otherwise it is the leftover of a crashed creation, and an orphan.
    """
    folder = data.vm_dir(vm.name)
    if not folder.is_dir():
        return [], []
    known = {os.path.realpath(p) for n in vm.nodes.values() for p in n.layers.values()}
    known |= {os.path.realpath(n.memory.path) for n in vm.nodes.values()
              if n.memory is not None and n.memory.path}
    known |= {os.path.realpath(n.nvram) for n in vm.nodes.values() if n.nvram}
    known.add(os.path.realpath(data.nvram_path(vm.name, None)))  # a UEFI VM's live variable store
    garbage = {os.path.realpath(p) for p in vm.garbage}
    creating = {os.path.realpath(p) for n in vm.nodes.values() if not n.ready for p in n.layers.values()}
    orphans: list[Finding] = []
    notes: list[Finding] = []
    for path in _files(folder, skip=folder / RUN_DIR):
        real = os.path.realpath(path)
        if real in known or path == str(folder / LOCK_NAME):
            continue
        if real in garbage:
            notes.append(Finding("pending_removal", None, None, path, "no node uses it; the worker will delete it"))
        elif real.rpartition(".tmp-")[0] in creating:
            notes.append(Finding("being_created", None, None, path, "overlay being created"))
        else:
            orphans.append(Finding(ORPHAN_FILE, None, None, path, "no node of the VM uses this file"))
    return orphans, notes


def _files(folder: Path, skip: Path) -> Iterable[str]:
    for dirpath, dirs, names in os.walk(folder):
        if Path(dirpath) == folder and skip.name in dirs:
            dirs.remove(skip.name)
        for name in sorted(names):
            yield os.path.join(dirpath, name)


def _layers(vm: VirtualMachine) -> set[str]:
    return {os.path.realpath(p) for n in vm.nodes.values() for p in n.layers.values()}
