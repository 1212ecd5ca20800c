"""The read side: tree, pending merges, VM list and status, audit log.

Trees and merges come from the projections (caught up first); byte counts are facts of the disk
and are measured here. A VM's run state is asked of QEMU on the VM's own host and read from the
last recorded report anywhere else (a queue consumer may run on another host).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlite3

from eventsourcing.persistence import PersistenceError

from domain import commands as c
from domain.errors import UnknownVM
from projections.read import read_merges, read_timeline, read_tree_view
from projections.tree_view import failures_json, merges_json, tree_json
from service.definition import definition_json
from service.disk_bytes import held, measure
from service.quiesce import agent_timeout
from service.results import Document, VMStatus, vm_rows

if TYPE_CHECKING:
    from service.api import Options, Service


STORE_ERRORS = (PersistenceError, sqlite3.Error)


def get_tree(q: c.GetTree, svc: Service, _: Options) -> Document:
    try:
        view = read_tree_view(svc.app, q.vm, measure)
    except STORE_ERRORS:
        # The views cannot catch up (a full or read-only disk): the same JSON from the events.
        vm = svc.app.get_vm(q.vm)
        return Document(tree_json(vm, measure), host=vm.host)
    if view is None:
        raise UnknownVM(f"no VM named {q.vm!r}")
    return Document(view.doc, host=view.host)


def list_merges(q: c.ListMerges, svc: Service, _: Options) -> Document:
    try:
        rows = read_merges(svc.app, q.vm or None, measure, held)
    except STORE_ERRORS:
        names = [q.vm] if q.vm else svc.app.vm_names()
        rows = [r for name in names for r in merges_json(svc.app.get_vm(name), measure, held)]
    lines = [
        f"{r['vm']}\t{r['node']}\t{r['name']}\tdependents={r['dependents']}\t{r['state']}"
        f"\tblocked_by={r['blocked_by']}\tbytes_held={r['bytes_held']}\tmerge_bytes={r['merge_bytes']}"
        for r in rows
    ]
    return Document(rows, lines=lines or ["no pending merges"])


def list_vms(_: c.ListVMs, svc: Service, __: Options) -> Document:
    return vm_rows([svc.app.get_vm(name) for name in svc.app.vm_names()])


def vm_status(q: c.GetVMStatus, svc: Service, _: Options) -> VMStatus:
    vm = svc.app.get_vm(q.vm)
    failures = failures_json(vm)
    if vm.host != svc.host:
        return VMStatus(vm.name, vm.run.state.value, vm.run.pid, vm.host, source="recorded", failures=failures)
    live = svc.machines.attach(vm)
    if live is None:
        return VMStatus(vm.name, "stopped", None, vm.host, failures=failures, agent="absent")
    try:
        state, pid = live.run_state(), live.pid
        agent = live.agent_state(agent_timeout()) if state == "running" else "unresponsive"
    finally:
        live.close()
    return VMStatus(vm.name, state, pid, vm.host, failures=failures, agent=agent)


def vm_show(q: c.GetVMDefinition, svc: Service, _: Options) -> Document:
    vm = svc.app.get_vm(q.vm)
    doc = definition_json(vm.name, vm.host, dict(vm.disks),
                          vm.nodes[vm.current].config)
    doc["console"] = {k: str(svc.data.vm_dir(vm.name) / v) for k, v in doc["console"].items()}
    lines = []
    for key, value in doc.items():
        if key in ("vm", "disks", "nics", "console") or value in (None, [], ""):
            continue
        lines.append(f"{key}: {' '.join(value) if isinstance(value, list) else value}")
    for disk, d in doc["disks"].items():
        extra = "".join(f",{k}={v}" for k, v in d.items() if k != "path" and v is not None)
        lines.append(f"disk {disk}: {d['path']}{extra}")
    for i, nic in enumerate(doc["nics"]):
        what = nic["mode"] + (f"={nic['target']}" if nic["target"] else "")
        fwd = "".join(f",hostfwd={f}" for f in nic["hostfwd"])
        lines.append(f"nic {i}: {what}{fwd},mac={nic['mac']}")
    lines.append(f"console: {doc['console']['socket']} (log {doc['console']['log']})")
    return Document(doc, lines=[f"VM {vm.name} on host {vm.host}", *lines])


def audit_log(q: c.GetAuditLog, svc: Service, _: Options) -> Document:
    try:
        rows = read_timeline(svc.app, q.vm)
    except STORE_ERRORS:
        rows = timeline_from_events(svc, q.vm)
    lines = []
    for r in rows:
        request = f" [{r['request_id']}]" if r["request_id"] else ""
        lines.append(f"{r['time']}  v{r['version']:<5} {r['event']:<17} {r['summary']}{request}")
    return Document(rows, lines=lines)


def timeline_from_events(svc: Service, vm_name: str) -> list[dict[str, object]]:
    """The audit rows computed from the log alone, when the view cannot be written."""
    from projections.runner import ProjectionRunner

    vm = svc.app.get_vm(vm_name)
    runner = ProjectionRunner(svc.app)
    rows: list[dict[str, object]] = []
    start = 0
    while batch := svc.app.recorder.select_notifications(start, 1000, inclusive_of_start=False):
        for n_id, _vid, name, version, at, _us, event, request_id, summary in runner.project(batch).timeline:
            if name == vm.name:
                rows.append({"position": n_id, "time": at, "vm": name, "version": version,
                             "event": event, "request_id": request_id, "summary": summary})
        start = batch[-1].id
    return rows
