"""`vm import`: a bundle into this data directory, as a new VM with the same tree and node ids.

Nothing final is written before every digest has been checked: members are extracted (by names
snaptree chose, never by the tar's paths) into a staging folder inside the data directory, the
history is replayed, backing paths are rewritten to their new homes, the folder is renamed into
`vms/NEW`, and only then is the import recorded (`Registered` + `Imported` in ONE save, so a
failure never leaves half a VM in the event store). Any failure removes what was written.
"""

from __future__ import annotations

import copy
import os
import shutil
import tarfile
import uuid
from pathlib import Path
from typing import Any

from eventsourcing.persistence import IntegrityError

from adapters import bundle
from adapters.bundle import BadBundle, Progress
from adapters.qemu import qcow2, qemu_img
from service.api import Service
from domain.errors import Refused, VMExists
from domain.names import validate_name
from domain.tree import Node
from domain.vm import VirtualMachine
from domain.work import pending_work

MAX_MANIFEST = 64 << 20


def import_vm(
    svc: Service, path: str, name: str | None = None, progress: Progress = bundle.quiet
) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise Refused(f"{path}: no such bundle file")
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, EOFError) as exc:
        raise BadBundle(f"{path} is not an uncompressed tar bundle: {exc}") from None
    with tar:
        members = check_members(tar)
        manifest = read_manifest(tar, members)
        files = check_files(manifest, members)
        new_name = validate_name(name or str(manifest["vm"].get("name", "")), "VM name")
        final = svc.data.vm_dir(new_name)
        if new_name in svc.app.vm_names():
            raise VMExists(f"a VM named {new_name!r} already exists; import with --name NEW")
        if os.path.lexists(final):
            raise Refused(f"{final} already exists; import with another --name")
        need = sum(f["size"] for f in files.values())
        free = shutil.disk_usage(svc.data.root).free
        if need > free:
            raise Refused(f"the bundle needs {need} bytes, {free} are free in {svc.data.root}")
        staging = svc.data.root / f".import-{uuid.uuid4().hex}"
        moved = False
        made_parent = not final.parent.exists()
        try:
            staging.mkdir(mode=0o700)
            os.chmod(staging, 0o700)
            for member in sorted(files):
                extract_verified(tar, members[member], staging / member, files[member], progress)
            history = (staging / bundle.HISTORY).read_bytes()
            source_vm = bundle.replay_history(history)
            check_tree(source_vm, manifest)
            nodes, own = relocate(svc, source_vm, new_name, staging)
            build_folder(source_vm, nodes, staging, final)
            svc.data.private_dir(final.parent)
            os.rename(staging / "vm", final)
            moved = True
            source = {
                "vm_id": str(source_vm.id),
                "name": source_vm.name,
                "version": source_vm.version,
                "history_sha256": files[bundle.HISTORY]["sha256"],
                "exported_at": manifest.get("exported_at"),
                "host": source_vm.host,
            }
            agg = VirtualMachine.register(name=new_name, host=svc.host, disks=own, config=source_vm.config)
            agg.record_import(nodes, source_vm.current, source)
            try:
                svc.app.save(agg)
            except IntegrityError:
                raise VMExists(f"a VM named {new_name!r} already exists") from None
        except BaseException:
            if moved:
                shutil.rmtree(final, ignore_errors=True)
            if made_parent and final.parent.is_dir() and not any(final.parent.iterdir()):
                final.parent.rmdir()
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {"vm": new_name, "id": str(agg.id), "current": str(agg.current), "nodes": len(nodes),
            "source": source}


# --- what the tar may contain ---


def check_members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Every member must be a regular file with one of the bundle's own names (no `..`, no
    absolute path, no link or device), each once; checked before anything is written."""
    out: dict[str, tarfile.TarInfo] = {}
    try:
        infos = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BadBundle(f"the bundle is damaged: {exc}") from None
    for info in infos:
        if not bundle.safe_member_name(info.name):
            raise BadBundle(f"refusing bundle member {info.name!r}: not a name a snaptree bundle uses")
        if not info.isreg():
            raise BadBundle(f"refusing bundle member {info.name!r}: not a regular file")
        if info.name in out:
            raise BadBundle(f"bundle member {info.name!r} appears twice")
        out[info.name] = info
    if bundle.MANIFEST not in out:
        raise BadBundle("not a snaptree bundle: no manifest.json")
    return out


def read_manifest(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> dict[str, Any]:
    info = members[bundle.MANIFEST]
    if info.size > MAX_MANIFEST:
        raise BadBundle("manifest.json is implausibly large")
    f = tar.extractfile(info)
    assert f is not None
    return bundle.loads_manifest(f.read())


def check_files(manifest: dict[str, Any], members: dict[str, tarfile.TarInfo]) -> dict[str, dict[str, Any]]:
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BadBundle("manifest.json has no file list")
    listed, present = set(files), set(members) - {bundle.MANIFEST}
    if listed != present:
        raise BadBundle(f"bundle members differ from the manifest: missing {sorted(listed - present)},"
                        f" unlisted {sorted(present - listed)}")
    for name, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BadBundle(f"manifest entry for {name} has no sha256")
        if entry.get("size") != members[name].size:
            raise BadBundle(f"{name}: {members[name].size} bytes in the bundle, {entry.get('size')} in the manifest")
    if bundle.HISTORY not in files:
        raise BadBundle("the bundle has no event history")
    return files


def extract_verified(
    tar: tarfile.TarFile, info: tarfile.TarInfo, dest: Path, entry: dict[str, Any], progress: Progress
) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = tar.extractfile(info)
    assert src is not None
    with open(dest, "xb") as out:
        digest = bundle.copy_hashing(src, out, info.size, info.name, progress)
    if digest != entry["sha256"]:
        raise BadBundle(f"{info.name}: sha256 {digest} does not match the manifest's {entry['sha256']}")


# --- the tree ---


def check_tree(vm: VirtualMachine, manifest: dict[str, Any]) -> None:
    """The manifest's tree must be the one the history replays to, member names included."""
    head = manifest["vm"]
    if head.get("id") != str(vm.id) or head.get("version") != vm.version:
        raise BadBundle("the manifest's VM id or version does not match its event history")
    if pending_work(vm):
        raise BadBundle("the exported VM had pending work; export it again once the worker is idle")
    listed = {n.get("id"): n for n in manifest["nodes"]}
    if set(listed) != {str(i) for i in vm.nodes} or manifest.get("current") != str(vm.current):
        raise BadBundle("the manifest's tree does not match its event history")
    files = manifest["files"]
    for node in vm.nodes.values():
        if set(node.layers) != set(vm.disks):
            raise BadBundle(f"node {node.id}: its disks differ from the VM's")
        entry = listed[str(node.id)]
        want_parent = str(node.parent) if node.parent else None
        layers = {d: bundle.member_of_layer(vm, node, d) for d in node.layers}
        if entry.get("parent") != want_parent or entry.get("layers") != layers:
            raise BadBundle(f"node {node.id}: the manifest does not match the event history")
        needed = list(layers.values())
        if bundle.has_state(node):
            needed.append(bundle.state_member(node.id))
        missing = [m for m in needed if m not in files]
        if missing:
            raise BadBundle(f"node {node.id}: files {missing} are not in the bundle")


def final_layer(svc: Service, vm: VirtualMachine, node: Node, disk: str, new_name: str) -> str:
    if node.parent is None:
        return str(svc.data.vm_dir(new_name) / "disks" / f"{disk}.qcow2")
    return svc.data.layer_path(new_name, node.id, disk)


def relocate(
    svc: Service, vm: VirtualMachine, new_name: str, staging: Path
) -> tuple[list[Node], dict[str, str]]:
    """New nodes with absolute paths in this data directory; each layer rebased (-u) onto its
    parent's new path. Nodes keep their ids, names, times and configuration copies."""
    nodes: list[Node] = []
    own: dict[str, str] = {}
    for node in vm.nodes.values():
        new = copy.deepcopy(node)
        new.layers = {d: final_layer(svc, vm, node, d, new_name) for d in node.layers}
        for disk in node.layers:
            staged = str(staging / bundle.member_of_layer(vm, node, disk))
            if not qemu_img.is_qcow2(staged):
                raise BadBundle(f"node {node.id} disk {disk}: the layer is not a qcow2 image")
            if node.parent is None:
                if qcow2.backing_file(staged):
                    raise BadBundle(f"own disk {disk} has a backing file outside the bundle")
                own[disk] = new.layers[disk]
            else:
                parent = vm.nodes[node.parent]
                qemu_img.rebase_unsafe(staged, final_layer(svc, vm, parent, disk, new_name))
        if new.memory is not None and new.memory.path is not None:
            # A failed save's file stayed behind on the source host: it is not in the bundle.
            moved = svc.data.state_path(new_name, node.id) if bundle.has_state(node) else None
            new.memory = new.memory.but(path=moved)
        nodes.append(new)
    return nodes, own


def build_folder(vm: VirtualMachine, nodes: list[Node], staging: Path, final: Path) -> None:
    """Move the staged members to their final names under staging/vm (renamed into vms/NEW next)."""
    by_id = {n.id: n for n in nodes}
    base = staging / "vm"
    for node in vm.nodes.values():
        moves = [(bundle.member_of_layer(vm, node, d), by_id[node.id].layers[d]) for d in node.layers]
        if bundle.has_state(node):
            moved = by_id[node.id].memory
            assert moved is not None and moved.path is not None
            moves.append((bundle.state_member(node.id), moved.path))
        for member, final_path in moves:
            target = base / Path(final_path).relative_to(final)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging / member, target)
