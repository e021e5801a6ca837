"""Execute room: run a launch *program* — the container side of a launch.

A program is plain data (a dict of str, int, bytes and tuples) that
``program.compile_program`` derives from a validated Spec.  Every decision is already
taken in it: mount steps, passwd/group text, the capabilities to keep, the compiled
seccomp filter.  This module only makes the syscalls, in bubblewrap's order:
(setns into the namespaces a config names by path) → unshare → id maps → make /
slave → workspace tmpfs → root and mount steps (devices) → (mesobox-oci: the
runtime's prestart hooks) → (OCI createContainer hooks) → pivot_root → sysctl,
readonly and masked paths, root propagation → hostname → chdir → (--ulimit rlimits)
→ (real root: its user namespace) → (mesobox-oci: wait for start) → (startContainer
hooks) → (a seccomp filter without no_new_privs) → bounding set → user switch →
capability sets → umask, security label → no_new_privs → seccomp (last) → execve.
Being plain data,
a program can be reused by the next launch of the same command line (plancache.py);
only the environment is made anew.

The program's fields are listed, typed, in program.py (``Program``); the mount steps'
kinds and fields in mountops.py.

Invariants:
- Every target is reached with ``open_beneath``: one ``openat2`` with
  RESOLVE_BENEATH|NO_SYMLINKS|NO_MAGICLINKS (or, on older kernels, one component at a
  time, each opened ``O_PATH|O_NOFOLLOW``), and the mount is made on
  ``/proc/self/fd/N`` of the final fd.  An image-provided symlink (``/proc -> /``,
  ``/dev/null -> /etc/shadow``…) can never redirect the runtime's own mounts outside
  the new root (runc CVE-2019-16884, CVE-2025-31133 family): it is refused.
- Mount points are created only in filesystems mesobox owns (the workspace tmpfs, a
  skeleton tmpfs, the tmpfs upper of the root overlay), never in a host bind.
- A read-only or nosuid bind is remounted repeating the locked flags read from the
  bind itself when the step runs (mount_namespaces(7): a user namespace may not clear
  nosuid/nodev/noexec/atime flags of a mount it inherited); a read-only rbind is made
  read-only with every mount below it (mount_setattr AT_RECURSIVE, else a remount per
  submount).
- The workload execs with the caller's signal mask; a forwarded signal already
  pending is passed on once the workload is ready (``_signals_for_exec``).
"""

from __future__ import annotations

import os
import stat
import sys

from mesobox import paths
from mesobox.launch import signals
from mesobox.launch import syscalls as sc
from mesobox.launch.signals import FORWARDED
from mesobox.launch.syscalls import (
    O_PATH_FLAGS,
    hold_root,
    mountinfo_path,
    open_beneath,
    release_roots,
    write_file,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal  # the C half of `signal`: the same calls, without its enum import (≈3 ms)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

    from mesobox.launch.mountops import MountStep
    from mesobox.launch.program import Program

_exec_fd: int | None = None  # write end of the "workload exec'd" pipe (close-on-exec)


# mesobox.errors (14 classes) is imported only when something fails: ≈0.5 ms of every
# launch that does not.
def _launch_error(message: str, hint: str | None = None) -> Exception:
    from mesobox.errors import LaunchError

    return LaunchError(message, hint=hint)


def _not_found(message: str, hint: str | None = None) -> Exception:
    from mesobox.errors import CommandNotFound

    return CommandNotFound(message, hint=hint)


def _not_executable(message: str, hint: str | None = None) -> Exception:
    from mesobox.errors import CommandNotExecutable

    return CommandNotExecutable(message, hint=hint)


def run(program: Program) -> NoReturn:
    """Unshare (or join the node's shared user namespace), write one's own id maps, set
    the container up and exec (unsupervised)."""
    record_launch(program)
    if program.get("share_userns"):
        def maps(created: bool) -> None:
            if created:
                write_own_maps(program["uid_map"], program["gid_map"], privileged=False)

        program = enter_shared_userns(program, maps)
    else:
        join_namespaces(program)
        unshare(program["flags"])
        if program["flags"] & sc.CLONE_NEWUSER:
            write_own_maps(program["uid_map"], program["gid_map"], privileged=os.getuid() == 0)
    container(program, detach=program["start_fifo"] is not None)


def join_namespaces(program: Program) -> None:
    """setns(2) into each namespace the config names by path (all opened first: after
    joining a network namespace, a path below /proc/PID/ns/ still names the same file)."""
    joins = program.get("join") or ()
    fds: list[tuple[int, int, str]] = []
    try:
        for kind, path in joins:
            fds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), kind, path))
        for fd, kind, path in fds:  # noqa: B007 - ``path`` names the one that failed
            sc.setns(fd, kind)
    except OSError as err:
        raise _launch_error(f"cannot join the namespace {err.filename or path}: {err.strerror}") from None
    finally:
        for fd, _, _ in fds:
            os.close(fd)


LAUNCH_LOG = "launches.log"
LAUNCH_LOG_MAX = 1 << 20  # bytes; then it becomes launches.log.1


def record_launch(program: Program) -> None:
    """The provenance of every result: one line per launch in the runtime directory's
    launches.log (UTC time, pid, Slurm job, REFERENCE@DIGEST or the image's path).  One
    O_APPEND write (the lines of ranks starting together never mix), on the node's own
    runtime directory, never a shared filesystem; past LAUNCH_LOG_MAX the log becomes
    launches.log.1.  Best effort: a full disk never stops a launch."""
    image = program.get("provenance")
    if not image:
        return
    import time

    path = os.path.join(os.path.dirname(program["workspace"]), LAUNCH_LOG)
    job = os.environ.get("SLURM_JOB_ID", "")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = f"{when}\t{os.getpid()}\t{job if job.isdigit() else '-'}\t{image}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.write(fd, line.encode("utf-8", "surrogateescape"))
        if os.fstat(fd).st_size > LAUNCH_LOG_MAX:
            os.replace(path, path + ".1")
    except OSError:
        pass
    finally:
        os.close(fd)


def enter_shared_userns(program: Program, made: Callable[[bool], object]) -> Program:
    """Join the user namespace the node's other ranks share, or create it (sharedns.py);
    ``made(created)`` then writes the maps of a new one.  Where it cannot be shared, the
    workload's environment keeps the MPI libraries off CMA (those the user set win)."""
    from mesobox.launch import sharedns

    directory = program["share_userns"]
    assert directory is not None
    if sharedns.enter(directory, program["flags"], program["uid_map"], program["gid_map"], unshare, made):
        return program
    have = {item.split("=", 1)[0] for item in program["env"]}
    extra = tuple(item for item in program["cma_env"] if item.split("=", 1)[0] not in have)
    return {**program, "env": program["env"] + extra}


def hold_image(program: Program) -> None:
    """Hold the in-use lock of a stored directory image (flock, shared) for as long as
    the container runs: ``mesobox rm``/``prune`` take it exclusively before deleting the
    tree, so they never delete the root of a running container.  The fd is a plain file's
    (no directory fd ever reaches a container) above 100, and inherited across execve:
    the workload itself holds it, supervised or not.  Best effort: a store whose locks
    this user cannot create has no rm of theirs to fear."""
    path = program.get("image_lock")
    if not path:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # an rm holds it exclusively only while it deletes
        held = fcntl.fcntl(fd, fcntl.F_DUPFD, 100)
    except OSError:
        return
    finally:
        os.close(fd)
    os.set_inheritable(held, True)


REAP_EVERY_S = 1.0  # reap_stale_mounts looks at other keys' mounts at most this often


def reap_stale_mounts(runtime_dir: str, linger: float) -> None:
    """A SIGKILLed supervisor leaves its shared squashfs mount behind, a killed watcher
    a lingering one: the next launch of any image reaps them (a key whose watcher lives
    is left to it).  Only a live or stale lease leaves a ``.refs`` file and only a
    lingering mount an ``.idle`` stamp, so with neither this is one listdir.  With
    them, it looks at most once every ``REAP_EVERY_S`` (the ``.reaped`` stamp): a mount
    lingering under its watcher is the common case, and the look costs ≈1.5 ms
    (squashmount's import) that every rank would pay."""
    shared = os.path.join(runtime_dir, "mnt")
    from mesobox import paths

    paths.runtime_dir(runtime_dir)  # nothing in it is acted on unless it is private
    try:
        names = os.listdir(shared)
    except OSError:
        return
    if not any(name.endswith((".refs", ".idle")) for name in names):
        return
    import time

    stamp = os.path.join(shared, ".reaped")
    try:
        if 0 <= time.time() - os.stat(stamp).st_mtime < REAP_EVERY_S:
            return
        os.utime(stamp)
    except FileNotFoundError:
        try:  # noqa: SIM105 - contextlib costs an import on the launch path
            os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError:
            pass
    except OSError:
        pass
    from mesobox.launch.squashmount import reap_stale

    reap_stale(shared, linger)


def check_ids() -> tuple[int, int]:
    """Return (uid, gid); refuse to run with differing real/effective/saved ids."""
    ruid, euid, suid = os.getresuid()
    rgid, egid, sgid = os.getresgid()
    if not (ruid == euid == suid and rgid == egid == sgid):
        raise _launch_error(
            "refusing to run setuid or setgid: real, effective and saved ids differ",
            hint="mesobox is unprivileged by design; install it without the setuid bit",
        )
    return ruid, rgid


def unshare(flags: int) -> None:
    try:
        sc.unshare(flags)
    except OSError as err:
        hint = None
        if err.errno in (1, 28, 38):  # EPERM, ENOSPC, ENOSYS
            hint = ("unprivileged user namespaces are restricted on this host: ask the admin to set "
                    "kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0")
        raise _launch_error(f"cannot create namespaces: {err.strerror}", hint=hint) from None


def write_own_maps(uid_map: str, gid_map: str, privileged: bool) -> None:
    """Write /proc/self/{setgroups,uid_map,gid_map} right after unshare(CLONE_NEWUSER).

    An unprivileged writer must deny setgroups(2) before writing gid_map
    (user_namespaces(7), since Linux 3.19), or anyone could drop supplementary groups
    used as negative permissions."""
    try:
        if not privileged:
            write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", uid_map)
        write_file("/proc/self/gid_map", gid_map)
    except OSError as err:
        raise _launch_error(f"cannot write the user namespace id maps: {err.strerror}") from None


def container(program: Program, detach: bool = False) -> NoReturn:
    """Inside the new namespaces: the root, then the workload (or, with a pid
    namespace, an init that forks it).  ``detach``: an OCI container's own process
    with a pid namespace, whose workload is pid 1 and is the container's process:
    this parent exits once it is forked (runc's init is not waited for either)."""
    _set_oom_score_adj(program.get("oom_score_adj"))
    if program["pid"]:
        # unshare(CLONE_NEWPID) puts the *next child* in the new pid namespace as pid 1.
        pid = os.fork()
        if pid:
            close_exec_fd()  # only the workload holds it: its execve closes it
            if detach:
                os._exit(0)
            from mesobox.launch.forwarding import wait_forwarding

            os._exit(wait_forwarding(pid))
        if program.get("pid_init", True):
            in_child(lambda: _container_init(program))
        if detach:
            global _host_pid
            _host_pid = int(os.readlink("/proc/self"))  # the host's /proc still: the pid create records
        in_child(lambda: _pid_one(program))
    setup_root(program)
    exec_workload(program)


def _pid_one(program: Program) -> NoReturn:
    setup_root(program)
    exec_workload(program)


_host_pid = 0  # a detached pid 1's pid in the runtime's pid namespace, told with "created"


def _set_oom_score_adj(value: int | None) -> None:
    """process.oomScoreAdj, before anything is dropped (a lower score needs CAP_SYS_RESOURCE)."""
    if value is None:
        return
    try:
        write_file("/proc/self/oom_score_adj", str(value))
    except OSError as err:
        raise _launch_error(f"cannot set oomScoreAdj {value}: {err.strerror}",
                            hint="only a privileged caller may lower it") from None


def _container_init(program: Program) -> None:
    """pid 1 of a --pid container: forward signals, reap orphans, exit like the workload."""
    sc.prctl(sc.PR_SET_PDEATHSIG, 9)
    setup_root(program)
    workload = os.fork()
    if workload == 0:
        in_child(lambda: exec_workload(program))
    close_exec_fd()
    from mesobox.launch.forwarding import wait_forwarding

    status = wait_forwarding(workload, everyone=True)
    if program["overlay_image"] and program["enter_userns"] is None:
        from mesobox.launch import fuseoverlay

        fuseoverlay.stop()  # fuse2fs writes the image back: the pid namespace's end would SIGKILL it
    os._exit(status)


def in_child(body: Callable[[], Any]) -> NoReturn:
    """Run a forked child's body; any error becomes one line and its exit code."""
    code = 125
    try:
        body()
    except Exception as err:
        from mesobox.errors import MesoboxError

        if isinstance(err, MesoboxError):
            sys.stderr.write(f"mesobox: error: {err.message}\n")
            if err.hint:
                sys.stderr.write(f"mesobox: hint: {err.hint}\n")
            code = err.exit_code
        elif isinstance(err, OSError):
            from mesobox.errors import os_error_text

            sys.stderr.write(f"mesobox: error: {os_error_text(err)}\n")
        else:  # a bug: still one line (the parent has its own --debug)
            sys.stderr.write(f"mesobox: error: internal: {type(err).__name__}: {err}\n")
    finally:
        sys.stderr.flush()
        os._exit(code)


# --- the root ----------------------------------------------------------------------------


def setup_root(program: Program) -> None:
    # Slave, not private: host mounts made later (automounted home, Lustre) still show up,
    # and nothing we mount leaks back (mount_namespaces(7), bubblewrap does the same).
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    workspace = program["workspace"]
    make_workspace(program)
    if program.get("private_squashfs"):  # --fakeroot: the image as this namespace maps its owners
        from mesobox.launch.fusemount import private_squashfs

        image, check_modes = program["private_squashfs"]  # type: ignore[misc]
        private_squashfs(image, program["image_dir"], workspace, check_modes, program["user"][:2])
    if program["overlay_image"]:  # disk-quota overlay, gone with this mount namespace: loop-mounted
        # by real root (entering the user namespace last), served by fuse2fs for a user
        from mesobox.isolation.quota import mount_image

        mount_image(program["overlay_image"], os.path.join(workspace, "ovl"), workspace,
                    real_root=program["enter_userns"] is not None)
    root = os.path.join(workspace, "root")
    run_steps(program["steps"], root)
    if program["loopback"]:
        from mesobox.isolation.network import setup_loopback

        setup_loopback()  # before pivot_root: it imports socket/fcntl from the host's stdlib
    if program.get("start_fifo") is not None:
        await_runtime_hooks(program["start_fifo"])  # type: ignore[arg-type]
    if program["hooks"] is not None:
        run_hooks(program, 0)  # createContainer: in the container's namespaces, before pivot_root
    if program.get("console"):
        _bind_console(root)
    pivot(root)
    _after_pivot(program)
    if program["hostname"] is not None:
        sc.sethostname(program["hostname"])
    try:
        os.chdir(program["cwd"])
    except FileNotFoundError:
        raise _launch_error(f"working directory {program['cwd']} does not exist in the container",
                            hint="choose another with -w/--workdir") from None
    except OSError as err:
        raise _launch_error(f"cannot enter the working directory {program['cwd']} in the container: "
                            f"{err.strerror}", hint="choose another with -w/--workdir") from None


def _bind_console(root: str) -> None:
    """process.terminal: the container's terminal (its stdin, a pty of the host's
    devpts) also on /dev/console, as runc binds it."""
    try:
        tty = os.ttyname(0)
    except OSError:
        return
    fd = open_beneath(root, "dev/console", "file")
    try:
        sc.mount(tty, f"/proc/self/fd/{fd}", None, sc.MS_BIND)
    except OSError as err:
        raise _launch_error(f"cannot bind the terminal on /dev/console: {err.strerror}") from None
    finally:
        os.close(fd)


def _after_pivot(program: Program) -> None:
    """What a config asks of the finished root, in runc's order: sysctl (through the
    container's own /proc), read-only paths, masked paths, the root's propagation.
    Paths are the container's: after pivot_root no symlink can lead out of it."""
    for key, value in program.get("sysctl") or ():
        try:
            write_file("/proc/sys/" + key.replace(".", "/"), value)
        except OSError as err:
            raise _launch_error(f"cannot set sysctl {key}={value}: {err.strerror}",
                                hint="the config needs a proc mount on /proc") from None
    for path in program.get("readonly_paths") or ():
        _readonly_path(path)
    for path in program.get("masked_paths") or ():
        _mask_path(path)
    flags = program.get("root_propagation") or 0
    if flags:
        try:
            sc.mount(None, "/", None, flags)
        except OSError as err:
            raise _launch_error(f"cannot set the root's propagation: {err.strerror}") from None


def _readonly_path(path: str) -> None:
    """A bind of ``path`` on itself, made read-only with every mount below it; a path
    the container lacks is skipped (runc does the same)."""
    try:
        sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
    except FileNotFoundError:
        return
    except OSError as err:
        raise _launch_error(f"cannot make {path} read-only: {err.strerror}") from None
    fd = os.open(path, O_PATH_FLAGS)
    try:
        if not sc.mount_setattr(fd, sc.MS_RDONLY, recursive=True):
            _remount_fd(fd, path.lstrip("/"), sc.MS_RDONLY, True)
    except OSError as err:
        raise _launch_error(f"cannot make {path} read-only: {err.strerror}") from None
    finally:
        os.close(fd)


def _mask_path(path: str) -> None:
    """/dev/null over a file, an empty read-only tmpfs over a directory; a path the
    container lacks is skipped (runc does the same)."""
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        if is_dir:
            sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
        else:
            sc.mount("/dev/null", path, None, sc.MS_BIND)
    except FileNotFoundError:
        return
    except OSError as err:
        raise _launch_error(f"cannot mask {path}: {err.strerror}") from None


def make_workspace(program: Program) -> None:
    """A tmpfs private to this mount namespace: new root mount point, passwd/group,
    overlay upper layers.  The same path serves every container (each sees its own)."""
    workspace = program["workspace"]
    paths.private_subdir(os.path.dirname(workspace), os.path.basename(workspace))
    sc.mount("tmpfs", workspace, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=755,size=16m")
    os.mkdir(os.path.join(workspace, "root"), 0o755)
    os.mkdir(os.path.join(workspace, "etc"), 0o755)
    size = program["scratch"]
    if size is not None:
        scratch = os.path.join(workspace, "rw")
        os.mkdir(scratch, 0o755)
        # The size cap is the disk quota of --writable-tmpfs: writes past it get ENOSPC.
        sc.mount("tmpfs", scratch, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
                 "mode=755" + (f",size={size}" if size else ""))
        os.mkdir(scratch + "/upper", 0o755)
        os.mkdir(scratch + "/work", 0o755)
    persistent = program["persistent"]
    if persistent:
        try:
            for sub in ("upper", "work"):
                made = os.path.join(persistent, sub)
                if not os.path.isdir(made):
                    os.makedirs(made)
                    _give_to_container_root(made, program["enter_userns"])
        except OSError as err:
            raise _launch_error(f"cannot make the overlay directory {persistent}: {err.strerror}",
                                hint="--overlay needs a directory you can write") from None
    for name, text in program["files"]:
        fd = os.open(os.path.join(workspace, "etc", name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def _give_to_container_root(path: str, maps: Any) -> None:
    """A new overlay directory made by real root belongs to the container's root (its id
    slice): its next launches know the slice by it (identity.state_owner)."""
    if maps is not None:
        uid_maps, gid_maps = maps
        os.chown(path, uid_maps[0].host_id, gid_maps[0].host_id)


def pivot(root: str) -> None:
    # pivot_root(".", ".") stacks the old root on the new one; detaching "." then drops
    # it without needing a put_old directory in the image (pivot_root(2)).
    os.chdir(root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


# --- mount steps -------------------------------------------------------------------------


def run_steps(steps: tuple[MountStep, ...] | list[MountStep], root: str) -> None:
    """Apply the mount steps (mountops.py lists the kinds and their fields) below ``root``."""
    try:
        for kind, target, source, flags, data, file, recursive, hide, upper, work in steps:
            if kind == "bind":
                _bind(root, source, target, "file" if file else "dir", recursive, hide, flags)
            elif kind == "overlay":
                _overlay(root, source, upper, work, target, data)
            elif kind == "remount":
                _remount(root, target, flags, source)
            elif kind == "skeleton":
                _skeleton(root, target)
            elif kind == "symlink":
                _symlink(root, target, source)
            elif kind == "propagate":
                _propagate(root, target, flags)
            elif kind == "device":
                _device(root, target, source, flags, data)
            else:  # a filesystem type (mountops.py)
                _mount_at(root, target, "dir", source, kind, flags, data or None)
            hold_root(root)
    finally:
        release_roots()


def _mount_at(root: str, rel: str, create: str | None, source: str | None, fstype: str | None,
              flags: int, data: str | None = None) -> None:
    fd = open_beneath(root, rel, create)
    try:
        sc.mount(source, f"/proc/self/fd/{fd}", fstype, flags, data)
        if not rel.strip("/"):
            release_roots()
    except OSError as err:
        raise _launch_error(f"cannot mount {fstype or source} on /{rel}: {err.strerror}") from None
    finally:
        os.close(fd)


def _propagate(root: str, rel: str, flags: int) -> None:
    fd = open_beneath(root, rel)
    try:
        sc.mount(None, f"/proc/self/fd/{fd}", None, flags)
    except OSError as err:
        raise _launch_error(f"cannot set the propagation of /{rel}: {err.strerror}") from None
    finally:
        os.close(fd)


def _device(root: str, rel: str, kind: str, number: int, data: str) -> None:
    """mknod(2) the node in its parent, reached beneath the root; chown and chmod it
    through an O_PATH fd (never by a path that could be a symlink by then)."""
    mode, uid, gid = (int(x) for x in data.split(","))
    parent, name = os.path.split(rel)
    fmt = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[kind]
    fd = open_beneath(root, parent, "dir")
    try:
        try:  # noqa: SIM105 - contextlib costs an import on the launch path
            os.unlink(name, dir_fd=fd)  # a file the image has there (runc replaces it too)
        except (FileNotFoundError, IsADirectoryError):
            pass
        os.mknod(name, fmt | 0o600, number if fmt != stat.S_IFIFO else 0, dir_fd=fd)
        node = os.open(name, O_PATH_FLAGS, dir_fd=fd)
        try:
            os.chown(f"/proc/self/fd/{node}", uid, gid)
            os.chmod(f"/proc/self/fd/{node}", mode & 0o7777)
        finally:
            os.close(node)
    except OSError as err:
        raise _launch_error(f"cannot make the device /{rel}: {err.strerror}") from None
    finally:
        os.close(fd)


def _remount(root: str, rel: str, flags: int, source: str) -> None:
    """Remount the bind now at ``rel`` (a fresh fd: the old one names the covered dir);
    ``source`` non-empty: a bind of a host path, whose locked flags are repeated."""
    fd = open_beneath(root, rel)
    try:
        _remount_fd(fd, rel, flags, bool(source))
    finally:
        os.close(fd)


def _remount_fd(fd: int, rel: str, flags: int, locked: bool) -> None:
    # The flags to repeat are read from the bind itself (it copied its source mount's),
    # not from the source path, which may be a different file by now.
    keep = sc.locked_flags(fd) if locked else 0
    try:
        sc.mount(None, f"/proc/self/fd/{fd}", None, sc.MS_REMOUNT | sc.MS_BIND | flags | keep)
    except OSError as err:
        raise _launch_error(f"cannot remount /{rel}: {err.strerror}") from None


def _bind(root: str, source: str, target: str, kind: str, recursive: bool, hide: str, flags: int) -> None:
    _mount_at(root, target, kind, source, None, sc.MS_BIND | (sc.MS_REC if recursive else 0))
    if hide:
        # The rbind copied mesobox's own workspace (the container's root and scratch
        # files): detach that copy.  It is our mount, so it is not locked.
        fd = open_beneath(root, f"{target}/{hide}")
        try:
            sc.umount2(f"/proc/self/fd/{fd}", sc.MNT_DETACH)
        finally:
            os.close(fd)
    if recursive and flags & sc.MS_RDONLY:
        _readonly_tree(root, target, flags)
    elif flags:
        _remount(root, target, flags, source)


def _readonly_tree(root: str, target: str, flags: int) -> None:
    """Apply ``flags`` (read-only, nosuid…) to the rbind at ``target`` *and every mount
    below it*: a remount changes one mount, and a read-only /sys whose /sys/fs/cgroup/*
    stayed writable let a container leave its memory cgroup.  One mount_setattr(2)
    with AT_RECURSIVE; without it (Linux < 5.12), a remount per mount."""
    fd = open_beneath(root, target)
    try:
        try:
            if sc.mount_setattr(fd, flags, recursive=True):
                return
        except PermissionError:
            pass  # a seccomp filter older than mount_setattr: the remounts below say if mounts are refused
        except OSError as err:
            raise _launch_error(f"cannot make /{target} and the mounts below it read-only: {err.strerror}") from None
        _remount_fd(fd, target, flags, True)
        below = _mounts_below(fd)
    finally:
        os.close(fd)
    for rel in below:
        # Reached beneath the root without following a symlink, like every target: the
        # directories are the host's, and their owner may rename them meanwhile.
        sub = open_beneath(root, f"{target}/{rel}")
        try:
            _remount_fd(sub, f"{target}/{rel}", flags, True)
        finally:
            os.close(sub)


def _mounts_below(fd: int) -> list[str]:
    """Mount points of every mount below the one ``fd`` is on, relative to it: its
    descendants in /proc/self/mountinfo, found by mount id (fdinfo's mnt_id), not by
    path.  A mount covered by another on the same point is unreachable by path, for the
    container too; the covering one is remounted."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        top = next(int(line.split()[1]) for line in f if line.startswith(b"mnt_id:"))
    points: dict[int, str] = {}
    children: dict[int, list[int]] = {}
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ", 5)
            mount_id, parent = int(fields[0]), int(fields[1])
            points[mount_id] = mountinfo_path(os.fsdecode(fields[4]))
            if mount_id != parent:  # the namespace's root is its own parent
                children.setdefault(parent, []).append(mount_id)
    prefix = points[top].rstrip("/") + "/"
    found: list[str] = []
    todo = list(children.get(top, ()))
    while todo:
        mount_id = todo.pop()
        point = points[mount_id]
        if point != points[top] and not point.startswith(prefix):  # cannot be: fail closed
            raise _launch_error(f"cannot make {point} read-only: it is not below {points[top]}")
        found.append(point[len(prefix):])  # "": a mount stacked on the top itself
        todo += children.get(mount_id, ())
    return sorted(found, key=lambda rel: rel.count("/"))


def _overlay(root: str, lower: str, upper: str, work: str, target: str, squash: str = "") -> None:
    """Kernel overlayfs on ``target``, fuse-overlayfs when the kernel refuses, or at
    once with ``squash`` (owners the namespace cannot map: fusemount.py) or an upper
    layer on a user's fuse2fs overlay image (fuseoverlay.py)."""
    fuse_image = sys.modules.get("mesobox.launch.fuseoverlay")  # imported only when one is mounted
    if fuse_image is not None and fuse_image.serves(upper):
        fuse_image.overlay(lower, upper, work, os.path.join(root, target), os.path.dirname(root), squash)
        if not target.strip("/"):
            release_roots()
        return
    if squash:
        from mesobox.launch import fusemount

        fusemount.overlay(lower, upper, work, os.path.join(root, target), squash, os.path.dirname(root))
        if not target.strip("/"):
            release_roots()
        return
    data = f"lowerdir={lower},upperdir={upper},workdir={work}"
    last: OSError | None = None
    # userxattr: unprivileged overlay keeps its whiteouts in user.* xattrs (Linux ≥ 5.11).
    for opts in (data + ",userxattr", data):
        fd = open_beneath(root, target, "dir")
        try:
            sc.mount("overlay", f"/proc/self/fd/{fd}", "overlay", sc.MS_NOSUID | sc.MS_NODEV, opts)
            if not target.strip("/"):
                release_roots()
            return
        except OSError as err:
            last = err
        finally:
            os.close(fd)
    from mesobox.launch import fusemount

    if fusemount.tool("fuse-overlayfs") is None:
        raise _launch_error(f"kernel overlayfs failed ({last and last.strerror}) and fuse-overlayfs is missing",
                          hint="install fuse-overlayfs, or drop --overlay/--writable-tmpfs")
    fusemount.overlay(lower, upper, work, os.path.join(root, target), "", os.path.dirname(root))
    if not target.strip("/"):
        release_roots()


def _skeleton(root: str, target: str) -> None:
    """Replace the image directory ``target`` by a tmpfs holding binds of each of its
    entries (Apptainer's "underlay"), so missing mount points can be created in it
    without writing to the image: a rootless user may not create files in the image's
    root-owned directories even through an overlay (its owner is unmapped)."""
    # The fd keeps the image directory reachable after the tmpfs covers it; binds
    # copy the (read-only) flags of the mount they come from (clone_mnt).
    path_fd = open_beneath(root, target)
    try:
        old = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    try:
        mode = stat.S_IMODE(os.fstat(old).st_mode)
        _mount_at(root, target, None, "tmpfs", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, f"mode={mode:o},size=1m")
        for entry in os.scandir(old):
            _copy_entry(root, old, f"{target}/{entry.name}".lstrip("/"), entry.name)
    finally:
        os.close(old)


def _copy_entry(root: str, old: int, rel: str, name: str) -> None:
    src = os.open(name, O_PATH_FLAGS, dir_fd=old)
    try:
        st = os.fstat(src)
        if stat.S_ISLNK(st.st_mode):
            _symlink(root, rel, os.readlink(name, dir_fd=old))
            return
        fd = open_beneath(root, rel, "dir" if stat.S_ISDIR(st.st_mode) else "file")
        try:
            sc.mount(f"/proc/self/fd/{src}", f"/proc/self/fd/{fd}", None, sc.MS_BIND | sc.MS_REC)
        finally:
            os.close(fd)
    except OSError as err:
        raise _launch_error(f"cannot rebuild /{rel} in the skeleton: {err.strerror}") from None
    finally:
        os.close(src)


def _symlink(root: str, link: str, target: str) -> None:
    parent, name = os.path.split(link)
    fd = open_beneath(root, parent)
    try:
        os.symlink(target, name, dir_fd=fd)
    except FileExistsError:
        pass
    finally:
        os.close(fd)


# --- the workload ----------------------------------------------------------------------


def exec_workload(program: Program) -> NoReturn:
    env = dict(item.split("=", 1) for item in program["env"])
    args = program["args"]
    path = find_command(args[0], env.get("PATH", ""))
    parent = os.getppid()
    enter = program["enter_userns"]
    real_root = program.get("switch_always", enter is not None)
    if program["rlimits"]:
        # Before the user namespace that real root enters last: raising a hard limit needs
        # CAP_SYS_RESOURCE in the initial namespace, which the process then no longer has.
        set_rlimits(program["rlimits"])
    if enter is not None:
        from mesobox.launch import identity

        uid_maps, gid_maps = enter
        identity.enter_userns(uid_maps, gid_maps, sc.unshare, sc.CLONE_NEWUSER)
    start_fifo = program.get("start_fifo")  # .get: a program saved before the field existed
    if start_fifo is not None:  # mesobox-oci create: made, in all its namespaces; wait for start
        wait_for_start(start_fifo)
    if program["hooks"] is not None:
        run_hooks(program, 1)  # startContainer: in the container (its user namespace too), as it is now
    early_seccomp = program["seccomp"] is not None and not program["no_new_privs"]
    if early_seccomp:
        # A filter without no_new_privs needs CAP_SYS_ADMIN: loaded before any is dropped
        # (runc's order too); the steps below then run under it.
        sc.install_seccomp(program["seccomp"], no_new_privs=False)  # type: ignore[arg-type]
    if program["keep_caps"] is not None:
        # Before the user switch: dropping from the bounding set needs CAP_SETPCAP.
        sc.drop_capabilities(frozenset(program["keep_caps"]))
    cap_sets = program.get("cap_sets")
    if cap_sets is not None:
        cap_sets = usable_capabilities(cap_sets)
    uid, gid, groups = program["user"]
    if real_root or (uid, gid) != (os.getuid(), os.getgid()):
        if cap_sets is not None:
            sc.prctl(sc.PR_SET_KEEPCAPS, 1)  # the permitted set survives setuid; capset below trims it
        # Real root's container always switches, even to root: its supplementary groups
        # must be exactly the container user's, never the host root's (a root:G 0660
        # file stays writable through group G whatever uid the container has).
        _switch_user(uid, gid, groups, strict=real_root)
        if _exec_fd is not None:
            _rearm_parent_death(parent)
    if cap_sets is not None:
        try:
            sc.set_capabilities(*cap_sets)
        except OSError as err:
            raise _launch_error(f"cannot set the process's capabilities: {err.strerror}",
                                hint="an ambient capability must be permitted and inheritable too") from None
    if program.get("umask") is not None:
        os.umask(program["umask"])  # type: ignore[arg-type]
    label = program.get("exec_label")
    if label is not None:  # AppArmor/SELinux: the profile or context execve enters
        try:
            write_file(label[0], label[1])  # type: ignore[index]
        except OSError as err:
            raise _launch_error(f"cannot set the security label {label[1]!r}: {err.strerror}") from None  # type: ignore[index]
    if program["no_new_privs"]:
        # No setuid/file-capability gain across execve from here on (prctl(2)).
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    if program["seccomp"] is not None and not early_seccomp:
        # Last: the runtime's own setup syscalls are never filtered (runc, bubblewrap).
        sc.install_seccomp(program["seccomp"])
    sys.stdout.flush()
    sys.stderr.flush()
    _signals_for_exec()
    try:
        os.execve(path, list(args), env)  # noqa: S606 - exec'ing the user's command is the point
    except FileNotFoundError:  # e.g. a script whose #! interpreter is missing
        raise _not_found(f"{args[0]}: cannot execute: interpreter or loader not found") from None
    except OSError as err:
        raise _not_executable(f"{args[0]}: cannot execute: {err.strerror}") from None


def usable_capabilities(sets: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The capability sets as this process can give them: one this kernel lacks (a
    newer capability a config names) is left out, as runc leaves it out; one the kernel
    has but this process does not hold (a host that withholds it from root) too, with
    a warning, as runc warns."""
    have = sc.capget()[1]  # still the full permitted set of this (user) namespace here
    wanted = sets[0] | sets[1] | sets[2] | sets[3]
    if wanted & ~have:
        unavailable = sc.unavailable_capabilities(wanted)
        if unavailable:
            from mesobox.isolation.caps import NAMES

            names = ", ".join(f"CAP_{NAMES[cap]}" for cap in range(len(NAMES)) if unavailable >> cap & 1)
            sys.stderr.write(f"mesobox: warning: {names} not held by the runtime here: left out\n")
    return sets[0] & have, sets[1] & have, sets[2] & have, sets[3] & have


def await_runtime_hooks(fds: tuple[int, int]) -> None:
    """mesobox-oci create: the mounts are made, pivot_root is next; say so ("h", with
    the pid of a detached pid 1) and wait until the runtime has run its prestart and
    createRuntime hooks and writes "g" to the FIFO (runtime-spec runtime.md, steps 6-8)."""
    fifo, ready = fds
    os.write(ready, b"h%d" % _host_pid if _host_pid else b"h")
    if os.read(fifo, 1) != b"g":
        os._exit(125)


def wait_for_start(fds: tuple[int, int]) -> None:
    """mesobox-oci create (oci/runtime.py): the container is made and its command
    found; say "created" on ``ready`` and block until ``start`` writes a byte to the
    FIFO (held open read-write, so no EOF ever ends the wait early).  Signals are
    unblocked meanwhile: a ``kill`` of a created container reaches it at once."""
    fifo, ready = fds
    os.write(ready, b"c%d" % _host_pid if _host_pid else b"c")
    os.close(ready)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, signals.caller_sigmask or set())
    got = os.read(fifo, 1)  # EINTR is retried (PEP 475)
    _signal.pthread_sigmask(_signal.SIG_BLOCK, FORWARDED)
    os.close(fifo)
    if got != b"s":
        os._exit(125)


def set_rlimits(limits: tuple[tuple[str, int, int, int], ...]) -> None:
    """--ulimit: setrlimit(2) each; a refusal is the kernel's word, as one line."""
    import resource

    for name, number, soft, hard in limits:
        try:
            resource.setrlimit(number, (soft, hard))
        except (OSError, ValueError) as err:
            have_soft, have_hard = resource.getrlimit(number)

            def text(limit: int) -> str:
                return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)

            why = err.strerror if isinstance(err, OSError) else str(err)
            raise _launch_error(f"cannot set --ulimit {name}={text(soft)}:{text(hard)}: {why} "
                                f"(the limits here are {text(have_soft)}:{text(have_hard)})",
                                hint="only privileged processes may raise a hard limit: ask for at most "
                                     f"{text(have_hard)}") from None


def find_command(name: str, search: str) -> str:
    if "/" in name:
        if not os.path.lexists(name):
            raise _not_found(f"{name}: no such file in the container")
        return name
    for directory in search.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    for directory in search.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.exists(candidate):
            raise _not_executable(f"{name}: found {candidate} but it is not executable")
    raise _not_found(f"{name}: command not found in the container", hint=f"PATH inside is {search}")


def _switch_user(uid: int, gid: int, groups: tuple[int, ...], strict: bool = False) -> None:
    """Become ``uid``/``gid`` with exactly ``groups``; ``strict``: a refused setgroups is
    an error (real root's container), else the caller keeps its own groups."""
    try:
        try:
            os.setgroups(list(groups))
        except PermissionError:
            if strict:
                raise _launch_error("cannot set the container's supplementary groups: setgroups(2) was refused",
                                    hint="use --host-root to run as the host's root (not recommended)") from None
            # setgroups is denied in a single-id user namespace: an ordinary user keeps
            # their own groups (dropping one could bypass a negative permission).
        os.setgid(gid)
        os.setuid(uid)
    except OSError as err:
        raise _launch_error(f"cannot switch to uid {uid} gid {gid} inside: {err.strerror}",
                          hint="that id is not mapped: configure a range in /etc/subuid and /etc/subgid") from None


def _rearm_parent_death(parent: int) -> None:
    """PR_SET_PDEATHSIG(SIGKILL) again after a credential change, which clears it
    (prctl(2)): a supervised container must not outlive the supervisor that holds what
    it runs with (real root's id range, its cgroup).  A supervisor that died before this
    shows as a new parent pid."""
    sc.prctl(sc.PR_SET_PDEATHSIG, 9)
    if os.getppid() != parent:
        os._exit(137)


# --- OCI hooks ------------------------------------------------------------------------------

HOOK_KINDS = ("createContainer", "startContainer")
_container_id = "mesobox"  # the state's "id": set before the first hook, inherited by the workload's fork


def run_hooks(program: Program, stage: int) -> None:
    """Run the createContainer (``stage`` 0: first writes the bundle they read) or
    startContainer (1) hooks of the program, in order, each to its end; one that fails
    or outlives its timeout stops the launch with one line naming it (OCI config.md)."""
    global _container_id
    plan = program["hooks"]
    assert plan is not None
    bundle, (head, tail), create, start, states = plan
    pid = _proc_pid()
    if stage == 0:
        import json  # only a program with hooks gets here

        # mesobox-oci names its container; mesobox run names none: its first pid as the host sees it
        _container_id = program.get("container_id") or f"mesobox-{pid}"
        _write_bundle(bundle, head + json.dumps(list(program["env"])) + tail)
    state = states[stage].replace("\0", str(pid)).replace("\1", _container_id).encode()
    for hook in (create, start)[stage]:
        _run_hook(HOOK_KINDS[stage], hook, state)


def _proc_pid() -> int:
    """This process's pid as the /proc a hook sees names it (the state's "pid"): the
    host's before pivot_root, the container's after (a --pid container's differ)."""
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid()


def _write_bundle(bundle: str, config: str) -> None:
    """The state's bundle: a directory holding config.json, in the private workspace
    tmpfs (OCI runtime.md: hooks such as ``nvidia-ctk hook update-ldcache`` find the
    container's root in it)."""
    os.mkdir(bundle, 0o755)
    fd = os.open(os.path.join(bundle, "config.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, config.encode())
    finally:
        os.close(fd)


def _run_hook(kind: str, hook: tuple[str, tuple[str, ...], tuple[str, ...], int], state: bytes) -> None:
    """fork + execve(path, args, env exactly as given), the state JSON on its stdin and
    its stdout and stderr on ours; wait for it, up to its timeout."""
    path, args, env, timeout = hook
    stdin = os.memfd_create("mesobox-hook-state", os.MFD_CLOEXEC)  # never blocks, however long the state
    os.write(stdin, state)
    os.lseek(stdin, 0, os.SEEK_SET)
    err_r, err_w = os.pipe()  # close-on-exec: EOF once it has exec'd, an errno if it could not
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _exec_hook(path, args, env, stdin, err_w)
    try:  # noqa: SIM105 - contextlib costs an import; as the child does, whichever runs first
        os.setpgid(pid, pid)
    except OSError:
        pass  # it has exec'd already (EACCES), having made its group itself
    os.close(err_w)
    os.close(stdin)
    with os.fdopen(err_r, "rb") as pipe:
        exec_errno = pipe.read()
    status = _wait_hook(pid, timeout)
    name = f"{kind} hook {path}"
    if exec_errno:
        raise _launch_error(f"{name}: cannot execute: {os.strerror(int(exec_errno))}")
    if status is None:
        raise _launch_error(f"{name} did not finish within its timeout of {timeout} s: killed")
    if os.WIFSIGNALED(status):
        raise _launch_error(f"{name} was killed by signal {os.WTERMSIG(status)}")
    if os.waitstatus_to_exitcode(status) != 0:
        raise _launch_error(f"{name} failed with exit status {os.waitstatus_to_exitcode(status)}")


def _exec_hook(path: str, args: tuple[str, ...], env: tuple[str, ...], stdin: int, err_w: int) -> NoReturn:
    """The hook's child: its own process group (a timeout kills all of it), the
    caller's signal mask and default SIGPIPE, the runtime's capabilities in the
    container's user namespace kept across execve (as a rootless runtime's container
    root has them: nvidia-ctk's update-ldcache chroots), then execve."""
    code = 127
    try:
        os.dup2(stdin, 0)
        os.dup2(2, 1)
        os.setpgid(0, 0)
        _ambient_capabilities()
        _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, signals.caller_sigmask or set())
        os.execve(path, list(args), dict(item.split("=", 1) for item in env))  # noqa: S606 - a hook the spec names
    except OSError as err:
        os.write(err_w, str(err.errno or 5).encode())
    except BaseException:
        os.write(err_w, b"5")
    os._exit(code)


def _ambient_capabilities() -> None:
    """A hook keeps the container namespace's capabilities across execve though its
    uid is not 0 (syscalls.raise_ambient_capabilities)."""
    sc.raise_ambient_capabilities()


def _wait_hook(pid: int, timeout: int) -> int | None:
    """The hook's wait status, or None after killing its process group at the timeout
    (0: none).  Polled: SIGCHLD is blocked here and pidfds are Linux 5.3 and later."""
    if not timeout:
        return os.waitpid(pid, 0)[1]
    import time

    end = time.monotonic() + timeout
    pause = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= end:
            try:
                os.killpg(pid, 9)
            except OSError:
                os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


# --- signals at exec ----------------------------------------------------------------------


def exec_pipe() -> tuple[int, int]:
    """A pipe whose write end only the workload keeps: EOF on the read end once it has
    exec'd (both ends close-on-exec, PEP 446)."""
    global _exec_fd
    r, w = os.pipe()
    _exec_fd = w
    return r, w


def close_exec_fd() -> None:
    global _exec_fd
    if _exec_fd is not None:
        os.close(_exec_fd)
        _exec_fd = None


def _signals_for_exec() -> None:
    """Right before execve: give the workload the caller's mask.  A signal already
    pending here (only if nobody supervises) would hit the workload before its own
    handlers exist, so a forwarder is forked first: the child starts with none pending
    (fork(2)) and the parent delivers them once the workload is ready — even a tty's
    ^C, which came before the workload existed to get its own copy."""
    if _exec_fd is None and set(FORWARDED) & _signal.sigpending():
        queued = []
        while (info := _signal.sigtimedwait(FORWARDED, 0)) is not None:
            queued.append(info.si_signo)
        r, _w = exec_pipe()
        pid = os.fork()
        if pid:
            from mesobox.launch.forwarding import wait_forwarding

            close_exec_fd()
            os._exit(wait_forwarding(pid, r, queued=tuple(queued)))
        os.close(r)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, signals.caller_sigmask or set())
