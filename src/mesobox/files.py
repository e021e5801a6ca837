"""Small file rules shared by every room: atomic replacement, path containment,
the two-second rule for caches, and the squashfs magic.  Stdlib only, no imports
beyond ``os``: the launch path uses them.
"""

from __future__ import annotations

import os

SQUASHFS_MAGIC = b"hsqs"
# A file changed this recently may change again within the same timestamp and size
# (git's "racy" files): caches keyed on (mtime, size) never trust such a file.
RACY_NS = 2_000_000_000


def racy(mtime_ns: int) -> bool:
    """Changed so recently that another change could keep the same timestamp and size."""
    import time

    return abs(time.time_ns() - mtime_ns) < RACY_NS


def under(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it (both normalised; ``/`` holds every absolute path)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def is_squashfs(path: str | os.PathLike[str]) -> bool:
    """The file starts with the squashfs superblock magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == SQUASHFS_MAGIC
    except OSError:
        return False


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` in one rename(2): a reader sees the old file or the
    new one, never a part.  The temporary name is unique to this process, created
    exclusively and without following a symlink.  ``durable`` also fsyncs the file and
    its directory, for records that must survive a power cut."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:  # noqa: SIM105 - contextlib is not worth its import here
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
