"""A persistent overlay image for an ordinary user: the ext4 file of ``mesobox overlay
create`` served by ``fuse2fs`` inside the container's own namespaces (room: launch).

Real root loop-mounts the image (isolation/quota.py); a user cannot.  As Apptainer
does, fuse2fs reads and writes the ext4 image in user space, and the container's root
is an overlay whose upper and work directories are the image's ``upper/`` and
``work/``.  The kernel refuses a FUSE upper layer ("upper fs missing required
features": no RENAME_WHITEOUT, no tmpfile, measured on Linux 6.x), so
``fuse-overlayfs`` serves that overlay (execute._overlay falls back to it).

Invariants:
- The image is opened once, ``O_NOFOLLOW``, and refused unless it is a regular file
  that belongs to the caller (as this user namespace names it): never a symlink, never
  another user's file.  fuse2fs and e2fsck reach it only through that fd
  (``/proc/self/fd/N``), so it cannot be swapped after the checks.
- One writer at a time: the fd holds ``flock(LOCK_EX)`` and only the fuse2fs daemon
  inherits it, so the lock lives exactly as long as the daemon that writes the image;
  a second launch meanwhile is refused with one line (Apptainer refuses a second
  read-write use the same way).
- fuse2fs is mounted with mount(2) in the container's user and mount namespace (it
  keeps the namespace's capabilities across execve), so the mount exists only there
  and nothing is ever left mounted on the host.  It runs in the foreground as a child
  of the launching thread with ``PR_SET_PDEATHSIG`` SIGTERM: when the workload (or
  the container's init, which stops it first: ``stop``) ends, fuse2fs writes its
  bitmaps and superblock back, marks the file system clean and exits.  A daemonized
  helper would keep the namespace, and the image, busy for ever.
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
_EXT4_MAGIC = 0xEF53
_VALID_FS = 0x1  # superblock s_state: cleanly unmounted
_ERROR_FS = 0x2  # superblock s_state: errors detected
_RECOVER = 0x4  # incompat feature: the journal needs replaying
HINT = "make one with `mesobox overlay create FILE SIZE`, or use --overlay DIR / --writable-tmpfs=SIZE"

_daemons: list[int] = []  # fuse2fs daemons this process started (``stop``)


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
    """The one-writer lock (module docstring)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LaunchError(f"overlay image {path} is in use: another container has it mounted read-write",
                          hint="wait for that container to end (one writer at a time)") from None


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
        # nosuid/nodev: as every host bind; the image's files keep their raw owners.
        pid = _spawn([tool, "-f", "-o", "rw,nosuid,nodev", f"/proc/self/fd/{fd}", target], log, fd)
    finally:
        os.close(fd)  # the daemon holds the only copy, and with it the lock
    _wait_mounted(pid, target, before, log, path)
    for sub in ("upper", "work"):
        if not os.path.isdir(os.path.join(target, sub)):
            raise LaunchError(f"{path} is not a mesobox overlay image (no {sub}/ directory)", hint=HINT)


def _wait_mounted(pid: int, target: str, before: int, log: str, path: str) -> None:
    import time

    deadline = time.monotonic() + READY_S
    while True:
        try:
            if os.stat(target).st_dev != before:
                return
        except OSError:
            pass
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            if not done:
                _kill(pid)
            _daemons.remove(pid)
            raise LaunchError(f"cannot mount overlay image {path} with fuse2fs: {_said(log) or 'it did not mount'}",
                              hint="FUSE must be usable (/dev/fuse, mode 0666); " + HINT)
        time.sleep(0.002)


def _spawn(argv: list[str], log: str, keep: int) -> int:
    """Fork fuse2fs in the foreground: it dies (SIGTERM, a clean unmount) with this
    thread, in a session of its own (a ^C is the workload's), with the default signal
    mask, this namespace's capabilities (it mounts by itself) and ``keep`` inherited."""
    from mesobox.launch import syscalls as sc

    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
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
            os.execv(argv[0], argv)  # noqa: S606 - a fixed tool from fusemount.TOOL_DIRS, no shell
        except BaseException:
            os.write(2, f"cannot run {argv[0]}\n".encode())
        os._exit(127)
    os.close(out)
    _daemons.append(pid)
    return pid


def stop() -> None:
    """Stop the fuse2fs daemons this process started and wait until each has written
    its image back: the container's init calls it before it exits, since the end of a
    pid namespace SIGKILLs everything left in it."""
    import time

    for pid in _daemons:
        try:
            os.kill(pid, 15)
        except OSError:
            continue
        deadline = time.monotonic() + STOP_S
        while time.monotonic() < deadline:
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # reaped already (init reaps every orphan)
            if done:
                break
            time.sleep(0.005)
    _daemons.clear()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except OSError:
        pass


def _said(log: str) -> str:
    """fuse2fs's last line that is not its journal warning."""
    try:
        with open(log, "rb") as f:
            lines = f.read(8192).decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    lines = [line.strip() for line in lines if "journal is not supported" not in line]
    return lines[-1] if lines else ""
