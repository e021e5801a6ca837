"""FUSE mounts made inside the container's own namespaces (room: launch).

The node's shared squashfs mount (squashmount.py) is made in the initial namespaces
by the setuid ``fusermount3``: the kernel then shows the image's owners as host ids,
and only the mounting uid may enter it.  Three cases need a mount of their own:

- ``--fakeroot`` on a squashfs image (``private_squashfs``): ``squashfuse_ll`` mounted
  with mount(2) in the container's user namespace, so the kernel maps the image's
  owners through *that* namespace (the image's root is the container's root, its
  service users are the sub-ids) and, with ``allow_other``, admits every id of it
  (fusermount3's mount admits the mounting uid only: a workload that switches to a
  sub-id, ``USER appuser`` or ``start-stop-daemon -c``, could not read its image).
  With sub-ids the kernel also checks modes (``default_permissions``), as Docker's
  root filesystem would; with one id it does not, like the shared mount.
- mesobox inside a container (``nested_image``): no setuid helper can run in a user
  namespace, so the launcher enters a user and mount namespace of its own (mapping
  only itself, as the shared mount would), mounts the image there and sets the
  container up below it.
- a writable layer over a squashfs whose owners the namespace cannot map (a rootless
  caller without sub-ids sees the image's root as nobody): kernel overlayfs would fail
  every copy-up (EOVERFLOW), so ``fuse-overlayfs`` serves it, showing every file as
  the caller's (``squash_to_uid``/``squash_to_gid``), as the caller's own flattened
  directory would be.

Each daemon runs in the foreground as a child of this process, with
``PR_SET_PDEATHSIG``: it lives as long as the thread that forked it (the launcher,
then the workload it execs into, or the container's init) and never outlives the
container (a daemonized FUSE helper would keep its mount namespace alive for ever).
It leaves the terminal's process group (``setsid``: a ^C is the workload's) and gets
the default signal mask (the launcher blocks the signals it forwards).  What it says
on stderr goes to a file in the workspace tmpfs and into the error line if it fails.
"""

from __future__ import annotations

import os

from mesobox.errors import LaunchError
from mesobox.launch import syscalls as sc

TOOL_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin")  # never $PATH
READY_S = 10.0  # fuse-overlayfs has this long to mount


def tool(*names: str) -> str | None:
    for name in names:
        for directory in TOOL_DIRS:
            path = os.path.join(directory, name)
            if os.access(path, os.X_OK):
                return path
    return None


def private_squashfs(image: str, target: str, workspace: str, check_modes: bool,
                     workload: tuple[int, int] | None = None) -> None:
    """Mount the squashfs file ``image`` on ``target`` with mount(2) in this user and
    mount namespace (the caller holds CAP_SYS_ADMIN there), served by a squashfuse_ll
    child.  ``check_modes``: the kernel checks owners and modes (default_permissions).
    ``workload``: the (uid, gid) this process will exec the workload as (_daemon_ids)."""
    squashfuse = tool("squashfuse_ll", "squashfuse")
    if squashfuse is None:
        raise LaunchError("squashfuse is not installed: cannot mount a squashfs image as a user",
                          hint="apt-get install squashfuse (and fuse3), or use a directory image")
    # The daemon reads the image through a descriptor opened here: as the workload's ids
    # it may not traverse the directories above it (a 0700 home holding the store).
    try:
        archive = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise LaunchError(f"cannot open the squashfs image {image}: {err.strerror}") from None
    try:
        ids = _daemon_ids(archive, workload)
        try:
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise LaunchError(f"cannot open /dev/fuse: {err.strerror}",
                              hint="FUSE must be usable (/dev/fuse, mode 0666); inside a container, it must "
                                   "be bound in") from None
        try:
            options = (f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},allow_other"
                       + (",default_permissions" if check_modes else ""))
            try:
                sc.mount("squashfuse", target, "fuse.squashfuse", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV,
                         options)
            except OSError as err:
                raise LaunchError(f"cannot mount the squashfs image in the container's namespace: {err.strerror}",
                                  hint="this kernel may not allow FUSE in user namespaces (Linux >= 4.18)") from None
            log = os.path.join(workspace, "squashfuse.log")
            pid = _spawn([squashfuse, "-f", f"/dev/fd/{archive}", f"/dev/fd/{fd}"], log, keep=(fd, archive),
                         ids=ids)
        finally:
            os.close(fd)  # the daemon holds the only copy: if it dies, the mount fails, never hangs
    finally:
        os.close(archive)
    try:
        os.listdir(target)  # waits for the daemon's FUSE_INIT
    except OSError as err:
        reap(pid)
        raise LaunchError(f"cannot mount squashfs {image}: {said(log) or err.strerror}",
                          hint="is it a valid squashfs (unsquashfs -s)?") from None


def overlay(lower: str, upper: str, work: str, target: str, squash: str, workspace: str) -> None:
    """fuse-overlayfs on ``target`` with the ``squash`` options (module docstring), or
    none where the kernel refused its overlayfs."""
    fuse_overlayfs = tool("fuse-overlayfs")
    if fuse_overlayfs is None:
        raise LaunchError("fuse-overlayfs is not installed: a writable layer over this squashfs image needs it "
                          "(the kernel's overlayfs cannot copy up files whose owner is not mapped)",
                          hint="apt-get install fuse-overlayfs, or use a directory image (--format dir)")
    before = os.stat(target).st_dev
    log = os.path.join(workspace, "fuse-overlayfs.log")
    options = ",".join(o for o in (f"lowerdir={lower},upperdir={upper},workdir={work}", squash, "allow_other") if o)
    pid = _spawn([fuse_overlayfs, "-f", "-o", options, target], log, ambient=True)
    import time

    deadline = time.monotonic() + READY_S
    while True:
        try:
            mounted = os.stat(target).st_dev != before
        except OSError:
            mounted = False
        if mounted:
            return
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            if not done:
                reap(pid)
            raise LaunchError(f"fuse-overlayfs failed: {said(log) or 'it did not mount in time'}")
        time.sleep(0.002)


def nested_image(image: str, runtime_dir: str) -> str:
    """Enter a user namespace that maps only this user (as the shared mount shows the
    image) and a mount namespace, mount the squashfs ``image`` there, and return its
    mount point.  The container's namespaces are made below these ones."""
    uid, gid = os.getuid(), os.getgid()
    try:
        sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
        sc.write_file("/proc/self/setgroups", "deny")
        sc.write_file("/proc/self/uid_map", f"{uid} {uid} 1\n")
        sc.write_file("/proc/self/gid_map", f"{gid} {gid} 1\n")
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    except OSError as err:
        raise LaunchError(f"cannot create namespaces to mount the squashfs image: {err.strerror}") from None
    # A tmpfs private to these namespaces, on a directory of the private runtime dir
    # (paths.runtime_dir), holds the mount point and the daemon's log.
    top = os.path.join(runtime_dir, "nested-image")
    try:
        os.makedirs(top, 0o700, exist_ok=True)
        sc.mount("tmpfs", top, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=64k,mode=700")
        point = os.path.join(top, "root")
        os.mkdir(point, 0o700)
    except OSError as err:
        raise LaunchError(f"cannot prepare {top} to mount the image: {err.strerror}") from None
    private_squashfs(image, point, top, check_modes=False)
    return point


def _daemon_ids(archive: int, workload: tuple[int, int] | None) -> tuple[int, int] | None:
    """The ids the squashfs daemon runs as: the workload's, when it is to switch to
    another id (an image's USER) and may read the image file (``archive``: reopening
    /dev/fd/N checks the file's mode again, not the directories above it).  The
    parent-death signal is sent with the dying parent's credentials (kill(2) rules): a
    workload running as appuser could not kill a daemon that kept the container root's
    ids.  An image file others may not read is refused then: a daemon left as root
    would outlive the container."""
    if workload is None or workload == (os.getuid(), os.getgid()):
        return None
    if not os.fstat(archive).st_mode & 0o004:
        raise LaunchError("this image switches to another user under --fakeroot, and its squashfs file is "
                          "readable by you alone", hint="make the file readable by others (chmod o+r), as "
                                                         "the image store's files are")
    return workload


def _spawn(argv: list[str], log: str, keep: tuple[int, ...] = (), ids: tuple[int, int] | None = None,
           ambient: bool = False) -> int:
    """Fork ``argv`` as a daemon that dies with this thread (module docstring), as
    ``ids`` (uid, gid) if given; ``ambient``: it keeps this namespace's capabilities
    (fuse-overlayfs mounts by itself, and a non-root uid loses them at execve)."""
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            if ids is not None:  # first: a change of credentials clears the parent-death signal
                os.setresgid(ids[1], ids[1], ids[1])
                os.setresuid(ids[0], ids[0], ids[0])
            if ambient:
                sc.raise_ambient_capabilities()
            sc.prctl(sc.PR_SET_PDEATHSIG, 9)
            if os.getppid() != parent:
                os._exit(1)
            os.setsid()
            from mesobox.launch.signals import unblock_all

            unblock_all()
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(out, 2)
            for fd in keep:
                os.set_inheritable(fd, True)
            os.execv(argv[0], argv)  # noqa: S606 - a fixed tool from TOOL_DIRS, no shell
        except BaseException:
            os.write(2, f"cannot run {argv[0]}\n".encode())
        os._exit(127)
    os.close(out)
    return pid


def reap(pid: int) -> None:
    """Kill a daemon that failed to serve, and wait for it."""
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except OSError:
        pass


def said(log: str, noise: tuple[str, ...] = ()) -> str:
    """The daemon's last line on stderr, leaving out lines holding any of ``noise``."""
    try:
        with open(log, "rb") as f:
            lines = f.read(8192).decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    lines = [line.strip() for line in lines if not any(text in line for text in noise)]
    return lines[-1] if lines else ""
