"""Waiting for a container's process while passing on the signals it is sent.

The rules are in signals.py (which holds them pending from the start) and
launcher.py; this module is imported only where something waits: a supervisor, the
minimal init of a --pid container, or a forwarder forked for a signal that arrived
before the workload existed.  An unsupervised launch execs and never imports it.
"""

from __future__ import annotations

import os

from mesobox.launch.signals import FORWARDED, SIGCHLD, hold_signals

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal  # the C half of `signal`: the same calls, without its enum import (≈3 ms)

_SI_KERNEL = 0x80  # siginfo si_code of a signal the kernel (a tty) generated (sigaction(2))
_TTY_SIGNALS = (2, 3, 28)  # ^C ^\ and resizes go to the whole foreground process group
HOLD_S = 1.0  # longest an early signal waits for the workload's handler


def exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def block_signals() -> None:
    """Hold every forwarded signal (and SIGCHLD) pending from here on: none kills a
    half-built container; forwarders take them with sigwaitinfo(2)."""
    hold_signals()


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

