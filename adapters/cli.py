"""The `snaptree` command line: a thin shell over the service layer.

Exit status 2 means the command was refused and nothing changed; 1 means it failed while doing
it. With `--json` the same status, and `{"error": {"code", "message"}}` on stdout as well.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any, Callable

import click
from rich.console import Console
from rich.tree import Tree

from adapters.qemu import qemu_img
from adapters.service import MergeFailedError, Service
from domain.errors import Refused, SnaptreeError, UnknownVM
from domain.tree import NodeKind
from projections.read import doc_children, read_merges, read_tree_view
from projections.tree_view import memory_json

err_console = Console(stderr=True)


class Ctx:
    def __init__(self, home: str | None, host: str | None) -> None:
        self.home = home
        self.host = host
        self._service: Service | None = None

    @property
    def service(self) -> Service:
        if self._service is None:
            self._service = Service.open(self.home, self.host)
        return self._service


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=False))
    elif text is not None:
        click.echo(text)


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds `--json` and maps domain errors to the exit statuses of DESIGN §3b."""

    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    @functools.wraps(fn)
    def wrapper(ctx: Ctx, *args: Any, as_json: bool, **kwargs: Any) -> Any:
        try:
            return fn(ctx, *args, as_json=as_json, **kwargs)
        except Refused as exc:
            fail(2, exc.code, exc.message, as_json)
        except (SnaptreeError, qemu_img.QemuImgError, OSError, RuntimeError) as exc:
            code = getattr(exc, "code", "failed")
            fail(1, code, str(exc), as_json)

    return wrapper


def fail(status: int, code: str, message: str, as_json: bool) -> None:
    click.echo(f"snaptree: error: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"error": {"code": code, "message": message}}))
    sys.exit(status)


def wait_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--no-wait", is_flag=True, help="Return once recorded; a worker does the disk work later."
    )(fn)


def settle(ctx: Ctx, vm: str, no_wait: bool, as_json: bool) -> None:
    if no_wait:
        return
    show = not as_json and sys.stderr.isatty()

    def progress(vm_name: str, what: str, fraction: float) -> None:
        if show:
            err_console.print(f"  {vm_name}: {what} {fraction * 100:5.1f}%", end="\r")

    ctx.service.wait(vm, progress)
    if show:
        err_console.print(" " * 60, end="\r")


def measure(path: str) -> int:
    try:
        return qemu_img.allocated_bytes(path)
    except (qemu_img.QemuImgError, OSError):
        return 0


def held(path: str) -> int:
    try:
        return qemu_img.disk_usage(path)
    except OSError:
        return 0


class SnaptreeGroup(click.Group):
    """Click's own usage errors follow the same contract: one line, exit 2, JSON on request."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Abort:
            fail(1, "aborted", "aborted", False)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            fail(2, "usage", " ".join(exc.format_message().split()), "--json" in sys.argv[1:])


@click.group(cls=SnaptreeGroup)
@click.option("--home", envvar="SNAPTREE_HOME", help="Data directory (default: per-user data dir).")
@click.option("--host", envvar="SNAPTREE_HOST", help="This host's name (default: hostname).")
@click.option("-v", "--verbose", is_flag=True, help="Log what the worker does on stderr.")
@click.version_option(package_name="snaptree")
@click.pass_context
def main(click_ctx: click.Context, home: str | None, host: str | None, verbose: bool) -> None:
    """Live snapshot trees for QEMU VMs, with Hyper-V checkpoint semantics."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="snaptree: %(message)s")
    else:
        logging.getLogger().addHandler(logging.NullHandler())  # errors reach the user once
    click_ctx.obj = Ctx(home, host)


# --- vm ---


@main.group()
def vm() -> None:
    """Register and list VMs."""


@vm.command("create")
@click.argument("name")
@click.option("--disk", "disks", multiple=True, required=True, metavar="[NAME=]PATH",
              help="A qcow2 disk the VM owns (repeatable). It stays where it is unless --copy.")
@click.option("--copy", is_flag=True, help="Copy the disks into the data directory first.")
@click.option("--vm-host", "vm_host", help="Host that runs this VM (default: this host).")
@click.option("--memory", type=click.IntRange(16), default=256, show_default=True, help="MiB.")
@click.option("--cpus", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, resolve_path=True),
              help="Boot this kernel (e.g. a multiboot ELF) instead of the firmware's boot order.")
@command
def vm_create(ctx: Ctx, name: str, disks: tuple[str, ...], copy: bool, vm_host: str | None,
              memory: int, cpus: int, kernel: str | None, as_json: bool) -> None:
    """Register VM NAME with its own disk files."""
    config: dict[str, Any] = {"memory_mib": memory, "cpus": cpus}
    if kernel:
        config["kernel"] = kernel
    agg = ctx.service.create_vm(name, list(disks), copy=copy, host=vm_host, config=config)
    emit({"vm": agg.name, "id": str(agg.id), "current": str(agg.current), "disks": agg.disks},
         as_json, f"created VM {agg.name} with disks " + ", ".join(f"{d}={p}" for d, p in agg.disks.items()))


@vm.command("list")
@command
def vm_list(ctx: Ctx, as_json: bool) -> None:
    """List registered VMs."""
    rows = []
    for name in ctx.service.app.vm_names():
        agg = ctx.service.app.get_vm(name)
        snaps = sum(1 for n in agg.nodes.values() if n.kind is NodeKind.SNAPSHOT)
        hidden = sum(1 for n in agg.nodes.values() if n.kind is NodeKind.HIDDEN)
        rows.append({"vm": name, "host": agg.host, "snapshots": snaps, "hidden": hidden,
                     "disks": agg.disks})
    emit(rows, as_json, "\n".join(
        f"{r['vm']}\thost={r['host']}\tsnapshots={r['snapshots']}\thidden={r['hidden']}" for r in rows
    ) or "no VMs")


@vm.command("start")
@click.argument("vm_name", metavar="VM")
@click.option("--paused", is_flag=True, help="Start with the vCPUs stopped.")
@command
def vm_start(ctx: Ctx, vm_name: str, paused: bool, as_json: bool) -> None:
    """Start VM's QEMU on its current state."""
    st = ctx.service.start_vm(vm_name, paused=paused)
    emit(st, as_json, f"VM {vm_name} {st['state']} (pid {st['pid']})")


@vm.command("stop")
@click.argument("vm_name", metavar="VM")
@command
def vm_stop(ctx: Ctx, vm_name: str, as_json: bool) -> None:
    """Stop VM's QEMU (after any memory save in flight has ended)."""
    st = ctx.service.stop_vm(vm_name)
    emit(st, as_json, f"VM {vm_name} {st['state']}")


@vm.command("status")
@click.argument("vm_name", metavar="VM")
@command
def vm_status(ctx: Ctx, vm_name: str, as_json: bool) -> None:
    """Whether VM runs, and where."""
    st = ctx.service.status(vm_name)
    emit(st, as_json, f"{st['vm']}\t{st['state']}\tpid={st['pid']}\thost={st['host']}")


@vm.command("set")
@click.argument("vm_name", metavar="VM")
@click.option("--memory", type=click.IntRange(16), help="MiB.")
@click.option("--cpus", type=click.IntRange(1, 64))
@command
def vm_set(ctx: Ctx, vm_name: str, memory: int | None, cpus: int | None, as_json: bool) -> None:
    """Change the current state's settings (snapshots keep their copies; applies at next start)."""
    changes: dict[str, Any] = {}
    if memory is not None:
        changes["memory_mib"] = memory
    if cpus is not None:
        changes["cpus"] = cpus
    ctx.service.app.set_config(vm_name, changes)
    agg = ctx.service.app.get_vm(vm_name)
    cfg = agg.nodes[agg.current].config
    emit({"vm": vm_name, "config": cfg}, as_json, f"VM {vm_name}: {cfg}")


# --- snapshot ---


@main.group()
def snapshot() -> None:
    """Take, apply, delete, rename and revert snapshots."""


@snapshot.command("take")
@click.argument("vm_name", metavar="VM")
@click.argument("name")
@click.option("--no-memory", is_flag=True, help="Of a running VM: disks only, no memory save.")
@wait_option
@command
def snapshot_take(ctx: Ctx, vm_name: str, name: str, no_memory: bool, no_wait: bool,
                  as_json: bool) -> None:
    """Take snapshot NAME of VM (of a running VM: live, memory saved while it runs)."""
    node = ctx.service.take(vm_name, name, memory=not no_memory)
    settle(ctx, vm_name, no_wait, as_json)
    snap = ctx.service.app.get_vm(vm_name).nodes[node]
    mem = snap.memory or {}
    detail = ""
    if mem.get("pause_ms") is not None:
        detail = f"; guest paused {mem['pause_ms']:.1f} ms"
    if mem.get("state") in ("saved", "saving"):
        detail += f"; memory {mem['state']}" + (f" ({mem.get('bytes')} bytes)" if mem.get("bytes") else "")
    emit({"vm": vm_name, "snapshot": str(node), "name": name, "memory": memory_json(snap)}, as_json,
         f"took snapshot {name} ({node}){detail}")


@snapshot.command("apply")
@click.argument("vm_name", metavar="VM")
@click.argument("snap", metavar="SNAPSHOT")
@click.option("--paused", is_flag=True, help="A snapshot with saved memory comes back paused.")
@wait_option
@command
def snapshot_apply(ctx: Ctx, vm_name: str, snap: str, paused: bool, no_wait: bool, as_json: bool) -> None:
    """Set VM to start from a copy of SNAPSHOT; the current state is discarded.

    With saved memory the VM comes back running (or --paused) exactly where SNAPSHOT was."""
    current = ctx.service.apply(vm_name, snap, paused=paused, wait=not no_wait)
    settle(ctx, vm_name, no_wait, as_json)
    emit({"vm": vm_name, "snapshot": snap, "current": str(current)}, as_json,
         f"applied {snap}: new current state {current}")


@snapshot.command("delete")
@click.argument("vm_name", metavar="VM")
@click.argument("snap", metavar="SNAPSHOT")
@click.option("--subtree", is_flag=True, help="Also delete every snapshot below it.")
@wait_option
@command
def snapshot_delete(ctx: Ctx, vm_name: str, snap: str, subtree: bool, no_wait: bool, as_json: bool) -> None:
    """Delete SNAPSHOT (its layers merge or wait as a hidden node, by the rules)."""
    deleted = ctx.service.app.delete(vm_name, snap, subtree=subtree)
    settle(ctx, vm_name, no_wait, as_json)
    emit({"vm": vm_name, "deleted": [str(d) for d in deleted]}, as_json,
         f"deleted {len(deleted)} snapshot(s)")


@snapshot.command("rename")
@click.argument("vm_name", metavar="VM")
@click.argument("snap", metavar="SNAPSHOT")
@click.argument("new_name", metavar="NEW")
@command
def snapshot_rename(ctx: Ctx, vm_name: str, snap: str, new_name: str, as_json: bool) -> None:
    """Rename SNAPSHOT to NEW (the only edit a snapshot allows)."""
    ctx.service.app.rename(vm_name, snap, new_name)
    emit({"vm": vm_name, "snapshot": snap, "name": new_name}, as_json, f"renamed {snap} to {new_name}")


@snapshot.command("revert")
@click.argument("vm_name", metavar="VM")
@wait_option
@command
def snapshot_revert(ctx: Ctx, vm_name: str, no_wait: bool, as_json: bool) -> None:
    """Apply the nearest visible snapshot above the current state."""
    current = ctx.service.app.revert(vm_name)
    settle(ctx, vm_name, no_wait, as_json)
    emit({"vm": vm_name, "current": str(current)}, as_json, f"reverted: new current state {current}")


# --- tree and merges ---


@main.command("tree")
@click.argument("vm_name", metavar="VM")
@command
def tree(ctx: Ctx, vm_name: str, as_json: bool) -> None:
    """Show VM's snapshot tree: which file gets the writes, which are frozen, pending merges."""
    view = read_tree_view(ctx.service.app, vm_name, measure)  # the tree view, caught up first
    if view is None:
        raise UnknownVM(f"no VM named {vm_name!r}")
    if as_json:
        emit(view.doc, True)
        return
    Console().print(render_tree(view.doc, view.host))


def render_tree(data: dict[str, Any], host: str) -> Tree:
    by_id = {n["id"]: n for n in data["nodes"]}
    kids = doc_children(data)
    current = by_id[data["current"]]
    top = Tree(f"[bold]{data['vm']}[/] (host {host}; current chain depth {current['chain_depth']})")

    def label(n: dict[str, Any]) -> str:
        if n["kind"] == "current":
            head = "[bold green]● now[/] (current state)"
            files = "  ".join(f"{d}: [green]{p}[/] (active, written)" for d, p in n["disks"].items())
        elif n["kind"] == "hidden":
            m = n["merge"]
            why = m["blocked_by"] or m["state"]
            head = f"[yellow]◌ {n['name']}[/] [dim](hidden, {n['dependents']} dependents, merge {m['state']}: {why}, {m['bytes']} bytes)[/]"
            files = "  ".join(f"{d}: {p}" for d, p in n["disks"].items())
        else:
            head = f"[bold]◆ {n['name']}[/] [dim]{n['id'][:8]} {n['created_at']}[/]"
            mem = n.get("memory") or {}
            if mem.get("state") not in (None, "none"):
                size = f", {mem['bytes'] / 2**20:.0f} MiB" if mem.get("bytes") else ""
                head += f" [cyan]memory {mem['state']}{size}[/]"
            if mem.get("pause_ms") is not None:
                head += f" [dim]paused {mem['pause_ms']:.1f} ms[/]"
            files = "  ".join(f"{d}: {p} (frozen)" for d, p in n["disks"].items())
        if not n["ready"]:
            files += "  [dim](being created)[/]"
        return f"{head}\n[dim]{files}[/]"

    def add(parent: Tree, node_id: str | None) -> None:
        for child in kids.get(node_id, []):
            branch = parent.add(label(child))
            add(branch, child["id"])

    add(top, None)
    return top


@main.command("merges")
@click.argument("vm_name", metavar="[VM]", required=False)
@command
def merges(ctx: Ctx, vm_name: str | None, as_json: bool) -> None:
    """List hidden nodes and merges in flight, with what blocks each and what it would cost."""
    rows = read_merges(ctx.service.app, vm_name, measure, held)  # from the pending-merges view
    emit(rows, as_json, "\n".join(
        f"{r['vm']}\t{r['node']}\t{r['name']}\tdependents={r['dependents']}\t{r['state']}"
        f"\tblocked_by={r['blocked_by']}\tbytes_held={r['bytes_held']}\tmerge_bytes={r['merge_bytes']}"
        for r in rows
    ) or "no pending merges")


@main.command("merge")
@click.argument("vm_name", metavar="VM")
@click.argument("node", metavar="NODE")
@click.option("--force", is_flag=True, help="Merge even with 2+ dependents: pull the data up into each.")
@wait_option
@command
def merge(ctx: Ctx, vm_name: str, node: str, force: bool, no_wait: bool, as_json: bool) -> None:
    """Merge hidden NODE now (retry a failed merge, or --force one with 2+ dependents)."""
    node_id = ctx.service.app.merge(vm_name, node, force=force)
    settle(ctx, vm_name, no_wait, as_json)
    emit({"vm": vm_name, "node": str(node_id)}, as_json, f"merged node {node_id}")


# --- worker ---


@main.group()
def worker() -> None:
    """Run the worker that performs the disk work."""


@worker.command("run")
@click.option("--until-idle", is_flag=True, help="Exit once no work is left.")
@command
def worker_run(ctx: Ctx, until_idle: bool, as_json: bool) -> None:
    """Follow the event log and perform overlay creation, merges and file removal."""
    w = ctx.service.worker()
    w.run(until_idle=until_idle)
    if w.effects.failures:
        raise MergeFailedError("; ".join(w.effects.failures))
    emit({"position": w.position}, as_json, f"worker idle at notification {w.position}")


# Command groups that live in their own modules; each has `register(main: click.Group)`.
EXTENSIONS: tuple[str, ...] = ("adapters.cli_verify", "adapters.cli_bundle", "adapters.cli_audit", "adapters.cli_queue")


def _register_extensions() -> None:
    import importlib

    for module in EXTENSIONS:
        importlib.import_module(module).register(main)


_register_extensions()

if __name__ == "__main__":
    main()
