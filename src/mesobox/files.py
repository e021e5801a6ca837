"""Small file rules shared by every room: atomic replacement, path containment,
and the squashfs magic.  Stdlib only, no imports
beyond ``os``: the launch path uses them.
"""

from __future__ import annotations

import os

SQUASHFS_MAGIC = b"hsqs"


def under(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it, component-wise (``/`` holds every absolute path)."""
    top = top.rstrip("/")
    return path == top or path.startswith(top + "/")


def is_squashfs(path: str | os.PathLike[str]) -> bool:
    """The file starts with the squashfs superblock magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == SQUASHFS_MAGIC
    except OSError:
        return False


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600, durable: bool = False,
                 dir_fd: int | None = None) -> None:
    """Replace ``path`` with ``data`` in one rename(2): a reader sees the old file or the
    new one, never a part.  The temporary name is unique to this process and thread,
    created exclusively and never through a symlink (a leftover of a killed process
    that had the same pid is removed first).  With ``dir_fd``, ``path`` is relative to
    it.  ``durable`` also fsyncs the file and its directory, for records that must
    survive a power cut.  OSError propagates; nothing is left behind."""
    from _thread import get_ident  # threading's C half: no import cost

    path = os.fspath(path)
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.{os.getpid()}.{get_ident()}.tmp")
    try:  # noqa: SIM105 - contextlib is not worth its import here
        os.unlink(tmp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:  # noqa: SIM105
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    if durable:
        _fsync_directory(head, dir_fd)


def _fsync_directory(head: str, dir_fd: int | None) -> None:
    fd = os.open(head or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH (reproducible-builds.org) when it is a valid time, else 0: the
    time of what an image build makes that no input dates (squashfs.py, layers.py)."""
    text = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(text) if text.isdigit() and int(text) < 1 << 32 else 0

