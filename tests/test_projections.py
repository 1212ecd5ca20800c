"""Projections (tree, pending merges, audit timeline) and replay, on SQLite and PostgreSQL.

- the views equal what `tree_json` / `merges_json` make of the live aggregate, byte counts included;
- a rebuild from zero gives the very same rows;
- exactly-once: the view rows and the tracking position commit together (a fault injected after
  the view write, or in the tracking write, leaves neither), and two runners never apply a batch twice;
- replay at every version of random histories (driven through the application's commands, with
  the worker's results recorded as commands too) equals the aggregate the application loads.
"""

from __future__ import annotations

import dataclasses
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.config import open_app
from adapters.storage import DataDir
from domain import commands as c
from domain.application import Snaptree
from domain.errors import Refused
from domain.tree import MergeDirection, MergeState, NodeKind, children
from domain.vm import VirtualMachine
from domain.work import WorkKind, pending_work
from eventsourcing.persistence import IntegrityError, StoredEvent
from projections import records
from projections.tree_doc import doc_children
from projections.read import (
    read_merges,
    read_timeline,
    read_tree,
    read_tree_view,
    runner_for,
)
from projections.replay import OutOfRange, ReplayError, tree_at, version_at_time, vm_at
from projections.runner import ProjectionError, ProjectionRunner
from projections.store import TIMELINE, StalePosition
from projections.tree_view import children_map, merges_json, tree_json

VM = "web"
DISKS = {"disk0": "/srv/web0.qcow2", "disk1": "/srv/web1.qcow2"}


# --------------------------------------------------------------------------------------------
# apps and histories
# --------------------------------------------------------------------------------------------


def sqlite_app(root: Path) -> Snaptree:
    return open_app(DataDir.open(root), environ={})


@pytest.fixture(params=["sqlite", "postgres"])
def app(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Snaptree]:
    if request.param == "sqlite":
        application = sqlite_app(tmp_path / "home")
    else:
        for k, v in request.getfixturevalue("pg_env").items():
            monkeypatch.setenv(k, v)
        application = open_app(DataDir.open(tmp_path / "home"))
        assert application.env.get("PERSISTENCE_MODULE") == "eventsourcing.postgres"
    yield application
    application.close()


def work_step(app: Snaptree, name: str, commit_down: bool = True) -> bool:
    """What the worker would report for the VM's first pending item (no disk: replay needs none)."""
    vm = app.get_vm(name)
    items = pending_work(vm)
    if not items:
        return False
    item = items[0]
    if item.kind is WorkKind.CREATE_LAYERS:
        assert item.node_id is not None
        app.decide(c.RecordLayersCreated(name, item.node_id))
    elif item.kind is WorkKind.REMOVE_FILES:
        app.decide(c.RecordFilesRemoved(name, tuple(list(item.paths))))
    elif item.kind is WorkKind.MERGE:
        assert item.node_id is not None
        node = vm.nodes[item.node_id]
        if node.merge_state is MergeState.RUNNING:
            app.decide(c.RecordMergeCompleted(name, node.id))
        else:
            deps = sorted(k.id for k in children(vm.nodes, node.id))
            down = node.parent is None or (len(deps) == 1 and commit_down)
            direction = MergeDirection.COMMIT_DOWN if down else MergeDirection.PULL_UP
            app.decide(c.RecordMergeStarted(name, node.id, tuple(deps), direction, 4096 * len(deps)))
    else:
        return False  # memory saves: not part of these histories
    return True


def settle(app: Snaptree, name: str) -> None:
    for _ in range(1000):
        if not work_step(app, name):
            return
    raise AssertionError("work does not converge")


def scripted_history(app: Snaptree, name: str = VM) -> None:
    """Every event type a stopped VM knows: hidden nodes, merges both ways, a failed merge, revert."""
    app.decide(c.RegisterVM(name, host="h1", disks=dict(DISKS), config={}))
    app.decide(c.TakeSnapshot(name, "A", memory=False))
    app.decide(c.TakeSnapshot(name, "B", memory=False))
    settle(app, name)
    app.decide(c.ApplySnapshot(name, "A"))
    app.decide(c.TakeSnapshot(name, "C", memory=False))
    app.decide(c.DeleteSnapshot(name, "A"))  # 2 dependents: hidden, merge pending
    app.decide(c.RenameSnapshot(name, "B", "B2"))
    settle(app, name)
    app.decide(c.DeleteSnapshot(name, "B2"))  # A drops to 1 dependent: merge scheduled
    work_step(app, name)  # layers / files first
    settle(app, name)
    app.decide(c.TakeSnapshot(name, "D", memory=False))
    app.decide(c.TakeSnapshot(name, "E", memory=False))
    app.decide(c.ApplySnapshot(name, "D"))
    app.decide(c.DeleteSnapshot(name, "D"))  # D hidden with 2 dependents
    vm = app.get_vm(name)
    (hidden,) = [n for n in vm.nodes.values() if n.kind is NodeKind.HIDDEN]
    settle(app, name)
    app.decide(c.MergeNode(name, str(hidden.id), force=True))
    vm = app.get_vm(name)
    deps = sorted(k.id for k in children(vm.nodes, hidden.id))
    app.decide(c.RecordMergeStarted(name, hidden.id, tuple(deps), MergeDirection.PULL_UP, 1234))
    app.decide(c.RecordMergeFailed(name, hidden.id, "No space left on device"))
    app.decide(c.RevertSnapshot(name))
    settle(app, name)


def fake_measure(path: str) -> int:
    return 1000 + sum(map(ord, path)) % 977


def fake_held(path: str) -> int:
    return 65536 + len(path)


def check_views(app: Snaptree, name: str) -> None:
    vm = app.get_vm(name)
    doc = read_tree(app, name)
    assert doc == tree_json(vm)
    kids = {str(k) if k else None: [str(n.id) for n in v] for k, v in children_map(vm).items()}
    assert {k: [n["id"] for n in v] for k, v in doc_children(doc).items()} == kids
    view = read_tree_view(app, name)
    assert view is not None and (view.host, view.version) == (vm.host, vm.version)
    assert read_tree(app, name, fake_measure) == tree_json(vm, fake_measure)
    assert read_merges(app, name) == merges_json(vm)
    assert read_merges(app, name, fake_measure, fake_held) == merges_json(vm, fake_measure, fake_held)
    log = read_timeline(app, name)
    assert [r["version"] for r in log] == list(range(1, vm.version + 1))


# --------------------------------------------------------------------------------------------
# the views
# --------------------------------------------------------------------------------------------


def test_views_follow_every_command(app: Snaptree) -> None:
    steps: list[Callable[[], Any]] = [
        lambda: app.decide(c.RegisterVM(VM, host="h1", disks=dict(DISKS), config={})),
        lambda: app.decide(c.TakeSnapshot(VM, "A", memory=False)),
        lambda: app.decide(c.TakeSnapshot(VM, "B", memory=False)),
        lambda: app.decide(c.ApplySnapshot(VM, "A")),
        lambda: app.decide(c.TakeSnapshot(VM, "C", memory=False)),
        lambda: app.decide(c.DeleteSnapshot(VM, "A")),
        lambda: settle(app, VM),
        lambda: app.decide(c.DeleteSnapshot(VM, "B")),
        lambda: work_step(app, VM),
        lambda: work_step(app, VM),
        lambda: settle(app, VM),
    ]
    for step in steps:
        step()
        check_views(app, VM)


def test_views_cover_several_vms_and_unknown_names(app: Snaptree) -> None:
    scripted_history(app, "one")
    app.decide(c.RegisterVM("two", host="h2", disks={"d": "/srv/two.qcow2"}, config={}))
    app.decide(c.TakeSnapshot("two", "X", memory=False))
    app.decide(c.TakeSnapshot("two", "Y", memory=False))
    app.decide(c.ApplySnapshot("two", "X"))
    app.decide(c.DeleteSnapshot("two", "X"))
    check_views(app, "one")
    check_views(app, "two")
    everything = read_merges(app)
    assert everything == merges_json(app.get_vm("one")) + merges_json(app.get_vm("two"))
    assert read_tree(app, "nobody") is None
    with pytest.raises(Refused):
        read_merges(app, "nobody")
    with pytest.raises(Refused):
        read_timeline(app, "nobody")


def test_an_imported_vm_is_followed_and_replayed(app: Snaptree) -> None:
    """`Imported` carries whole nodes (dataclasses): the decoder's object-hook path."""
    scripted_history(app, "orig")
    source = app.get_vm("orig")
    root = next(n for n in source.nodes.values() if n.parent is None)
    copy = VirtualMachine.register(name="copy", host="h2", disks=dict(root.layers), config=source.config)
    copy.record_import(
        [dataclasses.replace(n) for n in source.nodes.values()], source.current,
        {"vm_id": str(source.id), "name": "orig", "version": source.version, "host": "h1"},
    )
    app.save(copy)
    app.decide(c.TakeSnapshot("copy", "after-import", memory=False))
    check_views(app, "copy")
    check_replay_every_version(app, "copy")
    log = read_timeline(app, "copy")
    assert log[1]["event"] == "Imported"
    assert 'of VM "orig" from host h1 at its version' in log[1]["summary"]
    recs = list(records.event_records(app, "copy"))
    assert recs[1]["fields"]["nodes"][0]["kind"] in ("snapshot", "current", "hidden")


def test_asking_for_an_unknown_vm_writes_nothing(app: Snaptree) -> None:
    app.decide(c.RegisterVM(VM, host="h1", disks=dict(DISKS), config={}))
    runner = runner_for(app)
    assert runner.position == 0  # behind the log
    assert read_tree(app, "nobody") is None
    for read in (read_merges, read_timeline):
        with pytest.raises(Refused):
            read(app, "nobody")
    assert runner.position == 0 and not any(runner.store.dump().values())
    with pytest.raises(Refused):
        read_tree(app, "../x")  # an invalid name is refused, not looked up


def test_timeline_rows_say_what_happened(app: Snaptree) -> None:
    scripted_history(app)
    log = read_timeline(app, VM)
    events = [r["event"] for r in log]
    for expected in ("Registered", "SnapshotTaken", "SnapshotApplied", "LayersCreated", "SnapshotDeleted",
                     "SnapshotRenamed", "MergeScheduled", "MergeStarted", "MergeCompleted",
                     "MergeFailed", "FilesRemoved"):
        assert expected in events
    assert all(r["request_id"] is None for r in log)
    assert all(r["summary"] and "\n" not in r["summary"] for r in log)
    assert all(r["vm"] == VM for r in log)
    positions = [r["position"] for r in log]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    by_event = {r["event"]: r["summary"] for r in log}
    assert 'renamed snapshot "B" to "B2"' in by_event["SnapshotRenamed"]
    assert "No space left on device" in by_event["MergeFailed"]
    assert log[0]["time"].endswith("Z")


# --------------------------------------------------------------------------------------------
# rebuild equivalence and exactly-once
# --------------------------------------------------------------------------------------------


def test_rebuild_gives_identical_rows(app: Snaptree) -> None:
    runner = ProjectionRunner(app, batch_size=7)  # small batches: many commits, cache reuse
    scripted_history(app, "one")
    runner.update()
    scripted_history(app, "two")
    app.decide(c.RenameSnapshot("one", "C", "C2"))
    runner.update()
    before = runner.store.dump()
    assert all(before.values())
    runner.rebuild()
    assert runner.store.dump() == before
    # A cold runner in another "process", with other batch sizes, agrees row for row.
    cold = ProjectionRunner(app, batch_size=1000, cache_size=1)
    cold.rebuild()
    assert cold.store.dump() == before


@pytest.mark.parametrize("where", ["after_views", "in_tracking"])
def test_view_rows_and_position_commit_together(
    app: Snaptree, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = ProjectionRunner(app, batch_size=5)
    app.decide(c.RegisterVM(VM, host="h1", disks=dict(DISKS), config={}))
    app.decide(c.TakeSnapshot(VM, "A", memory=False))
    runner.update()
    before, position = runner.store.dump(), runner.position
    app.decide(c.TakeSnapshot(VM, "B", memory=False))
    app.decide(c.TakeSnapshot(VM, "C", memory=False))

    def boom(*_: Any, **__: Any) -> None:
        raise IntegrityError("injected: crash between the view write and the tracking record")

    if where == "after_views":
        monkeypatch.setattr(runner.store, "_after_views_written", boom)
    else:
        monkeypatch.setattr(runner.store.tracking, "_insert_tracking", boom)
    with pytest.raises(IntegrityError, match="injected"):
        runner.update()
    monkeypatch.undo()
    # The batch's rows were written in the failed transaction: none of them is there.
    assert runner.store.dump() == before
    assert runner.position == position
    assert runner.update() > 0
    check_views(app, VM)
    after = runner.store.dump()
    runner.rebuild()
    assert runner.store.dump() == after


def test_two_runners_never_apply_a_batch_twice(app: Snaptree) -> None:
    first, second = ProjectionRunner(app), ProjectionRunner(app)
    scripted_history(app)
    start = first.position
    notifications = app.recorder.select_notifications(start, 1000, inclusive_of_start=False)
    batch = first.project(notifications)
    assert second.update() == len(notifications)  # the other one commits first
    with pytest.raises(StalePosition):
        first.store.commit(batch, start, notifications[-1].id)
    assert first.update() == 0
    app.decide(c.TakeSnapshot(VM, "later", memory=False))  # the first runner's cache is ahead of nothing, behind nothing: still right
    assert first.update() == 1
    check_views(app, VM)
    rows = first.store.dump()
    timeline = rows[TIMELINE]
    assert len({r[0] for r in timeline}) == len(timeline) == app.get_vm(VM).version


def test_a_runner_with_a_stale_cache_reloads(app: Snaptree) -> None:
    warm, other = ProjectionRunner(app), ProjectionRunner(app)
    app.decide(c.RegisterVM(VM, host="h1", disks=dict(DISKS), config={}))
    app.decide(c.TakeSnapshot(VM, "A", memory=False))
    warm.update()
    app.decide(c.TakeSnapshot(VM, "B", memory=False))
    app.decide(c.DeleteSnapshot(VM, "A"))
    other.update()  # moves the position past events the warm cache has not seen
    app.decide(c.RenameSnapshot(VM, "B", "B2"))
    warm.update()
    check_views(app, VM)


def test_an_event_that_cannot_be_followed_stops_the_views_and_says_where(app: Snaptree) -> None:
    runner = ProjectionRunner(app)
    app.decide(c.RegisterVM(VM, host="h1", disks=dict(DISKS), config={}))
    app.decide(c.TakeSnapshot(VM, "A", memory=False))
    runner.update()
    before = runner.store.dump()
    vm = app.get_vm(VM)
    topic = f"{type(vm).__module__}:{type(vm).__qualname__}.SnapshotRenamed"
    app.recorder.insert_events([StoredEvent(vm.id, vm.version + 1, topic, b"\xc1")])  # not msgpack
    with pytest.raises(ProjectionError, match=f"version {vm.version + 1}, SnapshotRenamed"):
        runner.update()
    assert runner.store.dump() == before
    with pytest.raises(ReplayError):
        vm_at(app, VM, vm.version + 1, events_only=True)
    assert tree_at(app, VM, vm.version) == tree_json(vm)  # what comes before is still readable


# --------------------------------------------------------------------------------------------
# replay
# --------------------------------------------------------------------------------------------


def check_replay_every_version(app: Snaptree, name: str) -> None:
    last = app.get_vm(name).version
    for v in range(1, last + 1):
        expected = tree_json(app.get_vm_at(name, v))
        assert tree_at(app, name, v, events_only=True) == expected, v
        assert tree_at(app, name, v) == expected, v
    for bad in (0, last + 1):
        with pytest.raises(OutOfRange):
            vm_at(app, name, bad)


def test_replay_every_version_of_a_scripted_history(app: Snaptree) -> None:
    scripted_history(app)
    check_replay_every_version(app, VM)


def test_replay_across_aggregate_snapshots(tmp_path: Path) -> None:
    app = sqlite_app(tmp_path / "home")
    scripted_history(app)
    for i in range(30):
        app.decide(c.TakeSnapshot(VM, f"s{i}", memory=False))
    for i in range(240):
        app.decide(c.RenameSnapshot(VM, f"s{i % 30}" if i < 30 else f"r{i - 30}", f"r{i}"))
    vm = app.get_vm(VM)
    assert vm.version > 300
    assert app.snapshots is not None and list(app.snapshots.get(vm.id, lte=vm.version))
    check_replay_every_version(app, VM)
    check_views(app, VM)


def test_version_at_time(tmp_path: Path) -> None:
    app = sqlite_app(tmp_path / "home")
    scripted_history(app)
    log = read_timeline(app, VM)
    vm = app.get_vm(VM)
    for row in log:
        at = app.get_vm_at(VM, row["version"]).modified_on
        found = version_at_time(app, VM, at)
        # Events stamped in the same microsecond: the state after the last of them.
        assert app.get_vm_at(VM, found).modified_on == at and found >= row["version"]
        assert version_at_time(app, VM, at + timedelta(microseconds=1)) >= found
    first = app.get_vm_at(VM, 1).modified_on
    with pytest.raises(OutOfRange):
        version_at_time(app, VM, first - timedelta(seconds=1))
    assert version_at_time(app, VM, vm.modified_on + timedelta(days=1)) == vm.version


NAMES = ["a", "b", "c", "d"]
OPS = st.one_of(
    st.tuples(st.just("take"), st.sampled_from(NAMES)),
    st.tuples(st.just("apply"), st.sampled_from(NAMES)),
    st.tuples(st.just("delete"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("revert")),
    st.tuples(st.just("work"), st.booleans()),
    st.tuples(st.just("settle")),
    st.tuples(st.just("fail")),
    st.tuples(st.just("merge"), st.integers(0, 3), st.booleans()),
)


def run_op(app: Snaptree, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "take":
        app.decide(c.TakeSnapshot(VM, op[1], memory=False))
    elif kind == "apply":
        app.decide(c.ApplySnapshot(VM, op[1]))
    elif kind == "delete":
        app.decide(c.DeleteSnapshot(VM, op[1], subtree=op[2]))
    elif kind == "rename":
        app.decide(c.RenameSnapshot(VM, op[1], op[2]))
    elif kind == "revert":
        app.decide(c.RevertSnapshot(VM))
    elif kind == "work":
        work_step(app, VM, commit_down=op[1])
    elif kind == "settle":
        settle(app, VM)
    elif kind == "fail":
        vm = app.get_vm(VM)
        for n in vm.nodes.values():
            if n.merge_state in (MergeState.SCHEDULED, MergeState.RUNNING):
                app.decide(c.RecordMergeFailed(VM, n.id, "qemu-img: I/O error"))
                return
    elif kind == "merge":
        hidden = sorted((n for n in app.get_vm(VM).nodes.values() if n.kind is NodeKind.HIDDEN),
                        key=lambda n: n.created_at)
        if hidden:
            app.decide(c.MergeNode(VM, str(hidden[op[1] % len(hidden)].id), force=op[2]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=40))
def test_replay_at_every_version_of_random_histories(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app = sqlite_app(Path(tmp))
        app.decide(c.RegisterVM(VM, host="h1", disks=dict(DISKS), config={}))
        for op in ops:
            try:
                run_op(app, op)
            except Refused:
                pass  # a refused command records nothing
        check_replay_every_version(app, VM)
        check_views(app, VM)
        app.close()


# --------------------------------------------------------------------------------------------
# export records
# --------------------------------------------------------------------------------------------


def test_export_records_in_both_formats(app: Snaptree, tmp_path: Path) -> None:
    scripted_history(app)
    recs = list(records.event_records(app, VM))
    vm = app.get_vm(VM)
    assert [r["version"] for r in recs] == list(range(1, vm.version + 1))
    assert [r["type"] for r in recs] == [r["event"] for r in read_timeline(app, VM)]
    for fmt in records.FORMATS:
        out = tmp_path / f"events.{fmt}"
        with open(out, "wb") as f:
            assert records.write(recs, f, fmt) == len(recs)
        assert records.read(out.read_bytes(), fmt) == recs
    completed = next(r for r in recs if r["type"] == "MergeCompleted")
    assert all(isinstance(k, str) for k in completed["fields"]["layers"])
    assert recs[0]["fields"]["disks"] == DISKS
