"""Syscall leaf: the one module of the launch room that calls libc directly, and the
symlink-safe lookups (``open_beneath``) made directly with those calls.

Invariants:
- Imports only ``_ctypes`` (the C half of ``ctypes``) and ``os``: it runs on every
  ``mesobox run``, and the ``ctypes`` package costs ≈2 ms of start-up for classes we do
  not need.  The handful of C types used below are declared here the way ``ctypes``
  itself declares them (``_SimpleCData`` subclasses with a type code).
- One libc handle; every function has its argument and result types declared once;
  each wrapper is named after the syscall it makes and raises ``OSError(errno,
  strerror, path)`` on failure — never a status code.  Constants are spelled as in the
  kernel headers so they grep against the man pages (unshare(2), mount(2), umount(2),
  pivot_root(2), prctl(2), setns(2), seccomp(2), mount_setattr(2)).
- ``seccomp.py`` (isolation room) imports the full ``ctypes`` only to compile a
  filter with libseccomp, once per profile; installing the compiled program happens
  here (``seccomp_set_filter``).
"""

from __future__ import annotations

import _ctypes
import os
import stat
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    _Simple = _ctypes._SimpleCData[Any]
else:
    _Simple = _ctypes._SimpleCData

# <linux/sched.h> namespace flags, unshare(2) / setns(2).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
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
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_I_VERSION = 0x800000
MS_STRICTATIME = 0x1000000
MS_LAZYTIME = 0x2000000

# umount(2) flags.
MNT_DETACH = 0x2

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

# <linux/capability.h> capget(2)/capset(2): version 3 takes two 32-bit data words.
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# statvfs f_flag bits (<sys/statvfs.h>) → the mount flags a bind remount must keep:
# mount(2) EPERM "locked" flags in a user namespace (mount_namespaces(7)).
_ST_TO_MS = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC),
             (1024, MS_NOATIME), (2048, MS_NODIRATIME), (4096, MS_RELATIME))

# pivot_root has no glibc wrapper: syscall(2) by number.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "riscv64": 41}


# The C types the calls below take, declared as the ctypes package declares them.
class c_int(_Simple):
    _type_ = "i"


class c_long(_Simple):
    _type_ = "l"


class c_ulong(_Simple):
    _type_ = "L"


class c_uint32(_Simple):
    _type_ = "I"


class c_uint64(_Simple):
    _type_ = "Q"


class c_char_p(_Simple):
    _type_ = "z"


class c_void_p(_Simple):
    _type_ = "P"


class _Libc:
    """What ``ctypes.CDLL(None, use_errno=True)`` is, for the functions below: one
    function-pointer class per result type (creating a class costs more than a call)."""

    _handle = _ctypes.dlopen(None, os.RTLD_NOW)  # type: ignore[arg-type] # None: the program itself, dlopen(3)
    _classes: dict[type, type] = {}

    def function(self, name: str, restype: type, argtypes: list[type]) -> Any:
        cls = self._classes.get(restype)
        if cls is None:
            cls = type(f"Function_{restype.__name__}", (_ctypes.CFuncPtr,),
                       {"_flags_": _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO, "_restype_": restype})
            self._classes[restype] = cls
        fn = cls((name, self))
        fn.argtypes = argtypes
        return fn


_lib = _Libc()
_unshare = _lib.function("unshare", c_int, [c_int])
_setns = _lib.function("setns", c_int, [c_int, c_int])
_mount = _lib.function("mount", c_int, [c_char_p, c_char_p, c_char_p, c_ulong, c_char_p])
_umount2 = _lib.function("umount2", c_int, [c_char_p, c_int])
_prctl = _lib.function("prctl", c_int, [c_int, c_ulong, c_ulong, c_ulong, c_ulong])
_prctl_ptr = _lib.function("prctl", c_int, [c_int, c_ulong, c_void_p, c_ulong, c_ulong])
_sethostname = _lib.function("sethostname", c_int, [c_char_p, c_ulong])
_syscall3 = _lib.function("syscall", c_long, [c_long, c_char_p, c_char_p])
_syscall_openat2 = _lib.function("syscall", c_long, [c_long, c_int, c_char_p, c_void_p, c_ulong])
_capget = _lib.function("capget", c_int, [c_void_p, c_void_p])
_capset = _lib.function("capset", c_int, [c_void_p, c_void_p])


def _check(result: int, path: str | None = None) -> None:
    if result < 0:
        err = _ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def _b(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def unshare(flags: int) -> None:
    _check(_unshare(flags))


def setns(fd: int, nstype: int) -> None:
    _check(_setns(fd, nstype))


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_mount(_b(source), _b(target), _b(fstype), flags, _b(data)), target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_umount2(_b(target), flags), target)


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(38, f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(_syscall3(number, _b(new_root), _b(put_old)), new_root)


def prctl(option: int, arg2: int = 0) -> None:
    _check(_prctl(option, arg2, 0, 0, 0))


def _words(*values: int) -> Any:
    """Eight zero-filled 32-bit words: the one array type used here (each new array
    type costs a class creation at start-up)."""
    return (c_uint32 * 8)(*values)


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread, as 64-bit masks."""
    words = _words(_LINUX_CAPABILITY_VERSION_3, 0)  # header (2 words), then data (6)
    address = _ctypes.addressof(words)
    _check(_capget(address, address + 8))
    data = words[2:]
    return tuple(data[i] | (data[i + 3] << 32) for i in range(3))  # type: ignore[return-value]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    masks = (effective, permitted, inheritable)
    words = _words(_LINUX_CAPABILITY_VERSION_3, 0, *[m & 0xFFFFFFFF for m in masks], *[m >> 32 for m in masks])
    address = _ctypes.addressof(words)
    _check(_capset(address, address + 8))


def drop_capabilities(keep: frozenset[int]) -> None:
    """Shrink the bounding and inheritable sets to ``keep`` and clear the ambient set.

    Called while the process still holds CAP_SETPCAP (prctl(2) PR_CAPBSET_DROP) and
    before the user switch (which needs CAP_SETUID).  Permitted/effective are left to
    execve: for uid 0 they become (file caps ∩ bounding) or (inheritable ∩ file
    inheritable) ⊆ ``keep``; a non-root uid keeps only its ambient set, now empty
    (capabilities(7), "Transformation of capabilities during execve()")."""
    for cap in range(64):  # capabilities are numbered densely: EINVAL is past the last one
        if cap not in keep and _prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            if _ctypes.get_errno() == 22:
                break
            _check(-1)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL before Linux 4.3: nothing to clear
    mask = sum(1 << c for c in keep)
    effective, permitted, inheritable = capget()
    capset(effective, permitted, inheritable & mask)


def unavailable_capabilities(wanted: int) -> int:
    """The capabilities of ``wanted`` this process does not hold though the kernel has
    them (prctl(2) PR_CAPBSET_READ says EINVAL only for one it lacks)."""
    _, permitted, _ = capget()
    missing = wanted & ~permitted
    return sum(1 << cap for cap in range(64) if missing >> cap & 1 and _prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0)


def raise_ambient_capabilities() -> None:
    """Raise this process's permitted capabilities into its ambient set, so that a
    helper it execs keeps them though its uid is not 0 (capabilities(7)): in a
    container they are its user namespace's, nothing on the host.  Best effort: a
    kernel without ambient capabilities runs the helper without them."""
    if os.getuid() == 0:
        return  # root keeps its permitted set across execve
    try:
        effective, permitted, _inheritable = capget()
        capset(effective, permitted, permitted)
        for cap in range(64):
            if permitted >> cap & 1:
                _prctl(PR_CAP_AMBIENT, 2, cap, 0, 0)  # PR_CAP_AMBIENT_RAISE
    except OSError:
        pass


def set_capabilities(effective: int, permitted: int, inheritable: int, ambient: int) -> None:
    """The config's exact capability sets (OCI process.capabilities), after the user
    switch: capset(2) the three thread sets, then raise each ambient one.  An ambient
    capability that is not both permitted and inheritable cannot be raised
    (prctl(2) PR_CAP_AMBIENT_RAISE: EPERM) and is left out, as runc leaves it out (its
    own `runc spec` asks for ambient capabilities without inheritable ones)."""
    capset(effective, permitted, inheritable)
    for cap in range(64):
        if ambient >> cap & 1 and permitted & inheritable >> cap & 1:
            _check(_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0))


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_sethostname(raw, len(raw)))


def locked_flags(path: str | int) -> int:
    """Mount flags of the mount holding ``path`` (or the fd, O_PATH included) that a
    bind remount must repeat."""
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in _ST_TO_MS if f_flag & st)


# <linux/seccomp.h>, prctl(2) PR_SET_SECCOMP
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


def seccomp_set_filter(program: bytes) -> None:
    """Install a compiled classic-BPF seccomp program (an array of 8-byte
    ``struct sock_filter``) in this thread; needs no_new_privs or CAP_SYS_ADMIN."""
    if not program or len(program) % 8 or len(program) // 8 > 4096:  # BPF_MAXINSNS
        raise OSError(22, "not a seccomp BPF program", None)
    filters = c_char_p(program)  # a pointer to program's own bytes, kept alive by it
    address = c_void_p.from_buffer(filters).value or 0
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; } (64-bit ABI)
    raw = (len(program) // 8).to_bytes(2, sys.byteorder) + bytes(6) + address.to_bytes(8, sys.byteorder)
    fprog = (c_uint32 * 8).from_buffer_copy(raw + bytes(16))
    _check(_prctl_ptr(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, _ctypes.addressof(fprog), 0, 0))
    del filters  # only now may program's pointer go


# openat2(2): one syscall to resolve a path with no symlink and no escape from dirfd
# (Linux 5.6; the same number on every architecture).
_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_openat2_missing = False  # ENOSYS once: an older kernel, do not ask again


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int | None:
    """fd of ``path`` under ``dirfd``, resolved under ``resolve`` rules; None when the
    kernel has no openat2 (callers then walk the path themselves)."""
    global _openat2_missing
    if _openat2_missing:
        return None
    how = (c_uint64 * 3)(flags, 0, resolve)  # struct open_how { flags, mode, resolve }
    fd: int = _syscall_openat2(_SYS_OPENAT2, dirfd, os.fsencode(path), _ctypes.addressof(how), 24)
    if fd < 0 and _ctypes.get_errno() == 38:  # ENOSYS
        _openat2_missing = True
        return None
    _check(fd, path)
    return fd


# mount_setattr(2) (Linux 5.12): change a mount's flags, with AT_RECURSIVE those of every
# mount below it too, where mount(MS_REMOUNT|MS_BIND) changes one mount only.  Like
# openat2, one number on every architecture; declared on first use (start-up cost).
_SYS_MOUNT_SETATTR = 442
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
# <linux/mount.h> MOUNT_ATTR_* for the MS_* flags a bind may add.
_MS_TO_ATTR = ((MS_RDONLY, 0x1), (MS_NOSUID, 0x2), (MS_NODEV, 0x4), (MS_NOEXEC, 0x8))
_mount_setattr: Any = None
_mount_setattr_missing = False


def mount_setattr(fd: int, flags: int, recursive: bool) -> bool:
    """Add the MS_RDONLY/NOSUID/NODEV/NOEXEC bits of ``flags`` to the mount ``fd`` is
    on (and with ``recursive`` to every mount below it), clearing nothing: other flags,
    locked ones included, stay as they are.  False when the kernel has no mount_setattr
    (ENOSYS; callers then remount mount by mount)."""
    global _mount_setattr, _mount_setattr_missing
    if _mount_setattr_missing:
        return False
    if _mount_setattr is None:
        _mount_setattr = _lib.function("syscall", c_long, [c_long, c_int, c_char_p, c_uint32, c_void_p, c_ulong])
    attr = (c_uint64 * 4)(sum(a for ms, a in _MS_TO_ATTR if flags & ms), 0, 0, 0)  # struct mount_attr (VER0)
    how = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    result: int = _mount_setattr(_SYS_MOUNT_SETATTR, fd, b"", how, _ctypes.addressof(attr), 32)
    if result < 0 and _ctypes.get_errno() == 38:  # ENOSYS
        _mount_setattr_missing = True
        return False
    _check(result)
    return True


def install_seccomp(program: bytes, no_new_privs: bool = True) -> None:
    """Load a compiled filter (seccomp.prepare) into this process.  ``no_new_privs``
    False: a config that asks for a filter without no_new_privs, loaded while the
    process still holds CAP_SYS_ADMIN (runc loads it before dropping capabilities)."""
    try:
        if no_new_privs:
            # libseccomp's seccomp_load set no_new_privs itself (SCMP_FLTATR_CTL_NNP is on
            # by default, seccomp_attr_set(3)); the kernel demands it without CAP_SYS_ADMIN.
            prctl(PR_SET_NO_NEW_PRIVS, 1)
        seccomp_set_filter(program)
    except OSError as err:
        from mesobox.errors import LaunchError

        raise LaunchError(
            f"cannot load the seccomp filter: {err.strerror}",
            hint="the kernel needs CONFIG_SECCOMP_FILTER; set no_new_privs before loading",
        ) from None


# --- paths below a root, reached without following a symlink -------------------------------
# ``open_beneath`` resolves with openat2(RESOLVE_BENEATH|NO_SYMLINKS|NO_MAGICLINKS) and,
# where that refuses, walks one component at a time with O_NOFOLLOW so that the error
# names the offending component: the one way mesobox opens what an image or a bind
# holds.  ``hold_root`` keeps one O_PATH fd per root for a burst of lookups (the
# compile step's probes).

O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_held: dict[str, int] = {}  # root directory -> its O_PATH fd (hold_root)


def _launch_error(message: str, hint: str | None = None) -> Exception:
    from mesobox.errors import LaunchError  # only when something fails: ≈0.5 ms otherwise

    return LaunchError(message, hint=hint)


def write_file(path: str, text: str) -> None:
    """One write(2) of ``text``: what /proc's map files demand."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def hold_root(root: str) -> None:
    """Keep an O_PATH fd of ``root`` for open_beneath to start from (one open(2) saved
    per lookup) until ``release_roots`` — which every mount *on* the root calls: the
    held fd would name the directory the new mount covers."""
    if root not in _held:
        _held[root] = os.open(root, O_PATH_FLAGS | os.O_DIRECTORY)


def release_roots() -> None:
    while _held:
        os.close(_held.popitem()[1])


def open_beneath(root: str, rel: str, create: str | None = None) -> int:
    """O_PATH fd of ``root/rel`` without following symlinks; ``create`` = "dir"/"file"
    makes a missing last component (and missing parent directories)."""
    held = _held.get(root)
    fd = held if held is not None else os.open(root, O_PATH_FLAGS | os.O_DIRECTORY)
    try:
        # The common case in one syscall; any refusal (missing, a symlink anywhere,
        # the last component included: no O_NOFOLLOW here, so RESOLVE_NO_SYMLINKS
        # refuses it with ELOOP; not a directory) is walked again below, component by
        # component, for its message.
        found = openat2(fd, rel.strip("/") or ".", os.O_PATH | os.O_CLOEXEC, _BENEATH)
    except FileNotFoundError:
        # A mount point to make (/dev/null in the fresh /dev tmpfs): when its parent
        # resolves, create it there and resolve it again, still beneath the root.
        found = _create_beneath(fd, rel.strip("/"), create) if create else None
    except OSError:
        found = None
    except BaseException:
        if held is None:
            os.close(fd)
        raise
    if held is None:
        os.close(fd)
    if found is not None:
        return found
    fd = os.open(root, O_PATH_FLAGS | os.O_DIRECTORY)  # the walk below closes what it leaves
    parts = [p for p in rel.split("/") if p and p != "."]
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(name, O_PATH_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create is None:
                    raise
                _create(fd, name, "file" if last and create == "file" else "dir")
                nxt = os.open(name, O_PATH_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise _launch_error(
                    f"refusing to mount on /{rel}: /{'/'.join(parts[:i + 1])} is a symlink in the image",
                    hint="images may not redirect the runtime's mount points; bind to the link's target instead",
                )
            if not last and not stat.S_ISDIR(mode):
                raise _launch_error(f"cannot mount on /{rel}: /{'/'.join(parts[:i + 1])} is not a directory")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_beneath(root_fd: int, rel: str, kind: str) -> int | None:
    """fd of ``rel`` created as ``kind`` in its existing parent, or None (the caller
    then walks the path component by component)."""
    parent, _, name = rel.rpartition("/")
    try:
        parent_fd = openat2(root_fd, parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, _BENEATH)
    except OSError:
        return None
    if parent_fd is None:
        return None
    try:
        _create(parent_fd, name, kind)
        return openat2(parent_fd, name, os.O_PATH | os.O_CLOEXEC, _BENEATH)
    except Exception:  # refused or raced: the walk below says why
        return None
    finally:
        os.close(parent_fd)


def _create(dir_fd: int, name: str, kind: str) -> None:
    try:
        if kind == "dir":
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        else:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644, dir_fd=dir_fd))
    except FileExistsError:
        pass
    except OSError as err:
        raise _launch_error(f"cannot create mount point {name!r}: {err.strerror}") from None


def mountinfo_path(field: str) -> str:
    r"""A mountinfo path: space, tab, newline and backslash are written \ooo (octal)."""
    if "\\" not in field:
        return field
    head, *rest = field.split("\\")
    return head + "".join(chr(int(part[:3], 8)) + part[3:] for part in rest)
