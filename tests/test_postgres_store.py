"""The same tree on the real PostgreSQL server (scale-out store), selected by environment."""

from __future__ import annotations

from pathlib import Path

from adapters.config import open_app
from domain import commands as c
from service.api import Service
from domain.vm import VirtualMachine
from tests.disk_harness import PatternVM


def test_postgres_store_runs_the_rules_on_real_files(pg_service: Service, tmp_path: Path) -> None:
    pv = PatternVM.create(pg_service, tmp_path)
    pv.take("A")
    pv.take("B")
    pv.apply("A")
    pv.take("C")
    pv.delete("A")  # 2 dependents: hidden
    pv.check()
    pv.delete("B")  # A drops to 1: merges into C
    assert pv.hidden() == []
    pv.check()


def test_postgres_store_keeps_history_and_snapshots(pg_service: Service, tmp_path: Path) -> None:
    pv = PatternVM.create(pg_service, tmp_path, ndisks=1)
    for i in range(110):  # past the aggregate snapshot interval
        pg_service.handle(c.TakeSnapshot(pv.name, f"s{i}"), wait=False)
    # A second application on the same store (another process, another host) sees it all.
    other = open_app(pg_service.data)
    vm = other.get_vm(pv.name)
    assert isinstance(vm, VirtualMachine)
    assert sum(1 for n in vm.nodes.values() if n.name) == 110
    assert other.snapshots is not None
    assert list(other.snapshots.get(vm.id, desc=True, limit=1))  # an aggregate snapshot exists
    assert other.vm_names() == [pv.name]
    first = other.get_vm_at(pv.name, 1)
    assert len(first.nodes) == 1


def test_tree_reads_no_embedded_file_when_the_store_is_postgres(tmp_path: Path) -> None:
    """`tree`'s quick read is for the embedded store only; with PostgreSQL it takes the full path
    (a KeyError here once made `snaptree tree` fail in scale-out mode)."""
    from adapters.config import embedded_db
    from adapters.storage import DataDir

    data = DataDir.open(tmp_path / "home")
    assert embedded_db(data, {"PERSISTENCE_MODULE": "eventsourcing.postgres"}) is None
    assert embedded_db(data, {}) == str(data.event_db)
