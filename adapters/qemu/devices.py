"""The QEMU options of everything in a VM definition but its disks (adapters/qemu/blockdev.py):
firmware and boot, CD-ROM, NICs, the serial console, the display, and the user's extra
arguments. Fixed PCI addresses throughout: the device layout is part of the migration stream,
so a snapshot's memory restores into the same layout.

    run_dir/console.sock   the serial console (`snaptree vm console VM` attaches to it)
    run_dir/console.log    everything the guest wrote on it (appended)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from adapters.qemu import hugepages
from adapters.qemu.hardware import MachineConfig
from adapters.qemu.process import opt

CONSOLE_SOCKET = "console.sock"
CONSOLE_LOG = "console.log"
AGENT_SOCKET = "qga.sock"
AGENT_CHARDEV = "qga0"
AGENT_PORT = "org.qemu.guest_agent.0"
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS.fd"
NIC_SLOT = 0x18  # NIC i sits at 0x18 + i; disks at 0x10 + i (blockdev.py)


def firmware_args(c: MachineConfig) -> list[str]:
    if c.firmware != "uefi":
        return []
    assert c.nvram is not None, "a UEFI VM has an NVRAM file"
    code = {"driver": "raw", "read-only": True, "node-name": "ovmf-code",
            "file": {"driver": "file", "filename": OVMF_CODE, "read-only": True}}
    varstore = {"driver": "raw", "node-name": "ovmf-vars",
                "file": {"driver": "file", "filename": c.nvram}}
    return ["-blockdev", json.dumps(code), "-blockdev", json.dumps(varstore)]


def machine_option(c: MachineConfig) -> str:
    option = c.machine
    if c.firmware == "uefi":
        option += ",pflash0=ovmf-code,pflash1=ovmf-vars"
    if c.hugepages:
        option += f",memory-backend={hugepages.RAM_ID}"
    return option


def memory_args(c: MachineConfig) -> list[str]:
    return hugepages.qemu_args(c.memory_mib) if c.hugepages else []


def boot_args(c: MachineConfig) -> list[str]:
    args: list[str] = []
    if c.kernel:
        args += ["-kernel", c.kernel]
        if c.initrd:
            args += ["-initrd", c.initrd]
        if c.append:
            args += ["-append", c.append]
    if c.cpu:
        args += ["-cpu", c.cpu]
    return args


def cdrom_args(c: MachineConfig) -> list[str]:
    if not c.cdrom:
        return []
    node = {"driver": "raw", "read-only": True, "node-name": "cdrom",
            "file": {"driver": "file", "filename": os.path.abspath(c.cdrom), "read-only": True}}
    return ["-blockdev", json.dumps(node), "-device", "ide-cd,id=cdrom,drive=cdrom,bus=ide.1,unit=1"]


def nic_args(c: MachineConfig) -> list[str]:
    args: list[str] = []
    for i, nic in enumerate(c.nics):
        netdev = f"net{i}"
        if nic["mode"] == "user":
            spec = f"user,id={netdev}" + "".join(f",hostfwd={opt(f)}" for f in nic.get("hostfwd") or [])
        elif nic["mode"] == "tap":
            spec = f"tap,id={netdev},ifname={opt(nic['target'])},script=no,downscript=no"
        else:
            spec = f"bridge,id={netdev},br={opt(nic['target'])}"
        args += ["-netdev", spec,
                 "-device", f"virtio-net-pci,id={netdev}-dev,netdev={netdev},mac={nic['mac']},romfile=,"
                            f"addr={NIC_SLOT + i:#x}"]
    return args


def console_args(c: MachineConfig, run_dir: Path) -> list[str]:
    if not c.console:
        return []
    sock, log = run_dir / CONSOLE_SOCKET, run_dir / CONSOLE_LOG
    return ["-chardev", f"socket,id=console,path={opt(sock)},server=on,wait=off,"
                        f"logfile={opt(log)},logappend=on",
            "-serial", "chardev:console"]


def agent_args(c: MachineConfig, run_dir: Path) -> list[str]:
    if not c.agent:
        return []
    return ["-device", "virtio-serial-pci,id=vser0,addr=0x1e",
            "-chardev", f"socket,id={AGENT_CHARDEV},path={opt(run_dir / AGENT_SOCKET)},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev={AGENT_CHARDEV},name={AGENT_PORT}"]


def display_args(c: MachineConfig) -> list[str]:
    if c.display == "vnc":
        return ["-display", "none", "-vnc", "127.0.0.1:0,to=99"]  # the first free display
    return ["-display", "none"]
