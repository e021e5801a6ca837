"""cgroups: each limit bites on this host's real cgroup v1, v2 code against a fake tree.

Root tests use the real v1 hierarchy under /sys/fs/cgroup/<controller> with a workload
that tries to exceed the limit; the v2 code is checked file by file against a tree laid
out as the kernel's cgroup2 filesystem (the test hosts' cgroup2 mount has no controllers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from isolation_support import FakeCgroupV2, python_workload, run_program, spawn_in_cgroup, wait_for, write_program
from mesobox.errors import PolicyError, UsageError
from mesobox.isolation import cgroups
from mesobox.isolation.cgroups import (
    Cgroup,
    Resources,
    apply_resources,
    candidate_parents,
    parse_resource_options,
    parse_size,
)

MiB = 1024**2


def _opts(**kw: object) -> Resources:
    base: dict[str, object] = {"memory": None, "cpus": None, "cpuset": None, "pids": None}
    base.update(kw)
    lists = {k: kw.get(k, []) for k in ("io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops")}
    return parse_resource_options(
        base["memory"],  # type: ignore[arg-type]
        base["cpus"],  # type: ignore[arg-type]
        base["cpuset"],  # type: ignore[arg-type]
        base["pids"],  # type: ignore[arg-type]
        **lists,  # type: ignore[arg-type]
    )


# --- option parsing -----------------------------------------------------------------


def test_parse_resource_options_docker_syntax() -> None:
    r = _opts(memory="512m", cpus="1.5", cpuset="0-1", pids="100", io_write_bps=["8:0:10mb"], io_read_iops=["8:0:50"])
    assert r.memory_bytes == 512 * MiB
    assert (r.cpu_quota_us, r.cpu_period_us) == (150_000, 100_000)
    assert r.cpuset_cpus == "0-1"
    assert r.pids_limit == 100
    assert r.io_write_bps == (("8:0", 10 * MiB),)
    assert r.io_read_iops == (("8:0", 50),)
    assert _opts(memory="1.5g").memory_bytes == 1536 * MiB
    assert _opts(memory="2GiB").memory_bytes == 2048 * MiB
    assert _opts(memory="67108864").memory_bytes == 64 * MiB
    assert _opts().is_empty()


def test_parse_device_path_to_major_minor() -> None:
    st = os.stat("/dev/loop0")
    r = _opts(io_read_bps=["/dev/loop0:1m"])
    assert r.io_read_bps == ((f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", MiB),)


@given(st.integers(min_value=1, max_value=2**64), st.sampled_from(["", "b", "k", "kb", "KiB", "m", "mb", "G", "g"]))
def test_parse_size_units_are_binary(n: int, unit: str) -> None:
    multiplier = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit[:1].lower()]
    assert parse_size(f"{n}{unit}", "size") == n * multiplier


@pytest.mark.parametrize(
    "kw",
    [
        {"memory": "lots"},
        {"memory": "-5m"},
        {"memory": "1k"},
        {"cpus": "0"},
        {"cpus": "abc"},
        {"cpus": "9999"},
        {"cpuset": "1-0"},
        {"cpuset": "a"},
        {"pids": "0"},
        {"pids": "ten"},
        {"io_write_bps": ["8:0"]},
        {"io_write_bps": ["/etc/passwd:1m"]},
        {"io_write_bps": ["/nonexistent:1m"]},
        {"io_read_iops": ["8:0:1.5"]},
    ],
)
def test_parse_resource_options_rejects(kw: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        _opts(**kw)


def test_candidate_parents_prefers_own_then_slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    base = Path("/sys/fs/cgroup")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    found = candidate_parents(base, "/system.slice/slurmstepd.scope/job_42/step_0/user/task_0")
    assert found == [
        base / "system.slice/slurmstepd.scope/job_42/step_0/user/task_0",
        base / "system.slice/slurmstepd.scope/job_42",
        base,
    ]


# --- cgroup v2 against a kernel-shaped fake tree ----------------------------------


@pytest.fixture()
def fake_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroupV2:
    fake = FakeCgroupV2(tmp_path / "cgroup")
    monkeypatch.setattr(Path, "rmdir", lambda self: fake.kernel_rmdir(self))
    monkeypatch.setattr(cgroups, "open", fake.kernel_open, raising=False)
    return fake


def test_v2_writes_limits_as_the_kernel_expects(fake_v2: FakeCgroupV2) -> None:
    r = _opts(memory="64m", cpus="0.5", cpuset="0", pids="20", io_write_bps=["8:0:1mb"], io_read_iops=["8:0:100"])
    cg = Cgroup.create("c1", r, root=fake_v2.root, self_cgroup=fake_v2.proc_self_cgroup)
    d = fake_v2.own / "mesobox-c1"
    assert cg.version == 2 and cg.dirs == {"": d}
    # controllers handed down from our own (delegated) group, one "+name" per write
    assert (fake_v2.own / "cgroup.subtree_control").read_text() == "memory pids cpu cpuset io"
    assert (d / "memory.max").read_text() == str(64 * MiB)
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert (d / "cpuset.cpus").read_text() == "0"
    assert (d / "pids.max").read_text() == "20"
    assert (d / "io.max").read_text() == "8:0 wbps=1048576 riops=100"
    cg.add_pid(4242)
    assert (d / "cgroup.procs").read_text() == "4242"


def test_v2_usage_freeze_and_remove(fake_v2: FakeCgroupV2) -> None:
    cg = Cgroup.create("c2", _opts(memory="64m"), root=fake_v2.root, self_cgroup=fake_v2.proc_self_cgroup)
    d = cg.dirs[""]
    # what the kernel reports after a workload ran into its limit
    (d / "memory.peak").write_text(f"{64 * MiB}\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\noom_group_kill 0\n")
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    (d / "pids.current").write_text("3\n")
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    usage = cg.usage()
    assert (usage.memory_peak_bytes, usage.cpu_time_ns, usage.oom_kills, usage.pids_current) == (
        64 * MiB,
        1_500_000_000,
        1,
        3,
    )

    def kernel_freezes() -> None:  # the kernel acknowledges cgroup.freeze in cgroup.events
        freeze = d / "cgroup.freeze"  # created by the code under test
        assert wait_for(lambda: freeze.exists() and freeze.read_text() == "1")
        (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")

    t = threading.Thread(target=kernel_freezes)
    t.start()
    cg.freeze()
    t.join()
    assert (d / "cgroup.freeze").read_text() == "1"
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    cg.thaw()
    assert (d / "cgroup.freeze").read_text() == "0"
    cg.remove()
    assert not d.exists() and fake_v2.own.exists()


def test_v2_own_group_with_processes_is_vacated_once(fake_v2: FakeCgroupV2) -> None:
    # mesobox (pid 100) and the shell (pid 101) live in the delegated scope itself
    (fake_v2.own / "cgroup.procs").write_text("100 101")
    cg = Cgroup.create("c4", _opts(pids="5"), root=fake_v2.root, self_cgroup=fake_v2.proc_self_cgroup)
    leaf = fake_v2.own / "mesobox-leaf"
    assert fake_v2.procs(fake_v2.own) == [] and fake_v2.procs(leaf) == ["100", "101"]
    assert "pids" in (fake_v2.own / "cgroup.subtree_control").read_text().split()
    assert (fake_v2.own / "mesobox-c4" / "pids.max").read_text() == "5"
    cg.remove()
    # the next run starts from the leaf and nests beside it, not below it
    fake_v2.proc_self_cgroup.write_text(f"0::/{leaf.relative_to(fake_v2.root)}\n")
    again = Cgroup.create("c5", _opts(pids="5"), root=fake_v2.root, self_cgroup=fake_v2.proc_self_cgroup)
    assert again.dirs[""] == fake_v2.own / "mesobox-c5"
    again.remove()
    assert leaf.exists() and not (fake_v2.own / "mesobox-c5").exists()


def test_v2_undelegated_controller_is_a_policy_error(tmp_path: Path) -> None:
    fake = FakeCgroupV2(tmp_path / "cgroup", controllers="cpu pids")
    with pytest.raises(PolicyError, match="memory") as err:
        Cgroup.create("c3", _opts(memory="64m"), root=fake.root, self_cgroup=fake.proc_self_cgroup)
    assert err.value.hint and "Delegate" in err.value.hint
    assert not (fake.own / "mesobox-c3").exists()


# --- cgroup v1, for real, as root ---------------------------------------------------


def _v1_dirs(name: str) -> list[Path]:
    return [p / f"mesobox-{name}" for p in Path("/sys/fs/cgroup").iterdir() if (p / "cgroup.procs").exists()]


@pytest.fixture()
def cgroups_made() -> Iterator[list[Cgroup]]:
    made: list[Cgroup] = []
    yield made
    for cg in made:
        cg.remove()
        # removal leaves no directory behind in any hierarchy
        assert not [d for d in cg.dirs.values() if d.exists()]


@pytest.mark.root
def test_v1_memory_limit_oom_kills(cgroups_made: list[Cgroup]) -> None:
    cg = Cgroup.create(f"mem{os.getpid()}", _opts(memory="64m"))
    cgroups_made.append(cg)
    assert cg.version == 1 and (cg.dirs["memory"] / "memory.limit_in_bytes").read_text().strip() == str(64 * MiB)
    proc = spawn_in_cgroup(cg, python_workload("x = b'x' * (256 << 20)\nprint('survived')"))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out  # the shell reports this as exit 137
    usage = cg.usage()
    assert usage.oom_kills >= 1
    assert usage.memory_peak_bytes is not None and usage.memory_peak_bytes <= 64 * MiB


@pytest.mark.root
def test_v1_memory_limit_lets_small_workload_live(cgroups_made: list[Cgroup]) -> None:
    cg = Cgroup.create(f"memok{os.getpid()}", _opts(memory="64m"))
    cgroups_made.append(cg)
    proc = spawn_in_cgroup(cg, python_workload("x = b'x' * (16 << 20)\nprint('survived')"))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == b"survived"
    assert cg.usage().oom_kills == 0
    assert (cg.usage().memory_peak_bytes or 0) >= 16 * MiB


@pytest.mark.root
@pytest.mark.slow
def test_v1_cpu_quota_caps_share(cgroups_made: list[Cgroup]) -> None:
    cg = Cgroup.create(f"cpu{os.getpid()}", _opts(cpus="0.5"))
    cgroups_made.append(cg)
    start = time.monotonic()
    proc = spawn_in_cgroup(
        cg, python_workload("import time\nt = time.monotonic()\nwhile time.monotonic() - t < 2: pass")
    )
    _, _, rusage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    proc.returncode = 0
    cpu_seconds = rusage.ru_utime + rusage.ru_stime
    share = cpu_seconds / wall
    print(f"--cpus 0.5: {cpu_seconds:.2f} CPU-s in {wall:.2f} s wall = {share:.2f} CPU")
    assert 0.4 <= share <= 0.6
    accounted = (cg.usage().cpu_time_ns or 0) / 1e9
    assert abs(accounted - cpu_seconds) < 0.2  # cpuacct agrees with the kernel's rusage


@pytest.mark.root
def test_v1_pids_limit_makes_fork_fail(cgroups_made: list[Cgroup]) -> None:
    cg = Cgroup.create(f"pids{os.getpid()}", _opts(pids="10"))
    cgroups_made.append(cg)
    code = """
        import os, time
        kids = []
        try:
            for _ in range(50):
                pid = os.fork()
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                kids.append(pid)
            print("no limit", len(kids))
        except BlockingIOError:
            print("EAGAIN", len(kids), flush=True)
            open("/proc/self/stat").read()
        for k in kids:
            os.kill(k, 9)
    """
    proc = spawn_in_cgroup(cg, python_workload(code))
    out, err = proc.communicate(timeout=60)
    assert out.split() == [b"EAGAIN", b"9"], (out, err)  # 1 interpreter + 9 children = 10


@pytest.mark.root
def test_v1_freezer_pauses_and_resumes(cgroups_made: list[Cgroup], tmp_path: Path) -> None:
    counter = tmp_path / "count"
    cg = Cgroup.create(f"frz{os.getpid()}", _opts(pids="100"))
    cgroups_made.append(cg)
    code = f"""
        import time
        n = 0
        while True:
            n += 1
            open({str(counter)!r}, "w").write(str(n))
            time.sleep(0.01)
    """
    proc = spawn_in_cgroup(cg, python_workload(code))
    try:
        assert wait_for(lambda: counter.exists() and counter.read_text().isdigit())
        cg.freeze()
        frozen_at = counter.read_text()
        time.sleep(0.3)
        assert counter.read_text() == frozen_at
        cg.thaw()
        assert wait_for(lambda: counter.read_text() != frozen_at)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.root
def test_v1_apply_resources_moves_a_waiting_child(cgroups_made: list[Cgroup]) -> None:
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(python_workload(f"import os\nos.read({read_fd}, 1)"), pass_fds=(read_fd,))
    os.close(read_fd)
    cg = apply_resources(proc.pid, _opts(pids="5", memory="32m"), f"apply{os.getpid()}")
    cgroups_made.append(cg)
    assert str(proc.pid) in (cg.dirs["pids"] / "cgroup.procs").read_text().split()
    assert str(proc.pid) in (cg.dirs["memory"] / "cgroup.procs").read_text().split()
    assert cg.usage().pids_current == 1
    os.write(write_fd, b"x")
    os.close(write_fd)
    assert proc.wait(timeout=30) == 0


@pytest.mark.root
def test_v1_remove_kills_stragglers_and_leaves_nothing() -> None:
    name = f"rm{os.getpid()}"
    cg = Cgroup.create(name, _opts(pids="10"))
    proc = spawn_in_cgroup(cg, ["sleep", "60"])
    cg.remove(timeout=0.2)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not [d for d in _v1_dirs(name) if d.exists()]


@pytest.mark.root
@pytest.mark.slow
def test_v1_blkio_caps_write_rate_on_loop_device(cgroups_made: list[Cgroup], tmp_path: Path) -> None:
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    loop = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True)
    device = loop.stdout.strip()
    try:
        rate = 4 * MiB
        cg = Cgroup.create(f"io{os.getpid()}", _opts(io_write_bps=[f"{device}:4m"]))
        cgroups_made.append(cg)
        dd = ["dd", "if=/dev/zero", f"of={device}", "bs=256k", "count=40", "oflag=direct", "status=none"]
        start = time.monotonic()
        proc = spawn_in_cgroup(cg, dd)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - start
        assert proc.returncode == 0, err
        measured = 10 * MiB / elapsed
        unthrottled_start = time.monotonic()
        subprocess.run(dd, check=True)
        unthrottled = 10 * MiB / (time.monotonic() - unthrottled_start)
        print(f"blkio 4 MiB/s: measured {measured / MiB:.2f} MiB/s; without limit {unthrottled / MiB:.0f} MiB/s")
        assert 0.6 * rate <= measured <= 1.25 * rate
        assert unthrottled > 2 * rate  # the device itself is not the bottleneck
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


# --- the unprivileged user on this v1 host ------------------------------------------


@pytest.mark.userns
def test_unprivileged_user_on_v1_gets_policy_error(user, test_python, mesobox_src, world_tmp) -> None:  # type: ignore[no-untyped-def]
    program = write_program(
        world_tmp,
        "cg_user.py",
        """
        from mesobox.errors import PolicyError
        from mesobox.isolation.cgroups import Cgroup
        from mesobox.oci.spec import Resources
        try:
            Cgroup.create("u", Resources(memory_bytes=64 << 20))
            print(json.dumps({"created": True}))
        except PolicyError as err:
            print(json.dumps({"message": err.message, "hint": err.hint, "exit": err.exit_code}))
        """,
    )
    proc, result = run_program(test_python, mesobox_src, program, user=user)
    assert proc.returncode == 0, proc.stderr
    assert "memory" in result["message"] and "no writable" in result["message"]
    assert "delegat" in result["hint"]
    assert result["exit"] == 13
