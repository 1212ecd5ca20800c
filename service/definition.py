"""A VM definition from `vm create` / `vm set`, checked against this host before it is recorded.

The pure rules (what a bus, a NIC or an extra QEMU argument may be) are domain/definition.py;
here is what needs the host: every file given exists and is readable, a forwarded port is free,
a tap interface or bridge exists, the UEFI firmware is installed. The result is the plain config
map the domain records in the current state's node (snapshots keep their copies).
"""

from __future__ import annotations

import os
import random
import socket
from typing import Any

from adapters.qemu import hugepages
from adapters.qemu.devices import OVMF_CODE
from domain import commands as c
from domain.definition import (
    Accel, DiskOptions, Display, Firmware, Nic, check_hugepage_memory, check_qemu_args, parse_disk,
    parse_nic,
)
from domain.errors import InvalidArgument, Refused
from domain.rules import DEFAULT_MAX_CHAIN_DEPTH



def disk_options(specs: tuple[str, ...]) -> dict[str, DiskOptions]:
    return {name: opts for name, _, opts in (parse_disk(s, i) for i, s in enumerate(specs))}


def create_config(cmd: c.CreateVM) -> dict[str, Any]:
    config: dict[str, Any] = {
        "memory_mib": cmd.memory, "cpus": cmd.cpus, "max_chain_depth": cmd.max_chain_depth,
        "accel": Accel(cmd.accel).value, "firmware": Firmware(cmd.firmware).value,
        "display": Display(cmd.display).value, "agent": bool(cmd.agent),
    }
    if Firmware(cmd.firmware) is Firmware.UEFI:
        _need_file(OVMF_CODE, "UEFI firmware (Debian package ovmf)")
    for key in ("machine", "cpu"):
        value = getattr(cmd, key)
        if value:
            config[key] = _token(key, value)
    config.update(_boot_files(cmd.kernel, cmd.initrd, cmd.append, cmd.cdrom))
    options = disk_options(cmd.disk)
    if any(o != DiskOptions() for o in options.values()):
        config["disk_options"] = {name: o.to_config() for name, o in options.items()}
    nics = [_checked_nic(parse_nic(spec), None) for spec in cmd.nic]
    if nics:
        config["nics"] = [n.to_config() for n in nics]
    if cmd.qemu_arg:
        check_qemu_args(cmd.qemu_arg)
        config["qemu_args"] = list(cmd.qemu_arg)
    if cmd.hugepages:
        _check_hugepages(cmd.memory)
        config["hugepages"] = True
    return config


def set_changes(cmd: c.SetVM, current: dict[str, Any]) -> dict[str, Any]:
    """The config keys `vm set` changes (None for a key it removes)."""
    changes: dict[str, Any] = {}
    simple = {"memory": "memory_mib", "cpus": "cpus", "max_chain_depth": "max_chain_depth"}
    for field, key in simple.items():
        if getattr(cmd, field) is not None:
            changes[key] = getattr(cmd, field)
    if cmd.accel is not None:
        changes["accel"] = Accel(cmd.accel).value
    if cmd.display is not None:
        changes["display"] = Display(cmd.display).value
    if cmd.agent is not None:
        changes["agent"] = bool(cmd.agent)
    for key in ("machine", "cpu"):
        value = getattr(cmd, key)
        if value is not None:
            changes[key] = _token(key, value) if value else None
    if any(v is not None for v in (cmd.kernel, cmd.initrd, cmd.append, cmd.cdrom)):
        merged = {k: current.get(k) for k in ("kernel", "initrd", "append", "cdrom")}
        for key in merged:
            value = getattr(cmd, key)
            if value is not None:
                merged[key] = value or None
        boot = _boot_files(merged["kernel"], merged["initrd"], merged["append"], merged["cdrom"])
        changes.update({k: boot.get(k) for k in merged})
    if cmd.nic is not None:
        old = [Nic.from_config(n) for n in current.get("nics") or []]
        nics = []
        for i, spec in enumerate(cmd.nic):
            nic = parse_nic(spec)
            same = old[i] if i < len(old) and old[i].mode == nic.mode else None
            nics.append(_checked_nic(nic, same))
        changes["nics"] = [n.to_config() for n in nics] or None
    if cmd.qemu_arg is not None:
        check_qemu_args(cmd.qemu_arg)
        changes["qemu_args"] = list(cmd.qemu_arg) or None
    if cmd.hugepages is not None:
        changes["hugepages"] = True if cmd.hugepages else None
    if cmd.hugepages or (cmd.memory is not None and cmd.hugepages is None and current.get("hugepages")):
        _check_hugepages(cmd.memory if cmd.memory is not None else int(current.get("memory_mib", 256)))
    if not changes:
        raise Refused("nothing to change")
    return changes


def definition_json(name: str, host: str, disks: dict[str, str], config: dict[str, Any]) -> dict[str, Any]:
    """`vm show VM --json`: the whole definition, defaults filled in."""
    options = config.get("disk_options") or {}
    return {
        "vm": name, "host": host,
        "memory_mib": config.get("memory_mib", 256), "cpus": config.get("cpus", 1),
        "accel": config.get("accel", "tcg"),  # VMs created before `auto` ran on TCG
        "machine": config.get("machine") or "pc", "cpu": config.get("cpu"),
        "firmware": config.get("firmware", "bios"),
        "kernel": config.get("kernel"), "initrd": config.get("initrd"), "append": config.get("append"),
        "cdrom": config.get("cdrom"),
        "disks": {d: {"path": p, **DiskOptions.from_config(options.get(d)).to_config()} for d, p in disks.items()},
        "nics": list(config.get("nics") or []),
        "display": config.get("display", "none"),
        "qemu_args": list(config.get("qemu_args") or []),
        "max_chain_depth": config.get("max_chain_depth", DEFAULT_MAX_CHAIN_DEPTH),
        "agent": bool(config.get("agent", False)),  # VMs created before the agent had none
        "hugepages": bool(config.get("hugepages", False)),
        "console": {"socket": "run/console.sock", "log": "run/console.log"},
        **({"agent_socket": "run/qga.sock"} if config.get("agent") else {}),
    }


# --- checks that need this host ---


def _boot_files(kernel: str | None, initrd: str | None, append: str | None,
                cdrom: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if (initrd or append) and not kernel:
        raise InvalidArgument("--initrd and --append need --kernel (a disk boots through the firmware)")
    for key, path in (("kernel", kernel), ("initrd", initrd), ("cdrom", cdrom)):
        if path:
            out[key] = _need_file(path, key)
    if append:
        if "\0" in append or "\n" in append:
            raise InvalidArgument("--append: no NUL or newline")
        out["append"] = append
    return out


def _need_file(path: str, what: str) -> str:
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise InvalidArgument(f"{what} {path}: no such file")
    if not os.access(real, os.R_OK):
        raise InvalidArgument(f"{what} {path}: not readable")
    return real


def _check_hugepages(memory_mib: int) -> None:
    check_hugepage_memory(memory_mib)
    host = hugepages.pool()
    if host.total_mib < memory_mib:
        raise InvalidArgument(f"--hugepages: this host reserves {host.total_mib} MiB of huge pages; "
                              + hugepages.advice(memory_mib))


def _token(key: str, value: str) -> str:
    if not value.replace("-", "").replace("_", "").replace(".", "").replace(",", "").replace("=", "").isalnum():
        raise InvalidArgument(f"--{key} {value!r}: letters, digits and - _ . , = only")
    return value


def _checked_nic(nic: Nic, keep: Nic | None) -> Nic:
    kept = set(keep.host_ports()) if keep is not None else set()  # its own QEMU may hold them
    for port in set(nic.host_ports()) - kept:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise InvalidArgument(f"port {port} on 127.0.0.1 is in use: pick another for hostfwd") from None
    if nic.mode == "tap" and not os.path.exists(f"/sys/class/net/{nic.target}"):
        raise InvalidArgument(f"no network interface {nic.target!r} on this host (create the tap first)")
    if nic.mode == "bridge" and not os.path.isdir(f"/sys/class/net/{nic.target}/bridge"):
        raise InvalidArgument(f"no bridge {nic.target!r} on this host")
    mac = nic.mac or (keep.mac if keep is not None else None) or _new_mac()
    return Nic(nic.mode, nic.target, nic.hostfwd, mac)


def _new_mac() -> str:
    # QEMU's locally administered prefix; generated once, then kept in the definition.
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))
