"""A persistent overlay image for an ordinary user: the ext4 file of ``mesobox overlay
create`` served by ``fuse2fs`` inside the container's own namespaces (room: launch).

Real root loop-mounts the image (isolation/quota.py); a user cannot.  As Apptainer
does, fuse2fs reads and writes the ext4 image in user space, and the container's root
is an overlay whose upper and work directories are the image's ``upper/`` and
``work/``.  The kernel refuses a FUSE upper layer ("upper fs missing required
features": no RENAME_WHITEOUT, no tmpfile, measured on Linux 6.x), so
``fuse-overlayfs`` serves that overlay at once (execute._overlay asks ``serves``).

Invariants:
- The image is opened once, ``O_NOFOLLOW``, and refused unless it is a regular file
  that belongs to the caller (as this user namespace names it): never a symlink, never
  another user's file.  fuse2fs and e2fsck reach it only through that fd
  (``/proc/self/fd/N``), so it cannot be swapped after the checks.
- One writer at a time: the fd holds ``flock(LOCK_EX)`` and only fuse2fs (and its
  watcher) inherit it, so the lock lives exactly as long as the daemon that writes the
  image; a second launch meanwhile is refused with one line (Apptainer refuses a second
  read-write use the same way), after ``LOCK_GRACE_S`` for a daemon still writing back.
- fuse2fs mounts with mount(2) in the container's user and mount namespace (it keeps
  the namespace's capabilities across execve); mesobox mounts fuse-overlayfs there
  itself (fd=N).  Nothing is ever mounted on the host, so nothing can be left mounted
  there.  fuse2fs shows every file as the caller's (``uid=``/``gid=``: the raw ext4
  owners would be unmapped under --fakeroot, and the kernel refuses any write to an
  inode with an unmapped owner).
- Each daemon runs in the foreground below a *watcher* (``_spawn_watched``) that waits
  for the launching process — then the workload it execs into, or the container's
  init, which stops them first (``stop``) — to end, then sends SIGTERM and waits:
  fuse2fs writes its bitmaps and superblock back, marks the file system clean and
  exits.  A daemonized helper would keep the namespace, and the image, busy for ever.
- The size cap is the image's own: fuse2fs never grows the file, and a full file
  system is ENOSPC inside the container.
- An image left unclean (fuse2fs killed with SIGKILL, e.g. the pid namespace of a
  SIGKILLed launcher) is repaired with ``e2fsck -p`` by the next launch, under the
  lock, before it is mounted; one e2fsck cannot repair is refused with one line.
"""

from __future__ import annotations

import os

from mesobox.errors import LaunchError, PolicyError, UsageError

STOP_S = 30.0  # fuse2fs has this long to write the file system back after SIGTERM
READY_S = 20.0  # ... and this long to mount it
LOCK_GRACE_S = 2.0  # how long a launch waits for the image's last writer to let go
_EXT4_MAGIC = 0xEF53
_VALID_FS = 0x1  # superblock s_state: cleanly unmounted
_ERROR_FS = 0x2  # superblock s_state: errors detected
_RECOVER = 0x4  # incompat feature: the journal needs replaying
HINT = "make one with `mesobox overlay create FILE SIZE`, or use --overlay DIR / --writable-tmpfs=SIZE"

_daemons: list[tuple[int, int]] = []  # (watcher, fuse2fs) this process started (``stop``)
_served: set[int] = set()  # the st_dev of each file system they serve (``serves``)


def fuse2fs() -> str:
    from mesobox.launch.fusemount import tool

    found = tool("fuse2fs")
    if found is None:
        raise UsageError("fuse2fs is not installed: an ordinary user's --overlay FILE needs it",
                         hint="apt-get install fuse2fs, or use --overlay DIR (no quota) or "
                              "--writable-tmpfs=SIZE (quota, discarded at exit)")
    return found


def check(path: str) -> None:
    """Refuse early (before any namespace exists) what ``mount`` would refuse."""
    fuse2fs()
    os.close(open_image(path))


def open_image(path: str) -> int:
    """An fd (close-on-exec) of the caller's own regular file ``path``; PolicyError for
    a symlink or another user's file, LaunchError if it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        import errno

        if err.errno == errno.ELOOP:
            raise PolicyError(f"overlay image {path} is a symbolic link: refused (it could name another "
                              "user's file)", hint="give the image file itself") from None
        raise LaunchError(f"cannot open overlay image {path}: {err.strerror}", hint=HINT) from None
    try:
        import stat

        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError(f"overlay image {path} is not a regular file: refused", hint=HINT)
        if st.st_uid != os.getuid():
            raise PolicyError(f"overlay image {path} belongs to uid {st.st_uid}, not to you: refused "
                              "(its owner could change it under your container)", hint=HINT)
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock(fd: int, path: str) -> None:
    """The one-writer lock (module docstring).  A holder gets ``LOCK_GRACE_S`` to let
    go: the fuse2fs of a container that has just ended may still be writing back."""
    import fcntl
    import time

    deadline = time.monotonic() + LOCK_GRACE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise LaunchError(f"overlay image {path} is in use: another container has it mounted read-write",
                                  hint="wait for that container to end (one writer at a time)") from None
        time.sleep(0.01)


def _superblock(fd: int, path: str) -> tuple[int, int]:
    """(s_state, s_feature_incompat) of the ext4 image; LaunchError if it is none."""
    block = os.pread(fd, 1024, 1024)
    if len(block) < 100 or int.from_bytes(block[56:58], "little") != _EXT4_MAGIC:
        raise LaunchError(f"{path} is not an ext4 overlay image", hint=HINT)
    return int.from_bytes(block[58:60], "little"), int.from_bytes(block[96:100], "little")


def repair_if_unclean(fd: int, path: str) -> None:
    """``e2fsck -p`` an image that was not cleanly unmounted (module docstring)."""
    state, incompat = _superblock(fd, path)
    if state & _VALID_FS and not state & _ERROR_FS and not incompat & _RECOVER:
        return
    from mesobox.launch.fusemount import tool

    e2fsck = tool("e2fsck", "fsck.ext4")
    if e2fsck is None:
        raise LaunchError(f"overlay image {path} was not unmounted cleanly and e2fsck is missing",
                          hint="install e2fsprogs, then run `e2fsck -p FILE`")
    import subprocess

    proc = subprocess.run([e2fsck, "-p", f"/proc/self/fd/{fd}"], pass_fds=(fd,), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False)
    if proc.returncode & ~1:  # 0: clean, 1: errors corrected
        said = (proc.stdout + proc.stderr).strip().splitlines()
        raise LaunchError(f"overlay image {path} is damaged and e2fsck -p could not repair it: "
                          f"{said[-1] if said else proc.returncode}", hint="run `e2fsck FILE` yourself")


def mount(path: str, target: str, workspace: str) -> None:
    """Serve the image ``path`` on ``target`` with fuse2fs (module docstring)."""
    tool = fuse2fs()
    fd = open_image(path)
    try:
        lock(fd, path)
        repair_if_unclean(fd, path)
        os.makedirs(target, exist_ok=True)
        before = os.stat(target).st_dev
        log = os.path.join(workspace, "fuse2fs.log")
        # fakeroot: fuse2fs itself checks no modes.  Only this namespace's own uid can
        # reach the mount (no allow_other) and it owns the image anyway; fuse-overlayfs
        # above checks the container's modes.  Without it, files the --fakeroot root
        # made (its raw uid 0), and a mode-0 directory left in work/, would be locked.
        owner = f"uid={os.getuid()},gid={os.getgid()}"
        argv = [tool, "-f", "-o", f"rw,nosuid,nodev,fakeroot,{owner}", f"/proc/self/fd/{fd}", target]
        pid = _spawn_watched(argv, log, fd)
    finally:
        os.close(fd)  # the daemon holds the only copy, and with it the lock
    _wait_mounted(pid, target, before, log, path)
    for sub in ("upper", "work"):
        if not os.path.isdir(os.path.join(target, sub)):
            raise LaunchError(f"{path} is not a mesobox overlay image (no {sub}/ directory)", hint=HINT)


def serves(path: str) -> bool:
    """Whether ``path`` lies on an image this process serves (execute._overlay: the
    kernel refuses such an upper layer, so fuse-overlayfs is used at once)."""
    try:
        return os.stat(path).st_dev in _served
    except OSError:
        return False


def overlay(lower: str, upper: str, work: str, target: str, workspace: str, squash: str = "") -> None:
    """fuse-overlayfs on ``target`` with its upper layer on a served image, with the
    ``squash`` options where the lower's owners are not mapped (fusemount.py).  mesobox
    makes the mount itself (fd=N) and the daemon gets it as ``/dev/fd/N`` in a mount
    namespace of its own: pivot_root moves the root of every process of the container's
    mount namespace onto the new root, and fuse-overlayfs, which reaches its layers
    through /proc/self/fd, would then look them up through its own mount and wait on
    itself for ever (measured: the first write hangs in getxattr)."""
    from mesobox.launch import syscalls as sc
    from mesobox.launch.fusemount import tool

    fuse_overlayfs = tool("fuse-overlayfs")
    if fuse_overlayfs is None:
        raise LaunchError("fuse-overlayfs is not installed: an ordinary user's --overlay FILE needs it "
                          "(the kernel refuses a FUSE upper layer)", hint="apt-get install fuse-overlayfs")
    try:
        fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise LaunchError(f"cannot open /dev/fuse: {err.strerror}",
                          hint="FUSE must be usable (/dev/fuse, mode 0666)") from None
    try:
        # allow_other: every id of the container (sub-ids too) may enter its own root;
        # default_permissions: the kernel checks the modes fuse-overlayfs reports.
        options = (f"fd={fuse},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},"
                   "allow_other,default_permissions")
        try:
            sc.mount("fuse-overlayfs", target, "fuse.fuse-overlayfs", sc.MS_NOSUID | sc.MS_NODEV, options)
        except OSError as err:
            raise LaunchError(f"cannot mount the container's overlay: {err.strerror}") from None
        log = os.path.join(workspace, "fuse-overlayfs.log")
        # noacl: fuse2fs answers EOPNOTSUPP for POSIX ACLs, which the kernel would pass
        # on to every access by an id that does not own the file (measured: a --fakeroot
        # workload switched to a sub-id could not exec anything).
        layers = ",".join(o for o in (f"lowerdir={lower},upperdir={upper},workdir={work}", squash, "noacl") if o)
        argv = [fuse_overlayfs, "-f", "-o", layers, f"/dev/fd/{fuse}"]
        pid = _spawn_watched(argv, log, fuse, own_mounts=True)
    finally:
        os.close(fuse)  # the daemon holds the only copy: if it dies, the mount fails, never hangs
    try:
        os.listdir(target)  # waits for the daemon's FUSE_INIT
    except OSError as err:
        _kill(pid)
        raise LaunchError(f"fuse-overlayfs failed: {_said(log) or err.strerror}") from None


def _wait_mounted(pid: int, target: str, before: int, log: str, path: str) -> None:
    import time

    deadline = time.monotonic() + READY_S
    while True:
        try:
            now = os.stat(target).st_dev
            if now != before:
                _served.add(now)
                return
        except OSError:
            pass
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            if not done:
                _kill(pid)
            _daemons[:] = [d for d in _daemons if d[0] != pid]
            raise LaunchError(f"cannot mount overlay image {path} with fuse2fs: {_said(log) or 'it did not mount'}",
                              hint="FUSE must be usable (/dev/fuse, mode 0666); " + HINT)
        time.sleep(0.002)


def _spawn(argv: list[str], log: str, keep: int, own_mounts: bool = False) -> int:
    """Fork a FUSE daemon in the foreground: it gets SIGTERM (fuse2fs: a clean
    unmount) when this thread ends, in a session of its own (a ^C is the workload's),
    with the default signal mask, this namespace's capabilities (fuse2fs mounts by
    itself) and ``keep`` inherited; ``own_mounts``: in a copy of this mount namespace
    (``overlay``)."""
    from mesobox.launch import syscalls as sc

    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            if own_mounts:
                sc.unshare(sc.CLONE_NEWNS)
            sc.raise_ambient_capabilities()
            sc.prctl(sc.PR_SET_PDEATHSIG, 15)
            if os.getppid() != parent:
                os._exit(1)
            os.setsid()
            from mesobox.launch.signals import unblock_all

            unblock_all()
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.set_inheritable(keep, True)
            # pivot_root moves this daemon's root onto the container's too, where the
            # host's libgcc_s is not: glibc loads it lazily for the pthread_cancel of
            # libfuse's exit, and fuse2fs would abort there before it writes the image
            # back (measured: "libgcc_s.so.1 must be installed", image left unclean).
            env = {"LD_PRELOAD": "libgcc_s.so.1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
            os.execve(argv[0], argv, env)  # noqa: S606 - a fixed tool from fusemount.TOOL_DIRS, no shell
        except BaseException:
            os.write(2, f"cannot run {argv[0]}\n".encode())
        os._exit(127)
    os.close(out)
    return pid


def _spawn_watched(argv: list[str], log: str, keep: int, own_mounts: bool = False) -> int:
    """Start fuse2fs below a *watcher*, a child of this process that waits (pidfd) for
    this process — later the workload it execs into — to end, then stops fuse2fs with
    SIGTERM and waits until it has written the image back.  A parent-death signal
    straight from the workload would not do: the kernel sends it with the dying
    process's credentials, and a workload that switched to another id (an image's
    USER under --fakeroot) may not signal a daemon of the namespace's root.  The
    daemon still gets SIGTERM should the watcher die.  Returns the watcher's pid."""
    parent = os.getpid()
    said_r, said_w = os.pipe()
    watcher = os.fork()
    if watcher == 0:
        try:
            _keep_only(said_w, keep)  # never the launch's pipes: their EOF says "exec'd"
            watched = os.pidfd_open(parent)
            if os.getppid() != parent:
                os._exit(1)
            os.setsid()
            daemon = _spawn(argv, log, keep, own_mounts=own_mounts)
            os.write(said_w, daemon.to_bytes(8, "little"))
            os.close(said_w)
            _watch(watched, daemon)
        finally:
            os._exit(1)
    os.close(said_w)
    try:
        said = os.read(said_r, 8)
    finally:
        os.close(said_r)
    if len(said) == 8:
        _daemons.append((watcher, int.from_bytes(said, "little")))
    return watcher


def _keep_only(*fds: int) -> None:
    """Close every fd but ``fds``; 0, 1 and 2 become /dev/null."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in fds:
            try:  # noqa: SIM105 - the listing's own fd is gone already
                os.close(fd)
            except OSError:
                pass


def _watch(watched: int, daemon: int) -> None:
    """The watcher's life: until ``watched`` or the daemon ends."""
    import select

    daemon_fd = os.pidfd_open(daemon)
    poller = select.poll()
    poller.register(watched, select.POLLIN)
    poller.register(daemon_fd, select.POLLIN)
    if daemon_fd not in {fd for fd, _event in poller.poll()}:
        os.kill(daemon, 15)
    os.waitpid(daemon, 0)
    os._exit(0)


def stop() -> None:
    """Stop the fuse2fs daemons this process started and wait until each has written
    its image back: the container's init calls it before it exits, since the end of a
    pid namespace SIGKILLs everything left in it."""
    import contextlib
    import time

    for watcher, daemon in reversed(_daemons):  # fuse-overlayfs before the fuse2fs below it
        with contextlib.suppress(OSError):
            os.kill(daemon, 15)
        deadline = time.monotonic() + STOP_S
        while time.monotonic() < deadline:
            try:
                done, _status = os.waitpid(watcher, os.WNOHANG)
            except ChildProcessError:
                break  # reaped already (init reaps every orphan)
            if done:
                break
            time.sleep(0.005)
    _daemons.clear()


def _kill(pid: int) -> None:
    from mesobox.launch.fusemount import reap

    reap(pid)


def _said(log: str) -> str:
    """fuse2fs's last line that is not one of its routine warnings."""
    from mesobox.launch.fusemount import said

    return said(log, ("journal is not supported", "seems to be mounted as readonly", "unknown argument ignored"))
