"""Cloud mode: ``mesobox instance …``, pause/resume, checkpoint detection.

Real containers throughout: every instance is ``mesobox run`` of a busybox directory
image, started by the detached supervisor, as the ordinary test user (root only where
the cgroup freezer is the point).  After each lifecycle test the system is scanned for
leftovers: processes, mounts of the image, instance state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Mesobox, User
from hostcaps import criu_check, needs_cgroup
from instances_support import (
    Instances,
    alive,
    instance_rootfs,
    mounts_mentioning,
    proc_state,
    process_tree,
    processes_mentioning,
    wait_until,
)
from mesobox.cli.instance import parse_duration, parse_restart, parse_start
from mesobox.errors import UsageError

LOOP = "i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.2; done"


@pytest.fixture()
def rootfs(world_tmp: Path) -> Path:
    # One image per test, so mount scans cannot confuse two tests' containers.
    return instance_rootfs(world_tmp / "rootfs")


@pytest.fixture()
def inst(mesobox: Mesobox, world_tmp: Path, user: User) -> Iterator[Instances]:
    runner = Instances(mesobox, world_tmp / "runtime", user)
    yield runner
    runner.stop_everything()  # a failed test must not leave instances running


@pytest.fixture()
def root_inst(mesobox: Mesobox, world_tmp: Path) -> Iterator[Instances]:
    runner = Instances(mesobox, world_tmp / "runtime-root", None)
    yield runner
    runner.stop_everything()


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes], code: int | None = None) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0
    if code is not None:
        assert proc.returncode == code, err
    assert "Traceback" not in err
    assert err.startswith("mesobox: error: ") and len(err.strip().splitlines()) <= 2, err
    return err


def assert_nothing_left(inst: Instances, names: list[str], pids: list[int], rootfs: Path) -> None:
    wait_until(lambda: not any(alive(p) for p in pids), "instance processes gone")
    for name in names:
        # The supervisor's command line names the state directory, which names the instance.
        assert processes_mentioning(str(inst.runtime / "instances" / name)) == []
    assert processes_mentioning(str(rootfs)) == []
    assert mounts_mentioning(str(rootfs)) == []
    left = list((inst.runtime / "instances").iterdir()) if (inst.runtime / "instances").exists() else []
    assert left == []


# --- pure: option parsing ------------------------------------------------------------------


def test_parse_duration_and_restart() -> None:
    assert parse_duration("30") == 30 and parse_duration("2s") == 2
    assert parse_duration("10m") == 600 and parse_duration("2h") == 7200
    for bad in ("", "x", "-1s", "0", "5y"):
        with pytest.raises(UsageError):
            parse_duration(bad)
    assert parse_restart("no") == ("no", None)
    assert parse_restart("on-failure:3") == ("on-failure", 3)
    assert parse_restart("always") == ("always", None)
    for bad in ("sometimes", "always:2", "on-failure:x"):
        with pytest.raises(UsageError):
            parse_restart(bad)


def test_parse_start_splits_own_and_run_options() -> None:
    spec = parse_start(
        ["--restart=on-failure:2", "-B", "/a:/b", "--writable-tmpfs", "--time", "1m", "-t", "3",
         "--net", "none", "img", "web", "sh", "-c", "x"]
    )
    assert spec["restart"] == "on-failure" and spec["restart_max"] == 2
    assert spec["time_limit"] == 60 and spec["grace"] == 3
    assert spec["options"] == ["-B", "/a:/b", "--writable-tmpfs", "--net", "none"]
    assert (spec["image"], spec["name"], spec["args"]) == ("img", "web", ["sh", "-c", "x"])
    with pytest.raises(UsageError):
        parse_start(["img"])
    with pytest.raises(UsageError):
        parse_start(["img", "../evil"])


# --- CLI errors: one line, no traceback ------------------------------------------------------


@pytest.mark.userns
def test_bad_input_gives_one_line_errors(inst: Instances, rootfs: Path) -> None:
    assert_one_line_error(inst("instance", "start", "--restart", "maybe", "--contain", str(rootfs), "a", "true"), 2)
    assert_one_line_error(inst("instance", "start", "--time", "soon", "--contain", str(rootfs), "a", "true"), 2)
    assert_one_line_error(inst("instance", "start", "--contain", str(rootfs), "bad/name", "true"), 2)
    assert_one_line_error(inst("instance", "stop", "nosuch"), 2)
    assert_one_line_error(inst("instance", "exec", "nosuch", "true"), 2)
    assert_one_line_error(inst("instance", "frobnicate"), 2)
    assert inst.listing("--all") == {}


@pytest.mark.userns
def test_failed_start_is_reported_and_frees_the_name(inst: Instances, world_tmp: Path) -> None:
    proc = inst("instance", "start", str(world_tmp / "no-such-image"), "broken", "true")
    err = assert_one_line_error(proc)
    assert "failed to start" in err
    assert inst.listing("--all") == {}


# --- the lifecycle, as the ordinary user ---------------------------------------------------------


@pytest.mark.userns
@pytest.mark.slow
def test_five_instances_lifecycle(inst: Instances, rootfs: Path) -> None:
    names = [f"web{i}" for i in range(5)]
    for name in names:
        inst.ok("instance", "start", "--restart", "on-failure", "--contain", "--writable-tmpfs", str(rootfs), name,
                "sh", "-c", f"echo {name}-was-here > /tmp/marker; exec sleep 1000")
    rows = inst.listing()
    assert sorted(rows) == names
    assert all(r["status"] == "running" and r["pid"] and r["restarts"] == 0 for r in rows.values())
    table = inst.ok("instance", "list")
    assert table.splitlines()[0].split() == ["NAME", "IMAGE", "STATUS", "PID", "RESTARTS", "UPTIME"]
    dup = inst("instance", "start", "--contain", str(rootfs), "web0", "true")
    assert "already exists" in assert_one_line_error(dup, 2)

    # exec joins the same mount namespace: the file lives only in the instance's tmpfs /tmp.
    wait_until(lambda: inst("instance", "exec", "web2", "cat", "/tmp/marker").returncode == 0, "marker")
    out = inst("instance", "exec", "web2", "cat", "/tmp/marker")
    assert out.stdout.decode().strip() == "web2-was-here"
    assert not (rootfs / "tmp" / "marker").exists()
    assert inst("instance", "exec", "web2", "sh", "-c", "exit 7").returncode == 7
    assert inst("instance", "exec", "web2", "no-such-command").returncode == 127

    # on-failure restarts a workload killed with SIGKILL: restarts == 1, a new pid.
    old = rows["web3"]["pid"]
    os.kill(old, signal.SIGKILL)
    row = inst.wait_for("web3", lambda r: r.get("restarts") == 1 and r.get("status") == "running" and r["pid"] != old)
    assert alive(row["pid"]) and not alive(old)

    pids = [r["pid"] for r in inst.listing().values()] + [r["supervisor_pid"] for r in inst.listing().values()]
    # The scans of assert_nothing_left see the live instances (so their silence later means something).
    assert mounts_mentioning(str(rootfs)) and processes_mentioning(str(inst.runtime / "instances" / "web0"))
    assert inst.ok("instance", "stop", "-t", "2", *names).split() == names
    assert inst.listing("--all") == {}
    assert_nothing_left(inst, names, pids, rootfs)


@pytest.mark.userns
def test_restart_on_failure_stops_after_n_restarts(inst: Instances, rootfs: Path) -> None:
    inst.ok("instance", "start", "--restart", "on-failure:2", "--contain", str(rootfs), "flaky",
            "sh", "-c", "echo attempt; sleep 0.3; exit 3")
    row = inst.wait_for("flaky", lambda r: r.get("status") == "exited")
    assert (row["restarts"], row["exit_code"]) == (2, 3)
    assert inst.ok("instance", "logs", "flaky").count("attempt") == 3
    missing = inst("instance", "start", "--contain", str(rootfs), "nocmd", "no-such-command")
    assert "failed to start (exit 127)" in assert_one_line_error(missing, 125)
    inst.ok("instance", "stop", "flaky")
    assert_nothing_left(inst, ["flaky", "nocmd"], [row["supervisor_pid"]], rootfs)


@pytest.mark.userns
def test_time_limit_ends_instance(inst: Instances, rootfs: Path) -> None:
    """The supervisor stops the workload for its time limit and says so; when it does is
    its clock's business (how close to the limit is not a test's to time)."""
    inst.ok("instance", "start", "--time", "2s", "-t", "1", "--contain", str(rootfs), "timed", "sleep", "1000")
    pid = inst.listing()["timed"]["pid"]
    row = inst.wait_for("timed", lambda r: r.get("status") == "exited")
    assert row["exit_code"] == 128 + signal.SIGTERM  # sleep dies of the SIGTERM, no SIGKILL needed
    # stopped for its limit, by the supervisor: `sleep 1000` ends no other way meanwhile
    assert "time limit of 2 s reached: stopping" in inst.ok("instance", "logs", "timed")
    assert "timed" not in inst.listing()  # podman: exited ones only with --all
    assert not alive(pid)
    inst.ok("instance", "stop", "timed")
    assert_nothing_left(inst, ["timed"], [pid, row["supervisor_pid"]], rootfs)


@pytest.mark.userns
def test_logs_show_workload_output(inst: Instances, rootfs: Path) -> None:
    inst.ok("instance", "start", "--contain", str(rootfs), "chatty", "sh", "-c", LOOP)
    wait_until(lambda: "line-3" in inst.ok("instance", "logs", "chatty"), "four log lines")
    lines = inst.ok("instance", "logs", "chatty").splitlines()
    assert lines[:4] == ["line-0", "line-1", "line-2", "line-3"]
    follow = inst.popen("instance", "logs", "-f", "chatty")
    assert follow.stdout is not None
    seen = b""
    while b"line-8" not in seen:  # -f keeps printing new lines as they come
        chunk = os.read(follow.stdout.fileno(), 4096)
        assert chunk, f"logs -f ended early (rc={follow.wait()}) after {seen!r}"
        seen += chunk
    pid = inst.listing()["chatty"]["pid"]
    inst.ok("instance", "stop", "-t", "1", "chatty")
    assert follow.wait(timeout=10) == 0  # and ends when the instance does
    assert_nothing_left(inst, ["chatty"], [pid], rootfs)


@pytest.mark.userns
def test_pause_resume_unprivileged_uses_sigstop(inst: Instances, rootfs: Path) -> None:
    inst.ok("instance", "start", "--contain", str(rootfs), "napper", "sh", "-c", LOOP)
    pid = inst.listing()["napper"]["pid"]
    proc = inst("instance", "pause", "napper")
    assert proc.returncode == 0, proc.stderr
    assert "not atomic" in proc.stderr.decode()  # the user is told what they got
    assert proc_state(pid) == "T"
    assert inst.listing()["napper"]["status"] == "paused"
    # really stopped: the kernel shows every process of the container stopped (a child
    # that ended just before its stop stays a zombie, its parent being stopped)
    wait_until(lambda: set(process_tree(pid).values()) <= {"T", "Z"}, "every process of the instance stopped")
    before = inst.ok("instance", "logs", "napper").count("line-")
    inst.ok("instance", "resume", "napper")
    wait_until(lambda: inst.ok("instance", "logs", "napper").count("line-") > before, "output after resume")
    assert inst.listing()["napper"]["status"] == "running"
    inst.ok("instance", "pause", "napper")
    inst.ok("instance", "stop", "-t", "1", "napper")  # stopping a paused instance works
    assert_nothing_left(inst, ["napper"], [pid], rootfs)


@pytest.mark.userns
def test_dead_supervisor_is_shown_and_cleaned_by_stop(inst: Instances, rootfs: Path) -> None:
    inst.ok("instance", "start", "--restart", "always", "--contain", str(rootfs), "orphan", "sleep", "1000")
    row = inst.listing()["orphan"]
    os.kill(row["supervisor_pid"], signal.SIGKILL)
    wait_until(lambda: not alive(row["supervisor_pid"]), "supervisor dead")
    assert inst.listing("--all")["orphan"]["status"] == "dead"
    assert alive(row["pid"])  # the workload is still there, unsupervised
    inst.ok("instance", "stop", "-t", "1", "orphan")
    assert_nothing_left(inst, ["orphan"], [row["pid"]], rootfs)


@pytest.mark.userns
def test_snapshot_needs_overlay_and_copies_the_upper_layer(inst: Instances, rootfs: Path, world_tmp: Path) -> None:
    inst.ok("instance", "start", "--contain", str(rootfs), "plain", "sleep", "1000")
    err = assert_one_line_error(inst("instance", "snapshot", "plain", str(world_tmp / "snap.tar")), 2)
    assert "--overlay" in err
    inst.ok("instance", "stop", "-t", "1", "plain")

    # A directory the user owns in the image: overlayfs cannot copy up a directory whose
    # owner or group is unmapped in the user namespace (EOVERFLOW), as for /root here.
    (rootfs / "data").mkdir()
    os.chown(rootfs / "data", inst.user.uid if inst.user else 0, inst.user.gid if inst.user else 0)
    upper = world_tmp / "upper"
    upper.mkdir(mode=0o777)
    os.chown(upper, inst.user.uid if inst.user else 0, -1)
    inst.ok("instance", "start", "--overlay", str(upper), "--contain", str(rootfs), "layered",
            "sh", "-c", "echo kept > /data/state.txt; exec sleep 1000")
    dest = world_tmp / "snap.tar"
    wait_until(lambda: any(upper.rglob("state.txt")), "file in the overlay")
    inst.ok("instance", "snapshot", "layered", str(dest))
    with tarfile.open(dest) as tar:
        member = next(m for m in tar.getmembers() if m.name == "data/state.txt")
        data = tar.extractfile(member)
        assert data is not None and data.read() == b"kept\n"
    pid = inst.listing()["layered"]["pid"]
    assert proc_state(pid) != "T"  # resumed after the copy
    inst.ok("instance", "stop", "-t", "1", "layered")
    assert_nothing_left(inst, ["layered"], [pid], rootfs)


# --- root: the cgroup freezer ------------------------------------------------------------------


@pytest.mark.root
@needs_cgroup("freezer")
def test_pause_resume_with_cgroup_freezer_as_root(root_inst: Instances, rootfs: Path) -> None:
    root_inst.ok("instance", "start", "--contain", str(rootfs), "frozen", "sh", "-c", LOOP)
    state = root_inst.state("frozen")
    if state["cgroup"] is None or ("freezer" not in state["cgroup"]["dirs"] and state["cgroup"]["version"] == 1):
        pytest.fail(f"root got no freezer cgroup: {state['cgroup']}", pytrace=False)
    freezer = Path(state["cgroup"]["dirs"].get("freezer") or state["cgroup"]["dirs"][""])
    pid = state["workload_pid"]
    assert str(pid) in (freezer / "cgroup.procs").read_text().split()
    proc = root_inst("instance", "pause", "frozen")
    assert proc.returncode == 0 and "not atomic" not in proc.stderr.decode()
    if state["cgroup"]["version"] == 1:
        assert (freezer / "freezer.state").read_text().strip() == "FROZEN"
        # every process of the group frozen, which the kernel shows as an uninterruptible sleep
        assert {proc_state(int(p)) for p in (freezer / "cgroup.procs").read_text().split()} == {"D"}
    else:
        assert "frozen 1" in (freezer / "cgroup.events").read_text().splitlines()
    root_inst.ok("instance", "resume", "frozen")
    if state["cgroup"]["version"] == 1:
        assert (freezer / "freezer.state").read_text().strip() == "THAWED"
    root_inst.ok("instance", "stop", "-t", "1", "frozen")
    assert not freezer.exists()  # the cgroup goes with the instance
    assert_nothing_left(root_inst, ["frozen"], [pid], rootfs)


# --- checkpoint: honest either way (whether CRIU works is asked as the user the CLI runs as) --------


@pytest.mark.userns
def test_checkpoint_without_a_working_criu_is_refused_and_harmless(
    inst: Instances, rootfs: Path, world_tmp: Path, user: User
) -> None:
    works, why = criu_check(user.name)
    if works:
        pytest.skip(f"CRIU works here for {user.name} ({why}): test_checkpoint_and_restore_with_criu covers this host")
    inst.ok("instance", "start", "--contain", str(rootfs), "saved", "sh", "-c", LOOP)
    pid = inst.listing()["saved"]["pid"]
    images = world_tmp / "ckpt"
    err = assert_one_line_error(inst("checkpoint", "saved", str(images)), 125)
    assert "CRIU" in err and "pause" in err and "snapshot" in err
    assert alive(pid)  # nothing was done to the instance
    assert inst("restore", "saved", str(images)).returncode == 125
    inst("instance", "stop", "-t", "1", "saved")
    assert_nothing_left(inst, ["saved"], [pid], rootfs)


@pytest.mark.userns
def test_checkpoint_and_restore_with_criu(inst: Instances, rootfs: Path, world_tmp: Path, user: User) -> None:
    works, why = criu_check(user.name)
    if not works:
        pytest.skip(f"needs a working CRIU: {why}")
    inst.ok("instance", "start", "--contain", str(rootfs), "saved", "sh", "-c", LOOP)
    pid = inst.listing()["saved"]["pid"]
    images = world_tmp / "ckpt"
    proc = inst("checkpoint", "saved", str(images))
    assert proc.returncode == 0, proc.stderr
    assert (images / "mesobox-instance.json").exists() and not alive(pid)
    restored = inst("restore", "saved", str(images))
    assert restored.returncode == 0, restored.stderr
    inst("instance", "stop", "-t", "1", "saved")
    assert_nothing_left(inst, ["saved"], [pid], rootfs)


CHECKPOINTING = (
    'd=$MESOBOX_CHECKPOINT_DIR; n=$(cat "$d/count" 2>/dev/null || echo 0); '
    'echo "run from=$n layer=$(cat /var/layer-mark 2>/dev/null || echo none)"; '
    'echo "written-by-run-from-$n" > /var/layer-mark; '
    'trap \'echo "$n" > "$d/count"; echo "checkpointed at $n"; exit 0\' USR2; '
    'while :; do n=$((n + 1)); sleep 0.2; done'
)


def test_a_checkpointing_instance_resumes_from_its_directory(
    inst: Instances, rootfs: Path, user: User, world_tmp: Path
) -> None:
    """``instance start --checkpoint-dir DIR --checkpoint-signal USR2``: a stop sends
    USR2, the workload saves its count in DIR (bound, $MESOBOX_CHECKPOINT_DIR) and
    exits; its writable layer (a file it wrote in the image's /var) is kept in DIR too,
    and the next start with the same DIR resumes from both.  The image is the user's
    own, as a pull of theirs makes it: a rootless writable layer cannot copy up a
    directory of an unmapped owner."""
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(rootfs)], check=True)
    ckpt = world_tmp / "ckpt"
    start = ["instance", "start", "--checkpoint-dir", str(ckpt), "--checkpoint-signal", "USR2", "-t", "20",
             str(rootfs)]
    inst.ok(*start, "first", "sh", "-c", CHECKPOINTING)
    wait_until(lambda: (ckpt / "layer").is_dir() and "run from=0" in inst.ok("instance", "logs", "first"),
               "the first run to start")
    inst.ok("instance", "stop", "first")
    saved = int((ckpt / "count").read_text())
    assert saved > 0
    inst.ok(*start, "second", "sh", "-c", CHECKPOINTING)
    wait_until(lambda: "run from=" in inst.ok("instance", "logs", "second"), "the second run to start")
    assert f"run from={saved} layer=written-by-run-from-0" in inst.ok("instance", "logs", "second")
    inst.ok("instance", "stop", "second")
    refused = inst("instance", "start", "--checkpoint-signal", "USR2", str(rootfs), "third", "true")
    assert_one_line_error(refused, 2)
