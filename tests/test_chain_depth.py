"""Bounded chains (issue 10 item 8) on the in-memory ports: past the VM's `max_chain_depth`, the
snapshot under the current state is flattened onto an older ancestor; every snapshot keeps
reading its own data, the tree keeps the shape the user made. The same on real qemu-img and
QEMU is in test_chain_depth_qemu.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.config import open_app
from adapters.storage import DataDir
from domain import commands as c
from domain.errors import Conflict, InvalidArgument
from domain.tree import MergeState, NodeKind, chain_depth, logical_parent
from domain.vm import VirtualMachine
from domain.work import pending_work
from projections.tree_view import tree_json
from service.api import Service
from tests.fakes import Crash, FakeImages, FakeMachines


@pytest.fixture
def world(tmp_path: Path) -> tuple[Service, FakeImages, FakeMachines]:
    data = DataDir.open(tmp_path / "home")
    images = FakeImages()
    machines = FakeMachines(images)
    svc = Service(data, open_app(data, environ={}), "h1", images, machines)
    images.make(str(tmp_path / "own.qcow2"), {0: "base"})
    svc.handle(c.CreateVM("web", disk=(str(tmp_path / "own.qcow2"),), max_chain_depth=4))
    return svc, images, machines


def vm(svc: Service) -> VirtualMachine:
    return svc.app.get_vm("web")


def layer(svc: Service, name: str | None = None) -> str:
    agg = vm(svc)
    node = agg.nodes[agg.current] if name is None else agg.resolve_snapshot(name)
    return node.layers["disk0"]


def linear_history(svc: Service, images: FakeImages, n: int) -> dict[str, dict[int, str]]:
    """Take s1..sn, writing block i just before taking si; what each snapshot must read."""
    expected: dict[str, dict[int, str]] = {}
    seen = {0: "base"}
    for i in range(1, n + 1):
        images.write(layer(svc), i, f"w{i}")
        seen[i] = f"w{i}"
        svc.handle(c.TakeSnapshot("web", f"s{i}"))
        expected[f"s{i}"] = dict(seen)
        agg = vm(svc)
        assert chain_depth(agg.nodes, agg.current) <= 4, f"after s{i}"
    return expected


def test_a_long_history_stays_within_the_depth_and_every_snapshot_reads_its_data(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, _ = world
    expected = linear_history(svc, images, 12)
    agg = vm(svc)
    for name, data in expected.items():
        assert images.read(layer(svc, name)) == data, name
    # The tree is the one the user made: s1 -> s2 -> ... -> s12 -> current.
    for i in range(2, 13):
        up = logical_parent(agg.nodes, agg.resolve_snapshot(f"s{i}"))
        assert up is not None and up.name == f"s{i - 1}"
    doc = tree_json(agg)
    flattened = [n for n in doc["nodes"] if n["parent"] != n["backing"]]
    assert flattened, "some snapshot was flattened"
    assert not pending_work(agg)


def test_revert_and_delete_follow_the_tree_the_user_made(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, _ = world
    expected = linear_history(svc, images, 8)
    flattened = next(n for n in vm(svc).nodes.values() if n.origin is not None)
    above = vm(svc).nodes[flattened.origin]  # type: ignore[index]
    svc.handle(c.DeleteSnapshot("web", above.name or ""))
    agg = vm(svc)
    assert logical_parent(agg.nodes, agg.nodes[flattened.id]) is not None
    for name, data in expected.items():
        if name != above.name:
            assert images.read(layer(svc, name)) == data, name
    images.write(layer(svc), 20, "scratch")
    svc.handle(c.RevertSnapshot("web"))
    assert images.read(layer(svc)) == expected["s8"]
    svc.handle(c.DeleteSnapshot("web", "s2", subtree=True))  # every snapshot below s2 as made
    assert [n.name for n in vm(svc).nodes.values() if n.kind is NodeKind.SNAPSHOT] == ["s1"]


def test_a_running_vm_is_flattened_online(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, machines = world
    svc.handle(c.StartVM("web"))
    expected = linear_history(svc, images, 6)
    for name, data in expected.items():
        assert images.read(layer(svc, name)) == data, name
    assert machines.running["web"].disks["disk0"] == layer(svc)


def test_a_worker_killed_mid_flatten_resumes_its_plan(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, _ = world
    images.crash["rebase_safe"] = 1
    with pytest.raises(Crash):
        linear_history(svc, images, 6)
    agg = vm(svc)
    assert agg.running_flatten() is not None  # the plan was recorded before the kill
    with pytest.raises(Conflict, match="being flattened"):
        svc.handle(c.DeleteSnapshot("web", agg.running_flatten().name or ""))  # type: ignore[union-attr]
    svc.settle("web")
    agg = vm(svc)
    assert agg.running_flatten() is None and not pending_work(agg)
    assert images.read(layer(svc, "s4")) == {0: "base", 1: "w1", 2: "w2", 3: "w3", 4: "w4"}


def test_a_failed_flatten_holds_nothing_back_and_a_retry_completes_it(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, _ = world
    images.fail["rebase_safe"] = 1
    linear_history(svc, images, 4)
    svc.handle(c.TakeSnapshot("web", "s5"))  # its flatten fails: recorded, the take itself stands
    agg = vm(svc)
    assert [f.kind for f in agg.failed.values()] == ["flatten"]
    (failed,) = [n for n in tree_json(agg)["nodes"] if "failure" in n]
    assert failed["name"] == "s5" and "work retry" in failed["failure"]["message"]
    svc.handle(c.TakeSnapshot("web", "more"))  # nothing is held back
    svc.handle(c.RetryWork("web"))
    agg = vm(svc)
    assert not agg.failed and not pending_work(agg)
    assert chain_depth(agg.nodes, agg.current) <= 4


def test_lowering_the_limit_flattens_and_bad_limits_are_refused(tmp_path: Path) -> None:
    data = DataDir.open(tmp_path / "home")
    images = FakeImages()
    svc = Service(data, open_app(data, environ={}), "h1", images, FakeMachines(images))
    images.make(str(tmp_path / "own.qcow2"), {0: "base"})
    svc.handle(c.CreateVM("web", disk=(str(tmp_path / "own.qcow2"),)))
    for i in range(10):
        svc.handle(c.TakeSnapshot("web", f"s{i}"))
    assert chain_depth(vm(svc).nodes, vm(svc).current) == 10  # within the default of 16
    svc.handle(c.SetVM("web", max_chain_depth=4))
    agg = vm(svc)
    assert chain_depth(agg.nodes, agg.current) <= 4
    assert not any(n.flatten == MergeState.RUNNING for n in agg.nodes.values())
    version = agg.version
    with pytest.raises(InvalidArgument, match="max_chain_depth"):
        svc.handle(c.SetVM("web", max_chain_depth=1))
    assert vm(svc).version == version


def test_the_tree_says_when_the_next_flatten_comes_and_what_it_copies(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, _ = world
    linear_history(svc, images, 2)
    images.write(layer(svc), 9, "x")
    current = next(n for n in tree_json(vm(svc), images.allocated_bytes)["nodes"] if n["kind"] == "current")
    assert (current["chain_depth"], current["max_chain_depth"]) == (2, 4)
    assert current["next_flatten"]["after_takes"] == 3
    # Three takes from now the newest snapshot skips the layers above the own disk: s2's and
    # the current one's, so far (a block each).
    assert current["next_flatten"]["depths"] == [2, 1]
    assert current["next_flatten"]["bytes"] == 2 * 64 * 1024
    doc = svc.handle(c.GetTree("web")).json()  # the same through the view (it measures real files)
    seen = next(n for n in doc["nodes"] if n["kind"] == "current")["next_flatten"]
    assert seen["after_takes"] == 3 and seen["depths"] == current["next_flatten"]["depths"]
