"""mesobox-oci's operations: the OCI lifecycle (runtime-spec runtime.md) over mesobox's launcher.

``create`` reads config.json once, claims ``ROOT/ID`` (oci/state.py), makes real
root's container cgroup (oci/cgroups.py) and its exec.fifo, and forks the container's
process, which joins the cgroup, becomes a session leader and runs the launcher
(launch/launcher.launch) with the spec's ``start_fifo`` set.  Before pivot_root that
process says "h" on a pipe and waits on the FIFO while ``create`` records it and runs
the prestart and createRuntime hooks; then it goes on (createContainer hooks,
pivot_root, the command looked up), says "created" and blocks on the FIFO right
before execve (launch/execute.py ``wait_for_start``).  ``create`` writes
``--pid-file`` and returns.  ``start`` writes one byte to the FIFO, removes it and
runs the poststart hooks; ``delete`` empties and removes the cgroup and the state and
runs the poststop hooks.  There is no monitor process: the status is derived from the
pid (oci/state.py), and the container's process is reparented to whoever reaps
orphans (conmon as a subreaper, or init).

The pid recorded is the container's own process: the process ``create`` forked, or
with a pid namespace the workload, pid 1 there, which reports its host pid with "h"
and "c".  Where the launcher must stay outside (a rootless user's cgroup,
slirp4netns, newuidmap's maps, real root's id slice) it is the launcher's supervisor,
which exits with the workload's status and passes on the signals it gets.

Deviation, said in docs/oci.md: createContainer and startContainer hooks read the
bundle mesobox generates in the container's workspace.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mesobox.config import Config
from mesobox.errors import LaunchError, MesoboxError, UsageError
from mesobox.oci.state import RUNTIME_HOOKS, Container, list_ids, new_record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

PR_SET_CHILD_SUBREAPER = 36  # prctl(2)
CREATED_TIMEOUT_S = 600.0  # the longest create waits for the container's set-up (a squashfs mount, hooks)
GONE_TIMEOUT_S = 10.0  # the longest delete --force waits for a SIGKILLed container to be gone


class Runtime:
    """The global options: where the state lives, and the launcher's configuration."""

    def __init__(self, root: str, config: Config, systemd_cgroup: bool = False) -> None:
        self.root = root
        self.config = config
        self.systemd_cgroup = systemd_cgroup  # cgroupsPath is "slice:prefix:name" (runc --systemd-cgroup)

    def container(self, container_id: str) -> Container:
        return Container(self.root, container_id)


# --- create / start / run ------------------------------------------------------------------


class Loaded:
    """config.json, read once: the Spec the launcher runs, the runtime's own hooks,
    the annotations, and (real root) the container's cgroup, made with its limits."""

    def __init__(self, spec: Any, hooks: dict[str, Any], annotations: dict[str, str], cgroup: Any = None,
                 resources: dict[str, Any] | None = None) -> None:
        self.spec, self.hooks, self.annotations = spec, hooks, annotations
        self.cgroup, self.resources = cgroup, resources

    def record(self) -> dict[str, Any]:
        """What state.json keeps of the cgroup: where it is, what create made, its limits."""
        if self.cgroup is None:
            return {}
        return {"cgroup": {"dirs": self.cgroup.dirs, "created": self.cgroup.created, "resources": self.resources}}

    def drop_cgroup(self) -> None:
        if self.cgroup is not None:
            import contextlib

            with contextlib.suppress(MesoboxError):
                self.cgroup.remove()


def systemd_path(cgroups_path: str | None, container_id: str) -> str:
    """runc --systemd-cgroup's "slice:prefix:name" as the directory systemd would give
    it (SLICE/PREFIX-NAME.scope; a nested slice a-b.slice below a.slice), made on the
    cgroup filesystem directly: mesobox-oci does not ask systemd over D-Bus."""
    slice_, _, rest = (cgroups_path or "").partition(":")
    prefix, _, name = rest.partition(":")
    if not cgroups_path or not name or "/" in cgroups_path:
        raise UsageError(f"--systemd-cgroup: cgroupsPath {cgroups_path!r} is not slice:prefix:name",
                         hint="e.g. system.slice:mesobox:ID, or drop --systemd-cgroup")
    slice_ = slice_ or "system.slice"
    if not slice_.endswith(".slice") or slice_ == "-.slice":
        raise UsageError(f"--systemd-cgroup: {slice_!r} is not a slice name")
    parts = slice_[: -len(".slice")].split("-")
    slices = ["-".join(parts[: i + 1]) + ".slice" for i in range(len(parts))]
    return "/" + "/".join([*slices, f"{prefix}-{name}.scope" if prefix else f"{name}.scope"])


def load(bundle: str, container_id: str, systemd_cgroup: bool = False) -> Loaded:
    """Read config.json; as real root also make the container's cgroup (runc makes one
    for every container, at linux.cgroupsPath or named after its id) with the limits
    of linux.resources.  An ordinary user's limits stay the launcher's (docs/isolation.md)."""
    from mesobox.launch.identity import is_real_root
    from mesobox.oci.bundle import load_bundle, spec_from_bundle
    from mesobox.oci.spec import Hooks, hooks_json

    data = load_bundle(Path(bundle))
    spec = spec_from_bundle(Path(bundle), data)
    hooks = hooks_json(spec.hooks)
    launched = Hooks(createContainer=spec.hooks.createContainer, startContainer=spec.hooks.startContainer)
    annotations = {str(k): str(v) for k, v in (data.get("annotations") or {}).items()}
    loaded = Loaded(spec.replace(hooks=launched), {kind: hooks[kind] for kind in RUNTIME_HOOKS if kind in hooks},
                    annotations)
    if is_real_root():
        from mesobox.oci.cgroups import OciCgroup, cgroup_path, with_default_devices

        linux: dict[str, Any] = data["linux"] if isinstance(data.get("linux"), dict) else {}
        resources = with_default_devices(linux.get("resources") or {}, linux.get("devices") or [])
        path = systemd_path(linux.get("cgroupsPath"), container_id) if systemd_cgroup else linux.get("cgroupsPath")
        loaded.cgroup = OciCgroup.create(cgroup_path(path, container_id), resources)
        loaded.resources = resources
        for warning in loaded.cgroup.warnings:
            from mesobox.oci.log import warn

            warn(warning)
        # the launcher makes no second group of its own inside this one
        loaded.spec = loaded.spec.replace(linux=loaded.spec.linux.replace(resources=None))
    return loaded


def create(rt: Runtime, container_id: str, bundle: str, pid_file: str | None = None,
           console_socket: str | None = None, preserve_fds: int = 0) -> int:
    """Fork the container's process, wait until it is created, record it; returns its pid."""
    bundle = os.path.abspath(bundle)
    container = rt.container(container_id)
    claim(container)
    loaded = None
    try:
        loaded = load(bundle, container.id, rt.systemd_cgroup)
        container.make_fifo()

        def runtime_hooks(pid: int) -> None:
            """The container is set up, before pivot_root: record it, run the hooks of
            the runtime's namespace that come before (the state says "created", as
            runtime-tools expects), then let it go on."""
            record = container_record(bundle, pid, loaded)
            container.write(record)
            for kind in ("prestart", "createRuntime"):
                run_hooks(kind, loaded.hooks.get(kind, ()), container.state(record) | {"status": "created"})
            fd = os.open(container.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.write(fd, b"g")
            finally:
                os.close(fd)

        pid = _fork_container(rt.config, container, loaded, console_socket, preserve_fds, runtime_hooks)
        container.write(container_record(bundle, pid, loaded))
    except BaseException:
        _kill_tree(container, 9)
        if loaded is not None:
            empty_cgroup(loaded.record())
            loaded.drop_cgroup()
        container.remove()
        raise
    if pid_file:
        write_pid_file(pid_file, pid)
    return pid


def container_record(bundle: str, pid: int, loaded: Loaded) -> dict[str, Any]:
    """state.json, with the process defaults ``exec`` starts from (runc's: config.json's)."""
    from mesobox.oci.spec import bind_sources

    spec = loaded.spec
    process = spec.process
    user = process.user
    caps = {kind: list(names) for kind, names in process.capabilities.items()} \
        if process.capabilities is not None else None
    return {**new_record(bundle, pid, loaded.annotations, loaded.hooks), **loaded.record(),
            "process": {"env": list(process.env), "cwd": process.cwd,
                        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": list(user.additional_gids)},
                        "capabilities": caps, "noNewPrivileges": process.no_new_privileges},
            "seccomp": spec.linux.seccomp,
            # what checkpoint tells CRIU is outside the container (oci/checkpoint.py)
            "binds": bind_sources(spec),
            "maskedPaths": list(spec.linux.masked_paths)}


def _cgroup_of(record: dict[str, Any]) -> Any:
    """The container's cgroup recorded at create (real root), or None."""
    found = record.get("cgroup")
    if not isinstance(found, dict):
        return None
    from mesobox.oci.cgroups import OciCgroup

    return OciCgroup.from_dirs(found.get("dirs") or {}, found.get("created") or [])


def empty_cgroup(record: dict[str, Any]) -> None:
    """SIGKILL whatever is left in the container's cgroup (frozen meanwhile, so nothing
    forks past it), as runc's delete does."""
    cgroup = _cgroup_of(record)
    if cgroup is None:
        return
    try:  # noqa: SIM105 - a freezer that fails still lets the kill below go on
        cgroup.freeze(True)
    except MesoboxError:
        pass
    for pid in cgroup.pids():
        try:  # noqa: SIM105 - it may be gone meanwhile
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:  # noqa: SIM105 - as above
        cgroup.freeze(False)
    except MesoboxError:
        pass


def claim(container: Container) -> None:
    """Claim the id; a stopped container of that id is replaced (Slurm reuses none,
    but a user retrying after a crash should not need a delete first)."""
    if container.exists() and container.status(container.record()) == "stopped":
        container.remove()
    container.claim()


def _fork_container(config: Config, container: Container, loaded: Loaded, console_socket: str | None,
                    preserve_fds: int, runtime_hooks: Callable[[int], None]) -> int:
    fifo = os.open(container.fifo, os.O_RDWR | os.O_CLOEXEC)  # read-write: never blocks, never EOF
    ready_r, ready_w = os.pipe()
    console = _console(console_socket) if loaded.spec.process.terminal else None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        _container_process(config, container, loaded, (fifo, ready_w), console, preserve_fds)
    os.close(fifo)
    os.close(ready_w)
    if console is not None:
        os.close(console)
    try:
        return _await_created(pid, ready_r, runtime_hooks)
    finally:
        os.close(ready_r)


def _console(socket_path: str | None) -> int:
    """A pty for ``process.terminal``: its master goes to the console socket (SCM_RIGHTS,
    as runc sends it), its slave becomes the container's stdio; returns the slave."""
    if not socket_path:
        raise UsageError("process.terminal is true but no --console-socket was given",
                         hint="give --console-socket, or set process.terminal to false")
    import socket

    master, slave = os.openpty()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(socket_path)
            socket.send_fds(sock, [b"/dev/ptmx"], [master])
    except OSError as err:
        os.close(slave)
        raise LaunchError(f"cannot send the terminal to --console-socket {socket_path}: {err.strerror}") from None
    finally:
        os.close(master)
    return slave


def _container_process(config: Config, container: Container, loaded: Loaded, start_fifo: tuple[int, int],
                       console: int | None, preserve_fds: int) -> None:
    """The forked child: in the container's cgroup first (everything it forks is then
    in it too), a session of its own (runc's init does setsid too), the console as
    stdio, no inherited fd beyond ``--preserve-fds``; then the launcher.  Its own
    failure goes back to ``create`` on the ready pipe."""
    code = 125
    ready = start_fifo[1]
    spec = loaded.spec
    try:
        if loaded.cgroup is not None:
            loaded.cgroup.join(0)
        os.setsid()
        if console is not None:
            _take_terminal(console)
        _close_inherited(3 + preserve_fds, start_fifo)
        from mesobox.launch.launcher import launch

        # the launch waits for `start` right before execve; hooks read the container's id
        code = launch(spec.replace(mesobox=spec.mesobox.replace(start_fifo=start_fifo, container_id=container.id)),
                      config)
    except MesoboxError as err:
        code = err.exit_code
        _tell(ready, err.message + (f" ({err.hint})" if err.hint else ""))
    except OSError as err:
        from mesobox.errors import os_error_text

        _tell(ready, os_error_text(err))
    except BaseException as err:  # a bug: still one line
        _tell(ready, f"internal: {type(err).__name__}: {err}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _take_terminal(console: int) -> None:
    """The pty's slave as stdin, stdout and stderr, and as the controlling terminal of
    this (new) session."""
    import fcntl
    import termios

    for fd in (0, 1, 2):
        os.dup2(console, fd)
    os.close(console)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _tell(ready: int, message: str) -> None:
    try:  # noqa: SIM105 - the create side may be gone already
        os.write(ready, b"e" + message.encode("utf-8", "replace")[:4000])
    except OSError:
        pass


def _close_inherited(first: int, keep: tuple[int, ...]) -> None:
    """runc's rule: the container gets stdio and ``--preserve-fds`` fds from 3 on; any
    other fd the caller left inheritable is closed at execve."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd >= first and fd not in keep:
            try:  # noqa: SIM105 - the listing's own fd is gone already
                os.set_inheritable(fd, False)
            except OSError:
                pass


def _await_created(pid: int, ready: int, runtime_hooks: Callable[[int], None]) -> int:
    """Until the container's process says "created" ("c", or "cPID" from a workload
    that is pid 1 of its own pid namespace, forked by ``pid``, which then exits 0),
    or why it failed ("e…"), or exits without a word (a failure printed on its stderr
    by a deeper fork).  On the way it says "h" (or "hPID"): time for
    ``runtime_hooks``.  Returns the container's pid."""
    deadline = time.monotonic() + CREATED_TIMEOUT_S
    message = b""
    forked_exit = False  # ``pid`` exited 0: a forked pid 1 holds the pipe still
    while True:
        readable, _, _ = select.select([ready], [], [], 0.2)
        if readable:
            chunk = os.read(ready, 4096)
            if not message and chunk[:1] in (b"c", b"h") and (len(chunk) == 1 or chunk[1:].isdigit()):
                reported = int(chunk[1:]) if len(chunk) > 1 else pid
                if chunk[:1] == b"c":
                    return reported
                runtime_hooks(reported)
                continue
            message += chunk
            if chunk:
                continue
        if readable or time.monotonic() > deadline:
            break
        if forked_exit:
            continue
        done, status = os.waitpid(pid, os.WNOHANG)
        if done and status == 0:
            forked_exit = True
        elif done:
            # It exited; a last word may still be in the pipe.
            while select.select([ready], [], [], 0)[0] and (chunk := os.read(ready, 4096)):
                message += chunk
            raise _create_failed(message, status)
    if not forked_exit:
        if not message:  # EOF, or the deadline: nothing says created
            os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
    else:
        status = 125 << 8
    raise _create_failed(message, status)


def _create_failed(message: bytes, status: int) -> LaunchError:
    if message.startswith(b"c"):
        message = message[1:]
    if message.startswith(b"e"):
        return LaunchError(message[1:].decode("utf-8", "replace"))
    code = os.waitstatus_to_exitcode(status)
    # 0: the process that forked the container's pid 1 (which failed) exited as it should
    how = "" if code == 0 else f" (exit status {code})" if code > 0 else f" (signal {-code})"
    return LaunchError(f"the container's process ended before it was created{how}",
                       hint="its own error is on the container's stderr")


def write_pid_file(path: str, pid: int, dir_fd: int | None = None) -> None:
    """runc's --pid-file: the pid, no newline; relative to ``dir_fd`` (exec: opened
    before it joined the container's mount namespace) or the current directory."""
    from mesobox.files import write_atomic

    if dir_fd is not None:
        write_atomic(os.path.basename(path), f"{pid}".encode(), mode=0o644, dir_fd=dir_fd)
    else:
        write_atomic(os.path.abspath(path), f"{pid}".encode(), mode=0o644)


def start(rt: Runtime, container_id: str) -> None:
    container = rt.container(container_id)
    record = container.record()
    status = container.status(record)
    if status != "created":
        raise LaunchError(f"cannot start container {container_id!r}: it is {status}, not created")
    try:
        fd = os.open(container.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:  # ENXIO: nobody reads it, the container's process is gone
        raise LaunchError(f"cannot start container {container_id!r}: {err.strerror}") from None
    try:
        try:
            os.unlink(container.fifo)  # first: of two concurrent starts, one wins
        except FileNotFoundError:
            raise LaunchError(f"container {container_id!r} is being started already") from None
        os.write(fd, b"s")
    finally:
        os.close(fd)
    run_hooks("poststart", record.get("hooks", {}).get("poststart", ()),
              container.state(record) | {"status": "running"}, warn_only=True)


def run(rt: Runtime, container_id: str, bundle: str, pid_file: str | None = None, detach: bool = False,
        console_socket: str | None = None, preserve_fds: int = 0) -> int:
    """create + start.  In the foreground without lifecycle hooks of the runtime's
    (what Slurm's RunTimeRun is), this very process becomes the container and its pid
    is recorded: Slurm signals it directly.  Otherwise create, start, and (in the
    foreground) wait, passing on signals, for the container's exit status."""
    if detach or _has_runtime_hooks(bundle):
        if not detach:  # a container that is pid 1 of its own pid namespace is not our child
            from mesobox.launch import syscalls as sc

            sc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        pid = create(rt, container_id, bundle, pid_file, console_socket, preserve_fds)
        start(rt, container_id)
        if detach:
            return 0
        from mesobox.launch.forwarding import block_signals, wait_forwarding

        block_signals()
        return wait_forwarding(pid)
    from mesobox.launch.launcher import launch

    bundle = os.path.abspath(bundle)
    container = rt.container(container_id)
    claim(container)
    try:
        loaded = load(bundle, container.id, rt.systemd_cgroup)
        if loaded.cgroup is not None:
            loaded.cgroup.join(0)
        container.write(container_record(bundle, os.getpid(), loaded))
    except BaseException:
        container.remove()
        raise
    if pid_file:
        write_pid_file(pid_file, os.getpid())
    spec = loaded.spec
    return launch(spec.replace(mesobox=spec.mesobox.replace(container_id=container.id)), rt.config)


def _has_runtime_hooks(bundle: str) -> bool:
    from mesobox.oci.bundle import load_bundle

    hooks = load_bundle(Path(bundle)).get("hooks") or {}
    return isinstance(hooks, dict) and any(hooks.get(kind) for kind in RUNTIME_HOOKS)


# --- state / kill / delete -----------------------------------------------------------------


def state(rt: Runtime, container_id: str) -> dict[str, Any]:
    return rt.container(container_id).state()


def kill(rt: Runtime, container_id: str, signum: int, everyone: bool = False) -> None:
    container = rt.container(container_id)
    record = container.record()
    status = container.status(record)
    if status == "stopped":
        raise LaunchError(f"container {container_id!r} is not running")
    pid = int(record["pid"])
    if everyone:
        _kill_tree(container, signum)
    elif status == "created":
        # The process that waits for start may be a child of the recorded one (a
        # supervisor, a pid namespace's init): the whole session gets the signal now.
        _killpg(pid, signum)
    else:
        os.kill(pid, signum)
    if status == "paused" and signum in (signal.SIGKILL, signal.SIGTERM):
        _kill_tree(container, signal.SIGCONT)


def _killpg(pid: int, signum: int) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
            return
    except ProcessLookupError:
        return
    os.kill(pid, signum)


def _kill_tree(container: Container, signum: int) -> None:
    """``signum`` to the container's process and every descendant (best effort)."""
    from mesobox.instances.state import process_tree
    from mesobox.procs import same_process

    try:
        record = container.record()
    except UsageError:
        return
    pid = int(record.get("pid") or 0)
    cgroup = _cgroup_of(record)
    found = set(cgroup.pids()) if cgroup is not None else set()  # a daemonized one left the tree, not the group
    if same_process(pid, record.get("started")):
        found.update(process_tree(pid))
    for each in sorted(found):
        try:  # noqa: SIM105 - it may be gone meanwhile
            os.kill(each, signum)
        except ProcessLookupError:
            pass


def update(rt: Runtime, container_id: str, resources: dict[str, Any]) -> None:
    """runc update: new limits (linux.resources JSON) for the container's cgroup, merged
    section by section into those recorded (device rules are not resent: rewriting them
    would deny every device for a moment)."""
    container = rt.container(container_id)
    record = container.record()
    cgroup = _cgroup_of(record)
    if cgroup is None:
        raise LaunchError(f"container {container_id!r} has no cgroup of mesobox-oci's to update",
                          hint="only real root's containers get one (docs/oci.md)")
    if container.status(record) == "stopped":
        raise LaunchError(f"container {container_id!r} is stopped")
    merged = dict(record["cgroup"].get("resources") or {})
    for key, value in resources.items():
        if key == "devices":
            continue
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    cgroup.update({k: v for k, v in merged.items() if k != "devices"})
    container.write({**record, "cgroup": {**record["cgroup"], "resources": merged}})


def delete(rt: Runtime, container_id: str, force: bool = False) -> None:
    from mesobox.procs import same_process

    container = rt.container(container_id)
    record = container.record()
    status = container.status(record)
    if status in ("running", "paused") and not force:
        raise LaunchError(f"container {container_id!r} is {status}", hint="kill it first or use --force")
    if status != "stopped":  # a created one is deleted like runc does: killed first
        _kill_tree(container, signal.SIGKILL)
        _killpg(int(record["pid"]), signal.SIGKILL)
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while same_process(int(record["pid"]), record.get("started")) and time.monotonic() < deadline:
            time.sleep(0.01)
    cgroup = _cgroup_of(record)
    if cgroup is not None:
        empty_cgroup(record)
        try:
            cgroup.remove()
        except MesoboxError as err:
            from mesobox.oci.log import warn

            warn(f"cannot remove the container's cgroup: {err.message}")
    container.remove()
    run_hooks("poststop", record.get("hooks", {}).get("poststop", ()),
              container.state(record) | {"status": "stopped"}, warn_only=True)


# --- hooks ----------------------------------------------------------------------------------


def run_hooks(kind: str, hooks: Any, state_doc: dict[str, Any], warn_only: bool = False) -> None:
    """config.md's hooks of the runtime's namespace, in order: path execve'd with exactly
    args and env, the state JSON on stdin, up to ``timeout`` seconds.  A failing
    prestart/createRuntime hook fails the create; poststart/poststop ones only warn."""
    data = json.dumps(state_doc).encode()
    for hook in hooks:
        path = hook["path"]
        args = hook.get("args") or [path]
        env = dict(item.split("=", 1) for item in hook.get("env") or () if "=" in item)
        try:
            proc = subprocess.run(args, executable=path, env=env, input=data, stdout=sys.stderr,
                                  timeout=hook.get("timeout"), check=False)
            why = None if proc.returncode == 0 else f"failed with exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            why = f"did not finish within its timeout of {hook.get('timeout')} s: killed"
        except OSError as err:
            why = f"cannot execute: {err.strerror}"
        if why is None:
            continue
        if not warn_only:
            raise LaunchError(f"{kind} hook {path} {why}")
        from mesobox.oci.log import warn

        warn(f"{kind} hook {path} {why}")


# --- exec -----------------------------------------------------------------------------------


def exec_process(rt: Runtime, container_id: str, process: dict[str, Any], detach: bool = False,
                 pid_file: str | None = None, console_socket: str | None = None) -> int:
    """Run ``process`` (config.md's process object) in the container's namespaces
    (instances/nsenter.py), as its user, in its cwd, with exactly its env."""
    from mesobox.instances import nsenter

    container = rt.container(container_id)
    record = container.record()
    status = container.status(record)
    if status not in ("created", "running"):
        raise LaunchError(f"cannot exec in container {container_id!r}: it is {status}")
    target = _inner_pid(int(record["pid"]))
    args = [str(a) for a in process.get("args") or ()]
    if not args:
        raise UsageError("exec needs a command", hint="give it after the id, or in --process FILE")
    env = dict(item.split("=", 1) for item in process.get("env") or () if "=" in item)
    env.setdefault("PATH", nsenter.DEFAULT_PATH)
    user = process.get("user") or {}
    limits = _exec_limits(rt, process, record)
    cgroup = _cgroup_of(record)
    if cgroup is not None:
        cgroup.join(0)  # runc's exec: the new process counts against the container's limits
    console = _console(console_socket) if process.get("terminal") else None
    # Everything the exec'ing side needs, imported while the host's root is still ours.
    import fcntl  # noqa: F401
    import termios  # noqa: F401

    from mesobox.launch.execute import in_child
    from mesobox.launch.signals import release_signals  # noqa: F401

    # The pid file's directory, opened while its path still means the host's.
    pid_dir = os.open(os.path.dirname(os.path.abspath(pid_file)), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) \
        if pid_file else None
    joined_pid = nsenter.join(target)
    if detach or joined_pid:
        sys.stdout.flush()
        sys.stderr.flush()
        child = os.fork()
        if child:
            if console is not None:
                os.close(console)
            if pid_file:
                write_pid_file(pid_file, child, pid_dir)
            if detach:
                return 0
            _, wait_status = os.waitpid(child, 0)
            code = os.waitstatus_to_exitcode(wait_status)
            return code if code >= 0 else 128 - code
    elif pid_file:
        write_pid_file(pid_file, os.getpid(), pid_dir)
    if pid_dir is not None:
        os.close(pid_dir)
    in_child(lambda: _exec_in(args, env, str(process.get("cwd") or "/"), user, console, detach, limits))


def _exec_limits(rt: Runtime, process: dict[str, Any], record: dict[str, Any]) -> tuple[Any, bool, bytes | None]:
    """What confines an exec'd process as it confines the container's own (runc's
    exec): the capability sets (the --process file's, else config.json's), no_new_privs,
    the config's seccomp filter, compiled now while the host's files are in reach."""
    from mesobox.isolation.caps import check_sets, masks

    sets = process.get("capabilities")
    if sets is None:
        sets = (record.get("process") or {}).get("capabilities")
    cap_masks = None
    if isinstance(sets, dict):
        sets = {str(kind): tuple(str(n) for n in names or ()) for kind, names in sets.items()}
        check_sets(sets)
        cap_masks = masks(sets)
    nnp = process.get("noNewPrivileges")
    if nnp is None:
        nnp = (record.get("process") or {}).get("noNewPrivileges", False)
    seccomp = None
    profile = record.get("seccomp")
    if isinstance(profile, dict):
        from mesobox.isolation.seccomp import prepare

        seccomp = prepare(None if profile.get("mesobox.builtin") else profile,
                          os.path.join(rt.config.runtime_dir_str, "seccomp"))
    return cap_masks, bool(nnp), seccomp


def _exec_in(args: list[str], env: dict[str, str], cwd: str, user: dict[str, Any], console: int | None,
             detach: bool, limits: tuple[Any, bool, bytes | None] = (None, False, None)) -> None:
    from mesobox.instances import nsenter

    if detach or console is not None:
        os.setsid()
    if console is not None:
        _take_terminal(console)
    try:
        os.chdir(cwd)
    except OSError as err:
        raise LaunchError(f"cannot enter the working directory {cwd} in the container: {err.strerror}") from None
    from mesobox.launch import syscalls as sc

    cap_masks, nnp, seccomp = limits
    if seccomp is not None and not nnp:
        sc.install_seccomp(seccomp, no_new_privs=False)  # needs CAP_SYS_ADMIN: before any is dropped
    if cap_masks is not None:
        from mesobox.launch.execute import usable_capabilities

        have = sc.capget()[1]  # what this kernel or host lacks is left out, as at create
        bounding = cap_masks[0] & have
        cap_masks = (bounding, *usable_capabilities(cap_masks[1:]))
        sc.drop_capabilities(frozenset(cap for cap in range(64) if bounding >> cap & 1))
        sc.prctl(sc.PR_SET_KEEPCAPS, 1)
    uid, gid = int(user.get("uid", os.getuid())), int(user.get("gid", os.getgid()))
    if (uid, gid) != (os.getuid(), os.getgid()) or os.getuid() == 0:
        try:
            try:  # noqa: SIM105 - denied in a single-id user namespace: keep one's groups
                os.setgroups([int(g) for g in user.get("additionalGids") or ()])
            except PermissionError:
                pass
            os.setgid(gid)
            os.setuid(uid)
        except OSError as err:
            raise LaunchError(f"cannot switch to uid {uid} gid {gid} in the container: {err.strerror}") from None
    if cap_masks is not None:
        sc.set_capabilities(*cap_masks[1:])
    if nnp:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    if seccomp is not None and nnp:
        sc.install_seccomp(seccomp)
    from mesobox.launch.signals import release_signals

    release_signals()
    nsenter._exec(args, env)


def _inner_pid(pid: int) -> int:
    """The first process of the container's tree that lives in its namespaces: the
    recorded process itself, or (a supervisor stays outside; a pid namespace's parent
    is not in it) a descendant whose mount namespace is not ours and whose pid
    namespace is its children's."""
    from mesobox.instances.state import process_tree

    ours = os.readlink("/proc/self/ns/mnt")
    for each in process_tree(pid):
        try:
            if os.readlink(f"/proc/{each}/ns/mnt") == ours:
                continue
            if os.readlink(f"/proc/{each}/ns/pid") != os.readlink(f"/proc/{each}/ns/pid_for_children"):
                continue
        except OSError:
            continue
        return each
    raise LaunchError("cannot find the container's processes", hint="is it still running?")


# --- ps / list / pause / resume ---------------------------------------------------------------


def pids(rt: Runtime, container_id: str) -> list[int]:
    from mesobox.instances.state import process_tree

    container = rt.container(container_id)
    record = container.record()
    cgroup = _cgroup_of(record)
    if cgroup is not None:
        return sorted(cgroup.pids())
    if container.status(record) == "stopped":
        return []
    return process_tree(int(record["pid"]))


def listing(rt: Runtime) -> list[dict[str, Any]]:
    """runc list's objects: id, pid, status, bundle, rootfs, created, owner."""
    out = []
    for name in list_ids(rt.root):
        container = rt.container(name)
        try:
            record = container.record()
        except UsageError:
            continue
        doc = container.state(record)
        rootfs = ""
        try:
            root = json.loads((Path(record["bundle"]) / "config.json").read_text())["root"]["path"]
            rootfs = str(Path(record["bundle"]) / root)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        out.append({"ociVersion": doc["ociVersion"], "id": name, "pid": doc["pid"], "status": doc["status"],
                    "bundle": doc["bundle"], "rootfs": rootfs, "created": record.get("created", ""),
                    "owner": record.get("owner", "")})
    return out


def pause(rt: Runtime, container_id: str, paused: bool) -> None:
    """SIGSTOP (SIGCONT) every process of the container, parents first, until a pass
    finds none new: there is no cgroup freezer (runc's way) without a container cgroup."""
    container = rt.container(container_id)
    record = container.record()
    status = container.status(record)
    want = "running" if paused else "paused"
    if status != want:
        raise LaunchError(f"container {container_id!r} is {status}, not {want}")
    cgroup = _cgroup_of(record)
    if cgroup is not None:  # the freezer: atomic, and unseen by the workload
        cgroup.freeze(paused)
        container.write({**record, "paused": paused})
        return
    from mesobox.instances.state import process_tree

    done: set[int] = set()
    while fresh := [p for p in process_tree(int(record["pid"])) if p not in done]:
        for each in fresh:
            try:  # noqa: SIM105 - it may be gone meanwhile
                os.kill(each, signal.SIGSTOP if paused else signal.SIGCONT)
            except ProcessLookupError:
                pass
        done.update(fresh)
    container.write({**record, "paused": paused})
