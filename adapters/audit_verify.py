"""`audit verify`: the tree derived from the events, compared with what is on disk.

Read-only: every finding is reported, nothing is repaired. Checks, per DESIGN §1 invariants:
missing layer files, orphan files in the VM's folder, wrong qcow2 backing files, `qemu-img check`
errors, memory state files that are missing or changed, layer files shared by two nodes, the VM's
own disks anywhere but at the root, and hidden nodes with < 2 dependents once no work is pending.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from adapters.qemu import qemu_img
from adapters.runtime import Runtime
from adapters.storage import DataDir
from adapters.vm_lock import LOCK_NAME, vm_lock
from domain.application import Snaptree
from domain.tree import MergeState, Node, NodeKind, dependents_count
from domain.vm import VirtualMachine
from domain.work import pending_work

CHUNK = 1 << 20
RUN_DIR = "run"  # adapters/runtime.py: a running QEMU's socket, pidfile and logs

# Finding kinds (stable: scripts match on them).
MISSING_LAYER = "missing_layer"
ORPHAN_FILE = "orphan_file"
WRONG_BACKING = "wrong_backing"
CHECK_ERROR = "check_error"  # qemu-img could not open or check the image at all
CORRUPT = "corrupt"  # qemu-img check found corruption, or the image is marked corrupt
LEAKED_CLUSTERS = "leaked_clusters"
MISSING_STATE = "missing_state"
STATE_CHANGED = "state_changed"
SHARED_LAYER = "shared_layer"
OWN_DISK_NOT_ROOT = "own_disk_not_root"
HIDDEN_NODE = "hidden_node"


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


def verify(app: Snaptree, data: DataDir, vm_name: str) -> Report:
    """Verify one VM while holding its lock (shared), so no worker moves files under us."""
    with vm_lock(data, vm_name, shared=True):
        vm = app.get_vm(vm_name)
        return verify_vm(vm, data, running=Runtime(data).is_running(vm_name))


def verify_vm(vm: VirtualMachine, data: DataDir, *, running: bool = False) -> Report:
    findings: list[Finding] = []
    notes: list[Finding] = []
    work = pending_work(vm)
    if work:
        notes.append(Finding("work_pending", None, None, None,
                             f"{len(work)} work item(s) pending; files of nodes not yet created are not checked"))
    if running:
        notes.append(Finding("running", str(vm.current), None, None,
                             "the VM runs: its current layers are not run through qemu-img check"))
    findings += check_ownership(vm)
    for node in vm.nodes.values():
        findings += check_layers(vm, node, check=not (running and node.id == vm.current))
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


def check_layers(vm: VirtualMachine, node: Node, *, check: bool = True) -> list[Finding]:
    if not node.ready:
        return []  # the worker has yet to create them (reported as pending work)
    out: list[Finding] = []
    for disk, path in node.layers.items():
        nid = str(node.id)
        if not os.path.isfile(path):
            out.append(Finding(MISSING_LAYER, nid, disk, path, "layer file is missing"))
            continue
        try:
            meta = qemu_img.info(path)
        except qemu_img.QemuImgError as exc:
            out.append(Finding(CHECK_ERROR, nid, disk, path, str(exc)))
            continue
        assert isinstance(meta, dict)
        if meta.get("format") != "qcow2":
            out.append(Finding(CHECK_ERROR, nid, disk, path, f"not a qcow2 image (qemu-img sees {meta.get('format')})"))
            continue  # its backing file means nothing
        if meta.get("format-specific", {}).get("data", {}).get("corrupt"):
            out.append(Finding(CORRUPT, nid, disk, path, "the image is marked corrupt"))
        problem = check_image(path) if check else None
        if problem is not None:
            out.append(Finding(problem[0], nid, disk, path, problem[1]))
        backing = meta.get("full-backing-filename") or meta.get("backing-filename") or None
        if node.parent is not None:
            want = vm.nodes[node.parent].layers[disk]
            if backing is None or not _same_file(backing, want):
                out.append(Finding(WRONG_BACKING, nid, disk, path,
                                   f"backing file is {backing}, the parent's layer is {want}"))
        elif backing is not None and os.path.realpath(backing) in _layers(vm):
            # An own disk may sit on a base image of the user's, but never on a layer of the tree.
            out.append(Finding(WRONG_BACKING, nid, disk, path,
                               f"the root's layer is backed by {backing}, a layer of this tree"))
    return out


def check_image(path: str) -> tuple[str, str] | None:
    """`qemu-img check` of this one layer: (kind, message) for a problem, None when clean.

    The image is opened with `"backing": null`: every layer is checked on its own, so a missing
    or broken parent is reported once, at the parent, and never as an error of all its children.
    """
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": os.path.abspath(path)}})
    cmd = [qemu_img.QEMU_IMG, "check", "--output=json", "-U", f"json:{spec}"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode not in (0, 2, 3):
        return CHECK_ERROR, str(qemu_img.QemuImgError(cmd, res.returncode, res.stderr, what="qemu-img check"))
    try:
        report = json.loads(res.stdout)
    except ValueError:
        return CHECK_ERROR, f"qemu-img check printed no report (exit {res.returncode})"
    if report.get("corruptions", 0) or res.returncode == 2:
        return CORRUPT, f"qemu-img check: {report.get('corruptions', 0)} corruption(s)"
    if report.get("leaks", 0) or res.returncode == 3:
        return LEAKED_CLUSTERS, f"qemu-img check: {report.get('leaks', 0)} leaked cluster(s)"
    return None


def check_memory(node: Node) -> list[Finding]:
    """A saved memory state must exist and still have the digest (or size) recorded for it."""
    mem = node.memory
    if not mem or not mem.get("path") or mem.get("state", "saved") != "saved":
        return []
    path, nid = str(mem["path"]), str(node.id)
    if not os.path.isfile(path):
        return [Finding(MISSING_STATE, nid, None, path, "memory state file is missing")]
    want_sha = mem.get("sha256")
    if want_sha:
        got = sha256_file(path)
        if got != want_sha:
            return [Finding(STATE_CHANGED, nid, None, path, f"sha256 is {got}, recorded {want_sha}")]
        return []
    want_size = mem.get("bytes", mem.get("size"))
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
    known |= {os.path.realpath(str(n.memory["path"])) for n in vm.nodes.values()
              if n.memory and n.memory.get("path")}
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


def _same_file(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b) or os.path.realpath(a) == os.path.realpath(b)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
