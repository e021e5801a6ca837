"""COPY, ADD and WORKDIR as changesets (changes.py), made as root of the build's user
namespace (userns.py) so that owners can be set to any mapped id.

Docker's rules: a directory source copies its content; a file goes to DEST, or into it
when DEST ends in ``/``, names an existing directory, or there are several sources;
missing directories of DEST are made (0755, root); files keep their mode and mtime and
belong to 0:0 (the context's) or keep their owner (``--from``), unless ``--chown``;
``--chmod`` sets the mode of every copied entry.  ADD extracts a local tar archive
(plain, gzip, zstd, bzip2, xz) into DEST instead of copying it, with the hardened layer
extractor (image/layers.py).

The destination is resolved in the stage's rootfs as the container would see it (its
symlinks followed, never out of it).  Nothing is written through a symlink: a path
component of the changeset that is not a directory is replaced by one.
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import Any

from mesobox.errors import UsageError
from mesobox.image.build.changes import remove
from mesobox.image.build.context import Ignore, resolve

ARCHIVE_MAGIC = (b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"BZh", b"\xfd7zXZ\x00")


class CopyJob:
    """One COPY/ADD: what to copy from where to where."""

    def __init__(self, *, changes: str, rootfs: str, source_root: str, sources: list[str], dest: str,
                 dest_is_dir: bool, chown: str | None, chmod: int | None, keep_owner: bool, extract: bool,
                 ignore: Ignore | None, ignore_base: str = "") -> None:
        self.changes = changes
        self.rootfs = rootfs
        self.source_root = source_root  # the context, or another stage's rootfs
        self.sources = sources  # relative to source_root, resolved ("" is the top)
        self.dest = dest  # absolute container path (WORKDIR applied)
        self.dest_is_dir = dest_is_dir
        self.chown = chown
        self.chmod = chmod
        self.keep_owner = keep_owner
        self.extract = extract
        self.ignore = ignore  # the context's .dockerignore
        self.ignore_base = ignore_base


def run_copy(job: CopyJob) -> None:
    """The changeset of one COPY/ADD, in ``job.changes``."""
    owner = owner_ids(job.rootfs, job.chown) if job.chown else None
    dest = resolve(job.rootfs, job.dest.lstrip("/"))
    multiple = len(job.sources) > 1
    into_dir = job.dest_is_dir or multiple or _is_dir(os.path.join(job.rootfs, dest))
    for rel in job.sources:
        src = os.path.join(job.source_root, rel) if rel else job.source_root
        st = os.lstat(src)
        if stat.S_ISDIR(st.st_mode):
            target = dest
            made = ensure_dir(job, target, owner)
            _copy_children(job, src, rel, made, owner)
        elif job.extract and stat.S_ISREG(st.st_mode) and _is_archive(src):
            made = ensure_dir(job, dest, owner)
            _extract(src, made)
        else:
            target = f"{dest}/{os.path.basename(rel)}".lstrip("/") if into_dir else dest
            if not target:
                raise UsageError("cannot copy a file onto /", hint="give a destination directory, ending in /")
            parent = ensure_dir(job, os.path.dirname(target), None)
            _copy_entry(job, src, rel, os.path.join(parent, os.path.basename(target)), owner)


def make_dirs(changes: str, rootfs: str, path: str) -> None:
    """WORKDIR: the missing directories of ``path`` (0755, root), in a changeset."""
    rel = resolve(rootfs, path.lstrip("/"))
    job = CopyJob(changes=changes, rootfs=rootfs, source_root=rootfs, sources=[], dest=path, dest_is_dir=True,
                  chown=None, chmod=None, keep_owner=False, extract=False, ignore=None)
    if not _is_dir(os.path.join(rootfs, rel)):
        ensure_dir(job, rel, None)


def ensure_dir(job: CopyJob, rel: str, owner: tuple[int, int] | None) -> str:
    """The changeset's directory for container path ``rel``, made with its parents: an
    existing directory of the rootfs keeps its mode and owner, a new one is 0755 root's
    (the last one the --chown owner's)."""
    here = job.changes
    parts = [p for p in rel.split("/") if p]
    for index, part in enumerate(parts):
        here = os.path.join(here, part)
        container = os.path.join(job.rootfs, *parts[:index + 1])
        try:
            st = os.lstat(here)
            if stat.S_ISDIR(st.st_mode):
                continue
            remove(here)
        except FileNotFoundError:
            pass
        os.mkdir(here, 0o755)
        try:
            old = os.lstat(container)
        except FileNotFoundError:
            old = None
        if old is not None and stat.S_ISDIR(old.st_mode):
            os.chown(here, old.st_uid, old.st_gid)
            os.chmod(here, stat.S_IMODE(old.st_mode))
            os.utime(here, ns=(old.st_atime_ns, old.st_mtime_ns))
        elif owner is not None and index == len(parts) - 1:
            os.chown(here, *owner)
    return here


def _copy_children(job: CopyJob, src: str, rel: str, into: str, owner: tuple[int, int] | None) -> None:
    for name in sorted(os.listdir(src)):
        child_rel = f"{rel}/{name}" if rel else name
        if job.ignore is not None and job.ignore.excluded(_ignore_path(job, child_rel)):
            continue
        _copy_entry(job, os.path.join(src, name), child_rel, os.path.join(into, name), owner)


def _ignore_path(job: CopyJob, rel: str) -> str:
    return f"{job.ignore_base}/{rel}" if job.ignore_base else rel


def _copy_entry(job: CopyJob, src: str, rel: str, dst: str, owner: tuple[int, int] | None) -> None:
    st = os.lstat(src)
    try:
        old = os.lstat(dst)
        if not (stat.S_ISDIR(old.st_mode) and stat.S_ISDIR(st.st_mode)):
            remove(dst)
    except FileNotFoundError:
        pass
    mode = job.chmod if job.chmod is not None else stat.S_IMODE(st.st_mode)
    ids = owner or ((st.st_uid, st.st_gid) if job.keep_owner else (0, 0))
    if stat.S_ISDIR(st.st_mode):
        if not os.path.isdir(dst):
            os.mkdir(dst, 0o700)
        _copy_children(job, src, rel, dst, owner)
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
        os.chown(dst, *ids, follow_symlinks=False)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(dst, 0o600)
    else:
        return  # devices and sockets are not copied
    os.chown(dst, *ids)
    os.chmod(dst, mode)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _is_archive(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(512)
    return head.startswith(ARCHIVE_MAGIC) or (len(head) >= 262 and head[257:262] == b"ustar")


def _extract(path: str, into: str) -> None:
    from pathlib import Path

    from mesobox.image.layers import LayerPolicy, apply_layer

    with open(path, "rb") as f:
        head = f.read(6)
    plain = path
    if head.startswith((b"BZh", b"\xfd7zXZ\x00")):  # the layer reader knows gzip and zstd
        import bz2
        import lzma
        import tempfile

        opener: Any = bz2.open if head.startswith(b"BZh") else lzma.open
        fd, plain = tempfile.mkstemp(prefix="add-", suffix=".tar", dir=os.path.dirname(into.rstrip("/")) or None)
        with os.fdopen(fd, "wb") as out, opener(path, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    try:
        apply_layer(Path(into), Path(plain), LayerPolicy(unprivileged=False, keep_setuid=True))
    finally:
        if plain != path:
            os.unlink(plain)


def owner_ids(rootfs: str, text: str) -> tuple[int, int]:
    """``--chown USER[:GROUP]``: numbers, or names in the rootfs' /etc/passwd and /etc/group."""
    user, _, group = text.partition(":")
    passwd = _etc(rootfs, "etc/passwd")
    uid = int(user) if user.isdigit() else _lookup(passwd, user, "user")
    gid = uid
    if not user.isdigit() and not group:
        gid = next((int(f[3]) for f in passwd if f[0] == user and len(f) > 3 and f[3].isdigit()), uid)
    if group:
        gid = int(group) if group.isdigit() else _lookup(_etc(rootfs, "etc/group"), group, "group")
    return uid, gid


def _etc(rootfs: str, rel: str) -> list[list[str]]:
    path = os.path.join(rootfs, resolve(rootfs, rel))
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.split(":") for line in f.read().splitlines() if line]
    except OSError:
        return []


def _lookup(entries: list[list[str]], name: str, what: str) -> int:
    for fields in entries:
        if fields[0] == name and len(fields) > 2 and fields[2].isdigit():
            return int(fields[2])
    raise UsageError(f"--chown: no {what} {name[:40]!r} in the image's /etc/{'passwd' if what == 'user' else 'group'}")
