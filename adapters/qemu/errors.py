"""The errors of the QEMU adapters, in one place so that every module can raise them without
importing another module's internals.

- :class:`QemuImgError`: a qemu tool (qemu-img, qemu-io) exited with an unexpected status;
- :class:`MachineError`: QEMU could not be started, attached to, or did something unexpected;
- :class:`LiveError`: a live operation on a running QEMU failed (QEMU refused, or a block job or
  migration failed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class QemuImgError(Exception):
    """A qemu tool exited with an unexpected status.

    Keeps the full command and stderr for logs; ``str()`` is one line fit for a CLI error.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        returncode: int,
        stderr: str,
        *,
        what: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.cmd: list[str] = list(cmd)
        self.returncode: int = returncode
        self.stderr: str = stderr
        if what is None:
            tool = os.path.basename(self.cmd[0]) if self.cmd else "qemu-img"
            sub = self.cmd[1] if len(self.cmd) > 1 else ""
            what = f"{tool} {sub}".strip()
        self.what: str = what
        if detail is None:
            detail = first_line(stderr)
        super().__init__(f"{what} failed (exit {returncode}): {detail}")


def first_line(text: str) -> str:
    """First non-empty line, without the ``qemu-img: `` prefix the tools put on every error."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            for prefix in ("qemu-img: ", "qemu-io: "):
                if line.startswith(prefix):
                    line = line[len(prefix):]
            return line
    return "(no error output)"


class MachineError(RuntimeError):
    """QEMU could not be started, attached to, or did something unexpected."""


class LiveError(MachineError):
    """A live operation failed (QEMU refused or the job/migration failed)."""
