"""Offline checks of one snapshot layer of the Linux test guest's data disk.

    check_layer(layer_path, workdir) -> LayerCheck
    console_lines(serial_log) -> list[int]       # the n of each `SNAPTREE-LINE n`
    boot_ids(serial_log) -> list[str]            # the boot id of each `SNAPTREE-GUEST boot_id=...`
    parse_log(data) -> LogCheck                  # the checks of /data/log.txt's bytes alone

A layer is a qcow2 file whose backing chain reads as the whole disk at that snapshot.
It is only read (`qemu-img check -U`, `qemu-img convert -U`); the filesystem is examined
on a raw copy made in workdir and deleted afterwards:

  1. dumpe2fs -h: is `needs_recovery` set (a crash-consistent snapshot of a mounted ext4)?
  2. e2fsck -fn on the copy as it is, and debugfs `cat /log.txt` of it (what a reader that
     ignores the journal sees);
  3. e2fsck -y -E journal_only (replay the journal, as a mount would), then e2fsck -fn
     again and `cat /log.txt`: what the guest sees when it boots from this snapshot.

The log's lines are `<n> <uptime-seconds> <boot_id>`; the file is `contiguous` when it
holds exactly lines 1..k, each well formed, each boot id in one run (a guest booted
from a restored disk continues the numbering with a new boot id; one restored with its
memory keeps its boot id).  `torn` is a partial last line or any malformed line.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

LOG_PATH = "/log.txt"  # in the data filesystem (mounted at /data in the guest)
LINE_RE = re.compile(rb"(\d+) (\d+\.\d+) ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
CONSOLE_LINE_RE = re.compile(r"SNAPTREE-LINE (\d+)\s*$")
BOOT_RE = re.compile(r"SNAPTREE-GUEST boot_id=([0-9a-f-]{36})\b")


class CheckError(RuntimeError):
    """A tool could not be run at all (not: the layer failed a check)."""


@dataclass(frozen=True)
class LogCheck:
    found: bool                   # the file exists
    lines: int                    # k: complete lines (well formed or not)
    contiguous: bool              # exactly lines 1..k, well formed, boot ids in runs
    torn: bool                    # a partial last line, or a malformed line
    last_line: str | None         # the last complete line's text
    last_n: int | None            # its number, if well formed
    boot_ids: tuple[str, ...]     # in order of first appearance
    uptime_monotonic: bool        # uptimes never go back within one boot id
    problems: tuple[str, ...]


@dataclass(frozen=True)
class LayerCheck:
    layer: Path
    qemu_img_check_clean: bool    # `qemu-img check -U` of the layer file: exit 0
    needs_recovery: bool          # the ext4 superblock has needs_recovery (journal to replay)
    fsck_clean_before_replay: bool
    fsck_clean_after_replay: bool
    lines: int                    # k, after the replay
    contiguous: bool
    torn: bool
    last_line: str | None
    last_n: int | None
    boot_ids: tuple[str, ...]
    lines_before_replay: int      # what a reader ignoring the journal sees
    log: LogCheck                 # the full log verdict after the replay
    log_before_replay: LogCheck
    details: str                  # tool output worth showing when something fails

    @property
    def ok(self) -> bool:
        """Crash-consistent: clean image, clean fsck after replay, lines 1..k, nothing torn."""
        return (self.qemu_img_check_clean and self.fsck_clean_after_replay
                and self.contiguous and not self.torn)

    @property
    def application_consistent(self) -> bool:
        """Consistent without any journal replay (the snapshot of a frozen filesystem)."""
        return self.ok and not self.needs_recovery and self.fsck_clean_before_replay


def check_layer(layer_path: str | os.PathLike[str], workdir: str | os.PathLike[str],
                keep_copy: bool = False) -> LayerCheck:
    layer = Path(layer_path)
    if not layer.is_file():
        raise CheckError(f"{layer}: no such layer file")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    details: list[str] = []

    img = _run(["qemu-img", "check", "-U", str(layer)])
    qemu_img_clean = img.returncode == 0
    if not qemu_img_clean:
        details.append(f"qemu-img check -U: exit {img.returncode}\n{img.stdout}{img.stderr}")

    fd, name = tempfile.mkstemp(prefix=f"{layer.name}.", suffix=".raw", dir=work)
    os.close(fd)
    raw = Path(name)
    try:
        conv = _run(["qemu-img", "convert", "-U", "-O", "raw", str(layer), str(raw)])
        if conv.returncode != 0:
            raise CheckError(f"qemu-img convert -U -O raw {layer}: exit {conv.returncode}\n{conv.stderr}")

        needs_recovery = "needs_recovery" in _features(raw)
        before = _run(["e2fsck", "-fn", str(raw)])
        fsck_before = before.returncode == 0
        if not fsck_before:
            details.append(f"e2fsck -fn (before replay): exit {before.returncode}\n{before.stdout}")
        log_before = parse_log(_cat(raw))

        replay = _run(["e2fsck", "-y", "-E", "journal_only", str(raw)])
        if replay.returncode not in (0, 1):  # 1: "errors corrected" (the journal was replayed)
            details.append(f"e2fsck -y -E journal_only: exit {replay.returncode}\n{replay.stdout}")
        after = _run(["e2fsck", "-fn", str(raw)])
        fsck_after = after.returncode == 0 and replay.returncode in (0, 1)
        if after.returncode != 0:
            details.append(f"e2fsck -fn (after replay): exit {after.returncode}\n{after.stdout}")
        log = parse_log(_cat(raw))
        if log.problems:
            details.append("log.txt: " + "; ".join(log.problems))
    finally:
        if not keep_copy:
            raw.unlink(missing_ok=True)

    return LayerCheck(
        layer=layer, qemu_img_check_clean=qemu_img_clean, needs_recovery=needs_recovery,
        fsck_clean_before_replay=fsck_before, fsck_clean_after_replay=fsck_after,
        lines=log.lines, contiguous=log.contiguous, torn=log.torn,
        last_line=log.last_line, last_n=log.last_n, boot_ids=log.boot_ids,
        lines_before_replay=log_before.lines, log=log, log_before_replay=log_before,
        details="\n".join(details),
    )


def parse_log(data: bytes | None) -> LogCheck:
    """Judge the bytes of log.txt (None: the file does not exist)."""
    if data is None:
        return LogCheck(False, 0, False, False, None, None, (), True, ("log.txt not found",))
    problems: list[str] = []
    parts = data.split(b"\n")
    tail = parts.pop()  # b"" when the file ends with a newline
    torn = False
    if tail:
        torn = True
        problems.append(f"partial last line {tail[:80]!r}")
    numbers: list[int] = []
    boots: list[str] = []
    closed: set[str] = set()
    monotonic = True
    last_up: dict[str, float] = {}
    well_formed = True
    for i, line in enumerate(parts, 1):
        m = LINE_RE.fullmatch(line)
        if not m:
            well_formed = False
            torn = True
            if len(problems) < 10:
                problems.append(f"line {i} malformed: {line[:80]!r}")
            continue
        n, up, boot = int(m.group(1)), float(m.group(2)), m.group(3).decode()
        numbers.append(n)
        if not boots or boots[-1] != boot:
            if boot in closed and len(problems) < 10:
                problems.append(f"line {i}: boot id {boot} comes back after another one")
            if boots:
                closed.add(boots[-1])
            boots.append(boot)
        if up < last_up.get(boot, 0.0):
            monotonic = False
            if len(problems) < 10:
                problems.append(f"line {i}: uptime {up} goes back (boot {boot})")
        last_up[boot] = up
    k = len(parts)
    runs_ok = len(boots) == len(set(boots))
    numbers_ok = numbers == list(range(1, k + 1))
    if well_formed and not numbers_ok:
        bad = next((i for i, n in enumerate(numbers, 1) if n != i), None)
        problems.append(f"line {bad} holds number {numbers[bad - 1] if bad else '?'}: not 1..{k}")
    last_line = parts[-1].decode(errors="replace") if parts else None
    last_m = LINE_RE.fullmatch(parts[-1]) if parts else None
    return LogCheck(
        found=True, lines=k, contiguous=not torn and numbers_ok and runs_ok, torn=torn,
        last_line=last_line, last_n=int(last_m.group(1)) if last_m else None,
        boot_ids=tuple(dict.fromkeys(boots)), uptime_monotonic=monotonic, problems=tuple(problems),
    )


def console_lines(log_path: str | os.PathLike[str]) -> list[int]:
    """The n of every `SNAPTREE-LINE n` line of a serial log, in order."""
    out = []
    for line in _read_text(log_path).splitlines():
        m = CONSOLE_LINE_RE.search(line)
        if m:
            out.append(int(m.group(1)))
    return out


def boot_ids(log_path: str | os.PathLike[str]) -> list[str]:
    """The boot id of every boot a serial log shows, in order."""
    return BOOT_RE.findall(_read_text(log_path))


def _read_text(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_bytes().decode(errors="replace").replace("\r", "")
    except FileNotFoundError:
        return ""


def _features(raw: Path) -> set[str]:
    proc = _run(["dumpe2fs", "-h", str(raw)])
    if proc.returncode != 0:
        raise CheckError(f"dumpe2fs -h {raw}: exit {proc.returncode}\n{proc.stderr}")
    for line in proc.stdout.splitlines():
        if line.startswith("Filesystem features:"):
            return set(line.split(":", 1)[1].split())
    raise CheckError(f"dumpe2fs -h {raw}: no 'Filesystem features' line:\n{proc.stdout}")


def _cat(raw: Path) -> bytes | None:
    cmd = ["debugfs", "-R", f"cat {LOG_PATH}", str(raw)]
    try:
        proc = subprocess.run(cmd, capture_output=True)
    except OSError as e:
        raise CheckError(f"cannot run debugfs: {e} (apt-get install e2fsprogs)") from e
    err = proc.stderr.decode(errors="replace")
    if "File not found" in err:
        return None
    if proc.returncode != 0 or "debugfs:" in err.replace("debugfs 1.", ""):
        raise CheckError(f"{' '.join(cmd)}: exit {proc.returncode}\n{err}")
    return proc.stdout


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    if shutil.which(cmd[0]) is None:
        raise CheckError(f"{cmd[0]} is not installed (see tests/guest/linux HOST_PACKAGES)")
    return subprocess.run(cmd, capture_output=True, text=True)
