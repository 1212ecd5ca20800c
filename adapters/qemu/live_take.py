"""The live take: switch every disk of a running VM to a new overlay atomically, and start saving
its memory at that same instant, with the shortest guest pause.

Measured on QEMU 7.2 (docs/architecture.md); the sequences:

background-snapshot (the default):
    before the pause (:mod:`adapters.qemu.take_prepare`): check every
    overlay's qcow2 header names the current active layer, ``blockdev-add``
    the overlays with ``"backing": null``, set the migration capabilities/
    parameters, open the state file and pass its fd to QEMU (``getfd``);
    pause:  one pipelined burst ``stop`` + ``transaction`` of
            ``blockdev-snapshot`` (all disks, atomic) + ``migrate fd:NAME``;
            QEMU 7.2 then saves the device state, arms userfaultfd write
            protection and resumes the VM by itself;
    after:  RAM is written copy-on-write while the guest runs; the file is
            complete once QEMU has closed it (``migration.wait_save``).
    The pause is RESUME.timestamp - STOP.timestamp of QEMU's own events.
    Without memory the burst is ``stop`` + ``transaction`` + ``cont``.

pre-copy (fallback, when background-snapshot is refused):
    capability ``pause-before-switchover``; ``migrate`` with the guest running;
    at MIGRATION ``pre-switchover`` (guest stopped by QEMU) switch the disks,
    ``migrate-continue``, wait ``completed``, ``cont`` the postmigrate source.
    On multi-threaded TCG the guest is stopped for the whole pre-copy instead
    (QEMU 7.2 MTTCG dirty logging misses writes; see MachineConfig).

One live operation per VM at a time (the workers' per-VM order).
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ExecuteError

from adapters.qemu import migration, uffd_qemu72
from adapters.qemu.block_graph import drop_nodes
from adapters.qemu.errors import LiveError
from adapters.qemu.events import pause_ms, timeline
from adapters.qemu.machine import QemuMachine
from adapters.qemu.migration import MAX_BANDWIDTH, TERMINAL, Command, FileIdent
from adapters.qemu.take_prepare import Prepared, prepare

PRECOPY_DOWNTIME_MS = 30


@dataclass
class LiveSnapshotResult:
    """Outcome of :func:`live_snapshot`.

    ``pause_ms``: guest pause from QEMU's STOP/RESUME event timestamps (None
    if the VM was not running).  ``method``: "background-snapshot" |
    "precopy" | None (no memory).  ``overlay_nodes``: disk -> node name of the
    new active layer.  ``error`` is set if the disks were switched but the
    memory save could not be started (the snapshot then has no memory).
    """

    pause_ms: float | None
    method: str | None
    overlay_nodes: dict[str, str]
    state_path: str | None = None
    error: str | None = None
    qemu_downtime_ms: int | None = None     # QEMU's own "downtime" (query-migrate)
    # ms since STOP of the events inside the pause: "MIGRATION setup/active/...", "RESUME"
    timeline: dict[str, float] = field(default_factory=dict)
    _m: QemuMachine | None = field(default=None, repr=False)
    _ident: FileIdent | None = field(default=None, repr=False)
    _t0: float = field(default=0.0, repr=False)
    _saved: tuple[int, float] | None = field(default=None, repr=False)

    async def wait_saved(self, timeout: float | None = None) -> tuple[int, float]:
        """Wait until the memory state file is complete: (bytes, seconds).

        Raises LiveError if the save failed or was cancelled.
        (0, 0.0) when the snapshot has no memory.
        """
        if self.method is None or self.state_path is None:
            if self.error:
                raise LiveError(self.error)
            return (0, 0.0)
        if self._saved is None:
            assert self._m is not None
            info = await asyncio.wait_for(
                migration.wait_save(self._m, self.state_path, self._ident), timeout)
            self._saved = (os.path.getsize(self.state_path), time.monotonic() - self._t0)
            if self.qemu_downtime_ms is None:
                self.qemu_downtime_ms = info.get("downtime")
        return self._saved

    async def progress(self) -> tuple[int, int]:
        """(bytes transferred, total RAM bytes) of the memory save."""
        if self._saved is not None:
            return (self._saved[0], self._saved[0])
        if self.method is None or self._m is None:
            return (0, 0)
        info = await migration.status(self._m)
        ram = info.get("ram", {})
        if info.get("status") == "completed":
            return (ram.get("total", 1), ram.get("total", 1))
        return (ram.get("transferred", 0), ram.get("total", 0))


def _pause_and_timeline(m: QemuMachine, seq: int, result: LiveSnapshotResult,
                        was_running: bool) -> None:
    result.pause_ms = pause_ms(m.events_since(seq, ("STOP", "RESUME"))) if was_running else None
    result.timeline = timeline(m.events_since(seq, ("STOP", "RESUME", "MIGRATION")))


async def live_snapshot(m: QemuMachine, overlays: dict[str, str], state_path: str | None,
                        *, method: str | None = None, max_bandwidth: int = MAX_BANDWIDTH,
                        precopy_downtime_ms: int = PRECOPY_DOWNTIME_MS) -> LiveSnapshotResult:
    """Switch every disk to its new overlay atomically; save memory if state_path.

    overlays: disk -> path of the new overlay, created beforehand with
    ``qemu-img create -f qcow2 -b <current active abs path> -F qcow2``.
    method: None = background-snapshot, falling back to pre-copy if QEMU or
    the kernel refuses it; "background-snapshot" or "precopy" to force one.
    max_bandwidth: bytes/s for a pre-copy save (default: unlimited; QEMU's
    own default would be 128 MiB/s).  QEMU 7.2's background-snapshot ignores it.
    Returns once the guest runs again; await ``result.wait_saved()`` for the
    memory file.  On failure before the switch nothing is changed (overlay
    nodes are removed again, the VM keeps/gets back its run state).
    """
    prep = await prepare(m, overlays, state_path, method, max_bandwidth, precopy_downtime_ms)
    result = LiveSnapshotResult(None, prep.method, prep.new_nodes,
                                state_path and os.path.abspath(state_path), _m=m,
                                _ident=prep.ident)
    if prep.method == "precopy":
        await _snapshot_precopy(m, prep, result)
    else:
        await _snapshot_burst(m, prep, result)
    return result


async def _snapshot_burst(m: QemuMachine, prep: Prepared, result: LiveSnapshotResult) -> None:
    """The pause: one pipelined burst (stop, transaction, migrate or cont)."""
    seq = m.event_seq
    burst: list[Command] = []
    if prep.was_running:
        burst.append(("stop", None))
    burst.append(("transaction", {"actions": prep.actions()}))
    if result.method == "background-snapshot":
        burst.append(("migrate", {"uri": f"fd:{prep.fdname}"}))
    elif prep.was_running:
        burst.append(("cont", None))      # runs whatever the transaction did
    result._t0 = time.monotonic()
    async with uffd_qemu72.UffdWatchdog(m) as watchdog:
        replies = await migration.pipeline(m, burst)
        await _after_burst(m, prep, burst, replies, result, seq)
    if watchdog.fired and result.error is None:
        result.error = "memory save failed: QEMU deadlocked on its write protection"
    _pause_and_timeline(m, seq, result, prep.was_running)


async def _after_burst(m: QemuMachine, prep: Prepared, burst: list[Command], replies: list[Any],
                       result: LiveSnapshotResult, seq: int) -> None:
    failed = [(c, r) for (c, _), r in zip(burst, replies) if isinstance(r, BaseException)]
    errors = dict(failed)
    if "stop" in errors or "transaction" in errors:
        # nothing switched: undo everything (a started memory save included)
        if result.method == "background-snapshot" and "migrate" not in errors:
            await migration.cancel_save(m)
        elif prep.fdname:
            await migration.drop_fd(m, prep.fdname)
        await _resume(m, prep.was_running)
        await drop_nodes(m, prep.added)
        exc = errors.get("stop") or errors["transaction"]
        raise LiveError(f"disk switch refused: {exc}") from exc
    for _, exc in failed:
        if not isinstance(exc, ExecuteError):
            await _resume(m, prep.was_running)
            raise exc
    if "migrate" in errors:
        # disks switched, the memory save did not start: snapshot without memory
        result.error = f"memory save not started: {errors['migrate']}"
        result.method = None
        assert prep.fdname is not None
        await migration.drop_fd(m, prep.fdname)
        await _resume(m, prep.was_running)
    elif result.method == "background-snapshot":
        await _await_bg_resume(m, seq, prep.was_running)


async def _await_bg_resume(m: QemuMachine, seq: int, was_running: bool) -> None:
    """After ``migrate`` with background-snapshot: get the guest running again.

    QEMU 7.2 resumes the VM itself once write protection is armed (even one
    that was paused before: it is stopped again here).  Newer QEMU keeps a
    VM that was stopped stopped: wait for MIGRATION ``active``, then ``cont``.
    """
    def ended(e: dict[str, Any]) -> bool:
        return e["event"] == "RESUME" or e["data"].get("status") in ("failed", "cancelled")

    if await m.qemu_major() < 8:
        ev = await m.wait_event(("RESUME", "MIGRATION"), after=seq, timeout=60,
                                match=ended)
        if ev["event"] == "MIGRATION":
            # failed before write protection was armed: QEMU leaves the VM stopped
            await _resume(m, was_running)
        elif not was_running:
            await m.qmp.execute("stop")
    else:
        await m.wait_event("MIGRATION", after=seq, timeout=60,
                           match=lambda e: e["data"]["status"] != "setup")
        if was_running:
            await m.qmp.execute("cont")


async def _snapshot_precopy(m: QemuMachine, prep: Prepared, result: LiveSnapshotResult) -> None:
    """Pre-copy to the state file; the disks switch at the memory instant.

    Live (guest runs while RAM is copied): capability pause-before-switchover,
    switch the disks at ``pre-switchover`` (QEMU has stopped the guest),
    ``migrate-continue``.  On multi-threaded TCG a live pre-copy is not exact
    (see MachineConfig.multithreaded_tcg), so there the guest is stopped for
    the whole save: ``stop``, switch, migrate, ``cont`` (a long pause, but a
    correct image).  Either way the source ends 'postmigrate' with its images
    inactivated and is ``cont``-ed at once.
    """
    was_running = prep.was_running
    live_copy = was_running and not m.config.multithreaded_tcg
    seq = m.event_seq
    result._t0 = time.monotonic()
    migrate: Command = ("migrate", {"uri": f"fd:{prep.fdname}"})
    if live_copy:
        burst: list[Command] = [migrate]
    else:
        burst = ([("stop", None)] if was_running else []) + [
            ("transaction", {"actions": prep.actions()}), migrate]
    replies = await migration.pipeline(m, burst)
    errors = {c: r for (c, _), r in zip(burst, replies) if isinstance(r, BaseException)}
    if errors:
        await _precopy_refused(m, prep, errors, result, live_copy)
        return
    if live_copy:
        await _switch_at_switchover(m, prep, seq)
    ev = await m.wait_event("MIGRATION", after=seq, timeout=None,
                            match=lambda e: e["data"]["status"] in TERMINAL)
    # The source is now 'postmigrate' with its images inactivated: any write
    # before `cont` trips an assertion and kills QEMU 7.2.  `cont` takes the
    # images back; a VM that was paused is stopped again right away.
    await _resume(m, True)
    if not was_running:
        await m.qmp.execute("stop")
    if ev["data"]["status"] != "completed":
        result.error = f"pre-copy memory save {ev['data']['status']}"
        result.method = None
    _pause_and_timeline(m, seq, result, was_running)
    info = await migration.status(m)
    result.qemu_downtime_ms = info.get("downtime")


async def _precopy_refused(m: QemuMachine, prep: Prepared, errors: dict[str, Any],
                           result: LiveSnapshotResult, live_copy: bool) -> None:
    if "migrate" not in errors:
        await migration.cancel_save(m)
    elif prep.fdname:
        await migration.drop_fd(m, prep.fdname)
    await _resume(m, prep.was_running)
    if "transaction" in errors or "stop" in errors or live_copy:
        await drop_nodes(m, prep.added)
        raise LiveError(f"snapshot refused: {next(iter(errors.values()))}")
    result.error = f"memory save not started: {errors['migrate']}"
    result.method = None


async def _switch_at_switchover(m: QemuMachine, prep: Prepared, seq: int) -> None:
    """Live pre-copy: switch the disks while QEMU holds the guest at ``pre-switchover``."""
    ev = await m.wait_event("MIGRATION", after=seq, timeout=None,
                            match=lambda e: e["data"]["status"] in ("pre-switchover",) + TERMINAL)
    if ev["data"]["status"] != "pre-switchover":
        await drop_nodes(m, prep.added)
        await _resume(m, prep.was_running)
        raise LiveError(f"pre-copy memory save {ev['data']['status']}")
    tx, _ = await migration.pipeline(m, [("transaction", {"actions": prep.actions()}),
                                         ("migrate-continue", {"state": "pre-switchover"})])
    if isinstance(tx, BaseException):
        await migration.cancel_save(m)
        await _resume(m, prep.was_running)
        await drop_nodes(m, prep.added)
        raise LiveError(f"disk switch refused: {tx}") from tx


async def _resume(m: QemuMachine, wanted: bool) -> None:
    if not wanted:
        return
    status = await m.query_status()
    deadline = time.monotonic() + 10
    # QEMU 7.2 emits MIGRATION `completed` a moment before it leaves `finish-migrate`, and
    # refuses `cont` until then ("Migration is not finalized yet").
    while status == "finish-migrate" and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
        status = await m.query_status()
    if status != "running":
        await m.qmp.execute("cont")
