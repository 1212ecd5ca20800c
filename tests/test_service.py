"""The service layer on in-memory ports (tests/fakes.py): handlers, the worker's step order, its
error and crash-resume paths, and what one command costs. Milliseconds each; the same scenarios
on real qemu-img and QEMU are in test_disk_scenarios.py, test_live_tree.py and the fault suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.config import open_app
from adapters.storage import DataDir
from domain import commands as c
from domain.errors import Conflict, InvalidDisk, Refused, RequestIdReused, UnknownSnapshot, WrongHost
from domain.lifecycle import RunState
from domain.memory import MemoryState
from domain.requests import Execution
from domain.tree import MergeState, NodeKind
from domain.work import pending_work
from service.api import Service
from service.worker import WorkFailed
from adapters.qemu.errors import LiveError
from tests.fakes import Crash, FakeImages, FakeMachines

HOST = "h1"


@pytest.fixture
def world(tmp_path: Path) -> tuple[Service, FakeImages, FakeMachines]:
    data = DataDir.open(tmp_path / "home")
    images = FakeImages()
    machines = FakeMachines(images)
    svc = Service(data, open_app(data, environ={}), HOST, images, machines)
    images.make(str(tmp_path / "own.qcow2"), {0: "base"})
    return svc, images, machines


def own(svc: Service) -> str:
    return str(svc.data.root.parent / "own.qcow2")


def current_layer(svc: Service, vm: str = "web") -> str:
    agg = svc.app.get_vm(vm)
    return agg.nodes[agg.current].layers["disk0"]


def create(svc: Service) -> None:
    svc.handle(c.CreateVM("web", disk=(own(svc),)))


def test_a_take_of_a_stopped_vm_records_that_there_was_no_memory_to_save(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, machines = world
    create(svc)
    result = svc.handle(c.TakeSnapshot("web", "s1"))  # memory asked for, the VM does not run
    snap = result.node  # type: ignore[attr-defined]
    assert snap.memory is not None and snap.memory.state is MemoryState.NONE
    assert "not running" in (snap.memory.note or "")
    assert result.json()["memory"]["state"] == "none"
    assert images.backing_file(current_layer(svc)) == own(svc)


def test_queued_takes_of_a_stopped_vm_are_done_as_one_batch_in_one_commit(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, machines = world
    create(svc)
    for i in range(12):
        svc.handle(c.TakeSnapshot("web", f"s{i}"), wait=False)
    saves, real_save = [], svc.app.save
    svc.app.save = lambda *objs, **kw: saves.append(objs) or real_save(*objs, **kw)  # type: ignore[method-assign]
    vm = svc.settle("web")
    assert not pending_work(vm)
    assert images.calls.get("create_overlays", 0) >= 1
    assert len(saves) == 1  # the twelve takes' reports share one save
    for node in vm.nodes.values():  # every layer is on its parent's, the chain stays bounded
        if node.parent is not None:
            parent = vm.nodes[node.parent]
            base = vm.nodes[node.flatten_base] if node.flatten_base is not None else parent
            assert images.backing_file(node.layers["disk0"]) in (parent.layers["disk0"], base.layers["disk0"])
        assert node.memory is None or node.memory.state is MemoryState.NONE


def test_a_take_of_a_running_vm_saves_memory_with_one_load_one_connection_one_probe(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, machines = world
    create(svc)
    svc.handle(c.StartVM("web"))
    assert svc.app.get_vm("web").run.state is RunState.RUNNING
    loads, attaches, probes = svc.app.loads, machines.attaches, machines.probes
    result = svc.handle(c.TakeSnapshot("web", "live"))
    assert (svc.app.loads - loads, machines.attaches - attaches, machines.probes - probes) == (1, 1, 1)
    mem = result.node.memory  # type: ignore[attr-defined]
    assert mem.state is MemoryState.SAVED and mem.pause_ms == 5.0 and mem.sha256 == "0" * 64
    assert machines.running["web"].disks["disk0"] == current_layer(svc)  # it writes the new overlay


def test_the_queue_and_the_cli_take_are_the_same_command(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, machines = world
    create(svc)
    svc.handle(c.StartVM("web"))
    (out,) = svc.handle_queued("web", [("r1", c.TakeSnapshot("web", "q1"))])
    assert isinstance(out, Execution) and out.events
    vm = svc.settle("web")  # what the host's stream worker does
    assert vm.resolve_snapshot("q1").memory.state is MemoryState.SAVED  # type: ignore[union-attr]


def test_a_request_id_takes_effect_once_and_cannot_be_reused_for_another_command(world) -> None:  # type: ignore[no-untyped-def]
    svc, _, _ = world
    create(svc)
    first, again = svc.handle_queued("web", [("r1", c.TakeSnapshot("web", "a")), ("r1", c.TakeSnapshot("web", "a"))])
    assert isinstance(first, Execution) and first.events
    assert isinstance(again, Execution) and again.duplicate
    (later,) = svc.handle_queued("web", [("r1", c.TakeSnapshot("web", "a"))])
    assert isinstance(later, Execution) and later.duplicate and later.events == []
    (other,) = svc.handle_queued("web", [("r1", c.DeleteSnapshot("web", "a"))])
    assert isinstance(other, RequestIdReused)
    assert svc.app.get_vm("web").resolve_snapshot("a")


def test_apply_restores_saved_memory_and_delete_merges_the_data_online(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, machines = world
    create(svc)
    svc.handle(c.StartVM("web"))
    images.write(current_layer(svc), 1, "before")
    svc.handle(c.TakeSnapshot("web", "s1"))
    images.write(current_layer(svc), 2, "after")
    svc.handle(c.ApplySnapshot("web", "s1"))
    assert len(machines.restores) == 1
    images.write(current_layer(svc), 3, "new")
    svc.handle(c.DeleteSnapshot("web", "s1"))  # one dependent: the running current state
    vm = svc.app.get_vm("web")
    assert [n.kind for n in vm.nodes.values()] == [NodeKind.CURRENT]
    assert images.read(current_layer(svc)) == {0: "base", 1: "before", 3: "new"}
    assert machines.running["web"].disks["disk0"] == current_layer(svc)


def test_start_is_refused_on_another_host_and_when_running(world) -> None:  # type: ignore[no-untyped-def]
    svc, _, _ = world
    svc.handle(c.CreateVM("web", disk=(own(svc),), host="elsewhere"))
    with pytest.raises(WrongHost):
        svc.handle(c.StartVM("web"))
    assert svc.app.get_vm("web").run_request is None  # nothing recorded


def test_adopting_a_file_another_vm_reads_or_writes_is_refused(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    svc, images, _ = world
    base = images.make(str(tmp_path / "base.qcow2"), {0: "gold"})
    a = images.make(str(tmp_path / "a.qcow2"), backing=base)
    b = images.make(str(tmp_path / "b.qcow2"), backing=base)
    svc.handle(c.CreateVM("a", disk=(a,)))
    with pytest.raises(InvalidDisk, match="backing chain of VM 'a'"):
        svc.handle(c.CreateVM("b", disk=(base,)))  # b would write what a reads
    svc.handle(c.CreateVM("b", disk=(b,)))  # a shared base neither writes is fine
    svc.handle(c.TakeSnapshot("a", "a1"))
    layer = current_layer(svc, "a")
    images.make(str(tmp_path / "c.qcow2"), backing=layer)
    with pytest.raises(InvalidDisk, match="lies inside the data directory"):
        svc.handle(c.CreateVM("c", disk=(str(tmp_path / "c.qcow2"),)))


def test_a_failed_merge_is_recorded_and_a_retry_completes_it(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, _ = world
    create(svc)
    svc.handle(c.TakeSnapshot("web", "s1"))
    images.write(current_layer(svc), 1, "x")
    svc.handle(c.TakeSnapshot("web", "s2"))
    images.fail["commit"] = images.calls.get("commit", 0) + 1
    with pytest.raises(WorkFailed, match="injected failure"):
        svc.handle(c.DeleteSnapshot("web", "s2"))
    hidden = next(n for n in svc.app.get_vm("web").nodes.values() if n.kind is NodeKind.HIDDEN)
    assert hidden.merge_state is MergeState.FAILED
    svc.handle(c.MergeNode("web", str(hidden.id)))
    assert hidden.id not in svc.app.get_vm("web").nodes
    assert images.read(current_layer(svc)) == {0: "base", 1: "x"}


def test_a_worker_killed_mid_merge_resumes_the_recorded_plan(world) -> None:  # type: ignore[no-untyped-def]
    svc, images, _ = world
    create(svc)
    svc.handle(c.TakeSnapshot("web", "s1"))
    images.write(current_layer(svc), 1, "x")
    svc.handle(c.TakeSnapshot("web", "s2"))
    images.crash["commit"] = images.calls.get("commit", 0) + 1
    with pytest.raises(Crash):
        svc.handle(c.DeleteSnapshot("web", "s2"))
    vm = svc.app.get_vm("web")
    assert vm.running_merge() is not None  # the plan was recorded before the kill
    repairs = images.calls.get("repair_leaks", 0)
    svc.settle("web")  # a fresh drain resumes it
    assert images.calls.get("repair_leaks", 0) == repairs + 1
    assert not pending_work(svc.app.get_vm("web"))
    assert images.read(current_layer(svc)) == {0: "base", 1: "x"}


def test_unknown_snapshot_and_conflicts_record_nothing(world) -> None:  # type: ignore[no-untyped-def]
    svc, _, _ = world
    create(svc)
    version = svc.app.get_vm("web").version
    with pytest.raises(UnknownSnapshot):
        svc.handle(c.DeleteSnapshot("web", "nope"))
    svc.handle(c.StartVM("web"))
    svc.handle(c.TakeSnapshot("web", "s1"), wait=False)
    with pytest.raises(Conflict, match="still being taken"):
        svc.handle(c.ApplySnapshot("web", "s1"), wait=False)
    assert svc.app.get_vm("web").version == version + 3  # start asked, started, taken


# --- quiesce (issue 12) on the fakes: the real guest agent is in test_agent.py ---


def running_with_agent(svc: Service, machines: FakeMachines, agent: str = "connected") -> None:
    create(svc)
    svc.handle(c.StartVM("web"))
    machines.running["web"].agent = agent


def test_a_take_freezes_around_the_pause_and_records_it(world) -> None:  # type: ignore[no-untyped-def]
    svc, _, machines = world
    running_with_agent(svc, machines)
    snap = svc.handle(c.TakeSnapshot("web", "q")).node  # type: ignore[attr-defined]
    live = machines.running["web"]
    assert snap.quiesce.state.value == "frozen" and snap.quiesce.filesystems == 2
    assert live.freezes == 1 and not live.frozen
    assert tree_node(svc, "q")["quiesce"]["state"] == "frozen"
    off = svc.handle(c.TakeSnapshot("web", "o", quiesce=c.Quiesce.OFF)).node  # type: ignore[attr-defined]
    assert off.quiesce.state.value == "off" and live.freezes == 1


def test_quiesce_on_without_an_agent_is_refused_and_auto_goes_on_crash_consistent(world) -> None:  # type: ignore[no-untyped-def]
    svc, _, machines = world
    running_with_agent(svc, machines, agent="absent")
    version = svc.app.get_vm("web").version
    with pytest.raises(Refused, match="guest agent"):
        svc.handle(c.TakeSnapshot("web", "x", quiesce=c.Quiesce.ON))
    assert svc.app.get_vm("web").version == version  # nothing recorded
    snap = svc.handle(c.TakeSnapshot("web", "a")).node  # type: ignore[attr-defined]
    assert snap.quiesce.state.value == "unavailable"


def test_a_hung_freeze_is_timed_out_recorded_and_thawed(world) -> None:  # type: ignore[no-untyped-def]
    svc, _, machines = world
    running_with_agent(svc, machines)
    machines.running["web"].hang_freeze = True
    snap = svc.handle(c.TakeSnapshot("web", "h")).node  # type: ignore[attr-defined]
    assert snap.quiesce.state.value == "failed" and "no answer" in (snap.quiesce.reason or "")
    assert not machines.running["web"].frozen  # thawed even though the freeze never answered
    assert snap.memory.state is MemoryState.SAVED  # the snapshot is still taken, crash-consistent


def test_a_worker_killed_between_freeze_and_thaw_leaves_the_next_one_to_thaw(world) -> None:  # type: ignore[no-untyped-def]
    svc, _, machines = world
    running_with_agent(svc, machines)
    live = machines.running["web"]
    real_switch, real_thaw = live.switch, live.thaw

    def killed(*a, **k):  # type: ignore[no-untyped-def]
        raise Crash()  # kill -9: not even the `finally` that thaws runs to its end

    live.switch = live.thaw = killed  # type: ignore[method-assign]
    with pytest.raises(Crash):
        svc.handle(c.TakeSnapshot("web", "k"))
    assert live.frozen  # what a kill -9 leaves
    live.switch, live.thaw = real_switch, real_thaw  # type: ignore[method-assign]
    svc.settle("web")  # the next worker thaws before anything else, then finishes the take
    assert not live.frozen


def test_an_apply_thaws_a_quiesced_guest_and_sets_its_clock(world) -> None:  # type: ignore[no-untyped-def]
    svc, _, machines = world
    running_with_agent(svc, machines)
    svc.handle(c.TakeSnapshot("web", "q"))
    machines.restore_agent, machines.restore_frozen = "connected", True
    svc.handle(c.ApplySnapshot("web", "q"))
    vm = svc.app.get_vm("web")
    assert vm.nodes[vm.current].clock == "resynced"
    assert machines.running["web"].time_set == 1 and not machines.running["web"].frozen
    machines.restore_agent = "absent"
    svc.handle(c.ApplySnapshot("web", "q"))
    vm = svc.app.get_vm("web")
    assert vm.nodes[vm.current].clock == "not resynced: guest agent absent"


def tree_node(svc: Service, name: str) -> dict:  # type: ignore[type-arg]
    return next(n for n in svc.handle(c.GetTree("web")).json()["nodes"] if n["name"] == name)  # type: ignore[no-any-return]


def test_a_thaw_that_fails_is_said_and_a_paused_restore_is_thawed_when_started(world) -> None:  # type: ignore[no-untyped-def]
    svc, _, machines = world
    running_with_agent(svc, machines)
    live = machines.running["web"]
    live.hang_freeze = True
    real_thaw = live.thaw

    def stuck(timeout: float = 10.0) -> int:
        raise LiveError("guest-fsfreeze-thaw: no answer")

    live.thaw = stuck  # type: ignore[method-assign]
    snap = svc.handle(c.TakeSnapshot("web", "h")).node  # type: ignore[attr-defined]
    assert "THE THAW FAILED" in (snap.quiesce.reason or "") and live.frozen
    live.thaw, live.hang_freeze = real_thaw, False  # type: ignore[method-assign]
    svc.worker().drain("web")  # idle, but the marker says a guest may be frozen
    assert not live.frozen
    svc.handle(c.TakeSnapshot("web", "q"))
    machines.restore_agent, machines.restore_frozen = "connected", True
    svc.handle(c.ApplySnapshot("web", "q", paused=True))
    restored = machines.running["web"]
    assert restored.paused and restored.frozen
    svc.handle(c.StartVM("web"))  # resumes it, thaws it, sets its clock
    assert not restored.paused and not restored.frozen and restored.time_set == 1


def test_someone_elses_freeze_is_left_alone(world) -> None:  # type: ignore[no-untyped-def]
    svc, _, machines = world
    running_with_agent(svc, machines)
    machines.running["web"].frozen = True  # a backup tool froze it
    snap = svc.handle(c.TakeSnapshot("web", "b")).node  # type: ignore[attr-defined]
    assert snap.quiesce.state.value == "failed" and "another client" in (snap.quiesce.reason or "")
    assert machines.running["web"].frozen
