"""Syscall leaf: the one module of the runtime that imports ``ctypes``.

Invariants:
- Imports only ``ctypes``, ``os`` and ``errno``: it runs on every ``mesobox run``.
- One ``libc`` handle with ``argtypes`` declared once; each wrapper is named after the
  syscall it makes and raises ``OSError(errno, strerror, path)`` on failure — never a
  status code.  Constants are spelled as in the kernel headers so they grep against
  the man pages (unshare(2), mount(2), umount(2), pivot_root(2), prctl(2), setns(2)).
- ``seccomp.py`` (isolation room) is the only other ctypes user; nothing else is.
"""

from __future__ import annotations

import ctypes
import os

# <linux/sched.h> namespace flags, unshare(2) / setns(2).
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <linux/mount.h> mount(2) flags.
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_RELATIME = 0x200000

# umount(2) flags.
MNT_DETACH = 0x2

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# <linux/capability.h> capget(2)/capset(2): version 3 takes two 32-bit data words.
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# statvfs f_flag bits (<sys/statvfs.h>) → the mount flags a bind remount must keep:
# mount(2) EPERM "locked" flags in a user namespace (mount_namespaces(7)).
_ST_TO_MS = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC),
             (1024, MS_NOATIME), (2048, MS_NODIRATIME), (4096, MS_RELATIME))

# pivot_root has no glibc wrapper: syscall(2) by number.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "riscv64": 41}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.syscall.restype = ctypes.c_long
_libc.capget.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]


def _check(result: int, path: str | None = None) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def _b(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags))


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype))


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), target)


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(38, f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(_libc.syscall(number, _b(new_root), _b(put_old)), new_root)


def prctl(option: int, arg2: int = 0) -> None:
    _check(_libc.prctl(option, arg2, 0, 0, 0))


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread, as 64-bit masks."""
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(_libc.capget(header, data))
    return tuple(data[i] | (data[i + 3] << 32) for i in range(3))  # type: ignore[return-value]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    masks = (effective, permitted, inheritable)
    data = (ctypes.c_uint32 * 6)(*[m & 0xFFFFFFFF for m in masks], *[m >> 32 for m in masks])
    _check(_libc.capset(header, data))


def drop_capabilities(keep: frozenset[int]) -> None:
    """Shrink the bounding and inheritable sets to ``keep`` and clear the ambient set.

    Called while the process still holds CAP_SETPCAP (prctl(2) PR_CAPBSET_DROP) and
    before the user switch (which needs CAP_SETUID).  Permitted/effective are left to
    execve: for uid 0 they become (file caps ∩ bounding) or (inheritable ∩ file
    inheritable) ⊆ ``keep``; a non-root uid keeps only its ambient set, now empty
    (capabilities(7), "Transformation of capabilities during execve()")."""
    last = 0
    while _libc.prctl(PR_CAPBSET_READ, last + 1, 0, 0, 0) >= 0:
        last += 1
    for cap in range(last + 1):
        if cap not in keep:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0))
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL before Linux 4.3: nothing to clear
    mask = sum(1 << c for c in keep)
    effective, permitted, inheritable = capget()
    capset(effective, permitted, inheritable & mask)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)))


def locked_flags(path: str) -> int:
    """Mount flags of the filesystem holding ``path`` that a bind remount must repeat."""
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in _ST_TO_MS if f_flag & st)
