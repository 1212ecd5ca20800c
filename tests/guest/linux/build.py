"""Build the Linux test guest: a Debian cloud kernel + a busybox initramfs.

    build_linux_guest(cache_dir) -> LinuxGuest
    python -m tests.guest.linux.build [CACHE_DIR]   (default: $TMPDIR/snaptree-linux-guest)

Everything comes from Debian packages fetched with `apt-get download` (never installed
on the host): the kernel (`linux-image-cloud-amd64` -> `linux-image-<version>-cloud-amd64`),
`busybox-static` and `qemu-guest-agent`.  qemu-ga is dynamically linked: it is copied
with the host libraries `ldd` lists and the dynamic loader (the host runs the same
Debian release).  The initramfs (cpio newc + gzip) is written here in Python, so it
needs no host cpio and can hold a /dev/console node without being root.

The result is cached in CACHE_DIR/guest-<digest>/, the digest covering the package
versions, init.sh and this file: a second call costs a few stat()s.  A build happens in
a temporary directory renamed into place, so concurrent builders never see (or leave)
a half-built guest; a failure raises BuildError.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"
BUILD_CODE = Path(__file__).resolve()

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
AGENT_PACKAGE = "qemu-guest-agent"
# Host packages whose libraries end up in the initramfs (next to qemu-ga); their
# versions are part of the digest.  build() checks that ldd's list stays inside them.
AGENT_LIB_PACKAGES = ("libc6", "libglib2.0-0", "libnuma1", "libudev1", "liburing2", "libpcre2-8-0")

# The virtio stack is modular in the cloud kernel: insmod order (dependencies first;
# checked against each module's `depends=` at build time).
MODULES = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "virtio_blk",
    "failover", "net_failover", "virtio_net",
    "virtio_console",
)
DEFAULT_APPEND = "console=ttyS0 panic=-1"
FORMAT = 1  # bump when the layout of the cache entry changes


class BuildError(RuntimeError):
    """The guest could not be built; nothing was left in the cache."""


@dataclass(frozen=True)
class LinuxGuest:
    kernel: Path                                # bzImage (vmlinuz)
    initrd: Path                                # gzip'ed cpio (newc)
    kernel_version: str                         # `uname -r` in the guest, e.g. 6.1.0-57-cloud-amd64
    packages: tuple[tuple[str, str], ...]       # Debian packages in the guest: (name, version)
    host_packages: tuple[tuple[str, str], ...]  # host packages whose libraries were copied
    kernel_size: int                            # bytes
    initrd_size: int                            # bytes
    digest: str

    def append(self, interval_ms: int | None = None, extra: str = "") -> str:
        """A kernel command line for this guest (serial console on ttyS0)."""
        parts = [DEFAULT_APPEND]
        if interval_ms is not None:
            parts.append(f"snaptree.interval_ms={int(interval_ms)}")
        if extra:
            parts.append(extra)
        return " ".join(parts)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["kernel"], d["initrd"] = self.kernel.name, self.initrd.name
        return d

    @classmethod
    def from_json(cls, d: dict, directory: Path) -> "LinuxGuest":
        return cls(
            kernel=directory / d["kernel"], initrd=directory / d["initrd"],
            kernel_version=d["kernel_version"],
            packages=tuple(tuple(p) for p in d["packages"]),
            host_packages=tuple(tuple(p) for p in d["host_packages"]),
            kernel_size=int(d["kernel_size"]), initrd_size=int(d["initrd_size"]),
            digest=d["digest"],
        )


# ---------------------------------------------------------------- entry point
def build_linux_guest(cache_dir: str | os.PathLike[str]) -> LinuxGuest:
    """Return the guest in cache_dir, building it first if needed."""
    cache = Path(cache_dir).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    versions = _resolve_versions(cache)
    host = _host_versions()
    digest = _digest(versions, host)
    final = cache / f"guest-{digest}"
    cached = _load(final)
    if cached is not None:
        return cached

    _remove_stale(cache, ".build-")
    _remove_stale(cache / "debs", ".download-")
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        _build(cache, tmp, versions, host, digest)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another builder renamed its (identical) result first: drop ours.
            if _load(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    guest = _load(final)
    if guest is None:
        raise BuildError(f"built {final} but cannot read it back")
    return guest


def _remove_stale(directory: Path, prefix: str, age_s: float = 3600.0) -> None:
    """Temporary directories of builders that died (a live one is younger than an hour)."""
    now = time.time()
    for p in directory.glob(prefix + "*"):
        try:
            if now - p.stat().st_mtime > age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _load(directory: Path) -> LinuxGuest | None:
    meta = directory / "guest.json"
    try:
        guest = LinuxGuest.from_json(json.loads(meta.read_text()), directory)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (guest.kernel.is_file() and guest.initrd.is_file()):
        return None
    return guest


# ---------------------------------------------------------------- versions
def _apt_lists_key() -> str:
    """A fingerprint of apt's package lists: candidates change only when they do."""
    h = hashlib.sha256()
    for d in (Path("/var/lib/apt/lists"), Path("/etc/apt/sources.list.d"), Path("/etc/apt/preferences.d")):
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        for p in entries:
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for f in (Path("/etc/apt/sources.list"), Path("/etc/apt/preferences")):
        if f.exists():
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _resolve_versions(cache: Path) -> dict[str, str]:
    """{"kernel": pkg, pkg: version, ...}: the candidates apt would download now.

    apt-cache takes about a second here (no pkgcache.bin), so the answer is kept in the
    cache dir, keyed by the state of apt's lists."""
    memo = cache / f"versions-{_apt_lists_key()}.json"
    try:
        return json.loads(memo.read_text())
    except (OSError, ValueError):
        pass
    pkgs = [KERNEL_META_PACKAGE, BUSYBOX_PACKAGE, AGENT_PACKAGE]
    fields = _apt_show(pkgs)
    meta = fields.get(KERNEL_META_PACKAGE, {})
    m = re.search(r"\b(linux-image-[0-9][^\s,()]*-cloud-amd64)\s*\(=\s*([^)\s]+)\)", meta.get("Depends", ""))
    if not m:
        raise BuildError(f"{KERNEL_META_PACKAGE} {meta.get('Version')}: cannot find the kernel package "
                         f"in its Depends: {meta.get('Depends')!r}")
    kernel_pkg, kernel_ver = m.group(1), m.group(2)
    versions = {
        "kernel": kernel_pkg,
        kernel_pkg: kernel_ver,
        BUSYBOX_PACKAGE: fields[BUSYBOX_PACKAGE]["Version"],
        AGENT_PACKAGE: fields[AGENT_PACKAGE]["Version"],
    }
    _atomic_write(memo, json.dumps(versions, indent=1).encode())
    return versions


def _apt_show(pkgs: list[str]) -> dict[str, dict[str, str]]:
    cmd = ["apt-cache", "show", "--no-all-versions", *pkgs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    fields = _parse_control(proc.stdout) if proc.returncode == 0 else {}
    if any(p not in fields for p in pkgs):
        _apt_update()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        fields = _parse_control(proc.stdout) if proc.returncode == 0 else {}
    missing = [p for p in pkgs if p not in fields or "Version" not in fields[p]]
    if missing:
        raise BuildError(f"apt knows no package {missing} even after apt-get update:\n{proc.stderr.strip()}")
    return fields


def _parse_control(text: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for para in text.split("\n\n"):
        f: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                f[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, val = line.partition(":")
                f[key] = val.strip()
        if "Package" in f:
            out.setdefault(f["Package"], f)
    return out


def _apt_update() -> None:
    proc = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True,
                          env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if proc.returncode != 0:
        raise BuildError(f"apt-get update failed ({proc.returncode}):\n{proc.stderr.strip()}")


def _host_versions() -> dict[str, str]:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n",
                           *AGENT_LIB_PACKAGES], capture_output=True, text=True)
    found = {}
    for line in proc.stdout.splitlines():
        name, _, rest = line.partition("\t")
        version, _, status = rest.partition("\t")
        if status.startswith("ii"):
            found[name] = version
    missing = [p for p in AGENT_LIB_PACKAGES if p not in found]
    if missing:
        raise BuildError(f"host packages {missing} are not installed; qemu-ga in the guest needs their "
                         f"libraries: apt-get install {' '.join(missing)}")
    return found


def _digest(versions: dict[str, str], host: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(f"format={FORMAT}\n".encode())
    h.update(json.dumps([versions, host], sort_keys=True).encode())
    for f in (INIT_SCRIPT, BUILD_CODE):
        h.update(b"\0" + f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- build
def _build(cache: Path, tmp: Path, versions: dict[str, str], host: dict[str, str], digest: str) -> None:
    kernel_pkg = versions["kernel"]
    kernel_version = kernel_pkg.removeprefix("linux-image-")
    pkgs = [(kernel_pkg, versions[kernel_pkg]), (BUSYBOX_PACKAGE, versions[BUSYBOX_PACKAGE]),
            (AGENT_PACKAGE, versions[AGENT_PACKAGE])]
    debs = _download(cache, pkgs)
    root = tmp / "x"
    for deb in debs.values():
        _run(["dpkg-deb", "-x", str(deb), str(root)])

    vmlinuz = root / "boot" / f"vmlinuz-{kernel_version}"
    moddir = root / "lib" / "modules" / kernel_version
    busybox = root / "bin" / "busybox"
    qemu_ga = root / "usr" / "sbin" / "qemu-ga"
    for p in (vmlinuz, moddir, busybox, qemu_ga):
        if not p.exists():
            raise BuildError(f"{p.relative_to(root)} is missing from the downloaded packages {pkgs}")

    cpio = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "data", "run", "tmp",
              "etc", "etc/snaptree", "lib", "lib/modules", "lib64", "var", "www"):
        cpio.directory(d)
    cpio.symlink("var/run", "../run")
    cpio.node("dev/console", stat.S_IFCHR | 0o600, 5, 1)
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)

    # busybox and its applets
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = _run([str(busybox), "--list-full"]).split()
    if "bin/sh" not in applets:
        raise BuildError(f"{busybox} --list-full does not list bin/sh: {applets[:10]}...")
    for applet in applets:
        if applet != "bin/busybox" and not applet.startswith("linuxrc"):
            depth = applet.count("/")
            cpio.symlink(applet, "../" * depth + "bin/busybox")

    # virtio modules, decompressed, in insmod order
    modules = _collect_modules(moddir, kernel_version)
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data, 0o644)
    cpio.file("etc/snaptree/modules", "".join(f"{n}\n" for n, _ in modules).encode(), 0o644)

    # qemu-ga and the host libraries it links
    cpio.file("usr/sbin/qemu-ga", qemu_ga.read_bytes(), 0o755)
    libs = _agent_libraries(qemu_ga)
    for guest_path, host_path in libs:
        for parent in _parents(guest_path):
            cpio.directory(parent)
        cpio.file(guest_path, host_path.read_bytes(), 0o755)

    info = {"digest": digest, "packages": pkgs, "host_packages": sorted(host.items()),
            "modules": [n for n, _ in modules], "libraries": [g for g, _ in libs]}
    cpio.file("etc/snaptree/build.json", json.dumps(info, indent=1).encode(), 0o644)

    kernel_out = tmp / "vmlinuz"
    initrd_out = tmp / "initrd.gz"
    shutil.copyfile(vmlinuz, kernel_out)
    initrd_out.write_bytes(gzip.compress(cpio.finish(), compresslevel=9, mtime=0))
    shutil.rmtree(root)

    guest = LinuxGuest(
        kernel=kernel_out, initrd=initrd_out, kernel_version=kernel_version,
        packages=tuple(pkgs), host_packages=tuple(sorted(host.items())),
        kernel_size=kernel_out.stat().st_size, initrd_size=initrd_out.stat().st_size,
        digest=digest,
    )
    # guest.json last: a directory holding it is complete.
    (tmp / "guest.json").write_text(json.dumps(guest.to_json(), indent=1) + "\n")


def _download(cache: Path, pkgs: list[tuple[str, str]]) -> dict[str, Path]:
    """apt-get download each name=version into CACHE/debs (kept across builds)."""
    debs_dir = cache / "debs"
    debs_dir.mkdir(exist_ok=True)

    def target(name: str, version: str) -> Path:
        return debs_dir / f"{name}_{version.replace(':', '%3a')}_amd64.deb"

    wanted = [(n, v) for n, v in pkgs if not target(n, v).is_file()]
    if wanted:
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=debs_dir))
        try:
            os.chmod(tmp, 0o755)
            cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *[f"{n}={v}" for n, v in wanted]]
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                # Missing or stale lists are the usual cause: refresh them once.
                _apt_update()
                proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
            for n, v in wanted:
                got = [p for p in tmp.glob(f"{n}_*.deb")]
                if len(got) != 1:
                    raise BuildError(f"apt-get download {n}={v} left {got} in {tmp}")
                ctl = _run(["dpkg-deb", "-f", str(got[0]), "Package", "Version"])
                if f"Package: {n}" not in ctl or f"Version: {v}" not in ctl:
                    raise BuildError(f"{got[0]} is not {n} {v}:\n{ctl}")
                os.replace(got[0], target(n, v))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {n: target(n, v) for n, v in pkgs}


def _collect_modules(moddir: Path, kernel_version: str) -> list[tuple[str, bytes]]:
    index: dict[str, Path] = {}
    for p in moddir.rglob("*.ko*"):
        name = p.name.split(".ko")[0].replace("-", "_")
        index.setdefault(name, p)
    out: list[tuple[str, bytes]] = []
    loaded: set[str] = set()
    for name in MODULES:
        p = index.get(name)
        if p is None:
            raise BuildError(f"module {name} not found under {moddir} (built in? then drop it from MODULES)")
        raw = p.read_bytes()
        if p.name.endswith(".ko.xz"):
            raw = lzma.decompress(raw)  # busybox insmod cannot read xz
        elif not p.name.endswith(".ko"):
            raise BuildError(f"{p}: unsupported module compression")
        info: dict[bytes, bytes] = {}
        for m in re.finditer(rb"(?:^|\0)(depends|vermagic)=([^\0]*)", raw):
            info.setdefault(m.group(1), m.group(2))  # the first: .modinfo
        vermagic = info.get(b"vermagic", b"").decode()
        if not vermagic.startswith(kernel_version + " "):
            raise BuildError(f"{p}: vermagic {vermagic!r} is not for {kernel_version}")
        deps = [d for d in info.get(b"depends", b"").decode().split(",") if d]
        missing = [d for d in deps if d.replace("-", "_") not in loaded]
        if missing:
            raise BuildError(f"module {name} depends on {missing}, which MODULES does not load before it")
        loaded.add(name)
        out.append((name, raw))
    return out


def _agent_libraries(binary: Path) -> list[tuple[str, Path]]:
    """[(path in the guest, file on the host)] for each library ldd lists, loader included."""
    out = _run(["ldd", str(binary)])
    libs: list[tuple[str, Path]] = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise BuildError(f"ldd {binary}: {line}: install the host package that provides it "
                             f"(see AGENT_LIB_PACKAGES)")
        m = re.match(r"\S+\s+=>\s+(/\S+)\s+\(", line) or re.match(r"(/\S+)\s+\(", line)
        if m:
            libs.append((m.group(1).lstrip("/"), Path(m.group(1)).resolve()))
        elif not line.startswith("linux-vdso"):
            raise BuildError(f"ldd {binary}: cannot parse {line!r}")
    if not any("ld-linux" in g for g, _ in libs):
        raise BuildError(f"ldd {binary} lists no dynamic loader:\n{out}")
    # Which host package owns each library?  dpkg knows a file by the path its package
    # ships (/lib/... or /usr/lib/..., merged /usr makes both work), so ask for all spellings.
    spellings: dict[str, str] = {}
    for guest_path, host_path in libs:
        for p in {"/" + guest_path, str(host_path), os.path.realpath("/" + os.path.dirname(guest_path))
                  + "/" + os.path.basename(guest_path)}:
            for q in (p, p.removeprefix("/usr")):
                spellings[q] = guest_path
    proc = subprocess.run(["dpkg-query", "-S", *spellings], capture_output=True, text=True)
    owner: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        pkgs, _, path = line.rpartition(": ")
        if path in spellings:
            owner.setdefault(spellings[path], pkgs.split(",")[0].split(":")[0].strip())
    unowned = [g for g, _ in libs if g not in owner]
    outside = sorted({f"{g} ({owner[g]})" for g, _ in libs if g in owner and owner[g] not in AGENT_LIB_PACKAGES})
    if unowned or outside:
        raise BuildError(f"qemu-ga links libraries that no package of AGENT_LIB_PACKAGES owns: "
                         f"unowned {unowned}, other packages {outside}")
    return libs


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


# ---------------------------------------------------------------- cpio (newc)
class Cpio:
    """An in-memory cpio archive in the "newc" format the kernel unpacks."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 300000
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        if name in self._names:
            if stat.S_ISDIR(mode):
                return
            raise BuildError(f"cpio: {name} added twice")
        self._names.add(name)
        self._ino += 1
        nlink = 2 if stat.S_ISDIR(mode) else 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._buf.write(b"070701" + b"".join(b"%08x" % f for f in fields))
        self._buf.write(encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def node(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._ino = 0
        self._names.discard("TRAILER!!!")
        self._entry("TRAILER!!!", 0)
        self._buf.write(b"\0" * (-self._buf.tell() % 512))
        return self._buf.getvalue()


# ---------------------------------------------------------------- helpers
def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise BuildError(f"cannot run {cmd[0]}: {e}") from e
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return proc.stdout


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "snaptree-linux-guest"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cache = Path(argv[0]) if argv else default_cache_dir()
    try:
        guest = build_linux_guest(cache)
    except BuildError as e:
        print(f"snaptree linux guest: build failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps({**guest.to_json(), "kernel": str(guest.kernel), "initrd": str(guest.initrd)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
