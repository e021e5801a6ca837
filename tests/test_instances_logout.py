"""Instances that survive logout (issue 16 §7): found after the login manager deletes
$XDG_RUNTIME_DIR, stopped without a mount or loop device left behind, watched with
``instance stats`` and ``instance top``.

The login session is played as pam_systemd plays it: a per-test directory, the user's
own (0700), named by $XDG_RUNTIME_DIR, deleted as root at "logout" while the instance
runs on, and made afresh, empty, at the next "login".  Instances of these tests live in
the test user's own ``/tmp/mesobox-UID`` (no MESOBOX_RUNTIME_DIR: where mesobox puts
them by itself is the point), so each test names its instances uniquely.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Mesobox, User, need_tool
from instances_support import (
    Instances,
    alive,
    instance_rootfs,
    mounts_mentioning,
    process_tree,
    processes_mentioning,
    wait_until,
)
from run_support import make_squashfs, one_error_line

LOOP = "i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.2; done"
MIB = 1 << 20
# Holds 32 MiB in a shell variable, says so, then spins: memory and CPU that mean something.
HOG = "x=$(head -c 33554432 /dev/zero | tr '\\0' a); echo ready ${#x}; while :; do :; done"


class Session(Instances):
    """``mesobox instance …`` as ``user`` logged in: $XDG_RUNTIME_DIR is ``xdg``, and
    nothing sets MESOBOX_RUNTIME_DIR, so mesobox picks its places by itself."""

    def __init__(self, mesobox: Mesobox, user: User, xdg: Path) -> None:
        super().__init__(mesobox, Path(f"/tmp/mesobox-{user.uid}"), user)
        self.xdg = xdg

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return self.mesobox(*args, as_user=self.user, env={"XDG_RUNTIME_DIR": str(self.xdg)}, timeout=timeout)

    def login(self) -> None:
        """What pam_systemd does at the first login: the user's own 0700 directory."""
        assert self.user is not None
        self.xdg.mkdir(mode=0o700)
        os.chown(self.xdg, self.user.uid, self.user.gid)

    def logout(self) -> None:
        """What logind does at the last logout (user-runtime-dir@.service): delete it all."""
        shutil.rmtree(self.xdg)

    def state_of(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.runtime / "instances" / name / "state.json").read_text())
        return data


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def rootfs(world_tmp: Path) -> Path:
    return instance_rootfs(world_tmp / "rootfs")


@pytest.fixture()
def session(mesobox: Mesobox, world_tmp: Path, user: User) -> Iterator[Session]:
    runner = Session(mesobox, user, world_tmp / f"run-user-{user.uid}")
    runner.login()
    yield runner
    if not runner.xdg.exists():
        runner.login()
    runner.stop_everything()  # a failed test must not leave instances running


def proc_totals(pids: list[int]) -> tuple[float, int]:
    """CPU seconds (utime+stime) and tasks of ``pids``, read from /proc the plain way."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu, tasks = 0.0, 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu += (int(fields[11]) + int(fields[12])) / tick
        tasks += int(fields[17])
    return cpu, tasks


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def loops_of(*files: Path) -> str:
    """``losetup -j`` of each file: the loop devices it backs, as util-linux sees them."""
    return "".join(subprocess.run(["losetup", "-j", str(f)], capture_output=True, text=True, check=True).stdout
                   for f in files)


# --- found after logout ---------------------------------------------------------------------


@pytest.mark.userns
@pytest.mark.default_runtime_dir
def test_an_instance_is_found_after_logout_and_stops_cleanly(session: Session, rootfs: Path) -> None:
    name = unique("web")
    session.ok("instance", "start", "--contain", str(rootfs), name, "sh", "-c", LOOP)
    row = session.listing()[name]
    assert row["status"] == "running"
    # Registered out of the session's directory, and nothing of it runs from there.
    assert (session.runtime / "instances" / name / "lock").exists()
    assert not (session.xdg / "mesobox" / "instances").exists()
    assert processes_mentioning(str(session.xdg)) == [] and mounts_mentioning(str(session.xdg)) == []

    session.logout()
    assert not session.xdg.exists()
    assert alive(row["pid"]) and alive(row["supervisor_pid"])
    after = session.listing()  # $XDG_RUNTIME_DIR still set, its directory gone
    assert after[name]["status"] == "running" and after[name]["pid"] == row["pid"]
    wait_until(lambda: "line-3" in session.ok("instance", "logs", name), "its output after logout")
    assert session("instance", "exec", name, "sh", "-c", "exit 7").returncode == 7

    session.login()  # the next login: a fresh, empty directory
    assert session.listing()[name]["pid"] == row["pid"]
    assert session.ok("instance", "stop", "-t", "1", name).split() == [name]
    assert name not in session.listing("--all")
    wait_until(lambda: not alive(row["pid"]) and not alive(row["supervisor_pid"]), "the instance's processes gone")
    assert processes_mentioning(str(session.runtime / "instances" / name)) == []
    assert processes_mentioning(str(rootfs)) == []
    assert mounts_mentioning(str(rootfs)) == []
    assert not (session.runtime / "instances" / name).exists()


@pytest.mark.userns
def test_the_supervisor_outlives_the_deletion_of_its_directory(
    inst_runtime: Instances, rootfs: Path, user: User
) -> None:
    """An explicit runtime dir deleted under a running instance (by hand, or a /tmp
    cleaner): the supervisor goes on, re-registers the instance with its output, and
    ``list``/``logs``/``stop`` work as before."""
    inst = inst_runtime
    inst.ok("instance", "start", "--contain", str(rootfs), "kept", "sh", "-c", LOOP)
    row = inst.listing()["kept"]
    wait_until(lambda: "line-2" in inst.ok("instance", "logs", "kept"), "some output")
    subprocess.run(["rm", "-rf", str(inst.runtime)], check=True)
    assert alive(row["supervisor_pid"]) and alive(row["pid"])
    wait_until(lambda: "kept" in inst.listing(), "the instance registered again")
    again = inst.listing()["kept"]
    assert (again["pid"], again["supervisor_pid"]) == (row["pid"], row["supervisor_pid"])
    assert (inst.runtime.stat().st_mode & 0o777, inst.runtime.stat().st_uid) == (0o700, user.uid)
    logs = inst.ok("instance", "logs", "kept")
    assert "line-0" in logs  # what was written before the deletion, kept
    count = logs.count("line-")
    wait_until(lambda: inst.ok("instance", "logs", "kept").count("line-") > count, "output after the deletion")
    inst.ok("instance", "stop", "-t", "1", "kept")
    wait_until(lambda: not alive(row["pid"]) and not alive(row["supervisor_pid"]), "the instance's processes gone")
    assert inst.listing("--all") == {}
    assert processes_mentioning(str(rootfs)) == []


@pytest.fixture()
def inst_runtime(mesobox: Mesobox, world_tmp: Path, user: User) -> Iterator[Instances]:
    runner = Instances(mesobox, world_tmp / "runtime", user)
    yield runner
    runner.stop_everything()


# --- stopping leaves no mount and no loop device ----------------------------------------------


@pytest.mark.userns
@pytest.mark.default_runtime_dir
def test_stop_unmounts_the_squashfs_mount_only_its_instance_used(
    session: Session, rootfs: Path, world_tmp: Path
) -> None:
    """The linger is for the next run of a short job; a stopped instance's mount goes at
    once, unless another container still uses it (then its last user decides)."""
    need_tool("mksquashfs", "squashfuse")
    image = make_squashfs(rootfs, world_tmp / "web.sqfs")
    first, second = unique("sqa"), unique("sqb")
    session.ok("instance", "start", "--contain", str(image), first, "sleep", "1000")
    session.ok("instance", "start", "--contain", str(image), second, "sleep", "1000")
    # The supervisor records the mounts of a run it has seen start (waited for, not assumed).
    wait_until(lambda: session.state_of(first).get("mounts") and session.state_of(second).get("mounts"),
               "both instances' shared mount recorded")
    keys = session.state_of(first)["mounts"]
    assert len(keys) == 1 and session.state_of(second)["mounts"] == keys
    point = str(session.runtime / "mnt" / keys[0])
    assert mounts_mentioning(point)  # the shared FUSE mount, seen in our own mountinfo
    assert processes_mentioning(str(image))  # and its squashfuse daemon

    session.ok("instance", "stop", "-t", "1", first)
    assert mounts_mentioning(point)  # still used by the second one
    assert session("instance", "exec", second, "sh", "-c", "exit 3").returncode == 3  # its image still served
    session.ok("instance", "stop", "-t", "1", second)
    assert [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if point in line] == []
    wait_until(lambda: mounts_mentioning(point) == [], "the mount gone from every namespace")
    wait_until(lambda: processes_mentioning(str(image)) == [], "the squashfuse daemon gone")
    assert not Path(point).exists()


@pytest.mark.root
def test_root_stop_leaves_no_loop_device(mesobox: Mesobox, world_tmp: Path, rootfs: Path) -> None:
    """Root's --overlay ext4 image and kernel squashfs each take a loop device: both are
    detached when ``instance stop`` returns."""
    need_tool("mksquashfs", "losetup", "mke2fs")
    root = Instances(mesobox, world_tmp / "runtime-root", None)
    image = make_squashfs(rootfs, world_tmp / "root.sqfs")
    overlay = world_tmp / "overlay.img"
    root.ok("overlay", "create", str(overlay), "16m")
    try:
        root.ok("instance", "start", "--overlay", str(overlay), "--contain", str(image), "looped",
                "sh", "-c", "echo kept > /var/mark; exec sleep 1000")
        # Both set up by `mesobox run` before the workload runs (waited for, not assumed).
        # losetup -j finds a file's loop devices by device and inode (the name it prints
        # may be cut, or seen from another root in a sandbox): any line is one.
        wait_until(lambda: loops_of(overlay) != "" and loops_of(image) != "", "both loop devices")
        wait_until(lambda: root.state("looped").get("mounts"), "the shared mount recorded")
        assert root.ok("instance", "stop", "-t", "1", "looped").split() == ["looped"]
        assert loops_of(overlay, image) == ""
        assert [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(world_tmp) in ln] == []
        wait_until(lambda: mounts_mentioning(str(world_tmp)) == [], "no mount of the test anywhere")
    finally:
        root.stop_everything()


# --- stats and top ----------------------------------------------------------------------------


@pytest.mark.userns
@pytest.mark.default_runtime_dir
def test_stats_and_top_match_proc(session: Session, rootfs: Path, user: User) -> None:
    name = unique("hog")
    session.ok("instance", "start", "--contain", str(rootfs), name, "sh", "-c", HOG)
    wait_until(lambda: f"ready {32 * MIB}" in session.ok("instance", "logs", name), "the workload's 32 MiB")
    workload = session.listing()[name]["pid"]
    pids = sorted(process_tree(workload))

    cpu_before, tasks = proc_totals(pids)
    (row,) = json.loads(session.ok("instance", "stats", "--no-stream", "--json", "--interval", "0.5", name))
    cpu_after, _ = proc_totals(pids)
    assert row["name"] == name and row["source"] == "proc"  # an ordinary user has no cgroup of its own here
    assert cpu_before - 0.01 <= row["cpu_seconds"] <= cpu_after + 0.01
    assert row["cpu_percent"] > 0  # it spins
    assert row["pids"] == tasks
    assert 32 * MIB <= row["memory_bytes"] <= sum(rss(p) for p in pids) + MIB
    assert row["io_read_bytes"] is not None and row["io_write_bytes"] is not None

    table = session.ok("instance", "stats", "--no-stream", "--interval", "0.2")  # every running instance
    assert table.splitlines()[0].split() == ["NAME", "CPU", "%", "MEM", "IO", "READ", "IO", "WRITE", "PIDS"]
    assert any(line.split()[0] == name for line in table.splitlines()[1:])

    rows = json.loads(session.ok("instance", "top", "--json", name))
    assert sorted(r["pid"] for r in rows) == pids
    hog = next(r for r in rows if r["pid"] == workload)
    assert hog["user"] == user.name and hog["uid"] == user.uid  # container root, as the host sees it
    assert hog["command"].startswith("sh -c x=$(head")
    assert hog["rss_bytes"] >= 32 * MIB and abs(hog["rss_bytes"] - rss(workload)) <= 4 * MIB
    assert hog["cpu_percent"] > 0
    text = session.ok("instance", "top", name).splitlines()
    assert text[0].split() == ["PID", "USER", "%CPU", "RSS", "COMMAND"]
    assert any(line.split()[0] == str(workload) and user.name in line for line in text[1:])

    session.ok("instance", "stop", "-t", "1", name)
    for args in (["instance", "top", name], ["instance", "stats", "--no-stream", name]):
        proc = session(*args)
        assert proc.returncode == 2 and "no instance named" in one_error_line(proc.stderr)


# --- hostile: the new place is trusted only when it is the user's own -----------------------------


def fresh_runtime_dir(who: User) -> Path:
    """``/tmp/mesobox-UID`` of ``who``, gone (as root)."""
    path = Path(f"/tmp/mesobox-{who.uid}")
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
    return path


@pytest.mark.userns
@pytest.mark.default_runtime_dir
def test_an_instance_planted_by_another_user_is_never_shown_or_stopped(
    mesobox: Mesobox, victim: User, attacker: User, world_tmp: Path
) -> None:
    """The attacker makes the victim's logout-safe place first and plants an instance
    whose state names the attacker's own process: the victim's ``list`` and ``stop``
    refuse the place in one line, show nothing from it and signal nothing."""
    runtime = fresh_runtime_dir(victim)
    xdg = world_tmp / f"run-user-{victim.uid}"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, victim.uid, victim.gid)
    bait = subprocess.Popen(["setpriv", f"--reuid={attacker.uid}", f"--regid={attacker.gid}", "--clear-groups",
                             "sleep", "1000"])
    target = bait.pid
    try:
        wait_until(lambda: Path(f"/proc/{target}/cmdline").read_bytes().startswith(b"sleep"), "the attacker's sleep")
        planted = runtime / "instances" / "evil"
        attacker.run(["mkdir", "-p", "-m", "0777", str(planted)], check=True)
        attacker.run(["chmod", "0777", str(runtime), str(runtime / "instances")], check=True)
        start = Path(f"/proc/{target}/stat").read_text().rsplit(")", 1)[1].split()[19]
        state = {"status": "running", "workload_pid": target, "workload_start": int(start),
                 "supervisor_pid": target, "supervisor_start": int(start), "run_started": 0}
        attacker.run(["sh", "-c", f"echo '{json.dumps(state)}' > {planted}/state.json; "
                      f"echo '{{\"name\": \"evil\", \"image\": \"/x\"}}' > {planted}/spec.json"], check=True)
        env = {"XDG_RUNTIME_DIR": str(xdg)}
        for args in (["instance", "list", "--all"], ["instance", "stop", "evil"], ["instance", "stats", "--no-stream"]):
            proc = mesobox(*args, as_user=victim, env=env)
            assert proc.returncode == 125, (args, proc.stderr)
            assert "belongs to uid" in one_error_line(proc.stderr)
            assert b"evil" not in proc.stdout
        assert alive(target) and planted.is_dir()  # nothing signalled, nothing removed
        assert not (xdg / "mesobox" / "instances").exists()
    finally:
        bait.send_signal(signal.SIGKILL)
        bait.wait()
        fresh_runtime_dir(victim)
