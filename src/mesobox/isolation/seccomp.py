"""System-call filter room: seccomp, compiled once with libseccomp, installed last.

Invariants:
- ``prepare`` runs in the launcher *before* pivot_root, while the host's files are
  visible: it returns the filter as a classic-BPF program (the bytes libseccomp's
  ``seccomp_export_bpf`` writes).  ``syscalls.install_seccomp`` loads those bytes in the
  container's process after ``no_new_privs`` and right before ``execve`` (runc order:
  seccomp last, so the runtime's own setup syscalls are never filtered).  Once loaded
  a filter cannot be removed (seccomp(2)).
- Compiled programs are cached per user in ``<runtime_dir>/seccomp/<key>.bpf``
  (``config.runtime_dir``: ``$XDG_RUNTIME_DIR/mesobox`` or ``/tmp/mesobox-UID``).  A
  launch that finds its key reads one small file and never loads libseccomp or
  ``ctypes`` (≈5 ms saved per rank); a miss compiles, writes the file atomically
  (0600 temp file, fsync, rename) and goes on.  The key changes with everything that
  changes the program: the rules (``DEFAULT_DENIED`` and its errno, or a profile's
  full canonical JSON plus the kernel release its ``minKernel`` rules test), the
  machine (``os.uname().machine``), the libseccomp file (size, mtime) and ``FORMAT``,
  bumped whenever the compile code below changes what it emits.
- Why a file the launcher installs as the filter is safe: it is read only if the
  cache directory and the file are owned by the current euid and not writable by
  group or others (opened with O_NOFOLLOW), i.e. only the user themself (or root) can
  have put it there — and that user may drop the filter anyway with
  ``--security-opt seccomp=unconfined``; the filter protects the host from the
  user's workload, not the user from themself.  Anything else (another owner, a
  group/world-writable file, a symlink, a size that is not a non-zero multiple of 8
  bytes or over BPF_MAXINSNS) is ignored and recompiled.  Caching is an
  optimisation, never a failure: an unwritable, read-only or foreign cache directory
  (nested containers often have one) means compiling in memory for this launch.
- The default filter allows everything except what Docker's default profile denies
  to a container without extra capabilities (kernel keyring, module loading, kexec,
  bpf, perf_event_open, clock setting, swap, reboot…), each answered with EPERM so
  programs see an ordinary permission error rather than a kill.  Unlike Docker it
  keeps ``unshare``/``clone(CLONE_NEWUSER)``, ``mount``, ``umount2``, ``pivot_root``
  and ``setns``: an unprivileged process may only use them inside its own user
  namespace, and nested mesobox/Apptainer/Podman need them (Podman lets them
  through for rootless containers for the same reason).  See docs/isolation.md.
- A Docker-format profile (``defaultAction``, ``syscalls[].names|name``, ``action``,
  ``errnoRet``, ``args``, ``architectures``/``archMap``, ``includes``/``excludes``)
  is translated rule by rule; unknown syscall names are skipped, as Docker does.
- ``ctypes`` (libseccomp has no stdlib binding) is imported only to compile, on a
  cache miss; a cache hit costs an open, a read and ``zlib.crc32``.  The compiled
  program is loaded by ``syscalls.seccomp_set_filter``.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import zlib

from mesobox.errors import LaunchError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes
    from collections.abc import Sequence
    from typing import Any

# Part of every cache key: bump it when the compile code changes the program it emits
# for the same rules (arches added, rule translation, libseccomp attributes).
FORMAT = 1
_SONAME = "libseccomp.so.2"
# Where the dynamic loader finds _SONAME on the distributions we know: its size and
# mtime key the cache, so a libseccomp upgrade (new syscall names) recompiles.
_LIB_DIRS = ("/lib/{multiarch}", "/usr/lib/{multiarch}", "/lib64", "/usr/lib64", "/usr/lib", "/lib")
_MAX_PROGRAM = 4096 * 8  # BPF_MAXINSNS instructions of 8 bytes (struct sock_filter)

# <seccomp.h> action values.
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_KILL_THREAD = 0x00000000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_ERRNO = 0x00050000
SCMP_ACT_TRACE = 0x7FF00000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ALLOW = 0x7FFF0000
# enum scmp_compare
_COMPARE = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}
_NR_SCMP_ERROR = -1

# Denied with EPERM by the default filter (Docker's default profile denies these to a
# container without CAP_SYS_ADMIN/SYS_MODULE/SYS_TIME/SYS_BOOT/…; moby profiles/seccomp).
DEFAULT_DENIED = (
    # kernel keyring: not namespaced, shared with the host user (CVE-2016-0728 family)
    "add_key",
    "keyctl",
    "request_key",
    # loading code into the kernel
    "bpf",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "kexec_load",
    "kexec_file_load",
    # performance counters can leak kernel addresses; HPC profiling needs --security-opt seccomp=unconfined
    "perf_event_open",
    # file handles bypass the mount namespace (the "shocker" escape, CVE-2014-3519 class)
    "open_by_handle_at",
    "name_to_handle_at",
    # raw I/O ports and legacy modes
    "iopl",
    "ioperm",
    "vm86",
    "vm86old",
    # host-global state: clocks, swap, accounting, quotas, reboot
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "reboot",
    # obsolete or historically buggy interfaces
    "lookup_dcookie",
    "nfsservctl",
    "get_kernel_syms",
    "query_module",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    # userfaultfd makes kernel races easy to win; io_uring bypasses seccomp for its
    # operations (Docker denies both since moby 20.10 / 25.0)
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)
# personality(2) stays allowed: Docker filters its flags, but libseccomp cannot express
# "has flag X and is not the 0xffffffff query" in one rule, and denying the query
# breaks debuggers.  Its dangerous use, mapping page zero (MMAP_PAGE_ZERO), is already
# refused by the kernel's vm.mmap_min_addr; ADDR_NO_RANDOMIZE only weakens the
# container's own ASLR and gdb/valgrind rely on it.


# --- the launcher's two steps ------------------------------------------------------


def prepare(profile: dict[str, Any] | None, cache_dir: str) -> bytes | None:
    """The compiled filter for ``profile`` (None: mesobox's default; a dict: a
    Docker-format profile), from ``cache_dir`` when a valid copy is there, else
    compiled and cached; None for ``{"unconfined": True}``.  Runs before pivot_root."""
    if profile is not None and profile.get("unconfined"):
        return None
    name = _cache_name(profile)
    program = _read_cached(cache_dir, name)
    if program is None:
        program = compile_program(profile)
        _save_cached(cache_dir, name, program)
    return program


def load_filter(profile: dict[str, Any] | None) -> None:
    """Compile and install in one go, without the cache (test harnesses, tools)."""
    program = None if profile is not None and profile.get("unconfined") else compile_program(profile)
    if program is not None:
        from mesobox.launch.syscalls import install_seccomp

        install_seccomp(program)


# --- the cache --------------------------------------------------------------------------


def _cache_name(profile: dict[str, Any] | None) -> str:
    machine = os.uname().machine
    if profile is None:
        # A crc of the rules is enough here: the input is our own constant, not chosen
        # by anyone, and zlib is builtin (hashlib would load OpenSSL: ≈5 ms).
        text = repr((FORMAT, machine, _library_stamp(), errno.EPERM, DEFAULT_DENIED))
        return f"default-{machine}-{len(DEFAULT_DENIED)}-{len(text)}-{zlib.crc32(text.encode()):08x}.bpf"
    import json  # already loaded: the profile was read (or the spec parsed) with it

    try:
        from _blake2 import blake2b  # hashlib's builtin half, without its OpenSSL load
    except ImportError:
        from hashlib import blake2b
    canonical = json.dumps(profile, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    text = repr((FORMAT, machine, _library_stamp(), os.uname().release, canonical))
    return f"profile-{machine}-{blake2b(text.encode(), digest_size=16).hexdigest()}.bpf"


def _library_stamp() -> str:
    """Size and mtime of the libseccomp a compile would load ("?" if not found in the
    usual directories: then an upgrade needs ``rm -r <runtime_dir>/seccomp``).  Asked
    through probe.py: a saved launch program holds the compiled filter, so a library
    upgrade must make it compile again too."""
    from mesobox.launch import probe

    multiarch = getattr(sys.implementation, "_multiarch", "")
    for pattern in _LIB_DIRS:
        identity = probe.file_identity(os.path.join(pattern.format(multiarch=multiarch), _SONAME))
        if identity is not None:
            return f"{identity[2]}:{identity[3]}"
    return "?"


def _private(st: os.stat_result) -> bool:
    """Owned by us and writable by nobody else: only we (or root) wrote what is in it."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _open_cache_dir(cache_dir: str) -> int | None:
    try:
        fd = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    if not _private(os.fstat(fd)):
        os.close(fd)
        return None
    return fd


def _read_cached(cache_dir: str, name: str) -> bytes | None:
    """The cached program, or None if it is missing or anything about it is off."""
    dir_fd = _open_cache_dir(cache_dir)
    if dir_fd is None:
        return None
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the launch.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and _private(st) and 0 < st.st_size <= _MAX_PROGRAM
                and st.st_size % 8 == 0):
            return None
        program = os.read(fd, _MAX_PROGRAM + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return program if len(program) == st.st_size else None


def _save_cached(cache_dir: str, name: str, program: bytes) -> None:
    """Best effort: write ``program`` under ``name`` atomically; any failure (read-only
    or foreign directory, ENOSPC…) only means the next launch compiles again."""
    from mesobox import paths

    top = os.path.dirname(cache_dir)
    if not os.path.isdir(os.path.dirname(top)):
        return  # the runtime dir is made (one level), never a whole missing path
    try:  # the runtime dir must be private (paths.runtime_dir), then ours below it
        paths.private_subdir(top, os.path.basename(cache_dir))
    except Exception:  # OSError, UnsafeDirectory: no cache, compile every time
        return
    dir_fd = _open_cache_dir(cache_dir)
    if dir_fd is None:
        return
    from mesobox.files import write_atomic

    try:  # durable: complete before it has its name, even after a crash
        write_atomic(name, program, durable=True, dir_fd=dir_fd)
    except OSError:
        pass  # no cache: the next launch compiles again
    finally:
        os.close(dir_fd)


# --- compiling with libseccomp ------------------------------------------------------


def compile_program(profile: dict[str, Any] | None) -> bytes:
    """Build the filter for ``profile`` (None: the default) with libseccomp and return
    it as exported BPF; LaunchError on any libseccomp failure."""
    if profile is None:
        flt = _Filter(SCMP_ACT_ALLOW)
        try:
            _add_native_and_compat(flt)
            _default_rules(flt)
            return flt.export()
        finally:
            flt.release()
    flt = _Filter(_docker_action(profile.get("defaultAction", ""), profile.get("defaultErrnoRet")))
    try:
        _docker_arches(flt, profile)
        _docker_rules(flt, profile)
        return flt.export()
    finally:
        flt.release()


def _libseccomp() -> tuple[ctypes.CDLL, type[ctypes.Structure]]:
    """libseccomp with its argument types declared, and ``struct scmp_arg_cmp``."""
    import ctypes

    class ArgCmp(ctypes.Structure):
        _fields_ = [
            ("arg", ctypes.c_uint),
            ("op", ctypes.c_int),
            ("datum_a", ctypes.c_uint64),
            ("datum_b", ctypes.c_uint64),
        ]

    try:
        # A fixed soname: ctypes.util.find_library would fork ldconfig (tens of ms).
        lib = ctypes.CDLL(_SONAME, use_errno=True)
    except OSError:
        raise LaunchError(
            "seccomp filtering needs libseccomp, which is not installed",
            hint="install libseccomp2 (Debian/Ubuntu) or libseccomp (RHEL), or run with "
            "--security-opt seccomp=unconfined",
        ) from None
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.restype = None
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    return lib, ArgCmp


class _Filter:
    """A libseccomp context; every failure becomes LaunchError naming the rule."""

    def __init__(self, default_action: int) -> None:
        self.lib, self.arg_cmp = _libseccomp()
        self.default_action = default_action
        self.ctx = self.lib.seccomp_init(default_action)
        if not self.ctx:
            raise LaunchError("seccomp_init failed", hint="libseccomp may be too old for this kernel")

    def add_arch(self, name: str) -> None:
        token = self.lib.seccomp_arch_resolve_name(name.encode())
        if token == 0:
            return  # an architecture this libseccomp does not know cannot run here anyway
        rc = self.lib.seccomp_arch_add(self.ctx, token)
        if rc not in (0, -errno.EEXIST):
            raise LaunchError(f"seccomp: cannot add architecture {name}: {os.strerror(-rc)}")

    def add_rule(self, action: int, syscall: str, args: Sequence[tuple[int, int, int, int]] = ()) -> None:
        if action == self.default_action:
            return  # libseccomp refuses rules that repeat the default (EACCES)
        number = self.lib.seccomp_syscall_resolve_name(syscall.encode())
        if number == _NR_SCMP_ERROR:
            return  # not a syscall on this architecture / libseccomp version
        array = (self.arg_cmp * max(1, len(args)))(*(self.arg_cmp(*a) for a in args))
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, number, len(args), array)
        if rc < 0:
            raise LaunchError(f"seccomp: cannot add rule for {syscall}: {os.strerror(-rc)}")

    def export(self) -> bytes:
        """The program as BPF, through a memfd (a pipe could fill up and block)."""
        fd = os.memfd_create("mesobox-seccomp", os.MFD_CLOEXEC)
        try:
            rc = self.lib.seccomp_export_bpf(self.ctx, fd)
            if rc < 0:
                raise LaunchError(f"cannot export the seccomp filter: {os.strerror(-rc)}")
            size = os.lseek(fd, 0, os.SEEK_CUR)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)

    def release(self) -> None:
        self.lib.seccomp_release(self.ctx)


def _errno_action(value: int | None) -> int:
    return SCMP_ACT_ERRNO | ((errno.EPERM if value is None else value) & 0xFFFF)


def _add_native_and_compat(flt: _Filter) -> None:
    # On x86_64 also filter the i386 and x32 entry points, or a 32-bit binary (or
    # `int 0x80`) would reach the denied calls by another door (Docker does the same).
    if os.uname().machine == "x86_64":
        flt.add_arch("x86")
        flt.add_arch("x32")
    elif os.uname().machine == "aarch64":
        flt.add_arch("arm")


def _default_rules(flt: _Filter) -> None:
    deny = _errno_action(None)
    for name in DEFAULT_DENIED:
        flt.add_rule(deny, name)


# --- Docker-format profiles ---------------------------------------------------------

_ACTIONS = {
    "SCMP_ACT_ALLOW": SCMP_ACT_ALLOW,
    "SCMP_ACT_KILL": SCMP_ACT_KILL_THREAD,
    "SCMP_ACT_KILL_THREAD": SCMP_ACT_KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": SCMP_ACT_KILL_PROCESS,
    "SCMP_ACT_TRAP": SCMP_ACT_TRAP,
    "SCMP_ACT_LOG": SCMP_ACT_LOG,
}


def _docker_action(name: str, errno_ret: int | None) -> int:
    if name == "SCMP_ACT_ERRNO":
        return _errno_action(errno_ret)
    if name == "SCMP_ACT_TRACE":
        return SCMP_ACT_TRACE | ((errno_ret or errno.EPERM) & 0xFFFF)
    if name not in _ACTIONS:
        raise UsageError(f"seccomp profile: unknown action {name!r}", hint="see the Docker seccomp profile format")
    return _ACTIONS[name]


def _docker_arches(flt: _Filter, profile: dict[str, Any]) -> None:
    native = "SCMP_ARCH_" + {"x86_64": "X86_64", "aarch64": "AARCH64"}.get(os.uname().machine, "")
    names = list(profile.get("architectures") or [])
    for entry in profile.get("archMap") or []:
        if entry.get("architecture") == native:
            names += [entry["architecture"], *entry.get("subArchitectures", [])]
    for name in names:
        flt.add_arch(name.removeprefix("SCMP_ARCH_").lower())


def _kernel_at_least(version: str) -> bool:
    def parts(text: str) -> tuple[int, ...]:
        return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in text.split(".")[:2])

    return parts(os.uname().release) >= parts(version)


def _rule_applies(rule: dict[str, Any]) -> bool:
    """Docker's includes/excludes: mesobox grants no extra capabilities, so rules that
    need one never apply and rules excluded for a capability always do."""
    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("caps") or (inc.get("arches") and machine not in inc["arches"]):
        return False
    if inc.get("minKernel") and not _kernel_at_least(inc["minKernel"]):
        return False
    return not (exc.get("arches") and machine in exc["arches"])


def _docker_rules(flt: _Filter, profile: dict[str, Any]) -> None:
    for rule in profile.get("syscalls") or []:
        if not _rule_applies(rule):
            continue
        action = _docker_action(rule.get("action", ""), rule.get("errnoRet"))
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        args = [_docker_arg(a) for a in rule.get("args") or []]
        # libseccomp takes each argument once per rule; a rule naming the same argument
        # twice means "any of these" and becomes one rule per comparison (as runc does).
        indexes = [a[0] for a in args]
        groups = [[a] for a in args] if len(set(indexes)) != len(indexes) else [args]
        for name in names:
            for group in groups:
                flt.add_rule(action, name, group)


def _docker_arg(arg: dict[str, Any]) -> tuple[int, int, int, int]:
    op = _COMPARE.get(arg.get("op", ""))
    if op is None or not isinstance(arg.get("index"), int):
        raise UsageError(f"seccomp profile: bad argument filter {arg!r}")
    return arg["index"], op, int(arg.get("value", 0)), int(arg.get("valueTwo", 0))


def profile_from_option(value: str) -> dict[str, Any] | None:
    """``--security-opt seccomp=…`` value (after ``seccomp=``): unconfined, default, or a JSON file."""
    if value == "unconfined":
        return {"unconfined": True}
    if value in ("", "default", "builtin"):
        return None
    import json

    try:
        with open(value, "rb") as f:
            profile = json.load(f)
    except OSError as err:
        raise UsageError(f"cannot read seccomp profile {value}: {err.strerror}") from None
    except ValueError as err:
        raise UsageError(f"seccomp profile {value} is not valid JSON: {err}") from None
    if not isinstance(profile, dict) or not isinstance(profile.get("defaultAction"), str):
        raise UsageError(
            f"seccomp profile {value} has no defaultAction", hint="use the Docker/OCI seccomp profile format"
        )
    _docker_action(profile["defaultAction"], profile.get("defaultErrnoRet"))  # validate early
    for rule in profile.get("syscalls") or []:
        if not isinstance(rule, dict):
            raise UsageError(f"seccomp profile {value}: each syscalls entry must be an object")
        _docker_action(rule.get("action", ""), rule.get("errnoRet"))
        for arg in rule.get("args") or []:
            _docker_arg(arg)
    return dict(profile)
