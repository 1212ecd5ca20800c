"""Build the bare-metal test guest (guest.c + guest.ld -> multiboot ELF).

    build_guest(out_dir) -> Path        # compiles once, cached by source hash
    python tests/guest/build.py [OUT_DIR]     (or python -m tests.guest.build;
                                               default OUT_DIR: $TMPDIR/snaptree-guest)

Needs only the host gcc and binutils: the guest is freestanding 32-bit code
(no libc, no libgcc), so `gcc -m32 -c` works without gcc-multilib (checked on
Debian 12, gcc 12.2).  The physical addresses the guest uses are exported
below for the tests.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "guest.c", HERE / "guest.ld")

COUNTER_ADDR = 0x00200000   # u32 heartbeat: pages completely filled so far
MAGIC_ADDR = 0x00200004     # u32 0x534E4150 ("SNAP") once the guest runs
MAGIC = 0x534E4150
DIRTY_ADDR = 0x00400000     # 4 MiB region the guest keeps rewriting
DIRTY_SIZE = 4 << 20
PAGE_SIZE = 4096

CFLAGS = [
    "-m32", "-march=i686", "-ffreestanding", "-nostdlib", "-fno-pic",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-mgeneral-regs-only", "-O2", "-Wall", "-Werror",
]
LDFLAGS = ["-m", "elf_i386", "-nostdlib", "-static", "-z", "max-page-size=0x1000"]


def _digest() -> str:
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    return h.hexdigest()[:16]


def build_guest(out_dir: str | os.PathLike[str]) -> Path:
    """Return the path of the guest ELF in out_dir, compiling it if needed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    elf = out / f"snaptree-guest-{_digest()}.elf"
    if elf.exists():
        return elf
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        obj = Path(tmp) / "guest.o"
        tmp_elf = Path(tmp) / "guest.elf"
        _run(["gcc", *CFLAGS, "-c", str(HERE / "guest.c"), "-o", str(obj)])
        _run(["ld", *LDFLAGS, "-T", str(HERE / "guest.ld"), "-o", str(tmp_elf), str(obj)])
        os.replace(tmp_elf, elf)  # atomic: concurrent builders agree
    return elf


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = argv[0] if argv else os.path.join(tempfile.gettempdir(), "snaptree-guest")
    print(build_guest(out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
