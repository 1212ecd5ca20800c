"""The README's demo: a VM's snapshot tree built, applied and pruned on real qcow2 files.

Runs the real `snaptree` CLI against a fresh data directory (./demo-data), writes distinct byte
patterns with qemu-io before each snapshot, and reads them back at the end. Then two live VMs:
the bare-metal test guest ("web") and a real Linux guest ("linux", tests/guest/linux) that is
snapshotted while it writes and brought back to that instant from its saved memory.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "demo-data"
SNAPTREE = [sys.executable, "-m", "adapters.cli"]
SLOT = 64 * 1024


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(*args: str, check: bool = True) -> str:
    print(f"$ snaptree {shlex.join(args)}", flush=True)
    out = subprocess.run(SNAPTREE + list(args), cwd=ROOT, text=True, capture_output=True, env=ENV)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    if check and out.returncode != 0:
        sys.exit(f"demo: command failed with exit status {out.returncode}")
    return out.stdout


def current_layer() -> str:
    import json

    tree = json.loads(_quiet("tree", "demo", "--json"))
    node = next(n for n in tree["nodes"] if n["id"] == tree["current"])
    return node["disks"]["disk0"]


def _quiet(*args: str) -> str:
    return subprocess.run(SNAPTREE + list(args), cwd=ROOT, text=True, capture_output=True,
                          env=ENV, check=True).stdout


def write(pattern: int, slot: int) -> None:
    path = current_layer()
    print(f"  (qemu-io: write 0x{pattern:02x} at {slot * SLOT} into {Path(path).name})")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {slot * SLOT} {SLOT}", path],
                   check=True, capture_output=True)


def reads(pattern: int, slot: int) -> bool:
    out = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c",
                          f"read -P {pattern} {slot * SLOT} {SLOT}", current_layer()],
                         capture_output=True, text=True)
    return out.returncode == 0 and "verification failed" not in out.stdout


if DATA.exists():
    shutil.rmtree(DATA)
DATA.mkdir()
ENV = dict(os.environ, SNAPTREE_HOME=str(DATA / "home"), COLUMNS="120")
base = DATA / "base.qcow2"
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)

step("Register a VM whose own disk is base.qcow2 (it stays where it is)")
subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0xa1 0 {SLOT}", str(base)],
                            check=True, capture_output=True)
run("vm", "create", "demo", "--disk", str(base))

step("Take three snapshots, each after writing distinct data")
run("snapshot", "take", "demo", "installed")
write(0xB2, 1)
run("snapshot", "take", "demo", "configured")
write(0xC3, 2)
run("snapshot", "take", "demo", "tested")
write(0xD4, 3)
run("tree", "demo")

step("Apply 'configured': the VM starts from a copy of it; the current overlay is discarded")
run("snapshot", "apply", "demo", "configured")
write(0xE5, 4)
run("tree", "demo")

step("Delete 'installed' (1 dependent): merged — committed back into base.qcow2, the VM's own disk")
run("snapshot", "delete", "demo", "installed")
run("tree", "demo")

step("Delete 'configured' (2 dependents: 'tested' and the current state): hidden, merge pending")
run("snapshot", "delete", "demo", "configured")
run("tree", "demo")
run("merges")

step("Delete 'tested' (0 dependents): its files go; 'configured' drops to 1 dependent")
run("snapshot", "delete", "demo", "tested", "--no-wait")
run("merges")
step("Let the worker complete the merge")
run("worker", "run", "--until-idle")
run("tree", "demo")

step("Read the data back through the current state")
checks = [(0xA1, 0, True), (0xB2, 1, True), (0xC3, 2, False), (0xD4, 3, False), (0xE5, 4, True)]
ok = True
for pattern, slot, present in checks:
    got = reads(pattern if present else 0, slot)
    ok &= got
    state = "holds" if present else "does not hold"
    print(f"  {'✓' if got else '✗'} slot {slot} {state} 0x{pattern:02x}")
left = sorted(p.name for p in (DATA / "home" / "vms" / "demo" / "layers").glob("*"))
print(f"  files snaptree made and still keeps: {left or 'none'}; the VM runs on {current_layer()}")
if not ok:
    sys.exit("demo: data check failed")

# --- a live VM: the bare-metal test guest keeps a heartbeat counter in RAM and dirties 4 MiB ---
sys.path.insert(0, str(ROOT))
from service.bootstrap import open_service  # noqa: E402
from tests.guest.build import build_guest  # noqa: E402
from tests.guest.probe import attached, read_counter  # noqa: E402

svc = open_service(str(DATA / "home"))


def heartbeat(vm: str) -> int:
    async def read() -> int:
        async with attached(svc.data, svc.app.get_vm(vm)) as m:
            return await read_counter(m)

    import asyncio

    return asyncio.run(read())


kernel = build_guest(DATA / "guest")
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(DATA / "live.qcow2"), "64M"], check=True)
try:
    step("A live VM (TCG, a tiny guest that counts and dirties memory)")
    run("vm", "create", "web", "--disk", str(DATA / "live.qcow2"), "--memory", "128", "--kernel", str(kernel),
        "--accel", "tcg")  # KVM opens on these machines but crawls (nested); a normal host: auto
    run("vm", "start", "web")
    run("vm", "status", "web", "--json")
    step("Live snapshot: overlays switched in one QMP burst, memory saved copy-on-write while it runs")
    before = heartbeat("web")
    run("snapshot", "take", "web", "running")
    print(f"  heartbeat when taken: ~{before}; now {heartbeat('web')} (the guest never stopped)")
    run("tree", "web")
    step("Apply it: a new QEMU resumes from the saved memory, exactly where the snapshot was")
    later = heartbeat("web")
    run("snapshot", "apply", "web", "running")
    resumed = heartbeat("web")
    print(f"  heartbeat just before the apply {later}; after it {resumed}: counting again from ~{before}")
    ok &= resumed >= before
    step("Delete it while the VM runs: merged online into the own disk by a QEMU block job")
    run("snapshot", "delete", "web", "running")
    run("tree", "web")
    run("vm", "stop", "web")
finally:
    if svc.machines.pid("web") is not None:  # the demo failed half way: never leave a QEMU behind
        live = svc.machines.attach(svc.app.get_vm("web"))
        if live is not None:
            live.stop()

# --- a real Linux guest: Debian's cloud kernel + a busybox initramfs (tests/guest/linux) ---
# Its /init mounts the data disk and appends "<n> <uptime> <boot_id>" lines to /data/log.txt
# forever, fsyncing each and then printing "SNAPTREE-LINE n" on the serial console; busybox
# httpd answers on port 80 with the last line.
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from typing import Callable, TypeVar  # noqa: E402

from tests.guest.linux.build import build_linux_guest, default_cache_dir  # noqa: E402
from tests.guest.linux.check import boot_ids, console_lines  # noqa: E402
from tests.guest.linux.disk import make_data_disk  # noqa: E402
from tests.guest.linux.vm import free_port  # noqa: E402

LINE = re.compile(r"SNAPTREE-LINE (\d+)\s*$")
T = TypeVar("T")


def console_excerpt(text: str, lines: int = 3) -> list[str]:
    """The guest's boot id line, then its last `lines` numbered lines (the kernel's boot log
    before them is left out)."""
    ours = [ln for ln in text.replace("\r", "").splitlines() if ln.startswith("SNAPTREE-")]
    boot = [ln for ln in ours if ln.startswith("SNAPTREE-GUEST boot_id=")][:1]
    return [*boot, "...", *[ln for ln in ours if ln.startswith("SNAPTREE-LINE")][-lines:]]


def wait_until(what: str, predicate: Callable[[], T | None], timeout: float = 120.0) -> T:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            sys.exit(f"demo: timed out waiting for {what}")
        time.sleep(0.05)
    return value


def web_page(port: int) -> str:
    for _ in range(50):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                return r.read().decode().strip()
        except OSError:
            time.sleep(0.2)
    return "(no answer)"


linux = build_linux_guest(default_cache_dir())  # the first build fetches Debian packages; then cached
linux_disk = make_data_disk(DATA / "linux-data.qcow2")  # an empty ext4 filesystem
port = free_port()
try:
    step(f"A real Linux guest: kernel {linux.kernel_version} + busybox initramfs "
         f"({(linux.kernel_size + linux.initrd_size) / 2**20:.1f} MiB), direct kernel boot")
    run("vm", "create", "linux", "--disk", f"data={linux_disk}", "--memory", "256",
        "--kernel", str(linux.kernel), "--initrd", str(linux.initrd), "--append", linux.append(50),
        "--nic", f"user,hostfwd=tcp::{port}-:80",
        # TCG, not KVM: /dev/kvm opens on these (nested) machines but runs ~1000x slower than
        # TCG; on a normal host leave the default, --accel auto.
        "--accel", "tcg")
    console = Path(json.loads(_quiet("vm", "show", "linux", "--json"))["console"]["log"])
    t0 = time.monotonic()
    run("vm", "start", "linux")
    wait_until("3 lines on the console", lambda: len(console_lines(console)) >= 3)
    print(f"  booted: first line on the serial console {time.monotonic() - t0:.1f} s after `vm start`")
    print("$ snaptree vm console linux --log   (the guest's own lines, without the kernel's boot log)")
    for ln in console_excerpt(_quiet("vm", "console", "linux", "--log"), 3):
        print(f"  {ln}")
    print(f"  web page on 127.0.0.1:{port}: {web_page(port)}")

    step("Live snapshot while the guest writes and fsyncs its log")
    at_start = console_lines(console)[-1]
    run("snapshot", "take", "linux", "writing")
    at_end = console_lines(console)[-1]
    print(f"  console around the take: SNAPTREE-LINE {at_start} (take started) ... SNAPTREE-LINE {at_end}"
          " (take returned): the snapshot is of an instant in between")
    time.sleep(2)

    step("Apply it: a new QEMU resumes from the saved memory — same boot, counter back to the snapshot's")
    offset = console.stat().st_size
    before_apply = console_lines(console)[-1]
    run("snapshot", "apply", "linux", "writing")

    def restored() -> list[str] | None:
        with open(console, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace").replace("\r", "")
        out, prev = [], before_apply
        for ln in text.splitlines():
            m = LINE.search(ln)
            if m and (out or int(m.group(1)) <= prev):
                out.append(f"SNAPTREE-LINE {m.group(1)}")
            elif m:
                prev = int(m.group(1))
        return out if len(out) >= 3 else None

    after = wait_until("the restored guest's lines", restored, 60)
    first = int(after[0].split()[1])
    print(f"  console just before the apply: ... SNAPTREE-LINE {before_apply}")
    print(f"  console after the restore:     {', '.join(after[:3])}, ...  (back to {at_start}..{at_end})")
    boots = boot_ids(console)
    print(f"  boot ids on the console since the VM first started: {boots} (one boot: not a cold boot)")
    print(f"  web page again: {web_page(port)}")
    ok &= at_start <= first <= at_end + 2 and first < before_apply and len(set(boots)) == 1
    run("tree", "linux")
    run("vm", "stop", "linux")
finally:
    if svc.machines.pid("linux") is not None:  # the demo failed half way: never leave a QEMU behind
        subprocess.run(SNAPTREE + ["vm", "stop", "linux"], cwd=ROOT, env=ENV, capture_output=True)
if not ok:
    sys.exit("demo: check failed")
print("\ndemo: done (data in ./demo-data)")
