"""A tree document (`tree VM --json`) as the views store it: its children and its byte counts.

Plain functions of the document, importing no aggregate and no event store, so that a reader of
the views (projections/read.py, service/quick_tree.py) pays only for what it reads. Byte counts are
facts of the disk: the caller passes `measure(path)`, and the rules are those of
projections/tree_view.py, so a filled document equals `tree_json(vm, measure)`.
"""

from __future__ import annotations

from typing import Any, Callable

Measure = Callable[[str], int]


def doc_children(doc: dict[str, Any]) -> dict[str | None, list[dict[str, Any]]]:
    """Node id -> its child nodes in display order (a tree document's `children_map`)."""
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for n in doc["nodes"]:  # already sorted by creation time, as `children_map` sorts
        kids.setdefault(n["parent"], []).append(n)
    return kids


def flatten_bytes(chain: list[list[str]], estimate: dict[str, Any], measure: Measure) -> int:
    """`chain`: the layer files of the current state's chain, own disk first, current last."""
    return sum(measure(p) for d in estimate["depths"] for p in chain[d])


def planned_bytes(held: int, dependent_bytes: list[int], *, root: bool) -> int:
    """What the merge rule (domain.rules.choose_merge) would copy; a hidden root with 2+
    dependents cannot merge yet: what pulling it up into each would copy, for comparison."""
    from domain.rules import choose_merge  # only a tree with a hidden node gets here

    choice = choose_merge(held=held, dependent_bytes=dependent_bytes, root=root)
    return choice.bytes if choice is not None else held * len(dependent_bytes)


def merge_bytes(layers: list[str], dependents: list[list[str]], root: bool, measure: Measure) -> int:
    held = sum(measure(p) for p in layers)
    return planned_bytes(held, [sum(measure(p) for p in d) for d in dependents], root=root)


def fill_bytes(doc: dict[str, Any], measure: Measure) -> None:
    """Add what the views leave out: each pending merge's bytes, the next flatten's."""
    _fill_merge_bytes(doc, measure)
    _fill_flatten_bytes(doc, measure)


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
        merge["bytes"] = merge_bytes(list(n["disks"].values()), deps, n["parent"] is None, measure)
