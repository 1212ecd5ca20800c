"""Many qcow2 overlays at once, without a qemu-img process for each (queued takes of a stopped VM).

The empty overlay `qemu-img create -f qcow2 -b B -F qcow2` writes depends only on its virtual
size and on the backing file name B: the name and its length field are the only bytes that differ
(tests/test_overlays.py compares them byte for byte with qemu-img's own). So qemu-img makes one
template per virtual size in this process — checked once by `qemu-img check`, with an empty L1
table (no cluster allocated) — and each overlay is that template with its backing name put in.

As in `qemu_img.create_overlay`, every file is built under a temporary name and renamed into
place only once it is on stable storage, and an overlay found in place with the right backing is
kept (a retry). The batch shares one barrier: all files are fsynced together, then renamed, then
each directory is fsynced once.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from adapters.qemu import qcow2, qemu_img
from adapters.qemu.errors import QemuImgError

__all__ = ["create_overlays"]

_PLACEHOLDER = "/snaptree-template-backing.qcow2"
_MAX_NAME = 1023  # QEMU refuses longer backing names


@dataclass(frozen=True)
class _Template:
    data: bytes
    name_offset: int  # where the backing name starts; the name's length is at bytes 16..20


_templates: dict[int, _Template] = {}
_lock = threading.Lock()


def create_overlays(pairs: list[tuple[str, str]]) -> list[str]:
    """Create the overlay `path` on `backing` for each pair, in order (a backing may be a path of
    an earlier pair); returns the paths created, not those found in place."""
    sizes: dict[str, int] = {}
    todo: list[tuple[str, bytes]] = []
    for path, backing in pairs:
        path, backing = os.path.abspath(path), os.path.abspath(backing)
        size = sizes.get(backing)
        sizes[path] = size if size is not None else qcow2.virtual_size(backing)
        if os.path.lexists(path):
            qemu_img.existing_overlay(path, backing)
            continue
        name = os.fsencode(backing)
        if len(name) > _MAX_NAME or b"\0" in name:
            raise QemuImgError(["qemu-img", "create"], 1, f"backing file name too long: {backing!r}",
                               what="overlay creation")
        todo.append((path, _with_backing(_template(sizes[path]), name)))
    made: list[tuple[str, str]] = []  # (temporary name, path)
    try:
        for path, data in todo:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            qemu_img.clear_stale_tmp(path)  # left by a killed earlier run
            made.append((tmp, path))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # guest data: the owner's only, whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        _fsync_all([tmp for tmp, _ in made])
        for tmp, path in made:
            os.replace(tmp, path)
        for directory in sorted({os.path.dirname(path) for _, path in made}):
            qemu_img.fsync_path(directory)
    finally:
        for tmp, _ in made:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    return [path for _, path in made]


def _with_backing(t: _Template, name: bytes) -> bytes:
    data = bytearray(t.data)
    struct.pack_into(">I", data, 16, len(name))
    data[t.name_offset:t.name_offset + _MAX_NAME] = name.ljust(_MAX_NAME, b"\0")
    return bytes(data)


def _template(size: int) -> _Template:
    with _lock:
        found = _templates.get(size)
        if found is None:
            found = _templates[size] = _make_template(size)
        return found


def _make_template(size: int) -> _Template:
    with tempfile.TemporaryDirectory(prefix="snaptree-template-") as tmp:
        path = os.path.join(tmp, "template.qcow2")
        qemu_img._run(["create", "-q", "-u", "-f", "qcow2", "-b", _PLACEHOLDER, "-F", "qcow2", path, str(size)])
        _check_clean(path)
        with open(path, "rb") as f:
            data = f.read()
    offset, length, cluster_bits = struct.unpack(">QII", data[8:24])
    l1_size, l1_offset = struct.unpack(">IQ", data[36:48])
    cluster = 1 << cluster_bits
    name = data[offset:offset + length]
    room = data[offset + length:offset + _MAX_NAME]
    l1 = data[l1_offset:l1_offset + 8 * l1_size]
    if name != os.fsencode(_PLACEHOLDER) or offset + _MAX_NAME > cluster or room.strip(b"\0") or l1.strip(b"\0"):
        raise QemuImgError(["qemu-img", "create"], 1, "qemu-img's empty overlay has an unexpected layout",
                           what="overlay template")
    return _Template(data, offset)


def _check_clean(path: str) -> None:
    """`qemu-img check` of the template on its own (its backing does not exist)."""
    spec = json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": path}})
    cmd = [qemu_img.QEMU_IMG, "check", "--output=json", f"json:{spec}"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    report = json.loads(res.stdout) if res.returncode == 0 and res.stdout else {}
    if res.returncode != 0 or report.get("corruptions", 0) or report.get("leaks", 0):
        raise QemuImgError(cmd, res.returncode, res.stderr or res.stdout, what="overlay template check")


def _fsync_all(paths: list[str]) -> None:
    """fsync every file, several at a time: the filesystem commits them in fewer journal flushes."""
    if len(paths) <= 1:
        for p in paths:
            qemu_img.fsync_path(p)
        return
    with ThreadPoolExecutor(max_workers=min(16, len(paths)), thread_name_prefix="fsync") as pool:
        list(pool.map(qemu_img.fsync_path, paths))
