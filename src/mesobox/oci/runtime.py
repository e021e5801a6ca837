"""mesobox-oci's operations: the OCI lifecycle (runtime-spec runtime.md) over mesobox's launcher.

``create`` reads config.json once, claims ``ROOT/ID`` (oci/state.py), makes its
exec.fifo and forks the container's process, which becomes a session leader and runs
the launcher (launch/launcher.launch) with the spec's ``start_fifo`` set: namespaces,
mounts, createContainer hooks and pivot_root are done, the command is looked up, then
that process says "created" on a pipe and blocks on the FIFO right before execve
(launch/execute.py ``wait_for_start``).  ``create`` then records the pid and its start
time, runs the prestart and createRuntime hooks, writes ``--pid-file`` and returns.
``start`` writes one byte to the FIFO, removes it and runs the poststart hooks;
``delete`` removes the state and runs the poststop hooks.  There is no monitor
process: the status is derived from the pid (oci/state.py), and the container's
process is reparented to whoever reaps orphans (conmon as a subreaper, or init).

The pid recorded is the process ``create`` forked: the container's process itself
(it execs the workload), or, where the launcher must stay outside (real root, a
cgroup, slirp4netns) or runs a minimal init (a pid namespace), the launcher's
supervisor, which exits with the workload's status and passes on the signals it gets.

Deviations, said in docs/oci.md: prestart and createRuntime hooks run once the
container is created (after pivot_root, not before it); createContainer and
startContainer hooks read the bundle mesobox generates in the container's workspace.
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

CREATED_TIMEOUT_S = 600.0  # the longest create waits for the container's set-up (a squashfs mount, hooks)
GONE_TIMEOUT_S = 10.0  # the longest delete --force waits for a SIGKILLed container to be gone


class Runtime:
    """The global options: where the state lives, and the launcher's configuration."""

    def __init__(self, root: str, config: Config) -> None:
        self.root = root
        self.config = config

    def container(self, container_id: str) -> Container:
        return Container(self.root, container_id)


# --- create / start / run ------------------------------------------------------------------


def load(bundle: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """config.json, read once: (the Spec the launcher runs, the runtime's own hooks, annotations)."""
    from mesobox.oci.bundle import load_bundle, spec_from_bundle
    from mesobox.oci.spec import Hooks, hooks_json

    data = load_bundle(Path(bundle))
    spec = spec_from_bundle(Path(bundle), data)
    hooks = hooks_json(spec.hooks)
    launched = Hooks(createContainer=spec.hooks.createContainer, startContainer=spec.hooks.startContainer)
    annotations = {str(k): str(v) for k, v in (data.get("annotations") or {}).items()}
    return spec.replace(hooks=launched), {kind: hooks[kind] for kind in RUNTIME_HOOKS if kind in hooks}, annotations


def create(rt: Runtime, container_id: str, bundle: str, pid_file: str | None = None,
           console_socket: str | None = None, preserve_fds: int = 0) -> int:
    """Fork the container's process, wait until it is created, record it; returns its pid."""
    bundle = os.path.abspath(bundle)
    spec, hooks, annotations = load(bundle)
    container = rt.container(container_id)
    _claim(container)
    try:
        container.make_fifo()
        pid = _fork_container(rt.config, container, spec, console_socket, preserve_fds)
        record = _record(bundle, pid, annotations, hooks, spec)
        container.write(record)
        for kind in ("prestart", "createRuntime"):
            run_hooks(kind, hooks.get(kind, ()), container.state(record) | {"status": "created"})
    except BaseException:
        _kill_tree(container, 9)
        container.remove()
        raise
    if pid_file:
        _write_pid_file(pid_file, pid)
    return pid


def _record(bundle: str, pid: int, annotations: dict[str, str], hooks: dict[str, Any], spec: Any
            ) -> dict[str, Any]:
    """state.json, with the process defaults ``exec`` starts from (runc's: config.json's)."""
    user = spec.process.user
    return {**new_record(bundle, pid, annotations, hooks),
            "process": {"env": list(spec.process.env), "cwd": spec.process.cwd,
                        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": list(user.additional_gids)}}}


def _claim(container: Container) -> None:
    """Claim the id; a stopped container of that id is replaced (Slurm reuses none,
    but a user retrying after a crash should not need a delete first)."""
    if container.exists() and container.status(container.record()) == "stopped":
        container.remove()
    container.claim()


def _fork_container(config: Config, container: Container, spec: Any, console_socket: str | None,
                    preserve_fds: int) -> int:
    fifo = os.open(container.fifo, os.O_RDWR | os.O_CLOEXEC)  # read-write: never blocks, never EOF
    ready_r, ready_w = os.pipe()
    console = _console(console_socket) if spec.process.terminal else None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        _container_process(config, container, spec, (fifo, ready_w), console, preserve_fds)
    os.close(fifo)
    os.close(ready_w)
    if console is not None:
        os.close(console)
    try:
        _await_created(pid, ready_r)
    finally:
        os.close(ready_r)
    return pid


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


def _container_process(config: Config, container: Container, spec: Any, start_fifo: tuple[int, int],
                       console: int | None, preserve_fds: int) -> None:
    """The forked child: a session of its own (runc's init does setsid too), the
    console as stdio, no inherited fd beyond ``--preserve-fds``; then the launcher.
    Its own failure goes back to ``create`` on the ready pipe."""
    code = 125
    ready = start_fifo[1]
    try:
        os.setsid()
        if console is not None:
            import fcntl
            import termios

            for fd in (0, 1, 2):
                os.dup2(console, fd)
            os.close(console)
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
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


def _await_created(pid: int, ready: int) -> None:
    """Until the container's process says "created" ("c"), or why it failed ("e…"),
    or exits without a word (a failure printed on its stderr by a deeper fork)."""
    deadline = time.monotonic() + CREATED_TIMEOUT_S
    message = b""
    while True:
        readable, _, _ = select.select([ready], [], [], 0.2)
        if readable:
            chunk = os.read(ready, 4096)
            if chunk == b"c" and not message:
                return
            message += chunk
            if chunk:
                continue
        if readable or time.monotonic() > deadline:
            break
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            # It exited; a last word may still be in the pipe.
            while select.select([ready], [], [], 0)[0] and (chunk := os.read(ready, 4096)):
                message += chunk
            raise _create_failed(message, status)
    if not message:  # EOF, or the deadline: nothing says created
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    raise _create_failed(message, status)


def _create_failed(message: bytes, status: int) -> LaunchError:
    if message.startswith(b"c"):
        message = message[1:]
    if message.startswith(b"e"):
        return LaunchError(message[1:].decode("utf-8", "replace"))
    code = os.waitstatus_to_exitcode(status)
    how = f"exit status {code}" if code >= 0 else f"signal {-code}"
    return LaunchError(f"the container's process ended before it was created ({how})",
                       hint="its own error is on the container's stderr")


def _write_pid_file(path: str, pid: int, dir_fd: int | None = None) -> None:
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
        pid = create(rt, container_id, bundle, pid_file, console_socket, preserve_fds)
        start(rt, container_id)
        if detach:
            return 0
        from mesobox.launch.forwarding import block_signals, wait_forwarding

        block_signals()
        return wait_forwarding(pid)
    from mesobox.launch.launcher import launch

    bundle = os.path.abspath(bundle)
    spec, hooks, annotations = load(bundle)
    container = rt.container(container_id)
    _claim(container)
    container.write(_record(bundle, os.getpid(), annotations, hooks, spec))
    if pid_file:
        _write_pid_file(pid_file, os.getpid())
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
    if not same_process(pid, record.get("started")):
        return
    for each in process_tree(pid):
        try:  # noqa: SIM105 - it may be gone meanwhile
            os.kill(each, signum)
        except ProcessLookupError:
            pass


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
                _write_pid_file(pid_file, child, pid_dir)
            if detach:
                return 0
            _, wait_status = os.waitpid(child, 0)
            code = os.waitstatus_to_exitcode(wait_status)
            return code if code >= 0 else 128 - code
    elif pid_file:
        _write_pid_file(pid_file, os.getpid(), pid_dir)
    if pid_dir is not None:
        os.close(pid_dir)
    in_child(lambda: _exec_in(args, env, str(process.get("cwd") or "/"), user, console, detach))


def _exec_in(args: list[str], env: dict[str, str], cwd: str, user: dict[str, Any], console: int | None,
             detach: bool) -> None:
    from mesobox.instances import nsenter

    if detach or console is not None:
        os.setsid()
    if console is not None:
        import fcntl
        import termios

        for fd in (0, 1, 2):
            os.dup2(console, fd)
        os.close(console)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    try:
        os.chdir(cwd)
    except OSError as err:
        raise LaunchError(f"cannot enter the working directory {cwd} in the container: {err.strerror}") from None
    uid, gid = int(user.get("uid", os.getuid())), int(user.get("gid", os.getgid()))
    if (uid, gid) != (os.getuid(), os.getgid()):
        try:
            try:  # noqa: SIM105 - denied in a single-id user namespace: keep one's groups
                os.setgroups([int(g) for g in user.get("additionalGids") or ()])
            except PermissionError:
                pass
            os.setgid(gid)
            os.setuid(uid)
        except OSError as err:
            raise LaunchError(f"cannot switch to uid {uid} gid {gid} in the container: {err.strerror}") from None
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
