"""Symlink-proof operations inside one rootfs directory (room: image/layers).

Invariant: nothing outside the rootfs is ever created, changed or deleted.  Every path
is walked one component at a time from an open directory fd of the rootfs with
``O_NOFOLLOW|O_DIRECTORY`` (openat(2)); every change is made relative to the fd of the
entry's *parent* with a call that does not follow a final symlink (mkdirat, symlinkat,
linkat without AT_SYMLINK_FOLLOW, unlinkat, mknodat, fchmodat/fchownat/utimensat with
AT_SYMLINK_NOFOLLOW) or on an fd opened with ``O_EXCL|O_NOFOLLOW``.  A symlink met as an
*intermediate* component is an error (UnsafeMember): image layers never legitimately
write through one (a layer diff records paths as they are in the tree, not via links).

Directory fds of the last parent path are kept on a stack: tar members come grouped by
directory, so most entries cost no lookup at all.  Anything removed is dropped from the
stack.  When unprivileged, a directory without owner ``rwx`` (left so by an earlier call)
is opened up and its original mode handed to ``on_chmod`` so it can be restored.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import TypeVar

from mesobox.image.tarsafe import UnsafeMember

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
Path_ = tuple[str, ...]
T = TypeVar("T")


def show(path: Path_) -> str:
    return "/".join(path) or "."


class Tree:
    """Directory-fd walker for one rootfs.  Call :meth:`close` when done."""

    def __init__(self, root_fd: int, unprivileged: bool, on_chmod: Callable[[Path_, os.stat_result], None]) -> None:
        self.root_fd = root_fd
        self.unprivileged = unprivileged
        self.on_chmod = on_chmod  # (path, stat before we opened it up)
        self.on_mkdir: Callable[[Path_, os.stat_result], None] = lambda path, st: None
        self._names: list[str] = []
        self._fds: list[int] = []

    def close(self) -> None:
        self._truncate(0)

    def _truncate(self, depth: int) -> None:
        while len(self._fds) > depth:
            os.close(self._fds.pop())
            self._names.pop()

    def forget(self, path: Path_) -> None:
        """``path`` was removed or replaced: drop its fd (and those below) from the stack."""
        n = len(path)
        if n and len(self._names) >= n and tuple(self._names[:n]) == path:
            self._truncate(n - 1)

    def dir_fd(self, path: Path_, create: bool) -> int | None:
        """fd of directory ``path`` (borrowed: do not close).  With ``create``, missing
        directories are made (mode 0755) and non-directories in the way replaced; without,
        ``None`` when it is missing or not a directory.  A symlink on the way is an error."""
        depth = 0
        limit = min(len(self._names), len(path))
        while depth < limit and self._names[depth] == path[depth]:
            depth += 1
        self._truncate(depth)
        fd = self._fds[-1] if self._fds else self.root_fd
        for i in range(depth, len(path)):
            child = self._open_child(fd, path[: i + 1], create)
            if child is None:
                return None
            self._names.append(path[i])
            self._fds.append(child)
            fd = child
        return fd

    def _open_child(self, parent: int, path: Path_, create: bool) -> int | None:
        name = path[-1]
        try:
            return os.open(name, O_DIR, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                return None
            self.retry(parent, path[:-1], lambda: os.mkdir(name, 0o755, dir_fd=parent))
            self.on_mkdir(path, os.stat(name, dir_fd=parent, follow_symlinks=False))
        except PermissionError:
            if not self.unprivileged:
                raise
            self.open_up(parent, path)
        except OSError as err:
            if err.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeMember(f"path goes through the symlink {show(path)!r}") from None
            if not create:
                return None
            self.retry(parent, path[:-1], lambda: os.unlink(name, dir_fd=parent))
            self.retry(parent, path[:-1], lambda: os.mkdir(name, 0o755, dir_fd=parent))
            self.on_mkdir(path, os.stat(name, dir_fd=parent, follow_symlinks=False))
        return os.open(name, O_DIR, dir_fd=parent)

    def open_up(self, parent: int, path: Path_) -> None:
        """Give the owner rwx on directory ``path`` (unprivileged: we own it) and report
        its previous mode so the final pass restores it."""
        st = os.stat(path[-1], dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o700 == 0o700:
            raise PermissionError(errno.EACCES, "permission denied", show(path))
        self.on_chmod(path, st)
        os.chmod(path[-1], stat.S_IMODE(st.st_mode) | 0o700, dir_fd=parent)  # a dir: nothing to follow

    def retry(self, parent: int, parent_path: Path_, op: Callable[[], T]) -> T:
        """Run ``op`` in directory ``parent``; when unprivileged and refused (EACCES), give
        ourselves rwx on that directory and run it again."""
        try:
            return op()
        except PermissionError:
            if not self.unprivileged:
                raise
            st = os.fstat(parent)
            if st.st_mode & 0o700 == 0o700:
                raise
            self.on_chmod(parent_path, st)
            os.fchmod(parent, stat.S_IMODE(st.st_mode) | 0o700)
            return op()

    def remove(self, parent: int, path: Path_) -> bool:
        """Delete entry ``path`` (any type, directories recursively).  False if absent."""
        name = path[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        self.forget(path)
        if stat.S_ISDIR(st.st_mode):
            self._rmtree(parent, path)
        else:
            self.retry(parent, path[:-1], lambda: os.unlink(name, dir_fd=parent))
        return True

    def _rmtree(self, parent: int, path: Path_) -> None:
        name = path[-1]
        try:
            fd = os.open(name, O_DIR, dir_fd=parent)
        except PermissionError:
            if not self.unprivileged:
                raise
            os.chmod(name, 0o700, dir_fd=parent)  # a directory we own and are deleting
            fd = os.open(name, O_DIR, dir_fd=parent)
        try:
            if self.unprivileged and os.fstat(fd).st_mode & 0o700 != 0o700:
                os.fchmod(fd, 0o700)
            with os.scandir(fd) as entries:
                children = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            for child, is_dir in children:
                if is_dir:
                    self._rmtree(fd, (*path, child))
                else:
                    os.unlink(child, dir_fd=fd)
        finally:
            os.close(fd)
        self.retry(parent, path[:-1], lambda: os.rmdir(name, dir_fd=parent))

    def listdir(self, fd: int) -> list[tuple[str, bool]]:
        """(name, is a real directory) for each entry of the open directory ``fd``."""
        with os.scandir(fd) as entries:
            return [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
