"""Starting and stopping a VM: asked for by a command, carried out by the VM's host worker.

Only the host that runs a VM can start or stop its QEMU, so a start or stop is recorded as a
request (work for that host, like a merge) and the worker records what it found or did. The
recorded run state is what the worker last saw; the VM's host can always look at QEMU itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class RunAction(str, Enum):
    START = "start"
    STOP = "stop"


class RunState(str, Enum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class RunRequest:
    action: RunAction
    paused: bool = False
    seq: int = 0  # aggregate version that asked for it: work runs in this order


@dataclass(frozen=True)
class RunRecord:
    state: RunState = RunState.STOPPED
    pid: int | None = None
