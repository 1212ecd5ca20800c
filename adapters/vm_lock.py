"""The per-VM lock file the worker holds while it changes a VM's files.

Export and audit take the same lock so that no merge rewrites a layer while they read it.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from typing import Iterator

from adapters.storage import DataDir

LOCK_NAME = ".lock"


@contextmanager
def vm_lock(data: DataDir, vm: str, *, shared: bool = False) -> Iterator[None]:
    """Hold the VM's lock; a no-op when the VM has no folder yet (no worker ever touched it)."""
    folder = data.vm_dir(vm)
    if not folder.is_dir():
        yield
        return
    data.check_owned(folder)  # a planted symlink must not take the lock file elsewhere
    fd = os.open(folder / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
