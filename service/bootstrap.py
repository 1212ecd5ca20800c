"""Wires the service: the data directory, the event store, and the adapters behind each port.

With no configuration everything is embedded (SQLite in the data directory, this process does
the host work). Tests pass in-memory ports (tests/fakes.py) or their own environment.
"""

from __future__ import annotations

from adapters.config import open_app, this_host
from adapters.images import QcowImages
from adapters.machines import QemuMachines
from adapters.storage import DataDir
from service.api import Service
from service.ports import Disks, Machines


def open_service(
    home: str | None = None,
    host: str | None = None,
    *,
    environ: dict[str, str] | None = None,
    disks: Disks | None = None,
    machines: Machines | None = None,
) -> Service:
    data = DataDir.open(home)
    return Service(
        data=data,
        app=open_app(data, environ),
        host=host or this_host(),
        disks=disks if disks is not None else QcowImages(),
        machines=machines if machines is not None else QemuMachines(data),
    )
