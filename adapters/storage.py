"""Where snaptree keeps its files: one data directory, one folder per VM.

Everything snaptree creates lives below the data directory; the only files outside it that it
ever writes are the disk files a user handed over as a VM's own disks (docs/semantics.md).
Guest data lives here (layers, memory states, NVRAM, the store, logs), so every folder is 0700
and every file 0600 whatever the umask; a data directory found group- or world-accessible is
tightened when it is opened (`DataDir.tightened` says so, and the CLI prints it).
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import platformdirs

from domain import names

DIR_MODE = 0o700
FILE_MODE = 0o600


def default_home() -> Path:
    env = os.environ.get("SNAPTREE_HOME")
    return Path(env) if env else Path(platformdirs.user_data_dir("snaptree"))


@dataclass(frozen=True)
class DataDir:
    """The data directory; implements the domain's `Layout` port."""

    root: Path
    tightened: bool = field(default=False, compare=False)  # it was group/world-accessible

    @classmethod
    def open(cls, root: Path | str | None = None) -> DataDir:
        path = Path(root) if root is not None else default_home()
        path = path.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        mode = stat.S_IMODE(path.stat().st_mode)
        tightened = bool(mode & 0o077)
        if tightened:
            os.chmod(path, mode & ~0o077 | DIR_MODE)
        return cls(path, tightened)

    def private_dir(self, path: Path | str) -> Path:
        """`path` (inside the data directory) and its parents up to the root, as 0700 folders."""
        target = Path(path)
        self.check_owned(target)
        missing = [p for p in [target, *target.parents] if self.root in p.parents and not p.is_dir()]
        for folder in reversed(missing):
            folder.mkdir(mode=DIR_MODE, exist_ok=True)
            os.chmod(folder, DIR_MODE)  # mkdir's mode is masked by the umask
        return target

    def copy_private(self, src: str, dst: str) -> None:
        """Copy `src` to `dst` (0600, inside the data directory) so that `dst` is always whole:
        written beside it, flushed, then renamed over it. Running it again is harmless."""
        self.check_owned(dst)
        self.private_dir(os.path.dirname(dst))
        tmp = f"{dst}.tmp"
        shutil.copyfile(src, tmp)
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)

    @staticmethod
    def make_private(path: Path | str) -> None:
        os.chmod(path, FILE_MODE)

    @property
    def event_db(self) -> Path:
        return self.root / "snaptree.sqlite"

    def vm_dir(self, vm: str) -> Path:
        return self.root / "vms" / names.vm_name(vm)

    def layer_path(self, vm: str, node_id: UUID, disk: str) -> str:
        return str(self.vm_dir(vm) / "layers" / f"{node_id}.{names.disk_name(disk)}.qcow2")

    def state_path(self, vm: str, node_id: UUID) -> str:
        return str(self.vm_dir(vm) / "states" / f"{node_id}.state")

    def nvram_path(self, vm: str, node_id: UUID | None) -> str:
        if node_id is None:
            return str(self.vm_dir(vm) / "nvram.fd")  # adapters/machines.py starts QEMU on it
        return str(self.vm_dir(vm) / "nvram" / f"{node_id}.fd")

    def owns(self, path: str | Path) -> bool:
        """True when `path` (after resolving links) lies inside the data directory."""
        real = Path(os.path.realpath(path))
        return real == self.root or self.root in real.parents

    def check_owned(self, path: str | Path) -> Path:
        if not self.owns(path):
            raise PermissionError(f"refusing to touch {path}: it is outside the data directory {self.root}")
        return Path(path)
