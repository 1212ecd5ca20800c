"""The Linux test guest's data disk: a qcow2 image holding an empty ext4 filesystem.

    make_data_disk(path, size_mib=64) -> Path

mkfs.ext4 runs on a raw temporary file in the same directory, which `qemu-img convert`
then turns into the qcow2 (so the image holds only the blocks mkfs wrote).  The inode
tables and the journal are initialised by mkfs (no lazy init), so the guest's kernel
never writes anything to the disk in the background: every write comes from the workload.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

LABEL = "snaptree-data"


class DiskError(RuntimeError):
    pass


def make_data_disk(path: str | os.PathLike[str], size_mib: int = 64) -> Path:
    out = Path(path)
    if os.path.lexists(out):
        raise FileExistsError(f"{out} already exists: refusing to overwrite it")
    if size_mib < 8:
        raise ValueError(f"size_mib={size_mib}: ext4 with a journal needs at least 8 MiB")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, raw_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".raw", dir=out.parent)
    raw = Path(raw_name)
    tmp_qcow2 = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        os.ftruncate(fd, size_mib << 20)
        os.close(fd)
        fd = -1
        _run(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-m", "0",
              "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", str(raw)])
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp_qcow2)])
        # link() fails if the name appeared meanwhile: never overwrite.
        os.link(tmp_qcow2, out)
    finally:
        if fd >= 0:
            os.close(fd)
        raw.unlink(missing_ok=True)
        tmp_qcow2.unlink(missing_ok=True)
    return out


def _run(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise DiskError(f"cannot run {cmd[0]}: {e} (apt-get install e2fsprogs qemu-utils)") from e
    if proc.returncode != 0:
        raise DiskError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
