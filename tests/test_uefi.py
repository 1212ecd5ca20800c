"""UEFI VMs (issue 11): the Linux test guest booted through OVMF, its NVRAM part of the VM's
state — a snapshot freezes a copy with the disks, an apply puts that copy back, a deleted
snapshot's copy goes with it. Real QEMU, TCG."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from domain import commands as c
from domain.definition import Accel, Firmware
from service.api import Service
from service.verify import verify
from tests.guest.linux.build import LinuxGuest, build_linux_guest, default_cache_dir
from tests.guest.linux.check import console_lines
from tests.guest.linux.disk import make_data_disk

BOOT_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def guest() -> LinuxGuest:
    return build_linux_guest(os.environ.get("SNAPTREE_LINUX_GUEST_CACHE", default_cache_dir()))


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def wait_lines(log: Path, more_than: int) -> int:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if log.exists() and (lines := console_lines(log)) and lines[-1] > more_than:
            return lines[-1]
        time.sleep(0.5)
    raise AssertionError(f"no console line after {more_than} in {BOOT_TIMEOUT} s: {log}")


def test_uefi_guest_snapshot_and_apply_restore_its_nvram(svc: Service, guest: LinuxGuest, tmp_path: Path) -> None:
    disk = make_data_disk(tmp_path / "data.qcow2")
    svc.handle(c.CreateVM("u", disk=(f"data={disk}",), memory=256, accel=Accel.TCG, firmware=Firmware.UEFI,
                          kernel=str(guest.kernel), initrd=str(guest.initrd), append=guest.append(50)))
    svc.handle(c.StartVM("u"))
    log = svc.data.vm_dir("u") / "run" / "console.log"
    live_nvram = svc.data.nvram_path("u", None)
    first = wait_lines(log, 0)
    svc.handle(c.TakeSnapshot("u", "s1"))
    s1 = svc.app.get_vm("u").resolve_snapshot("s1")
    assert s1.nvram is not None and sha(s1.nvram) == sha(live_nvram)
    frozen = sha(s1.nvram)
    svc.handle(c.StopVM("u"))
    with open(live_nvram, "r+b") as f:  # the variable store changes after the snapshot
        f.seek(-16, os.SEEK_END)
        f.write(b"changed-nvram!!!")
    assert sha(live_nvram) != frozen
    svc.handle(c.ApplySnapshot("u", "s1"))  # restores memory and the variable store
    assert sha(live_nvram) == frozen
    assert svc.handle(c.GetVMStatus("u")).json()["state"] == "running"
    wait_lines(log, first)  # the restored guest keeps writing its console
    svc.handle(c.TakeSnapshot("u", "s2", memory=False))
    s2 = svc.app.get_vm("u").resolve_snapshot("s2")
    assert s2.nvram is not None and os.path.exists(s2.nvram)
    svc.handle(c.ApplySnapshot("u", "s1"))
    svc.handle(c.DeleteSnapshot("u", "s2"))
    assert not os.path.exists(s2.nvram)  # it went with its snapshot
    assert verify(svc.app, svc.data, "u").clean
