"""mesobox-oci's conformance tier: each point of the OCI runtime spec that issue 13
lists, run from a config.json by runc and by mesobox-oci side by side in the same
test, as real root with the config exactly as written (no user namespace: what the
public runtime-tools suite runs).  Every check compares what the two runtimes'
containers see, and also states what the spec says they should see, so that a point
both runtimes miss still fails.

The configs start from runc's own ``runc spec``; the probe is a busybox shell script
whose output is normalised only where the runtimes may differ by design (mount ids,
device numbers of anonymous filesystems).
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, User, make_busybox_rootfs, need_tool, wait_until

pytestmark = [pytest.mark.root]

Config = dict[str, Any]
Result = tuple[int, str, str]  # (exit status, stdout, stderr)


class Runtime:
    """One runtime's command line, with a state root of its own."""

    def __init__(self, name: str, argv: list[str], root: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.root, self.env = name, argv, root, env

    def __call__(self, *args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.argv, "--root", str(self.root), *args], capture_output=True, text=True,
                              cwd=cwd, env=self.env, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def workdir(shared_tmp: Path) -> Iterator[Path]:
    if os.getuid() != 0:
        pytest.skip("the conformance tier runs configs as real root, as runtime-tools does")
    need_tool("runc", "busybox", "unshare")
    top = shared_tmp / f"conformance-{secrets.token_hex(4)}"
    top.mkdir()
    os.chmod(top, 0o755)  # a user namespace's root (another uid on the host) walks to the rootfs
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def runtimes(workdir: Path, test_python: str) -> dict[str, Runtime]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MESOBOX_SITE_CONFIG": "/nonexistent"}
    found = {}
    for name, argv, extra in (("runc", ["runc"], None),
                              ("mesobox", [test_python, str(ROOT / "bin" / "mesobox-oci")], env)):
        root = workdir / f"state-{name}"
        root.mkdir(mode=0o700)
        found[name] = Runtime(name, argv, root, extra)
    return found


@pytest.fixture(scope="module")
def rootfs(workdir: Path) -> Path:
    root = make_busybox_rootfs(workdir / "rootfs")
    os.chmod(root, 0o755)
    return root


@pytest.fixture(scope="module")
def base(workdir: Path, rootfs: Path) -> Config:
    """``runc spec``'s config, not a terminal, on the busybox root."""
    spec_dir = workdir / "spec"
    spec_dir.mkdir()
    subprocess.run(["runc", "spec", "--bundle", str(spec_dir)], check=True)
    config: Config = json.loads((spec_dir / "config.json").read_text())
    config["process"]["terminal"] = False
    config["root"] = {"path": str(rootfs), "readonly": True}
    return config


def run_both(runtimes: dict[str, Runtime], workdir: Path, config: Config, probe: str) -> dict[str, Result]:
    """Run ``probe`` (sh -c) in a container of ``config`` with each runtime, in the
    foreground, and collect what each printed."""
    results = {}
    for name, runtime in runtimes.items():
        bundle = workdir / f"bundle-{secrets.token_hex(4)}"
        bundle.mkdir()
        doc = copy.deepcopy(config)
        doc["process"]["args"] = ["sh", "-c", probe]
        (bundle / "config.json").write_text(json.dumps(doc))
        cid = f"conf-{name}-{secrets.token_hex(3)}"
        proc = runtime("run", "--bundle", str(bundle), cid)
        runtime("delete", "--force", cid)
        results[name] = (proc.returncode, proc.stdout, proc.stderr)
    return results


def same(results: dict[str, Result], expect: Callable[[str], bool] | None = None) -> str:
    """Both exit 0 and print the same; ``expect`` holds of it.  Returns the output."""
    runc, ours = results["runc"], results["mesobox"]
    assert runc[0] == 0, f"runc failed: {runc[2]}"
    assert ours[0] == 0, f"mesobox-oci failed: {ours[2]}"
    assert ours[1] == runc[1], f"mesobox-oci printed\n{ours[1]}\nrunc printed\n{runc[1]}"
    if expect is not None:
        assert expect(runc[1]), runc[1]
    return runc[1]


def with_(config: Config, **changes: Any) -> Config:
    """A copy of ``config`` with dotted keys set: ``with_(c, **{"process.cwd": "/tmp"})``."""
    doc = copy.deepcopy(config)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return doc


def add_namespace(config: Config, kind: str, path: str | None = None) -> Config:
    doc = copy.deepcopy(config)
    spaces = [ns for ns in doc["linux"]["namespaces"] if ns["type"] != kind]
    spaces.append({"type": kind, **({"path": path} if path else {})})
    doc["linux"]["namespaces"] = spaces
    return doc


# --- process ---------------------------------------------------------------------------


def test_process_args_env_cwd(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    config = with_(base, **{"process.cwd": "/tmp", "process.env": ["PATH=/bin", "FOO=bar baz"]})
    out = same(run_both(runtimes, workdir, config, 'pwd; echo "$FOO"; tr "\\0" " " < /proc/self/cmdline'))
    assert out.startswith("/tmp\nbar baz\n")


def test_user_groups_and_umask(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    config = with_(base, **{"process.user": {"uid": 1000, "gid": 1001, "additionalGids": [5, 100], "umask": 0o27}})
    same(run_both(runtimes, workdir, config, "id -u; id -g; id -G; umask"),
         lambda out: out.split("\n")[:3] == ["1000", "1001", "1001 5 100"] and "0027" in out)


def test_rlimits(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    config = with_(base, **{"process.rlimits": [{"type": "RLIMIT_NOFILE", "soft": 512, "hard": 777},
                                                {"type": "RLIMIT_CORE", "soft": 0, "hard": 0}]})
    same(run_both(runtimes, workdir, config, "ulimit -n; ulimit -Hn; ulimit -c"),
         lambda out: out == "512\n777\n0\n")


@pytest.mark.parametrize("nnp", [True, False])
def test_no_new_privileges(runtimes: dict[str, Runtime], workdir: Path, base: Config, nnp: bool) -> None:
    config = with_(base, **{"process.noNewPrivileges": nnp})
    same(run_both(runtimes, workdir, config, "grep NoNewPrivs /proc/self/status"),
         lambda out: out.split() == ["NoNewPrivs:", "1" if nnp else "0"])


@pytest.mark.parametrize("uid", [0, 1000])
def test_five_capability_sets(runtimes: dict[str, Runtime], workdir: Path, base: Config, uid: int) -> None:
    caps = {"bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_RAW", "CAP_SETUID", "CAP_SETGID"],
            "effective": ["CAP_CHOWN", "CAP_KILL"], "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_RAW"],
            "inheritable": ["CAP_KILL", "CAP_NET_RAW"], "ambient": ["CAP_KILL"]}
    config = with_(base, **{"process.capabilities": caps, "process.user": {"uid": uid, "gid": uid}})

    def expected(out: str) -> bool:
        sets = dict(line.split(":\t") for line in out.splitlines())
        # CHOWN 0, KILL 5, SETGID 6, SETUID 7, NET_RAW 13
        return (int(sets["CapBnd"], 16) == 1 << 0 | 1 << 5 | 1 << 6 | 1 << 7 | 1 << 13
                and int(sets["CapAmb"], 16) == 1 << 5 and int(sets["CapInh"], 16) == 1 << 5 | 1 << 13)

    same(run_both(runtimes, workdir, config, "grep ^Cap /proc/self/status"), expected)


def test_oom_score_adj(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    config = with_(base, **{"process.oomScoreAdj": 345})
    same(run_both(runtimes, workdir, config, "cat /proc/self/oom_score_adj"), lambda out: out == "345\n")


def test_hostname(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    same(run_both(runtimes, workdir, with_(base, hostname="conformant"), "hostname"), lambda out: out == "conformant\n")


@pytest.mark.parametrize("readonly", [True, False])
def test_root_readonly(runtimes: dict[str, Runtime], workdir: Path, base: Config, rootfs: Path,
                       readonly: bool) -> None:
    name = f"written-{secrets.token_hex(3)}"
    config = with_(base, **{"root.readonly": readonly})
    same(run_both(runtimes, workdir, config, f"touch /{name} 2>/dev/null && echo writable && rm /{name} || echo ro"),
         lambda out: out == ("ro\n" if readonly else "writable\n"))


# --- mounts ----------------------------------------------------------------------------


def mountinfo(out: str) -> list[tuple[Any, ...]]:
    """/proc/self/mountinfo lines without what differs between two mounts of the same
    thing (ids, device numbers): mount point, its options, the kinds of its optional
    fields (shared, master, unbindable), type, source, super options."""
    found = []
    for line in out.splitlines():
        fields = line.split()
        dash = fields.index("-")
        kinds = tuple(sorted(f.split(":")[0] for f in fields[6:dash]))
        fstype, source, supers = fields[dash + 1:dash + 4]
        found.append((fields[4], tuple(sorted(fields[5].split(","))), kinds, fstype, source,
                      tuple(sorted(supers.split(",")))))
    return found


def probe_mounts(*points: str) -> str:
    wanted = " ".join(points)
    return f"for p in {wanted}; do grep \" $p \" /proc/self/mountinfo; done"


def both_mountinfo(results: dict[str, Result]) -> list[tuple[Any, ...]]:
    runc, ours = results["runc"], results["mesobox"]
    assert runc[0] == 0 and ours[0] == 0, (runc[2], ours[2])
    # sorted: mesobox mounts parents before children, whatever their order in the config
    assert sorted(mountinfo(ours[1])) == sorted(mountinfo(runc[1])), f"mesobox-oci:\n{ours[1]}\nrunc:\n{runc[1]}"
    return mountinfo(runc[1])


def test_tmpfs_options_and_flags(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    config = copy.deepcopy(base)
    config["mounts"].append({"destination": "/data", "type": "tmpfs", "source": "scratch",
                             "options": ["nosuid", "nodev", "noexec", "noatime", "size=1m", "mode=700", "uid=5"]})
    (point,) = both_mountinfo(run_both(runtimes, workdir, config, probe_mounts("/data")))
    assert point[3:5] == ("tmpfs", "scratch") and {"nosuid", "nodev", "noexec", "noatime"} <= set(point[1])
    assert {"size=1024k", "mode=700", "uid=5"} <= set(point[5])


def test_kernel_filesystems(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    """proc, sysfs, mqueue, devpts and the cgroup mount of ``runc spec``, made for real."""
    points = "/proc|/sys|/dev/mqueue|/dev/pts|/dev/shm|/sys/fs/cgroup[^ ]*"
    results = run_both(runtimes, workdir, add_namespace(base, "network"),
                       f"grep -E ' ({points}) ' /proc/self/mountinfo")
    seen = {m[0]: m for m in both_mountinfo(results)}
    assert {seen[p][3] for p in ("/proc", "/sys", "/dev/mqueue", "/dev/pts")} == {"proc", "sysfs", "mqueue", "devpts"}
    assert any(m[3] in ("cgroup", "cgroup2") for p, m in seen.items() if p.startswith("/sys/fs/cgroup"))


def test_bind_mount_options_and_propagation(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    host = workdir / f"shared-{secrets.token_hex(3)}"
    host.mkdir()
    (host / "file").write_text("from the host\n")
    config = copy.deepcopy(base)
    config["mounts"] += [
        {"destination": "/mnt/ro", "type": "bind", "source": str(host), "options": ["rbind", "ro", "nosuid"]},
        {"destination": "/mnt/shared", "type": "tmpfs", "source": "tmpfs", "options": ["rshared"]},
        {"destination": "/mnt/private", "type": "none", "source": str(host), "options": ["bind", "rprivate"]},
    ]
    probe = probe_mounts("/mnt/ro", "/mnt/shared", "/mnt/private")
    probe += "; cat /mnt/ro/file; touch /mnt/ro/x || echo refused"
    results = run_both(runtimes, workdir, config, probe)
    points = {m[0]: m for m in both_mountinfo({k: (r[0], "\n".join(line for line in r[1].splitlines()
                                                                      if line.count(" ") > 5), r[2])
                                               for k, r in results.items()})}
    assert "ro" in points["/mnt/ro"][1] and "shared" in points["/mnt/shared"][2] and not points["/mnt/private"][2]
    assert results["mesobox"][1].endswith("from the host\nrefused\n")
    assert not (host / "x").exists()


@pytest.mark.parametrize("propagation", ["shared", "slave", "private", "unbindable"])
def test_rootfs_propagation(runtimes: dict[str, Runtime], workdir: Path, base: Config, propagation: str) -> None:
    config = with_(base, **{"linux.rootfsPropagation": propagation})
    results = run_both(runtimes, workdir, config, "awk '$5 == \"/\"' /proc/self/mountinfo")
    # A slave of a mount that is private (this host's /) is private: the kernel has no master to give it.
    expected = {"shared": [("shared",)], "slave": [("master",), ()], "private": [()], "unbindable": [("unbindable",)]}
    assert results["mesobox"][0] == 0, results
    (ours,) = mountinfo(results["mesobox"][1])
    assert ours[2] in expected[propagation], results["mesobox"]
    if propagation == "private":  # runc 1.1.5 here: no shared root, no unbindable one, a slave made otherwise
        assert mountinfo(results["runc"][1]) == [ours], results


# --- devices ---------------------------------------------------------------------------


STAT = "stat -c '%n %F %t:%T %a %u:%g'"


def test_default_devices_and_links(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    devices = " ".join(f"/dev/{name}" for name in ("null", "zero", "full", "random", "urandom", "tty"))
    out = same(run_both(runtimes, workdir, base,
                        f"{STAT} {devices}; for l in fd stdin stdout stderr ptmx; do readlink /dev/$l; done"))
    assert "/dev/null character special file 1:3 666 0:0" in out and "/proc/self/fd\n" in out


def test_linux_devices(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    config = with_(base, **{"linux.devices": [
        {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 0o640, "uid": 5, "gid": 6},
        {"path": "/dev/sub/loopish", "type": "b", "major": 7, "minor": 200, "fileMode": 0o600},
        {"path": "/dev/pipe", "type": "p", "fileMode": 0o620}]})
    config["linux"]["resources"] = {"devices": [{"allow": True, "access": "rwm"}]}
    same(run_both(runtimes, workdir, config, f"{STAT} /dev/mynull /dev/sub/loopish /dev/pipe"),
         lambda out: "/dev/mynull character special file 1:3 640 5:6" in out
         and "/dev/sub/loopish block special file 7:c8 600 0:0" in out and "/dev/pipe fifo" in out)


# --- kernel settings -------------------------------------------------------------------


def test_masked_and_readonly_paths(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    config = with_(base, **{"linux.maskedPaths": ["/proc/timer_list", "/sys/firmware", "/no/such/path"],
                            "linux.readonlyPaths": ["/proc/sys", "/etc"], "root.readonly": False})
    probe = ("wc -c < /proc/timer_list; ls -A /sys/firmware | wc -l; touch /etc/x 2>/dev/null || echo etc-ro; "
             "echo 1 > /proc/sys/vm/overcommit_memory 2>/dev/null || echo sys-ro")
    same(run_both(runtimes, workdir, config, probe), lambda out: out.split() == ["0", "0", "etc-ro", "sys-ro"])


def test_sysctl(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    config = add_namespace(with_(base, **{"linux.sysctl": {"net.ipv4.ip_forward": "1", "kernel.shmmax": "12345678"}}),
                           "network")
    same(run_both(runtimes, workdir, config, "cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/shmmax"),
         lambda out: out == "1\n12345678\n")


def test_sysctl_of_a_shared_namespace_is_refused(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    config = with_(base, **{"linux.sysctl": {"net.ipv4.ip_forward": "1"}})
    config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "network"]
    results = run_both(runtimes, workdir, config, "true")
    assert results["runc"][0] != 0 and results["mesobox"][0] != 0, results  # the host's setting: refused
    assert "sysctl 'net.ipv4.ip_forward' needs the container's own network namespace" in results["mesobox"][2]


# --- namespaces ------------------------------------------------------------------------


NS_PROBE = "for n in pid ipc uts mnt net cgroup; do echo $n $(readlink /proc/self/ns/$n); done"


def ns_kinds(out: str, reference: dict[str, str]) -> dict[str, str]:
    """Each namespace named "host", "joined" (the reference's) or "new"."""
    host = {n: os.readlink(f"/proc/self/ns/{n}") for n in ("pid", "ipc", "uts", "mnt", "net", "cgroup")}
    kinds = {}
    for line in out.splitlines():
        name, link = line.split()
        kinds[name] = "host" if host[name] == link else "joined" if reference.get(name) == link else "new"
    return kinds


def test_new_namespaces_exactly_as_listed(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    config = add_namespace(add_namespace(base, "network"), "cgroup")
    config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "ipc"]
    results = run_both(runtimes, workdir, config, NS_PROBE)
    kinds = {name: ns_kinds(out, {}) for name, (_, out, _) in results.items()}
    assert kinds["mesobox"] == kinds["runc"] == {"pid": "new", "ipc": "host", "uts": "new", "mnt": "new",
                                                 "net": "new", "cgroup": "new"}, results


def namespaces_ready(pid: int) -> bool:
    """True once ``unshare --fork`` has made its namespaces *and* forked pid 1 of the new pid
    namespace: until that child exists the kernel refuses to resolve ``pid_for_children``."""
    try:
        os.readlink(f"/proc/{pid}/ns/pid_for_children")
        return os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    except FileNotFoundError:
        return False


def test_namespace_paths_are_joined(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    holder = subprocess.Popen(["unshare", "--net", "--ipc", "--uts", "--pid", "--fork", "sleep", "600"],
                              start_new_session=True)
    try:
        wait_until(lambda: namespaces_ready(holder.pid), "unshare's namespaces and its pid 1")
        config = base
        for kind, name in (("network", "net"), ("ipc", "ipc"), ("uts", "uts"), ("pid", "pid_for_children")):
            config = add_namespace(config, kind, f"/proc/{holder.pid}/ns/{name}")
        reference = {n: os.readlink(f"/proc/{holder.pid}/ns/{n}") for n in ("net", "ipc", "uts")}
        reference["pid"] = os.readlink(f"/proc/{holder.pid}/ns/pid_for_children")
        results = run_both(runtimes, workdir, config, NS_PROBE)
        for name in ("runc", "mesobox"):
            assert results[name][0] == 0, results[name][2]
            kinds = ns_kinds(results[name][1], reference)
            assert [kinds[n] for n in ("net", "ipc", "uts", "pid")] == ["joined"] * 4, (name, kinds)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


# --- security --------------------------------------------------------------------------


def test_seccomp_from_the_config(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    seccomp = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}
    config = with_(base, **{"linux.seccomp": seccomp})
    same(run_both(runtimes, workdir, config, "mkdir /tmp/d 2>&1 | grep -c 'Permission denied'; ls /tmp"),
         lambda out: out == "1\n")


@pytest.mark.parametrize("change", [
    {"process.capabilities": {"bounding": ["CAP_NO_SUCH_THING"]}},
    {"process.rlimits": [{"type": "RLIMIT_NO_SUCH_THING", "soft": 1, "hard": 1}]},
    {"linux.namespaces": [{"type": "mount"}, {"type": "no-such-namespace"}]},
], ids=["capability", "rlimit", "namespace"])
def test_invalid_input_is_refused(runtimes: dict[str, Runtime], workdir: Path, base: Config,
                                  change: dict[str, Any]) -> None:
    results = run_both(runtimes, workdir, with_(base, **change), "echo ran")
    # runc 1.1.5 only warns of an unknown capability; runtime-spec config.md: "Any value
    # which cannot be mapped to a relevant kernel interface MUST cause an error"
    for name in ("mesobox",) if "process.capabilities" in change else ("runc", "mesobox"):
        assert results[name][0] != 0 and "ran" not in results[name][1], (name, results[name])
    assert results["mesobox"][2].count("\n") <= 2 and "Traceback" not in results["mesobox"][2]


def test_an_absent_security_module_is_a_clear_error(runtimes: dict[str, Runtime], workdir: Path,
                                                     base: Config) -> None:
    if Path("/sys/module/apparmor/parameters/enabled").exists():
        pytest.skip("AppArmor is present here: the profile would be applied")
    results = run_both(runtimes, workdir, with_(base, **{"process.apparmorProfile": "unconfined"}), "echo ran")
    assert results["mesobox"][0] != 0 and "AppArmor is not enabled on this host" in results["mesobox"][2]


# --- lifecycle and hooks ---------------------------------------------------------------


def create(runtime: Runtime, workdir: Path, config: Config, args: list[str], prefix: str,
           pid_file: bool = False) -> tuple[str, Path, subprocess.CompletedProcess[bytes]]:
    """``create`` a container of ``config`` running ``args`` (``pid_file``: with
    --pid-file BUNDLE/pid): (its id, its bundle, the finished create).  Its stdio goes to
    BUNDLE/stderr: the container keeps create's, so a pipe would never be closed."""
    bundle = workdir / f"bundle-{secrets.token_hex(4)}"
    bundle.mkdir()
    doc = copy.deepcopy(config)
    doc["process"]["args"] = args
    (bundle / "config.json").write_text(json.dumps(doc))
    cid = f"{prefix}-{secrets.token_hex(3)}"
    pid = ["--pid-file", str(bundle / "pid")] if pid_file else []
    with open(bundle / "stderr", "w+") as err:
        created = subprocess.run([*runtime.argv, "--root", str(runtime.root), "create", "--bundle", str(bundle),
                                  *pid, cid], env=runtime.env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                 timeout=60, check=False)
    return cid, bundle, created


def lifecycle(runtime: Runtime, workdir: Path, config: Config) -> list[str]:
    """create, state, start, state, kill, state, delete, state: the statuses seen."""
    cid, bundle, created = create(runtime, workdir, config,
                                  ["sh", "-c", "trap 'exit 3' TERM; while true; do sleep 0.1; done"], "life",
                                  pid_file=True)
    seen = []

    def status() -> str:
        proc = runtime("state", cid)
        return json.loads(proc.stdout)["status"] if proc.returncode == 0 else "gone"

    assert created.returncode == 0, (bundle / "stderr").read_text()
    seen.append(status())
    state = json.loads(runtime("state", cid).stdout)
    assert state["pid"] == int((bundle / "pid").read_text()) > 0 and state["id"] == cid
    assert runtime("start", cid).returncode == 0
    seen.append(status())
    seen.append("refused" if runtime("delete", cid).returncode != 0 else "deleted")  # running: needs --force
    assert runtime("kill", cid, "TERM").returncode == 0
    wait_until(lambda: status() == "stopped", "the container to stop")
    seen.append(status())
    assert runtime("delete", cid).returncode == 0
    seen.append(status())
    return seen


def test_lifecycle(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    seen = {name: lifecycle(runtime, workdir, base) for name, runtime in runtimes.items()}
    assert seen["mesobox"] == seen["runc"] == ["created", "running", "refused", "stopped", "gone"]


def test_hooks_run_in_order_with_the_state(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    logs = {}
    for name, runtime in runtimes.items():
        log_dir = workdir / f"hooks-{secrets.token_hex(3)}"
        log_dir.mkdir()
        log = log_dir / "log"

        def hook(kind: str, log: Path = log) -> dict[str, Any]:
            # the state on stdin: its status, and whether its id is this container's
            status = "grep -o '\"status\": *\"[a-z]*\"' | grep -o '[a-z]*\"$'"
            script = f"s=$(cat); echo {kind} $(echo \"$s\" | {status}) >> {log}"
            return {"path": "/bin/sh", "args": ["sh", "-c", script]}

        config = copy.deepcopy(base)
        config["mounts"].append({"destination": str(log_dir), "type": "bind", "source": str(log_dir),
                                 "options": ["rbind"]})
        config["hooks"] = {kind: [hook(kind)] for kind in ("prestart", "createRuntime", "createContainer",
                                                           "startContainer", "poststart", "poststop")}
        bundle = workdir / f"bundle-{secrets.token_hex(4)}"
        bundle.mkdir()
        config["process"]["args"] = ["sh", "-c", f"echo process >> {log}"]
        (bundle / "config.json").write_text(json.dumps(config))
        cid = f"hooks-{secrets.token_hex(3)}"
        proc = runtime("run", "--bundle", str(bundle), cid)
        assert proc.returncode == 0, (name, proc.stderr)
        runtime("delete", cid)
        logs[name] = log.read_text().replace('"', "")
    order = {name: [line.split()[0] for line in log.splitlines()] for name, log in logs.items()}
    for name in ("runc", "mesobox"):
        # create's hooks in the spec's order; poststart races the process's own start
        kinds = [k for k in order[name] if k != "poststart"]
        assert kinds == ["prestart", "createRuntime", "createContainer", "startContainer", "process", "poststop"], \
            (name, logs)
    statuses = dict(line.split() for line in logs["mesobox"].splitlines() if line != "process")
    # runtime-tools' hooks_stdin expects these (runc 1.1.5 says "creating" to prestart, "created" to poststart)
    assert (statuses["prestart"], statuses["poststart"], statuses["poststop"]) == ("created", "running", "stopped")


# --- exec, cgroups, pause, update --------------------------------------------------------


def started(runtime: Runtime, workdir: Path, config: Config) -> tuple[str, Path]:
    """A created and started container that sleeps; (its id, its bundle)."""
    cid, bundle, created = create(runtime, workdir, config, ["sleep", "600"], "live")
    assert created.returncode == 0, (runtime.name, (bundle / "stderr").read_text())
    assert runtime("start", cid).returncode == 0
    return cid, bundle


def test_exec_is_confined_like_the_container(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    caps = {kind: ["CAP_KILL", "CAP_CHOWN"] for kind in ("bounding", "effective", "permitted")}
    config = with_(base, **{"process.capabilities": caps, "process.noNewPrivileges": True,
                            "process.user": {"uid": 0, "gid": 0, "additionalGids": [7]}})
    seen = {}
    for name, runtime in runtimes.items():
        cid, _ = started(runtime, workdir, config)
        try:
            proc = runtime("exec", cid, "sh", "-c", "grep -E '^(Cap|NoNewPrivs|Groups)' /proc/self/status")
            assert proc.returncode == 0, (name, proc.stderr)
            seen[name] = proc.stdout
        finally:
            runtime("delete", "--force", cid)
    assert seen["mesobox"] == seen["runc"], seen
    fields = dict(line.split(":\t") for line in seen["mesobox"].splitlines())
    assert int(fields["CapBnd"], 16) == 1 << 0 | 1 << 5 and fields["NoNewPrivs"] == "1"


def counting(workdir: Path, base: Config, name: str) -> tuple[Config, Path]:
    """A config whose process counts into /data/n, /data a bind mount of a host directory."""
    data = workdir / f"data-{name}-{secrets.token_hex(3)}"
    data.mkdir()
    config = with_(base, **{"root.readonly": False})
    config["mounts"] = [*config["mounts"], {"destination": "/data", "type": "bind", "source": str(data),
                                            "options": ["rbind", "rw"]}]
    config["process"]["args"] = ["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /data/n; sleep 0.1; done"]
    return config, data


def count(data: Path) -> int:
    text = (data / "n").read_text().strip() if (data / "n").exists() else ""
    return int(text) if text.isdigit() else 0


def test_checkpoint_and_restore(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    """runc decides what this host can do.  Where its checkpoint works, mesobox-oci's
    dumps the counting container too, deletes it, and restores it from the images with
    its bind mount: the count goes on from where it was.  Where CRIU cannot run (this
    kernel), both refuse, and the container keeps running untouched; mesobox-oci says
    why in one line, from `criu check`, and writes no image directory."""
    dumped = {}
    for name, runtime in runtimes.items():
        config, data = counting(workdir, base, name)
        cid, bundle, created = create(runtime, workdir, config, config["process"]["args"], "ckpt")
        assert created.returncode == 0 and runtime("start", cid).returncode == 0, (bundle / "stderr").read_text()
        pid = json.loads(runtime("state", cid).stdout)["pid"]
        wait_until(lambda data=data: count(data) > 2, f"{name}'s container counting")
        images = workdir / f"images-{name}-{cid}"
        proc = runtime("checkpoint", "--image-path", str(images), cid, cwd=bundle)
        dumped[name] = proc.returncode == 0
        if not dumped[name]:
            after = json.loads(runtime("state", cid).stdout)
            assert (after["status"], after["pid"]) == ("running", pid), (name, after)
            before = count(data)
            wait_until(lambda data=data, before=before: count(data) > before,
                       f"{name}'s container still counting after the refused checkpoint")
            runtime("delete", "--force", cid)
            if name == "mesobox":
                assert proc.stderr.count("\n") <= 2 and "criu check" in proc.stderr, proc.stderr
                assert not images.exists()
            continue
        assert runtime("state", cid).returncode != 0, f"{name}: the checkpointed container was not deleted"
        at_dump = count(data)
        restored = runtime("restore", "--detach", "--image-path", str(images), "--bundle", str(bundle), cid,
                           cwd=bundle)
        try:
            assert restored.returncode == 0, (name, restored.stderr)
            assert json.loads(runtime("state", cid).stdout)["status"] == "running"
            wait_until(lambda data=data, at_dump=at_dump: count(data) > at_dump + 2,
                       f"{name}'s restored container counting on")
        finally:
            runtime("delete", "--force", cid)
    assert dumped["mesobox"] == dumped["runc"], dumped


def test_checkpoint_command_lines() -> None:
    """What CRIU is asked: every mount from outside the container named external, by
    its destination at dump and bound from the bundle's source at restore."""
    from mesobox.errors import UsageError
    from mesobox.oci.checkpoint import criu_options, dump_args, external_mounts, restore_args

    options = criu_options({"tcp-established", "leave-running", "file-locks"}, None)
    assert options == ("--tcp-established", "--file-locks", "--manage-cgroups=soft")
    with pytest.raises(UsageError, match="manage-cgroups-mode"):
        criu_options(set(), "nope")
    externals = external_mounts({"/data": "/srv/data"}, ["/proc/kcore"])
    assert externals == {"/data": "/srv/data", "/proc/kcore": "/dev/null"}
    dump = dump_args("criu", 42, "/i", "/w", sorted(externals), True, options, "/sys/fs/cgroup/freezer/c")
    assert dump[:4] == ["criu", "dump", "--tree", "42"] and dump[-1] == "--leave-running"
    assert dump[dump.index("--freeze-cgroup") + 1] == "/sys/fs/cgroup/freezer/c"
    assert "--external=mnt[/data]:/data" in dump and "--external=mnt[/proc/kcore]:/proc/kcore" in dump
    restore = restore_args("criu", "/i", "/w", "/w/criu-root", "/w/pid", externals, False, options)
    assert "--external=mnt[/data]:/srv/data" in restore and "--external=mnt[/proc/kcore]:/dev/null" in restore
    assert "--restore-sibling" in restore and restore[6:8] == ["--root", "/w/criu-root"]


def test_restore_needs_a_checkpoint(runtimes: dict[str, Runtime], workdir: Path) -> None:
    empty = workdir / f"not-images-{secrets.token_hex(3)}"
    empty.mkdir()
    proc = runtimes["mesobox"]("restore", "--image-path", str(empty), "--bundle", str(workdir), "never")
    assert proc.returncode != 0 and "is not a checkpoint of mesobox-oci" in proc.stderr, proc.stderr
    assert "never" not in runtimes["mesobox"]("list", "-q").stdout


def cgroup_dir(pid: int, controller: str) -> Path:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if controller in names.split(","):
                return Path("/sys/fs/cgroup") / controller / path.lstrip("/")
    raise AssertionError(f"no {controller} cgroup for {pid}")


def test_cgroups_path_resources_pause_and_update(runtimes: dict[str, Runtime], workdir: Path, base: Config) -> None:
    if not Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        pytest.skip("this check reads cgroup v1 files (the host has cgroup v2)")
    seen = {}
    for name, runtime in runtimes.items():
        path = f"/conformance-{name}-{secrets.token_hex(3)}"
        config = with_(base, **{"linux.cgroupsPath": path, "linux.resources": {
            "memory": {"limit": 64 << 20}, "pids": {"limit": 42}, "cpu": {"shares": 512}}})
        cid, _ = started(runtime, workdir, config)
        try:
            pid = json.loads(runtime("state", cid).stdout)["pid"]
            memory, pids = cgroup_dir(pid, "memory"), cgroup_dir(pid, "pids")
            assert memory.name == pids.name == path.lstrip("/"), (name, memory)
            values = [(memory / "memory.limit_in_bytes").read_text(), (pids / "pids.max").read_text(),
                      (cgroup_dir(pid, "cpu") / "cpu.shares").read_text()]
            assert runtime("pause", cid).returncode == 0
            frozen = (cgroup_dir(pid, "freezer") / "freezer.state").read_text()
            state = json.loads(runtime("state", cid).stdout)["status"]
            assert runtime("resume", cid).returncode == 0
            assert runtime("update", "--pids-limit", "17", cid).returncode == 0
            values += [frozen, state, (pids / "pids.max").read_text()]
            seen[name] = values
        finally:
            runtime("delete", "--force", cid)
        assert not (Path("/sys/fs/cgroup/pids") / path.lstrip("/")).exists(), (name, "cgroup left behind")
    assert seen["mesobox"] == seen["runc"] == [f"{64 << 20}\n", "42\n", "512\n", "FROZEN\n", "paused", "17\n"], seen


def test_created_state_names_the_container_process(runtimes: dict[str, Runtime], workdir: Path,
                                                    base: Config) -> None:
    """At "created", the state's pid is already in every namespace of the container
    (a user namespace with the config's maps too): what a client inspects before start."""
    config = add_namespace(add_namespace(base, "user"), "cgroup")
    config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 3_000_000, "size": 65536}]
    config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 3_000_000, "size": 65536}]
    names = ("user", "pid", "net", "ipc", "uts", "mnt", "cgroup")
    seen = {}
    for name, runtime in runtimes.items():
        cid, bundle, created = create(runtime, workdir, config, ["sleep", "600"], "made")
        try:
            assert created.returncode == 0, (name, (bundle / "stderr").read_text())
            pid = json.loads(runtime("state", cid).stdout)["pid"]
            seen[name] = ({n: os.readlink(f"/proc/{pid}/ns/{n}") != os.readlink(f"/proc/self/ns/{n}") for n in names},
                          Path(f"/proc/{pid}/uid_map").read_text().split())
        finally:
            runtime("delete", "--force", cid)
    assert seen["mesobox"] == seen["runc"] == (dict.fromkeys(names, True), ["0", "3000000", "65536"]), seen


@pytest.mark.parametrize("change", [
    {"linux.sysctl": {"net./../../../etc/hostname": "x"}},
    {"linux.devices": [{"path": "/dev/../etc/passwd", "type": "c", "major": 1, "minor": 3}]},
    {"linux.namespaces": [{"type": "mount"}, {"type": "network", "path": "/etc/hostname"}]},
    {"linux.namespaces": [{"type": "mount"}, {"type": "user", "path": "/proc/1/ns/user"}]},
    {"linux.cgroupsPath": "/../../escape"},
    {"process.oomScoreAdj": 5000},
], ids=["sysctl-key", "device-path", "namespace-file", "user-namespace-path", "cgroups-path", "oom-score"])
def test_hostile_configs_are_one_error_line(runtimes: dict[str, Runtime], workdir: Path, base: Config,
                                            change: dict[str, Any], rootfs: Path) -> None:
    """What a hostile config asks is refused before anything is made: one error line,
    no container left, nothing written outside."""
    before = (rootfs / "etc" / "passwd").read_bytes()
    mesobox = runtimes["mesobox"]
    results = run_both({"mesobox": mesobox}, workdir, with_(base, **change), "echo ran")
    code, out, err = results["mesobox"]
    assert code != 0 and "ran" not in out and err.startswith("mesobox-oci: error: "), err
    assert err.count("\n") <= 2 and "Traceback" not in err
    assert (rootfs / "etc" / "passwd").read_bytes() == before
    assert mesobox("list", "--quiet").stdout.split() == []


def test_a_capability_the_runtime_lacks_is_left_out_with_a_warning(runtimes: dict[str, Runtime], workdir: Path,
                                                                     base: Config) -> None:
    """A host that withholds a capability from root (this project's VMs lack
    CAP_SYS_RESOURCE): the container runs without it, and stderr says so."""
    need_tool("setpriv")
    ours = runtimes["mesobox"]
    lacking = Runtime("mesobox", ["setpriv", "--bounding-set=-sys_nice", *ours.argv], ours.root, ours.env)
    caps = {kind: ["CAP_SYS_NICE", "CAP_KILL"] for kind in ("bounding", "effective", "permitted")}
    results = run_both({"mesobox": lacking}, workdir, with_(base, **{"process.capabilities": caps}),
                       "grep CapEff /proc/self/status")
    code, out, err = results["mesobox"]
    assert code == 0, err
    assert int(out.split()[1], 16) == 1 << 5, out  # CAP_KILL alone
    assert "CAP_SYS_NICE not held by the runtime here: left out" in err


# --- rootless: an ordinary user's runc and mesobox-oci side by side ------------------------


@pytest.mark.userns
def test_rootless_configs_as_runc_runs_them(user: User, test_python: str, mesobox_src: Path,
                                            shared_tmp: Path) -> None:
    """`runc spec --rootless` with a network namespace, a sysctl, masked and read-only
    paths, an rlimit, a hostname and a capability set: what the ordinary user's
    container sees under runc and under mesobox-oci is the same."""
    need_tool("runc", "busybox")
    top = shared_tmp / f"rootless-{secrets.token_hex(4)}"
    top.mkdir()
    make_busybox_rootfs(top / "rootfs")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(top)], check=True)
    made = user.run(["runc", "spec", "--rootless", "--bundle", str(top)])
    assert made.returncode == 0, made.stderr
    config = json.loads((top / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 654}]
    config["process"]["capabilities"] = {kind: ["CAP_KILL", "CAP_CHOWN"]
                                         for kind in ("bounding", "effective", "permitted")}
    config["hostname"] = "rootless-conformance"
    config["linux"]["namespaces"].append({"type": "network"})
    config["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1"}
    config["linux"]["maskedPaths"] = ["/proc/timer_list", "/sys/firmware"]
    config["linux"]["readonlyPaths"] = ["/proc/sys"]
    config["process"]["args"] = ["sh", "-c", "id; grep -E '^(Cap|NoNewPrivs)' /proc/self/status; hostname; "
                                 "cat /proc/sys/net/ipv4/ip_forward; wc -c < /proc/timer_list; ls -A /sys/firmware; "
                                 "echo 1 > /proc/sys/vm/overcommit_memory 2>/dev/null || echo sys-ro; "
                                 "ulimit -n; ulimit -Hn; ip -o link | wc -l"]
    (top / "config.json").write_text(json.dumps(config))
    seen = {}
    for name, argv in (("runc", ["runc"]), ("mesobox", [test_python, str(ROOT / "bin" / "mesobox-oci")])):
        state = top / f"state-{name}"
        user.run(["mkdir", "-m", "700", str(state)], check=True)
        proc = user.run([*argv, "--root", str(state), "run", "--bundle", str(top), f"rl-{name}"],
                        env={"PYTHONPATH": str(mesobox_src), "MESOBOX_SITE_CONFIG": "/nonexistent"})
        assert proc.returncode == 0, (name, proc.stderr.decode())
        seen[name] = proc.stdout.decode()
        user.run([*argv, "--root", str(state), "delete", "--force", f"rl-{name}"],
                 env={"PYTHONPATH": str(mesobox_src), "MESOBOX_SITE_CONFIG": "/nonexistent"})
    assert seen["mesobox"] == seen["runc"], seen
    assert "rootless-conformance\n1\n0\nsys-ro\n321\n654\n1\n" in seen["mesobox"], seen


@pytest.mark.userns
def test_a_rootless_checkpoint_is_refused_and_loses_nothing(user: User, test_python: str, mesobox_src: Path,
                                                            shared_tmp: Path) -> None:
    """As runc: an ordinary user's container cannot be checkpointed (CRIU would need
    CAP_CHECKPOINT_RESTORE); one line says so and the container runs on."""
    need_tool("runc", "busybox")
    top = shared_tmp / f"rootless-ckpt-{secrets.token_hex(4)}"
    top.mkdir()
    make_busybox_rootfs(top / "rootfs")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(top)], check=True)
    assert user.run(["runc", "spec", "--rootless", "--bundle", str(top)]).returncode == 0
    config = json.loads((top / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["sleep", "600"]
    (top / "config.json").write_text(json.dumps(config))
    oci = [test_python, str(ROOT / "bin" / "mesobox-oci"), "--root", str(top / "state")]
    env = {"PYTHONPATH": str(mesobox_src), "MESOBOX_SITE_CONFIG": "/nonexistent"}
    user.run(["mkdir", "-m", "700", str(top / "state")], check=True)
    started = user.run(["sh", "-c", '"$@" </dev/null >/dev/null 2>&1', "sh", *oci, "run", "-d", "--bundle",
                        str(top), "rl-ckpt"], env=env)
    assert started.returncode == 0
    try:
        pid = json.loads(user.run([*oci, "state", "rl-ckpt"], env=env).stdout)["pid"]
        proc = user.run([*oci, "checkpoint", "--image-path", str(top / "images"), "rl-ckpt"], env=env)
        assert proc.returncode != 0 and b"checkpoint needs real root" in proc.stderr, proc.stderr
        assert proc.stderr.count(b"\n") <= 2 and not (top / "images").exists()
        after = json.loads(user.run([*oci, "state", "rl-ckpt"], env=env).stdout)
        assert (after["status"], after["pid"]) == ("running", pid), after
    finally:
        user.run([*oci, "delete", "--force", "rl-ckpt"], env=env)
