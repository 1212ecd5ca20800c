"""Looking into a running test VM through its monitor: HMP commands, guest-visible disk I/O with
qemu-io, and the test guest's heartbeat counter. Test and benchmark helpers, not production code.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from adapters.machines import QemuMachines, machine_config
from adapters.storage import DataDir
from domain.vm import VirtualMachine

import asyncio
import re
import time

from adapters.qemu.errors import LiveError
from adapters.qemu.machine import QemuMachine

COUNTER_ADDR = 0x00200000          # the test guest's heartbeat (tests/guest/guest.c)

_XP = re.compile(r":\s*0x([0-9a-fA-F]+)")


async def hmp(m: QemuMachine, command: str) -> str:
    """Run an HMP command (``human-monitor-command``) and return its output.

    E.g. ``qemu-io -d /machine/peripheral/DISK/virtio-backend "write -P 0xab
    0 64k"`` writes through the disk's device (see :func:`qemu_io`).
    """
    out = await m.qmp.execute("human-monitor-command", {"command-line": command})
    return str(out)


async def qemu_io(m: QemuMachine, disk: str, command: str, *, timeout: float = 5.0) -> str:
    """Run a qemu-io command through the disk's own device (guest-visible I/O).

    E.g. ``await qemu_io(m, "disk0", "write -P 0xab 0 64k")`` or
    ``"read -P 0xab 0 64k"`` (verifies the pattern).  QEMU 7.2 prints HMP
    qemu-io output on its stdout, not into the HMP reply: it is read back
    from the VM's log.  Raises LiveError on a failed command or a pattern
    mismatch.  Not for concurrent use on one VM (outputs would interleave).
    """
    start = m.log_path.stat().st_size if m.log_path.exists() else 0
    reply = await hmp(m, f"qemu-io -d {m.qdev_path(disk)} {_hmp_quote(command)}")
    out = reply
    deadline = time.monotonic() + timeout
    while True:
        with open(m.log_path, "rb") as log:
            log.seek(start)
            out = reply + log.read().decode(errors="replace")
        # every qemu-io I/O command ends with a summary line or an error line
        if re.search(r"(bytes at offset|ops/sec|failed|error|Error)", out) \
                or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    if re.search(r"(failed|error)", out, re.IGNORECASE):
        raise LiveError(f"qemu-io {command!r} on {disk}: {out.strip()}")
    return out


def _hmp_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def read_counter(m: QemuMachine, addr: int = COUNTER_ADDR) -> int:
    """The 32-bit word at guest-physical ``addr`` (the test guest's heartbeat)."""
    out = await hmp(m, f"xp /1wx {addr:#x}")
    hit = _XP.search(out)
    if hit is None:
        raise LiveError(f"unexpected xp output: {out!r}")
    return int(hit.group(1), 16)


@asynccontextmanager
async def attached(data: DataDir, vm: VirtualMachine) -> AsyncIterator[QemuMachine]:
    """The raw QMP machine of a VM that runs (tests only: production code uses `LiveVM`)."""
    node = vm.nodes[vm.current]
    m = QemuMachine(QemuMachines(data).run_dir(vm.name), machine_config(node.config), dict(node.layers))
    await m.attach()
    try:
        yield m
    finally:
        await m.detach()
