"""Processes as /proc shows them: alive or not, and which process a pid still names.

A pid alone is not an identity: pids are recycled.  A (pid, starttime) pair is: the
kernel's start time (proc(5), /proc/PID/stat field 22, clock ticks after boot) never
repeats for one pid.  Zombies count as gone: they run nothing and hold no mount.
Stdlib only: used on the launch path (squashfs leases) and by instances.
"""

from __future__ import annotations

import os


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, starttime) of a live, non-zombie process, or None."""
    if pid <= 0:
        return None
    try:
        # os.open/os.read, not open(): no buffered-I/O layer (isatty, fstat) on the
        # launch path, where a shared user namespace reads two of these per rank.
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
        # comm may contain spaces and parentheses: split after the *last* ')'.
        fields = raw[raw.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """The start time of ``pid``, or None when it is gone or a zombie."""
    stat = proc_stat(pid)
    return None if stat is None else stat[1]


def alive(pid: int) -> bool:
    return proc_stat(pid) is not None


def same_process(pid: int | None, started: int | None) -> bool:
    """True when ``pid`` is still the process that was recorded (not a reused pid)."""
    return bool(pid) and started is not None and start_time(pid or 0) == started
