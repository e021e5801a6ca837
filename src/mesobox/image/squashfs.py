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
layers' own (Python's .pyc files are checked against them).  Owners are the image's
own, whoever flattens it: root's tree has them already; an ordinary user's tree is all
theirs, so mksquashfs runs in a user namespace that maps the user to 0 (their files
read as root's) and a pseudo file (``PATH m MODE UID GID``) gives every path the
layers gave another owner that owner (layers.py records them).  Every store, root's
and each user's, then holds the same bytes for one image (``inspect`` shows the
file's digest).  A name mksquashfs's pseudo syntax cannot carry (a newline) keeps the
user's id, with a warning: only such a hostile image differs between stores.

``mksquashfs`` dies with the process that started it (``PR_SET_PDEATHSIG``): a pull
killed with SIGKILL leaves no orphan compressing an image into a deleted directory.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import stat
import struct
import subprocess
from collections.abc import Callable, Mapping
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


def build_squashfs(rootfs: Path, dest: Path, compression: str = "zstd",
                   owners: Mapping[tuple[str, ...], tuple[int, int]] | None = None,
                   warn: Callable[[str], None] | None = None) -> None:
    """Write ``rootfs`` as a squashfs file at ``dest`` (which must not exist).  Run by
    an ordinary user, ``owners`` (layers.py) are the image's owners other than 0:0 of
    the user's tree, and the file gets exactly those (module docstring)."""
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
    preexec = die_with_parent()
    if owners is not None and os.geteuid() != 0:
        argv += _owner_options(rootfs, dest.parent / "owners.pseudo", owners, warn)
        preexec = _as_root_of_own_files(preexec)
    # mksquashfs would read SOURCE_DATE_EPOCH itself and refuse it beside the options.
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    res = subprocess.run(argv, capture_output=True, text=True, check=False, env=env,
                         preexec_fn=preexec)
    if res.returncode != 0:
        msg = (res.stderr.strip().splitlines() or ["unknown error"])[-1]
        if "No space left" in res.stderr or "Failed to write" in res.stderr:
            raise StoreError(f"mksquashfs ran out of space writing {dest}",
                             hint="free space (`mesobox prune`) or use a larger MESOBOX_STORE")
        raise StoreError(f"mksquashfs failed: {msg}")


_PSEUDO_SPECIAL = str.maketrans({c: "\\" + c for c in ' \t"\\'})


def _owner_options(rootfs: Path, pseudo: Path, owners: Mapping[tuple[str, ...], tuple[int, int]],
                   warn: Callable[[str], None] | None) -> list[str]:
    """mksquashfs options that give each path of ``owners`` its owner: ``-root-uid`` and
    ``-root-gid`` for the tree's top, one ``m`` line of a pseudo file for every other
    path that still exists (a deleted path may be listed; its mode is the tree's)."""
    options: list[str] = []
    lines: list[str] = []
    odd = 0
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for path, (uid, gid) in sorted(owners.items()):
            if not path:
                options += ["-root-uid", str(uid), "-root-gid", str(gid)]
                continue
            name = "/".join(path)
            if "\n" in name or "\r" in name:
                odd += 1
                continue
            try:
                st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            mode = stat.S_IMODE(st.st_mode) if not stat.S_ISLNK(st.st_mode) else 0o777
            lines.append(f"{name.translate(_PSEUDO_SPECIAL)} m {mode:o} {uid} {gid}\n")
    finally:
        os.close(root_fd)
    if odd and warn is not None:
        warn(f"{odd} path(s) with a newline in their name keep your own id in the squashfs: "
             "it will differ from other stores' copies of this image")
    if lines:
        with open(pseudo, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.writelines(lines)
        options += ["-pf", str(pseudo)]
    return options


def _as_root_of_own_files(then: Callable[[], None]) -> Callable[[], None]:
    """A ``preexec_fn``: ``then()``, then enter a new user namespace where this user is
    0:0, so mksquashfs reads the user's own files as root's (the image's usual owner).
    Where user namespaces are off, mksquashfs runs as is (the user's ids stay)."""
    from mesobox.launch import syscalls as sc

    uid, gid = os.getuid(), os.getgid()

    def preexec() -> None:
        then()
        try:
            sc.unshare(sc.CLONE_NEWUSER)
        except OSError:
            return
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)

    return preexec
