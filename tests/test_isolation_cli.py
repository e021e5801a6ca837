"""End-to-end isolation through the CLI: `mesobox run` with resource, network and seccomp options.

Each test runs a workload that tries to exceed the limit through the real launcher
(src/mesobox/launch/launcher.py, cli/run.py), and checks the kernel's own account of
it, never the wall clock.  A test whose cgroup controller this host lacks is skipped,
saying so (tests/hostcaps.py).  The building blocks themselves are proven in
test_cgroups.py, test_seccomp.py and test_network.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Mesobox, User, wait_until
from hostcaps import CGROUP_ROOT, cgroup_version, needs_cgroup, needs_cgroup_v1
from isolation_support import tcp_service
from run_support import mesobox_argv


@pytest.fixture()
def http_service() -> Iterator[int]:
    """A minimal HTTP server on the host's 127.0.0.1 answering "host-service"."""
    with tcp_service(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nhost-service", read_request=True) as port:
        yield port


@pytest.mark.root
@needs_cgroup("memory")
def test_run_memory_limit_oom_exit_137(mesobox: Mesobox, busybox_rootfs: Path) -> None:
    # busybox tail keeps its one (newline-free) "line" in memory: 256 MiB > 64 MiB.
    proc = mesobox("run", "--memory", "64m", str(busybox_rootfs), "sh", "-c", "head -c 256m /dev/zero | tail")
    assert proc.returncode == 137, proc.stderr
    assert b"out of memory" in proc.stderr.lower() or b"oom" in proc.stderr.lower()


@pytest.mark.root
@needs_cgroup("pids")
def test_run_pids_limit_fork_fails(mesobox: Mesobox, busybox_rootfs: Path) -> None:
    script = "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 3 & done; wait"
    proc = mesobox("run", "--pids-limit", "5", str(busybox_rootfs), "sh", "-c", script)
    assert b"can't fork" in proc.stderr or b"Resource temporarily unavailable" in proc.stderr, proc.stderr


def _cpu_group(pid: int) -> Path:
    """The cgroup whose CPU quota governs ``pid``, by the kernel's record (/proc/PID/cgroup)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _hid, controllers, group = line.split(":", 2)
        if cgroup_version() == 2 and controllers == "":
            return CGROUP_ROOT / group.lstrip("/")
        if cgroup_version() == 1 and "cpu" in controllers.split(","):
            return CGROUP_ROOT / "cpu" / group.lstrip("/")
    raise AssertionError(f"no cpu cgroup for {pid}")


def _pid_running(marker: str) -> int | None:
    """The pid of the workload whose command line names ``marker``."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"sh\0") and marker.encode() in cmdline:
            return int(entry)
    return None


@pytest.mark.root
@needs_cgroup("cpu")
def test_run_cpus_half_is_a_quota_the_kernel_enforces(mesobox: Mesobox, busybox_rootfs: Path, world_tmp: Path) -> None:
    """The workload's group holds the quota and the kernel counts periods in which it
    ran out of it; how much CPU that leaves is bench/'s to measure, not a test's."""
    ready, stop = world_tmp / "ready", world_tmp / "stop"
    script = f"touch {ready}; while [ ! -e {stop} ]; do :; done"
    argv, env = mesobox_argv(mesobox, None, ["run", "--cpus", "0.5", str(busybox_rootfs), "sh", "-c", script])
    proc = subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, "the workload starts")
        pid = _pid_running(str(stop))
        assert pid is not None, proc.communicate(timeout=60)
        group = _cpu_group(pid)
        if cgroup_version() == 1:
            quota = [(group / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us")]
        else:
            quota = (group / "cpu.max").read_text().split()
        assert quota == ["50000", "100000"]
        stat = group / "cpu.stat"
        wait_until(lambda: int(dict(line.split() for line in stat.read_text().splitlines())["nr_throttled"]) > 0,
                   "the kernel throttles the busy workload at its quota")
    finally:
        stop.touch()
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not group.exists()  # the group went with the container


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
@needs_cgroup_v1
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


@pytest.fixture()
def loop_device(world_tmp: Path) -> Iterator[str]:
    """A block device every host has (a loop device over a sparse file), for I/O limits."""
    backing = world_tmp / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    device = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True,
                            check=True).stdout.strip()
    yield device
    subprocess.run(["losetup", "-d", device], check=False)


@pytest.mark.root
@needs_cgroup("cpuset", "io")
def test_run_cpuset_and_io_options_reach_the_cgroup(mesobox: Mesobox, busybox_rootfs: Path, loop_device: str) -> None:
    res = mesobox("exec", "--cpuset-cpus", "0", "--io-write-bps", f"{loop_device}:1mb", "--contain",
                  str(busybox_rootfs), "grep", "^Cpus_allowed_list:", "/proc/self/status")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [b"Cpus_allowed_list:", b"0"]
    bad = mesobox("exec", "--io-write-bps", "nonsense", str(busybox_rootfs), "true")
    assert bad.returncode == 2 and bad.stderr.startswith(b"mesobox: error: ")
