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
  launcher process that stays alive for the container's life.  An empty refs list is
  no file at all.
- A ref whose pid no longer exists is stale (killed launcher) and is dropped by the
  next acquire/release.
- The last live user leaves the mount *lingering* for ``config.squashfs_linger``
  seconds (0: unmount at once): a warm mount saves the next run of the image the
  mount (≈6 ms), the unmount (≈4 ms) and, above all, the cold first exec through a
  fresh FUSE mount (≈34 ms, its page cache dies with the mount).  A lingering mount
  has no ``.refs`` and an idle stamp ``<key>.idle`` whose mtime is when it went idle;
  ``acquire`` removes the stamp, so "no live ref, no stamp" means "not lingering".
- Exactly one reaper serves a key: a process forked (not exec'd) by a releaser, which
  holds ``<key>.reaper`` (flock) for its whole life.  The releaser takes that lock
  *itself*, under the key lock, before forking; the reaper inherits it, so "reaper
  lock held" always means "a live reaper will look at the stamp again".  The reaper
  decides only under the key lock, and drops the reaper lock before the key lock
  when it exits, so a release never counts on a reaper that is leaving.  It unmounts
  once the stamp is ``linger`` seconds old and nobody uses the mount; it exits when
  someone does (their last release starts the next reaper).
- A mount with no live user that is not lingering (every launcher SIGKILLed), or whose
  stamp is older than the linger (its reaper killed: Slurm's step cgroup), is reaped
  by the next launch of any image (``reap_stale``: one listdir when nothing is there)
  and, lingering or not, by ``mesobox slurm epilog`` (the job is over).  Leftover
  ``.refs``/``.idle`` files without a mount point are deleted the same way.
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

    def __init__(self, base: str, key: str, mountpoint: str, pid: int, linger: float = 0.0) -> None:
        self.base, self.key, self.mountpoint, self.pid = base, key, mountpoint, pid
        self.linger = linger

    def _path(self, suffix: str) -> str:
        return os.path.join(self.base, self.key + suffix)

    def _locked(self, blocking: bool = True) -> int:
        """The key lock's fd; BlockingIOError when not ``blocking`` and it is held."""
        import fcntl

        fd = os.open(self._path(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _refs(self) -> list[int]:
        try:
            with open(self._path(".refs")) as f:
                pids = [int(x) for x in f.read().split() if x.isdigit()]
        except FileNotFoundError:
            return []
        return [p for p in pids if _alive(p)]

    def _write_refs(self, pids: list[int]) -> None:
        path = self._path(".refs")
        if not pids:  # no file at all: the next launcher's stale check stays one listdir
            _quietly(os.unlink, path)
            return
        with open(path + ".tmp", "w") as f:
            f.write("".join(f"{p}\n" for p in pids))
        os.replace(path + ".tmp", path)

    def _idle_since(self) -> float | None:
        """When the mount went idle (the stamp's mtime), or None when it is not lingering."""
        try:
            return os.stat(self._path(".idle")).st_mtime
        except FileNotFoundError:
            return None

    def acquire(self, image: str) -> None:
        fd = self._locked()
        try:
            refs = [p for p in self._refs() if p != self.pid]
            if not _healthy(self.mountpoint):
                _unmount(self.mountpoint)  # broken (daemon killed) or absent: start afresh
                os.makedirs(self.mountpoint, mode=0o700, exist_ok=True)
                _mount(image, self.mountpoint)
            self._write_refs([*refs, self.pid])
            _quietly(os.unlink, self._path(".idle"))  # a lingering mount is in use again
        finally:
            os.close(fd)

    def release(self) -> None:
        reaper = None
        fd = self._locked()
        try:
            refs = [p for p in self._refs() if p != self.pid]
            self._write_refs(refs)
            if refs:
                return
            if self.linger > 0 and _healthy(self.mountpoint):
                _touch(self._path(".idle"))
                reaper = self._claim_reaper()
            else:
                self._drop()
        finally:
            os.close(fd)
        if reaper is not None:  # forked outside the key lock: no child inherits it
            self._start_reaper(reaper)

    def _drop(self) -> None:
        """Under the key lock: unmount and forget the mount (the daemon exits with it)."""
        _unmount(self.mountpoint)
        _quietly(os.rmdir, self.mountpoint)
        _quietly(os.unlink, self._path(".idle"))
        _quietly(os.unlink, self._path(".refs"))

    def _expire(self, linger: float) -> float:
        """Under the key lock: drop the mount if nobody uses it and it has been idle for
        ``linger`` seconds.  Returns the seconds left to wait, or 0 when there is nothing
        more to wait for (in use again, dropped now, or dropped by someone else)."""
        if self._refs():
            return 0.0
        idle = self._idle_since()
        if idle is not None:
            import time

            left = idle + linger - time.time()
            if left > 0:
                return left
        self._drop()  # also when not lingering: nobody uses it, nobody will drop it
        return 0.0

    def _claim_reaper(self) -> int | None:
        """Under the key lock: the reaper lock's fd, held, when no reaper is alive; None
        when one is (it will see the fresh stamp and wait again)."""
        import fcntl

        rfd = os.open(self._path(".reaper"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(rfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(rfd)
            return None
        return rfd

    def _start_reaper(self, rfd: int) -> None:
        """Fork the reaper, which inherits the held reaper lock ``rfd``.  Double fork and
        setsid(2): the launcher reaps only the short-lived middle child and never waits
        for the reaper; no exec, the launcher's Python is already loaded."""
        try:
            pid = os.fork()
        except OSError:  # no reaper possible: do not linger
            os.close(rfd)
            fd = self._locked()
            try:
                self._expire(0.0)
            finally:
                os.close(fd)
            return
        if pid == 0:
            try:
                os.setsid()
                if os.fork() == 0:
                    self._reaper(rfd)
            finally:
                os._exit(0)  # never back into the launcher's code, whatever happened
        os.close(rfd)
        os.waitpid(pid, 0)

    def _reaper(self, rfd: int) -> None:
        """The reaper's life: detached, wait until the stamp is ``linger`` old, decide
        under the key lock, exit."""
        _detach(keep=rfd)
        import time

        while True:
            left = 0.0
            fd = self._locked()
            try:
                left = self._expire(self.linger)
            finally:
                if left <= 0:  # leaving (an error too): the reaper lock goes before the key lock
                    os.close(rfd)
                os.close(fd)
            if left <= 0:
                return
            time.sleep(left)


def _detach(keep: int) -> None:
    """Make a forked child a quiet daemon: every signal unblocked and default (the
    launcher blocks the ones it forwards), stdio on /dev/null and every other fd but
    ``keep`` closed (a caller reading the launcher's stdout/stderr to EOF must not wait
    for the reaper), cwd ``/`` (no test directory or filesystem kept busy)."""
    if TYPE_CHECKING:
        import signal as _signal
    else:
        import _signal  # the C half of `signal`, without its enum import (≈3 ms)

    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 30)  # close_range(2): one syscall
    _quietly(lambda p: _write(p, "mesobox-reaper"), "/proc/self/comm")  # ps shows what it is


def _touch(path: str) -> None:
    """Set ``path``'s mtime to now, creating it if need be (the idle stamp)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def acquire(config: Config, image: str) -> Lease:
    """Attach to (or make) the node's shared mount of ``image`` for this process."""
    base = os.path.join(config.runtime_dir_str, "mnt")  # not config.runtime_dir: pathlib is ≈6 ms
    os.makedirs(base, mode=0o700, exist_ok=True)
    key = image_key(image)
    lease = Lease(base, key, os.path.join(base, key), os.getpid(), config.squashfs_linger)
    lease.acquire(image)
    return lease


def reap_stale(base: str, linger: float = 0.0) -> list[str]:
    """Unmount every shared mount under ``base`` that no live launcher uses and that has
    lingered ``linger`` seconds or more (a launch passes ``config.squashfs_linger``: a
    younger one still has its reaper; ``mesobox slurm epilog`` passes 0: the job is over,
    reap them all); returns the mount points reaped.  Leftover ``.refs``/``.idle`` files
    without a mount point go too.  A key busy under its lock is left to its holder."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    keys = sorted({name[:-5] for name in names if name.endswith((".refs", ".idle"))})
    reaped = []
    for key in keys:
        lease = Lease(base, key, os.path.join(base, key), 0, linger)
        if not _unused(lease, linger):  # cheap look without the lock first
            continue
        try:
            fd = lease._locked(blocking=False)
        except BlockingIOError:
            continue
        try:
            mounted = _exists(lease.mountpoint)
            if _unused(lease, linger):  # still so, now that we hold the lock
                lease._drop()
                if mounted:
                    reaped.append(lease.mountpoint)
        finally:
            os.close(fd)
    return reaped


def _unused(lease: Lease, linger: float) -> bool:
    """No live user, and not lingering, or lingering for ``linger`` seconds or more, or
    with no mount point left (a stamp alone is litter)."""
    if lease._refs():
        return False
    idle = lease._idle_since()
    if idle is None or linger <= 0 or not _exists(lease.mountpoint):
        return True
    import time

    return time.time() - idle >= linger


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


def _exists(path: str) -> bool:
    """Like os.path.lexists, but true when lstat(2) fails for any reason other than
    ENOENT: a FUSE mount point whose daemon died (ENOTCONN), or one root may not look
    into (EACCES: no allow_other, the epilog) is still a mount to undo."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def _unmount(mountpoint: str) -> None:
    if not _exists(mountpoint):
        return
    if os.getuid() == 0:
        from mesobox.runtime.syscalls import MNT_DETACH, umount2

        _quietly(lambda p: umount2(p, MNT_DETACH), mountpoint)
        return
    tool = _which("fusermount3", "fusermount")
    if tool is not None:
        _spawn([tool, "-u", "-z", "-q", mountpoint])
