"""seccomp: filters loaded by an ordinary user deny what they should and nothing else.

Each case runs a fresh Python as the test user that sets no_new_privs, loads the filter
exactly as the launcher will (last, before running the workload), then probes syscalls
with deliberately invalid arguments: unfiltered, the kernel answers EFAULT/EINVAL/…;
filtered, EPERM (or the profile's errnoRet).  A control run without a filter proves the
probes would otherwise not fail with that errno.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from isolation_support import run_program, write_program
from mesobox.errors import LaunchError, UsageError
from mesobox.runtime import seccomp
from mesobox.runtime.seccomp import load_filter, profile_from_option

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
    from mesobox.runtime.seccomp import load_filter, profile_from_option
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
        from mesobox.runtime.seccomp import load_filter, profile_from_option
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

    monkeypatch.setattr(seccomp.ctypes, "CDLL", no_library)
    with pytest.raises(LaunchError) as err:
        load_filter(None)
    assert err.value.hint and "libseccomp2" in err.value.hint
    load_filter({"unconfined": True})  # unconfined never needs the library
