"""Changesets: what one step changed, as a directory in overlayfs's upper format.

A changeset directory holds every path the step created or changed, its parents as
directories, and deletions as whiteouts: a character device 0/0 (the kernel's overlayfs)
or an empty ``.wh.NAME`` file (fuse-overlayfs, and the layer format itself); a directory
whose old content is gone is opaque (xattr ``user.overlay.opaque`` or
``trusted.overlay.opaque`` = ``y``, or a ``.wh..wh..opq`` file in it).  A RUN's changeset
is its overlay's upper directory; COPY, ADD and WORKDIR write one themselves.

Both functions run as root of the build's user namespace (userns.py), where owners read
as container ids: the layer says N for a file the host shows as sub-id base + N - 1.

- ``write_layer``: the changeset as a tar.gz layer (OCI image-spec layer.md), made to be
  reproducible: entries sorted by name, no user or group names, no xattrs, gzip without
  a name or time; mtimes are the files' own, clamped to SOURCE_DATE_EPOCH when it is
  set (then whiteouts are dated by it too, else 0).  Returns the digests of the
  compressed and uncompressed streams.
- ``apply``: the changeset moved into the stage's rootfs (deletions done, opaque
  directories emptied first).  It only descends into real directories of the rootfs
  (lstat), never through a symlink that an image planted there.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
from typing import Any

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque")
CHUNK = 1 << 20


class _Hashing:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def write_layer(changes: str, out: str, epoch: int) -> dict[str, Any]:
    """``changes`` as a tar.gz at ``out``: {digest, diff_id, size, entries}."""
    with open(out, "wb") as raw:
        compressed = _Hashing(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6) as gz:  # type: ignore[arg-type]
            plain = _Hashing(gz)
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                entries = _add_tree(tar, changes, "", epoch, {})
    return {"digest": compressed.digest, "diff_id": plain.digest, "size": compressed.size, "entries": entries}


def _add_tree(tar: tarfile.TarFile, top: str, rel: str, epoch: int, links: dict[tuple[int, int], str]) -> int:
    count = 0
    entries = []
    for name in os.listdir(os.path.join(top, rel) if rel else top):
        st = os.lstat(os.path.join(top, rel, name))
        entries.append((WHITEOUT + name if is_whiteout(st) else name, name, st))
    for shown, name, st in sorted(entries, key=lambda e: e[0]):  # sorted as the tar names them
        path = f"{rel}/{name}" if rel else name
        full = os.path.join(top, path)
        if shown != name:
            tar.addfile(_info(f"{rel}/{shown}" if rel else shown, tarfile.REGTYPE, 0, epoch))
            count += 1
            continue
        info = _entry(full, path, st, epoch, links)
        if info is None:
            continue
        if info.isreg() and info.size:
            with open(full, "rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)
        count += 1
        if info.isdir():
            if is_opaque(full) and not os.path.lexists(os.path.join(full, OPAQUE)):
                tar.addfile(_info(f"{path}/{OPAQUE}", tarfile.REGTYPE, 0, epoch))
                count += 1
            count += _add_tree(tar, top, path, epoch, links)
    return count


def _info(name: str, kind: bytes, mode: int, epoch: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = epoch
    info.uname = info.gname = ""
    return info


def _entry(full: str, path: str, st: os.stat_result, epoch: int,
           links: dict[tuple[int, int], str]) -> tarfile.TarInfo | None:
    mtime = int(st.st_mtime)
    info = _info(path, tarfile.REGTYPE, stat.S_IMODE(st.st_mode), min(mtime, epoch) if epoch else max(mtime, 0))
    info.uid, info.gid = st.st_uid, st.st_gid
    mode = st.st_mode
    if stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            info.type, info.linkname = tarfile.LNKTYPE, links[key]
        else:
            links[key] = path
            info.size = st.st_size
    elif stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(full)
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return None  # sockets have no tar form
    return info


def is_empty(changes: str) -> bool:
    try:
        return not os.listdir(changes)
    except FileNotFoundError:
        return True


# --- applying ---------------------------------------------------------------------------


def apply(changes: str, rootfs: str) -> None:
    """Move the changeset into ``rootfs`` (consumes ``changes``)."""
    _apply_dir(changes, rootfs, "")


def _apply_dir(changes: str, rootfs: str, rel: str) -> None:
    here = os.path.join(changes, rel) if rel else changes
    names = sorted(os.listdir(here))
    target_dir = os.path.join(rootfs, rel) if rel else rootfs
    if OPAQUE in names or (rel and is_opaque(here)):
        for old in os.listdir(target_dir):
            remove(os.path.join(target_dir, old))
    for name in names:
        if name == OPAQUE:
            continue
        path = os.path.join(rel, name) if rel else name
        src, dst = os.path.join(changes, path), os.path.join(rootfs, path)
        st = os.lstat(src)
        if is_whiteout(st) or (name.startswith(WHITEOUT) and stat.S_ISREG(st.st_mode)):
            remove(os.path.join(rootfs, rel, name[len(WHITEOUT):]) if not is_whiteout(st) else dst)
            continue
        try:
            before: os.stat_result | None = os.lstat(dst)
        except FileNotFoundError:
            before = None
        if stat.S_ISDIR(st.st_mode) and before is not None and stat.S_ISDIR(before.st_mode):
            _apply_dir(changes, rootfs, path)  # children first: then the directory's own metadata
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
            os.chmod(dst, stat.S_IMODE(st.st_mode))
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            continue
        if before is not None:
            remove(dst)
        os.rename(src, dst)


def remove(path: str) -> None:
    """Delete ``path`` (a whole tree), whatever its modes; nothing if it is gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
    for name in os.listdir(path):
        remove(os.path.join(path, name))
    os.rmdir(path)
