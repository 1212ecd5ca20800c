"""Domain errors. Each carries a stable `code` that the CLI and the queue replies expose.

A `Refused` error means the command was rejected before anything changed (exit status 2);
nothing in the domain ever fails half way: the aggregate decides before it records.
"""

from __future__ import annotations


class SnaptreeError(Exception):
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Refused(SnaptreeError):
    """The command was refused: bad input, unknown name, or a conflict. Nothing changed."""

    code = "refused"


class InvalidName(Refused):
    code = "invalid_name"


class UnknownVM(Refused):
    code = "unknown_vm"


class UnknownSnapshot(Refused):
    code = "unknown_snapshot"


class NameTaken(Refused):
    code = "name_taken"


class VMExists(Refused):
    code = "vm_exists"


class Conflict(Refused):
    """The command conflicts with work in progress (a merge that has started)."""

    code = "conflict"


class InvalidDisk(Refused):
    code = "invalid_disk"


class InvalidArgument(Refused):
    """A command's argument is out of its range or of the wrong kind."""

    code = "invalid_argument"


class RequestIdReused(Refused):
    """A queued request id that already took effect for a different command."""

    code = "request_id_reused"


class WrongHost(Refused):
    """The command needs the VM's own host (its QEMU, its files) and this is another one."""

    code = "wrong_host"
