"""Paths below a root, reached without following a symlink: the one way mesobox opens
what an image or a bind holds.

``open_beneath`` resolves with openat2(RESOLVE_BENEATH|NO_SYMLINKS|NO_MAGICLINKS) and,
where that refuses, walks one component at a time with O_NOFOLLOW so that the error
names the offending component.  ``hold_root`` keeps one O_PATH fd per root for a
burst of lookups (the compile step's probes).  A leaf above syscalls.py: execute,
probe and identity all build on it.
"""

from __future__ import annotations

import os
import stat

from mesobox.launch import syscalls as sc

O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_BENEATH = sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS
_held: dict[str, int] = {}  # root directory -> its O_PATH fd (hold_root)


def _launch_error(message: str, hint: str | None = None) -> Exception:
    from mesobox.errors import LaunchError  # only when something fails: ≈0.5 ms otherwise

    return LaunchError(message, hint=hint)


def write_file(path: str, text: str) -> None:
    """One write(2) of ``text``: what /proc's map files demand."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def hold_root(root: str) -> None:
    """Keep an O_PATH fd of ``root`` for open_beneath to start from (one open(2) saved
    per lookup) until ``release_roots`` — which every mount *on* the root calls: the
    held fd would name the directory the new mount covers."""
    if root not in _held:
        _held[root] = os.open(root, O_PATH_FLAGS | os.O_DIRECTORY)


def release_roots() -> None:
    while _held:
        os.close(_held.popitem()[1])


def open_beneath(root: str, rel: str, create: str | None = None) -> int:
    """O_PATH fd of ``root/rel`` without following symlinks; ``create`` = "dir"/"file"
    makes a missing last component (and missing parent directories)."""
    held = _held.get(root)
    fd = held if held is not None else os.open(root, O_PATH_FLAGS | os.O_DIRECTORY)
    try:
        # The common case in one syscall; any refusal (missing, a symlink anywhere,
        # the last component included: no O_NOFOLLOW here, so RESOLVE_NO_SYMLINKS
        # refuses it with ELOOP; not a directory) is walked again below, component by
        # component, for its message.
        found = sc.openat2(fd, rel.strip("/") or ".", os.O_PATH | os.O_CLOEXEC, _BENEATH)
    except FileNotFoundError:
        # A mount point to make (/dev/null in the fresh /dev tmpfs): when its parent
        # resolves, create it there and resolve it again, still beneath the root.
        found = _create_beneath(fd, rel.strip("/"), create) if create else None
    except OSError:
        found = None
    except BaseException:
        if held is None:
            os.close(fd)
        raise
    if held is None:
        os.close(fd)
    if found is not None:
        return found
    fd = os.open(root, O_PATH_FLAGS | os.O_DIRECTORY)  # the walk below closes what it leaves
    parts = [p for p in rel.split("/") if p and p != "."]
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(name, O_PATH_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create is None:
                    raise
                _create(fd, name, "file" if last and create == "file" else "dir")
                nxt = os.open(name, O_PATH_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise _launch_error(
                    f"refusing to mount on /{rel}: /{'/'.join(parts[:i + 1])} is a symlink in the image",
                    hint="images may not redirect the runtime's mount points; bind to the link's target instead",
                )
            if not last and not stat.S_ISDIR(mode):
                raise _launch_error(f"cannot mount on /{rel}: /{'/'.join(parts[:i + 1])} is not a directory")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_beneath(root_fd: int, rel: str, kind: str) -> int | None:
    """fd of ``rel`` created as ``kind`` in its existing parent, or None (the caller
    then walks the path component by component)."""
    parent, _, name = rel.rpartition("/")
    try:
        parent_fd = sc.openat2(root_fd, parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, _BENEATH)
    except OSError:
        return None
    if parent_fd is None:
        return None
    try:
        _create(parent_fd, name, kind)
        return sc.openat2(parent_fd, name, os.O_PATH | os.O_CLOEXEC, _BENEATH)
    except Exception:  # refused or raced: the walk below says why
        return None
    finally:
        os.close(parent_fd)


def _create(dir_fd: int, name: str, kind: str) -> None:
    try:
        if kind == "dir":
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        else:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644, dir_fd=dir_fd))
    except FileExistsError:
        pass
    except OSError as err:
        raise _launch_error(f"cannot create mount point {name!r}: {err.strerror}") from None


def mountinfo_path(field: str) -> str:
    r"""A mountinfo path: space, tab, newline and backslash are written \ooo (octal)."""
    if "\\" not in field:
        return field
    head, *rest = field.split("\\")
    return head + "".join(chr(int(part[:3], 8)) + part[3:] for part in rest)
