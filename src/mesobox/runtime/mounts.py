"""Mount room: the container's filesystem as a list of small, frozen operations.

Each operation has ``describe()`` (one line, printed by ``--debug``) and
``apply(root)``, where ``root`` is the new root directory in the workspace before
``pivot_root``.  The launcher applies them in list order, which the planner
(``build.plan_mounts``) makes parents-first.

Invariants:
- Every target is reached with ``open_beneath``: one component at a time, each opened
  ``O_PATH|O_NOFOLLOW`` relative to the previous one, and the mount is made on
  ``/proc/self/fd/N`` of the final fd.  An image-provided symlink (``/proc -> /``,
  ``/dev/null -> /etc/shadow``…) therefore can never redirect the runtime's own mounts
  outside the new root (runc CVE-2019-16884, CVE-2025-31133 family): it is refused.
- Mount points are created only in filesystems mesobox owns (the workspace tmpfs and
  the tmpfs upper of the root overlay), never inside a bind of a host directory.
- User binds are always ``nosuid,nodev``; a read-only bind is remounted read-only
  repeating the source's locked flags (mount_namespaces(7): a user namespace may not
  clear nosuid/nodev/noexec/atime flags of a mount it inherited).
"""

from __future__ import annotations

import os
import stat

from mesobox.errors import LaunchError
from mesobox.runtime import syscalls as sc
from mesobox.runtime.spec import _Record

O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_BENEATH = sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS


def open_beneath(root: str, rel: str, create: str | None = None) -> int:
    """O_PATH fd of ``root/rel`` without following symlinks; ``create`` = "dir"/"file"
    makes a missing last component (and missing parent directories)."""
    fd = os.open(root, O_PATH_FLAGS | os.O_DIRECTORY)
    try:
        # The common case in one syscall; any refusal (missing, a symlink anywhere,
        # the last component included: no O_NOFOLLOW here, so RESOLVE_NO_SYMLINKS
        # refuses it with ELOOP; not a directory) is walked again below, component by
        # component, for its message.
        found = sc.openat2(fd, rel.strip("/") or ".", os.O_PATH | os.O_CLOEXEC, _BENEATH)
    except OSError:
        found = None
    if found is not None:
        os.close(fd)
        return found
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
                raise LaunchError(
                    f"refusing to mount on /{rel}: /{'/'.join(parts[:i + 1])} is a symlink in the image",
                    hint="images may not redirect the runtime's mount points; bind to the link's target instead",
                )
            if not last and not stat.S_ISDIR(mode):
                raise LaunchError(f"cannot mount on /{rel}: /{'/'.join(parts[:i + 1])} is not a directory")
    except BaseException:
        os.close(fd)
        raise
    return fd


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
        raise LaunchError(f"cannot create mount point {name!r}: {err.strerror}") from None


def exists_beneath(root: str, rel: str) -> bool:
    """Whether ``root/rel`` exists with no symlink on the way (a symlink counts as
    existing: ``open_beneath`` will refuse it with a clear message)."""
    try:
        os.close(open_beneath(root, rel))
    except FileNotFoundError:
        return False
    except (LaunchError, NotADirectoryError):
        return True
    return True


def read_beneath(root: str, rel: str, limit: int = 1 << 20) -> str:
    """Text of ``root/rel`` read without following symlinks; "" when absent or a link
    (an image's /etc/passwd -> /etc/shadow must not make mesobox read the host's)."""
    try:
        fd = open_beneath(root, rel)
    except (OSError, LaunchError):
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    finally:
        os.close(fd)
    try:
        return os.read(rfd, limit).decode("utf-8", "replace")
    finally:
        os.close(rfd)


def _mount_at(root: str, rel: str, create: str | None, source: str | None, fstype: str | None,
              flags: int, data: str | None = None) -> None:
    fd = open_beneath(root, rel, create)
    try:
        sc.mount(source, f"/proc/self/fd/{fd}", fstype, flags, data)
    except OSError as err:
        raise LaunchError(f"cannot mount {fstype or source} on /{rel}: {err.strerror}") from None
    finally:
        os.close(fd)


def _remount(root: str, rel: str, flags: int, source_path: str) -> None:
    """Remount the bind now at ``rel`` (a fresh fd: the old one names the covered dir)."""
    keep = sc.locked_flags(source_path) if source_path else 0
    fd = open_beneath(root, rel)
    try:
        sc.mount(None, f"/proc/self/fd/{fd}", None, sc.MS_REMOUNT | sc.MS_BIND | flags | keep)
    except OSError as err:
        raise LaunchError(f"cannot remount /{rel}: {err.strerror}") from None
    finally:
        os.close(fd)


class Op(_Record):
    __slots__ = ()

    def describe(self) -> str:
        raise NotImplementedError

    def apply(self, root: str) -> None:
        raise NotImplementedError


class Bind(Op):
    """Bind ``source`` (a host path) on ``target`` (relative to the new root)."""

    __slots__ = ("flags", "hide", "kind", "readonly", "recursive", "source", "target")
    _defaults = {"readonly": False, "kind": "dir", "flags": sc.MS_NOSUID | sc.MS_NODEV, "recursive": True,
                 "hide": ""}
    source: str
    target: str
    readonly: bool
    kind: str  # "dir" or "file": what to create as the mount point
    flags: int
    recursive: bool
    hide: str  # the workspace's path below source: its copy is detached after an rbind

    def describe(self) -> str:
        return f"bind {self.source} -> /{self.target} ({'ro' if self.readonly else 'rw'})"

    def apply(self, root: str) -> None:
        rec = sc.MS_REC if self.recursive else 0
        _mount_at(root, self.target, self.kind, self.source, None, sc.MS_BIND | rec)
        if self.hide:
            # The rbind copied mesobox's own workspace (the container's root and scratch
            # files): detach that copy.  It is our mount, so it is not locked.
            fd = open_beneath(root, f"{self.target}/{self.hide}")
            try:
                sc.umount2(f"/proc/self/fd/{fd}", sc.MNT_DETACH)
            finally:
                os.close(fd)
        extra = (sc.MS_RDONLY if self.readonly else 0) | self.flags
        if extra:
            _remount(root, self.target, extra, self.source)


class Tmpfs(Op):
    __slots__ = ("data", "flags", "target")
    _defaults = {"flags": sc.MS_NOSUID | sc.MS_NODEV, "data": "mode=755"}
    target: str
    flags: int
    data: str

    def describe(self) -> str:
        return f"tmpfs on /{self.target} ({self.data})"

    def apply(self, root: str) -> None:
        _mount_at(root, self.target, "dir", "tmpfs", "tmpfs", self.flags, self.data)


class Proc(Op):
    """A new proc (with a pid namespace: it must show that namespace's pids)."""

    __slots__ = ("target",)
    target: str

    def describe(self) -> str:
        return f"proc on /{self.target}"

    def apply(self, root: str) -> None:
        _mount_at(root, self.target, "dir", "proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)


class Devpts(Op):
    """A private devpts instance: ptys made inside are not the host's (devpts docs)."""

    __slots__ = ("target",)
    target: str

    def describe(self) -> str:
        return f"devpts (newinstance) on /{self.target}"

    def apply(self, root: str) -> None:
        _mount_at(root, self.target, "dir", "devpts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
                  "newinstance,ptmxmode=0666,mode=620")


class Overlay(Op):
    """Overlay ``lower`` + ``upper`` on ``target`` (kernel overlayfs, fuse-overlayfs fallback)."""

    __slots__ = ("lower", "target", "upper", "work")
    lower: str
    upper: str
    work: str
    target: str

    def describe(self) -> str:
        return f"overlay lower={self.lower} upper={self.upper} -> /{self.target}"

    def apply(self, root: str) -> None:
        data = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        last: OSError | None = None
        # userxattr: unprivileged overlay keeps its whiteouts in user.* xattrs (Linux ≥ 5.11).
        for opts in (data + ",userxattr", data):
            fd = open_beneath(root, self.target, "dir")
            try:
                sc.mount("overlay", f"/proc/self/fd/{fd}", "overlay", sc.MS_NOSUID | sc.MS_NODEV, opts)
                return
            except OSError as err:
                last = err
            finally:
                os.close(fd)
        self._fuse_fallback(root, last)

    def _fuse_fallback(self, root: str, err: OSError | None) -> None:
        import shutil
        import subprocess

        tool = shutil.which("fuse-overlayfs")
        if tool is None:
            raise LaunchError(f"kernel overlayfs failed ({err and err.strerror}) and fuse-overlayfs is missing",
                              hint="install fuse-overlayfs, or drop --overlay/--writable-tmpfs")
        target = os.path.join(root, self.target)
        opts = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        proc = subprocess.run([tool, "-o", opts, target], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise LaunchError(f"overlay failed: {proc.stderr.strip() or proc.returncode}")


class Remount(Op):
    """Make an existing mount read-only (the root, after its mount points exist)."""

    __slots__ = ("flags", "source", "target")
    target: str
    flags: int
    source: str  # whose locked flags to keep; "" for a mount made in this namespace

    def describe(self) -> str:
        return f"remount /{self.target} read-only"

    def apply(self, root: str) -> None:
        _remount(root, self.target, self.flags, self.source)


class Skeleton(Op):
    """Replace the image directory ``target`` by a tmpfs holding binds of each of its
    entries (Apptainer's "underlay"), so missing mount points can be created in it
    without writing to the image: a rootless user may not create files in the image's
    root-owned directories even through an overlay (its owner is unmapped)."""

    __slots__ = ("target",)
    target: str

    def describe(self) -> str:
        return f"skeleton of /{self.target} (tmpfs + binds of its entries)"

    def apply(self, root: str) -> None:
        # The fd keeps the image directory reachable after the tmpfs covers it; binds
        # copy the (read-only) flags of the mount they come from (clone_mnt).
        old = _reopen_dir(open_beneath(root, self.target))
        try:
            mode = stat.S_IMODE(os.fstat(old).st_mode)
            _mount_at(root, self.target, None, "tmpfs", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
                      f"mode={mode:o},size=1m")
            for entry in os.scandir(old):
                self._copy_entry(root, old, entry.name)
        finally:
            os.close(old)

    def _copy_entry(self, root: str, old: int, name: str) -> None:
        rel = f"{self.target}/{name}".lstrip("/")
        src = os.open(name, O_PATH_FLAGS, dir_fd=old)
        try:
            st = os.fstat(src)
            if stat.S_ISLNK(st.st_mode):
                Symlink(link=rel, target=os.readlink(name, dir_fd=old)).apply(root)
                return
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
            fd = open_beneath(root, rel, kind)
            try:
                sc.mount(f"/proc/self/fd/{src}", f"/proc/self/fd/{fd}", None, sc.MS_BIND | sc.MS_REC)
            finally:
                os.close(fd)
        except OSError as err:
            raise LaunchError(f"cannot rebuild /{rel} in the skeleton: {err.strerror}") from None
        finally:
            os.close(src)


def _reopen_dir(path_fd: int) -> int:
    try:
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


class Symlink(Op):
    __slots__ = ("link", "target")
    link: str
    target: str

    def describe(self) -> str:
        return f"symlink /{self.link} -> {self.target}"

    def apply(self, root: str) -> None:
        parent, name = os.path.split(self.link)
        fd = open_beneath(root, parent)
        try:
            os.symlink(self.target, name, dir_fd=fd)
        except FileExistsError:
            pass
        finally:
            os.close(fd)


def apply_all(ops: list[Op], root: str, debug: bool) -> None:
    import sys

    for op in ops:
        if debug:
            sys.stderr.write(f"mesobox: mount: {op.describe()}\n")
        op.apply(root)
