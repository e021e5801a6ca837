"""cgroups: each limit bites on this host's real cgroups; v2 also against a real cgroup2 tree
and a kernel-shaped fake.

- Root tests use the host's own hierarchy (/sys/fs/cgroup, v1 or v2) with a workload
  that runs into the limit, and check the kernel's own account of it (the limit files,
  OOM kills, throttled periods, frozen tasks, writes held back), never the wall clock.
  A test whose controller this host lacks is skipped, saying so (tests/hostcaps.py).
- Real cgroup2, as root: a hierarchy mounted in a private mount namespace.  Where the
  host's controllers are bound to v1 it still makes groups, moves, freezes, kills,
  accounts CPU and checks delegation for real; limits there need a v2 host.
- The fake (isolation_support.FakeCgroupV2) keeps the resulting state under the kernel's
  rules, and test_kernel_rules asks it and the real kernel the same questions.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import wait_until
from hostcaps import KERNEL, bound_to_v1, needs_cgroup, needs_cgroup2_fs, needs_cgroup_v1
from isolation_support import (
    FakeCgroupV2,
    RealCgroup2,
    python_workload,
    run_program,
    spawn_in_cgroup,
    write_program,
)
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
# (isolation_support.FakeCgroupV2: the resulting state and the kernel's rules, which
# test_kernel_rules below asks of the real kernel too)


@pytest.fixture()
def fake_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroupV2:
    fake = FakeCgroupV2(tmp_path / "cgroup")
    monkeypatch.setattr(Path, "mkdir", lambda self, mode=0o777, parents=False, exist_ok=False:
                        fake.kernel_mkdir(self, mode, parents, exist_ok))
    monkeypatch.setattr(Path, "rmdir", lambda self: fake.kernel_rmdir(self))
    monkeypatch.setattr(cgroups, "open", fake.kernel_open, raising=False)
    return fake


def _text(path: Path) -> str:
    return path.read_text().strip()


def test_v2_writes_limits_as_the_kernel_expects(fake_v2: FakeCgroupV2) -> None:
    r = _opts(memory="64m", cpus="0.5", cpuset="0", pids="20", io_write_bps=["8:0:1mb", "8:16:2mb"],
              io_read_iops=["8:0:100"])
    cg = Cgroup.create("c1", r, root=fake_v2.root, self_cgroup=fake_v2.proc_self_cgroup)
    d = fake_v2.own / "mesobox-c1"
    assert cg.version == 2 and cg.dirs == {"": d}
    # controllers handed down from our own (delegated) group: the kernel lists them in its order
    assert _text(fake_v2.own / "cgroup.subtree_control") == "cpuset cpu io memory pids"
    assert _text(d / "memory.max") == str(64 * MiB)
    assert _text(d / "memory.swap.max") == "0"  # no swapping instead of the OOM kill, as on v1
    assert _text(d / "cpu.max") == "50000 100000"
    assert _text(d / "cpuset.cpus") == "0"
    assert _text(d / "pids.max") == "20"
    assert sorted((d / "io.max").read_text().splitlines()) == [  # one line per device, every key
        "8:0 rbps=max wbps=1048576 riops=100 wiops=max",
        "8:16 rbps=max wbps=2097152 riops=max wiops=max",
    ]
    cg.add_pid(4242)
    assert fake_v2.procs(d) == ["4242"]
    assert fake_v2.procs(fake_v2.own) == []


def test_v2_usage_freeze_and_remove(fake_v2: FakeCgroupV2) -> None:
    cg = Cgroup.create("c2", _opts(memory="64m"), root=fake_v2.root, self_cgroup=fake_v2.proc_self_cgroup)
    d = cg.dirs[""]
    # what the kernel reports after a workload ran into its limit
    (d / "memory.peak").write_text(f"{64 * MiB}\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\noom_group_kill 0\n")
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    (d / "pids.current").write_text("3\n")
    usage = cg.usage()
    assert (usage.memory_peak_bytes, usage.cpu_time_ns, usage.oom_kills, usage.pids_current) == (
        64 * MiB,
        1_500_000_000,
        1,
        3,
    )
    cg.freeze()  # returns once cgroup.events says frozen
    assert (_text(d / "cgroup.freeze"), _keyed(d / "cgroup.events")["frozen"]) == ("1", 1)
    cg.thaw()
    assert (_text(d / "cgroup.freeze"), _keyed(d / "cgroup.events")["frozen"]) == ("0", 0)
    cg.remove()
    assert not d.exists() and fake_v2.own.exists()


def test_v2_own_group_with_processes_is_vacated_once(fake_v2: FakeCgroupV2) -> None:
    # mesobox (pid 100) and the shell (pid 101) live in the delegated scope itself
    fake_v2.place(fake_v2.own, 100, 101)
    cg = Cgroup.create("c4", _opts(pids="5"), root=fake_v2.root, self_cgroup=fake_v2.proc_self_cgroup)
    leaf = fake_v2.own / "mesobox-leaf"
    assert fake_v2.procs(fake_v2.own) == [] and fake_v2.procs(leaf) == ["100", "101"]
    assert "pids" in _text(fake_v2.own / "cgroup.subtree_control").split()
    assert _text(fake_v2.own / "mesobox-c4" / "pids.max") == "5"
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


# --- the kernel's rules, asked of the fake and of a real cgroup2 hierarchy alike ----------


class _Kernel:
    """One tree to ask: ``base`` is a group of ours that has enabled nothing yet."""

    base: Path

    def write(self, path: Path, value: str) -> None:
        with open(path, "w") as f:
            f.write(value)

    def mkdir(self, path: Path) -> None:
        path.mkdir()

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def add_task(self, group: Path) -> str:
        raise NotImplementedError

    def errno_of(self, action: Callable[[], object]) -> int:
        try:
            action()
        except OSError as err:
            return err.errno
        return 0


class _FakeKernel(_Kernel):
    def __init__(self, fake: FakeCgroupV2) -> None:
        self.fake, self.base, self.next_pid = fake, fake.own, 1000

    def write(self, path: Path, value: str) -> None:
        with self.fake.kernel_open(path, "w") as f:
            f.write(value)

    def mkdir(self, path: Path) -> None:
        self.fake.kernel_mkdir(path)

    def rmdir(self, path: Path) -> None:
        self.fake.kernel_rmdir(path)

    def add_task(self, group: Path) -> str:
        self.next_pid += 1
        self.fake.place(group, self.next_pid)
        return str(self.next_pid)


class _RealKernel(_Kernel):
    def __init__(self, tree: RealCgroup2) -> None:
        self.tree, self.base = tree, tree.top

    def add_task(self, group: Path) -> str:
        return str(self.tree.spawn(group).pid)


@pytest.fixture(params=["fake", pytest.param("real", marks=[pytest.mark.root, needs_cgroup2_fs])])
def kernel(request: pytest.FixtureRequest, tmp_path: Path) -> _Kernel:
    if request.param == "fake":
        return _FakeKernel(FakeCgroupV2(tmp_path / "cgroup"))
    return _RealKernel(request.getfixturevalue("cgroup2"))


def test_kernel_rules(kernel: _Kernel) -> None:
    """What FakeCgroupV2 claims of the kernel, on the fake and on the real kernel."""
    a = kernel.base / "a"
    kernel.mkdir(a)
    assert _text(a / "cgroup.controllers") == _text(kernel.base / "cgroup.subtree_control") == ""
    assert kernel.errno_of(lambda: kernel.write(a / "memory.max", "64m")) == errno.EACCES  # not enabled: no file
    assert kernel.errno_of(lambda: kernel.write(a / "cgroup.subtree_control", "+memory")) == errno.ENOENT
    pid = kernel.add_task(a)
    assert (a / "cgroup.procs").read_text().split() == [pid]
    assert _keyed(a / "cgroup.events")["populated"] == _keyed(kernel.base / "cgroup.events")["populated"] == 1
    assert kernel.errno_of(lambda: kernel.rmdir(a)) == errno.EBUSY  # populated
    b = a / "b"
    kernel.mkdir(b)
    kernel.write(b / "cgroup.procs", pid)
    assert ((a / "cgroup.procs").read_text().split(), (b / "cgroup.procs").read_text().split()) == ([], [pid])
    assert kernel.errno_of(lambda: kernel.rmdir(a)) == errno.EBUSY  # a child group
    kernel.write(b / "cgroup.freeze", "1")
    wait_until(lambda: _keyed(b / "cgroup.events")["frozen"] == 1, "the group reports frozen")
    kernel.write(b / "cgroup.kill", "1")  # frozen or not
    wait_until(lambda: _keyed(b / "cgroup.events")["populated"] == 0, "the killed group empties")
    kernel.rmdir(b)
    kernel.rmdir(a)
    assert not a.exists()


def test_kernel_rules_for_a_controller(kernel: _Kernel) -> None:
    """The "no internal processes" rule, where a controller can be handed down at all."""
    offered = _text(kernel.base / "cgroup.controllers").split()
    usable = [c for c in ("pids", "memory", "cpu", "io", "cpuset") if c in offered]
    if not usable:
        pytest.skip(f"this cgroup2 root hands down no controller ({' '.join(offered) or 'none'}): "
                    f"{' '.join(sorted(bound_to_v1()))} are bound to cgroup v1 hierarchies (/proc/cgroups)")
    controller = usable[0]
    kernel.write(kernel.base / "cgroup.subtree_control", f"+{controller}")  # base holds no process: allowed
    a = kernel.base / "a"
    kernel.mkdir(a)
    assert controller in _text(a / "cgroup.controllers").split()
    pid = kernel.add_task(a)
    assert kernel.errno_of(lambda: kernel.write(a / "cgroup.subtree_control", f"+{controller}")) == errno.EBUSY
    leaf = a / "leaf"
    kernel.mkdir(leaf)
    kernel.write(leaf / "cgroup.procs", pid)
    kernel.write(a / "cgroup.subtree_control", f"+{controller}")  # vacated, now it may
    assert any(f.name.startswith(f"{controller}.") for f in leaf.iterdir())  # and the child has the files
    assert kernel.errno_of(lambda: kernel.write(a / "cgroup.procs", pid)) == errno.EBUSY  # nobody may join it now
    kernel.write(leaf / "cgroup.kill", "1")
    wait_until(lambda: _keyed(leaf / "cgroup.events")["populated"] == 0, "the killed group empties")
    kernel.rmdir(leaf)
    kernel.rmdir(a)


# --- cgroup v2 for real: a cgroup2 hierarchy of our own, as root -------------------------
# On a host whose controllers are bound to v1, cgroup2 still makes groups, moves,
# freezes, kills and accounts CPU: the code paths for those run here against the kernel.
# Limits need their controllers free of v1 (test_real_v2_limits...: a v2 host).


@pytest.fixture()
def cgroup2(world_tmp: Path) -> Iterator[RealCgroup2]:
    point = world_tmp / "cgroup2"  # below world_tmp, so the test user can reach it too
    point.mkdir()
    os.chmod(point, 0o755)
    try:
        tree = RealCgroup2(point)
    except OSError as err:
        pytest.skip(f"no cgroup2 hierarchy can be mounted here: {err}")
    yield tree
    tree.close()


def _own_group(tree: RealCgroup2, tmp_path: Path, name: str = "job") -> tuple[Path, Path]:
    """A group standing for the caller's own (delegated) one, and a /proc/self/cgroup naming it."""
    own = tree.top / name
    own.mkdir()
    self_cgroup = tmp_path / f"self-cgroup-{name}"
    self_cgroup.write_text(f"0::{tree.name(own)}\n")
    return own, self_cgroup


def _kernel_has(group: Path, name: str, version: str) -> None:
    if not (group / name).exists():
        pytest.skip(f"kernel {KERNEL} has no {name} (Linux {version})")


@pytest.mark.root
@needs_cgroup2_fs
def test_real_v2_create_join_kill_and_remove(cgroup2: RealCgroup2, tmp_path: Path) -> None:
    own, self_cgroup = _own_group(cgroup2, tmp_path)
    cg = Cgroup.create("real", Resources(), root=cgroup2.root, self_cgroup=self_cgroup)
    group = own / "mesobox-real"
    assert (cg.version, cg.dirs, group.is_dir()) == (2, {"": group}, True)
    _kernel_has(group, "cgroup.kill", "5.14")
    proc = spawn_in_cgroup(cg, ["sleep", "600"])
    try:
        assert cgroup2.group_of(proc.pid) == group  # the kernel's own record of the move
        assert cg.pids() == [proc.pid]
        assert _keyed(group / "cgroup.events")["populated"] == 1
        cg.remove(timeout=0)  # a straggler: cgroup.kill, then the group goes
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not group.exists() and own.is_dir()


@pytest.mark.root
@needs_cgroup2_fs
def test_real_v2_freeze_and_thaw(cgroup2: RealCgroup2, tmp_path: Path) -> None:
    _own, self_cgroup = _own_group(cgroup2, tmp_path)
    cg = Cgroup.create("frz", Resources(), root=cgroup2.root, self_cgroup=self_cgroup)
    events = cg.dirs[""] / "cgroup.events"
    _kernel_has(cg.dirs[""], "cgroup.freeze", "5.2")
    counter = tmp_path / "count"
    proc = spawn_in_cgroup(cg, python_workload(_COUNTING.format(counter=str(counter))))
    try:
        wait_until(lambda: counter.exists() and counter.read_text().isdigit(), "the workload counts")
        cg.freeze()  # returns once the kernel says every task is frozen
        assert _keyed(events)["frozen"] == 1
        frozen_at = counter.read_text()
        cg.thaw()
        assert _keyed(events)["frozen"] == 0
        wait_until(lambda: counter.read_text() != frozen_at, "the workload counts again")
    finally:
        proc.kill()
        proc.wait()
    cg.remove()
    assert not cg.dirs[""].exists()


@pytest.mark.root
@needs_cgroup2_fs
def test_real_v2_usage_is_the_kernels_cpu_account(cgroup2: RealCgroup2, tmp_path: Path) -> None:
    _own, self_cgroup = _own_group(cgroup2, tmp_path)
    cg = Cgroup.create("acct", Resources(), root=cgroup2.root, self_cgroup=self_cgroup)
    proc = spawn_in_cgroup(cg, python_workload("import time\nwhile time.process_time() < 0.3: pass"))
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0
    accounted = (cg.usage().cpu_time_ns or 0) / 1e9
    assert abs(accounted - (rusage.ru_utime + rusage.ru_stime)) < 0.05  # cpu.stat agrees with the task's rusage
    cg.remove()


@pytest.mark.root
@needs_cgroup2_fs
def test_real_v2_a_group_that_hands_down_nothing_is_a_policy_error(cgroup2: RealCgroup2, tmp_path: Path) -> None:
    own, self_cgroup = _own_group(cgroup2, tmp_path)
    assert _text(own / "cgroup.controllers") == ""  # top enabled nothing for it, on any host
    with pytest.raises(PolicyError, match="controllers memory pids are not delegated") as err:
        Cgroup.create("nolimit", _opts(memory="64m", pids="5"), root=cgroup2.root, self_cgroup=self_cgroup)
    assert err.value.hint and "delegate" in err.value.hint
    assert [p for p in own.iterdir() if p.is_dir()] == []


@pytest.mark.root
@needs_cgroup2_fs
def test_real_v2_limits_through_a_vacated_own_group(cgroup2: RealCgroup2, tmp_path: Path) -> None:
    """Where the host's cgroup2 root hands memory, pids and cpu down (a v2 host): our own
    group holds a process, so it is vacated into a leaf before it hands them on."""
    wanted = {"memory", "pids", "cpu"}
    offered = set(_text(cgroup2.top / "cgroup.controllers").split())
    if not wanted <= offered:
        pytest.skip(f"this cgroup2 root hands down {' '.join(sorted(offered)) or 'nothing'}, not "
                    f"{' '.join(sorted(wanted - offered))}: bound to cgroup v1 hierarchies here "
                    f"({' '.join(sorted(bound_to_v1()))}, /proc/cgroups)")
    with open(cgroup2.top / "cgroup.subtree_control", "w") as f:
        f.write("+memory +pids +cpu")
    own, self_cgroup = _own_group(cgroup2, tmp_path)
    sleeper = cgroup2.spawn(own)  # like the shell of a delegated systemd scope
    cg = Cgroup.create("lim", _opts(memory="64m", pids="5", cpus="0.5"), root=cgroup2.root, self_cgroup=self_cgroup)
    assert cgroup2.group_of(sleeper.pid) == own / "mesobox-leaf"
    assert wanted <= set(_text(own / "cgroup.subtree_control").split())
    group = own / "mesobox-lim"
    assert (_text(group / "memory.max"), _text(group / "pids.max"), _text(group / "cpu.max")) == (
        str(64 * MiB), "5", "50000 100000")
    cg.remove()
    assert not group.exists()


USER_CGROUP = """
import subprocess
from pathlib import Path
from mesobox.errors import PolicyError
from mesobox.isolation.cgroups import Cgroup
from mesobox.oci.spec import Resources

try:
    cg = Cgroup.create("u", Resources(), root=Path(sys.argv[1]))  # the real /proc/self/cgroup
except PolicyError as err:
    print(json.dumps({"error": err.message, "exit": err.exit_code}))
    sys.exit(0)
child = subprocess.Popen(["sleep", "600"])
cg.add_pid(child.pid)
with open(f"/proc/{child.pid}/cgroup") as f:
    joined = [line[3:].strip() for line in f if line.startswith("0::")]
cg.remove(timeout=0)
print(json.dumps({"dir": str(cg.dirs[""]), "joined": joined, "rc": child.wait(),
                  "left": os.path.exists(cg.dirs[""])}))
"""


@pytest.mark.root
@needs_cgroup2_fs
def test_real_v2_a_delegated_user_nests_below_its_own_group(  # type: ignore[no-untyped-def]
    cgroup2: RealCgroup2, user, test_python, mesobox_src, world_tmp
) -> None:
    """The kernel's delegation checks, for real: a user in a group handed to them makes
    the container's group below it, moves a process in, kills and removes it; a user in
    a group of root's gets the policy error."""
    delegated, plain = cgroup2.top / "delegated", cgroup2.top / "plain"
    delegated.mkdir()
    plain.mkdir()
    cgroup2.delegate(delegated, user)
    program = write_program(world_tmp, "cg_delegated.py", USER_CGROUP)
    env = {"PYTHONPATH": str(mesobox_src), "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [test_python, str(program), str(cgroup2.mountpoint)]
    results = []
    for group in (delegated, plain):
        proc = cgroup2.run_as(user, group, argv, env)
        assert proc.returncode == 0, proc.stderr.decode()
        results.append(json.loads(proc.stdout.decode().splitlines()[-1]))
    made, refused = results
    assert made["dir"] == str(cgroup2.inside(delegated / "mesobox-u"))
    assert made["joined"] == [cgroup2.name(delegated / "mesobox-u")]  # the kernel's record
    assert (made["rc"], made["left"]) == (-signal.SIGKILL, False)  # killed by the user's cgroup.kill, then removed
    assert "no writable cgroup v2 group for this user" in refused["error"] and refused["exit"] == 13
    assert [p.name for p in plain.iterdir() if p.is_dir()] == []


# --- root, on this host's own cgroups (v1 or v2), with workloads that push the limits -----


def _keyed(path: Path) -> dict[str, int]:
    """A flat-keyed control file (cpu.stat, memory.events, cgroup.events)."""
    return {key: int(value) for key, value in (line.split()[:2] for line in path.read_text().splitlines())}


def _control(cg: Cgroup, v1: str, v2: str) -> Path:
    """A control file of ``cg``: ``controller/name`` on v1, ``name`` on v2."""
    if cg.version == 1:
        controller, name = v1.split("/")
        return cg.dirs[controller] / name
    return cg.dirs[""] / v2


def _tasks(pid: int) -> list[str]:
    return os.listdir(f"/proc/{pid}/task")


_COUNTING = """
import time
n = 0
while True:
    n += 1
    open({counter!r}, "w").write(str(n))
    time.sleep(0.01)
"""


@pytest.fixture()
def cgroups_made() -> Iterator[list[Cgroup]]:
    made: list[Cgroup] = []
    yield made
    for cg in made:
        cg.remove()
        # removal leaves no directory behind in any hierarchy
        assert not [d for d in cg.dirs.values() if d.exists()]


@pytest.mark.root
@needs_cgroup("memory")
def test_memory_limit_oom_kills(cgroups_made: list[Cgroup]) -> None:
    cg = Cgroup.create(f"mem{os.getpid()}", _opts(memory="64m"))
    cgroups_made.append(cg)
    assert _control(cg, "memory/memory.limit_in_bytes", "memory.max").read_text().strip() == str(64 * MiB)
    proc = spawn_in_cgroup(cg, python_workload("x = b'x' * (256 << 20)\nprint('survived')"))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out  # the shell reports this as exit 137
    usage = cg.usage()
    assert usage.oom_kills >= 1
    assert usage.memory_peak_bytes is not None and usage.memory_peak_bytes <= 64 * MiB


@pytest.mark.root
@needs_cgroup("memory")
def test_memory_limit_lets_small_workload_live(cgroups_made: list[Cgroup]) -> None:
    cg = Cgroup.create(f"memok{os.getpid()}", _opts(memory="64m"))
    cgroups_made.append(cg)
    if cg.version == 2 and not (cg.dirs[""] / "memory.peak").exists():
        pytest.skip(f"kernel {KERNEL} has no memory.peak (Linux 5.19): no peak to read after the exit")
    proc = spawn_in_cgroup(cg, python_workload("x = b'x' * (16 << 20)\nprint('survived')"))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == b"survived"
    assert cg.usage().oom_kills == 0
    assert (cg.usage().memory_peak_bytes or 0) >= 16 * MiB


@pytest.mark.root
@needs_cgroup("cpu", "cpuacct")
def test_cpu_quota_is_set_and_the_kernel_throttles_at_it(cgroups_made: list[Cgroup]) -> None:
    """The quota the kernel holds, and its own count of periods in which the workload
    ran out of it; no wall clock (bench/ measures shares)."""
    cg = Cgroup.create(f"cpu{os.getpid()}", _opts(cpus="0.5"))
    cgroups_made.append(cg)
    if cg.version == 1:
        quota = [(cg.dirs["cpu"] / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us")]
    else:
        quota = (cg.dirs[""] / "cpu.max").read_text().split()
    assert quota == ["50000", "100000"]
    # 0.3 s of CPU under a quota of 50 ms per 100 ms period cannot run unthrottled.
    proc = spawn_in_cgroup(cg, python_workload("import time\nwhile time.process_time() < 0.3: pass"))
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0
    assert _keyed(_control(cg, "cpu/cpu.stat", "cpu.stat"))["nr_throttled"] > 0
    accounted = (cg.usage().cpu_time_ns or 0) / 1e9
    assert abs(accounted - (rusage.ru_utime + rusage.ru_stime)) < 0.05  # the group's account is the task's


@pytest.mark.root
@needs_cgroup("pids")
def test_pids_limit_makes_fork_fail(cgroups_made: list[Cgroup]) -> None:
    cg = Cgroup.create(f"pids{os.getpid()}", _opts(pids="10"))
    cgroups_made.append(cg)
    assert _control(cg, "pids/pids.max", "pids.max").read_text().strip() == "10"
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
@needs_cgroup("freezer")
def test_freezer_pauses_and_resumes(cgroups_made: list[Cgroup], tmp_path: Path) -> None:
    counter = tmp_path / "count"
    cg = Cgroup.create(f"frz{os.getpid()}", _opts(pids="100"))
    cgroups_made.append(cg)
    proc = spawn_in_cgroup(cg, python_workload(_COUNTING.format(counter=str(counter))))
    try:
        wait_until(lambda: counter.exists() and counter.read_text().isdigit(), "the workload counts")
        cg.freeze()  # returns once the kernel reports the whole group frozen
        if cg.version == 1:
            assert (cg.dirs["freezer"] / "freezer.state").read_text().strip() == "FROZEN"
            # and every task is frozen, which the kernel shows as an uninterruptible sleep
            assert {_state(proc.pid, task) for task in _tasks(proc.pid)} == {"D"}
        else:
            assert _keyed(cg.dirs[""] / "cgroup.events")["frozen"] == 1
        frozen_at = counter.read_text()
        cg.thaw()
        wait_until(lambda: counter.read_text() != frozen_at, "the workload counts again")
    finally:
        proc.kill()
        cg.thaw()  # a frozen task dies of its SIGKILL only once thawed
        proc.wait()


@pytest.mark.root
@needs_cgroup("pids", "memory")
def test_apply_resources_moves_a_waiting_child(cgroups_made: list[Cgroup]) -> None:
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(python_workload(f"import os\nos.read({read_fd}, 1)"), pass_fds=(read_fd,))
    os.close(read_fd)
    cg = apply_resources(proc.pid, _opts(pids="5", memory="32m"), f"apply{os.getpid()}")
    cgroups_made.append(cg)
    assert cg.version == 2 or {"pids", "memory"} <= set(cg.dirs)
    for group in cg.dirs.values():
        assert str(proc.pid) in (group / "cgroup.procs").read_text().split()
    assert cg.usage().pids_current == 1
    os.write(write_fd, b"x")
    os.close(write_fd)
    assert proc.wait(timeout=30) == 0


@pytest.mark.root
@needs_cgroup("pids")
def test_remove_kills_stragglers_and_leaves_nothing() -> None:
    cg = Cgroup.create(f"rm{os.getpid()}", _opts(pids="10"))
    proc = spawn_in_cgroup(cg, ["sleep", "60"])
    cg.remove(timeout=0.2)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not [d for d in cg.dirs.values() if d.exists()]


def _writes_seen(cg: Cgroup, device: str) -> int:
    """Writes to ``device`` the group's I/O accounting has seen.  v1 counts a write when
    the throttle charges it (before it waits); v2's io.stat when it is issued (after)."""
    if cg.version == 1:
        lines = (cg.dirs["blkio"] / "blkio.throttle.io_serviced").read_text().splitlines()
        return sum(int(line.split()[2]) for line in lines if line.split()[:2] == [device, "Write"])
    for line in (cg.dirs[""] / "io.stat").read_text().splitlines():
        if line.split()[:1] == [device]:
            return int(dict(kv.split("=") for kv in line.split()[1:]).get("wios", 0))
    return 0


def _state(pid: int, task: int | str | None = None) -> str:
    """The kernel's one-letter state of ``pid`` (or of one of its threads)."""
    with open(f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.root
@needs_cgroup("io")
def test_io_write_limit_holds_writes_back(cgroups_made: list[Cgroup], tmp_path: Path) -> None:
    """A limit of one byte a second: the file holds it, the group's write waits in the
    throttle (not a rate measured against the clock) until the limit is lifted."""
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    loop = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True)
    device = loop.stdout.strip()
    majmin = cgroups.device_number(device)
    try:
        cg = Cgroup.create(f"io{os.getpid()}", _opts(io_write_bps=[f"{device}:1"]))
        cgroups_made.append(cg)
        limit = _control(cg, "blkio/blkio.throttle.write_bps_device", "io.max")
        expected = [majmin, "1"] if cg.version == 1 else [majmin, "rbps=max", "wbps=1", "riops=max", "wiops=max"]
        assert limit.read_text().split() == expected
        dd = spawn_in_cgroup(cg, ["dd", "if=/dev/zero", f"of={device}", "bs=64k", "count=1", "oflag=direct",
                                  "status=none"])
        try:
            if cg.version == 1:  # charged to this group's limit for the device …
                wait_until(lambda: _writes_seen(cg, majmin) >= 1, "the write is charged to the group's limit")
            else:  # … or, on v2, blocked in the block layer …
                wait_until(lambda: dd.poll() is not None or _state(dd.pid) == "D", "dd waits for its write")
            # … and held there: dd sleeps, its write not issued
            assert dd.poll() is None and _state(dd.pid) == "D", dd.poll()
            assert cg.version == 1 or _writes_seen(cg, majmin) == 0
            with open(limit, "w") as f:  # lifting the limit lets it through: the limit held it
                f.write(f"{majmin} 0" if cg.version == 1 else f"{majmin} wbps=max")
            _, err = dd.communicate(timeout=60)
            assert dd.returncode == 0, err
            assert _writes_seen(cg, majmin) >= 1
        finally:
            if dd.poll() is None:
                dd.kill()
                dd.wait()
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


# --- the unprivileged user on a v1 host ---------------------------------------------


@pytest.mark.userns
@needs_cgroup_v1
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
