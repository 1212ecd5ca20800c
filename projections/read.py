"""What `tree`, `merges` and `audit log` print, read from the views after catching up.

The views hold what the events say. Byte counts are facts of the disk, not of the events, so a
reader passes `measure(path)` (data a merge copies) and `held(path)` (bytes a file occupies) and
they are added here, with the same rules as `projections.tree_view`: the result equals
`tree_json(vm, measure)` / `merges_json(vm, measure, held)` of the live aggregate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from domain.application import Snaptree
from domain.errors import UnknownVM
from domain.names import validate_name
from domain.vm import vm_id
from projections.event_store import latest_version
from projections.runner import ProjectionRunner
from projections.tree_view import flatten_bytes, planned_bytes

Measure = Callable[[str], int]

RUNNER_ATTR = "_snaptree_projection_runner"


def runner_for(app: Snaptree) -> ProjectionRunner:
    """One runner per application object: its aggregate cache stays warm between reads.

    Kept on the app itself (a weak-keyed map would never let go: the runner refers to the app).
    """
    runner = getattr(app, RUNNER_ATTR, None)
    if runner is None:
        runner = ProjectionRunner(app)
        setattr(app, RUNNER_ATTR, runner)
    return runner


def catch_up(app: Snaptree) -> int:
    return runner_for(app).update()


def exists(app: Snaptree, vm_name: str) -> bool:
    """Whether the event log knows the VM (one index lookup; raises InvalidName for a bad name)."""
    validate_name(vm_name, "VM name")
    try:
        latest_version(app, vm_name)
    except UnknownVM:
        return False
    return True


def doc_children(doc: dict[str, Any]) -> dict[str | None, list[dict[str, Any]]]:
    """Node id -> its child nodes in display order (a tree document's `children_map`)."""
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for n in doc["nodes"]:  # already sorted by creation time, as `children_map` sorts
        kids.setdefault(n["parent"], []).append(n)
    return kids


@dataclass
class TreeView:
    doc: dict[str, Any]  # exactly `tree VM --json`
    host: str  # for the text rendering (not part of the stable JSON)
    version: int  # the VM's version the document shows


def read_tree(app: Snaptree, vm_name: str, measure: Measure | None = None) -> dict[str, Any] | None:
    """`tree VM --json` from the view; None when no such VM. `measure` fills `merge.bytes`."""
    found = read_tree_view(app, vm_name, measure)
    return found.doc if found is not None else None


def read_tree_view(app: Snaptree, vm_name: str, measure: Measure | None = None) -> TreeView | None:
    """`read_tree` with what a text rendering also needs."""
    if not exists(app, vm_name):
        return None  # before the catch-up: a refused command writes nothing, views included
    runner = runner_for(app)
    runner.update()
    row = runner.store.tree_row(str(vm_id(vm_name)))
    if row is None:
        return None
    doc: dict[str, Any] = json.loads(row[0])
    if measure is not None:
        _fill_merge_bytes(doc, measure)
        _fill_flatten_bytes(doc, measure)
    return TreeView(doc, row[1], row[2])


def read_merges(
    app: Snaptree,
    vm_name: str | None = None,
    measure: Measure | None = None,
    held: Measure | None = None,
) -> list[dict[str, Any]]:
    """`merges [VM] --json` from the view (all VMs by name when `vm_name` is None).

    Raises UnknownVM for a VM the log does not know.
    """
    vid: str | None = None
    if vm_name is not None:
        if not exists(app, vm_name):
            raise UnknownVM(f"no VM named {vm_name!r}")
        vid = str(vm_id(vm_name))
    runner = runner_for(app)
    runner.update()
    out = []
    for item, calc_text in runner.store.merge_rows(vid):
        row: dict[str, Any] = json.loads(item)
        calc = json.loads(calc_text)
        if held is not None:
            row["bytes_held"] = sum(held(p) for p in calc["layers"])
        if row["merge_bytes"] is None and measure is not None:
            row["merge_bytes"] = _merge_bytes(calc["layers"], calc["dependents"], calc["root"], measure)
        out.append(row)
    return out


def read_timeline(app: Snaptree, vm_name: str) -> list[dict[str, Any]]:
    """Every event of the VM, oldest first: the `audit log` rows. Raises UnknownVM."""
    if not exists(app, vm_name):
        raise UnknownVM(f"no VM named {vm_name!r}")
    runner = runner_for(app)
    runner.update()
    rows = runner.store.timeline(str(vm_id(vm_name)))
    return [
        {
            "position": r["notification_id"],
            "time": r["at"],
            "vm": r["vm"],
            "version": r["version"],
            "event": r["event"],
            "request_id": r["request_id"],
            "summary": r["summary"],
        }
        for r in rows
    ]


# --- byte counts (projections.tree_view.planned_bytes, on view data) ---


def _merge_bytes(layers: list[str], dependents: list[list[str]], root: bool, measure: Measure) -> int:
    held = sum(measure(p) for p in layers)
    return planned_bytes(held, [sum(measure(p) for p in d) for d in dependents], root=root)


def _fill_flatten_bytes(doc: dict[str, Any], measure: Measure) -> None:
    by_id = {n["id"]: n for n in doc["nodes"]}
    current = by_id[doc["current"]]
    estimate = current.get("next_flatten")
    if estimate is None:
        return  # a view written before bounded chains
    chain: list[list[str]] = []
    node: dict[str, Any] | None = current
    while node is not None:
        chain.append(list(node["disks"].values()))
        up = node.get("backing", node["parent"])
        node = by_id.get(up) if up is not None else None
    estimate["bytes"] = flatten_bytes(chain[::-1], estimate, measure)


def _fill_merge_bytes(doc: dict[str, Any], measure: Measure) -> None:
    kids: dict[str, list[dict[str, Any]]] = {}
    for n in doc["nodes"]:
        backing = n.get("backing", n["parent"])  # views written before flattening had no "backing"
        if backing is not None:
            kids.setdefault(backing, []).append(n)
    for n in doc["nodes"]:
        merge = n.get("merge")
        if merge is None or merge.get("bytes") is not None:
            continue
        deps = [list(d["disks"].values()) for d in kids.get(n["id"], [])]
        merge["bytes"] = _merge_bytes(list(n["disks"].values()), deps, n["parent"] is None, measure)
