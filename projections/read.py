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
from domain.names import vm_id
from projections.event_store import latest_version
from projections.runner import ProjectionRunner
from projections.tree_doc import fill_bytes, merge_bytes

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
        fill_bytes(doc, measure)
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
            row["merge_bytes"] = merge_bytes(calc["layers"], calc["dependents"], calc["root"], measure)
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
