"""`snaptree tree`, `snaptree merges` and `snaptree merge`: which file gets the writes, which
are frozen, what waits to be merged and why."""

from __future__ import annotations

from typing import Any

import click

from adapters.cli.app import Ctx, main
from adapters.cli.output import command, emit, wait_option


@main.command("tree")
@click.argument("vm", metavar="VM")
@command
def tree(ctx: Ctx, vm: str, as_json: bool) -> None:
    """Show VM's snapshot tree: which file gets the writes, which are frozen, pending merges."""
    from service.quick_tree import current_tree

    found = current_tree(ctx.data, vm)  # the view as it stands, when it has every event
    if found is not None:
        data, host = found
    else:
        from domain import commands as c

        result = ctx.service.handle(c.GetTree(vm))
        data, host = result.json(), getattr(result, "host", None)
    if as_json:
        emit(data, True)
        return
    from rich.console import Console

    Console().print(render_tree(data, host or "?"))


def render_tree(data: dict[str, Any], host: str) -> Any:
    from rich.tree import Tree

    from projections.tree_doc import doc_children

    by_id = {n["id"]: n for n in data["nodes"]}
    kids = doc_children(data)
    current = by_id[data["current"]]
    top = Tree(f"[bold]{data['vm']}[/] (host {host}; {_chain(current)})")

    def add(parent: Any, node_id: str | None) -> None:
        for child in kids.get(node_id, []):
            add(parent.add(_label(child)), child["id"])

    add(top, None)
    return top


def _chain(current: dict[str, Any]) -> str:
    text = f"current chain depth {current['chain_depth']}"
    nxt = current.get("next_flatten")
    if nxt is None:
        return text
    text += f" of {current['max_chain_depth']}; take {nxt['after_takes']} from now flattens"
    if nxt.get("bytes") is not None:
        text += f", copying at least {nxt['bytes'] / 2**20:.1f} MiB"
    return text


def _label(n: dict[str, Any]) -> str:
    if n["kind"] == "current":
        head = "[bold green]● now[/] (current state)"
        files = "  ".join(f"{d}: [green]{p}[/] (active, written)" for d, p in n["disks"].items())
    elif n["kind"] == "hidden":
        m = n["merge"]
        why = m["blocked_by"] or m["state"]
        head = (f"[yellow]◌ {n['name']}[/] [dim](hidden, {n['dependents']} dependents, merge "
                f"{m['state']}: {why}, {m['bytes']} bytes)[/]")
        files = "  ".join(f"{d}: {p}" for d, p in n["disks"].items())
    else:
        head = f"[bold]◆ {n['name']}[/] [dim]{n['id'][:8]} {n['created_at']}[/]"
        mem = n.get("memory") or {}
        if mem.get("state") not in (None, "none"):
            size = f", {mem['bytes'] / 2**20:.0f} MiB" if mem.get("bytes") else ""
            head += f" [cyan]memory {mem['state']}{size}[/]"
        if mem.get("pause_ms") is not None:
            head += f" [dim]paused {mem['pause_ms']:.1f} ms[/]"
        q = n.get("quiesce")
        if q is not None and q["state"] != "off":
            frozen = f", {q['filesystems']} fs frozen {q['frozen_ms']:.0f} ms" if q["state"] == "frozen" else ""
            head += f" [dim]quiesce {q['state']}{frozen}[/]"
        files = "  ".join(f"{d}: {p} (frozen)" for d, p in n["disks"].items())
    if n.get("flatten"):
        f = n["flatten"]
        size = f", {f['bytes'] / 2**20:.1f} MiB" if f.get("bytes") else ""
        head += f" [cyan]flatten {f['state']}{size}[/]"
    if not n["ready"]:
        files += "  [dim](being created)[/]" if not n.get("failure") else ""
    label = f"{head}\n[dim]{files}[/]"
    if n.get("failure"):
        label += f"\n[red]failed: {n['failure']['message']}[/]"
    return label


@main.command("merges")
@click.argument("vm", metavar="[VM]", required=False)
@command
def merges(ctx: Ctx, vm: str | None, as_json: bool) -> None:
    """List hidden nodes and merges in flight, with what blocks each and what it would cost."""
    from domain import commands as c

    ctx.run(c.ListMerges(vm), as_json)


@main.command("merge")
@click.argument("vm", metavar="VM")
@click.argument("node", metavar="NODE")
@click.option("--force", is_flag=True, help="Merge even with 2+ dependents: pull the data up into each.")
@wait_option
@command
def merge(ctx: Ctx, vm: str, node: str, force: bool, no_wait: bool, as_json: bool) -> None:
    """Merge hidden NODE now (retry a failed merge, or --force one with 2+ dependents)."""
    from domain import commands as c

    ctx.run(c.MergeNode(vm, node, force=force), as_json, wait=not no_wait)
