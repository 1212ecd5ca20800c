"""Where snaptree keeps its files: one data directory, one folder per VM.

Everything snaptree creates lives below the data directory; the only files outside it that it
ever writes are the disk files a user handed over as a VM's own disks (DESIGN §1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import platformdirs

from domain.names import validate_name


def default_home() -> Path:
    env = os.environ.get("SNAPTREE_HOME")
    return Path(env) if env else Path(platformdirs.user_data_dir("snaptree"))


@dataclass(frozen=True)
class DataDir:
    """The data directory; implements the domain's `Layout` port."""

    root: Path

    @classmethod
    def open(cls, root: Path | str | None = None) -> DataDir:
        path = Path(root) if root is not None else default_home()
        path = path.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return cls(path)

    @property
    def event_db(self) -> Path:
        return self.root / "snaptree.sqlite"

    def vm_dir(self, vm: str) -> Path:
        validate_name(vm, "VM name")
        return self.root / "vms" / vm

    def layer_path(self, vm: str, node_id: UUID, disk: str) -> str:
        validate_name(disk, "disk name")
        return str(self.vm_dir(vm) / "layers" / f"{node_id}.{disk}.qcow2")

    def state_path(self, vm: str, node_id: UUID) -> str:
        return str(self.vm_dir(vm) / "states" / f"{node_id}.state")

    def owns(self, path: str | Path) -> bool:
        """True when `path` (after resolving links) lies inside the data directory."""
        real = Path(os.path.realpath(path))
        return real == self.root or self.root in real.parents

    def check_owned(self, path: str | Path) -> Path:
        if not self.owns(path):
            raise PermissionError(f"refusing to touch {path}: it is outside the data directory {self.root}")
        return Path(path)
