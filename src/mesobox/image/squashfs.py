"""Squashfs images: build with ``mksquashfs`` (one file per image digest).

One file per image instead of millions of small files is what parallel-filesystem
metadata servers want (the Shifter/Enroot/Apptainer-SIF model).  zstd is used where
this mksquashfs supports it, gzip otherwise.  Extended attributes are not stored: the
image's security.capability bits must not reach anyone (see layers.py).

Reproducible: the same flattened tree gives the same bytes.  mksquashfs orders
entries and fragments deterministically (``-reproducible``, whatever ``-processors``),
and the two times it would take from the clock are fixed: the filesystem's creation
time and the root directory's (which no layer names), both SOURCE_DATE_EPOCH when it
is set, else 0, as are directories no layer names (layers.py).  File times are the
layers' own (Python's .pyc files are checked against them).  Owners are the flattening
user's when it is not root (layers.py), so two users' stores differ in those ids;
stores flattened by the same user, and root's, agree byte for byte (``inspect`` shows
the file's digest).

``mksquashfs`` dies with the process that started it (``PR_SET_PDEATHSIG``): a pull
killed with SIGKILL leaves no orphan compressing an image into a deleted directory.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

from mesobox.errors import StoreError
from mesobox.files import SQUASHFS_MAGIC, source_date_epoch

_BYTES_USED = struct.Struct("<Q")  # superblock offset 40: bytes_used (squashfs 4.0)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def looks_complete(path: Path) -> bool:
    """Superblock sanity of a squashfs built elsewhere: the magic, and a file at least as
    long as the superblock says it uses (a truncated copy fails this)."""
    try:
        with open(path, "rb") as f:
            head = f.read(48)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 48 or head[:4] != SQUASHFS_MAGIC:
        return False
    used: int = _BYTES_USED.unpack_from(head, 40)[0]
    return 96 <= used <= size


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies.

    The death signal follows the *thread* that forked the child, so call from a thread
    that lives as long as the child is waited for (flatten runs in the main thread).  If
    the parent died between fork and prctl, the signal never comes: the child checks
    getppid() and kills itself."""
    from mesobox.launch.syscalls import prctl  # the one ctypes leaf; imported before fork

    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _mksquashfs() -> str:
    tool = shutil.which("mksquashfs") or ("/usr/sbin/mksquashfs" if os.path.exists("/usr/sbin/mksquashfs") else None)
    if tool is None:
        raise StoreError("mksquashfs not found", hint="install squashfs-tools (apt-get install squashfs-tools)")
    return tool


@functools.lru_cache(maxsize=1)
def supported_compressors() -> frozenset[str]:
    """Compressors this mksquashfs was built with (parsed from its help text)."""
    res = subprocess.run([_mksquashfs(), "-help"], capture_output=True, text=True, check=False,
                         preexec_fn=die_with_parent())
    text = res.stdout + res.stderr
    names = set()
    in_section = False
    for line in text.splitlines():
        if "Compressors available" in line:
            in_section = True
            continue
        if in_section:
            word = line.strip().split(" ")[0]
            if word in ("gzip", "lzo", "lz4", "xz", "zstd", "lzma"):
                names.add(word)
    return frozenset(names or {"gzip"})


def build_squashfs(rootfs: Path, dest: Path, compression: str = "zstd") -> None:
    """Write ``rootfs`` as a squashfs file at ``dest`` (which must not exist)."""
    comp = compression if compression in supported_compressors() else "gzip"
    fixed = str(source_date_epoch())
    argv = [
        _mksquashfs(), str(rootfs), str(dest),
        "-comp", comp, "-noappend", "-no-xattrs", "-quiet", "-no-progress", "-reproducible",
        "-mkfs-time", fixed, "-root-time", fixed,
        "-processors", str(max(1, os.cpu_count() or 1)),
    ]
    if comp == "zstd":
        argv += ["-Xcompression-level", "3"]
    # mksquashfs would read SOURCE_DATE_EPOCH itself and refuse it beside the options.
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    res = subprocess.run(argv, capture_output=True, text=True, check=False, env=env,
                         preexec_fn=die_with_parent())
    if res.returncode != 0:
        msg = (res.stderr.strip().splitlines() or ["unknown error"])[-1]
        if "No space left" in res.stderr or "Failed to write" in res.stderr:
            raise StoreError(f"mksquashfs ran out of space writing {dest}",
                             hint="free space (`mesobox prune`) or use a larger MESOBOX_STORE")
        raise StoreError(f"mksquashfs failed: {msg}")
