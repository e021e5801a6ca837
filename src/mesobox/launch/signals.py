"""Signals: held while a container is set up, then passed on to its workload.

Invariants (launcher.py tells the whole story):
- ``FORWARDED`` (and SIGCHLD) are blocked as soon as the CLI knows the verb launches,
  so one that arrives early stays pending instead of killing a half-built container.
- Forwarders take them with sigwaitinfo(2) only once the workload has exec'd (EOF on
  a close-on-exec pipe) and, for the first ``HOLD_S`` seconds, only once the workload
  catches, ignores or blocks that signal: an early Slurm ``--signal=USR1@T`` meets the
  job's trap instead of killing it half-started.
- A signal the terminal sent (si_code SI_KERNEL) to its foreground process group is not
  forwarded: the container is in that group and got its own copy (no double ^C).
- The workload execs with the caller's mask (``caller_sigmask``).
"""


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


def unblock_all() -> None:
    """The default mask, for a helper daemon forked while signals are held: it must not
    keep them blocked for its whole life (fusemount.py)."""
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
