"""Per-node squashfs sharing room: one mount per image per user per node.

N ranks of a job launching the same ``.sqfs`` on one node share one mount, made in
the *initial* mount namespace under ``config.runtime_dir/mnt/<key>`` so that every
later container's new mount namespace inherits it (a FUSE mount made inside a user
namespace would be visible only there).  As a user the mount is ``squashfuse_ll``
(Debian's setuid ``fusermount3`` does the mount(2); ``/dev/fuse`` must be 0666); as
root it is a kernel ``mount -t squashfs -o loop`` (faster reads, no FUSE daemon).

Invariants:
- ``<key>.lock`` (fcntl.flock) serialises every mount, attach, detach and unmount of
  one key; ``<key>.refs`` holds one line ``PID:STARTTIME`` per user of the mount: the
  launcher process that lives exactly as long as the container's main process (it
  execs into the workload, which keeps both, or supervises it).  STARTTIME is field 22
  of /proc/PID/stat (proc(5)), so a recycled pid is never taken for a live user.  An
  empty refs list is no file at all.
- A ref whose process is gone (or a zombie, or has another start time) is dead and is
  dropped by the next acquire, release or watcher look.
- The last live user leaves the mount *lingering* for ``config.squashfs_linger``
  seconds (0: unmount at once): a warm mount saves the next run of the image the
  mount (≈6 ms), the unmount (≈4 ms) and, above all, the cold first exec through a
  fresh FUSE mount (≈34 ms, its page cache dies with the mount).  A lingering mount
  has no ``.refs`` and an idle stamp ``<key>.idle`` whose mtime is when it went idle;
  ``acquire`` removes the stamp, so "no live ref, no stamp" means "not lingering".
- With a linger, exactly one *watcher* serves a key: a process forked (not exec'd) by
  ``acquire`` (or a ``release``) that holds ``<key>.watcher`` (flock) for its whole
  life.  The forker takes that lock *itself*, under the key lock, and keeps the key
  lock until the watcher exists; the watcher inherits the lock, so "watcher lock held"
  always means "a live watcher will look at this key again".  Every ``WATCH_S`` it
  drops dead refs, keeps the stamp (none while refs live, made when the last one
  dies) and, once the stamp is ``linger`` old, unmounts and exits.  It decides only
  under the key lock, and drops the watcher lock before the key lock when it exits,
  so an acquire never counts on a watcher that is leaving.  Because the watcher
  notices dead launchers, a lease that has one needs no supervisor: the launcher
  execs into the workload.  Without a linger (or a watcher) the launcher supervises
  and its ``release`` detaches, unmounting at once when it was the last.
- A mount with no live user and no watcher (every launcher SIGKILLed without linger,
  or the watcher killed: Slurm's step cgroup) is reaped by the next launch of any
  image once it is not lingering or its stamp is older than the linger
  (``reap_stale``: one listdir when nothing is there); a key whose watcher lives is
  left to it.  ``mesobox slurm epilog`` (linger 0: the job is over) reaps every mount
  with no live user, watched or not; its watcher then finds the mount gone and exits.
  Leftover ``.refs``/``.idle`` files without a mount point are deleted the same way.
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

WATCH_S = 0.25  # a watcher's look interval: a dead launcher's ref is dropped this long after
# Files of a key are opened without following a symlink at their name: the runtime dir
# is private (paths.runtime_dir), this is one more wall should it ever not be.
_CREATE = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_UMOUNT_NOFOLLOW = 0x8


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


def _spawn(argv: list[str], stdout: int = -1) -> int:
    """Run a helper and wait: posix_spawn, not subprocess (≈8 ms of imports per launch).
    Its stdout is ``stdout`` when given, else /dev/null like its stdin."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, stdout if stdout >= 0 else devnull, 1)]
        # setsigmask=(): the launcher blocks the signals it forwards; the FUSE daemon
        # (which outlives this launcher) must not inherit that mask.
        pid = os.posix_spawn(argv[0], argv, dict(os.environ), file_actions=actions, setsigmask=())
    finally:
        os.close(devnull)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _spawn_output(argv: list[str]) -> tuple[int, bytes]:
    """_spawn, and what the helper wrote on stdout (a short answer: losetup's)."""
    r, w = os.pipe()
    try:
        code = _spawn(argv, w)
    finally:
        os.close(w)
    try:
        return code, os.read(r, 65536)
    finally:
        os.close(r)


class Lease:
    """One user's hold on a shared mount.  ``watched``: the key's watcher drops the ref
    once this process is gone, nobody need wait for the container; otherwise
    ``release()`` once the container is gone."""

    def __init__(self, base: str, key: str, mountpoint: str, ref: str, linger: float = 0.0) -> None:
        self.base, self.key, self.mountpoint, self.ref = base, key, mountpoint, ref
        self.linger = linger
        self.watched = False

    def _path(self, suffix: str) -> str:
        return os.path.join(self.base, self.key + suffix)

    def _locked(self, blocking: bool = True) -> int:
        """The key lock's fd; BlockingIOError when not ``blocking`` and it is held."""
        import fcntl

        fd = os.open(self._path(".lock"), _CREATE, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _entries(self) -> list[str]:
        """Every ref in the refs file, live or dead."""
        try:
            with open(self._path(".refs")) as f:
                return f.read().split()
        except FileNotFoundError:
            return []

    def _refs(self) -> list[str]:
        return [ref for ref in self._entries() if _alive(ref)]

    def _write_refs(self, refs: list[str]) -> None:
        path = self._path(".refs")
        if not refs:  # no file at all: the next launcher's stale check stays one listdir
            _quietly(os.unlink, path)
            return
        from mesobox.files import write_atomic

        write_atomic(path, "".join(f"{ref}\n" for ref in refs).encode())  # a watcher reads refs unlocked

    def _idle_since(self) -> float | None:
        """When the mount went idle (the stamp's mtime), or None when it is not lingering."""
        try:
            return os.stat(self._path(".idle")).st_mtime
        except FileNotFoundError:
            return None

    def acquire(self, image: str) -> None:
        fd = self._locked()
        try:
            refs = [ref for ref in self._refs() if ref != self.ref]
            if not _healthy(self.mountpoint):
                _unmount(self.mountpoint)  # broken (daemon killed) or absent: start afresh
                os.makedirs(self.mountpoint, mode=0o700, exist_ok=True)
                _mount(image, self.mountpoint)
            self._write_refs([*refs, self.ref])
            _quietly(os.unlink, self._path(".idle"))  # a lingering mount is in use again
            self.watched = self.linger > 0 and self._ensure_watcher(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Drop this ref now (a supervisor, after the container); the last one out
        leaves the mount lingering for the watcher, or unmounts it without a linger."""
        fd = self._locked()
        try:
            refs = [ref for ref in self._refs() if ref != self.ref]
            self._write_refs(refs)
            if refs:
                return
            if self.linger > 0 and _healthy(self.mountpoint):
                _touch(self._path(".idle"))
                if self._ensure_watcher(fd):
                    return
            self._drop()  # no linger, a broken mount, or no watcher possible
        finally:
            os.close(fd)

    def _drop(self) -> None:
        """Under the key lock: unmount and forget the mount (the daemon exits with it)."""
        _unmount(self.mountpoint)
        _quietly(os.rmdir, self.mountpoint)
        _quietly(os.unlink, self._path(".idle"))
        _quietly(os.unlink, self._path(".refs"))

    def _claim_watcher(self) -> int | None:
        """Under the key lock: the watcher lock's fd, held, when no watcher is alive; None
        when one is (it will look at the key again)."""
        import fcntl

        wfd = os.open(self._path(".watcher"), _CREATE, 0o600)
        try:
            fcntl.flock(wfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(wfd)
            return None
        return wfd

    def _watched(self) -> bool:
        """Under the key lock: is a watcher alive?"""
        wfd = self._claim_watcher()
        if wfd is None:
            return True
        os.close(wfd)  # still under the key lock: nobody saw it held
        return False

    def _ensure_watcher(self, keyfd: int) -> bool:
        """Under the key lock ``keyfd``: True when a watcher serves the key, forking one
        if none is alive; False when none can be forked.  Double fork and setsid(2),
        all before the key lock is dropped, so nobody sees the claimed watcher lock
        before its watcher exists; the forker waits only for the short-lived middle
        child.  No exec: the launcher's Python is already loaded."""
        wfd = self._claim_watcher()
        if wfd is None:
            return True
        try:
            pid = os.fork()
        except OSError:
            os.close(wfd)
            return False
        if pid == 0:
            code = 1
            try:
                os.close(keyfd)  # the key lock stays the forker's alone
                os.setsid()
                if os.fork() == 0:
                    self._watch(wfd)
                code = 0
            finally:
                os._exit(code)  # never back into the launcher's code, whatever happened
        os.close(wfd)  # the watcher holds its own copy; if the middle child failed, none does
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

    def _watch(self, wfd: int) -> None:
        """The watcher's life: detached, look at the key every ``WATCH_S``; act only
        under the key lock; exit once the mount is gone."""
        _detach(keep=wfd)
        import time

        while True:
            time.sleep(WATCH_S)
            if self._calm():
                continue
            done = True
            fd = self._locked()
            try:
                done = self._tend()
            finally:
                if done:  # leaving (an error too): the watcher lock goes before the key lock
                    os.close(wfd)
                os.close(fd)
            if done:
                return

    def _calm(self) -> bool:
        """Without the lock (refs are replaced atomically): nothing to do, because every
        ref is alive, or there is none and the stamp is younger than the linger."""
        refs = self._entries()
        if refs:
            return all(_alive(ref) for ref in refs)
        idle = self._idle_since()
        if idle is None:
            return False
        import time

        return time.time() - idle < self.linger

    def _tend(self) -> bool:
        """Under the key lock: drop dead refs and keep the stamp — none while a ref lives,
        made when the last one has died — and unmount once it is ``linger`` old.  True
        when the watcher's work is over: unmounted, or the mount is gone (the epilog)."""
        entries = self._entries()
        refs = [ref for ref in entries if _alive(ref)]
        if len(refs) != len(entries):
            self._write_refs(refs)
        if refs:
            _quietly(os.unlink, self._path(".idle"))
            return False
        if not _exists(self.mountpoint):
            self._drop()  # litter only
            return True
        idle = self._idle_since()
        if idle is None:
            _touch(self._path(".idle"))  # idle since now
            return False
        import time

        if time.time() - idle < self.linger:
            return False
        self._drop()
        return True


def _detach(keep: int) -> None:
    """Make a forked child a quiet daemon: every signal unblocked and default (the
    launcher blocks the ones it forwards), stdio on /dev/null and every other fd but
    ``keep`` closed (a caller reading the launcher's stdout/stderr to EOF must not wait
    for the watcher), cwd ``/`` (no test directory or filesystem kept busy)."""
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
    _quietly(_name_watcher, "/proc/self/comm")  # ps shows what it is


def _touch(path: str) -> None:
    """Set ``path``'s mtime to now, creating it if need be (the idle stamp)."""
    fd = os.open(path, _CREATE, 0o600)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


def _name_watcher(comm: str) -> None:
    fd = os.open(comm, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"mesobox-watcher")
    finally:
        os.close(fd)


def acquire(config: Config, image: str) -> Lease:
    """Attach this process (its pid and start time) to the node's shared mount of
    ``image``, making it if need be; with a linger, make sure a watcher serves it."""
    return attach(config.runtime_dir_str, config.squashfs_linger, image)  # not runtime_dir: pathlib is ≈6 ms


def attach(runtime_dir: str, linger: float, image: str) -> Lease:
    """``acquire`` with the two settings it uses (a saved program has no Config)."""
    from mesobox import paths
    from mesobox.procs import start_time

    base = paths.private_subdir(runtime_dir, "mnt")
    key = image_key(image)
    pid = os.getpid()
    start = start_time(pid)
    ref = f"{pid}:{start}" if start is not None else str(pid)  # both survive execve(2) into the workload
    lease = Lease(base, key, os.path.join(base, key), ref, linger)
    lease.acquire(image)
    return lease


def reap_stale(base: str, linger: float = 0.0, job_over: bool = False) -> list[str]:
    """Unmount every shared mount under ``base`` that no live launcher uses and that has
    lingered ``linger`` seconds or more; returns the mount points reaped.  A launch
    passes ``config.squashfs_linger`` and leaves a key whose watcher lives to it (even
    with its own linger at 0: another launch's setting is not this one's to cut short);
    ``mesobox slurm epilog`` passes ``job_over``: reap them all, watched or not (the
    watcher then finds the mount gone and exits).  Leftover ``.refs``/``.idle`` files
    without a mount point go too.  A key busy under its lock is left to its holder."""
    if job_over:
        linger = 0.0
    try:
        names = os.listdir(base)
    except OSError:
        return []
    keys = sorted({name[:-5] for name in names if name.endswith((".refs", ".idle"))})
    reaped = []
    for key in keys:
        lease = Lease(base, key, os.path.join(base, key), "", linger)
        if not _unused(lease, linger):  # cheap look without the lock first
            continue
        try:
            fd = lease._locked(blocking=False)
        except OSError:  # busy (BlockingIOError), or not a lock file we can open: not ours to reap
            continue
        try:
            mounted = _exists(lease.mountpoint)
            # Still unused, now that we hold the lock, and nobody else's to decide.
            if _unused(lease, linger) and (job_over or not lease._watched()):
                lease._drop()
                if mounted:
                    reaped.append(lease.mountpoint)
        finally:
            os.close(fd)
    return reaped


def held_by(runtime_dir: str, ref: str) -> list[str]:
    """The keys under ``runtime_dir/mnt`` whose refs name ``ref`` (``PID:STARTTIME``):
    the shared mounts one launcher holds (``instance stop`` drops their linger)."""
    base = os.path.join(runtime_dir, "mnt")
    try:
        names = os.listdir(base)
    except OSError:
        return []
    keys = []
    for name in names:
        if name.endswith(".refs"):
            lease = Lease(base, name[:-5], os.path.join(base, name[:-5]), "")
            if ref in lease._entries():
                keys.append(lease.key)
    return sorted(keys)


def drop_unused(runtime_dir: str, keys: list[str]) -> list[str]:
    """Unmount now, without their linger, the mounts of ``keys`` that no live launcher
    uses (a lingering key's watcher then finds its mount gone and exits); returns the
    mount points dropped.  A key someone else still uses is left to its last user."""
    base = os.path.join(runtime_dir, "mnt")
    dropped = []
    for key in keys:
        if "/" in key or key.startswith("."):
            continue
        lease = Lease(base, key, os.path.join(base, key), "")
        try:
            fd = lease._locked()
        except OSError:
            continue
        try:
            if not lease._refs() and _exists(lease.mountpoint):
                lease._drop()
                dropped.append(lease.mountpoint)
        finally:
            os.close(fd)
    return dropped


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


def _alive(ref: str) -> bool:
    """Is the launcher of ``ref`` (``PID:STARTTIME``) still running?  A recycled pid has
    another start time.  A bare PID (mesobox before start times) is alive if it runs."""
    pid, colon, start = ref.partition(":")
    if not pid.isdigit() or (colon and not start.isdigit()):
        return False
    from mesobox.procs import start_time

    now = start_time(int(pid))
    return now is not None and (not colon or now == int(start))


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
        _mount_loop(image, mountpoint)
        return
    tool = _which("squashfuse_ll", "squashfuse")
    if tool is None:
        raise LaunchError("squashfuse is not installed: cannot mount a squashfs image as a user",
                          hint="apt-get install squashfuse (and fuse3), or use a directory image")
    argv = [tool, image, mountpoint]
    code = _spawn(argv)  # squashfuse daemonizes once its mount is in place
    if code != 0 or not os.path.ismount(mountpoint):
        raise LaunchError(f"cannot mount squashfs {image}: {os.path.basename(argv[0])} exited {code}",
                          hint="is it a valid squashfs (unsquashfs -s), and is /dev/fuse usable (mode 0666)?")


def _mount_loop(image: str, mountpoint: str) -> None:
    """Root: a kernel squashfs mount on a loop device of its own.  Not ``mount -o loop``:
    util-linux reuses a loop device already attached to the same file, and a file
    rebuilt in place (same inode) would then show a lingering mount's old contents (the
    device's cached blocks, even its superblock).  ``losetup -d`` right after the mount
    only marks the device to go with it (autoclear)."""
    losetup = _which("losetup") or "/sbin/losetup"
    code, out = _spawn_output([losetup, "--find", "--show", "--read-only", image])
    device = out.decode(errors="replace").strip()
    if code != 0 or not device.startswith("/dev/"):
        raise LaunchError(f"cannot attach squashfs {image} to a loop device: losetup exited {code}",
                          hint="is a loop device free (losetup -f)?")
    try:
        code = _spawn([_which("mount") or "/bin/mount", "-t", "squashfs", "-o", "ro,nosuid,nodev", device,
                       mountpoint])
    finally:
        _spawn([losetup, "-d", device])  # detached now if the mount failed, else when it goes
    if code != 0 or not os.path.ismount(mountpoint):
        raise LaunchError(f"cannot mount squashfs {image}: mount exited {code}",
                          hint="is it a valid squashfs (unsquashfs -s)?")


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
        from mesobox.launch.syscalls import MNT_DETACH, umount2

        # UMOUNT_NOFOLLOW (umount2(2)): never unmount through a symlink at the path.
        _quietly(lambda p: umount2(p, MNT_DETACH | _UMOUNT_NOFOLLOW), mountpoint)
        return
    tool = _which("fusermount3", "fusermount")
    if tool is not None:
        _spawn([tool, "-u", "-z", "-q", mountpoint])
