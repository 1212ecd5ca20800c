"""The VM definition (issue 11): every option parsed and checked before anything is recorded,
the accelerator choice, and the QEMU command line it becomes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from adapters.machines import machine_config
from adapters.qemu.hardware import resolve_accel
from adapters.qemu.machine import QemuMachine
from adapters.qemu.qcow2 import ChainImage
from domain import commands as c
from domain.definition import parse_disk, parse_nic
from domain.errors import InvalidArgument, Refused
from service.api import Service
from service.bootstrap import open_service


def test_auto_picks_kvm_only_where_it_works_and_the_environment_overrides() -> None:
    assert resolve_accel("auto", {}, kvm=True) == "kvm"
    assert resolve_accel("auto", {}, kvm=False) == "tcg"
    assert resolve_accel("kvm", {}, kvm=False) == "kvm"  # asked for explicitly: QEMU says why not
    assert resolve_accel("auto", {"SNAPTREE_ACCEL": "tcg"}, kvm=True) == "tcg"
    assert resolve_accel("tcg", {"SNAPTREE_ACCEL": "auto"}, kvm=True) == "kvm"
    assert resolve_accel("auto", {}, kvm=None) in ("kvm", "tcg")  # probes /dev/kvm


def test_disk_and_nic_specs() -> None:
    assert parse_disk("data=/x.qcow2,bus=scsi,cache=none,discard=unmap", 0)[2].bus == "scsi"
    assert parse_disk("/a,,b.qcow2", 1)[:2] == ("disk1", "/a,b.qcow2")
    nic = parse_nic("user,hostfwd=tcp::2222-:22")
    assert nic.hostfwd == ("tcp:127.0.0.1:2222-:22",)  # never on every interface
    for bad in ("user,hostfwd=tcp:0.0.0.0:1-:2", "wifi", "tap", "user,mac=01:00:00:00:00:01",
                "user,mac=52:54:00:zz:00:01", "user,speed=1", "bridge=br 0"):
        with pytest.raises(InvalidArgument):
            parse_nic(bad)
    for bad in ("/x,bus=usb", "/x,cache=fast", "/x,discard=yes", "/x,bus=ide,bus=ide", "/x,colour=red"):
        with pytest.raises(InvalidArgument):
            parse_disk(bad, 0)


@pytest.fixture
def svc(tmp_path: Path) -> Service:
    return open_service(str(tmp_path / "home"), "h", environ={})


def own(tmp_path: Path) -> str:
    import subprocess

    path = tmp_path / "own.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return str(path)


def test_bad_options_are_refused_and_record_nothing(svc: Service, tmp_path: Path) -> None:
    disk = own(tmp_path)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = [
        dict(kernel=str(tmp_path / "missing")),
        dict(initrd=str(tmp_path / "own.qcow2")),  # an initrd without a kernel
        dict(cdrom=str(tmp_path / "no.iso")),
        dict(nic=(f"user,hostfwd=tcp:127.0.0.1:{port}-:80",)),
        dict(nic=("tap=nosuchtap0",)),
        dict(nic=("user,mac=nonsense",)),
        dict(qemu_arg=("-qmp", "tcp::4444")),
        dict(qemu_arg=("-drive", "file=/etc/passwd")),
        dict(machine="pc; rm -rf /"),
    ]
    for extra in cases:
        with pytest.raises(Refused):
            svc.handle(c.CreateVM("web", disk=(disk + ",bus=virtio",), **extra))  # type: ignore[arg-type]
        assert svc.app.find_vm("web") is None, extra
    busy.close()
    with pytest.raises(Refused, match="bus"):
        svc.handle(c.CreateVM("web", disk=(disk + ",bus=floppy",)))
    assert svc.app.find_vm("web") is None


def test_the_definition_is_shown_kept_by_snapshots_and_a_nic_keeps_its_mac(svc: Service, tmp_path: Path) -> None:
    disk = own(tmp_path)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"i")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    svc.handle(c.CreateVM("web", disk=(f"root={disk},bus=scsi,discard=unmap",), kernel=str(kernel),
                          initrd=str(initrd), append="console=ttyS0", nic=(f"user,hostfwd=tcp::{port}-:80",),
                          qemu_arg=("-device", "virtio-rng-pci")))
    shown = svc.handle(c.GetVMDefinition("web")).json()
    assert shown["disks"]["root"] == {"path": disk, "bus": "scsi", "cache": None, "discard": "unmap"}
    assert shown["kernel"] == str(kernel) and shown["initrd"] == str(initrd) and shown["append"] == "console=ttyS0"
    assert shown["qemu_args"] == ["-device", "virtio-rng-pci"] and shown["accel"] == "auto"
    mac = shown["nics"][0]["mac"]
    assert mac.startswith("52:54:00:")
    svc.handle(c.TakeSnapshot("web", "s1"))
    svc.handle(c.SetVM("web", memory=512, nic=("user",), append=""))
    now = svc.handle(c.GetVMDefinition("web")).json()
    assert now["nics"][0]["mac"] == mac and now["append"] is None and now["memory_mib"] == 512
    vm = svc.app.get_vm("web")
    assert vm.resolve_snapshot("s1").config["memory_mib"] == 256  # the snapshot's copy
    version = vm.version
    with pytest.raises(Refused):
        svc.handle(c.SetVM("web", initrd=str(initrd), kernel=""))  # an initrd needs a kernel
    assert svc.app.get_vm("web").version == version


def test_the_command_line_carries_the_whole_definition(tmp_path: Path) -> None:
    config = machine_config({
        "memory_mib": 512, "cpus": 2, "accel": "tcg", "cpu": "qemu64", "kernel": "/k", "initrd": "/i",
        "append": "console=ttyS0 root=/dev/vda", "cdrom": "/cd.iso", "display": "vnc",
        "disk_options": {"a": {"bus": "scsi"}, "b": {"bus": "nvme", "cache": "none"}},
        "nics": [{"mode": "user", "target": None, "hostfwd": ["tcp:127.0.0.1:8080-:80"], "mac": "52:54:00:01:02:03"}],
        "qemu_args": ["-device", "virtio-rng-pci"], "firmware": "uefi",
    }, nvram=str(tmp_path / "nvram.fd"))
    m = QemuMachine(tmp_path / "run", config, {"a": "/a.qcow2", "b": "/b.qcow2"})
    chains = {d: [ChainImage(p, "qcow2", 1 << 20, None)] for d, p in m.disks.items()}
    argv = " ".join(m.command_line(chains))
    for part in ("-accel tcg", "-cpu qemu64", "-kernel /k", "-initrd /i", "-append console=ttyS0 root=/dev/vda",
                 "virtio-scsi-pci,id=scsi0", "scsi-hd,id=a", "nvme,id=b", '"direct":true', "ide-cd,id=cdrom",
                 "hostfwd=tcp:127.0.0.1:8080-:80", "mac=52:54:00:01:02:03", "-vnc 127.0.0.1:0,to=99",
                 "console.sock", "logfile=", "-serial chardev:console", "pflash0=ovmf-code,pflash1=ovmf-vars",
                 "-device virtio-rng-pci"):
        assert part in argv, part
