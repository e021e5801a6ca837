"""Host libraries a container is given: what the ldconfig cache names, what an ELF file
needs, which glibc a set of libraries asks for and which one an image has.

Shared by ``--mpi host`` (hostmpi.py) and ``--rdma`` (rdma.py), which bind host
libraries into an image: glibc itself is never among them (a process has exactly one
libc, the one its loader — the image's — maps; ld.so(8)), so the image's must be new
enough for them.  Stdlib only; nothing here is on the path of a plain launch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from mesobox.errors import LaunchError, UsageError

# glibc's own libraries and the loader (glibc 2.36 file list): they must be the image's.
GLIBC_PARTS = re.compile(
    r"^(ld-linux.*|ld64\.so.*|linux-vdso.*|linux-gate.*|lib(c|m|dl|rt|pthread|util|resolv|anl|mvec|"
    r"BrokenLocale|crypt|nsl|thread_db|memusage|pcprofile|nss_[a-z0-9_]+)\.so(\..*)?)$"
)
GLIBC_NEED = re.compile(rb"GLIBC_2\.(\d+)(?:\.(\d+))?\x00")
GLIBC_RELEASE = re.compile(rb"release version 2\.(\d+)")
# Where an image keeps libc.so.6, merged-/usr layouts first (no symlink is followed).
LIBC_CANDIDATES = (
    "usr/lib/x86_64-linux-gnu/libc.so.6", "usr/lib/aarch64-linux-gnu/libc.so.6",
    "usr/lib/powerpc64le-linux-gnu/libc.so.6", "usr/lib64/libc.so.6",
    "lib/x86_64-linux-gnu/libc.so.6", "lib/aarch64-linux-gnu/libc.so.6", "lib64/libc.so.6",
)


def ld_cache(cache_file: str = "") -> list[tuple[str, str, str]]:
    """(soname, tags, path) of each ``ldconfig -p`` line; ``cache_file`` names another
    cache (``ldconfig -C FILE -p``: the tests' fake trees)."""
    from mesobox.launch.gpu import parse_ld_cache

    argv = ["ldconfig", "-p"] if not cache_file else ["ldconfig", "-C", cache_file, "-p"]
    for program in ("/sbin/ldconfig", "/usr/sbin/ldconfig"):
        if os.path.isfile(program):
            argv[0] = program
            break
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UsageError(f"cannot read the ldconfig cache: {err}") from None
    if done.returncode != 0:
        raise UsageError(f"cannot read the ldconfig cache: {done.stderr.strip() or done.returncode}")
    return parse_ld_cache(done.stdout)


def cache_index(cache: list[tuple[str, str, str]]) -> dict[str, str]:
    """soname -> path, a 64-bit entry before a 32-bit one on a 64-bit host."""
    import sys

    wide = sys.maxsize > 2**32
    index: dict[str, str] = {}
    for name, _tags, path in sorted(cache, key=lambda e: ("64" in e[1]) != wide):
        index.setdefault(name, path)
    return index


def elf_needed(path: str) -> set[str] | None:
    """DT_NEEDED names of an ELF64 little-endian file, from its SHT_DYNAMIC section and
    the string table that section links to (elf(5)); None when it cannot be read so."""
    import struct

    try:
        data = Path(path).read_bytes()
        if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
            return None
        (shoff,), (shentsize, shnum) = struct.unpack_from("<Q", data, 0x28), struct.unpack_from("<HH", data, 0x3A)
        for i in range(shnum):
            _, sh_type, _, _, off, size, link = struct.unpack_from("<IIQQQQI", data, shoff + i * shentsize)
            if sh_type != 6:  # SHT_DYNAMIC
                continue
            (strtab,) = struct.unpack_from("<Q", data, shoff + link * shentsize + 24)
            names: set[str] = set()
            for entry in range(off, off + size, 16):
                tag, val = struct.unpack_from("<qQ", data, entry)
                if tag == 0:  # DT_NULL ends the array
                    break
                if tag == 1:  # DT_NEEDED
                    names.add(data[strtab + val : data.index(b"\0", strtab + val)].decode())
            return names
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return None
    return None


def glibc_needed(files: list[str]) -> tuple[int, int]:
    """Highest ``GLIBC_2.N`` version any of ``files`` asks for."""
    best = (2, 0)
    for path in files:
        data = Path(path).read_bytes()
        for match in GLIBC_NEED.finditer(data):
            best = max(best, (2, int(match.group(1))))
    return best


def read_libc(image: Path) -> bytes | None:
    """The image's libc.so.6 bytes, from a rootfs directory or a squashfs file."""
    for rel in LIBC_CANDIDATES:
        if image.is_dir():
            path = image / rel
            # Never leave the image through one of its symlinks.
            if path.is_file() and os.path.realpath(path).startswith(os.path.realpath(image) + os.sep):
                return path.read_bytes()
            continue
        proc = subprocess.run([_unsquashfs(), "-cat", str(image), rel],
                              capture_output=True, check=False)
        if proc.returncode == 0 and proc.stdout:
            return proc.stdout
    return None


def image_glibc(image: Path) -> tuple[int, int] | None:
    """glibc version of an image, as (2, N); None when it has no libc.so.6."""
    data = read_libc(image)
    if data is None:
        return None
    release = GLIBC_RELEASE.search(data)
    if release:
        return (2, int(release.group(1)))
    versions = [int(m.group(1)) for m in GLIBC_NEED.finditer(data)]
    return (2, max(versions)) if versions else None


def _unsquashfs() -> str:
    path = shutil.which("unsquashfs")
    if path is None:
        raise LaunchError("unsquashfs not found on this node", hint="install squashfs-tools")
    return path
