"""What the domain needs from outside, as protocols (implemented in adapters/)."""

from __future__ import annotations

from typing import Protocol
from uuid import UUID


class Layout(Protocol):
    """Where snaptree keeps the files it makes: pure path arithmetic, no I/O."""

    def layer_path(self, vm: str, node_id: UUID, disk: str) -> str: ...

    def state_path(self, vm: str, node_id: UUID) -> str: ...

    def nvram_path(self, vm: str, node_id: UUID | None) -> str:
        """A UEFI VM's variable store: a snapshot's frozen copy, or (None) the one QEMU uses."""
        ...
