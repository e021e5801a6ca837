"""End-to-end isolation through the CLI: `mesobox run` with resource, network and seccomp options.

Each test runs a workload that tries to exceed the limit through the real launcher
(src/mesobox/launch/launcher.py, cli/run.py).  The building blocks themselves are
proven in test_cgroups.py, test_seccomp.py and test_network.py.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Mesobox, User
from isolation_support import tcp_service


@pytest.fixture()
def http_service() -> Iterator[int]:
    """A minimal HTTP server on the host's 127.0.0.1 answering "host-service"."""
    with tcp_service(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nhost-service", read_request=True) as port:
        yield port


@pytest.mark.root
def test_run_memory_limit_oom_exit_137(mesobox: Mesobox, busybox_rootfs: Path) -> None:
    # busybox tail keeps its one (newline-free) "line" in memory: 256 MiB > 64 MiB.
    proc = mesobox("run", "--memory", "64m", str(busybox_rootfs), "sh", "-c", "head -c 256m /dev/zero | tail")
    assert proc.returncode == 137, proc.stderr
    assert b"out of memory" in proc.stderr.lower() or b"oom" in proc.stderr.lower()


@pytest.mark.root
def test_run_pids_limit_fork_fails(mesobox: Mesobox, busybox_rootfs: Path) -> None:
    script = "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 3 & done; wait"
    proc = mesobox("run", "--pids-limit", "5", str(busybox_rootfs), "sh", "-c", script)
    assert b"can't fork" in proc.stderr or b"Resource temporarily unavailable" in proc.stderr, proc.stderr


@pytest.mark.root
@pytest.mark.slow
def test_run_cpus_half(mesobox: Mesobox, busybox_rootfs: Path) -> None:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = mesobox("run", "--cpus", "0.5", str(busybox_rootfs), "timeout", "2", "sh", "-c", "while :; do :; done")
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode in (0, 124, 143), proc.stderr
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert 0.35 <= cpu / wall <= 0.6  # the launcher's own start-up adds a little


@pytest.mark.userns
def test_run_net_none_cannot_reach_host(mesobox: Mesobox, user: User, busybox_rootfs: Path, http_service: int) -> None:
    url = f"http://127.0.0.1:{http_service}/"
    script = f"wget -q -T 3 -O - {url}; echo rc=$?"
    proc = mesobox("run", "--net", "none", str(busybox_rootfs), "sh", "-c", script, as_user=user)
    assert proc.returncode == 0, proc.stderr  # the container ran…
    assert b"host-service" not in proc.stdout and b"rc=1" in proc.stdout  # …and could not reach the host


@pytest.mark.userns
def test_run_net_slirp_reaches_host_via_gateway(
    mesobox: Mesobox, user: User, busybox_rootfs: Path, http_service: int
) -> None:
    mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)  # as distributions ship it; .ci/run does the same
    try:
        url = f"http://10.0.2.2:{http_service}/"
        proc = mesobox("run", "--net", "slirp", str(busybox_rootfs), "wget", "-q", "-O", "-", url, as_user=user)
    finally:
        os.chmod("/dev/net/tun", mode)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"host-service"


@pytest.mark.userns
def test_run_security_opt_profile_denies_mkdir(
    mesobox: Mesobox, user: User, busybox_rootfs: Path, world_tmp: Path
) -> None:
    profile = world_tmp / "deny-mkdir.json"
    profile.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}],
            }
        )
    )
    os.chmod(profile, 0o644)
    # --contain: a private /tmp, so the host's /tmp (bound by default) is not touched
    args = ("--contain", str(busybox_rootfs), "mkdir", "/tmp/x")
    denied = mesobox("run", "--security-opt", f"seccomp={profile}", *args, as_user=user)
    assert denied.returncode != 0 and b"Operation not permitted" in denied.stderr
    allowed = mesobox("run", "--security-opt", "seccomp=unconfined", *args, as_user=user)
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.userns
def test_run_memory_as_user_on_v1_is_policy_error(mesobox: Mesobox, user: User, busybox_rootfs: Path) -> None:
    proc = mesobox("run", "--memory", "64m", str(busybox_rootfs), "true", as_user=user)
    assert proc.returncode == 13
    lines = proc.stderr.decode().strip().splitlines()
    assert lines[0].startswith("mesobox: error:") and "memory" in lines[0]
    assert lines[1].startswith("mesobox: hint:") and "delegat" in lines[1]


@pytest.mark.userns
def test_run_default_seccomp_filter_is_on(mesobox: Mesobox, user: User, busybox_rootfs: Path) -> None:
    """Docker's default: a filter is loaded unless seccomp=unconfined (Seccomp: 2 = filter mode)."""
    args = ("--contain", str(busybox_rootfs), "grep", "^Seccomp:", "/proc/self/status")
    default = mesobox("exec", *args, as_user=user)
    assert default.returncode == 0, default.stderr
    assert default.stdout.split() == [b"Seccomp:", b"2"]
    unconfined = mesobox("exec", "--security-opt", "seccomp=unconfined", *args, as_user=user)
    assert unconfined.stdout.split() == [b"Seccomp:", b"0"]


@pytest.mark.root
def test_run_cpuset_and_io_options_reach_the_cgroup(mesobox: Mesobox, busybox_rootfs: Path) -> None:
    disk = next(d for d in sorted(os.listdir("/sys/block")) if not d.startswith(("loop", "zram", "ram")))
    res = mesobox("exec", "--cpuset-cpus", "0", "--io-write-bps", f"/dev/{disk}:1mb", "--contain",
                  str(busybox_rootfs), "grep", "^Cpus_allowed_list:", "/proc/self/status")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [b"Cpus_allowed_list:", b"0"]
    bad = mesobox("exec", "--io-write-bps", "nonsense", str(busybox_rootfs), "true")
    assert bad.returncode == 2 and bad.stderr.startswith(b"mesobox: error: ")
