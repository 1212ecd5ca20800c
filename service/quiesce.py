"""Application-consistent snapshots: the guest's filesystems frozen through its agent around the
pause of a live take, and a restored guest's clock set right (issue 12, docs/semantics.md).

The thaw is guaranteed: on every error path of the switch (`finally`), after a freeze that timed
out (the agent may finish freezing later: the thaw is retried), and after a kill -9 of the
worker between freeze and thaw: a marker file written before the freeze makes the next worker
that attaches to the VM thaw it before anything else.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import Callable

from adapters.qemu.errors import MachineError
from adapters.storage import DataDir
from domain.memory import LiveSwitch, QuiesceOutcome, QuiesceState
from domain.tree import Node
from service.ports import LiveVM

log = logging.getLogger("snaptree.quiesce")
MARKER = "frozen-by-snaptree"  # in the VM's run directory while its filesystems may be frozen


def freeze_timeout() -> float:
    return float(os.environ.get("SNAPTREE_FREEZE_TIMEOUT", "10"))


def thaw_timeout() -> float:
    """How long a thaw is retried: after a freeze that timed out the agent first finishes
    freezing (its commands run one at a time), so this must outlast any freeze."""
    return max(30.0, 2 * freeze_timeout(), float(os.environ.get("SNAPTREE_THAW_TIMEOUT", "30")))


def agent_timeout() -> float:
    return float(os.environ.get("SNAPTREE_AGENT_TIMEOUT", "1"))


def _marker(data: DataDir, vm: str) -> str:
    return str(data.vm_dir(vm) / "run" / MARKER)


def switch_quiesced(data: DataDir, vm: str, live: LiveVM, mode: str | None,
                    switch: Callable[[], LiveSwitch]) -> LiveSwitch:
    """Freeze (as `mode` asks: auto | on | off), run the live switch, thaw; the outcome goes
    into the switch's report."""
    mode = mode or "auto"
    if mode == "off":
        return replace(switch(), quiesce=QuiesceOutcome(QuiesceState.OFF))
    state = live.agent_state(agent_timeout())
    if state != "connected":
        if mode == "on":
            raise MachineError(f"--quiesce on: the guest agent is {state}; nothing was taken")
        return replace(switch(), quiesce=QuiesceOutcome(QuiesceState.UNAVAILABLE, reason=f"agent {state}"))
    if live.freeze_status() == "frozen":
        # Someone else (a backup tool) froze it: theirs to thaw, ours only to record.
        return replace(switch(), quiesce=QuiesceOutcome(
            QuiesceState.FAILED, reason="the guest was already frozen by another client; left as it was"))
    _mark(data, vm)  # before the freeze: a killed worker's successor thaws
    marker = _marker(data, vm)
    started = time.monotonic()
    try:
        count = live.freeze(freeze_timeout())
    except MachineError as exc:
        left = _thaw(live, marker)  # the agent may finish the freeze after it stopped waiting
        if mode == "on":
            raise MachineError(f"--quiesce on: the freeze failed ({exc}); nothing was taken"
                               + (f"; {left}" if left else "")) from None
        reason = str(exc) + (f"; {left}" if left else "")
        return replace(switch(), quiesce=QuiesceOutcome(QuiesceState.FAILED, reason=reason))
    left: str | None = None
    try:
        result = switch()
    finally:
        left = _thaw(live, marker)
    frozen_ms = round((time.monotonic() - started) * 1000, 3)
    return replace(result, quiesce=QuiesceOutcome(QuiesceState.FROZEN, count, frozen_ms, reason=left))


def _thaw(live: LiveVM, marker: str) -> str | None:
    """Thaw; None when done, else what to tell the user (the marker stays: every later worker
    run tries again)."""
    try:
        live.thaw(thaw_timeout())
        if live.freeze_status() == "frozen":  # a freeze that finished after the thaw
            live.thaw(thaw_timeout())
    except MachineError as exc:
        log.error("the guest's filesystems may still be frozen: the thaw failed (%s)", exc)
        return (f"THE THAW FAILED ({exc}): the guest's filesystems may still be frozen;"
                " `snaptree worker run --until-idle` tries again")
    os.unlink(marker)
    return None


def thaw_left_frozen(data: DataDir, vm: str, live: LiveVM) -> None:
    marker = _marker(data, vm)
    if not os.path.exists(marker):
        return
    try:
        if live.thaw_if_frozen():
            log.warning("VM %s: a worker stopped between freeze and thaw; its filesystems are thawed", vm)
    except MachineError as exc:
        log.error("VM %s may still be frozen (%s): the next worker run tries again", vm, exc)
        return
    os.unlink(marker)


def _mark(data: DataDir, vm: str) -> None:
    marker = _marker(data, vm)
    data.private_dir(os.path.dirname(marker))
    with open(marker, "w") as f:
        os.fsync(f.fileno())


def marked(data: DataDir, vm: str) -> bool:
    return os.path.exists(_marker(data, vm))


def after_resume(data: DataDir, vm: str, live: LiveVM) -> None:
    """A paused VM resumed: thaw it if it came back frozen, and set its clock."""
    thaw_left_frozen(data, vm, live)
    if live.agent_state(max(3.0, agent_timeout())) == "connected":
        try:
            live.set_time()
        except MachineError as exc:
            log.warning("VM %s: the guest's clock was not set: %s", vm, exc)


def after_restore(data: DataDir, vm: str, live: LiveVM, snapshot: Node, *, paused: bool) -> tuple[str, bool]:
    """A guest restored from memory: thaw it if the snapshot was quiesced (its memory was saved
    frozen), then set its clock from the host's. Returns (clock note, thawed)."""
    if paused:
        if snapshot.quiesce is not None and snapshot.quiesce.state is QuiesceState.FROZEN:
            _mark(data, vm)  # it comes back frozen: the start that resumes it thaws it
        return "not resynced: restored paused (`snaptree vm start` resumes it and sets it)", False
    state = live.agent_state(max(3.0, agent_timeout()))
    if state != "connected":
        return f"not resynced: guest agent {state}", False
    thawed = False
    if snapshot.quiesce is not None and snapshot.quiesce.state is QuiesceState.FROZEN:
        thawed = live.thaw_if_frozen()
    try:
        live.set_time()
    except MachineError as exc:
        return f"not resynced: {exc}", thawed
    return "resynced", thawed
