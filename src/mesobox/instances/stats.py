"""Instances room: what a running instance uses (``instance stats``) and which processes
it has (``instance top``).

Two sources, chosen per instance:
- its own cgroup, when the supervisor could make one (root here, or a delegated v2
  subtree; ``state.json`` ``cgroup``): the kernel's totals for every task of the group —
  v2 ``cpu.stat`` usage_usec, ``memory.current``, ``io.stat`` rbytes/wbytes,
  ``pids.current``; v1 ``cpuacct.usage``, ``memory.usage_in_bytes``,
  ``blkio.throttle.io_service_bytes``, ``pids.current`` (cgroup-v1 and cgroup-v2 docs).
- else /proc, summed over the workload's process tree (proc(5)): utime+stime of
  ``stat``, memory as the proportional set size of ``smaps_rollup`` (a page shared by N
  processes counts 1/N in each, so the sum is not inflated) or, where that cannot be
  read, the resident size of ``stat``; ``io`` read_bytes/write_bytes (what reached the
  block layer); tasks (threads) as ``pids.current`` counts them.
A field a source cannot give is None (shown ``-``), never a made-up 0.

CPU % is the CPU time used between two samples over the wall time between them (100 %
is one CPU busy, as with ``docker stats``).  ``top`` shows ``ps``'s %CPU: CPU time over
the process's lifetime.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import time
from pathlib import Path
from typing import Any

from mesobox.instances import state as st

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class Sample:
    """One look at an instance: totals since it started, and when they were read."""

    def __init__(self, name: str, source: str, cpu_ns: int | None, memory: int | None, io_read: int | None,
                 io_write: int | None, pids: int | None) -> None:
        self.name, self.source = name, source
        self.cpu_ns, self.memory, self.io_read, self.io_write, self.pids = cpu_ns, memory, io_read, io_write, pids
        self.at = time.monotonic_ns()

    def row(self, before: Sample | None) -> dict[str, Any]:
        """The JSON row of ``instance stats``; CPU % needs the sample ``before`` this one."""
        percent = None
        if before is not None and self.cpu_ns is not None and before.cpu_ns is not None and self.at > before.at:
            percent = round(100.0 * (self.cpu_ns - before.cpu_ns) / (self.at - before.at), 1)
        return {"name": self.name, "cpu_percent": percent,
                "cpu_seconds": round(self.cpu_ns / 1e9, 2) if self.cpu_ns is not None else None,
                "memory_bytes": self.memory, "io_read_bytes": self.io_read, "io_write_bytes": self.io_write,
                "pids": self.pids, "source": self.source}


# --- /proc ------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _keyed(path: str, sep: str = ":") -> dict[str, int]:
    """``key: number [kB]`` lines (status, io, smaps_rollup) → numbers, kB as bytes."""
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(sep)
            words = value.split()
            if words and words[0].isdigit():
                out[key.strip()] = int(words[0]) * (1024 if words[1:2] == ["kB"] else 1)
    return out


def process_cpu_ns(fields: list[str]) -> int:
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // _TICK  # utime, stime (fields 14, 15)


def process_memory(pid: int, fields: list[str]) -> int:
    """The proportional set size when readable, else the resident size."""
    with contextlib.suppress(OSError):
        pss = _keyed(f"/proc/{pid}/smaps_rollup").get("Pss")
        if pss is not None:
            return pss
    return int(fields[21]) * _PAGE  # rss (field 24), in pages


def from_proc(name: str, pids: list[int]) -> Sample:
    cpu = memory = tasks = 0
    io_read: int | None = 0
    io_write: int | None = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue  # ended while we looked
        cpu += process_cpu_ns(fields)
        memory += process_memory(pid, fields)
        tasks += int(fields[17])  # num_threads (field 20)
        try:
            io = _keyed(f"/proc/{pid}/io")
        except OSError:  # not ours to read (another user's, not dumpable)
            io_read = io_write = None
            continue
        if io_read is not None and io_write is not None:
            io_read += io.get("read_bytes", 0)
            io_write += io.get("write_bytes", 0)
    return Sample(name, "proc", cpu, memory, io_read, io_write, tasks)


# --- cgroups ----------------------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _io_v2(directory: Path) -> tuple[int | None, int | None]:
    try:
        lines = (directory / "io.stat").read_text().splitlines()
    except OSError:
        return None, None
    read = write = 0
    for line in lines:  # "MAJ:MIN rbytes=N wbytes=N rios=N ..."
        pairs = dict(word.split("=", 1) for word in line.split()[1:] if "=" in word)
        read += int(pairs.get("rbytes", 0))
        write += int(pairs.get("wbytes", 0))
    return read, write


def _io_v1(directory: Path | None) -> tuple[int | None, int | None]:
    if directory is None:
        return None, None
    try:
        lines = (directory / "blkio.throttle.io_service_bytes").read_text().splitlines()
    except OSError:
        return None, None
    read = write = 0
    for line in lines:  # "MAJ:MIN Read N", ..., "Total N"
        words = line.split()
        if len(words) == 3 and words[2].isdigit():
            read += int(words[2]) if words[1] == "Read" else 0
            write += int(words[2]) if words[1] == "Write" else 0
    return read, write


def from_cgroup(name: str, record: dict[str, Any]) -> Sample | None:
    """The group's totals; None when its directories are gone."""
    dirs = {k: Path(v) for k, v in record["dirs"].items()}
    if not any(d.is_dir() for d in dirs.values()):
        return None
    if int(record["version"]) == 2:
        top = dirs[""]
        usec = None
        with contextlib.suppress(OSError):
            for line in (top / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    usec = int(line.split()[1])
        read, write = _io_v2(top)
        return Sample(name, "cgroup", usec * 1000 if usec is not None else None, _read_int(top / "memory.current"),
                      read, write, _read_int(top / "pids.current"))
    cpu = _read_int(dirs["cpuacct"] / "cpuacct.usage") if "cpuacct" in dirs else None
    memory = _read_int(dirs["memory"] / "memory.usage_in_bytes") if "memory" in dirs else None
    pids = _read_int(dirs["pids"] / "pids.current") if "pids" in dirs else None
    read, write = _io_v1(dirs.get("blkio"))
    return Sample(name, "cgroup", cpu, memory, read, write, pids)


# --- instances --------------------------------------------------------------------------------


def processes(inst: st.Instance) -> list[int]:
    """The instance's processes: its cgroup's tasks when it has one, else the workload's
    tree (the supervisor itself is not the instance's)."""
    record = inst.state.get("cgroup")
    if record:
        found: set[int] = set()
        for directory in record["dirs"].values():
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (Path(directory) / "cgroup.procs").read_text().split())
        if found:
            return sorted(found)
    pid = inst.workload_pid
    return st.process_tree(pid) if pid is not None else []


def sample(inst: st.Instance) -> Sample:
    """Totals of one instance now, from its cgroup where it has one; the fields the
    cgroup cannot give (a controller not joined) from /proc."""
    pids = processes(inst)
    proc = from_proc(inst.name, pids)
    record = inst.state.get("cgroup")
    group = from_cgroup(inst.name, record) if record else None
    if group is None:
        return proc
    for field in ("cpu_ns", "memory", "io_read", "io_write", "pids"):
        if getattr(group, field) is None:
            setattr(group, field, getattr(proc, field))
    return group


def top(inst: st.Instance) -> list[dict[str, Any]]:
    """One row per process of the instance: pid, user, %CPU (ps's: over its lifetime),
    resident size, command line."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    rows = []
    for pid in processes(inst):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        try:
            uid = _keyed(f"/proc/{pid}/status").get("Uid", -1)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # ended while we looked
        elapsed = uptime - int(fields[19]) / _TICK  # starttime (field 22), in ticks after boot
        cpu_s = process_cpu_ns(fields) / 1e9
        rows.append({"pid": pid, "user": _user(uid), "uid": uid,
                     "cpu_percent": round(100.0 * cpu_s / elapsed, 1) if elapsed > 0 else 0.0,
                     "rss_bytes": int(fields[21]) * _PAGE, "command": " ".join(argv) or f"[{comm}]"})
    return rows


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def human(size: int | None) -> str:
    """Bytes as ``512B``, ``1.5KiB``, ``64.0MiB``…; None as ``-``."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"
