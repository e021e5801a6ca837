"""Launcher room: from a validated Spec to a running container, supervised or not.

The order follows bubblewrap's: check ids → (shared squashfs mount) → compile the
launch program (execute.py: every decision taken, as plain data) → (supervisor fork
when something must outlive the container's start) → unshare → id maps → execute the
program (root, mounts, pivot_root, capabilities, no_new_privs, seccomp, execve).

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
- The program is compiled before the first namespace exists: a planning error (a mount
  point missing in a bind, an unreadable profile) is one ``mesobox: error:`` line from
  the CLI, and an unsupervised launch hands the program to the plan cache
  (plancache.py) so that the next identical launch skips the compiling.
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

from mesobox import paths
from mesobox.errors import LaunchError
from mesobox.launch import execute
from mesobox.launch import syscalls as sc
from mesobox.launch.forwarding import block_signals, exit_status, wait_forwarding
from mesobox.oci.spec import Resources, Spec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from mesobox.config import Config
    from mesobox.launch.program import Program


def launch(spec: Spec, config: Config) -> int:
    """Run the container; returns the exit status (or never returns: exec)."""
    spec.validate()  # the whole spec, before the first syscall
    block_signals()
    execute.check_ids()  # never setuid: real == effective == saved
    lease = None
    image_dir = spec.root.path
    # Mounts, workspace and caches go below it: refused unless it is ours alone.
    paths.runtime_dir(config.runtime_dir_str)
    execute.reap_stale_mounts(config.runtime_dir_str, config.squashfs_linger)
    nested = spec.mesobox.root_format == "squashfs" and _in_user_namespace()
    if nested:
        # Inside a container no setuid fusermount3 works: the image is mounted in
        # namespaces of this launch's own, and the container is made below them.
        from mesobox.launch import fusemount

        image_dir = fusemount.nested_image(spec.root.path, config.runtime_dir_str)
    elif spec.mesobox.root_format == "squashfs":
        from mesobox.launch import squashmount

        # Mounted in the initial mount namespace so every rank on the node shares it.
        lease = squashmount.acquire(config, spec.root.path)
        image_dir = lease.mountpoint
        from mesobox.launch import probe

        probe.pin(image_dir)
    # A watched lease needs nobody to wait: its ref is this pid and start time, which
    # the workload keeps across execve, and the key's watcher drops it once the
    # workload is gone.  Without a linger there is no watcher: the supervisor releases.
    # A map of more than one's own id must be written from the parent user namespace
    # (user_namespaces(7)): root's full identity map needs the supervisor too.
    supervised = ((lease is not None and not lease.watched) or spec.linux.resources is not None
                  or (os.getuid() == 0 and "user" in spec.linux.namespaces and not _own_maps_only(spec))
                  or spec.mesobox.net == "slirp" or spec.mesobox.subids)
    try:
        from mesobox.launch.program import compile_program

        program = compile_program(spec, config, image_dir)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    execute.hold_image(program)
    if not supervised and not nested:
        # A nested image's mount is no part of the program; a created OCI container's
        # start FIFO is this launch's alone: neither is saved for the next launch.
        if spec.mesobox.start_fifo is None:
            from mesobox.launch import plancache

            plancache.save(program, config)
        execute.run(program)  # never returns
    try:
        return _supervise(spec, program)
    finally:
        if lease is not None:
            lease.release()


def _own_maps_only(spec: Spec) -> bool:
    """An OCI container of real root's whose config maps ids outside root's pool: the
    container's process enters its user namespace itself (a forked helper writes the
    maps), with no slice to hold, so it needs no supervisor and is what `state` names."""
    if spec.mesobox.start_fifo is None:
        return False
    from mesobox.launch import identity

    return identity.is_real_root() and not identity.in_root_pool(spec.linux.uid_mappings, spec.linux.gid_mappings)


def _in_user_namespace() -> bool:
    """Inside a user namespace (a container: mesobox in mesobox), where no setuid
    helper such as fusermount3 works (fusemount.py).  Read here, not imported: every
    rank launching a squashfs image asks."""
    try:
        with open("/proc/self/uid_map", "rb") as f:
            return f.read().split() != [b"0", b"0", b"4294967295"]
    except OSError:
        return False


# --- supervisor (outside every namespace) ------------------------------------------------


def _supervise(spec: Spec, program: Program) -> int:
    execute.record_launch(program)
    if program["enter_userns"] is not None:
        program = _with_held_slice(program)
    ready_r, ready_w = os.pipe()  # child → parent: "namespaces exist"
    go_r, go_w = os.pipe()  # parent → child: "maps written, cgroup joined, network up"
    exec_r, exec_w = execute.exec_pipe()  # EOF here: the workload has exec'd (or died)
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        os.close(exec_r)
        execute.in_child(lambda: _supervised_child(program, ready_w, go_r))
    os.close(ready_w)
    os.close(go_r)
    os.close(exec_w)
    cleanups: list[Callable[[int], None]] = []
    try:
        ready = os.read(ready_r, 1)
        if ready not in (b"u", b"j"):  # the child failed before unsharing: it said why
            return _wait_status(pid)
        # "j": it joined the node's shared user namespace, whose maps are written already.
        cleanups = _outside_setup(spec, program, pid, write_maps=ready == b"u")
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


def _with_held_slice(program: Program) -> Program:
    """Real root's program, running with the id slice this supervisor holds for the
    container's life (identity.launch_maps): a bundle's config.json may name a slice
    that its writer released long ago, and another root container may have it now."""
    from mesobox.launch import identity

    enter = program["enter_userns"]
    assert enter is not None  # only real root's programs enter the user namespace last
    uid_maps, gid_maps = enter
    held = identity.launch_maps(uid_maps, gid_maps)
    if held == (uid_maps, gid_maps):
        return program
    return {**program, "enter_userns": held, "uid_map": identity.map_text(held[0]),
            "gid_map": identity.map_text(held[1])}


def _supervised_child(program: Program, ready_w: int, go_r: int) -> NoReturn:
    sc.prctl(sc.PR_SET_PDEATHSIG, 9)  # the container never outlives its supervisor

    def ready(created: bool) -> None:
        """Tell the supervisor, and wait until it has written the maps (of a namespace
        this child created), joined the cgroup, started the network."""
        os.write(ready_w, b"u" if created else b"j")
        os.close(ready_w)
        if os.read(go_r, 1) != b"g":
            os._exit(125)  # the supervisor failed and has reported it
        os.close(go_r)

    if program.get("share_userns"):
        program = execute.enter_shared_userns(program, ready)
    else:
        execute.join_namespaces(program)
        execute.unshare(program["flags"])
        ready(bool(program["flags"] & sc.CLONE_NEWUSER) or program["enter_userns"] is not None)
    execute.container(program)


def _outside_setup(spec: Spec, program: Program, pid: int, write_maps: bool = True) -> list[Callable[[int], None]]:
    """Id maps (newuidmap for sub-id ranges; none for a joined namespace), cgroup,
    slirp4netns for ``pid``."""
    from mesobox.launch import identity

    if not write_maps:
        pass
    elif spec.mesobox.subids:
        for tool, maps in (("newuidmap", spec.linux.uid_mappings), ("newgidmap", spec.linux.gid_mappings)):
            _run_helper(identity.newidmap_argv(tool, pid, maps))
    elif program["enter_userns"] is None:
        _write_child_maps(program, pid)
    cleanups: list[Callable[[int], None]] = []
    if spec.linux.resources is not None:
        cleanups.append(_join_cgroup(spec.linux.resources, pid))
    if spec.mesobox.net == "slirp":
        from mesobox.isolation.network import Slirp

        slirp = Slirp.start(pid, list(spec.mesobox.publish))
        cleanups.append(lambda _status: slirp.stop())
    return cleanups


def _write_child_maps(program: Program, pid: int) -> None:
    try:
        if os.getuid() != 0:
            sc.write_file(f"/proc/{pid}/setgroups", "deny")
        sc.write_file(f"/proc/{pid}/uid_map", program["uid_map"])
        sc.write_file(f"/proc/{pid}/gid_map", program["gid_map"])
    except OSError as err:
        raise LaunchError(f"cannot write the container's id maps: {err.strerror}") from None


def _run_helper(argv: list[str]) -> None:
    import subprocess

    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LaunchError(f"{os.path.basename(argv[0])} failed: {proc.stderr.strip()[:200]}",
                          hint="check your ranges in /etc/subuid and /etc/subgid")


def _join_cgroup(resources: Resources, pid: int) -> Callable[[int], None]:
    from mesobox.isolation.cgroups import apply_resources

    cg = apply_resources(pid, resources, f"mesobox-{os.getpid()}")

    def cleanup(status: int) -> None:
        if status == 137 and resources.memory_bytes is not None:
            try:
                if cg.usage().oom_kills:
                    sys.stderr.write("mesobox: the container was killed: out of memory (its --memory limit)\n")
            except OSError:
                pass
        cg.remove()

    return cleanup


# --- waiting ------------------------------------------------------------------------------


def _wait_status(pid: int) -> int:
    while True:
        try:
            return exit_status(os.waitpid(pid, 0)[1])
        except ChildProcessError:
            return 125
