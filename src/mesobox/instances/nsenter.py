"""Instances room: ``instance exec`` — run a command inside a running instance's namespaces.

Sequence (setns(2), user_namespaces(7)):
1. open every ``/proc/PID/ns/*`` we will join *before* joining any: after the first
   setns, /proc paths may resolve differently;
2. join the user namespace first: it gives us the capabilities (CAP_SYS_ADMIN,
   CAP_SYS_CHROOT) the other setns calls need, since the instance's user owns it;
3. join mount, then uts/ipc/net/pid where the instance has its own (same as ours: skip,
   setns to one's own user namespace is EINVAL);
4. no chroot: setns(CLONE_NEWNS) sets our root and cwd to the root of the joined mount
   namespace, which after the launcher's pivot_root is the container's root; chdir("/");
5. a pid namespace applies to children only, so when we joined one we fork and the child
   execs; the parent waits and passes on the exit status.

Uses ``launch.syscalls.setns`` (the one ctypes leaf) — Python 3.11's ``os`` has no setns.
"""

from __future__ import annotations

import contextlib
import os

from mesobox.errors import CommandNotExecutable, CommandNotFound, LaunchError

# (file in /proc/PID/ns, CLONE_* flag from <linux/sched.h>), user first: see step 2.
_ORDER = (
    ("user", 0x10000000),
    ("mnt", 0x00020000),
    ("uts", 0x04000000),
    ("ipc", 0x08000000),
    ("net", 0x40000000),
    ("pid", 0x20000000),
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _open_namespaces(pid: int) -> list[tuple[str, int, int]]:
    opened: list[tuple[str, int, int]] = []
    for kind, flag in _ORDER:
        try:
            if os.readlink(f"/proc/{pid}/ns/{kind}") == os.readlink(f"/proc/self/ns/{kind}"):
                continue
            opened.append((kind, flag, os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)))
        except OSError as err:
            for _, _, fd in opened:
                os.close(fd)
            raise LaunchError(f"cannot open the {kind} namespace of process {pid}: {err.strerror}",
                              hint="the instance may have just exited; `mesobox instance list`") from None
    return opened


def container_environ(pid: int) -> dict[str, str]:
    """The workload's environment (/proc/PID/environ), as `podman exec` would give."""
    env: dict[str, str] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as f:
        for item in f.read().split(b"\0"):
            key, sep, value = item.partition(b"=")
            if sep and key:
                env[os.fsdecode(key)] = os.fsdecode(value)
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def join(pid: int) -> bool:
    """Enter ``pid``'s namespaces; returns True when a pid namespace was joined."""
    from mesobox.launch.syscalls import setns

    joined_pid = False
    opened = _open_namespaces(pid)
    try:
        for kind, flag, fd in opened:
            try:
                setns(fd, flag)
            except OSError as err:
                raise LaunchError(f"cannot join the {kind} namespace of process {pid}: {err.strerror}",
                                  hint="only the user who started an instance can exec into it") from None
            joined_pid = joined_pid or kind == "pid"
    finally:
        for _, _, fd in opened:
            os.close(fd)
    os.chdir("/")
    return joined_pid


def _resolve(command: str, path: str) -> str:
    """execvp(3)'s PATH search, but "not found" only when no candidate exists at all
    (os.execvpe reports EACCES from any unreadable PATH entry instead)."""
    if "/" in command:
        return command
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", command)
        if os.path.isfile(candidate):
            return candidate
    raise CommandNotFound(f"{command}: command not found in the instance", hint=f"PATH there is {path}")


def _exec(argv: list[str], env: dict[str, str]) -> None:
    program = _resolve(argv[0], env.get("PATH", DEFAULT_PATH))
    try:
        os.execve(program, argv, env)  # noqa: S606 - exec'ing the user's command is the point
    except FileNotFoundError:
        raise CommandNotFound(f"{argv[0]}: command not found in the instance") from None
    except OSError as err:
        raise CommandNotExecutable(f"{argv[0]}: {err.strerror}") from None


def run_in(pid: int, argv: list[str]) -> int:
    """Run ``argv`` inside the namespaces of ``pid``; returns its exit code (or execs)."""
    env = container_environ(pid)
    if not join(pid):
        _exec(argv, env)
    child = os.fork()
    if child == 0:
        try:
            _exec(argv, env)
        except LaunchError as err:
            os.write(2, f"mesobox: error: {err.message}\n".encode())
            os._exit(err.exit_code)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code
