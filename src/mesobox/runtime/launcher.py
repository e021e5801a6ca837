"""Launcher room: one linear, commented sequence from a validated Spec to execve.

The order follows bubblewrap's: check ids → (shared squashfs mount, supervisor fork
when something must outlive the container's start) → unshare → id maps → make /
slave → tmpfs workspace → root → mounts → pivot_root → drop the old root → chdir →
hostname/loopback → user switch → no_new_privs → seccomp (last) → exec.

Invariants:
- Without a reason to stay (a cgroup, slirp4netns, a newuidmap helper, real root's
  maps, or a shared squashfs lease that no watcher looks after: squashfs_linger = 0),
  mesobox *becomes* the workload by exec: signals sent to mesobox (Slurm's walltime
  warning, scancel) reach it with no forwarding at all.  A squashfs lease with a
  watcher is held by the workload's own pid and start time (squashmount.py).
- Otherwise the supervising parent stays outside every namespace, forwards
  ``FORWARDED`` signals, and cleans up (lease, cgroup, slirp) after the child exits;
  the child dies with it (PR_SET_PDEATHSIG).  With ``--pid`` the container's pid 1 is
  mesobox's minimal init: it reaps every orphan and forwards the same signals.
- Exit status is the workload's, or 128+N when signal N killed it; a failure in a
  forked child is reported as one ``mesobox: error:`` line with the error's exit code.
- Signals never kill mesobox while it sets the container up: ``FORWARDED`` (and
  SIGCHLD) are blocked (pthread_sigmask(3)) as soon as the CLI has read a launching
  verb, and at the latest at the start of ``launch``, so one that arrives early stays
  pending.  Only the interpreter's own start-up, before any mesobox code runs, is
  unprotected.  Forwarders take them with sigwaitinfo(2) only once the
  workload has exec'd (EOF on a close-on-exec pipe) and, for the first ``HOLD_S``
  seconds, only once the workload catches, ignores or blocks that signal (its
  /proc/PID/status masks): an early Slurm ``--signal=USR1@T`` meets the job's trap
  instead of killing it half-started.  The workload execs with the caller's mask.
- A signal the terminal sent (si_code SI_KERNEL) to its foreground process group is
  not forwarded: the container is in that group and got its own copy (no double ^C).
"""

from __future__ import annotations

import os
import sys

from mesobox import runtime
from mesobox.errors import CommandNotExecutable, CommandNotFound, LaunchError, MesoboxError
from mesobox.runtime import FORWARDED, SIGCHLD, hold_signals
from mesobox.runtime import syscalls as sc
from mesobox.runtime.spec import ANN_FORMAT, ANN_OVERLAY, ANN_OVERLAY_IMAGE, ANN_SUBIDS, ANN_WRITABLE_TMPFS, Spec

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal  # the C half of `signal`: the same calls, without its enum import (≈3 ms)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

    from mesobox.config import Config

_SI_KERNEL = 0x80  # siginfo si_code of a signal the kernel (a tty) generated (sigaction(2))
_TTY_SIGNALS = (2, 3, 28)  # ^C ^\ and resizes go to the whole foreground process group
HOLD_S = 1.0  # longest an early signal waits for the workload's handler
_exec_fd: int | None = None  # write end of the "workload exec'd" pipe (close-on-exec)
ANN_NET = "org.mesobox.net"  # "none" | "slirp"
ANN_PUBLISH = "org.mesobox.publish"  # "HOST:CONTAINER,…"
_NS_FLAGS = {"user": sc.CLONE_NEWUSER, "mount": sc.CLONE_NEWNS, "pid": sc.CLONE_NEWPID,
             "ipc": sc.CLONE_NEWIPC, "uts": sc.CLONE_NEWUTS, "network": sc.CLONE_NEWNET}


def launch(spec: Spec, config: Config) -> int:
    """Run the container; returns the exit status (or never returns: exec)."""
    from mesobox.runtime.identity import check_ids

    spec.validate()  # the whole spec, before the first syscall
    block_signals()
    check_ids()  # never setuid: real == effective == saved
    lease = None
    image_dir = spec.root.path
    _reap_stale_mounts(config)
    if spec.annotations.get(ANN_FORMAT) == "squashfs":
        from mesobox.runtime import squashmount

        # Mounted in the initial mount namespace so every rank on the node shares it.
        lease = squashmount.acquire(config, spec.root.path)
        image_dir = lease.mountpoint
    # A watched lease needs nobody to wait: its ref is this pid and start time, which
    # the workload keeps across execve, and the key's watcher drops it once the
    # workload is gone.  Without a linger there is no watcher: the supervisor releases.
    # A map of more than one's own id must be written from the parent user namespace
    # (user_namespaces(7)): root's full identity map needs the supervisor too.
    supervised = ((lease is not None and not lease.watched) or spec.linux.resources is not None
                  or os.getuid() == 0 or spec.annotations.get(ANN_NET) == "slirp"
                  or spec.annotations.get(ANN_SUBIDS) == "1")
    if not supervised:
        _unshare(spec)
        from mesobox.runtime.identity import write_own_maps

        write_own_maps(spec.linux.uid_mappings, spec.linux.gid_mappings, privileged=os.getuid() == 0)
        _container(spec, config, image_dir)  # never returns
    try:
        return _supervise(spec, config, image_dir)
    finally:
        if lease is not None:
            lease.release()


def _reap_stale_mounts(config: Config) -> None:
    """A SIGKILLed supervisor leaves its shared squashfs mount behind, a killed watcher
    a lingering one: the next launch of any image reaps them (a key whose watcher lives
    is left to it).  Only a live or stale lease leaves a ``.refs`` file and only a
    lingering mount an ``.idle`` stamp, so with neither this is one listdir."""
    shared = os.path.join(config.runtime_dir_str, "mnt")
    try:
        names = os.listdir(shared)
    except OSError:
        return
    if any(name.endswith((".refs", ".idle")) for name in names):
        from mesobox.runtime.squashmount import reap_stale

        reap_stale(shared, config.squashfs_linger)


def _userns_last(spec: Spec) -> bool:
    """Real root: set up with real privileges, enter the user namespace last (identity.py)."""
    from mesobox.runtime.identity import enters_userns_last

    return enters_userns_last()


def _unshare(spec: Spec) -> None:
    flags = 0
    for ns in spec.linux.namespaces:
        flags |= _NS_FLAGS.get(ns, 0)
    if _userns_last(spec):
        flags &= ~sc.CLONE_NEWUSER  # entered last, in _exec: set-up runs as real root
    try:
        sc.unshare(flags)
    except OSError as err:
        hint = None
        if err.errno in (1, 28, 38):  # EPERM, ENOSPC, ENOSYS
            hint = ("unprivileged user namespaces are restricted on this host: ask the admin to set "
                    "kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0")
        raise LaunchError(f"cannot create namespaces: {err.strerror}", hint=hint) from None


# --- supervisor (outside every namespace) ------------------------------------------------


def _supervise(spec: Spec, config: Config, image_dir: str) -> int:
    ready_r, ready_w = os.pipe()  # child → parent: "namespaces exist"
    go_r, go_w = os.pipe()  # parent → child: "maps written, cgroup joined, network up"
    exec_r, exec_w = _exec_pipe()  # EOF here: the workload has exec'd (or died)
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        os.close(exec_r)
        _in_child(lambda: _supervised_child(spec, config, image_dir, ready_w, go_r))
    os.close(ready_w)
    os.close(go_r)
    os.close(exec_w)
    cleanups: list[Callable[[int], None]] = []
    try:
        if os.read(ready_r, 1) != b"u":  # the child failed before unsharing: it said why
            return _wait_status(pid)
        cleanups = _outside_setup(spec, pid)
        os.write(go_w, b"g")
    except BaseException:
        os.kill(pid, 9)
        _wait_status(pid)
        os.close(exec_r)
        for fn in cleanups:
            fn(137)
        raise
    finally:
        os.close(ready_r)
        os.close(go_w)
    status = wait_forwarding(pid, exec_r)
    for fn in cleanups:
        fn(status)
    return status


def _supervised_child(spec: Spec, config: Config, image_dir: str, ready_w: int, go_r: int) -> NoReturn:
    sc.prctl(sc.PR_SET_PDEATHSIG, 9)  # the container never outlives its supervisor
    _unshare(spec)
    os.write(ready_w, b"u")
    os.close(ready_w)
    if os.read(go_r, 1) != b"g":
        os._exit(125)  # the supervisor failed and has reported it
    os.close(go_r)
    _container(spec, config, image_dir)


def _outside_setup(spec: Spec, pid: int) -> list[Callable[[int], None]]:
    """Id maps (newuidmap for sub-id ranges), cgroup, slirp4netns for ``pid``."""
    from mesobox.runtime import identity

    if spec.annotations.get(ANN_SUBIDS) == "1":
        for tool, maps in (("newuidmap", spec.linux.uid_mappings), ("newgidmap", spec.linux.gid_mappings)):
            _run_helper(identity.newidmap_argv(tool, pid, maps))
    elif not _userns_last(spec):
        _write_child_maps(spec, pid)
    cleanups: list[Callable[[int], None]] = []
    if spec.linux.resources is not None:
        cleanups.append(_join_cgroup(spec, pid))
    if spec.annotations.get(ANN_NET) == "slirp":
        from mesobox.runtime.network import Slirp

        ports = [tuple(int(x) for x in p.split(":")) for p in spec.annotations.get(ANN_PUBLISH, "").split(",") if p]
        slirp = Slirp.start(pid, ports)  # type: ignore[arg-type]
        cleanups.append(lambda _status: slirp.stop())
    return cleanups


def _write_child_maps(spec: Spec, pid: int) -> None:
    from mesobox.runtime.identity import map_text

    try:
        if os.getuid() != 0:
            with open(f"/proc/{pid}/setgroups", "w") as f:
                f.write("deny")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(map_text(spec.linux.uid_mappings))
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(map_text(spec.linux.gid_mappings))
    except OSError as err:
        raise LaunchError(f"cannot write the container's id maps: {err.strerror}") from None


def _run_helper(argv: list[str]) -> None:
    import subprocess

    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LaunchError(f"{os.path.basename(argv[0])} failed: {proc.stderr.strip()[:200]}",
                          hint="check your ranges in /etc/subuid and /etc/subgid")


def _join_cgroup(spec: Spec, pid: int) -> Callable[[int], None]:
    try:
        from mesobox.runtime.cgroups import apply_resources
    except ImportError:
        raise LaunchError("resource limits were asked for but this mesobox has no cgroup support") from None
    cg = apply_resources(pid, spec.linux.resources, f"mesobox-{os.getpid()}")

    def cleanup(status: int) -> None:
        if status == 137 and spec.linux.resources.memory_bytes is not None:
            try:
                if cg.usage().oom_kills:
                    sys.stderr.write("mesobox: the container was killed: out of memory (its --memory limit)\n")
            except OSError:
                pass
        cg.remove()

    return cleanup


# --- waiting ------------------------------------------------------------------------------


def exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _wait_status(pid: int) -> int:
    while True:
        try:
            return exit_status(os.waitpid(pid, 0)[1])
        except ChildProcessError:
            return 125


def block_signals() -> None:
    """Hold every forwarded signal (and SIGCHLD) pending from here on: none kills a
    half-built container; forwarders take them with sigwaitinfo(2)."""
    hold_signals()


def _exec_pipe() -> tuple[int, int]:
    global _exec_fd
    r, w = os.pipe()  # both close-on-exec (PEP 446)
    _exec_fd = w
    return r, w


def _close_exec_fd() -> None:
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
        r, _w = _exec_pipe()
        pid = os.fork()
        if pid:
            _close_exec_fd()
            os._exit(wait_forwarding(pid, r, queued=tuple(queued)))
        os.close(r)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, runtime.caller_sigmask or set())


def _reaped(pid: int, everyone: bool) -> int | None:
    """The exit status of ``pid`` if it has ended; with ``everyone`` (pid 1) reap orphans too."""
    while True:
        try:
            got, status = os.waitpid(-1 if everyone else pid, os.WNOHANG)
        except ChildProcessError:
            return 125
        if got == pid:
            return exit_status(status)
        if got == 0:
            return None


def _ready_for(pid: int, signum: int, until: float) -> None:
    """Wait (≤ ``until``) until ``pid`` catches, ignores or blocks ``signum``: a shell
    sets its trap a few hundred µs after execve (proc(5) SigBlk/SigIgn/SigCgt)."""
    import time

    bit, delay = 1 << (signum - 1), 0.0005
    while time.monotonic() < until:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":\t", 1) for line in f if ":\t" in line)
        except OSError:
            return
        if fields.get("State", "Z").startswith("Z"):
            return
        if any(int(fields.get(k, "0"), 16) & bit for k in ("SigBlk", "SigIgn", "SigCgt")):
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def wait_forwarding(pid: int, exec_r: int | None = None, everyone: bool = False,
                    queued: tuple[int, ...] = ()) -> int:
    """Wait for ``pid``, passing on the signals a batch system sends.  With ``exec_r``
    nothing is passed on before the workload has exec'd (EOF): until then they queue.
    ``queued`` are signals taken earlier, passed on first whoever sent them."""
    import time

    block_signals()  # sigwaitinfo needs them blocked, or SIGCHLD is just discarded
    if exec_r is not None:
        os.read(exec_r, 1)
        os.close(exec_r)
    hold_until = time.monotonic() + HOLD_S
    for signum in queued:
        _ready_for(pid, signum, hold_until)
        _kill(pid, signum)
    while True:
        status = _reaped(pid, everyone)
        if status is not None:
            return status
        info = _signal.sigwaitinfo((*FORWARDED, SIGCHLD))
        signum = info.si_signo
        if signum == SIGCHLD or (info.si_code == _SI_KERNEL and signum in _TTY_SIGNALS):
            continue  # a tty signal: the container, in the same foreground group, has it
        _ready_for(pid, signum, hold_until)
        _kill(pid, signum)


def _kill(pid: int, signum: int) -> None:
    try:  # noqa: SIM105 - contextlib is not worth its import on the hot path
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _init(workload: int) -> NoReturn:
    """pid 1 of a --pid container: forward signals, reap orphans, exit like the workload."""
    os._exit(wait_forwarding(workload, everyone=True))


def _in_child(body: Callable[[], Any]) -> NoReturn:
    """Run a forked child's body; any error becomes one line and its exit code."""
    code = 125
    try:
        body()
    except MesoboxError as err:
        sys.stderr.write(f"mesobox: error: {err.message}\n")
        if err.hint:
            sys.stderr.write(f"mesobox: hint: {err.hint}\n")
        code = err.exit_code
    except OSError as err:
        sys.stderr.write(f"mesobox: error: {err}\n")
    except Exception as err:  # a bug: still one line (the parent has its own --debug)
        sys.stderr.write(f"mesobox: error: internal: {type(err).__name__}: {err}\n")
    finally:
        sys.stderr.flush()
        os._exit(code)


# --- inside the namespaces -----------------------------------------------------------------


def _preload(spec: Spec, config: Config) -> bytes | None:
    """Load, before pivot_root hides the host's files, what runs after it; returns the
    compiled seccomp program (read from the per-user cache, or compiled with libseccomp
    and cached) for _exec.  Signal handling needs only builtin modules."""
    if spec.process.capabilities and spec.process.capabilities.get("bounding"):
        import mesobox.runtime.caps  # noqa: F401 - _exec uses it after pivot_root
    if spec.linux.seccomp is None:
        return None
    from mesobox.runtime.seccomp import prepare

    profile = None if spec.linux.seccomp.get("mesobox.builtin") else spec.linux.seccomp
    return prepare(profile, os.path.join(config.runtime_dir_str, "seccomp"))


def _container(spec: Spec, config: Config, image_dir: str) -> NoReturn:
    program = _preload(spec, config)
    if "pid" in spec.linux.namespaces:
        # unshare(CLONE_NEWPID) puts the *next child* in the new pid namespace as pid 1.
        pid = os.fork()
        if pid:
            _close_exec_fd()  # only the workload holds it: its execve closes it
            os._exit(wait_forwarding(pid))
        _in_child(lambda: _container_init(spec, config, image_dir, program))
    _setup_root(spec, config, image_dir)
    _exec(spec, program)


def _container_init(spec: Spec, config: Config, image_dir: str, program: bytes | None) -> None:
    sc.prctl(sc.PR_SET_PDEATHSIG, 9)
    _setup_root(spec, config, image_dir)
    workload = os.fork()
    if workload == 0:
        _in_child(lambda: _exec(spec, program))
    _close_exec_fd()
    _init(workload)


def _setup_root(spec: Spec, config: Config, image_dir: str) -> None:
    from mesobox.runtime import mounts, plan

    # Slave, not private: host mounts made later (automounted home, Lustre) still show up,
    # and nothing we mount leaks back (mount_namespaces(7), bubblewrap does the same).
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    workspace = _workspace(spec, config, image_dir)
    image = spec.annotations.get(ANN_OVERLAY_IMAGE)
    if image:  # disk-quota overlay: loop-mounted here, gone with this mount namespace
        from mesobox.runtime.quota import mount_image

        mount_image(image, os.path.join(workspace, "ovl"))
        spec = spec.replace(annotations={**spec.annotations, ANN_OVERLAY: os.path.join(workspace, "ovl")})
    ops = plan.mount_ops(spec, workspace)
    before, after = plan.root_ops(spec, image_dir, workspace, plan.skeletons(ops, image_dir))
    root = os.path.join(workspace, "root")
    mounts.apply_all([*before, *ops, *after], root, config.debug)
    if "network" in spec.linux.namespaces:
        from mesobox.runtime.network import setup_loopback

        setup_loopback()  # before pivot_root: it imports socket/fcntl from the host's stdlib
    _pivot(root)
    if spec.hostname is not None:
        sc.sethostname(spec.hostname)
    try:
        os.chdir(spec.process.cwd)
    except OSError:
        raise LaunchError(f"working directory {spec.process.cwd} does not exist in the container",
                          hint="choose another with -w/--workdir") from None


def _workspace(spec: Spec, config: Config, image_dir: str) -> str:
    """A tmpfs private to this mount namespace: new root mount point, passwd/group,
    overlay upper layers.  The same path serves every container (each sees its own)."""
    workspace = os.path.join(config.runtime_dir_str, "ws")
    runtime.private_dirs(workspace)
    sc.mount("tmpfs", workspace, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=755,size=16m")
    for sub in ("root", "etc"):
        os.makedirs(os.path.join(workspace, sub))
    size = spec.annotations.get(ANN_WRITABLE_TMPFS)
    if size is not None:
        scratch = os.path.join(workspace, "rw")
        os.mkdir(scratch)
        # The size cap is the disk quota of --writable-tmpfs: writes past it get ENOSPC.
        sc.mount("tmpfs", scratch, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
                 "mode=755" + (f",size={size}" if size != "0" else ""))
        os.makedirs(scratch + "/upper", mode=0o755)
        os.makedirs(scratch + "/work")
    persistent = spec.annotations.get(ANN_OVERLAY)
    if persistent:
        for sub in ("upper", "work"):
            os.makedirs(os.path.join(persistent, sub), exist_ok=True)
    _write_identity(spec, workspace, image_dir)
    return workspace


def _write_identity(spec: Spec, workspace: str, image: str) -> None:
    from mesobox.runtime import identity
    from mesobox.runtime.mounts import read_beneath

    ann = spec.annotations
    user = spec.process.user
    passwd = identity.passwd_text(read_beneath(image, "etc/passwd"), ann.get("org.mesobox.user", "user"),
                                  user.uid, user.gid, ann.get("org.mesobox.home", "/"),
                                  ann.get("org.mesobox.shell", "/bin/sh"))
    group = identity.group_text(read_beneath(image, "etc/group"), ann.get("org.mesobox.group", "group"),
                                user.gid, ann.get("org.mesobox.user", "user"))
    for name, text in (("passwd", passwd), ("group", group)):
        with open(os.path.join(workspace, "etc", name), "w") as f:
            f.write(text)


def _pivot(root: str) -> None:
    # pivot_root(".", ".") stacks the old root on the new one; detaching "." then drops
    # it without needing a put_old directory in the image (pivot_root(2), NOTES).
    os.chdir(root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


def _exec(spec: Spec, program: bytes | None) -> NoReturn:
    proc = spec.process
    env = dict(item.split("=", 1) for item in proc.env)
    path = _find_command(proc.args[0], env.get("PATH", ""))
    if _userns_last(spec):
        from mesobox.runtime import identity

        identity.enter_userns(spec.linux.uid_mappings, spec.linux.gid_mappings, sc.unshare,
                                      sc.CLONE_NEWUSER)
    if proc.capabilities is not None:
        keep = frozenset[int]()
        if proc.capabilities.get("bounding"):
            from mesobox.runtime.caps import numbers

            keep = numbers(proc.capabilities["bounding"])
        # Before the user switch: dropping from the bounding set needs CAP_SETPCAP.
        sc.drop_capabilities(keep)
    if (proc.user.uid, proc.user.gid) != (os.getuid(), os.getgid()):
        _switch_user(proc.user.uid, proc.user.gid, proc.user.additional_gids)
    if proc.no_new_privileges:
        # No setuid/file-capability gain across execve from here on (prctl(2)).
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    if program is not None:
        from mesobox.runtime.seccomp import install  # loaded by _preload: no file access

        # Last: the runtime's own setup syscalls are never filtered (runc, bubblewrap).
        install(program)
    sys.stdout.flush()
    sys.stderr.flush()
    _signals_for_exec()
    try:
        os.execve(path, list(proc.args), env)  # noqa: S606 - exec'ing the user's command is the point
    except FileNotFoundError:  # e.g. a script whose #! interpreter is missing
        raise CommandNotFound(f"{proc.args[0]}: cannot execute: interpreter or loader not found") from None
    except OSError as err:
        raise CommandNotExecutable(f"{proc.args[0]}: cannot execute: {err.strerror}") from None


def _find_command(name: str, search: str) -> str:
    if "/" in name:
        if not os.path.lexists(name):
            raise CommandNotFound(f"{name}: no such file in the container")
        return name
    for directory in search.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    for directory in search.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.exists(candidate):
            raise CommandNotExecutable(f"{name}: found {candidate} but it is not executable")
    raise CommandNotFound(f"{name}: command not found in the container", hint=f"PATH inside is {search}")


def _switch_user(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    try:
        try:  # noqa: SIM105
            os.setgroups(list(groups))
        except PermissionError:
            pass  # setgroups is denied in a single-id user namespace; nothing to drop
        os.setgid(gid)
        os.setuid(uid)
    except OSError as err:
        raise LaunchError(f"cannot switch to uid {uid} gid {gid} inside: {err.strerror}",
                          hint="that id is not mapped: configure a range in /etc/subuid and /etc/subgid") from None
