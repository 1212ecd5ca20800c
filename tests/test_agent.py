"""The guest agent (issue 12) on the real Linux test guest, through snaptree's CLI, on TCG.

Two VMs of the Linux test guest (tests/guest/linux), booted side by side at the start:

    ga   `vm create` with the defaults: a guest agent channel, and the guest runs qemu-ga
    na   `vm create --no-agent`: no channel (the guest prints `agent=absent`)

The guest appends `<n> <uptime> <boot_id>` to /data/log.txt, fsyncs, and only then prints
`SNAPTREE-LINE n` on the console (tests/test_linux_cli.py explains the bounds this gives).
The tests run in order on these two VMs:

    1  quiesced (auto) and crash-consistent (off) takes while the guest writes; every layer
       checked offline: the quiesced ones are clean without a journal replay, the others not
    2  `--quiesce on` of na: exit 2, nothing recorded; `auto` of na: crash-consistent
    3  a freeze that fails (the guest already frozen) and one that times out: `failed: ...`,
       taken crash-consistent, and the guest ends thawed
    4  kill -9 of `snapshot take` between freeze and thaw: the guest stays frozen until the
       next worker run, which thaws it
    5  apply with memory of a quiesced snapshot: the guest's clock is set (within 2 s of the
       host's), `clock: resynced`; na's apply says `not resynced`
    6  the guest restored from the quiesced snapshot writes again, same boot
    7  the clock without the resync: an apply --paused (snaptree cannot reach the agent of a
       paused guest), resumed by the test through QMP: the clock is the snapshot's instant

The test talks to the guest agent itself (adapters/qemu/agent.py) to see the guest's freeze
state and clock; qga.sock takes one client at a time, so every connection of the test is
closed before the next snaptree command.  Numbers (frozen_ms, pause_ms with and without
quiesce, clock offsets, each test's result and wall time) are printed at the end and written
to a JSON file under the pytest tmp dir.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from adapters.qemu.agent import GuestAgent
from tests.guest.linux.build import LinuxGuest, build_linux_guest, default_cache_dir
from tests.guest.linux.check import LayerCheck, boot_ids, check_layer, console_lines
from tests.guest.linux.disk import make_data_disk
from tests.test_linux_cli import REPO, Cli, explain, process_runs

CACHE = Path(os.environ.get("SNAPTREE_LINUX_GUEST_CACHE", default_cache_dir()))
INTERVAL_MS = 50
BOOT_TIMEOUT = 120.0
MARKER = "frozen-by-snaptree"  # service/quiesce.py: in run/ while snaptree may have the guest frozen
BOOT_ID_RE = re.compile(r"^SNAPTREE-GUEST boot_id=([0-9a-f-]{36}) kernel=\S+$", re.M)
# x86_64 syscalls a process blocks in while waiting on a socket (poll, select, recvfrom,
# recvmsg, epoll_wait, pselect6, ppoll, epoll_pwait): /proc/PID/syscall's first field.
WAITING = {"7", "23", "45", "47", "232", "270", "271", "281"}


# ----------------------------------------------------------------- the VMs
@dataclass
class VM:
    name: str
    run: Path            # $SNAPTREE_HOME/vms/<name>/run
    boot_id: str | None = None

    @property
    def console_log(self) -> Path:
        return self.run / "console.log"

    @property
    def marker(self) -> Path:
        return self.run / MARKER

    def lines(self) -> list[int]:
        return console_lines(self.console_log)

    def last(self) -> int:
        lines = self.lines()
        return lines[-1] if lines else 0

    def agent(self, timeout: float = 10.0) -> GuestAgent:
        """A connection of the test's own to the guest agent (close it before any snaptree
        command that talks to the agent: qga.sock serves one client at a time)."""
        return GuestAgent(self.run / "qga.sock", timeout=timeout)

    def freeze_status(self) -> str:
        with self.agent() as ga:
            return ga.fsfreeze_status()

    def clock_offset_s(self) -> float:
        """guest clock - host clock, in seconds (the host's read around the agent's reply)."""
        with self.agent() as ga:
            t0 = time.time_ns()
            guest = ga.get_time()
            t1 = time.time_ns()
        return (guest - (t0 + t1) / 2) / 1e9

    def console_tail(self, n: int = 20) -> str:
        try:
            text = self.console_log.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-n:])

    def lines_after(self, offset: int) -> list[int]:
        with open(self.console_log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace").replace("\r", "")
        return [int(m.group(1)) for line in text.splitlines()
                if (m := re.search(r"SNAPTREE-LINE (\d+)\s*$", line))]


@dataclass
class Take:
    vm: str
    name: str
    id: str
    quiesce: str
    before: int          # last console line before `snapshot take` started
    after: int           # ... after it returned
    wall_s: float
    out: dict[str, Any]


@dataclass
class World:
    cli: Cli
    guest: LinuxGuest
    work: Path
    vms: dict[str, VM]
    numbers: dict[str, Any]
    takes: dict[str, Take] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    apply_offset: int = 0         # console.log size of ga just before test 5's apply

    def run_env(self, extra: dict[str, str], *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "adapters.cli", *args], cwd=REPO,
                              env={**self.cli.env, **extra}, capture_output=True, text=True, timeout=timeout)

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str, vm: VM | None = None) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                tail = f"\nconsole tail of {vm.name}:\n{vm.console_tail()}" if vm else ""
                raise AssertionError(f"timed out after {timeout} s waiting for {what}{tail}")
            time.sleep(0.05)

    def wait_line(self, vm: VM, above: int, timeout: float = 30.0) -> int:
        return self.wait(lambda: (n := vm.last()) > above and n, timeout, f"{vm.name}: SNAPTREE-LINE > {above}", vm)

    def need(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.done]
        if missing:
            boot = f" (boot: {self.numbers['boot_error']})" if "boot_error" in self.numbers else ""
            pytest.fail(f"an earlier step failed: {missing} did not pass{boot}", pytrace=False)

    def tree(self, vm: str) -> dict[str, Any]:
        return self.cli.json("tree", vm)

    def node(self, vm: str, node_id: str) -> dict[str, Any]:
        return next(n for n in self.tree(vm)["nodes"] if n["id"] == node_id)

    def current(self, vm: str) -> dict[str, Any]:
        tree = self.tree(vm)
        return next(n for n in tree["nodes"] if n["id"] == tree["current"])

    def take(self, vm: VM, name: str, quiesce: str, env: dict[str, str] | None = None,
             writing: bool = True) -> Take:
        """`snapshot take VM NAME --quiesce Q --json` of the running VM: a live take with memory
        (writing: the guest is expected to write on through it, i.e. it is not left frozen)."""
        args = ("snapshot", "take", vm.name, name, "--quiesce", quiesce, "--json")
        before = vm.last()
        t0 = time.monotonic()
        res = self.run_env(env or {}, *args)
        wall = time.monotonic() - t0
        after = vm.last()
        assert res.returncode == 0, explain(args, res)
        out = json.loads(res.stdout)
        t = Take(vm.name, name, out["snapshot"], quiesce, before, after, wall, out)
        self.takes[name] = t
        mem = out.get("memory") or {}
        q = out.get("quiesce") or {}
        self.numbers["takes"].append({
            "vm": vm.name, "name": name, "quiesce_asked": quiesce, "quiesce": q.get("state"),
            "filesystems": q.get("filesystems"), "frozen_ms": q.get("frozen_ms"), "pause_ms": mem.get("pause_ms"),
            "method": mem.get("method"), "wall_s": round(wall, 3), "console": [before, after]})
        assert (out["vm"], out["name"]) == (vm.name, name), out
        assert mem.get("state") == "saved", f"a live take saves the memory: {out}"
        assert isinstance(mem.get("pause_ms"), (int, float)) and 0 <= mem["pause_ms"] < 1000, out
        if writing:
            assert after > before, f"{vm.name} kept writing during the take ({before} -> {after})"
        return t


def median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def qmp(run: Path, *commands: str, timeout: float = 10.0) -> list[Any]:
    """Run QMP commands on the VM's own QMP socket (only while no snaptree command runs:
    snaptree connects to it per command). The test's way to resume a VM restored --paused:
    the CLI has no command for that."""
    out = []
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(run / "qmp.sock"))
        f = s.makefile("rwb")
        json.loads(f.readline())  # the greeting
        for cmd in ("qmp_capabilities", *commands):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "event" in reply:
                    continue
                assert "return" in reply, f"QMP {cmd}: {reply}"
                out.append(reply["return"])
                break
    return out[1:]


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def guest() -> LinuxGuest:
    return build_linux_guest(CACHE)


@pytest.fixture(scope="module")
def world(guest: LinuxGuest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("agent")
    numbers_file = tmp_path_factory.mktemp("numbers") / "agent_numbers.json"
    cli = Cli(work / "h")
    vms = {name: VM(name, cli.home / "vms" / name / "run") for name in ("ga", "na")}
    numbers: dict[str, Any] = {"interval_ms": INTERVAL_MS, "tests": {}, "takes": [], "checks": {}, "clock": {}}
    w = World(cli, guest, work, vms, numbers)
    t0 = time.monotonic()
    try:
        for name, extra in (("ga", ["--max-chain-depth", "64"]), ("na", ["--no-agent"])):
            disk = make_data_disk(work / f"{name}.qcow2")
            cli.ok("vm", "create", name, "--accel", "tcg", "--memory", "256", "--kernel", str(guest.kernel),
                   "--initrd", str(guest.initrd), "--append", guest.append(INTERVAL_MS),
                   "--disk", f"data={disk}", *extra, "--json")
        assert cli.json("vm", "show", "ga")["agent"] is True, "a guest agent channel is the default"
        assert cli.json("vm", "show", "na")["agent"] is False
        for name in vms:  # both boot side by side
            cli.ok("vm", "start", name, "--json")
        for name, vm in vms.items():
            m = w.wait(lambda: vm.console_log.exists()
                       and BOOT_ID_RE.search(vm.console_log.read_text(errors="replace")),
                       BOOT_TIMEOUT, f"{name}: the boot_id line", vm)
            vm.boot_id = m.group(1)
            w.wait_line(vm, 0, BOOT_TIMEOUT)
        text = vms["ga"].console_log.read_text(errors="replace")
        assert "SNAPTREE-GUEST agent=started" in text, vms["ga"].console_tail()
        assert "SNAPTREE-GUEST agent=absent" in vms["na"].console_log.read_text(errors="replace")
        w.wait(lambda: w.cli.json("vm", "status", "ga").get("agent") == "connected", 60,
               "ga: vm status says agent connected", vms["ga"])
        numbers["boot_both_s"] = round(time.monotonic() - t0, 2)
        w.done.add("boot")
    except BaseException as e:  # the tests say what failed: they all need("boot")
        numbers["boot_error"] = str(e)[:2000]
    try:
        yield w
    finally:
        notes = []
        for name in vms:
            res = cli.run("vm", "stop", name, "--json", timeout=120)
            if res.returncode != 0 and "not running" not in res.stderr:
                notes.append(f"vm stop {name}: exit {res.returncode}: {res.stderr.strip()}")
            st = cli.run("vm", "status", name, "--json", timeout=60)
            try:
                pid = json.loads(st.stdout).get("pid")
            except ValueError:
                pid = None
            if pid and process_runs(pid):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                if str(cli.home) in cmdline:  # ours only
                    os.kill(pid, signal.SIGKILL)
                    notes.append(f"killed {name}'s QEMU pid {pid} that vm stop left running")
        numbers["teardown"] = notes
        numbers["total_s"] = round(time.monotonic() - t0, 1)
        numbers_file.write_text(json.dumps(numbers, indent=2) + "\n")
        print_numbers(numbers, numbers_file)


@pytest.fixture(autouse=True)
def record(world: World, request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test's result and wall time, into the numbers (the call phase has been reported
    by the time this teardown runs, so session.testsfailed says whether it failed)."""
    failed = request.session.testsfailed
    t0 = time.monotonic()
    yield
    world.numbers["tests"][request.node.name] = {
        "result": "failed" if request.session.testsfailed > failed else "passed",
        "wall_s": round(time.monotonic() - t0, 2)}


def print_numbers(n: dict[str, Any], path: Path) -> None:
    out = ["", "== snaptree guest agent (Linux guest, TCG): numbers"]
    if "boot_both_s" in n:
        out.append(f"boot of both VMs (create -> first lines, agent connected): {n['boot_both_s']} s")
    if "boot_error" in n:
        out.append(f"boot failed: {n['boot_error'][:300]}")
    for name, t in n["tests"].items():
        out.append(f"{name:62} {t['result']:6} {t['wall_s']:6.2f} s")
    for t in n["takes"]:
        out.append(f"take {t['vm']}/{t['name']:4} --quiesce {t['quiesce_asked']:4} -> {str(t['quiesce'])[:70]:40}"
                   f" frozen {t['frozen_ms']} ms  pause {t['pause_ms']} ms  wall {t['wall_s']:.2f} s"
                   f"  console {t['console'][0]}..{t['console'][1]}")
    for k, v in n.get("summary", {}).items():
        out.append(f"{k:42} {v}")
    for name, c in n["checks"].items():
        out.append(f"check {name:4} {c}")
    for k, v in n["clock"].items():
        out.append(f"clock {k:36} {v}")
    for key in ("freeze_failures", "kill"):
        if key in n:
            out.append(f"{key}: {json.dumps(n[key])}")
    for note in n.get("teardown") or []:
        out.append(f"teardown: {note}")
    out.append(f"total {n.get('total_s')} s; numbers written to {path}")
    print("\n".join(out), flush=True)


def check(w: World, t: Take) -> LayerCheck:
    """The offline check of a snapshot's data layer (read-only, -U: the VM runs on an overlay
    above it, so the layer no longer changes)."""
    node = w.node(t.vm, t.id)
    t0 = time.monotonic()
    r = check_layer(node["disks"]["data"], w.work / "check")
    w.numbers["checks"][t.name] = {
        "quiesce": (node.get("quiesce") or {}).get("state"), "needs_recovery": r.needs_recovery,
        "fsck_clean_before_replay": r.fsck_clean_before_replay, "fsck_clean_after_replay": r.fsck_clean_after_replay,
        "k": r.lines, "k_before_replay": r.lines_before_replay, "console": [t.before, t.after],
        "contiguous": r.contiguous, "torn": r.torn, "check_s": round(time.monotonic() - t0, 2)}
    return r


# ----------------------------------------------------------------- 1
def test_1_quiesced_take_is_clean_without_replay_crash_consistent_is_not(world: World) -> None:
    w = world
    w.need("boot")
    ga = w.vms["ga"]
    assert w.cli.json("vm", "status", "ga")["agent"] == "connected"
    w.wait_line(ga, ga.last() + 3)
    takes = []
    for i in range(3):  # interleaved, so that both kinds see the same workload
        takes.append(w.take(ga, f"q{i}", "auto"))
        takes.append(w.take(ga, f"c{i}", "off"))
        time.sleep(0.3)
    tree = {n["id"]: n for n in w.tree("ga")["nodes"]}
    problems = []
    for t in takes:
        q = t.out["quiesce"]
        assert tree[t.id].get("quiesce") == q, f"tree --json and take --json agree: {tree[t.id]} vs {t.out}"
        assert tree[t.id]["memory"]["pause_ms"] == t.out["memory"]["pause_ms"]
        if t.quiesce == "auto":
            assert q["state"] == "frozen" and q["filesystems"] >= 1, t.out
            # The pause is inside the freeze -> thaw window.
            assert isinstance(q["frozen_ms"], (int, float)) and q["frozen_ms"] >= t.out["memory"]["pause_ms"], t.out
        else:
            assert q == {"state": "off", "filesystems": None, "frozen_ms": None}, t.out

        r = check(w, t)
        what = f"{t.name} (quiesce {q['state']}, console {t.before}..{t.after}): {w.numbers['checks'][t.name]}"
        if not r.ok:
            problems.append(f"{what}: not even crash-consistent\n{r.details}")
        # Every line the console showed before the take started was fsynced before the freeze
        # (and the switch); none can be there that it had not shown by its end (+1: in flight).
        if not t.before <= r.lines <= t.after + 1:
            problems.append(f"{what}: k={r.lines} outside {t.before}..{t.after + 1}")
        if t.quiesce == "auto":
            # Frozen: journal flushed and needs_recovery cleared; the filesystem as it is on
            # the disk, without any replay, is clean and holds all k lines.
            if r.needs_recovery or not r.fsck_clean_before_replay or r.lines_before_replay != r.lines:
                problems.append(f"{what}: a quiesced snapshot needs no journal replay\n{r.details}")
        elif not r.needs_recovery:
            problems.append(f"{what}: a crash-consistent snapshot of a mounted ext4 needs its journal replayed")
    assert not problems, "\n".join(problems)
    assert boot_ids(ga.console_log) == [ga.boot_id]

    q = [t.out for t in takes if t.quiesce == "auto"]
    c = [t.out for t in takes if t.quiesce == "off"]
    w.numbers["summary"] = {
        "frozen_ms median (3 quiesced takes)": median([o["quiesce"]["frozen_ms"] for o in q]),
        "pause_ms median, quiesced": median([o["memory"]["pause_ms"] for o in q]),
        "pause_ms median, --quiesce off": median([o["memory"]["pause_ms"] for o in c]),
        "take wall s median, quiesced": median([t.wall_s for t in takes if t.quiesce == "auto"]),
        "take wall s median, --quiesce off": median([t.wall_s for t in takes if t.quiesce == "off"]),
    }
    w.done.add("takes")


# ----------------------------------------------------------------- 2
def test_2_quiesce_on_without_agent_exits_2_and_records_nothing(world: World) -> None:
    w = world
    w.need("boot")
    na = w.vms["na"]
    assert w.cli.json("vm", "status", "na")["agent"] == "absent"

    def files() -> list[str]:  # names only: the console log and QEMU's own log may grow
        return sorted(str(p.relative_to(w.cli.home)) for p in (w.cli.home / "vms" / "na").rglob("*")
                      if p.is_file() and p.name != "console.log")

    before = (w.cli.event_count(), w.tree("na"), files())
    args = ("snapshot", "take", "na", "x", "--quiesce", "on", "--json")
    res = w.cli.run(*args)
    assert res.returncode == 2, explain(args, res)
    assert set(json.loads(res.stdout)) == {"error"}, res.stdout
    assert "--quiesce on" in res.stderr and "absent" in res.stderr, res.stderr
    assert (w.cli.event_count(), w.tree("na"), files()) == before, "a refused take recorded or changed something"
    assert w.cli.json("vm", "status", "na")["state"] == "running"

    # auto goes on without the agent: crash-consistent
    w.wait_line(na, na.last() + 3)
    t = w.take(na, "u", "auto")
    assert t.out["quiesce"]["state"] == "unavailable", t.out
    r = check(w, t)
    assert r.ok and r.needs_recovery and t.before <= r.lines <= t.after + 1, w.numbers["checks"]["u"]
    w.done.add("na-take")


# ----------------------------------------------------------------- 3
def test_3_failed_and_timed_out_freezes_are_recorded_and_leave_the_guest_thawed(world: World) -> None:
    w = world
    w.need("boot")
    ga = w.vms["ga"]
    notes: dict[str, Any] = {}
    w.numbers["freeze_failures"] = notes
    try:
        # (a) A freeze that fails at once: the guest is already frozen (by the test, through
        # the agent), and qemu-ga refuses guest-fsfreeze-freeze in that state.
        with ga.agent() as agent:
            assert agent.fsfreeze_freeze() >= 1
            assert agent.fsfreeze_status() == "frozen"
        t = w.take(ga, "fa", "auto", writing=False)  # frozen by the test when it starts
        state = t.out["quiesce"]["state"]
        assert state.startswith("failed: "), t.out
        notes["already frozen: recorded"] = state
        assert w.node("ga", t.id)["quiesce"]["state"] == state
        # snaptree's error path thaws (service/quiesce.py), even a freeze it did not make: noted.
        notes["already frozen: guest after the take"] = ga.freeze_status()
        if notes["already frozen: guest after the take"] == "frozen":
            with ga.agent() as agent:
                agent.fsfreeze_thaw()
        assert not ga.marker.exists(), f"{ga.marker} left after a failed freeze that was thawed"

        # (b) A freeze whose answer cannot come in time. A hung agent is hard to make on demand
        # (the freeze itself takes ~40 ms here); SNAPTREE_FREEZE_TIMEOUT=0.001 gives the same
        # situation deterministically: the freeze request is sent, snaptree stops waiting after
        # 1 ms, and the agent goes on to freeze the guest afterwards, as a slow agent would.
        # Whatever the timeout, snaptree promises the thaw (docs/semantics.md, "Quiesce"): when
        # the take has returned, the guest must not stay frozen.
        w.wait_line(ga, ga.last() + 2)
        t = w.take(ga, "ft", "auto", env={"SNAPTREE_FREEZE_TIMEOUT": "0.001"}, writing=False)
        state = t.out["quiesce"]["state"]
        notes["timed out: recorded"] = state
        assert state.startswith("failed: ") and "0.001" in state, t.out
        assert t.out["quiesce"]["frozen_ms"] is None and t.out["memory"]["state"] == "saved", t.out
        assert w.node("ga", t.id)["quiesce"]["state"] == state
        # Give a late thaw 3 s to land before judging.
        deadline = time.monotonic() + 3.0
        while (status := ga.freeze_status()) == "frozen" and time.monotonic() < deadline:
            time.sleep(0.2)
        notes["timed out: guest after the take"] = status
        notes["timed out: marker left"] = ga.marker.exists()
        n0 = ga.last()
        assert status == "thawed", (
            f"after `snapshot take` with a timed-out freeze ({state}) returned exit 0, the guest is still "
            f"frozen (guest-fsfreeze-status) and {MARKER} is {'still there' if ga.marker.exists() else 'gone'}; "
            f"its workload stopped at line {n0}")
        assert not ga.marker.exists()
    finally:
        # Leave the guest thawed for the next tests (and let snaptree clear its own marker:
        # the next command that attaches to the VM does).
        if ga.freeze_status() == "frozen":
            with ga.agent() as agent:
                agent.fsfreeze_thaw()
            notes["thawed by the test"] = True
    w.wait_line(ga, ga.last() + 3)


# ----------------------------------------------------------------- 4
def test_4_kill_9_between_freeze_and_thaw_then_the_next_worker_run_thaws(world: World) -> None:
    w = world
    w.need("boot")
    ga = w.vms["ga"]
    rec: dict[str, Any] = {"attempts": []}
    w.numbers["kill"] = rec
    if ga.marker.exists():
        # Left by an earlier test's failure (test 3): a take attaches and clears it first.
        rec["marker_before"] = "present: cleared by a --quiesce off take"
        w.take(ga, "clr", "off")
        assert not ga.marker.exists(), f"the take that attached to ga left {ga.marker}"
    assert ga.freeze_status() == "thawed"
    w.wait_line(ga, ga.last() + 3)

    # The take's host work runs in the CLI process itself: kill it, with its process group,
    # once the marker is there (written just before the freeze) and the process waits on a
    # socket: the freeze request has then been sent (after the marker come only its fsync and
    # the request; the agent probe comes before it). The guest freezes even though nobody
    # waits for the answer any more. The window is ~100 ms (frozen_ms); a kill that missed it
    # (the guest found thawed) is retried with a new take.
    for attempt in range(3):
        name = f"k{attempt}"
        args = [sys.executable, "-m", "adapters.cli", "snapshot", "take", "ga", name, "--json"]
        p = subprocess.Popen(args, cwd=REPO, env=w.cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
        t0 = time.monotonic()
        seen = killed = None
        syscall = None
        while p.poll() is None and time.monotonic() - t0 < 60:
            if seen is None and ga.marker.exists():
                seen = time.monotonic()
            if seen is not None:
                try:
                    syscall = Path(f"/proc/{p.pid}/syscall").read_text().split()[0]
                except (OSError, IndexError):
                    syscall = None
                if syscall in WAITING:
                    os.killpg(p.pid, signal.SIGKILL)
                    killed = time.monotonic()
                    break
            time.sleep(0.0005)
        else:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=30)
        marker_after = ga.marker.exists()
        status = ga.freeze_status() if killed is not None else None
        a = {"name": name, "rc": p.returncode, "marker_after_s": seen and round(seen - t0, 3),
             "kill_after_marker_ms": killed and seen and round((killed - seen) * 1000, 2), "syscall": syscall,
             "marker_after_kill": marker_after, "guest_after_kill": status}
        rec["attempts"].append(a)
        if status == "frozen":
            break
        # Missed the window: that take is completed by the worker run, then try again.
        res = w.cli.run("worker", "run", "--until-idle", "--json")
        assert res.returncode == 0, explain(["worker", "run", "--until-idle"], res)
    else:
        pytest.fail(f"3 kills missed the freeze window: {rec['attempts']}")
    assert p.returncode == -signal.SIGKILL, a
    assert marker_after, f"the guest is frozen but snaptree left no {MARKER} marker: {a}"

    # Frozen: the workload's write blocks, the console stops (one line may have been in flight).
    n0 = ga.last()
    time.sleep(1.0)
    n1 = ga.last()
    rec["console_while_frozen"] = [n0, n1]
    assert n1 <= n0 + 1, f"the console went on from {n0} to {n1} while the guest was frozen"

    t0 = time.monotonic()
    res = w.cli.run("worker", "run", "--until-idle", "--json")
    rec["worker_run_s"] = round(time.monotonic() - t0, 2)
    assert res.returncode == 0, explain(["worker", "run", "--until-idle"], res)
    rec["guest_after_worker_run"] = status = ga.freeze_status()
    assert status == "thawed", f"after worker run --until-idle the guest is {status}"
    assert not ga.marker.exists(), f"{ga.marker} is still there after the thaw"
    n2 = w.wait_line(ga, n1 + 3, 20)
    rec["console_after_worker_run"] = n2
    # The killed take was recorded before its host work: the worker run completed it.
    node = w.node("ga", json.loads(out)["snapshot"] if out.strip() else
                  next(n["id"] for n in w.tree("ga")["nodes"] if n["name"] == name))
    rec["killed_take_after_worker_run"] = {"ready": node.get("ready"), "memory": node["memory"]["state"],
                                           "quiesce": node.get("quiesce"), "failure": node.get("failure")}
    assert node.get("ready") and node["memory"]["state"] == "saved" and not node.get("failure"), node

    res = w.cli.run("audit", "verify", "ga", "--json")
    rec["audit_verify"] = res.stdout[-1500:]
    assert res.returncode == 0, explain(["audit", "verify", "ga"], res)
    verdict = json.loads(res.stdout)
    assert verdict["clean"] is True and verdict["findings"] == [], verdict


# ----------------------------------------------------------------- 5
def test_5_apply_with_memory_resyncs_the_clock(world: World) -> None:
    w = world
    w.need("boot", "takes")
    ga, na = w.vms["ga"], w.vms["na"]
    w.numbers["clock"]["ga before any apply (boot clock from the RTC)"] = round(ga.clock_offset_s(), 3)
    t = w.takes["q2"]  # quiesced: its memory was saved with the filesystems frozen
    w.apply_offset = ga.console_log.stat().st_size
    w.numbers["apply"] = {"console_before": ga.last()}
    t0 = time.monotonic()
    res = w.cli.run("snapshot", "apply", "ga", "q2", "--json")
    w.numbers["apply"]["wall_s"] = round(time.monotonic() - t0, 2)
    assert res.returncode == 0, explain(["snapshot", "apply", "ga", "q2"], res)
    offset = ga.clock_offset_s()
    w.numbers["clock"]["ga right after the apply (resynced)"] = round(offset, 4)
    cur = w.current("ga")
    w.numbers["clock"]["ga clock note"] = cur.get("clock")
    assert cur["parent"] == t.id, cur
    assert cur.get("clock") == "resynced", cur
    assert abs(offset) < 2.0, f"the guest's clock is {offset:+.3f} s off the host's after the resync"

    res = w.cli.run("snapshot", "apply", "na", "u", "--json")
    assert res.returncode == 0, explain(["snapshot", "apply", "na", "u"], res)
    cur = w.current("na")
    w.numbers["clock"]["na clock note (no agent)"] = cur.get("clock")
    assert str(cur.get("clock")).startswith("not resynced") and "absent" in cur["clock"], cur
    w.wait_line(na, 0)
    w.done.add("apply")


# ----------------------------------------------------------------- 6
def test_6_restored_from_a_quiesced_snapshot_the_guest_writes_again(world: World) -> None:
    w = world
    w.need("boot", "takes", "apply")
    ga = w.vms["ga"]
    t = w.takes["q2"]
    pre = w.numbers["apply"]["console_before"]

    def restored() -> list[int]:
        nums = ga.lines_after(w.apply_offset)
        prev = pre  # the replaced QEMU may have printed a few more lines: skip to the drop
        for i, n in enumerate(nums):
            if n <= prev:
                return nums[i:]
            prev = n
        return []

    lines = w.wait(lambda: len(r := restored()) >= 10 and r, 30, "the restored guest to print 10 lines", ga)
    w.numbers["apply"]["restored_first_lines"] = lines[:3]
    w.numbers["apply"]["snapshot_console"] = [t.before, t.after]
    # Its memory is q2's: the count resumes at q2's instant and goes on one by one.
    assert t.before <= lines[0] <= t.after + 2, f"first restored line {lines[0]}, q2 at {t.before}..{t.after}"
    assert lines[1:] == list(range(lines[1], lines[1] + len(lines) - 1)) and lines[1] in (lines[0], lines[0] + 1), \
        f"restored lines {lines[:20]}"
    assert ga.freeze_status() == "thawed"
    assert boot_ids(ga.console_log) == [ga.boot_id], "a restore with memory is no boot"
    assert w.cli.json("vm", "status", "ga")["state"] == "running"


# ----------------------------------------------------------------- 7
def test_7_without_the_resync_the_clock_stays_at_the_snapshot(world: World) -> None:
    """The contrast of test 5 on the same guest: `apply --paused` records `not resynced` (no agent
    runs in a paused guest) and the test resumes the VM through QMP (`cont`; the CLI has no
    resume): the guest's clock is then where it was at the snapshot, behind by its age.
    The snapshot is crash-consistent (--quiesce off): a quiesced one would come back frozen."""
    w = world
    w.need("boot", "apply")
    ga = w.vms["ga"]
    t = w.take(ga, "p", "off")
    taken = time.time()
    time.sleep(4.0)
    res = w.cli.run("snapshot", "apply", "ga", "p", "--paused", "--json")
    assert res.returncode == 0, explain(["snapshot", "apply", "ga", "p", "--paused"], res)
    cur = w.current("ga")
    w.numbers["clock"]["ga clock note (apply --paused)"] = cur.get("clock")
    assert cur["parent"] == t.id and str(cur.get("clock")).startswith("not resynced"), cur
    assert w.cli.json("vm", "status", "ga")["state"] == "paused"
    qmp(ga.run, "cont")
    resumed = time.time()
    offset = ga.clock_offset_s()
    w.numbers["clock"]["ga after apply --paused + cont (not resynced)"] = round(offset, 3)
    w.numbers["clock"]["age of that snapshot at the resume (s)"] = round(resumed - taken, 3)
    # Behind by the snapshot's age (~4.5 s here), give or take the boot clock's own offset (< 1 s).
    assert offset < -2.0, f"without the resync the guest's clock is only {offset:+.3f} s off"
    assert abs(offset + (resumed - taken)) < 2.0, (offset, resumed - taken)
    w.wait_line(ga, ga.last() + 3)
