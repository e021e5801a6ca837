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
REAP_EVERY_S = 1.0  # reap_stale_mounts looks at other keys' mounts at most this often


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
    from mesobox.runtime.squashmount import reap_stale

    reap_stale(shared, linger)
