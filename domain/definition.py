"""A VM's definition: the virtual machine QEMU runs, as `vm create` / `vm set` give it.

It is kept in each node's `config` (plain values, so stored events stay msgpack maps) and every
snapshot keeps its copy: an apply with memory restores with the snapshot's copy. This module
holds the pure rules — what each option may be, parsed from the CLI's spellings — so the CLI,
the Python API and the queue validate in one place; what needs the host (a file exists, a port
is free, /dev/kvm opens) is checked by the service before anything is recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from domain.errors import InvalidArgument


class Accel(str, Enum):
    AUTO = "auto"  # KVM when /dev/kvm opens and QEMU reports it enabled, else TCG
    KVM = "kvm"
    TCG = "tcg"


class Firmware(str, Enum):
    BIOS = "bios"  # SeaBIOS
    UEFI = "uefi"  # OVMF, with a per-VM NVRAM that snapshots freeze with the disks


class Display(str, Enum):
    NONE = "none"
    VNC = "vnc"  # on 127.0.0.1 only


DISK_BUSES = ("virtio", "scsi", "nvme", "ide")
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
DISCARD_MODES = ("ignore", "unmap")
NIC_MODES = ("user", "tap", "bridge")

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # Linux IFNAMSIZ - 1
HOSTFWD_RE = re.compile(r"^(tcp|udp):(127\.0\.0\.1|localhost)?:(\d{1,5})-(\d{1,3}(\.\d{1,3}){3})?:(\d{1,5})$")

# What snaptree runs QEMU with itself: an extra argument may not take it over.
MANAGED_OPTIONS = frozenset({
    "-qmp", "-qmp-pretty", "-mon", "-monitor", "-incoming", "-daemonize", "-pidfile", "-blockdev",
    "-drive", "-hda", "-hdb", "-hdc", "-hdd", "-cdrom", "-pflash", "-bios", "-kernel", "-initrd",
    "-append", "-serial", "-nodefaults", "-S", "-loadvm", "-snapshot", "-name", "-accel",
    "-enable-kvm", "-machine", "-M", "-m", "-smp", "-cpu", "-vnc", "-display", "-nic", "-netdev",
})


@dataclass(frozen=True)
class DiskOptions:
    bus: str = "virtio"
    cache: str | None = None  # QEMU's default (writeback) when not given
    discard: str | None = None

    def to_config(self) -> dict[str, Any]:
        return {"bus": self.bus, "cache": self.cache, "discard": self.discard}

    @classmethod
    def from_config(cls, data: dict[str, Any] | None) -> DiskOptions:
        data = data or {}
        return cls(str(data.get("bus") or "virtio"), data.get("cache"), data.get("discard"))


@dataclass(frozen=True)
class Nic:
    mode: str  # user | tap | bridge
    target: str | None = None  # the tap interface or the bridge
    hostfwd: tuple[str, ...] = ()  # user mode: tcp:127.0.0.1:HOSTPORT-:GUESTPORT
    mac: str | None = None  # generated once when the VM is created (service), then kept

    def to_config(self) -> dict[str, Any]:
        return {"mode": self.mode, "target": self.target, "hostfwd": list(self.hostfwd), "mac": self.mac}

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> Nic:
        return cls(str(data["mode"]), data.get("target"), tuple(data.get("hostfwd") or ()), data.get("mac"))

    def host_ports(self) -> list[int]:
        return [int(m.group(3)) for f in self.hostfwd if (m := HOSTFWD_RE.match(f))]


def parse_disk(spec: str, index: int) -> tuple[str, str, DiskOptions]:
    """`[NAME=]PATH[,bus=B][,cache=C][,discard=D]` -> (name, path, options); a path with a
    comma is written with `,,` as in QEMU."""
    parts = _split_commas(spec)
    head, opts = parts[0], parts[1:]
    name, sep, path = head.partition("=")
    if not sep or "/" in name:
        name, path = f"disk{index}", head
    values = _options(opts, {"bus", "cache", "discard"}, f"--disk {spec}")
    bus = values.get("bus", "virtio")
    _one_of("bus", bus, DISK_BUSES)
    if "cache" in values:
        _one_of("cache", values["cache"], CACHE_MODES)
    if "discard" in values:
        _one_of("discard", values["discard"], DISCARD_MODES)
    return name, path, DiskOptions(bus, values.get("cache"), values.get("discard"))


def parse_nic(spec: str) -> Nic:
    """`user[,hostfwd=tcp:127.0.0.1:PORT-:PORT]...`, `tap=IFNAME`, `bridge=BR`, each with an
    optional `,mac=52:54:00:..`."""
    parts = _split_commas(spec)
    mode, _, target = parts[0].partition("=")
    _one_of("NIC", mode, NIC_MODES)
    hostfwd: list[str] = []
    mac: str | None = None
    for opt in parts[1:]:
        key, eq, value = opt.partition("=")
        if key == "hostfwd" and eq and mode == "user":
            m = HOSTFWD_RE.match(value)
            if not m:
                raise InvalidArgument(f"--nic {spec}: hostfwd must be tcp:127.0.0.1:HOSTPORT-:GUESTPORT, not {value!r}")
            # Only ever on the loopback address: QEMU's default would listen on every interface.
            hostfwd.append(f"{m.group(1)}:127.0.0.1:{m.group(3)}-{m.group(4) or ''}:{m.group(6)}")
        elif key == "mac" and eq:
            mac = mac_address(value)
        else:
            raise InvalidArgument(f"--nic {spec}: unknown option {opt!r} (a {mode} NIC takes "
                                  f"{'hostfwd=, ' if mode == 'user' else ''}mac=)")
    if mode == "user" and target:
        raise InvalidArgument(f"--nic {spec}: a user NIC takes no interface")
    if mode != "user" and not IFNAME_RE.match(target):
        raise InvalidArgument(f"--nic {spec}: {mode}=NAME needs an interface name (1-15 of A-Z a-z 0-9 _ . -)")
    for fwd in hostfwd:
        m = HOSTFWD_RE.match(fwd)
        assert m is not None
        if not (0 < int(m.group(3)) < 65536 and 0 < int(m.group(6)) < 65536):
            raise InvalidArgument(f"--nic {spec}: port out of range in {fwd!r}")
    return Nic(mode, target or None, tuple(hostfwd), mac)


def mac_address(value: str) -> str:
    mac = value.lower()
    if not MAC_RE.match(mac):
        raise InvalidArgument(f"MAC address {value!r} is malformed (six hex pairs: 52:54:00:12:34:56)")
    if int(mac[:2], 16) & 1:
        raise InvalidArgument(f"MAC address {value!r} is a multicast address")
    return mac


HUGEPAGE_MIB = 2


def check_hugepage_memory(memory_mib: int) -> None:
    """Hugepage-backed RAM comes in whole 2 MiB pages."""
    if memory_mib % HUGEPAGE_MIB:
        raise InvalidArgument(f"--hugepages: the memory ({memory_mib} MiB) must be a multiple of "
                              f"{HUGEPAGE_MIB} MiB")


def check_qemu_args(args: tuple[str, ...] | list[str]) -> None:
    """Extra QEMU arguments may not take over what snaptree runs QEMU with itself."""
    for arg in args:
        if not arg or "\0" in arg:
            raise InvalidArgument("--qemu-arg: an empty argument or a NUL byte")
        if arg.startswith("-") and arg.split("=", 1)[0].replace("--", "-", 1) in MANAGED_OPTIONS:
            raise InvalidArgument(
                f"--qemu-arg {arg}: snaptree manages {arg.split('=', 1)[0]} itself (the VM definition"
                " has an option for it, or it would break snapshots)")


def _split_commas(spec: str) -> list[str]:
    """Split on `,` but not on `,,` (QEMU's escape)."""
    out, cur, i = [], "", 0
    while i < len(spec):
        if spec[i] == ",":
            if spec[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            out.append(cur)
            cur = ""
        else:
            cur += spec[i]
        i += 1
    out.append(cur)
    return out


def _options(opts: list[str], known: set[str], what: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or key not in known:
            raise InvalidArgument(f"{what}: unknown option {opt!r} (known: {', '.join(sorted(known))})")
        if key in values:
            raise InvalidArgument(f"{what}: {key} given twice")
        values[key] = value
    return values


def _one_of(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidArgument(f"{what} {value!r} is not one of {', '.join(allowed)}")
