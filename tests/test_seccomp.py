"""seccomp: filters loaded by an ordinary user deny what they should and nothing else.

Each rule case runs a fresh Python as the test user that sets no_new_privs, compiles and
loads the filter (``load_filter``: what the launcher's ``prepare`` + ``install`` do,
without the cache), then probes syscalls with deliberately invalid arguments:
unfiltered, the kernel answers EFAULT/EINVAL/…; filtered, EPERM (or the profile's
errnoRet).  A control run without a filter proves the probes would otherwise not fail
with that errno.

The cache cases launch real containers (``mesobox exec`` as the test user, with a
per-test ``MESOBOX_RUNTIME_DIR``) running the host's Python, bound in, to probe from
inside what the launcher really installed.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import Mesobox, User, make_busybox_rootfs
from isolation_support import run_program, write_program
from mesobox.errors import LaunchError, UsageError
from mesobox.isolation import seccomp
from mesobox.isolation.seccomp import load_filter, profile_from_option

# syscall numbers per architecture (asm/unistd_64.h, asm-generic/unistd.h)
NR = {
    "x86_64": {"keyctl": 250, "perf_event_open": 298, "getpid": 39},
    "aarch64": {"keyctl": 219, "perf_event_open": 241, "getpid": 172},
}[os.uname().machine]

PROBE = f"""
NR = {NR!r}
mode = sys.argv[1]
no_new_privs()
if mode != "none":
    from mesobox.isolation.seccomp import load_filter, profile_from_option
    load_filter(profile_from_option(mode))
result = {{
    # keyctl(9999) → EOPNOTSUPP unfiltered; perf_event_open(NULL, …) → EFAULT unfiltered
    "keyctl": syscall_errno(NR["keyctl"], 9999, 0, 0),
    "perf_event_open": syscall_errno(NR["perf_event_open"], 0, 0, -1, -1, 0),
    "getpid": syscall_errno(NR["getpid"]),
}}
d = os.path.join(sys.argv[2], "made-" + mode.replace("/", "_"))
try:
    os.mkdir(d)
    result["mkdir"] = 0
except OSError as e:
    result["mkdir"] = e.errno
for family in ("AF_INET", "AF_UNIX"):
    try:
        socket.socket(getattr(socket, family), socket.SOCK_STREAM).close()
        result[family] = 0
    except OSError as e:
        result[family] = e.errno
# nesting: an unprivileged user namespace can still be made under the filter
try:
    map_ids()
    result["nested_userns"] = 0
except OSError as e:
    result["nested_userns"] = e.errno
print(json.dumps(result))
"""


@pytest.fixture()
def probe(user, test_python, mesobox_src, world_tmp):  # type: ignore[no-untyped-def]
    program = write_program(world_tmp, "seccomp_probe.py", PROBE)

    def run(mode: str) -> dict[str, Any]:
        proc, result = run_program(test_python, mesobox_src, program, mode, str(world_tmp), user=user)
        assert proc.returncode == 0, proc.stderr.decode()
        return result

    return run


@pytest.mark.userns
def test_default_filter_denies_dangerous_allows_the_rest(probe) -> None:  # type: ignore[no-untyped-def]
    control = probe("none")
    assert control["keyctl"] not in (0, errno.EPERM)
    assert control["perf_event_open"] not in (0, errno.EPERM)
    result = probe("default")
    assert result["keyctl"] == errno.EPERM
    assert result["perf_event_open"] == errno.EPERM
    assert result["getpid"] == 0 and result["mkdir"] == 0
    assert result["AF_INET"] == 0 and result["AF_UNIX"] == 0
    assert result["nested_userns"] == 0  # nesting mesobox keeps working


@pytest.mark.userns
def test_unconfined_loads_nothing(probe) -> None:  # type: ignore[no-untyped-def]
    result = probe("unconfined")
    assert result["keyctl"] != errno.EPERM and result["perf_event_open"] != errno.EPERM


@pytest.mark.userns
def test_docker_profile_denies_mkdir(probe, world_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"},
            # errnoRet and argument filters: only AF_INET sockets refused, with EACCES
            {
                "names": ["socket"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EACCES,
                "args": [{"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}],
            },
            # needs a capability mesobox never grants: must not apply
            {"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["no_such_syscall_xyz"], "action": "SCMP_ACT_ERRNO"},
        ],
    }
    path = world_tmp / "deny-mkdir.json"
    path.write_text(json.dumps(profile))
    os.chmod(path, 0o644)
    result = probe(str(path))
    assert result["mkdir"] == errno.EPERM
    assert result["AF_INET"] == errno.EACCES and result["AF_UNIX"] == 0
    assert result["getpid"] == 0
    assert result["keyctl"] != errno.EPERM  # a custom profile replaces the default


@pytest.mark.userns
def test_docker_profile_default_errno_with_allow_list(user, test_python, mesobox_src, world_tmp) -> None:  # type: ignore[no-untyped-def]
    # defaultAction ERRNO + an allow-list: everything not listed fails with defaultErrnoRet.
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.ENOSYS,
        "syscalls": [{"names": ["write", "exit_group", "exit"], "action": "SCMP_ACT_ALLOW"}],
    }
    path = world_tmp / "allowlist.json"
    path.write_text(json.dumps(profile))
    os.chmod(path, 0o644)
    program = write_program(
        world_tmp,
        "allowlist.py",
        f"""
        from mesobox.isolation.seccomp import load_filter, profile_from_option
        no_new_privs()
        load_filter(profile_from_option({str(path)!r}))
        rc = libc.getppid()  # glibc passes the raw kernel result through: -errno
        os.write(1, (json.dumps({{"getppid": rc}}) + "\\n").encode())
        os._exit(0)
        """,
    )
    proc, result = run_program(test_python, mesobox_src, program, user=user)
    assert proc.returncode == 0, proc.stderr
    assert result == {"getppid": -errno.ENOSYS}


def test_profile_from_option_values(tmp_path: Path) -> None:
    assert profile_from_option("unconfined") == {"unconfined": True}
    assert profile_from_option("default") is None
    good = tmp_path / "p.json"
    good.write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}')
    assert profile_from_option(str(good)) == {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"syscalls": []}',
        '{"defaultAction": "SCMP_ACT_EXPLODE"}',
        '{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"], "action": "NOPE"}]}',
        '{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"], "action": "SCMP_ACT_ERRNO",'
        ' "args": [{"index": 0, "op": "SCMP_CMP_SOMETIMES"}]}]}',
    ],
)
def test_profile_from_option_rejects_bad_profiles(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UsageError):
        profile_from_option(str(path))


def test_profile_from_option_unreadable() -> None:
    with pytest.raises(UsageError, match="cannot read"):
        profile_from_option("/nonexistent/profile.json")


def test_missing_libseccomp_is_a_launch_error_with_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library(name: str, **_: object) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    import ctypes  # seccomp imports it only to compile, from the module itself

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    with pytest.raises(LaunchError) as err:
        load_filter(None)
    assert err.value.hint and "libseccomp2" in err.value.hint
    load_filter({"unconfined": True})  # unconfined never needs the library


# --- the compiled-filter cache: unit level (as root, in this process) ----------------


def test_prepare_unconfined_needs_no_cache(tmp_path: Path) -> None:
    assert seccomp.prepare({"unconfined": True}, str(tmp_path / "seccomp")) is None
    assert not (tmp_path / "seccomp").exists()


def test_prepare_compiles_once_then_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "run" / "seccomp"
    program = seccomp.prepare(None, str(cache))
    assert program and len(program) % 8 == 0
    (entry,) = cache.iterdir()  # one file, no temp file left behind
    assert entry.read_bytes() == program
    assert (cache.stat().st_mode & 0o777, entry.stat().st_mode & 0o777) == (0o700, 0o600)
    assert (cache.parent.stat().st_mode & 0o777) == 0o700

    def no_compile(profile: object) -> bytes:
        raise AssertionError("compiled although the cache holds the program")

    monkeypatch.setattr(seccomp, "compile_program", no_compile)
    assert seccomp.prepare(None, str(cache)) == program


def test_prepare_without_a_writable_cache_still_compiles(tmp_path: Path) -> None:
    (tmp_path / "seccomp").write_text("not a directory")
    program = seccomp.prepare(None, str(tmp_path / "seccomp"))
    assert program == seccomp.compile_program(None)
    # no runtime dir and no way to make one: still compiled, nothing written
    assert seccomp.prepare(None, str(tmp_path / "missing" / "run" / "seccomp")) == program
    assert not (tmp_path / "missing").exists()


def test_cache_key_follows_everything_that_changes_the_program(monkeypatch: pytest.MonkeyPatch) -> None:
    default = seccomp._cache_name(None)
    assert default.startswith(f"default-{os.uname().machine}-") and default.endswith(".bpf")
    assert seccomp._cache_name(None) == default  # stable across calls
    profile: dict[str, Any] = {"defaultAction": "SCMP_ACT_ALLOW",
                               "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}
    named = seccomp._cache_name(profile)
    assert named.startswith(f"profile-{os.uname().machine}-") and named != default
    # canonical: key order does not matter, content does (down to one errnoRet)
    assert seccomp._cache_name(dict(reversed(list(profile.items())))) == named
    other = {**profile, "syscalls": [{**profile["syscalls"][0], "errnoRet": errno.EACCES}]}
    assert seccomp._cache_name(other) != named
    changes = [
        ("DEFAULT_DENIED", seccomp.DEFAULT_DENIED[:-1]),
        ("FORMAT", seccomp.FORMAT + 1),
        ("_library_stamp", lambda: "upgraded"),
    ]
    for attribute, value in changes:
        with monkeypatch.context() as m:
            m.setattr(seccomp, attribute, value)
            assert seccomp._cache_name(None) != default, attribute
            if attribute != "DEFAULT_DENIED":
                assert seccomp._cache_name(profile) != named, attribute


# --- the compiled-filter cache: real launches as the ordinary user --------------------

# keyctl(9999) answers EOPNOTSUPP unfiltered, EPERM under the default filter.
INSIDE = f"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {{"keyctl": 0 if libc.syscall({NR["keyctl"]}, 9999, 0, 0) >= 0 else ctypes.get_errno()}}
try:
    os.mkdir("/tmp/probe")
    out["mkdir"] = 0
except OSError as e:
    out["mkdir"] = e.errno
print(json.dumps(out))
"""
# A filter the default never is: mkdir fails with EXDEV, keyctl stays allowed.
EXDEV_MKDIR: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV}],
}
DEFAULT_RESULT = {"keyctl": errno.EPERM, "mkdir": 0}


@pytest.fixture(scope="module")
def py_image(shared_tmp: Path) -> Path:
    """busybox + merged-/usr links: the host's Python runs in it with /usr bound."""
    root = make_busybox_rootfs(shared_tmp / "seccomp-py-image")
    for link in ("lib", "lib64"):
        (root / link).symlink_to(f"usr/{link}")
    for dirpath, _dirnames, _files in os.walk(root):
        os.chmod(dirpath, 0o1777 if dirpath.endswith("/tmp") else 0o755)
    return root


class Launcher:
    """``mesobox exec`` of the probe as the test user, with its own runtime dir, and no
    plan cache: a saved launch program carries its filter, and these tests are about
    the seccomp cache under it (tests/test_plancache.py has the plan cache's own)."""

    def __init__(self, mesobox: Mesobox, user: User, image: Path, python: str, runtime: Path) -> None:
        self.mesobox, self.user, self.image, self.python, self.runtime = mesobox, user, image, python, runtime
        self.cache = runtime / "seccomp"

    def __call__(self, *opts: str) -> dict[str, int]:
        venv = Path(self.python).parents[1]
        proc = self.mesobox("exec", "--contain", *opts, "-B", str(venv), "-B", "/usr", str(self.image),
                            self.python, "-I", "-c", INSIDE, as_user=self.user,
                            env={"MESOBOX_RUNTIME_DIR": str(self.runtime), "MESOBOX_PLAN_CACHE": "0"}, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        result: dict[str, int] = json.loads(proc.stdout.decode().splitlines()[-1])
        return result

    def entries(self) -> list[Path]:
        return sorted(self.cache.iterdir())

    def plant(self, path: Path, program: bytes) -> None:
        """Write into a cache file as its owner would (root keeps owner and mode)."""
        with open(path, "r+b") as f:
            f.write(program)
            f.truncate()


@pytest.fixture()
def launch(mesobox: Mesobox, user: User, py_image: Path, test_python: str, world_tmp: Path) -> Launcher:
    return Launcher(mesobox, user, py_image, test_python, world_tmp / "run")


@pytest.mark.userns
def test_first_launch_caches_second_reuses(launch: Launcher, user: User) -> None:
    assert launch() == DEFAULT_RESULT
    (entry,) = launch.entries()  # exactly one file: no temp file left behind
    assert entry.name.endswith(".bpf") and entry.name.startswith("default-")
    st = entry.stat()
    assert (st.st_uid, st.st_mode & 0o777, st.st_size % 8) == (user.uid, 0o600, 0)
    assert launch() == DEFAULT_RESULT
    again = entry.stat()
    assert launch.entries() == [entry]
    assert (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)  # read, not rewritten


@pytest.mark.userns
def test_the_cached_program_is_what_gets_installed(launch: Launcher) -> None:
    """Replace the cached default with another valid program: the container runs under
    it (mkdir → EXDEV, keyctl allowed).  Not a hole: only the file's owner (the user,
    or root) can write it — group/world-writable or foreign files, or a foreign or
    group/world-writable directory, are ignored (next tests) — and that user could as
    well run ``--security-opt seccomp=unconfined``: the filter guards the host against
    the user's workload, not the user against themself."""
    assert launch() == DEFAULT_RESULT
    (entry,) = launch.entries()
    other = seccomp.compile_program(EXDEV_MKDIR)
    launch.plant(entry, other)
    assert launch() == {"keyctl": errno.EOPNOTSUPP, "mkdir": errno.EXDEV}
    assert entry.read_bytes() == other  # used as it was, not recompiled


@pytest.mark.userns
@pytest.mark.parametrize("junk", [b"garbage", b"", bytes(8 * 4097)], ids=["not-8-aligned", "empty", "too-long"])
def test_a_damaged_cache_file_is_replaced(launch: Launcher, junk: bytes) -> None:
    assert launch() == DEFAULT_RESULT
    (entry,) = launch.entries()
    good = entry.read_bytes()
    launch.plant(entry, junk)
    assert launch() == DEFAULT_RESULT
    assert launch.entries() == [entry]
    assert entry.read_bytes() == good and (entry.stat().st_mode & 0o777) == 0o600


@pytest.mark.userns
@pytest.mark.parametrize("how", ["world-writable", "group-writable", "owned-by-root", "symlink"])
def test_a_cache_file_others_could_write_is_not_used(launch: Launcher, how: str) -> None:
    assert launch() == DEFAULT_RESULT
    (entry,) = launch.entries()
    good = entry.read_bytes()
    other = seccomp.compile_program(EXDEV_MKDIR)
    launch.plant(entry, other)
    if how == "world-writable":
        os.chmod(entry, 0o666)
    elif how == "group-writable":
        os.chmod(entry, 0o620)
    elif how == "owned-by-root":
        os.chown(entry, 0, 0)
        os.chmod(entry, 0o644)
    else:  # a link to a file of the user's that holds a valid program
        target = launch.runtime / "elsewhere.bpf"
        entry.rename(target)
        entry.symlink_to(target)
    assert launch() == DEFAULT_RESULT  # the default filter, compiled afresh
    assert not entry.is_symlink() and entry.read_bytes() == good  # and put in its place


@pytest.mark.userns
def test_a_cache_dir_others_could_write_is_not_used(launch: Launcher) -> None:
    assert launch() == DEFAULT_RESULT
    (entry,) = launch.entries()
    launch.plant(entry, seccomp.compile_program(EXDEV_MKDIR))
    os.chmod(launch.cache, 0o777)
    assert launch() == DEFAULT_RESULT
    os.chmod(launch.cache, 0o700)
    os.chown(launch.cache, 0, 0)  # someone else's directory
    assert launch() == DEFAULT_RESULT


@pytest.mark.userns
def test_profiles_get_their_own_key_unconfined_none(launch: Launcher, world_tmp: Path) -> None:
    profile = world_tmp / "exdev.json"
    profile.write_text(json.dumps(EXDEV_MKDIR))
    os.chmod(profile, 0o644)
    assert launch() == DEFAULT_RESULT
    assert launch("--security-opt", f"seccomp={profile}") == {"keyctl": errno.EOPNOTSUPP, "mkdir": errno.EXDEV}
    names = [e.name for e in launch.entries()]
    assert len(names) == 2 and {n.split("-")[0] for n in names} == {"default", "profile"}
    # a profile that differs in one errno is another program, so another key
    changed = {**EXDEV_MKDIR, "syscalls": [{**EXDEV_MKDIR["syscalls"][0], "errnoRet": errno.EACCES}]}
    profile.write_text(json.dumps(changed))
    assert launch("--security-opt", f"seccomp={profile}") == {"keyctl": errno.EOPNOTSUPP, "mkdir": errno.EACCES}
    assert len(launch.entries()) == 3
    assert launch() == DEFAULT_RESULT  # the default's entry is still its own


@pytest.mark.userns
def test_unconfined_writes_no_cache(launch: Launcher) -> None:
    assert launch("--security-opt", "seccomp=unconfined") == {"keyctl": errno.EOPNOTSUPP, "mkdir": 0}
    assert not launch.cache.exists()


@pytest.mark.userns
@pytest.mark.parametrize("how", ["file", "read-only"])
def test_unwritable_cache_dir_still_filters(launch: Launcher, user: User, how: str) -> None:
    launch.runtime.mkdir(mode=0o700)
    os.chown(launch.runtime, user.uid, user.gid)
    if how == "file":
        launch.cache.write_text("in the way")
    else:
        # A read-only mount, as a nested container may see its runtime dir (mode bits
        # would not do: in its user namespace the launcher has CAP_DAC_OVERRIDE over
        # its own files).
        launch.cache.mkdir(mode=0o700)
        os.chown(launch.cache, user.uid, user.gid)
        subprocess.run(["mount", "--bind", "-o", "ro", str(launch.cache), str(launch.cache)], check=True)
    try:
        for _ in range(2):
            assert launch() == DEFAULT_RESULT
        if how == "file":
            assert launch.cache.read_text() == "in the way"
        else:
            assert launch.entries() == []
    finally:
        if how == "read-only":
            subprocess.run(["umount", str(launch.cache)], check=True)
