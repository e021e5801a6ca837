"""mesobox.oci.cgroups: an OCI ``linux.cgroupsPath`` + ``linux.resources`` on real cgroups.

- Root tests make groups in this host's real hierarchies (v1 here: per-controller
  mounts, plus the controller-less cgroup2 at /sys/fs/cgroup/unified) and read the
  kernel's files back directly: each value must be what runc's fs driver writes and
  what runtime-tools' validator (cgroups_v1.go) reads.  Real processes are joined,
  frozen and thawed; the kernel's own freezer.state and /proc/PID/cgroup say so.
- Every group a test makes lies under one unique top directory per test, removed
  (deepest first) by the ``tops`` fixture even when the test fails.
- The v2 writer cannot run on this v1 host: ``test_v2_plan_*`` check only its mapping
  (file names and converted values, runc's fs2 rules), not a kernel's answer.
- The no-symlink walk is checked on a stand-in hierarchy (a temp dir named as a
  cgroup mount in a fake mountinfo), since cgroupfs itself refuses symlinks.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mesobox.errors import LaunchError, UsageError
from mesobox.oci import cgroups
from mesobox.oci.cgroups import OciCgroup, cgroup_path, plan_v2

MiB = 1024**2
SRC = Path(__file__).resolve().parent.parent / "src"
MOUNTS = cgroups.parse_mounts(Path("/proc/self/mountinfo").read_text())
V1 = {c: m.point for m in MOUNTS if not m.v2 for c in m.controllers}
NEEDED = ("cpu", "cpuset", "memory", "devices", "freezer", "blkio", "pids")

needs_v1_root = pytest.mark.skipif(
    os.geteuid() != 0 or any(c not in V1 for c in NEEDED),
    reason=f"needs root and cgroup v1 hierarchies {', '.join(NEEDED)} (this host: {sorted(V1) or 'none'})",
)


def _rmdir_tree(top: str) -> None:
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(dirpath)


@pytest.fixture()
def tops() -> Iterator[Callable[[str], str]]:
    """``new(name_hint)`` → a unique absolute cgroupsPath top; every hierarchy's copy
    of every top handed out is removed after the test, pass or fail."""
    made: list[str] = []

    def new(hint: str = "t") -> str:
        top = f"/mesobox-test-mbh7-{hint}-{uuid.uuid4().hex[:8]}"
        made.append(top)
        return top

    yield new
    for top in made:
        for mount in MOUNTS:
            _rmdir_tree(mount.point + top)


def _read(directory: str, name: str) -> str:
    return Path(directory, name).read_text().strip()


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "300"])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


RICH = {
    "memory": {"limit": 64 * MiB, "reservation": 32 * MiB, "swap": 128 * MiB, "kernelTCP": 16 * MiB,
               "swappiness": 10, "disableOOMKiller": True},
    "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0", "idle": 0},
    "pids": {"limit": 42},
    "blockIO": {"throttleReadBpsDevice": [{"major": 7, "minor": 0, "rate": 1 * MiB}],
                "throttleWriteBpsDevice": [{"major": 7, "minor": 1, "rate": 2 * MiB}],
                "throttleReadIOPSDevice": [{"major": 7, "minor": 2, "rate": 300}],
                "throttleWriteIOPSDevice": [{"major": 7, "minor": 3, "rate": 400}]},
    "devices": [{"allow": False, "access": "rwm"},
                {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"},
                {"allow": True, "type": "c", "major": 136, "access": "rwm"}],
}  # fmt: skip


# ------------------------------------------------------------------ paths


def test_cgroup_path_follows_runc_and_refuses_escapes() -> None:
    assert cgroup_path("/a/b", "id") == "/a/b"
    assert cgroup_path("a//./b/", "id") == "a/b"
    assert cgroup_path(None, "ctr1") == "ctr1"  # runc: the id, relative to its own group
    assert cgroup_path("", "ctr1") == "ctr1"
    for bad in ("/a/../b", "..", "a/..", "../../sys", "/", "a\0b"):
        with pytest.raises(UsageError) as info:
            cgroup_path(bad, "id")
        assert "\n" not in str(info.value)
    with pytest.raises(UsageError):
        cgroup_path(None, "..")


# ------------------------------------------------------- real v1 cgroups


@needs_v1_root
def test_rich_resources_read_back_as_runc_writes_them(tops: Callable[[str], str]) -> None:
    top = tops("rich")
    group = OciCgroup.create(cgroup_path(top + "/ctr", "x"), RICH)
    try:
        d = group.dirs
        for controller in NEEDED:
            assert d[controller] == V1[controller] + top + "/ctr"
        assert d[cgroups.UNIFIED].endswith(top + "/ctr")  # hybrid: runc joins the cgroup2 mount too
        assert _read(d["memory"], "memory.limit_in_bytes") == str(64 * MiB)
        assert _read(d["memory"], "memory.memsw.limit_in_bytes") == str(128 * MiB)
        assert _read(d["memory"], "memory.soft_limit_in_bytes") == str(32 * MiB)
        assert _read(d["memory"], "memory.kmem.tcp.limit_in_bytes") == str(16 * MiB)
        assert _read(d["memory"], "memory.swappiness") == "10"
        assert "oom_kill_disable 1" in _read(d["memory"], "memory.oom_control")
        assert _read(d["cpu"], "cpu.shares") == "512"
        assert _read(d["cpu"], "cpu.cfs_quota_us") == "50000"
        assert _read(d["cpu"], "cpu.cfs_period_us") == "100000"
        assert _read(d["cpuset"], "cpuset.cpus") == "0"
        assert _read(d["cpuset"], "cpuset.mems") == "0"
        assert _read(d["pids"], "pids.max") == "42"
        assert _read(d["blkio"], "blkio.throttle.read_bps_device") == f"7:0 {MiB}"
        assert _read(d["blkio"], "blkio.throttle.write_bps_device") == f"7:1 {2 * MiB}"
        assert _read(d["blkio"], "blkio.throttle.read_iops_device") == "7:2 300"
        assert _read(d["blkio"], "blkio.throttle.write_iops_device") == "7:3 400"
        # deny-all then the allow rules, in order: the kernel's own list shows the result
        assert _read(d["devices"], "devices.list").splitlines() == ["c 1:3 rw", "c 136:* rwm"]
        # the intermediate cpuset level got the parent's CPUs/nodes (else nothing could join)
        assert _read(V1["cpuset"] + top, "cpuset.cpus") == _read(V1["cpuset"], "cpuset.cpus")
        assert V1["memory"] + top in group.created and V1["memory"] + top + "/ctr" in group.created
        assert group.warnings == []
    finally:
        group.remove()
    for directory in group.created:
        assert not os.path.exists(directory)


@needs_v1_root
def test_join_pids_freeze_thaw_and_reopen(tops: Callable[[str], str]) -> None:
    top = tops("join")
    group = OciCgroup.create(top + "/ctr", {"pids": {"limit": 10}})
    proc = _sleeper()
    try:
        group.join(proc.pid)
        for controller in ("memory", "freezer", "pids", "cpu"):
            assert str(proc.pid) in _read(group.dirs[controller], "cgroup.procs").split()
        assert f"freezer:{top}/ctr" in Path(f"/proc/{proc.pid}/cgroup").read_text()
        assert group.pids() == [proc.pid]

        # state.json round trip: a re-opened group sees and controls the same processes
        again = OciCgroup.from_dirs(json.loads(json.dumps(group.dirs)), list(group.created))
        assert again.dirs == group.dirs
        again.freeze(True)
        assert _read(group.dirs["freezer"], "freezer.state") == "FROZEN"
        again.freeze(False)
        assert _read(group.dirs["freezer"], "freezer.state") == "THAWED"
        assert again.pids() == [proc.pid]

        # remove() kills nothing: a group with a live process stays, with one clear line
        with pytest.raises(LaunchError) as info:
            again.remove()
        assert "\n" not in str(info.value) and "busy" in str(info.value).lower()
        assert proc.poll() is None and os.path.isdir(group.dirs["memory"])
    finally:
        _stop(proc)
    group.remove()
    assert not any(os.path.exists(d) for d in group.dirs.values())


@needs_v1_root
def test_join_zero_is_the_caller(tops: Callable[[str], str]) -> None:
    """What the runtime's forked child does before the launcher runs: join(0)."""
    top = tops("self")
    group = OciCgroup.create(top + "/ctr", {})
    code = (
        "import json, sys; from mesobox.oci.cgroups import OciCgroup; "
        "OciCgroup.from_dirs(json.loads(sys.argv[1])).join(0); print(open('/proc/self/cgroup').read())"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(group.dirs)], env={**os.environ, "PYTHONPATH": str(SRC)},
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        for controller in ("memory", "cpu", "freezer", "pids", "devices"):
            assert f":{controller}:{top}/ctr" in out
    finally:
        group.remove()


@needs_v1_root
def test_update_raises_memory_and_swap_in_the_order_the_kernel_accepts(tops: Callable[[str], str]) -> None:
    top = tops("upd")
    group = OciCgroup.create(top, {"memory": {"limit": 64 * MiB, "swap": 128 * MiB}, "pids": {"limit": 5}})
    try:
        d = group.dirs["memory"]
        # 256M > the current memsw 128M: memsw must grow first, or the kernel says EINVAL
        group.update({"memory": {"limit": 256 * MiB, "swap": 512 * MiB}, "pids": {"limit": -1}})
        assert _read(d, "memory.limit_in_bytes") == str(256 * MiB)
        assert _read(d, "memory.memsw.limit_in_bytes") == str(512 * MiB)
        assert _read(group.dirs["pids"], "pids.max") == "max"
        # and back down: memory first, then memsw
        group.update({"memory": {"limit": 32 * MiB, "swap": 48 * MiB}})
        assert _read(d, "memory.limit_in_bytes") == str(32 * MiB)
        assert _read(d, "memory.memsw.limit_in_bytes") == str(48 * MiB)
        group.update({"cpu": {"shares": 2048}})
        assert _read(group.dirs["cpu"], "cpu.shares") == "2048"
    finally:
        group.remove()


@needs_v1_root
def test_default_devices_are_appended_like_runc(tops: Callable[[str], str]) -> None:
    top = tops("dev")
    res = cgroups.with_default_devices(
        {"devices": [{"allow": False, "access": "rwm"}]},
        [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
    )
    group = OciCgroup.create(top, res)
    try:
        rules = set(_read(group.dirs["devices"], "devices.list").splitlines())
        assert {"c 10:229 rwm", "c 1:3 rwm", "c 1:9 rwm", "c 136:* rwm", "c 5:2 rwm", "c *:* m", "b *:* m"} <= rules
        assert not any(r.startswith("a ") for r in rules)
    finally:
        group.remove()


@needs_v1_root
def test_relative_path_nests_under_the_callers_own_group(tops: Callable[[str], str]) -> None:
    name = tops("rel").lstrip("/")
    inner = cgroup_path(None, name)
    own = cgroups.parse_self_cgroup(Path("/proc/self/cgroup").read_text())
    group = OciCgroup.create(inner, {"memory": {"limit": 64 * MiB}})
    try:
        for controller in ("memory", "pids", "cpu"):
            expected = os.path.normpath(V1[controller] + own[controller] + "/" + name)
            assert group.dirs[controller] == expected
        assert _read(group.dirs["memory"], "memory.limit_in_bytes") == str(64 * MiB)
    finally:
        group.remove()
        for controller in V1:
            _rmdir_tree(os.path.normpath(V1[controller] + own[controller] + "/" + name))
    assert not os.path.exists(group.dirs["memory"])


@needs_v1_root
def test_remove_leaves_parents_it_did_not_make(tops: Callable[[str], str]) -> None:
    top = tops("keep")
    os.mkdir(V1["memory"] + top)  # someone else's parent, in one hierarchy
    group = OciCgroup.create(top + "/ctr", {})
    group.remove()
    assert os.path.isdir(V1["memory"] + top)
    assert not os.path.exists(V1["memory"] + top + "/ctr")
    assert not os.path.exists(V1["pids"] + top)


@needs_v1_root
def test_remove_leaves_a_shared_parent_in_use_and_a_leaf_it_did_not_make(tops: Callable[[str], str]) -> None:
    top = tops("share")
    first = OciCgroup.create(top + "/c1", {})  # makes the parent
    second = OciCgroup.create(top + "/c2", {})  # shares it, made only its leaf
    assert V1["pids"] + top in first.created and V1["pids"] + top not in second.created
    first.remove()
    assert os.path.isdir(V1["pids"] + top + "/c2") and not os.path.exists(V1["pids"] + top + "/c1")
    reopened = OciCgroup.from_dirs(second.dirs)  # nothing recorded as made: nothing removed
    reopened.remove()
    assert os.path.isdir(V1["pids"] + top + "/c2")
    OciCgroup.from_dirs(second.dirs, second.created).remove()
    assert not os.path.exists(V1["pids"] + top + "/c2")


@needs_v1_root
@pytest.mark.parametrize(
    ("resources", "needle"),
    [
        ({"cpu": {"period": 10}}, "cpu.cfs_period_us"),  # the kernel's minimum is 1000 µs
        ({"cpu": {"cpus": "9999"}}, "cpuset.cpus"),
        ({"memory": {"limit": 64 * MiB, "swap": 1 * MiB}}, "memory.memsw.limit_in_bytes"),
        ({"memory": {"limit": "lots"}}, "memory.limit"),
        ({"memory": {"swappiness": 150}}, "swappiness"),
        ({"devices": [{"allow": True, "type": "x", "access": "rwm"}]}, "devices"),
        ({"hugepageLimits": [{"pageSize": "2MB", "limit": MiB}]}, "hugetlb"),  # no v1 hugetlb mount here
        ({"network": {"classID": 0x100001}}, "net_cls"),
        ({"unified": {"memory.high": "1G"}}, "unified"),
        ({"blockIO": {"weight": 500}}, "blkio.weight"),  # no CFQ/BFQ weight file on this kernel
    ],
)
def test_refused_values_are_one_line_errors_and_leave_nothing(
    tops: Callable[[str], str], resources: dict[str, object], needle: str
) -> None:
    top = tops("bad")
    if needle == "hugetlb" and "hugetlb" in V1:
        pytest.skip("this host has a v1 hugetlb hierarchy")
    if needle == "net_cls" and "net_cls" in V1:
        pytest.skip("this host has a v1 net_cls hierarchy")
    with pytest.raises(LaunchError) as info:
        OciCgroup.create(top + "/ctr", resources)
    text = str(info.value)
    assert needle in text and "\n" not in text
    assert not any(os.path.exists(m.point + top) for m in MOUNTS)


@needs_v1_root
def test_memory_limit_below_usage_is_refused_with_usage(tops: Callable[[str], str]) -> None:
    top = tops("usage")
    group = OciCgroup.create(top, {"memory": {"limit": 256 * MiB, "swap": 256 * MiB}})
    code = "b = bytearray(48 << 20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); input()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        group.join(proc.pid)
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ok")
        # memory+swap equal: nothing can be swapped out, so the kernel cannot reclaim
        # the 48 MiB below a 16 MiB limit and answers EBUSY
        with pytest.raises(LaunchError) as info:
            group.update({"memory": {"limit": 16 * MiB, "swap": 16 * MiB}})
        text = str(info.value)
        assert "memory.limit_in_bytes" in text and "\n" not in text
        assert proc.poll() is None  # refused, not OOM-killed
    finally:
        _stop(proc)
        group.remove()


def test_walk_refuses_a_symlink_in_the_path(tmp_path: Path) -> None:
    """Stand-in hierarchy: cgroupfs has no symlinks, so a temp dir plays the cpu mount."""
    mount = tmp_path / "cpu"
    (mount / "real").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (mount / "evil").symlink_to(outside)
    mountinfo = f"40 31 0:29 / {mount} rw,relatime - cgroup cgroup rw,cpu\n"
    with pytest.raises(LaunchError) as info:
        OciCgroup.create("/evil/ctr", {}, mountinfo=mountinfo, self_cgroup="1:cpu:/\n")
    assert "symlink" in str(info.value)
    assert list(outside.iterdir()) == []
    group = OciCgroup.create("/real/ctr", {}, mountinfo=mountinfo, self_cgroup="1:cpu:/\n")
    assert (mount / "real" / "ctr").is_dir() and group.created == [str(mount / "real" / "ctr")]


def test_relative_path_on_pure_v2_nests_under_the_parent_of_the_own_group(tmp_path: Path) -> None:
    """runc's fs2 rule, on a stand-in cgroup2 mount (mapping of paths only)."""
    (tmp_path / "user.slice" / "session").mkdir(parents=True)
    mountinfo = f"35 24 0:30 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    group = OciCgroup.create("ctr", {}, mountinfo=mountinfo, self_cgroup="0::/user.slice/session\n")
    assert group.dirs == {cgroups.UNIFIED: str(tmp_path / "user.slice" / "ctr")}
    assert group.v2


# ------------------------------------------- v2 mapping (no kernel answer here)


def test_v2_plan_maps_names_and_values_like_runc_fs2() -> None:
    res = {
        "memory": {"limit": 64 * MiB, "swap": 96 * MiB, "reservation": 32 * MiB, "swappiness": 5},
        "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0", "idle": 1},
        "pids": {"limit": 99},
        "blockIO": {"weight": 500, "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1000}],
                    "throttleWriteIOPSDevice": [{"major": 8, "minor": 0, "rate": 10}]},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 4 * MiB}],
        "rdma": {"mlx5_0": {"hcaHandles": 3, "hcaObjects": 100}},
        "devices": [{"allow": False, "access": "rwm"}],
        "unified": {"memory.high": "50M"},
    }  # fmt: skip
    writes, warnings = plan_v2(res, lambda _k, name: name == "memory.swap.max")
    files = [(name, value) for _key, name, value in writes]
    assert files == [
        ("memory.swap.max", str(32 * MiB)),  # swap is memory+swap in OCI, swap alone in v2
        ("memory.max", str(64 * MiB)),
        ("memory.low", str(32 * MiB)),
        ("cpu.idle", "1"),
        ("cpu.weight", "100"),
        ("cpu.max", "50000 100000"),
        ("cpuset.cpus", "0-1"),
        ("cpuset.mems", "0"),
        ("pids.max", "99"),
        ("io.weight", "4950"),
        ("io.max", "8:0 rbps=1000"),
        ("io.max", "8:0 wiops=10"),
        ("hugetlb.2MB.max", str(4 * MiB)),
        ("rdma.max", "mlx5_0 hca_handle=3 hca_object=100"),
        ("memory.high", "50M"),
    ]
    assert any("devices" in w and "not enforced" in w for w in warnings)
    assert any("swappiness" in w for w in warnings)


def test_v2_conversions() -> None:
    assert [cgroups.cpu_weight_from_shares(s) for s in (0, 2, 1024, 262144)] == [0, 1, 100, 10000]
    assert [cgroups.io_weight_from_blkio(w) for w in (0, 10, 1000)] == [0, 1, 10000]
    assert cgroups.swap_v2(0, -1) == -1 and cgroups.swap_v2(-1, 5) == -1 and cgroups.swap_v2(0, 5) == 0
    with pytest.raises(LaunchError):
        cgroups.swap_v2(10, 20)  # memory+swap below memory
    writes, _ = plan_v2({"cpu": {"quota": -1, "period": 20000}, "memory": {"limit": -1}}, lambda _k, _n: True)
    expected = [("memory.swap.max", "max"), ("memory.max", "max"), ("cpu.max", "max 20000")]
    assert [(n, v) for _k, n, v in writes] == expected
    with pytest.raises(LaunchError):
        plan_v2({"unified": {"../cgroup.procs": "1"}}, lambda _k, _n: True)
    with pytest.raises(LaunchError):
        plan_v2({"hugepageLimits": [{"pageSize": "../x", "limit": 1}]}, lambda _k, _n: True)
