"""The real Linux test guest driven only through snaptree's CLI (issue 11), on TCG.

Every snaptree operation here is a `python -m adapters.cli ...` subprocess against the
module's own data directory; the test reads nothing but what a user could read: the CLI's
output, the console log the CLI points at (`vm show --json` -> console.log; `vm console
--log` prints the same bytes), the forwarded web port, and, once the VM is stopped, the
layer files `tree --json` names (tests/guest/linux/check.py, read-only).

One VM runs the live sequence (the tests below run in order and share it):

    boot -> s1, s2, s3 taken live while the guest writes -> apply s2 (memory) -> take sR
         -> delete s1 (1 dependent: merged at once, online)
         -> delete s2 (2 dependents, s3 and sR: hidden, merge pending)
         -> apply s3 (memory) -> stop -> offline check of s3, sR (and of the current state)

The guest (tests/guest/linux/init.sh) appends `<n> <uptime> <boot_id>` to /data/log.txt,
fsyncs, and only then prints `SNAPTREE-LINE n` on the serial console. So when the console
shows n, line n is on the disk: a snapshot whose switch came after the console showed n
holds at least n lines, and it cannot hold a line the console had not shown by the time
the take returned (the guest prints each line within milliseconds of its fsync). The
bounds below follow from that and nothing looser.

Numbers (boot, lines/s, pause, memory, wall times, checks, guest size) are printed at the
end (`pytest -s` shows them) and written to a JSON file under the pytest tmp dir.
Anything missing (a tool, the guest's packages) fails; nothing here is ever skipped.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.guest.linux import HOST_PACKAGES
from tests.guest.linux.build import LinuxGuest, build_linux_guest, default_cache_dir
from tests.guest.linux.check import LINE_RE, boot_ids, check_layer, console_lines
from tests.guest.linux.disk import make_data_disk
from tests.guest.linux.vm import free_port

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SNAPTREE_LINUX_GUEST_CACHE", default_cache_dir()))
TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "dpkg-query", "ldd", "mkfs.ext4", "dumpe2fs", "e2fsck",
         "debugfs", "qemu-img", "qemu-system-x86_64")
VM = "lin"
INTERVAL_MS = 50      # the guest's pause between two lines (~14 lines/s on TCG with the fsyncs)
BOOT_TIMEOUT = 120.0  # to the first SNAPTREE-LINE; ~5 s on an idle machine
CLI_TIMEOUT = 180.0
BOOT_ID_RE = re.compile(r"^SNAPTREE-GUEST boot_id=([0-9a-f-]{36}) kernel=(\S+)$", re.M)


# ----------------------------------------------------------------- the CLI
class Cli:
    """`python -m adapters.cli` with its own data directory (no SNAPTREE_* from outside)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SNAPTREE_", "SQLITE_", "POSTGRES_", "PERSISTENCE_"))}
        env.update(SNAPTREE_HOME=str(home), COLUMNS="160")
        self.env = env

    def run(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "adapters.cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def timed(self, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
        t = time.monotonic()
        res = self.run(*args)
        return res, time.monotonic() - t

    def ok(self, *args: str) -> str:
        res = self.run(*args)
        assert res.returncode == 0, explain(args, res)
        return res.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def event_count(self) -> int:
        con = sqlite3.connect(self.home / "snaptree.sqlite")
        try:
            return int(con.execute("SELECT COUNT(*) FROM stored_events").fetchone()[0])
        finally:
            con.close()


def explain(args: tuple[str, ...] | list[str], res: subprocess.CompletedProcess[str]) -> str:
    return (f"snaptree {' '.join(args)} -> exit {res.returncode}\n--- stdout\n{res.stdout[-3000:]}"
            f"\n--- stderr\n{res.stderr[-3000:]}")


def http_get(port: int, timeout: float = 30.0) -> str:
    """GET / on the forwarded port, retrying while the guest's httpd is not reachable yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                return r.read().decode()
        except OSError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"http://127.0.0.1:{port}/ did not answer in {timeout} s: {e}") from e
            time.sleep(0.2)


# ----------------------------------------------------------------- the module's VM
@dataclass
class Take:
    name: str
    id: str
    before: int          # last SNAPTREE-LINE on the console just before `snapshot take` started
    after: int           # ... just after it returned
    wall_s: float
    memory: dict[str, Any]


@dataclass
class Live:
    cli: Cli
    guest: LinuxGuest
    work: Path
    disk: Path
    port: int
    console_log: Path
    numbers: dict[str, Any]
    boot_id: str | None = None
    takes: dict[str, Take] = field(default_factory=dict)
    stopped_at_line: int | None = None  # last console line when `vm stop` returned
    done: set[str] = field(default_factory=set)  # the steps of the sequence that passed

    def lines(self) -> list[int]:
        return console_lines(self.console_log)

    def last(self) -> int:
        lines = self.lines()
        return lines[-1] if lines else 0

    def console_tail(self, n: int = 25) -> str:
        try:
            text = self.console_log.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-n:])

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                status = self.cli.run("vm", "status", VM, "--json")
                raise AssertionError(f"timed out after {timeout} s waiting for {what}\nconsole tail:\n"
                                     f"{self.console_tail()}\nvm status: {status.stdout}{status.stderr}")
            time.sleep(0.05)

    def wait_line(self, above: int, timeout: float = 60.0) -> int:
        return self.wait(lambda: (n := self.last()) > above and n, timeout, f"SNAPTREE-LINE > {above}")

    def need(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.done]
        if missing:
            pytest.fail(f"an earlier step of the live sequence failed: {missing} did not pass", pytrace=False)

    def take(self, name: str) -> Take:
        before = self.last()
        res, wall = self.cli.timed("snapshot", "take", VM, name, "--json")
        after = self.last()
        assert res.returncode == 0, explain(("snapshot", "take", VM, name, "--json"), res)
        out = json.loads(res.stdout)
        t = Take(name, out["snapshot"], before, after, wall, out.get("memory") or {})
        self.takes[name] = t
        self.numbers["takes"].append({
            "name": name, "wall_s": round(wall, 3), "pause_ms": t.memory.get("pause_ms"),
            "memory_bytes": t.memory.get("bytes"), "method": t.memory.get("method"),
            "console_before": before, "console_after": after})
        assert (out["vm"], out["name"]) == (VM, name), out
        mem = t.memory
        assert mem.get("state") == "saved", f"a live take saves the memory: {out}"
        assert isinstance(mem.get("pause_ms"), (int, float)) and 0 <= mem["pause_ms"] < 1000, \
            f"a live take pauses the guest briefly, not {mem.get('pause_ms')} ms: {out}"
        assert isinstance(mem.get("bytes"), int) and 0 < mem["bytes"] <= 2 * 256 * 2**20, out
        assert Path(mem["path"]).is_file() and Path(mem["path"]).stat().st_size == mem["bytes"], out
        assert after > before, f"the guest kept writing during the take ({before} -> {after})"
        return t

    def restored_lines(self, offset: int, previous: int) -> list[int]:
        """The console lines the restored guest printed: those after the first drop in the
        numbering in what the log got after byte `offset` (the QEMU being replaced may still
        have printed a few lines there, continuing from `previous`)."""
        with open(self.console_log, "rb") as f:
            f.seek(offset)
            chunk = f.read().decode(errors="replace").replace("\r", "")
        nums = [int(m.group(1)) for line in chunk.splitlines()
                if (m := re.search(r"SNAPTREE-LINE (\d+)\s*$", line))]
        prev = previous
        for i, n in enumerate(nums):
            if n <= prev:
                return nums[i:]
            prev = n
        return []

    def apply(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """`snapshot apply` of a snapshot with memory; checks the guest resumes at its instant."""
        t = self.takes[name]
        offset = self.console_log.stat().st_size
        pre = self.last()
        t0 = time.monotonic()
        res = self.cli.run("snapshot", "apply", VM, name, "--json")
        wall = time.monotonic() - t0
        assert res.returncode == 0, explain(("snapshot", "apply", VM, name, "--json"), res)
        out = json.loads(res.stdout)
        assert out["vm"] == VM and out["snapshot"] == name, out
        restored = self.wait(lambda: len(r := self.restored_lines(offset, pre)) >= 5 and r, timeout,
                             f"the guest restored from {name} to print 5 lines")
        first_s = time.monotonic() - t0
        first = restored[0]
        rec = {"snapshot": name, "wall_s": round(wall, 3), "to_first_line_s": round(first_s, 3),
               "console_before_apply": pre, "first_line_after": first,
               "snapshot_console_range": [t.before, t.after]}
        self.numbers["applies"].append(rec)
        # The memory is the snapshot's: the numbering goes back to the snapshot's instant
        # (between the console before and after its take; +2: the line in flight then and the
        # next), far below where the replaced guest was, and then counts on one by one.
        assert t.before <= first <= t.after + 2, \
            f"first line after restoring {name}: {first}, the snapshot was taken at {t.before}..{t.after}: {rec}"
        assert first <= pre - 10, f"the counter did not go back: {first} after {pre}: {rec}"
        assert restored[1:] == list(range(restored[1], restored[1] + len(restored) - 1)) and \
            restored[1] in (first, first + 1), f"restored lines {restored[:20]}"
        ids = boot_ids(self.console_log)
        assert ids == [self.boot_id], f"a restore with memory is no boot: boot ids on the console {ids}"
        status = self.cli.json("vm", "status", VM)
        assert status["state"] == "running" and status["pid"], status
        tree = self.cli.json("tree", VM)
        cur = next(n for n in tree["nodes"] if n["id"] == tree["current"])
        assert cur["parent"] == t.id, f"the current state is a child of {name}: {cur}"
        return rec


def kill_leftover(cli: Cli) -> str | None:
    """After `vm stop`: SIGKILL the QEMU `vm status` still reports (only if it is ours)."""
    res = cli.run("vm", "status", VM, "--json", timeout=60)
    try:
        pid = json.loads(res.stdout).get("pid")
    except ValueError:
        return f"vm status failed: {res.stderr.strip()}"
    if not pid:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return None
    if not process_runs(pid):
        return None
    if str(cli.home) not in cmdline:
        return f"pid {pid} is not this test's QEMU: left alone"
    os.kill(pid, signal.SIGKILL)
    return f"killed QEMU pid {pid} that `vm stop` left running"


@pytest.fixture(scope="module")
def guest() -> LinuxGuest:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing host tools {missing}: apt-get install {' '.join(HOST_PACKAGES)}", pytrace=False)
    return build_linux_guest(CACHE)


@pytest.fixture(scope="module")
def numbers_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("numbers") / "linux_cli_numbers.json"


@pytest.fixture(scope="module")
def live(guest: LinuxGuest, tmp_path_factory: pytest.TempPathFactory, numbers_file: Path) -> Iterator[Live]:
    work = tmp_path_factory.mktemp("linux-cli")
    cli = Cli(work / "h")
    numbers: dict[str, Any] = {
        "guest": {"kernel_version": guest.kernel_version, "kernel_bytes": guest.kernel_size,
                  "initrd_bytes": guest.initrd_size, "total_bytes": guest.kernel_size + guest.initrd_size},
        "interval_ms": INTERVAL_MS, "takes": [], "applies": [], "deletes": [], "checks": {},
    }
    disk = make_data_disk(work / "data.qcow2")
    port = free_port()
    lv = Live(cli, guest, work, disk, port, cli.home / "vms" / VM / "run" / "console.log", numbers)
    try:
        yield lv
    finally:
        notes = []
        res = cli.run("vm", "stop", VM, "--json", timeout=120)
        if res.returncode != 0 and "not running" not in res.stderr:
            notes.append(f"vm stop in teardown: exit {res.returncode}: {res.stderr.strip()}")
        if (note := kill_leftover(cli)) is not None:
            notes.append(note)
        numbers["teardown"] = notes
        numbers["steps_passed"] = sorted(lv.done)
        numbers_file.write_text(json.dumps(numbers, indent=2) + "\n")
        print_numbers(numbers, numbers_file)


def print_numbers(n: dict[str, Any], path: Path) -> None:
    out = ["", "== snaptree CLI + Linux guest (TCG): numbers"]
    g = n["guest"]
    out.append(f"guest {g['kernel_version']}: kernel {g['kernel_bytes']} B + initrd {g['initrd_bytes']} B"
               f" = {g['total_bytes'] / 2**20:.1f} MiB")
    for key, label in (("boot_to_first_line_s", "boot (vm start -> first SNAPTREE-LINE)"),
                       ("boot_to_boot_id_s", "boot (vm start -> boot_id line)"),
                       ("vm_create_s", "vm create wall"), ("vm_start_s", "vm start wall"),
                       ("lines_per_s_idle", "lines/s (idle)"), ("lines_per_s_during_takes", "lines/s (across takes)"),
                       ("stop_s", "vm stop wall")):
        if key in n:
            out.append(f"{label:42} {n[key]}")
    for t in n["takes"]:
        mb = f"{t['memory_bytes'] / 2**20:.1f} MiB" if t.get("memory_bytes") else "?"
        out.append(f"take {t['name']:3} wall {t['wall_s']:.2f} s  pause {t['pause_ms']} ms  memory {mb}"
                   f" ({t['method']})  console {t['console_before']}..{t['console_after']}")
    for a in n["applies"]:
        out.append(f"apply {a['snapshot']:3} wall {a['wall_s']:.2f} s  first restored line {a['first_line_after']}"
                   f" after {a['to_first_line_s']:.2f} s (console was {a['console_before_apply']}; snapshot "
                   f"{a['snapshot_console_range'][0]}..{a['snapshot_console_range'][1]})")
    for d in n["deletes"]:
        out.append(f"delete {d['snapshot']:3} ({d['dependents']} dependents) wall {d['wall_s']:.2f} s -> {d['outcome']}")
    for name, c in n["checks"].items():
        out.append(f"check {name:8} {c}")
    for note in n.get("teardown") or []:
        out.append(f"teardown: {note}")
    out.append(f"numbers written to {path}")
    print("\n".join(out), flush=True)


# ----------------------------------------------------------------- the live sequence
def test_boot_console_log_and_forwarded_port(live: Live, guest: LinuxGuest) -> None:
    cli = live.cli
    res, t_create = cli.timed(
        "vm", "create", VM, "--accel", "tcg", "--memory", "256", "--kernel", str(guest.kernel),
        "--initrd", str(guest.initrd), "--append", guest.append(INTERVAL_MS),
        "--disk", f"data={live.disk}", "--nic", f"user,hostfwd=tcp::{live.port}-:80", "--json")
    assert res.returncode == 0, explain(["vm", "create", VM], res)
    live.numbers["vm_create_s"] = round(t_create, 3)
    shown = cli.json("vm", "show", VM)
    assert shown["accel"] == "tcg" and shown["kernel"] == str(guest.kernel.resolve())
    assert shown["nics"][0]["hostfwd"] == [f"tcp:127.0.0.1:{live.port}-:80"], shown["nics"]
    assert Path(shown["console"]["log"]) == live.console_log, shown["console"]

    t0 = time.monotonic()
    res = cli.run("vm", "start", VM, "--json")
    live.numbers["vm_start_s"] = round(time.monotonic() - t0, 3)
    assert res.returncode == 0, explain(["vm", "start", VM], res)
    live.wait(lambda: live.console_log.exists() and BOOT_ID_RE.search(live.console_log.read_text(errors="replace")),
              BOOT_TIMEOUT, "the boot_id line")
    live.numbers["boot_to_boot_id_s"] = round(time.monotonic() - t0, 2)
    live.wait_line(0, BOOT_TIMEOUT)
    live.numbers["boot_to_first_line_s"] = round(time.monotonic() - t0, 2)
    status = cli.json("vm", "status", VM)
    assert status["state"] == "running" and status["pid"], status

    live.wait_line(5, 60)
    res = cli.run("vm", "console", VM, "--log")
    assert res.returncode == 0, explain(["vm", "console", VM, "--log"], res)
    text = res.stdout.replace("\r", "")
    assert live.console_log.read_bytes().decode(errors="replace").replace("\r", "").startswith(text), \
        "`vm console --log` prints the console log"
    m = BOOT_ID_RE.search(text)
    assert m and m.group(2) == guest.kernel_version, text[-2000:]
    live.boot_id = m.group(1)
    assert "SNAPTREE-GUEST error" not in text, text[-2000:]
    shown_lines = [int(x) for x in re.findall(r"^SNAPTREE-LINE (\d+)$", text, re.M)]
    assert len(shown_lines) >= 5 and shown_lines == list(range(1, len(shown_lines) + 1)), shown_lines

    body = http_get(live.port)
    mm = LINE_RE.fullmatch(body.strip().encode())
    assert mm, body
    assert mm.group(3).decode() == live.boot_id and int(mm.group(1)) >= shown_lines[-1], body

    # The running VM holds its forwarded port: another VM may not be given it.
    listed = cli.json("vm", "list")
    other = make_data_disk(live.work / "other.qcow2", size_mib=8)
    res = cli.run("vm", "create", "other", "--disk", str(other), "--nic",
                  f"user,hostfwd=tcp::{live.port}-:80", "--json")
    assert res.returncode == 2 and "in use" in res.stderr, explain(["vm", "create", "other"], res)
    assert cli.json("vm", "list") == listed
    live.done.add("boot")


def test_live_takes_while_the_guest_writes(live: Live) -> None:
    live.need("boot")
    live.wait_line(live.last() + 3, 30)  # writing steadily
    n0, t0 = live.last(), time.monotonic()
    live.take("s1")
    time.sleep(1.0)
    live.take("s2")
    time.sleep(1.0)
    live.take("s3")
    n1, t1 = live.last(), time.monotonic()
    live.numbers["lines_per_s_during_takes"] = round((n1 - n0) / (t1 - t0), 1)
    time.sleep(2.0)  # idle: the guest runs on well past s3 before the apply
    n2, t2 = live.last(), time.monotonic()
    live.numbers["lines_per_s_idle"] = round((n2 - n1) / (t2 - t1), 1)
    assert n2 > n1 > n0

    tree = live.cli.json("tree", VM)
    by_name = {n["name"]: n for n in tree["nodes"] if n["kind"] == "snapshot"}
    assert set(by_name) == {"s1", "s2", "s3"}, tree
    assert by_name["s2"]["parent"] == by_name["s1"]["id"] and by_name["s3"]["parent"] == by_name["s2"]["id"]
    for name, node in by_name.items():
        assert node["id"] == live.takes[name].id
        assert node["memory"]["state"] == "saved", node
    cur = next(n for n in tree["nodes"] if n["id"] == tree["current"])
    assert cur["kind"] == "current" and cur["parent"] == by_name["s3"]["id"], cur
    assert boot_ids(live.console_log) == [live.boot_id], "the takes did not reboot the guest"
    live.done.add("takes")


def test_apply_with_memory_resumes_at_the_snapshot_and_the_nic_answers(live: Live) -> None:
    live.need("boot", "takes")
    rec = live.apply("s2")
    first = rec["first_line_after"]
    body = http_get(live.port)
    m = LINE_RE.fullmatch(body.strip().encode())
    assert m, body
    assert m.group(3).decode() == live.boot_id, f"same boot id after the restore: {body}"
    assert first - 1 <= int(m.group(1)) < rec["console_before_apply"], \
        f"the web page shows the restored guest's log ({body.strip()}), not the replaced one's"
    live.wait_line(live.last() + 10, 30)
    live.take("sR")  # a snapshot of the restored guest: its disk must continue the memory's count
    live.done.add("apply")


def test_online_deletes_then_apply_and_stop(live: Live) -> None:
    live.need("boot", "takes", "apply")
    cli = live.cli
    ids = {name: t.id for name, t in live.takes.items()}
    offset, before = live.console_log.stat().st_size, live.last()

    # s1 has one dependent (s2): merged at once, while the guest runs on its chain.
    res, wall = cli.timed("snapshot", "delete", VM, "s1", "--json")
    assert res.returncode == 0, explain(["snapshot", "delete", VM, "s1"], res)
    tree = cli.json("tree", VM)
    assert ids["s1"] not in {n["id"] for n in tree["nodes"]}, f"s1 merged away, not kept: {tree['nodes']}"
    assert [r for r in cli.json("merges", VM) if r["node"] == ids["s1"]] == []
    live.numbers["deletes"].append({"snapshot": "s1", "dependents": 1, "wall_s": round(wall, 3),
                                    "outcome": "merged"})

    # s2 has two (s3 and sR): hidden, its merge waits.
    res, wall = cli.timed("snapshot", "delete", VM, "s2", "--json")
    assert res.returncode == 0, explain(["snapshot", "delete", VM, "s2"], res)
    tree = cli.json("tree", VM)
    node = next((n for n in tree["nodes"] if n["id"] == ids["s2"]), None)
    assert node is not None and node["kind"] == "hidden", f"s2 stays as a hidden node: {tree['nodes']}"
    rows = [r for r in cli.json("merges", VM) if r["node"] == ids["s2"]]
    assert len(rows) == 1 and rows[0]["dependents"] == 2 and rows[0]["state"] == "pending", rows
    live.numbers["deletes"].append({"snapshot": "s2", "dependents": 2, "wall_s": round(wall, 3),
                                    "outcome": f"hidden, {rows[0]['state']} ({rows[0]['blocked_by']})"})

    # The guest never stopped: one run of consecutive lines through both deletes.
    live.wait_line(live.last() + 3, 30)
    with open(live.console_log, "rb") as f:
        f.seek(offset)
        during = console_lines_of(f.read())
    assert during and during == list(range(during[0], during[0] + len(during))) and during[0] <= before + 1, \
        f"console during the deletes: {during[:5]}..{during[-5:]} (before: {before})"
    assert cli.json("vm", "status", VM)["state"] == "running"

    live.apply("s3")  # s2's two dependents are still s3 and sR: it stays hidden
    rows = [r for r in cli.json("merges", VM) if r["node"] == ids["s2"]]
    assert len(rows) == 1 and rows[0]["state"] == "pending", rows

    live.wait_line(live.last() + 5, 30)
    pid = cli.json("vm", "status", VM)["pid"]
    res, wall = cli.timed("vm", "stop", VM, "--json")
    live.stopped_at_line = live.last()
    live.numbers["stop_s"] = round(wall, 3)
    assert res.returncode == 0, explain(["vm", "stop", VM], res)
    status = cli.json("vm", "status", VM)
    assert status["state"] == "stopped" and status["pid"] is None, status
    assert not process_runs(pid), f"QEMU pid {pid} still runs after vm stop"
    live.done.add("deletes")


def process_runs(pid: int) -> bool:
    """pid exists and has not exited (a zombie, not reaped yet by whoever adopted it, has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def console_lines_of(data: bytes) -> list[int]:
    text = data.decode(errors="replace").replace("\r", "")
    return [int(m.group(1)) for line in text.splitlines() if (m := re.search(r"SNAPTREE-LINE (\d+)\s*$", line))]


def test_offline_every_visible_snapshot_is_consistent(live: Live) -> None:
    live.need("boot", "takes", "apply", "deletes")
    tree = live.cli.json("tree", VM)
    visible = {n["name"]: n for n in tree["nodes"] if n["kind"] == "snapshot"}
    assert set(visible) == {"s3", "sR"}, [(n["name"], n["kind"]) for n in tree["nodes"]]
    # Beyond the visible ones: the hidden s2 (its layer went through the online merge of s1)
    # and the current state (the guest restored from s3, stopped by `vm stop`).
    hidden = next(n for n in tree["nodes"] if n["id"] == live.takes["s2"].id)
    current = next(n for n in tree["nodes"] if n["id"] == tree["current"])
    restored_first = {a["snapshot"]: a["first_line_after"] for a in live.numbers["applies"]}
    problems: list[str] = []
    for name, node in [*sorted(visible.items()), ("s2", hidden), ("current", current)]:
        label = f"{name} (hidden)" if node["kind"] == "hidden" else name
        t0 = time.monotonic()
        r = check_layer(node["disks"]["data"], live.work / "check")
        rec: dict[str, Any] = {
            "qemu_img_check_clean": r.qemu_img_check_clean, "needs_recovery": r.needs_recovery,
            "fsck_clean_before_replay": r.fsck_clean_before_replay,
            "fsck_clean_after_replay": r.fsck_clean_after_replay, "k": r.lines,
            "k_before_replay": r.lines_before_replay, "contiguous": r.contiguous, "torn": r.torn,
            "boot_ids": len(r.boot_ids), "check_s": round(time.monotonic() - t0, 2)}
        live.numbers["checks"][label] = rec
        what = f"{label} ({node['disks']['data']})"
        if not r.ok:
            problems.append(f"{what}: not crash-consistent: {rec}\n{r.details}")
        if r.boot_ids != (live.boot_id,):
            problems.append(f"{what}: boot ids {r.boot_ids}, expected only {live.boot_id}")
        if r.last_n != r.lines:
            problems.append(f"{what}: last line {r.last_line!r} is not number {r.lines}")
        if name in live.takes:
            # Every line the console showed before the take started was fsynced before the
            # switch; no line can be in it that the console had not shown when it returned
            # (+1: the line whose fsync was completing then).
            t = live.takes[name]
            lo, hi = rec["k_bounds"] = [t.before, t.after + 1]
            if not lo <= r.lines <= hi:
                problems.append(f"{what}: k={r.lines} outside the take's instant {lo}..{hi}")
        elif live.stopped_at_line is not None and r.lines < live.stopped_at_line:
            problems.append(f"{what}: k={r.lines} < {live.stopped_at_line}, the last line the console showed")
        if name in restored_first:
            # Memory and disk of one instant: the guest restored from this snapshot printed
            # line k+1 first (or k, when line k's fsync was in flight at the switch).
            first = rec["first_line_after_apply"] = restored_first[name]
            if first not in (r.lines, r.lines + 1):
                problems.append(f"{what}: holds lines 1..{r.lines} but its memory printed {first} first")
    # sR (taken after the restore of s2) and the current state (after the restore of s3)
    # hold lines 1..k of one boot: the disk a guest came back to continues its memory's count.
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------- bad inputs
@dataclass
class Refusing:
    cli: Cli
    disk: Path       # a qcow2 owned by no VM
    base: Path       # the own disk of VM "base" (registered, stopped, no kernel)
    kernel: Path
    initrd: Path
    missing: Path
    busy_port: int   # a port something listens on
    baseline: tuple[Any, ...] = ()


def world_state(w: Refusing) -> tuple[Any, ...]:
    """What a refused command must leave as it was: the events, `vm list`, `vm show base`,
    the files under the data directory, the disks."""
    procs = [subprocess.Popen([sys.executable, "-m", "adapters.cli", *a, "--json"], cwd=REPO, env=w.cli.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in (("vm", "list"), ("vm", "show", "base"))]  # side by side: half the wait
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=CLI_TIMEOUT)
        assert p.returncode == 0, f"{p.args}: exit {p.returncode}: {err}"
        outs.append(json.loads(out))
    files = sorted((str(p.relative_to(w.cli.home)), p.stat().st_size) for p in w.cli.home.rglob("*")
                   if p.is_file() and not p.name.endswith(("-wal", "-shm", "-journal")))
    disks = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (w.disk, w.base)]
    return (w.cli.event_count(), *outs, files, disks)


@pytest.fixture(scope="module")
def refusing(guest: LinuxGuest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Refusing]:
    work = tmp_path_factory.mktemp("linux-cli-refused")
    cli = Cli(work / "h")
    base = make_data_disk(work / "base.qcow2", size_mib=8)
    cli.ok("vm", "create", "base", "--accel", "tcg", "--disk", str(base), "--nic", "user")
    disk = make_data_disk(work / "spare.qcow2", size_mib=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        w = Refusing(cli, disk, base, guest.kernel, guest.initrd, work / "missing.iso", s.getsockname()[1])
        w.baseline = world_state(w)
        assert w.baseline[1], "vm list shows base"
        yield w


Args = Callable[[Refusing], list[str]]


def create(*opts: str | Callable[[Refusing], str]) -> Args:
    return lambda w: ["vm", "create", "bad", "--accel", "tcg", "--disk", str(w.disk),
                      *[o(w) if callable(o) else o for o in opts]]


def disk(spec: str) -> Args:
    return lambda w: ["vm", "create", "bad", "--accel", "tcg", "--disk", f"{w.disk}{spec}"]


# (id, the command, what its one error line says)
BAD: list[Any] = [pytest.param(args, expect, id=name) for name, args, expect in [
    ("disk-bus-floppy", disk(",bus=floppy"), r"bus 'floppy' is not one of"),
    ("disk-cache-unknown", disk(",cache=fast"), r"cache 'fast' is not one of"),
    ("disk-option-unknown", disk(",iothread=1"), r"unknown option 'iothread=1'"),
    ("hostfwd-all-interfaces", create("--nic", "user,hostfwd=tcp:0.0.0.0:1-:2"), r"hostfwd must be tcp:127\.0\.0\.1"),
    ("hostfwd-port-out-of-range", create("--nic", "user,hostfwd=tcp::70000-:80"), r"port out of range"),
    ("hostfwd-port-in-use", create("--nic", lambda w: f"user,hostfwd=tcp::{w.busy_port}-:80"), r"is in use"),
    ("mac-malformed", create("--nic", "user,mac=zz"), r"MAC address 'zz' is malformed"),
    ("mac-multicast", create("--nic", "user,mac=01:00:5e:00:00:01"), r"multicast"),
    ("nic-mode-unknown", create("--nic", "wifi"), r"NIC 'wifi' is not one of"),
    ("nic-tap-missing", create("--nic", "tap=snaptreenotap0"), r"no network interface 'snaptreenotap0'"),
    ("initrd-without-kernel", create("--initrd", lambda w: str(w.initrd)), r"need --kernel"),
    ("append-without-kernel", create("--append", "console=ttyS0"), r"need --kernel"),
    ("kernel-missing", create("--kernel", lambda w: str(w.missing)), r"--kernel.*does not exist"),
    ("cdrom-missing", create("--cdrom", lambda w: str(w.missing)), r"--cdrom.*does not exist"),
    ("qemu-arg-qmp", create("--qemu-arg", "-qmp"), r"manages -qmp itself"),
    ("qemu-arg-monitor", create("--qemu-arg=--monitor=stdio"), r"manages --monitor itself"),
    ("machine-bad-token", create("--machine", "pc;reboot"), r"--machine 'pc;reboot'"),
    ("display-unknown", create("--display", "sdl"), r"--display"),
    ("set-initrd-without-kernel", lambda w: ["vm", "set", "base", "--initrd", str(w.initrd)], r"need --kernel"),
    ("set-mac-malformed", lambda w: ["vm", "set", "base", "--nic", "user,mac=zz"], r"is malformed"),
    ("set-qemu-arg-incoming", lambda w: ["vm", "set", "base", "--qemu-arg", "-incoming"], r"manages -incoming"),
]]


@pytest.mark.parametrize(("args", "expect"), BAD)
def test_bad_input_exits_2_and_records_nothing(refusing: Refusing, args: Args, expect: str) -> None:
    argv = args(refusing)
    res = refusing.cli.run(*argv, "--json")
    assert res.returncode == 2, explain(argv, res)
    assert re.search(expect, res.stderr), explain(argv, res)
    if res.stdout.strip():  # refused by snaptree, not by click's usage check: the JSON error
        assert set(json.loads(res.stdout)) == {"error"}, res.stdout
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert world_state(refusing) == refusing.baseline, f"{argv} recorded or changed something"
