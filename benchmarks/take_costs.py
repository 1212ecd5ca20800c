"""What one `snapshot take` of a running VM costs in the service: aggregate loads, QMP
connections, and looks into /proc for "is this VM running?". Counted by wrapping the library
calls themselves, so the same script also counts an older checkout of snaptree
(`PYTHONPATH=OLD_CHECKOUT python benchmarks/take_costs.py`).

    python benchmarks/take_costs.py [--takes N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COUNTS: Counter[str] = Counter()


def count(owner: Any, name: str, key: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        COUNTS[key] += 1
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def instrument() -> None:
    from eventsourcing.application import Repository
    from qemu.qmp import QMPClient

    count(Repository, "get", "aggregate loads")
    count(QMPClient, "connect", "QMP connections")
    import adapters.qemu.machine as machine

    for module_name in ("adapters.qemu.process", "adapters.qemu.machine"):
        try:
            module = __import__(module_name, fromlist=["x"])
        except ImportError:
            continue
        for fn in ("pid_from_file", "_pid_from_file"):
            if hasattr(module, fn):
                count(module, fn, "/proc checks")
    del machine


def new_api(home: str, disk: str, kernel: str) -> tuple[Callable[[str], None], Callable[[], None]]:
    from domain import commands as c
    from domain.definition import Accel
    from service.bootstrap import open_service

    svc = open_service(home, "bench", environ={})
    svc.handle(c.CreateVM("web", disk=(disk,), memory=64, kernel=kernel, accel=Accel.TCG))
    svc.handle(c.StartVM("web"))
    return (lambda name: svc.handle(c.TakeSnapshot("web", name)),
            lambda: svc.handle(c.StopVM("web")))


def old_api(home: str, disk: str, kernel: str) -> tuple[Callable[[str], None], Callable[[], None]]:
    from adapters.service import Service  # type: ignore[import-not-found]

    svc = Service.open(home, "bench")
    svc.create_vm("web", [disk], config={"memory_mib": 64, "cpus": 1, "kernel": kernel})
    svc.start_vm("web")

    def take(name: str) -> None:  # what `snaptree snapshot take` did
        node = svc.take("web", name)
        svc.wait("web")
        svc.app.get_vm("web").nodes[node]

    return take, lambda: svc.stop_vm("web")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--takes", type=int, default=3)
    args = parser.parse_args()
    from tests.guest.build import build_guest

    with tempfile.TemporaryDirectory() as tmp:
        kernel = str(build_guest(Path(tmp) / "guest"))
        disk = str(Path(tmp) / "disk.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "16M"], check=True)
        instrument()
        try:
            take, stop = new_api(str(Path(tmp) / "home"), disk, kernel)
            which = "this checkout"
        except ImportError:
            take, stop = old_api(str(Path(tmp) / "home"), disk, kernel)
            which = "old checkout"
        take("warm-up")
        per_take: list[dict[str, int]] = []
        try:
            for i in range(args.takes):
                COUNTS.clear()
                take(f"s{i}")
                per_take.append(dict(COUNTS))
        finally:
            stop()
    print(json.dumps({"code": which, "per take": per_take}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
