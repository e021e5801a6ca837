"""What this host offers the tests, probed once: its cgroups, CRIU, a GPU, kernel features.

A test that depends on one of these carries a ready marker from here (``needs_*``): a
``pytest.mark.skipif`` whose reason names what this host lacks, so a skipped test
explains itself in the ``-ra`` summary.  Skips are only for properties of the host that
no install step changes (its kernel, its hardware, how its cgroups are laid out); a
missing *tool* fails instead (conftest.need_tool), because scripts/setup-host.sh
installs every tool the tests use.

The probes only read (/proc, /sys, ``criu check``): importing this changes nothing.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

CGROUP_ROOT = Path("/sys/fs/cgroup")
KERNEL = f"{platform.release()} ({platform.machine()})"
# The controllers cgroup v2 has (cgroup-v2.rst, "Controllers"; perf_event has no files).
V2_CONTROLLERS = frozenset({"cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc"})
# The v1 name of a controller cgroup v2 names otherwise.
_V1_NAME = {"io": "blkio"}
# v1 controllers whose work cgroup v2 does in every group, with nothing to enable:
# freezing (cgroup.freeze) and CPU accounting (cpu.stat).
_V2_CORE = frozenset({"freezer", "cpuacct"})


# --- cgroups -----------------------------------------------------------------------------


@functools.cache
def cgroup_version() -> int:
    """How mesobox sees /sys/fs/cgroup (isolation/cgroups.py decides the same way): 2
    where it is a cgroup2 mount, 1 where it holds v1 hierarchies, 0 where neither."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return 2
    if CGROUP_ROOT.is_dir() and any((d / "cgroup.procs").exists() for d in CGROUP_ROOT.iterdir()):
        return 1
    return 0


def cgroup_layout() -> str:
    """This host's layout in words, for skip reasons."""
    kind = {0: "no cgroup filesystem", 1: "cgroup v1", 2: "cgroup v2"}[cgroup_version()]
    return f"{kind} at {CGROUP_ROOT}"


@functools.cache
def cgroup_controllers() -> frozenset[str]:
    """What real root can use at /sys/fs/cgroup: the v1 hierarchies mounted there by
    name, or what the cgroup2 root offers (its cgroup.controllers)."""
    if cgroup_version() == 2:
        return frozenset((CGROUP_ROOT / "cgroup.controllers").read_text().split())
    if cgroup_version() == 1:
        return frozenset(d.name for d in CGROUP_ROOT.iterdir() if (d / "cgroup.procs").exists())
    return frozenset()


def missing_controllers(*names: str) -> list[str]:
    """Which of ``names`` (v2 names, plus ``freezer`` and ``cpuacct``) root cannot use here."""
    version, have = cgroup_version(), cgroup_controllers()
    if version == 1:
        return [n for n in names if _V1_NAME.get(n, n) not in have]
    if version == 2:
        return [n for n in names if n not in have and n not in _V2_CORE]
    return list(names)


def needs_cgroup(*names: str) -> pytest.MarkDecorator:
    """Skip unless root can limit with every controller in ``names`` on this host."""
    missing = missing_controllers(*names)
    offered = " ".join(sorted(cgroup_controllers())) or "nothing"
    return pytest.mark.skipif(
        bool(missing),
        reason=f"needs the cgroup controller(s) {' '.join(missing)}: this host has {cgroup_layout()}, "
               f"offering {offered}")


needs_cgroup_v1 = pytest.mark.skipif(
    cgroup_version() != 1,
    reason=f"about cgroup v1, where nothing can be delegated to a user; this host has {cgroup_layout()}")


@functools.cache
def cgroup2_filesystem() -> bool:
    """Whether this kernel can mount a cgroup2 hierarchy at all (/proc/filesystems)."""
    try:
        lines = Path("/proc/filesystems").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[-1:] == ["cgroup2"] for line in lines)


needs_cgroup2_fs = pytest.mark.skipif(
    not cgroup2_filesystem(), reason=f"kernel {KERNEL} has no cgroup2 filesystem (/proc/filesystems)")


@functools.cache
def bound_to_v1() -> frozenset[str]:
    """Controllers (v2 names) a cgroup v1 hierarchy holds on this host, which no cgroup2
    mount can offer while it does (/proc/cgroups: a non-zero hierarchy id)."""
    bound = set()
    try:
        lines = Path("/proc/cgroups").read_text().splitlines()[1:]
    except OSError:
        return frozenset()
    for line in lines:
        name, hierarchy, *_ = line.split()
        name = {"blkio": "io"}.get(name, name)
        if hierarchy != "0" and name in V2_CONTROLLERS:
            bound.add(name)
    return frozenset(bound)


# --- CRIU --------------------------------------------------------------------------------


@functools.cache
def criu_check(user: str | None = None) -> tuple[bool, str]:
    """(works, why) from ``criu check`` run as ``user`` (with runuser) or as root: what
    instances/checkpoint.py asks before a checkpoint.  ``why`` is criu's last line."""
    tool = shutil.which("criu") or next(
        (p for p in ("/usr/sbin/criu", "/sbin/criu") if os.access(p, os.X_OK)), None)
    if tool is None:
        return False, "criu is not installed"
    argv = [tool, "check"] if user is None else ["runuser", "-u", user, "--", tool, "check"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/", check=False)
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0 and "Error" not in text:
        return True, "`criu check` passes"
    last = text.splitlines()[-1] if text else f"exit {proc.returncode}"
    return False, f"`criu check` fails on kernel {KERNEL}{' as ' + user if user else ''}: {last}"


# --- GPU ---------------------------------------------------------------------------------


@functools.cache
def gpu_devices() -> tuple[str, ...]:
    """Device nodes of a GPU: NVIDIA's /dev/nvidiaN, or a DRM render node."""
    return tuple(sorted(glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/dri/renderD*")))


needs_gpu = pytest.mark.skipif(
    not gpu_devices(), reason="no GPU on this host: no /dev/nvidia[0-9]* or /dev/dri/renderD* device node")


# --- kernel features ---------------------------------------------------------------------


@functools.cache
def mount_setattr_exists() -> bool:
    """mount_setattr(2), Linux 5.12: a kernel that has it answers a bad fd with EBADF,
    one without it with ENOSYS.  442 is its number on x86_64 and in asm-generic (aarch64)."""
    if platform.machine() not in ("x86_64", "aarch64"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(442), -1, b"", 0, None, 0)
    return not (rc == -1 and ctypes.get_errno() == errno.ENOSYS)


needs_mount_setattr = pytest.mark.skipif(
    not mount_setattr_exists(),
    reason=f"kernel {KERNEL} has no mount_setattr(2) (Linux 5.12): only the fallback runs here")


@functools.cache
def unprivileged_userns() -> tuple[bool, str]:
    """(allowed, why): may an ordinary user make user namespaces, by the kernel's switches?"""
    switches = (
        ("/proc/sys/user/max_user_namespaces", "0", "no user namespaces at all"),
        ("/proc/sys/kernel/unprivileged_userns_clone", "0", "Debian's switch for unprivileged ones is off"),
        ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1", "AppArmor restricts unprivileged ones"),
    )
    for path, off, what in switches:
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue  # this kernel has no such switch
        if value == off:
            return False, f"{path} is {value}: {what}"
    return True, "unprivileged user namespaces are allowed"
