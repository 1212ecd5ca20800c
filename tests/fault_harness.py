"""Fault injection (issue 6, part 2): `kill -9` of the worker at every step, then restart and check.

A scenario builds a VM (stopped, on real qcow2 files; or running, the test guest under TCG) with
byte patterns in every layer, records one command *without* doing its disk work (take, apply,
delete with 0 / 1 / 2+ dependents, forced merge), and then runs the worker in a CHILD PROCESS
that is killed with SIGKILL at a chosen kill point:

- ``event``   right after the worker's N-th event of a type is committed (LayersCreated,
              MergeStarted, MergeCompleted, FilesRemoved, MemorySaved): the step boundaries;
- ``after``   right after the N-th call of a function returns (a `qemu-img commit` of the first
              disk, an overlay created, a file unlinked, the live switch done): the boundaries
              *inside* one work item, where no event marks them;
- ``before``  when a function is entered (the memory-save wait);
- ``qemu-img``the parent scans /proc for a `qemu-img commit|rebase` of this data directory in the
              worker's process group and kills the whole group while it runs (big layers, so the
              run lasts);
- ``block-job`` the worker's own QMP connection sees the block job in `query-jobs` (running or
              ready): the group is killed with the job in flight inside QEMU. With `speed`
              the job the worker starts is rate-limited (QEMU's `speed`, bytes/s), so that a
              small job cannot end before it is seen; the restarted worker finishes it as is.

The event/after/before/block-job points are hooks installed *in the child process only* (the
child is `python -m tests.fault_harness child ...`, which patches the modules and then runs
`Service.settle(vm)`, the embedded worker's drain); production code has no hook. A function is
named by module alias and attribute (`qemu_img.commit`, `live_take.live_snapshot`,
`migration.wait_save`, `migration.restore`, `steps.Drain.save_memory`, ...: see HOOK_MODULES);
`os.unlink` means the worker's own file removal (adapters/images.py `QcowImages.remove`), not
every unlink of the process. They are exact where polling the event log
from the parent would race the worker. The block job is observed from the worker's side because
QEMU's QMP socket serves one client at a time: a parent polling `query-jobs` would hold the
monitor the worker needs. Every kill is `os.killpg(pgid, SIGKILL)`: the worker and any qemu-img
it runs die together (QEMU itself runs in its own session and survives, as in production).

After the kill, a fresh `python -m adapters.cli worker run --until-idle` (the production worker)
must exit 0, and then: `audit verify` clean, every visible snapshot and the current state read
their expected byte patterns, no orphan file (verify's scan, the layer folder equals the tree,
no temp files, no garbage left), and a live VM still runs.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from uuid import UUID

ROOT = Path(__file__).resolve().parent.parent
SLOT = 64 * 1024
WORKER_TIMEOUT = 120.0


# ============================================================================ child side


def _die() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


# Where the functions a kill point names live (the worker reaches each through its module).
HOOK_MODULES = {
    "qemu_img": "adapters.qemu.qemu_img",      # create_overlay, commit, rebase_safe, rebase_unsafe
    "overlays": "adapters.qemu.overlays",      # create_overlays: queued takes of a stopped VM at once
    "live_take": "adapters.qemu.live_take",    # live_snapshot: the live switch
    "migration": "adapters.qemu.migration",    # wait_save, restore
    "images": "adapters.images",               # QcowImages (the Disks port)
    "session": "adapters.qemu.session",        # LiveVM (one QEMU, one QMP connection)
    "steps": "service.steps",                  # Drain: create_layers, save_memory, remove_files, run
    "merging": "service.merging",              # merge, plan
}


def _owner(path: str) -> tuple[Any, str]:
    """(object holding the function, attribute): `steps.Drain.save_memory` -> (Drain, ...)."""
    import importlib

    alias, _, rest = path.partition(".")
    obj: Any = importlib.import_module(HOOK_MODULES.get(alias, alias))
    *inner, attr = rest.split(".")
    for name in inner:
        obj = getattr(obj, name)
    return obj, attr


def _install_hook(spec: dict[str, Any], app: Any) -> None:
    kind = spec["kind"]
    nth = int(spec.get("nth", 1))
    seen = {"n": 0}

    def hit() -> None:
        seen["n"] += 1
        if seen["n"] >= nth:
            _die()

    if kind == "event":
        wanted = spec["event"]
        orig_save = app.save

        def save(*objs: Any, **kw: Any) -> Any:
            names = [type(e).__name__ for o in objs for e in getattr(o, "pending_events", [])]
            result = orig_save(*objs, **kw)
            for name in names:
                if name == wanted:
                    hit()
            return result

        app.save = save
    elif kind in ("after", "before"):
        owner, _, attr = spec["func"].rpartition(".")
        if owner == "os":  # only the worker's own os.unlink (QcowImages.remove), not every unlink
            import adapters.images as images

            real_os = os

            class _Os:
                def __getattr__(self, name: str) -> Any:
                    return getattr(real_os, name)

            proxy = _Os()
            images.os = proxy  # type: ignore[assignment]
            module: Any = proxy
            orig = getattr(real_os, attr)
        else:
            module, attr = _owner(spec["func"])
            orig = getattr(module, attr)
        if inspect.iscoroutinefunction(orig):
            async def wrapper_async(*a: Any, **k: Any) -> Any:
                if kind == "before":
                    hit()
                r = await orig(*a, **k)
                if kind == "after":
                    hit()
                return r

            setattr(module, attr, functools.wraps(orig)(wrapper_async))
        else:
            def wrapper(*a: Any, **k: Any) -> Any:
                if kind == "before":
                    hit()
                r = orig(*a, **k)
                if kind == "after":
                    hit()
                return r

            setattr(module, attr, functools.wraps(orig)(wrapper))
    elif kind == "block-job":
        from qemu.qmp import QMPClient

        statuses = set(spec.get("status", ["running", "ready"]))
        speed = spec.get("speed")
        orig_exec = QMPClient.execute

        async def execute(self: Any, cmd: str, arguments: Any = None, **kw: Any) -> Any:
            if speed and cmd in ("block-commit", "block-stream") and isinstance(arguments, dict):
                # QEMU's own rate limit on the job this worker starts: a job of a few MiB on a
                # fast disk can end within one QMP round trip, before any `query-jobs` sees it
                # running; capped, it lasts long enough to be killed mid-way every time.
                arguments = {**arguments, "speed": int(speed)}
            r = await orig_exec(self, cmd, arguments, **kw)
            if cmd == "query-jobs":
                for job in r:
                    if job["id"].startswith(("commit-", "stream-")) and job["status"] in statuses:
                        with open(os.environ["FAULT_NOTE"], "w") as f:
                            json.dump(job, f)
                        _die()
            return r

        QMPClient.execute = execute  # type: ignore[method-assign]
    elif kind not in ("none", "qemu-img"):  # qemu-img: the parent kills it
        raise ValueError(f"unknown kill point kind {kind!r}")


def child_main(argv: list[str]) -> int:
    home, vm, host, raw = argv
    spec = json.loads(raw)
    from service.bootstrap import open_service

    svc = open_service(home, host)
    _install_hook(spec, svc.app)
    svc.settle(vm)
    return 0  # the kill point was never reached


# ============================================================================ parent side


def worker_env(host: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("POSTGRES_", "PERSISTENCE_", "SQLITE_", "SNAPTREE_"))}
    env["SNAPTREE_HOST"] = host
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _qemu_img_runs(pgid: int, op: str, home: str) -> int | None:
    """Pid of a `qemu-img OP` of this data directory in process group `pgid`, if one runs."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            if not args or not args[0].endswith("qemu-img") or op not in args[1:2]:
                continue
            if not any(home in a for a in args) or os.getpgid(int(entry)) != pgid:
                continue
            return int(entry)
        except (OSError, ProcessLookupError):
            continue
    return None


@dataclass
class KillOutcome:
    reached: bool
    detail: str


def run_faulted_worker(home: str, vm: str, host: str, spec: dict[str, Any], note: str) -> KillOutcome:
    """Run the worker in a child with the kill point armed; True when it was killed there."""
    env = worker_env(host)
    env["FAULT_NOTE"] = note
    cmd = [sys.executable, "-m", "tests.fault_harness", "child", home, vm, host, json.dumps(spec)]
    sizes_before = {str(f): f.stat().st_blocks * 512 for f in Path(home).glob("vms/*/layers/*")}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    detail = ""
    if spec["kind"] == "qemu-img":
        deadline = time.monotonic() + WORKER_TIMEOUT
        while p.poll() is None and time.monotonic() < deadline:
            pid = _qemu_img_runs(p.pid, spec["op"], home)
            if pid is not None and spec.get("header_changed"):
                # Kill the instant qemu-img has rewritten the image's backing-file header (its
                # last step), i.e. before it closes the image and flushes its caches.
                target = _cmdline(pid)[-1]
                before = _qcow2_backing(target)
                while _alive(pid) and _qcow2_backing(target) == before:
                    pass
                alive = _alive(pid)
                os.killpg(p.pid, signal.SIGKILL)
                detail = (f"qemu-img {spec['op']} pid {pid} {'running' if alive else 'already ended'} "
                          f"at kill, header already points at {os.path.basename(_qcow2_backing(target) or '')}")
                break
            if pid is not None and spec.get("grown"):
                # Kill once the commit has written this much into its target (the top's backing).
                target = _qcow2_backing(_cmdline(pid)[-1]) or ""
                start = sizes_before.get(target, 0)
                while _alive(pid) and os.stat(target).st_blocks * 512 - start < int(spec["grown"]):
                    time.sleep(0.001)
            elif pid is not None:
                time.sleep(float(spec.get("delay", 0.05)))
            if pid is not None:
                alive = _alive(pid)
                os.killpg(p.pid, signal.SIGKILL)
                detail = f"qemu-img {spec['op']} pid {pid} {'running' if alive else 'already ended'} at kill"
                break
            time.sleep(0.002)
    try:
        out, err = p.communicate(timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return KillOutcome(False, "faulted worker hung")
    if spec["kind"] == "block-job" and os.path.exists(note):
        job = json.loads(Path(note).read_text())
        detail = f"job {job['id']} {job['status']} {job.get('current-progress')}/{job.get('total-progress')}"
    if p.returncode == -signal.SIGKILL:
        if spec["kind"] == "qemu-img" and "running at kill" not in detail:
            return KillOutcome(False, detail or "qemu-img never seen")
        return KillOutcome(True, detail or "killed")
    return KillOutcome(False, f"worker exited {p.returncode} without reaching the kill point: "
                              f"{err.decode(errors='replace')[-800:]}")


def run_recovery_worker(home: str, host: str) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "adapters.cli", "--home", home, "worker", "run", "--until-idle"]
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=worker_env(host), capture_output=True,
                             text=True, timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False, "worker run --until-idle did not finish"
    if res.returncode != 0:
        return False, f"exit {res.returncode}: {res.stderr.strip()[-800:]}"
    return True, ""


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return [""]


def _qcow2_backing(path: str) -> str | None:
    """The backing file name straight from a qcow2 header (no qemu-img: no image lock taken)."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            off, size = int.from_bytes(head[8:16], "big"), int.from_bytes(head[16:20], "big")
            if not off:
                return None
            f.seek(off)
            return f.read(size).decode(errors="replace")
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


# ============================================================================ models

Expected = dict[UUID, dict[str, dict[int, int]]]


def _runs(slots: dict[int, int], used: set[int]) -> list[tuple[int, int, int]]:
    """(first slot, number of slots, pattern) runs over the used slots."""
    out: list[tuple[int, int, int]] = []
    for s in sorted(used):
        want = slots.get(s, 0)
        if out and out[-1][0] + out[-1][1] == s and out[-1][2] == want:
            out[-1] = (out[-1][0], out[-1][1] + 1, want)
        else:
            out.append((s, 1, want))
    return out


@dataclass
class Model:
    """The VM under test and what each of its nodes' disks must read, per 64 KiB slot."""

    svc: Any
    name: str
    live: bool = False
    expected: Expected = field(default_factory=dict)
    used: set[int] = field(default_factory=set)
    next_pattern: int = 1
    next_slot: int = 0

    def fresh(self) -> Any:
        """A service on a freshly opened application: nothing cached from before the kill."""
        from service.bootstrap import open_service

        self.svc = open_service(str(self.svc.data.root), self.svc.host, environ={})
        return self.svc

    @property
    def vm(self) -> Any:
        return self.svc.app.get_vm(self.name)

    def write(self, nbytes: int = SLOT) -> int:
        from adapters.qemu import qemu_io
        from tests.guest import probe

        vm = self.vm
        pattern = self.next_pattern
        self.next_pattern = self.next_pattern % 250 + 1
        slot = self.next_slot
        covered = range(slot, slot + -(-nbytes // SLOT))
        self.next_slot = covered.stop
        node = vm.nodes[vm.current]
        if self.live:
            async def go(m: Any) -> None:
                for disk in node.layers:
                    await probe.qemu_io(m, disk, f"write -P {pattern:#x} {slot * SLOT} {nbytes}",
                                       timeout=30)
            self.on_vm(go)
        else:
            for path in node.layers.values():
                qemu_io.write_pattern(path, slot * SLOT, nbytes, pattern)
        for disk in node.layers:
            for s in covered:
                self.expected.setdefault(vm.current, {}).setdefault(disk, {})[s] = pattern
        self.used.update(covered)
        return pattern

    def on_vm(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(m)` on the raw QMP machine of the running VM (test I/O through its devices)."""
        from adapters.machines import QemuMachines, machine_config
        from adapters.qemu.machine import QemuMachine

        vm = self.svc.app.get_vm(self.name)
        node = vm.nodes[vm.current]

        async def go() -> Any:
            m = QemuMachine(QemuMachines(self.svc.data).run_dir(vm.name), machine_config(node.config),
                            dict(node.layers))
            await m.attach()
            try:
                await m.query_status()
                return await fn(m)
            finally:
                await m.detach()

        return asyncio.run(go())

    def inherit(self, child: UUID, parent: UUID) -> None:
        self.expected[child] = {d: dict(s) for d, s in self.expected.get(parent, {}).items()}

    def after_new_current(self) -> None:
        """After a take or an apply: the new current state reads what its parent reads."""
        vm = self.vm
        parent = vm.nodes[vm.current].parent
        assert parent is not None
        self.inherit(vm.current, parent)

    # --- checks (each returns a list of problems; empty = pass) ---

    def check_patterns(self) -> list[str]:
        from tests.guest import probe
        from domain.tree import NodeKind

        vm = self.vm
        problems: list[str] = []
        for node in vm.nodes.values():
            if node.kind is NodeKind.HIDDEN:
                continue
            exp = self.expected.get(node.id)
            if exp is None:
                problems.append(f"node {node.name or node.id}: no expectation (unknown node)")
                continue
            for disk, path in node.layers.items():
                file_runs: list[tuple[str, int, int, int]] = []
                for first, count, want in _runs(exp.get(disk, {}), self.used):
                    off, ln = first * SLOT, count * SLOT
                    label = f"{node.name or 'current'} {disk} slots {first}..{first + count - 1} want {want:#x}"
                    if node.id == vm.current and self.live:
                        async def go(m: Any, disk: str = disk, off: int = off, ln: int = ln,
                                     want: int = want) -> None:
                            await probe.qemu_io(m, disk, f"read -P {want:#x} {off} {ln}", timeout=30)
                        try:
                            self.on_vm(go)
                        except Exception as exc:  # noqa: BLE001
                            problems.append(f"{label}: {exc}")
                        continue
                    file_runs.append((label, off, ln, want))
                if file_runs:
                    problems += _read_runs(path, file_runs)
        return problems

    def check_files(self, findings: list[Any]) -> list[str]:
        vm = self.vm
        problems = [f.line() for f in findings if f.kind == "orphan_file"]
        folder = self.svc.data.vm_dir(self.name)
        in_tree = {os.path.realpath(p) for n in vm.nodes.values() for p in n.layers.values()}
        layers_dir = folder / "layers"
        on_disk = {os.path.realpath(p) for p in layers_dir.glob("*")} if layers_dir.exists() else set()
        own = {os.path.realpath(p) for p in vm.disks.values()}
        extra = on_disk - in_tree
        missing = (in_tree - own) - on_disk
        if extra:
            problems.append(f"files in layers/ no node uses: {sorted(extra)}")
        if missing:
            problems.append(f"layer files missing: {sorted(missing)}")
        temps = [str(p) for p in folder.rglob("*") if ".tmp" in p.name]
        if temps:
            problems.append(f"temp files left: {temps}")
        if vm.garbage:
            problems.append(f"garbage not removed: {sorted(vm.garbage)}")
        for p in own:
            if not os.path.exists(p):
                problems.append(f"own disk {p} is gone")
        return problems


def _read_runs(path: str, runs: list[tuple[str, int, int, int]]) -> list[str]:
    """Every run read back with one read-only qemu-io (`-r -U`: never writes the layer, works on
    the files of a running VM); on a failure each run is read alone to name the bad ones."""
    from adapters.qemu import qemu_io

    args = [qemu_io.QEMU_IO, "-r", "-U", "-f", "qcow2"]
    for _, off, ln, want in runs:
        args += ["-c", f"read -P {want} {off} {ln}"]
    res = subprocess.run([*args, os.path.abspath(path)], capture_output=True, text=True)
    out = res.stdout + res.stderr
    if res.returncode == 0 and out.count("read ") == len(runs) and "fail" not in out.lower():
        return []
    bad = []
    for label, off, ln, want in runs:
        try:
            if not qemu_io.read_matches(path, off, ln, want):
                bad.append(label)
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{label}: {exc}")
    return bad or [f"{path}: qemu-io said {out.strip()[-300:]}"]


# ============================================================================ one kill point


@dataclass
class PointResult:
    scenario: str
    point: str
    killed: str = "-"
    recovered: str = "-"
    verify: str = "-"
    patterns: str = "-"
    files: str = "-"
    vm_alive: str = "n/a"
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def row(self) -> list[str]:
        return [self.scenario, self.point, self.killed, self.recovered, self.verify,
                self.patterns, self.files, self.vm_alive, f"{self.seconds:.1f}"]


def exercise(model: Model, scenario: str, point: str, spec: dict[str, Any], note_dir: Path,
             post: Callable[[Model], None] | None = None) -> PointResult:
    """Run the worker with the kill point armed, restart it, let it drain, then check everything."""
    from domain import commands as c
    from domain.work import pending_work
    from service.verify import verify

    res = PointResult(scenario, point)
    t0 = time.monotonic()
    svc = model.svc
    home, host = str(svc.data.root), svc.host
    outcome = run_faulted_worker(home, model.name, host, spec, str(note_dir / "fault-note.json"))
    res.killed = "yes" if outcome.reached else "NO"
    if not outcome.reached:
        res.problems.append(f"kill point not reached: {outcome.detail}")
    elif outcome.detail and outcome.detail != "killed":
        res.killed = f"yes ({outcome.detail})"
    ok, why = run_recovery_worker(home, host)
    res.recovered = "ok" if ok else "FAIL"
    if not ok:
        res.problems.append(f"restarted worker: {why}")
    model.fresh()
    left = pending_work(model.vm)
    if left:
        res.recovered = "FAIL"
        res.problems.append(f"work left after the restarted worker: {left}")
    elif post is not None:
        post(model)  # what the command changed (a take's or an apply's new current state)
    report = verify(model.svc.app, model.svc.data, model.name, deep=True)  # leaks too
    res.verify = "clean" if report.clean else "FAIL"
    res.problems += [f"verify: {f.line()}" for f in report.findings]
    pat = model.check_patterns()
    res.patterns = "intact" if not pat else f"FAIL({len(pat)})"
    res.problems += [f"pattern: {p}" for p in pat]
    files = model.check_files(report.findings)
    res.files = "none" if not files else "FAIL"
    res.problems += [f"files: {p}" for p in files]
    if model.live:
        state = model.svc.handle(c.GetVMStatus(model.name)).json()["state"]
        res.vm_alive = state
        if state not in ("running", "paused"):
            res.problems.append(f"live VM is {state}")
    res.seconds = time.monotonic() - t0
    return res


def table(results: list[PointResult]) -> str:
    head = ["scenario", "kill point", "killed", "restart", "verify", "patterns", "orphans",
            "VM", "s"]
    rows = [head] + [r.row() for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    passed = sum(r.ok for r in results)
    lines.append(f"{len(results)} kill points, {passed} passed, {len(results) - passed} failed")
    for r in results:
        for p in r.problems:
            lines.append(f"  ! {r.scenario} / {r.point}: {p}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "child":
        sys.exit(child_main(sys.argv[2:]))
    raise SystemExit("usage: python -m tests.fault_harness child HOME VM HOST SPEC")
