"""The worker's one way to a running VM: :class:`LiveVM`, a synchronous, typed facade over one
QEMU process and one QMP connection that lives for as many steps as the caller needs.

QEMU's monitor serves one client at a time, so a caller that keeps one ``LiveVM`` per VM for a
whole drain of work items (a take's switch and then its memory-save wait, a merge's jobs) opens
one connection instead of one per step.  Inside, an ``asyncio.Runner`` drives the async modules
(:mod:`~adapters.qemu.live_take`, :mod:`~adapters.qemu.migration`,
:mod:`~adapters.qemu.block_jobs`, :mod:`~adapters.qemu.block_graph`); callers see plain calls and
frozen dataclasses, never QMP.  Use a ``LiveVM`` from one thread at a time and never from inside a
running event loop (the Runner needs its own).  Every step is re-runnable after a crash: it
checks QEMU's state first (a job already running is driven on, a merge already done is skipped).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Coroutine, TypeVar

from adapters.qemu import block_graph, block_jobs, live_take, migration, qcow2
from adapters.qemu.errors import LiveError, MachineError
from adapters.qemu.hardware import MachineConfig
from adapters.qemu.machine import QemuMachine
from adapters.qemu.process import running_pid

__all__ = ["LiveVM", "Switched", "SavedMemory", "LiveError", "MachineError"]

Progress = Callable[[float], None]      # fraction done, 0.0 .. 1.0
T = TypeVar("T")


@dataclass(frozen=True)
class Switched:
    """A live take done: the disks write into their overlays."""

    pause_ms: float | None          # guest pause (QEMU's STOP/RESUME), None: it was not running
    method: str | None              # "background-snapshot" | "precopy" | None: no memory save
    qemu_downtime_ms: int | None    # QEMU's own "downtime" of a pre-copy
    memory_error: str | None        # disks switched, but the memory save could not start


@dataclass(frozen=True)
class SavedMemory:
    """A memory state file QEMU has finished and closed."""

    bytes: int
    seconds: float                  # QEMU's own duration of the save


class LiveVM:
    """One running QEMU, one QMP connection. Open it with :meth:`attach`, :meth:`start` or
    :meth:`restore`; :meth:`close` (or the ``with`` block) detaches and leaves QEMU running."""

    def __init__(self, runner: asyncio.Runner, machine: QemuMachine) -> None:
        self._runner: asyncio.Runner | None = runner
        self._m = machine

    # ---------------------------------------------------------------- opening
    @classmethod
    def _open(cls, make: Callable[[], Coroutine[Any, Any, QemuMachine]]) -> "LiveVM":
        runner = asyncio.Runner()
        try:
            machine = runner.run(make())
        except BaseException:
            runner.close()
            raise
        return cls(runner, machine)

    @classmethod
    def attach(cls, run_dir: Path | str, config: MachineConfig,
               disks: dict[str, str]) -> "LiveVM | None":
        """Connect to the QEMU running in ``run_dir``; None when none runs there."""
        pid = running_pid(run_dir)          # the one look into /proc
        if pid is None:
            return None

        async def make() -> QemuMachine:
            m = QemuMachine(run_dir, config, disks)
            await m.attach(pid=pid)
            return m

        return cls._open(make)

    @classmethod
    def start(cls, run_dir: Path | str, config: MachineConfig, disks: dict[str, str], *,
              paused: bool = False) -> "LiveVM":
        """Start a new QEMU on ``disks`` (its active layers), running unless ``paused``."""
        async def make() -> QemuMachine:
            m = QemuMachine(run_dir, config, disks)
            await m.start(paused=paused)
            return m

        return cls._open(make)

    @classmethod
    def restore(cls, run_dir: Path | str, config: MachineConfig, disks: dict[str, str],
                state_path: str, *, paused: bool = False) -> "LiveVM":
        """Start a new QEMU from a saved memory state; ``config`` and the disk names must be the
        saved VM's, ``disks`` fresh overlays on its layers."""
        return cls._open(lambda: migration.restore(run_dir, config, disks, state_path,
                                                   paused=paused))

    # ------------------------------------------------------------------ state
    def _run(self, step: Coroutine[Any, Any, T]) -> T:
        if self._runner is None:
            step.close()                    # never run: no "never awaited" warning
            raise MachineError(f"the connection to the QEMU in {self._m.run_dir} is closed")
        return self._runner.run(step)

    @property
    def pid(self) -> int:
        pid = self._m.pid
        if pid is None:
            raise MachineError(f"the QEMU in {self._m.run_dir} is gone")
        return pid

    def run_state(self) -> str:
        """"running" or "paused" (every QEMU state other than running counts as paused)."""
        return "running" if self._run(self._m.query_status()) == "running" else "paused"

    def resume(self) -> None:
        """Run a paused VM's vCPUs (QMP cont)."""
        async def cont() -> None:
            await self._m.qmp.execute("cont")

        self._run(cont())

    def guest_opened(self, chardev: str) -> bool:
        """Whether the guest has the virtio-serial port behind ``chardev`` open (its agent
        runs): QEMU's answer, no wait on the guest."""
        async def ask() -> bool:
            for dev in await self._m.qmp.execute("query-chardev"):
                if dev.get("label") == chardev:
                    return bool(dev.get("frontend-open"))
            return False

        return self._run(ask())

    def active_layers(self) -> dict[str, str]:
        """disk -> the file the disk writes into now."""
        layers = self._run(block_graph.chains(self._m))
        return {disk: chain[0].filename for disk, chain in layers.items()}

    # -------------------------------------------------------------- live take
    def switch(self, overlays: dict[str, str], state_path: str | None) -> Switched:
        """The live take: every disk to its overlay (made beforehand on the active layer) at
        once; with ``state_path`` the memory save starts at that instant and runs on after."""
        if state_path is not None:
            os.makedirs(os.path.dirname(str(state_path)), exist_ok=True)
        # module attribute, not an imported name: the fault harness hooks live_take.live_snapshot
        result = self._run(live_take.live_snapshot(self._m, dict(overlays), state_path))
        return Switched(result.pause_ms, result.method, result.qemu_downtime_ms, result.error)

    def saving(self) -> str | None:
        """The method of the memory save that runs now or last completed in this QEMU
        ("background-snapshot" | "precopy"); None when none ran or the last one failed."""
        async def ask() -> str | None:
            status = (await migration.status(self._m)).get("status")
            if status not in migration.ACTIVE and status != "completed":
                return None
            return "background-snapshot" if await migration.bg_capability(self._m) else "precopy"

        return self._run(ask())

    def wait_saved(self, state_path: str, progress: Progress) -> SavedMemory:
        """Wait until QEMU has written and closed ``state_path``; LiveError if the save failed."""
        async def wait() -> float:
            info = await migration.wait_save(self._m, state_path)
            return await migration.total_seconds(self._m, info)

        seconds = self._run(wait())
        size = os.path.getsize(state_path)
        progress(1.0)
        return SavedMemory(size, seconds)

    def cancel_save(self, state_path: str) -> str:
        """Cancel the running save only if it writes ``state_path`` (another snapshot's save goes
        on) and remove the file: "cancelled", "completed"/"failed" (it had ended), or "none"."""
        if not migration.qemu_holds(self._m, migration.file_ident(state_path)):
            return "none"
        return self._run(migration.cancel_save(self._m, state_path))

    # ---------------------------------------------------------- online merges
    def commit_online(self, disk: str, top: str, base: str, progress: Progress) -> None:
        """Commit the layer file ``top`` down into ``base`` with a block job: an active commit if
        the disk writes into ``top``, else an intermediate one; ``base`` is on stable storage when
        it returns. A job a killed worker left is finished first; no job runs once ``top`` has
        left the chain (done before)."""
        async def commit() -> None:
            step = _bytes_progress(progress)
            await block_jobs.finish_left_jobs(self._m, disk, step)
            layers = await block_graph.chain(self._m, disk)
            files = [layer.filename for layer in layers]
            if top == files[0]:
                await block_jobs.commit_active(self._m, disk, progress=step, layers=layers)
                return  # an active commit (a mirror) flushes ``base`` before it completes
            if top in files:
                await block_jobs.commit_intermediate(self._m, disk, top, base, step)
            # QEMU 7.2's intermediate commit does not flush ``base``; also when a killed
            # worker's job had ended: ``top`` is deleted next
            await block_jobs.flush_layer(self._m, disk, base)

        self._run(commit())

    def stream_online(self, disk: str, into: str, base: str, progress: Progress) -> None:
        """Pull everything above ``base`` into the layer file ``into`` with block-stream (into the
        active layer or an intermediate one), then flush ``into``: the caller deletes the layers
        above ``base`` next. A job a killed worker left is finished first; no job runs once
        ``into``'s header already names ``base``."""
        async def stream() -> None:
            step = _bytes_progress(progress)
            await block_jobs.finish_left_jobs(self._m, disk, step)
            layers = await block_graph.chain(self._m, disk)
            files = [layer.filename for layer in layers]
            backing = qcow2.backing_file(into)
            if backing is None or not qcow2.same_file(backing, base):
                if into == files[0]:
                    await block_jobs.stream_into_active(self._m, disk, base, progress=step,
                                                        layers=layers)
                else:
                    await block_jobs.stream_intermediate(self._m, disk, into, base, step)
            # also when a killed worker's job had ended: what it copied may not be on disk yet
            await block_jobs.flush_layer(self._m, disk, into)

        self._run(stream())

    # ---------------------------------------------------------------- closing
    def stop(self) -> None:
        """Quit QEMU (QMP ``quit``, then signals) and close this facade."""
        try:
            self._run(self._m.stop())
        finally:
            self.close()

    def close(self) -> None:
        """Drop the QMP connection; QEMU keeps running. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            runner.run(self._m.detach())
        finally:
            runner.close()

    def __enter__(self) -> "LiveVM":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _bytes_progress(progress: Progress) -> block_jobs.Progress:
    """A block job reports (bytes done, bytes total); callers want a fraction."""
    def step(done: int, total: int) -> None:
        progress(done / total if total else 0.0)

    return step
