"""Per-node squashfs sharing room: one mount per image per user per node.

N ranks of a job launching the same ``.sqfs`` on one node share one mount, made in
the *initial* mount namespace under ``config.runtime_dir/mnt/<key>`` so that every
later container's new mount namespace inherits it (a FUSE mount made inside a user
namespace would be visible only there).  As a user the mount is ``squashfuse_ll``
(Debian's setuid ``fusermount3`` does the mount(2); ``/dev/fuse`` must be 0666); as
root it is a kernel ``mount -t squashfs -o loop`` (faster reads, no FUSE daemon).

Invariants:
- ``<key>.lock`` (fcntl.flock) serialises every mount, attach, detach and unmount of
  one key; ``<key>.refs`` holds one line per user of the mount: the pid of the
  launcher process that stays alive for the container's life.
- A ref whose pid no longer exists is stale (killed launcher) and is dropped by the
  next acquire/release; the last live user unmounts (fusermount3 -u / umount2) and
  the FUSE daemon exits with its mount, so no helper outlives the last container.
- A mount whose refs are *all* stale (every launcher SIGKILLed) is reaped by the next
  launch of any image (``reap_stale``: one listdir when nothing is stale) and by
  ``mesobox slurm epilog``.
- The key is the image's device, inode, size and mtime: a rebuilt image gets a fresh
  mount, never stale content.
"""

from __future__ import annotations

import os

from mesobox.errors import LaunchError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from mesobox.config import Config


def _quietly(fn: Callable[[str], object], path: str) -> None:
    """fn(path), ignoring OSError (contextlib.suppress costs ≈3 ms of imports per launch)."""
    try:  # noqa: SIM105
        fn(path)
    except OSError:
        pass


def image_key(path: str) -> str:
    """Device, inode, size and mtime: one name per file *version* (no hashlib import)."""
    st = os.stat(path)
    return f"{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


def _spawn(argv: list[str]) -> int:
    """Run a helper and wait: posix_spawn, not subprocess (≈8 ms of imports per launch)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1)]
        # setsigmask=(): the launcher blocks the signals it forwards; the FUSE daemon
        # (which outlives this launcher) must not inherit that mask.
        pid = os.posix_spawn(argv[0], argv, dict(os.environ), file_actions=actions, setsigmask=())
    finally:
        os.close(devnull)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


class Lease:
    """One user's hold on a shared mount; ``release()`` once the container is gone."""

    def __init__(self, base: str, key: str, mountpoint: str, pid: int) -> None:
        self.base, self.key, self.mountpoint, self.pid = base, key, mountpoint, pid

    def _locked(self) -> int:
        import fcntl

        fd = os.open(os.path.join(self.base, self.key + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _refs(self) -> list[int]:
        try:
            with open(os.path.join(self.base, self.key + ".refs")) as f:
                pids = [int(x) for x in f.read().split() if x.isdigit()]
        except FileNotFoundError:
            return []
        return [p for p in pids if _alive(p)]

    def _write_refs(self, pids: list[int]) -> None:
        path = os.path.join(self.base, self.key + ".refs")
        if not pids:  # no file at all: the next launcher's stale check stays one listdir
            _quietly(os.unlink, path)
            return
        with open(path + ".tmp", "w") as f:
            f.write("".join(f"{p}\n" for p in pids))
        os.replace(path + ".tmp", path)

    def acquire(self, image: str) -> None:
        fd = self._locked()
        try:
            refs = [p for p in self._refs() if p != self.pid]
            if not _healthy(self.mountpoint):
                _unmount(self.mountpoint)  # broken (daemon killed) or absent: start afresh
                os.makedirs(self.mountpoint, mode=0o700, exist_ok=True)
                _mount(image, self.mountpoint)
            self._write_refs([*refs, self.pid])
        finally:
            os.close(fd)

    def release(self) -> None:
        fd = self._locked()
        try:
            refs = [p for p in self._refs() if p != self.pid]
            self._write_refs(refs)
            if not refs:
                _unmount(self.mountpoint)
                _quietly(os.rmdir, self.mountpoint)
        finally:
            os.close(fd)


def acquire(config: Config, image: str) -> Lease:
    """Attach to (or make) the node's shared mount of ``image`` for this process."""
    base = os.path.join(config.runtime_dir_str, "mnt")  # not config.runtime_dir: pathlib is ≈6 ms
    os.makedirs(base, mode=0o700, exist_ok=True)
    key = image_key(image)
    lease = Lease(base, key, os.path.join(base, key), os.getpid())
    lease.acquire(image)
    return lease


def reap_stale(base: str) -> list[str]:
    """Unmount every shared mount under ``base`` none of whose launchers is alive;
    returns the mount points reaped.  A key busy under its lock is left to its holder."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    reaped = []
    for name in names:
        if not name.endswith(".refs"):
            continue
        lease = Lease(base, name[:-5], os.path.join(base, name[:-5]), 0)
        if lease._refs() or not os.path.lexists(lease.mountpoint):
            continue
        import fcntl

        fd = os.open(os.path.join(base, lease.key + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not lease._refs():  # still nobody, now that we hold the lock
                _unmount(lease.mountpoint)
                _quietly(os.rmdir, lease.mountpoint)
                _quietly(os.unlink, os.path.join(base, name))
                reaped.append(lease.mountpoint)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
    return reaped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists" for kill(2); its launcher is gone all the same.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _healthy(mountpoint: str) -> bool:
    try:
        return os.path.ismount(mountpoint) and bool(os.listdir(mountpoint))
    except OSError:  # ENOTCONN: the FUSE daemon died under its mount
        return False


def _which(*names: str) -> str | None:
    for name in names:
        for directory in ("/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"):
            if os.access(os.path.join(directory, name), os.X_OK):
                return os.path.join(directory, name)
    return None


def _mount(image: str, mountpoint: str) -> None:
    if os.getuid() == 0:
        tool = _which("mount")
        argv = [tool or "/bin/mount", "-t", "squashfs", "-o", "loop,ro,nosuid,nodev", image, mountpoint]
    else:
        tool = _which("squashfuse_ll", "squashfuse")
        if tool is None:
            raise LaunchError("squashfuse is not installed: cannot mount a squashfs image as a user",
                              hint="apt-get install squashfuse (and fuse3), or use a directory image")
        argv = [tool, image, mountpoint]
    code = _spawn(argv)  # squashfuse daemonizes once its mount is in place
    if code != 0 or not os.path.ismount(mountpoint):
        raise LaunchError(f"cannot mount squashfs {image}: {os.path.basename(argv[0])} exited {code}",
                          hint="is it a valid squashfs (unsquashfs -s), and is /dev/fuse usable (mode 0666)?")


def _unmount(mountpoint: str) -> None:
    if not os.path.lexists(mountpoint):
        return
    if os.getuid() == 0:
        from mesobox.runtime.syscalls import MNT_DETACH, umount2

        _quietly(lambda p: umount2(p, MNT_DETACH), mountpoint)
        return
    tool = _which("fusermount3", "fusermount")
    if tool is not None:
        _spawn([tool, "-u", "-z", "-q", mountpoint])
