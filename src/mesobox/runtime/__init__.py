"""Runtime room: turn an image and CLI options into a running, unprivileged container.

Data flows one way (docs/running.md): ``build`` (image config + options → ``spec.Spec``)
→ ``launcher`` (validate, namespaces, ``mounts`` plan, pivot_root, exec).  ``syscalls``
calls libc through ``_ctypes``; ``seccomp`` imports ``ctypes`` only to compile a filter;
``identity`` makes id maps and passwd/group, ``environ`` merges environments,
``squashmount`` shares one squashfs mount per node.  Everything on this path is stdlib-only with lazy imports: it runs
once per MPI rank.
"""

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal  # the C half of `signal`: the same calls, without its enum import (≈3 ms)

# Signals a batch system or a user sends to a job (SIGCONT too: scontrol resume; SIGWINCH
# for terminals): held pending while a container is set up, then passed on to it
# (launcher.py).  The CLI holds them from the moment it knows the verb launches.
FORWARDED = (1, 2, 3, 10, 12, 15, 18, 28)  # HUP INT QUIT USR1 USR2 TERM CONT WINCH
SIGCHLD = 17
caller_sigmask: set[int] | None = None  # the mask mesobox started with: the workload's at exec


def hold_signals() -> None:
    """Block ``FORWARDED`` and SIGCHLD from here on; the first call remembers the caller's mask."""
    global caller_sigmask
    old = _signal.pthread_sigmask(_signal.SIG_BLOCK, (*FORWARDED, SIGCHLD))
    if caller_sigmask is None:
        caller_sigmask = set(old)


def release_signals() -> None:
    """Give back the caller's mask (a pull before the launch stays interruptible); a
    signal held until now is delivered at once."""
    if caller_sigmask is not None:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, caller_sigmask)


def private_dirs(path: str) -> None:
    """``mkdir -p`` where every directory made is 0700 (os.makedirs gives the parents
    0755): the runtime dir holds each user's mounts, workspace and caches."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    except FileNotFoundError:
        private_dirs(os.path.dirname(path))
        try:  # noqa: SIM105 - contextlib costs an import on the launch path
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # another launch made it meanwhile
