"""`vm export`: one bundle (adapters/bundle.py) with a VM's whole tree, streamed file by file."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adapters import bundle
from adapters.bundle import Progress
from adapters.qemu import qcow2, qemu_img
from service.api import Service
from adapters.vm_lock import vm_lock
from domain.errors import Refused
from domain.tree import Node, root
from domain.vm import VirtualMachine
from domain.work import pending_work


def export_vm(svc: Service, name: str, out: str, progress: Progress = bundle.quiet) -> dict[str, Any]:
    target = Path(out).absolute()
    if target.exists():
        raise Refused(f"{target} already exists; give a new file name")
    if not target.parent.is_dir():
        raise Refused(f"{target.parent} is not a directory")
    # The worker's lock: no merge may rewrite a layer while it is being copied.
    with vm_lock(svc.data, name):
        vm = svc.app.get_vm(name)
        if svc.machines.pid(name) is not None:
            raise Refused(f"VM {name!r} is running; stop it (`snaptree vm stop {name}`) and export again")
        work = pending_work(vm)
        if work:
            raise Refused(
                f"VM {name!r} has {len(work)} pending disk work item(s); wait for the worker"
                " (`snaptree worker run --until-idle`) and export again"
            )
        members = plan_members(vm)
        history = bundle.encode_history(svc.app, vm)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # guest data: 0600
        os.chmod(tmp, 0o600)
        try:
            files = write_bundle(tmp, vm, members, history, progress)
            qemu_img.fsync_path(tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return {
        "vm": vm.name,
        "file": str(target),
        "bytes": target.stat().st_size,
        "members": len(files) + 1,
        "nodes": len(vm.nodes),
        "version": vm.version,
        "history_sha256": files[bundle.HISTORY]["sha256"],
    }


def plan_members(vm: VirtualMachine) -> list[tuple[str, str]]:
    """(member name, file on disk) for every layer and memory state, root first."""
    out: list[tuple[str, str]] = []
    top = root(vm.nodes)
    for disk, path in top.layers.items():
        if qcow2.backing_file(path):
            # Its backing file is not part of the tree: the bundle could not carry it.
            raise Refused(f"VM {vm.name!r}: own disk {disk} ({path}) has a backing file; cannot export it")
    for node in sorted(vm.nodes.values(), key=lambda n: (n.parent is not None, n.created_at)):
        for disk, path in node.layers.items():
            out.append((bundle.member_of_layer(vm, node, disk), path))
        if bundle.has_state(node):
            assert node.memory is not None and node.memory.path is not None
            out.append((bundle.state_member(node.id), node.memory.path))
    return out


def write_bundle(
    tmp: Path, vm: VirtualMachine, members: list[tuple[str, str]], history: bytes, progress: Progress
) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    with tarfile.TarFile(tmp, "w", format=tarfile.PAX_FORMAT, copybufsize=bundle.CHUNK) as tar:
        for member, path in members:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                info = _tarinfo(member, st.st_size, int(st.st_mtime))
                reader = bundle.HashingReader(f, member, st.st_size, progress)
                tar.addfile(info, reader)  # type: ignore[arg-type]  # only .read() is used
            files[member] = {"sha256": reader.sha.hexdigest(), "size": st.st_size}
        _check_states(vm, files)
        now = datetime.now(timezone.utc)
        files[bundle.HISTORY] = {"sha256": bundle.history_digest(history), "size": len(history)}
        tar.addfile(_tarinfo(bundle.HISTORY, len(history), int(now.timestamp())), io.BytesIO(history))
        raw = json.dumps(manifest(vm, files, now), indent=2, default=str).encode()
        tar.addfile(_tarinfo(bundle.MANIFEST, len(raw), int(now.timestamp())), io.BytesIO(raw))
    return files


def _check_states(vm: VirtualMachine, files: dict[str, dict[str, Any]]) -> None:
    """A memory state whose digest changed since it was saved must not travel as if it were good."""
    for node in vm.nodes.values():
        want = node.memory.sha256 if node.memory is not None else None
        member = bundle.state_member(node.id)
        if want and member in files and files[member]["sha256"] != want:
            raise Refused(f"memory state of node {node.id} changed since it was saved; run `snaptree audit verify`")


def memory_record(n: Node) -> dict[str, Any] | None:
    """A node's memory for the manifest, its path as the bundle member (if it travels)."""
    if n.memory is None:
        return None
    record = dataclasses.asdict(n.memory)
    record["state"] = n.memory.state.value
    record["method"] = n.memory.method.value if n.memory.method else None
    record["path"] = bundle.state_member(n.id) if bundle.has_state(n) else None
    return record


def manifest(vm: VirtualMachine, files: dict[str, dict[str, Any]], now: datetime) -> dict[str, Any]:
    def node_json(n: Node) -> dict[str, Any]:
        mem = memory_record(n)
        return {
            "id": str(n.id),
            "kind": n.kind.value,
            "name": n.name,
            "parent": str(n.parent) if n.parent else None,
            "created_at": n.created_at.isoformat(),
            "layers": {d: bundle.member_of_layer(vm, n, d) for d in n.layers},
            "config": n.config,
            "memory": mem,
            "merge_state": n.merge_state.value if n.merge_state else None,
        }

    return {
        "format": bundle.FORMAT,
        "format_version": bundle.FORMAT_VERSION,
        "exported_at": now.isoformat(),
        "vm": {
            "id": str(vm.id),
            "name": vm.name,
            "host": vm.host,
            "version": vm.version,
            "disks": {d: bundle.own_member(i) for i, d in enumerate(vm.disks)},
            "config": vm.config,
            "imported_from": vm.imported_from,
        },
        "history": {"path": bundle.HISTORY, "events": vm.version, "sha256": files[bundle.HISTORY]["sha256"]},
        "current": str(vm.current),
        "nodes": [node_json(n) for n in sorted(vm.nodes.values(), key=lambda n: (n.created_at, str(n.id)))],
        "files": files,
    }


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o600
    return info
