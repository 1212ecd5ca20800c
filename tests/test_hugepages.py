"""Hugepage-backed guest RAM (`vm create --hugepages`, issue 13): the definition's checks on fakes
and host readings, and on real QEMU a live take with memory, a restore, and a state saved on huge
pages restoring on ordinary ones. Real QEMU tests reserve the host's huge pages themselves (root)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Iterator

import pytest

from adapters.qemu import hugepages, migration, qemu_img
from adapters.qemu.errors import MachineError
from adapters.qemu.hardware import MachineConfig
from adapters.qemu.machine import QemuMachine
from domain import commands as c
from domain.definition import Accel
from domain.errors import InvalidArgument
from domain.memory import MemoryState
from service.api import Service
from tests.guest import build as guest_build
from tests.guest import probe

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def fake_pool(monkeypatch: pytest.MonkeyPatch, total: int, free: int) -> None:
    monkeypatch.setattr(hugepages, "pool", lambda meminfo=None: hugepages.Pool(total, free, 2048))


def disk(tmp_path: Path, name: str = "d") -> tuple[str, ...]:
    path = tmp_path / f"{name}.qcow2"
    qemu_img.create_image(str(path), 16 << 20)
    return (f"{name}={path}",)


# --- the definition's rules and host checks ---


def test_a_host_without_enough_reserved_huge_pages_refuses_the_vm_and_records_nothing(
        service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pool(monkeypatch, total=64, free=64)  # 128 MiB reserved
    with pytest.raises(InvalidArgument, match=r"reserves 128 MiB.*sysctl vm\.nr_hugepages"):
        service.handle(c.CreateVM("h", disk=disk(tmp_path), memory=256, hugepages=True))
    assert service.handle(c.ListVMs()).json() == []


def test_hugepage_memory_comes_in_whole_2_mib_pages(service: Service, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pool(monkeypatch, total=1024, free=1024)
    with pytest.raises(InvalidArgument, match="multiple of 2 MiB"):
        service.handle(c.CreateVM("h", disk=disk(tmp_path), memory=255, hugepages=True))


def test_vm_set_turns_hugepages_on_and_off_and_checks_a_new_memory_size(
        service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pool(monkeypatch, total=256, free=256)  # 512 MiB reserved
    service.handle(c.CreateVM("h", disk=disk(tmp_path), memory=256))
    assert service.handle(c.GetVMDefinition("h")).json()["hugepages"] is False
    service.handle(c.SetVM("h", hugepages=True))
    assert service.handle(c.GetVMDefinition("h")).json()["hugepages"] is True
    with pytest.raises(InvalidArgument, match="reserves 512 MiB"):
        service.handle(c.SetVM("h", memory=1024))
    assert service.handle(c.GetVMDefinition("h")).json()["memory_mib"] == 256
    service.handle(c.SetVM("h", hugepages=False))
    assert service.handle(c.GetVMDefinition("h")).json()["hugepages"] is False
    service.handle(c.SetVM("h", memory=1024))  # ordinary RAM: no pool needed


def test_starting_qemu_without_enough_free_huge_pages_says_what_to_do() -> None:
    with pytest.raises(MachineError, match=r"20 MiB of free huge pages.*128 free huge pages"):
        hugepages.check_free(256, hugepages.Pool(total=200, free=10, page_kib=2048))
    hugepages.check_free(256, hugepages.Pool(total=200, free=128, page_kib=2048))


def test_the_host_pool_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1 kB\nHugePages_Total:     700\nHugePages_Free:      572\n"
                       "Hugepagesize:       2048 kB\n")
    assert hugepages.pool(meminfo) == hugepages.Pool(700, 572, 2048)
    assert hugepages.pool(meminfo).free_mib == 1144


# --- real QEMU ---


@pytest.fixture(scope="module")
def reserved() -> Iterator[None]:
    """Enough free 2 MiB pages for two 128 MiB guests at once; the host's setting is put back."""
    before = int(NR_HUGEPAGES.read_text())
    need = 2 * 128 // hugepages.PAGE_MIB
    have = hugepages.pool()
    if have.free < need:
        NR_HUGEPAGES.write_text(str(have.total + need - have.free))  # root: fails loudly otherwise
        assert hugepages.pool().free >= need, f"the host could not reserve {need} huge pages"
    yield
    if int(NR_HUGEPAGES.read_text()) != before:
        NR_HUGEPAGES.write_text(str(before))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(guest_build.build_guest(tmp_path_factory.mktemp("guest")))


def ram_on_huge_pages(pid: int) -> bool:
    """Whether QEMU's guest RAM mapping is backed by 2 MiB pages (its smaps)."""
    size = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("KernelPageSize:") and size == 128 * 1024 and line.split()[1] == "2048":
            return True
    return False


def test_a_live_take_and_an_apply_on_hugepage_backed_ram(svc: Service, tmp_path: Path, kernel: str,
                                                        reserved: None) -> None:
    svc.handle(c.CreateVM("h", disk=disk(tmp_path), memory=128, kernel=kernel, accel=Accel.TCG,
                          hugepages=True))
    svc.handle(c.StartVM("h"))
    pid = svc.handle(c.GetVMStatus("h")).json()["pid"]
    assert ram_on_huge_pages(pid)
    snap = svc.handle(c.TakeSnapshot("h", "t1")).node  # type: ignore[attr-defined]
    assert snap.memory.state is MemoryState.SAVED and snap.memory.bytes > 0
    assert snap.config.get("hugepages") is True

    async def counter() -> int:
        async with probe.attached(svc.data, svc.app.get_vm("h")) as m:
            return await probe.read_counter(m)

    asyncio.run(asyncio.sleep(3))
    late = asyncio.run(counter())
    svc.handle(c.ApplySnapshot("h", "t1"))
    status = svc.handle(c.GetVMStatus("h")).json()
    assert status["state"] == "running" and ram_on_huge_pages(status["pid"])
    assert asyncio.run(counter()) < late  # the guest went back to the snapshot's moment


@pytest.fixture
def exactly_1_gib() -> Iterator[None]:
    """Exactly 512 free 2 MiB pages: one 1 GiB guest's worth and not a page more."""
    before = int(NR_HUGEPAGES.read_text())
    have = hugepages.pool()
    NR_HUGEPAGES.write_text(str(have.total - have.free + 512))
    try:
        assert hugepages.pool().free == 512, "the host could not reserve 512 huge pages"
        yield
    finally:
        NR_HUGEPAGES.write_text(str(before))


def test_an_apply_needs_no_more_huge_pages_than_the_vm_itself(svc: Service, tmp_path: Path, kernel: str,
                                                                exactly_1_gib: None) -> None:
    """The restored QEMU starts once the old one has let go of every page. A 1 GiB QEMU's other
    threads hold its RAM for ~0.3 s after its main thread has exited."""
    svc.handle(c.CreateVM("whole", disk=disk(tmp_path), memory=1024, kernel=kernel, accel=Accel.TCG,
                          hugepages=True))
    svc.handle(c.StartVM("whole"))
    svc.handle(c.TakeSnapshot("whole", "t1"))
    assert hugepages.pool().free == 0
    svc.handle(c.ApplySnapshot("whole", "t1"))
    assert svc.handle(c.GetVMStatus("whole")).json()["state"] == "running"
    svc.handle(c.StopVM("whole"))


def test_a_state_saved_on_huge_pages_restores_on_ordinary_ram_and_back(tmp_path: Path, kernel: str,
                                                                       reserved: None) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img.create_image(str(image), 16 << 20)

    async def go() -> None:
        state = tmp_path / "state"
        for saved_on, restored_on in ((True, False), (False, True)):
            m = QemuMachine(tmp_path / "run-src", MachineConfig(memory_mib=128, kernel=kernel,
                                                                hugepages=saved_on), {"a": str(image)})
            await m.start()
            try:
                while await probe.read_counter(m) == 0:
                    await asyncio.sleep(0.05)
                await m.qmp.execute("stop")
                await m.qmp.execute("migrate", {"uri": f"exec:cat > {state}"})
                await migration.wait_save(m)
                before = await probe.read_counter(m)
            finally:
                await m.stop()
            restored = await migration.restore(tmp_path / "run-dst", MachineConfig(
                memory_mib=128, kernel=kernel, hugepages=restored_on), {"a": str(image)}, str(state))
            try:
                assert await restored.query_status() == "running"
                assert await probe.read_counter(restored) >= before
            finally:
                await restored.stop()
            os.unlink(state)

    asyncio.run(go())
