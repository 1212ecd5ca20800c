"""Guest RAM on the host's 2 MiB huge pages (a VM's `hugepages` option).

Why: a background snapshot saves and un-protects guest RAM one *host* page at a time. On 4 KiB
pages QEMU 7.2 pays a flush of the state file and a userfaultfd ioctl per 4 KiB (~150 MiB/s);
on 2 MiB pages there are 512 times fewer (measured here: a 256 MiB guest saves at about a bare
migration's speed; at 1 GiB 2-14x the ordinary rate, varying from run to run), and arming the
write protection at the pause costs a few hundred ioctls instead of hundreds of thousands.

The pages come from the host's hugetlb pool, which its administrator reserves
(`sysctl vm.nr_hugepages=N`); QEMU takes them all at start (`prealloc`) so that no snapshot
pays for faulting them in. The RAM block keeps QEMU's default name (`pc.ram`), so a memory
state saved on huge pages restores on ordinary ones and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters.qemu.errors import MachineError

PAGE_MIB = 2
RAM_ID = "pc.ram"  # x86's default RAM block name: the migration stream names blocks by it
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class Pool:
    """The host's pool of 2 MiB huge pages (/proc/meminfo)."""

    total: int
    free: int
    page_kib: int

    @property
    def free_mib(self) -> int:
        return self._mib(self.free)

    @property
    def total_mib(self) -> int:
        return self._mib(self.total)

    def _mib(self, pages: int) -> int:
        """MiB in `pages` of the 2 MiB size QEMU is asked for (none if the host's are another)."""
        return pages * PAGE_MIB if self.page_kib == PAGE_MIB * 1024 else 0


def pool(meminfo: Path = MEMINFO) -> Pool:
    fields: dict[str, int] = {}
    for line in meminfo.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("HugePages_Total", "HugePages_Free", "Hugepagesize"):
            fields[key] = int(rest.split()[0])
    return Pool(fields.get("HugePages_Total", 0), fields.get("HugePages_Free", 0),
                fields.get("Hugepagesize", 0))


def advice(memory_mib: int) -> str:
    pages = memory_mib // PAGE_MIB
    return (f"a {memory_mib} MiB guest needs {pages} free huge pages of {PAGE_MIB} MiB: reserve them "
            f"(as root: sysctl vm.nr_hugepages=<pages in use + {pages}>), or turn the option off "
            "(`snaptree vm set VM --no-hugepages`)")


def check_free(memory_mib: int, host: Pool | None = None) -> None:
    """Before starting a QEMU: enough free pages, or a clear error (QEMU's own is cryptic)."""
    host = host or pool()
    if host.free_mib < memory_mib:
        raise MachineError(f"hugepage-backed RAM: the host has {host.free_mib} MiB of free huge pages; "
                           + advice(memory_mib))


def qemu_args(memory_mib: int) -> list[str]:
    backend = (f"memory-backend-memfd,id={RAM_ID},size={memory_mib}M,hugetlb=on,"
               f"hugetlbsize={PAGE_MIB}M,prealloc=on,x-use-canonical-path-for-ramblock-id=off")
    return ["-object", backend]
