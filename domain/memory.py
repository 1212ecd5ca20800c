"""A snapshot's saved memory and the outcome of a live switch, as typed values.

A take records the *intent* (save memory if the VM runs); the VM's host worker, which knows
whether QEMU runs, performs it and reports what happened (docs/semantics.md, "Take").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Any
from uuid import UUID

from domain.lifecycle import RunState


class MemoryState(str, Enum):
    NONE = "none"  # nothing saved: a disks-only take, or the VM was not running
    REQUESTED = "requested"  # the take asked for it; the switch to the new overlays has not happened
    SAVING = "saving"  # QEMU is writing it while the guest runs
    SAVED = "saved"
    FAILED = "failed"


class SaveMethod(str, Enum):
    BACKGROUND_SNAPSHOT = "background-snapshot"  # copy-on-write (userfaultfd write protection)
    PRECOPY = "precopy"  # the fallback where the kernel or QEMU refuses the former


class Resume(str, Enum):
    """How a VM restored from saved memory comes back."""

    RUNNING = "running"
    PAUSED = "paused"


@dataclass(frozen=True)
class Memory:
    state: MemoryState
    path: str | None = None
    method: SaveMethod | None = None
    bytes: int | None = None
    seconds: float | None = None
    sha256: str | None = None
    pause_ms: float | None = None  # the guest's pause while its disks switched
    error: str | None = None
    note: str | None = None  # e.g. why no memory was saved

    @property
    def pending(self) -> bool:
        return self.state in (MemoryState.REQUESTED, MemoryState.SAVING)

    @property
    def has_file(self) -> bool:
        return self.path is not None and self.state in (
            MemoryState.REQUESTED, MemoryState.SAVING, MemoryState.SAVED, MemoryState.FAILED
        )

    def but(self, **changes: Any) -> Memory:
        return replace(self, **changes)

    @classmethod
    def from_legacy(cls, data: dict[str, Any]) -> Memory | None:
        """Memory as the first releases stored it: a plain dict on the node."""
        state = str(data.get("state", "none"))
        if state == "restore":
            return None  # the apply's marker, now `Node.restore`
        if state == "saving" and not data.get("started"):
            state = "requested"
        method = data.get("method")
        return cls(
            state=MemoryState(state) if state in MemoryState._value2member_map_ else MemoryState.NONE,
            path=_str(data.get("path")),
            method=SaveMethod(method) if method in SaveMethod._value2member_map_ else None,
            bytes=_int(data.get("bytes", data.get("size"))),
            seconds=_float(data.get("seconds")),
            sha256=_str(data.get("sha256")),
            pause_ms=_float(data.get("pause_ms")),
            error=_str(data.get("error")),
        )


class QuiesceState(str, Enum):
    FROZEN = "frozen"  # the guest's filesystems were frozen through its agent around the pause
    UNAVAILABLE = "unavailable"  # no agent answered (or the VM did not run): crash-consistent
    FAILED = "failed"  # the freeze failed or timed out: crash-consistent, `reason` says why
    OFF = "off"  # not asked for


@dataclass(frozen=True)
class QuiesceOutcome:
    """How consistent a snapshot's disks are: what the freeze before its pause did."""

    state: QuiesceState
    filesystems: int | None = None  # how many the agent froze
    frozen_ms: float | None = None  # freeze to thaw, as the worker timed it
    reason: str | None = None

    def label(self) -> str:
        shown = self.state is QuiesceState.FAILED or (self.state is QuiesceState.FROZEN and self.reason)
        return f"{self.state.value}: {self.reason}" if shown else self.state.value


@dataclass(frozen=True)
class LiveSwitch:
    """What the worker reports when a running VM's writes moved to new overlays (or it restarted).

    `pause_ms` comes from QEMU's STOP/RESUME event timestamps. `method` is the memory save that
    started with the switch (None: no memory asked for, or it could not start: `memory_error`).
    """

    pause_ms: float | None = None
    method: SaveMethod | None = None
    qemu_downtime_ms: int | None = None
    memory_error: str | None = None
    resumed_after_crash: bool = False  # the switch had happened before a worker died
    restored_from: UUID | None = None  # an apply that restarted QEMU from saved memory
    not_running: bool = False  # the VM was stopped: nothing to switch, no memory to save
    run_after: RunState | None = None  # the VM's run state when the step changed it
    pid: int | None = None
    quiesce: QuiesceOutcome | None = None  # a take: the freeze around its pause
    clock: str | None = None  # a restore: "resynced" | "not resynced: <why>"
    thawed: bool = False  # a restore from a quiesced snapshot: the guest came back frozen, thawed

    @classmethod
    def from_legacy(cls, data: dict[str, Any] | None) -> LiveSwitch | None:
        if data is None:
            return None
        method = data.get("method")
        restored = data.get("restored_from")
        return cls(
            pause_ms=_float(data.get("pause_ms")),
            method=SaveMethod(method) if method in SaveMethod._value2member_map_ else None,
            qemu_downtime_ms=_int(data.get("qemu_downtime_ms")),
            resumed_after_crash=bool(data.get("resumed_after_crash", False)),
            restored_from=UUID(str(restored)) if restored else None,
        )

    @property
    def switched(self) -> bool:
        """A live take happened (not a restore, not a stopped VM)."""
        return self.restored_from is None and not self.not_running


def _str(v: object) -> str | None:
    return None if v is None else str(v)


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _float(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class SavedMemory:
    """A finished memory save, as the worker reports it."""

    bytes: int
    seconds: float
    sha256: str
