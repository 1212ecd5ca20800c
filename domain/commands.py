"""Every request snaptree understands, as a frozen value: commands that change state, queries
that read it, and the reports workers send back.

The CLI, the Python API and the queue all build these values and hand them to one handler table
(service/handlers.py); the queue's message schema and docs/queue.md are generated from the
fields below, so an entry point cannot drift from the others (docs/architecture.md).

A field's name is the CLI's parameter name and the queue's argument name. Its metadata says
what the queue accepts (`limits`) and what `--help` and docs/queue.md say (`help`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar
from uuid import UUID

from domain.definition import Accel, Display, Firmware
from domain.lifecycle import RunState
from domain.memory import LiveSwitch
from domain.tree import MergeDirection
from domain.rules import DEFAULT_MAX_CHAIN_DEPTH, MIN_CHAIN_DEPTH


class Quiesce(str, Enum):
    AUTO = "auto"  # freeze the guest's filesystems when its agent answers, else crash-consistent
    ON = "on"  # refuse unless the agent answers
    OFF = "off"  # crash-consistent


def arg(default: Any = dataclass, *, help: str, min: int | None = None, max: int | None = None,
        max_len: int | None = None, max_items: int | None = None) -> Any:
    """A command field with what the queue checks and the docs say about it."""
    meta = {"help": help, "min": min, "max": max, "max_len": max_len, "max_items": max_items}
    if default is dataclass:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


NAME_LEN = 200  # domain/names.py MAX_NAME_LENGTH
PATH_LEN = 4096


@dataclass(frozen=True)
class Command:
    """A request about one VM. `verb` is its queue name (None: internal, workers only)."""

    verb: ClassVar[str | None] = None
    # Its effect needs the VM's host (QEMU or the VM's files): embedded, the command waits for
    # that work; through the queue, the host's worker does it and replies when done.
    host_work: ClassVar[bool] = False
    vm: str

    @classmethod
    def arguments(cls) -> list[Any]:
        """The fields a producer passes in `args` (everything but `vm`)."""
        return [f for f in fields(cls) if f.name != "vm"]


@dataclass(frozen=True)
class Query:
    verb: ClassVar[str | None] = None

    @classmethod
    def arguments(cls) -> list[Any]:
        return [f for f in fields(cls) if f.name != "vm"]


# --- VM lifecycle ---


@dataclass(frozen=True)
class CreateVM(Command):
    """Register a VM with its own disk files (they stay where they are unless `copy`) and the
    machine QEMU runs it in (docs/vm-definition.md)."""

    verb = "vm.create"
    disk: tuple[str, ...] = arg(help="[NAME=]PATH[,bus=virtio|scsi|nvme|ide][,cache=MODE][,discard=unmap]"
                                " of each qcow2 disk the VM owns", max_len=PATH_LEN, max_items=32)
    copy: bool = arg(False, help="copy the disks into the data directory first")
    host: str | None = arg(None, help="host that runs the VM (default: the consumer's host)",
                           max_len=NAME_LEN)
    memory: int = arg(256, help="RAM in MiB", min=16, max=1 << 20)
    cpus: int = arg(1, help="virtual CPUs", min=1, max=64)
    kernel: str | None = arg(None, help="boot this kernel file instead of the firmware", max_len=PATH_LEN)
    max_chain_depth: int = arg(DEFAULT_MAX_CHAIN_DEPTH, help="layers a read of the current state may go"
                               " through before the snapshot under it is flattened", min=MIN_CHAIN_DEPTH, max=4096)
    accel: Accel = arg(Accel.AUTO, help="kvm, tcg, or auto: KVM when /dev/kvm works, else TCG")
    machine: str | None = arg(None, help="QEMU machine type (default pc; pin e.g. pc-i440fx-7.2)", max_len=64)
    cpu: str | None = arg(None, help="QEMU CPU model (default: QEMU's; host with KVM)", max_len=64)
    firmware: Firmware = arg(Firmware.BIOS, help="bios (SeaBIOS) or uefi (OVMF, with a per-VM NVRAM)")
    initrd: str | None = arg(None, help="initial ramdisk for --kernel", max_len=PATH_LEN)
    append: str | None = arg(None, help="kernel command line for --kernel", max_len=4096)
    cdrom: str | None = arg(None, help="an ISO image, read-only: never snapshotted, never merged",
                            max_len=PATH_LEN)
    nic: tuple[str, ...] = arg((), help="user[,hostfwd=tcp:127.0.0.1:PORT-:PORT] | tap=IFNAME | bridge=BR,"
                               " each [,mac=MAC] (a stable MAC is generated otherwise)", max_len=1024, max_items=8)
    display: Display = arg(Display.NONE, help="none, or vnc (on 127.0.0.1)")
    qemu_arg: tuple[str, ...] = arg((), help="extra QEMU argument, for what the definition does not model",
                                    max_len=4096, max_items=64)
    agent: bool = arg(True, help="a guest agent channel (virtio-serial org.qemu.guest_agent.0): quiesced"
                                 " snapshots, clock resync after a restore")
    hugepages: bool = arg(False, help="guest RAM on the host's reserved 2 MiB huge pages: memory saves"
                                      " several times faster and a pause of a few ms at any size")


@dataclass(frozen=True)
class StartVM(Command):
    """Start the VM's QEMU on its current state (or resume a paused one)."""

    verb = "vm.start"
    host_work = True
    paused: bool = arg(False, help="start with the vCPUs stopped")


@dataclass(frozen=True)
class StopVM(Command):
    """Stop the VM's QEMU (after any memory save in flight has ended)."""

    verb = "vm.stop"
    host_work = True


@dataclass(frozen=True)
class SetVM(Command):
    """Change the current state's definition (the options of vm.create; null: unchanged);
    snapshots keep their copies. Takes effect at the next start."""

    verb = "vm.set"
    host_work = True  # a lower max_chain_depth flattens at once
    memory: int | None = arg(None, help="RAM in MiB", min=16, max=1 << 20)
    cpus: int | None = arg(None, help="virtual CPUs", min=1, max=64)
    max_chain_depth: int | None = arg(None, help="layers a read of the current state may go through"
                                      " before the snapshot under it is flattened", min=MIN_CHAIN_DEPTH, max=4096)
    accel: Accel | None = arg(None, help="kvm, tcg or auto")
    machine: str | None = arg(None, help="QEMU machine type", max_len=64)
    cpu: str | None = arg(None, help="QEMU CPU model", max_len=64)
    kernel: str | None = arg(None, help="kernel file ('' to boot through the firmware again)", max_len=PATH_LEN)
    initrd: str | None = arg(None, help="initial ramdisk ('' for none)", max_len=PATH_LEN)
    append: str | None = arg(None, help="kernel command line ('' for none)", max_len=4096)
    cdrom: str | None = arg(None, help="ISO image ('' to eject)", max_len=PATH_LEN)
    nic: tuple[str, ...] | None = arg(None, help="the NICs, replacing all (a NIC at the same position and"
                                      " mode keeps its MAC); [] for none", max_len=1024, max_items=8)
    display: Display | None = arg(None, help="none or vnc")
    qemu_arg: tuple[str, ...] | None = arg(None, help="the extra QEMU arguments, replacing all",
                                           max_len=4096, max_items=64)
    agent: bool | None = arg(None, help="a guest agent channel")
    hugepages: bool | None = arg(None, help="guest RAM on the host's reserved 2 MiB huge pages")


# --- snapshots ---


@dataclass(frozen=True)
class TakeSnapshot(Command):
    """Take a snapshot; of a running VM live, its memory saved while it runs."""

    verb = "snapshot.take"
    host_work = True
    name: str = arg(help="the new snapshot's name", max_len=NAME_LEN)
    memory: bool = arg(True, help="of a running VM, save its memory too (false: disks only)")
    quiesce: Quiesce = arg(Quiesce.AUTO, help="freeze the guest's filesystems through its agent first")


@dataclass(frozen=True)
class ApplySnapshot(Command):
    """Start from a copy of a snapshot; the current state is discarded."""

    verb = "snapshot.apply"
    host_work = True
    snapshot: str = arg(help="name or id of the snapshot to start from", max_len=NAME_LEN)
    paused: bool = arg(False, help="a snapshot with saved memory comes back paused")


@dataclass(frozen=True)
class RevertSnapshot(Command):
    """Apply the nearest visible snapshot above the current state."""

    verb = "snapshot.revert"
    host_work = True
    paused: bool = arg(False, help="a snapshot with saved memory comes back paused")


@dataclass(frozen=True)
class DeleteSnapshot(Command):
    """Delete a snapshot: its layers merge, or wait as a hidden node, by the rules."""

    verb = "snapshot.delete"
    host_work = True
    snapshot: str = arg(help="name or id of the snapshot", max_len=NAME_LEN)
    subtree: bool = arg(False, help="also delete every snapshot below it")


@dataclass(frozen=True)
class RenameSnapshot(Command):
    """Rename a snapshot (the only edit a snapshot allows)."""

    verb = "snapshot.rename"
    snapshot: str = arg(help="name or id of the snapshot", max_len=NAME_LEN)
    new: str = arg(help="its new name", max_len=NAME_LEN)


@dataclass(frozen=True)
class MergeNode(Command):
    """Merge a hidden node now: retry a failed merge, or force one with 2+ dependents."""

    verb = "merge"
    host_work = True
    node: str = arg(help="a hidden node's id (or former name)", max_len=NAME_LEN)
    force: bool = arg(False, help="merge even with 2+ dependents: pull its data up into each")


@dataclass(frozen=True)
class RetryWork(Command):
    """Run the VM's failed host work again."""

    verb = "work.retry"
    host_work = True


@dataclass(frozen=True)
class AbandonWork(Command):
    """Roll back the take or apply whose overlay could not be created."""

    verb = "work.abandon"
    host_work = True


# --- queries ---


@dataclass(frozen=True)
class GetTree(Query):
    """The VM's tree: `tree VM --json`."""

    verb = "tree"
    vm: str


@dataclass(frozen=True)
class ListMerges(Query):
    """Hidden nodes and merges in flight: `merges [VM] --json`."""

    verb = "merges"
    vm: str | None = None


@dataclass(frozen=True)
class GetVMStatus(Query):
    """Whether the VM runs, and where: `vm status VM --json`."""

    verb = "vm.status"
    vm: str


@dataclass(frozen=True)
class GetVMDefinition(Query):
    """The VM's whole definition: `vm show VM --json`."""

    verb = "vm.show"
    vm: str


@dataclass(frozen=True)
class ListVMs(Query):
    """Every VM: `vm list --json`."""

    verb = "vm.list"
    vm: str | None = None  # unused: keeps every message's `vm` field; any value lists all


@dataclass(frozen=True)
class GetAuditLog(Query):
    """Every event of the VM: `audit log VM --json`."""

    verb = "audit.log"
    vm: str


# --- what workers report back (never on the queue) ---


@dataclass(frozen=True)
class RecordLayersCreated(Command):
    node_id: UUID
    live: LiveSwitch | None = None


@dataclass(frozen=True)
class RecordMemorySaved(Command):
    node_id: UUID
    bytes: int
    seconds: float
    sha256: str


@dataclass(frozen=True)
class RecordMemorySaveFailed(Command):
    node_id: UUID
    error: str


@dataclass(frozen=True)
class RecordMergeStarted(Command):
    node_id: UUID
    into: tuple[UUID, ...]
    direction: MergeDirection
    bytes: int


@dataclass(frozen=True)
class RecordMergeCompleted(Command):
    node_id: UUID


@dataclass(frozen=True)
class RecordMergeFailed(Command):
    node_id: UUID
    error: str


@dataclass(frozen=True)
class RecordFlattenStarted(Command):
    node_id: UUID
    base_id: UUID
    bytes: int


@dataclass(frozen=True)
class RecordFlattenCompleted(Command):
    node_id: UUID


@dataclass(frozen=True)
class RecordFlattenCancelled(Command):
    node_id: UUID
    reason: str


@dataclass(frozen=True)
class RecordFilesRemoved(Command):
    paths: tuple[str, ...]


@dataclass(frozen=True)
class RecordStepFailed(Command):
    kind: str
    seq: int
    error: str
    node_id: UUID | None = None
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecordRun(Command):
    """The host's worker started, stopped or found the VM's QEMU in this state."""

    state: RunState
    pid: int | None = None


PUBLIC_COMMANDS: tuple[type[Command], ...] = (
    CreateVM, StartVM, StopVM, SetVM,
    TakeSnapshot, ApplySnapshot, RevertSnapshot, DeleteSnapshot, RenameSnapshot, MergeNode,
    RetryWork, AbandonWork,
)
QUERIES: tuple[type[Query], ...] = (GetTree, ListMerges, GetVMStatus, GetVMDefinition, ListVMs, GetAuditLog)


def by_verb() -> dict[str, type[Command] | type[Query]]:
    """Every request a producer may put on the queue, by its verb."""
    out: dict[str, type[Command] | type[Query]] = {}
    for cls in (*PUBLIC_COMMANDS, *QUERIES):
        assert cls.verb is not None
        out[cls.verb] = cls
    return out


@dataclass(frozen=True)
class ChangeConfig(Command):
    """`SetVM` once the service checked it against this host: config keys to set (None: remove)."""

    changes: dict[str, Any]


@dataclass(frozen=True)
class RegisterVM(Command):
    """`CreateVM` once the service checked its disks: absolute paths by disk name."""

    host: str
    disks: dict[str, str]
    config: dict[str, Any]
