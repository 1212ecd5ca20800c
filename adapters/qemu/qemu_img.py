"""Thin, typed wrapper around the ``qemu-img`` binary.

Every snaptree disk operation (overlay creation, merge, audit) goes through here so that the
rules measured on QEMU 7.2 (docs/architecture.md) live in one place:

* backing files are always written as absolute paths (a relative one is resolved against the
  overlay's directory later, and ``blockdev-snapshot`` never rewrites the header);
* read-only inspection (``info``, ``map``, ``check``) always passes ``-U`` so that it works on
  the images of a running VM, which QEMU keeps locked;
* commands run without a shell, with absolute paths, and failures raise :class:`QemuImgError`.

Backing files are read by :mod:`adapters.qemu.qcow2` (the one owner of that), not here.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any, cast

from adapters.qemu import qcow2, qcow2_map
from adapters.qemu.errors import QemuImgError

__all__ = [
    "QEMU_IMG",
    "QemuImgError",
    "info",
    "is_qcow2",
    "backing_file",
    "virtual_size",
    "create_image",
    "create_overlay",
    "allocated_bytes",
    "disk_usage",
    "commit",
    "rebase_safe",
    "rebase_unsafe",
    "check",
    "repair_leaks",
]

QEMU_IMG: str = os.environ.get("SNAPTREE_QEMU_IMG", "qemu-img")
"""The qemu-img binary; read at call time, so tests may also monkeypatch this attribute."""

Progress = Callable[[float], None]

_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _abs(path: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(path))


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img ARGS``; raise QemuImgError on a non-zero exit."""
    cmd = [QEMU_IMG, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise QemuImgError(cmd, res.returncode, res.stderr)
    return res


def _run_with_progress(args: list[str], progress: Progress | None) -> None:
    """Run a long qemu-img job (commit, rebase), reporting ``-p`` progress as a fraction 0..1.

    qemu-img 7.2 prints ``    (12.34/100%)\\r`` on stdout even when stdout is a pipe, so the
    stream is read as it comes; stderr goes to a temp file so that neither pipe can fill up.
    """
    if progress is None:
        _run(args)
        return
    cmd = [QEMU_IMG, args[0], "-p", *args[1:]]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        stdout = cast(io.BufferedReader, proc.stdout)     # a buffered pipe: read1 returns early
        buf = b""
        last = -1.0
        try:
            while chunk := stdout.read1(4096):
                buf += chunk
                *parts, buf = re.split(rb"[\r\n]", buf)
                for part in parts:
                    m = _PROGRESS_RE.search(part)
                    if m:
                        frac = min(1.0, float(m.group(1)) / 100.0)
                        if frac != last:
                            last = frac
                            progress(frac)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): the child stops with us
            proc.kill()
            proc.wait()
            raise
        proc.stdout.close()
        rc = proc.wait()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if rc != 0:
        raise QemuImgError(cmd, rc, stderr)
    if last < 1.0:
        progress(1.0)


def info(path: str) -> dict[str, Any]:
    """``qemu-img info --output=json -U`` of the image alone (its chain: ``qcow2.backing_chain``).

    The format is probed (no ``-f``) so that this also tells raw from qcow2.
    """
    data: dict[str, Any] = json.loads(_run(["info", "--output=json", "-U", _abs(path)]).stdout)
    return data


def is_qcow2(path: str) -> bool:
    """True only for a readable qcow2 image; False (never an exception) for anything else."""
    if not os.path.isfile(path):
        return False
    try:
        data = info(path)
    except (QemuImgError, ValueError, OSError):
        return False
    return isinstance(data, dict) and data.get("format") == "qcow2"


def backing_file(path: str) -> str | None:
    """Absolute path of the image's own backing file (``full-backing-filename``), or None.

    Read from the qcow2 header (``qcow2.backing_file``); raises a ``qcow2.Qcow2Error`` (a
    QemuImgError) for a file that is not a readable qcow2 image.
    """
    return qcow2.backing_file(path)


def virtual_size(path: str) -> int:
    """Guest-visible size in bytes."""
    return int(info(path)["virtual-size"])


def create_image(path: str, size: int | str) -> None:
    """Create a new qcow2 base image (demo and tests).

    Refuses to overwrite: ``qemu-img create`` would silently clobber an existing disk.
    """
    path = _abs(path)
    if os.path.lexists(path):
        raise FileExistsError(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _run(["create", "-q", "-f", "qcow2", path, str(size)])


def create_overlay(path: str, backing: str) -> None:
    """Create a qcow2 overlay of ``backing`` at ``path`` — crash-safe and idempotent.

    Workers run at least once, so a retry must be harmless: when ``path`` already exists with
    this backing nothing happens; with another backing (or not a qcow2) ValueError is raised.
    The file is built under a temporary name in the same directory, fsynced, then renamed, so
    ``path`` is never a half-written image. Works while a VM runs on ``backing``.
    """
    path = _abs(path)
    backing = _abs(backing)
    if os.path.lexists(path):
        existing_overlay(path, backing)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        clear_stale_tmp(path)
        _run(["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", tmp])
        os.chmod(tmp, 0o600)  # guest data: the owner's only, whatever the umask
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(directory)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def clear_stale_tmp(path: str) -> None:
    """Remove the temporary files a killed earlier run left for ``path`` (the VM's lock is held:
    no other worker builds this file now)."""
    for tmp in glob.glob(f"{glob.escape(path)}.tmp-*"):
        os.unlink(tmp)


def existing_overlay(path: str, backing: str) -> None:
    """An overlay found in place (a retry): fine when it is qcow2 on ``backing``, else ValueError."""
    if not is_qcow2(path):
        raise ValueError(f"{path} exists and is not a qcow2 image")
    current = backing_file(path)
    if current is None or not qcow2.same_file(current, backing):
        raise ValueError(f"{path} exists with backing file {current!r}, not {backing!r}")


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush one file or directory to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def allocated_bytes(path: str) -> int:
    """Guest bytes allocated in this layer only (not its backing chain).

    This is what a merge copying this layer's data moves. Counted from ``qemu-img map``:
    entries at depth 0 that hold data, **and** zero clusters allocated at depth 0 ("present"):
    those hide the backing's data, so a commit must write them down as zeros. Unallocated
    ranges of a base image (depth 0, not present) are not counted.

    Read from the image's own tables when they are plain (qcow2_map), else from qemu-img.
    """
    known = qcow2_map.allocated_bytes(path)
    return known if known is not None else map_allocated_bytes(path)


def map_allocated_bytes(path: str) -> int:
    """`allocated_bytes` as ``qemu-img map`` counts it."""
    res = _run(["map", "--output=json", "-U", "-f", "qcow2", _abs(path)])
    total = 0
    for entry in json.loads(res.stdout):
        if entry.get("depth") != 0:
            continue
        if entry.get("data") or entry.get("present", False):
            total += int(entry["length"])
    return total


def disk_usage(path: str) -> int:
    """Bytes the file really occupies on disk (sparse-aware)."""
    return os.stat(path).st_blocks * 512


def commit(top: str, *, progress: Progress | None = None) -> None:
    """Write ``top``'s data into its backing file; ``-d`` leaves ``top`` intact.

    Keeping ``top`` makes the step idempotent: a retry after a crash commits the same data again.
    Fails (image locking) if a running VM uses ``top`` as its active image.
    """
    _run_with_progress(["commit", "-f", "qcow2", "-d", _abs(top)], progress)


def rebase_safe(path: str, new_backing: str, *, progress: Progress | None = None) -> None:
    """Point ``path`` at ``new_backing``, copying in whatever differs so the guest view is unchanged.

    Used to pull a deleted middle layer's data up into its dependent.
    """
    _run_with_progress(
        ["rebase", "-f", "qcow2", "-b", _abs(new_backing), "-F", "qcow2", _abs(path)], progress
    )


def rebase_unsafe(path: str, new_backing: str) -> None:
    """Rewrite only the backing-file header (``-u``): no data is copied or compared.

    Correct only when ``new_backing`` reads the same as the old one (e.g. after a commit).
    """
    _run(["rebase", "-u", "-f", "qcow2", "-b", _abs(new_backing), "-F", "qcow2", _abs(path)])


def repair_leaks(path: str) -> None:
    """`qemu-img check -r leaks`: free clusters a killed qemu-img left allocated but unused.

    Leaks never change what the image reads; a merge resumed after a crash repairs them so that
    the files end exactly as an uninterrupted run leaves them.
    """
    res = subprocess.run([QEMU_IMG, "check", "-q", "-r", "leaks", "-f", "qcow2", _abs(path)],
                         capture_output=True, text=True, check=False)
    if res.returncode not in (0, 3):
        raise QemuImgError([QEMU_IMG, "check", "-r", "leaks", path], res.returncode, res.stderr,
                           what="qemu-img check -r leaks")


def check(path: str) -> dict[str, Any]:
    """``qemu-img check --output=json -U``, with the exit status added as ``exit_code``.

    Exit 0 is clean, 2 means corruption, 3 leaked clusters: those still produce a report,
    which is returned. Any other status (e.g. 1, check could not run) raises QemuImgError.
    """
    cmd = [QEMU_IMG, "check", "--output=json", "-U", "-f", "qcow2", _abs(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode not in (0, 2, 3):
        raise QemuImgError(cmd, res.returncode, res.stderr)
    try:
        report: dict[str, Any] = json.loads(res.stdout)
    except ValueError:
        raise QemuImgError(cmd, res.returncode, res.stderr or res.stdout) from None
    report["exit_code"] = res.returncode
    return report
