"""The README's demo: a VM's snapshot tree built, applied and pruned on real qcow2 files.

Runs the real `snaptree` CLI against a fresh data directory (./demo-data), writes distinct byte
patterns with qemu-io before each snapshot, and reads them back at the end.
"""

from __future__ import annotations

import os
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
    print(f"$ snaptree {' '.join(args)}", flush=True)
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
from adapters.qemu import live  # noqa: E402
from adapters.service import Service  # noqa: E402
from tests.guest.build import build_guest  # noqa: E402

svc = Service.open(str(DATA / "home"))


def heartbeat(vm: str) -> int:
    async def read() -> int:
        async with svc.runtime.attached(svc.app.get_vm(vm)) as m:
            return await live.read_counter(m)

    import asyncio

    return asyncio.run(read())


kernel = build_guest(DATA / "guest")
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(DATA / "live.qcow2"), "64M"], check=True)
try:
    step("A live VM (TCG, a tiny guest that counts and dirties memory)")
    run("vm", "create", "web", "--disk", str(DATA / "live.qcow2"), "--memory", "128", "--kernel", str(kernel))
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
    if svc.runtime.is_running("web"):
        svc.runtime.stop(svc.app.get_vm("web"))
if not ok:
    sys.exit("demo: check failed")
print("\ndemo: done (data in ./demo-data)")
