"""The virtual hardware of a VM: :class:`MachineConfig`, what QEMU is started with.

A restore (incoming migration) needs exactly the configuration of the VM that was saved, so this
is also what a snapshot's configuration copy holds (:meth:`MachineConfig.to_dict` /
:meth:`MachineConfig.from_dict`).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

QEMU_BINARY = "qemu-system-x86_64"
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


def kvm_usable(device: str = "/dev/kvm") -> bool:
    """Whether this host can run a KVM guest: the device opens read-write and speaks KVM's API."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def resolve_accel(accel: str, environ: Mapping[str, str] | None = None,
                  kvm: bool | None = None) -> str:
    """The accelerator QEMU gets: `SNAPTREE_ACCEL` overrides the definition; `auto` is KVM when
    the host can run it, else TCG. (On nested hosts where KVM opens but crawls, say `tcg`.)"""
    env = os.environ if environ is None else environ
    chosen = env.get("SNAPTREE_ACCEL") or accel or "tcg"
    if chosen.split(",")[0] == "auto":
        return "kvm" if (kvm_usable() if kvm is None else kvm) else "tcg"
    return chosen


@dataclass
class MachineConfig:
    """Everything that defines the virtual hardware."""

    memory_mib: int = 256
    hugepages: bool = False           # guest RAM on the host's 2 MiB huge pages (adapters/qemu/hugepages.py)
    cpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    machine: str = "pc"               # pin e.g. "pc-i440fx-7.2" to restore across QEMU upgrades
    accel: str = "tcg"                # kvm | tcg | auto (resolve_accel); "tcg,thread=single" = no MTTCG
    cpu: str | None = None
    firmware: str = "bios"            # bios (SeaBIOS) | uefi (OVMF + the VM's NVRAM file)
    nvram: str | None = None          # uefi: the VM's variable store (set by the adapter)
    disk_bus: str = "virtio"          # default bus: virtio | scsi | nvme | ide
    disk_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per disk: bus, cache, discard
    cdrom: str | None = None
    nics: list[dict[str, Any]] = field(default_factory=list)  # domain.definition.Nic.to_config()
    display: str = "none"             # none | vnc (127.0.0.1)
    console: bool = True              # serial console on run/console.sock, logged to run/console.log
    agent: bool = False               # guest agent channel on run/qga.sock (off for VMs made before it)
    extra_args: list[str] = field(default_factory=list)
    qemu_binary: str = QEMU_BINARY

    def bus(self, disk: str) -> str:
        return str((self.disk_options.get(disk) or {}).get("bus") or self.disk_bus)

    @property
    def multithreaded_tcg(self) -> bool:
        """TCG with one thread per vCPU (QEMU's default for x86 on x86).

        QEMU 7.2 MTTCG loses guest writes to TLB-hot pages in the dirty log of
        a *live* pre-copy migration (measured: restored heartbeat page older
        than the pages it counts); background-snapshot (userfaultfd) and a
        pre-copy of a stopped VM are exact.
        """
        parts = resolve_accel(self.accel).split(",")
        return parts[0] == "tcg" and "thread=single" not in parts[1:]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MachineConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
