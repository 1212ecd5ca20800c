"""The VM definition on real QEMU (issue 11): disks on every bus, a CD-ROM, VNC and an extra QEMU
argument, through a live take with memory and an apply. The bare-metal test guest, TCG."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from adapters.qemu import qemu_img
from domain import commands as c
from domain.definition import Accel, Display
from domain.memory import MemoryState
from service.api import Service
from tests.guest import build as guest_build
from tests.guest import probe


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(guest_build.build_guest(tmp_path_factory.mktemp("guest")))


def qmp(svc: Service, vm: str, command: str) -> Any:
    async def go() -> Any:
        async with probe.attached(svc.data, svc.app.get_vm(vm)) as m:
            return await m.qmp.execute(command)

    return asyncio.run(go())


def disks(tmp_path: Path, *specs: str) -> tuple[str, ...]:
    out = []
    for spec in specs:
        name, _, opts = spec.partition(",")
        path = tmp_path / f"{name}.qcow2"
        qemu_img.create_image(str(path), 16 << 20)
        out.append(f"{name}={path}" + (f",{opts}" if opts else ""))
    return tuple(out)


def test_scsi_ide_cdrom_vnc_through_a_live_take_and_an_apply(svc: Service, tmp_path: Path, kernel: str) -> None:
    iso = tmp_path / "cd.iso"
    iso.write_bytes(b"\0" * (1 << 20))
    svc.handle(c.CreateVM("b", disk=disks(tmp_path, "s,bus=scsi,cache=none,discard=unmap", "i,bus=ide", "v"),
                          memory=64, kernel=kernel, accel=Accel.TCG, cdrom=str(iso), display=Display.VNC,
                          qemu_arg=("-device", "virtio-rng-pci,id=rng0")))
    svc.handle(c.StartVM("b"))
    blocks = {b.get("qdev"): b for b in qmp(svc, "b", "query-block")}
    cd = blocks["cdrom"]["inserted"]
    assert cd["ro"] and cd["file"] == str(iso)
    vnc = qmp(svc, "b", "query-vnc")
    assert vnc["enabled"] and vnc["host"] == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", int(vnc["service"])), timeout=5) as s:
        assert s.recv(12).startswith(b"RFB ")  # a VNC server answers
    snap = svc.handle(c.TakeSnapshot("b", "t1")).node  # type: ignore[attr-defined]
    assert snap.memory.state is MemoryState.SAVED
    import hashlib  # the digest hashed while QEMU wrote the file is the file's
    assert snap.memory.sha256 == hashlib.sha256(Path(snap.memory.path).read_bytes()).hexdigest()
    assert set(snap.layers) == {"s", "i", "v"}  # the CD-ROM is never snapshotted
    svc.handle(c.ApplySnapshot("b", "t1"))
    assert svc.handle(c.GetVMStatus("b")).json()["state"] == "running"
    assert "rng0" in str(qmp(svc, "b", "query-pci"))  # the extra argument made it


def test_an_nvme_disk_gives_disk_only_live_snapshots_with_the_reason(svc: Service, tmp_path: Path, kernel: str) -> None:
    svc.handle(c.CreateVM("n", disk=disks(tmp_path, "n,bus=nvme"), memory=64, kernel=kernel, accel=Accel.TCG))
    svc.handle(c.StartVM("n"))
    snap = svc.handle(c.TakeSnapshot("n", "t1")).node  # type: ignore[attr-defined]
    assert snap.memory.state is MemoryState.FAILED
    assert "non-migratable device" in (snap.memory.error or "")  # QEMU 7.2's NVMe controller
    assert snap.ready and svc.app.get_vm("n").nodes[svc.app.get_vm("n").current].ready


def test_vm_console_attaches_and_ctrl_bracket_detaches(tmp_path: Path) -> None:
    """`vm console VM` relays the serial console both ways; Ctrl-] detaches, the guest runs on."""
    import os
    import subprocess
    import sys
    import time

    from tests.guest.linux.build import build_linux_guest, default_cache_dir
    from tests.guest.linux.disk import make_data_disk

    guest = build_linux_guest(os.environ.get("SNAPTREE_LINUX_GUEST_CACHE", default_cache_dir()))
    disk = make_data_disk(tmp_path / "data.qcow2")
    env = dict(os.environ, SNAPTREE_HOME=str(tmp_path / "home"))
    cli = [sys.executable, "-m", "adapters.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=120)

    assert run("vm", "create", "con", "--accel", "tcg", "--disk", f"data={disk}", "--kernel", str(guest.kernel),
               "--initrd", str(guest.initrd), "--append", guest.append(50)).returncode == 0
    assert run("vm", "start", "con").returncode == 0
    try:
        log = tmp_path / "home" / "vms" / "con" / "run" / "console.log"
        deadline = time.monotonic() + 120
        while b"SNAPTREE-LINE" not in (log.read_bytes() if log.exists() else b""):
            assert time.monotonic() < deadline, "the guest never wrote its console"
            time.sleep(0.5)
        attach = subprocess.Popen([*cli, "vm", "console", "con"], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(2)  # lines keep coming on the console while attached
        assert attach.stdin is not None
        attach.stdin.write(b"\x1d")  # Ctrl-]
        attach.stdin.flush()
        out, err = attach.communicate(timeout=20)
        assert attach.returncode == 0, err
        assert b"SNAPTREE-LINE" in out and b"Ctrl-] detaches" in err
        assert run("vm", "status", "con").stdout.split("\t")[1] == "running"  # detaching left it running
        shown = run("vm", "console", "con", "--log")
        assert shown.returncode == 0 and "SNAPTREE-GUEST boot_id=" in shown.stdout
    finally:
        run("vm", "stop", "con")
