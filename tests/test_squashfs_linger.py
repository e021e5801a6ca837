"""A shared squashfs mount lingers ``squashfs_linger`` seconds after its last user, so
the next run of the image finds it mounted and warm; a forked watcher, which drops the
refs of dead launchers, then unmounts it.  With a linger the launcher needs no
supervisor: it execs into the workload, whose pid and start time are its ref.

Real mounts and processes, as the ordinary user with a runtime dir per test.  The linger
clock is the idle stamp's mtime, which the watcher reads: tests age the stamp instead of
waiting for it, and wait on conditions (with a generous ceiling), never on the clock.
- within the window a second run reuses the same ``squashfuse_ll`` and restarts the
  clock; the watcher keeps the mount while the stamp is young, and once it is older than
  the linger the mount, the daemon and the watcher are all gone;
- ``squashfs_linger = 0`` unmounts at once (supervised, as before lingering);
- a SIGKILLed watcher (Slurm's step cgroup) leaves the mount to the next launch;
- ``mesobox slurm epilog`` reaps a lingering mount at once: the job is over, and its
  watcher leaves;
- concurrent launches never leave two watchers or a mount nobody will reap;
- with the default linger mesobox *is* the workload (same pid, signals meet its trap);
  a SIGKILLed container's ref is dropped by the watcher, and a ref whose pid now
  belongs to another process (another start time) counts as dead.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_busybox_rootfs, release_runtime_dir, wait_until
from run_support import make_squashfs, mesobox_argv, one_error_line, squashfs_watchers, squashfuse_state

LINGER_VAR = "MESOBOX_SQUASHFS_LINGER"


@pytest.fixture(scope="module")
def images(shared_tmp: Path) -> tuple[Path, Path]:
    rootfs = make_busybox_rootfs(shared_tmp / "linger-rootfs")
    return rootfs, make_squashfs(rootfs, shared_tmp / "linger-rootfs.sqfs")


@pytest.fixture
def runtime(world_tmp: Path) -> Iterator[Path]:
    """The user's runtime dir; a watcher or mount a failing test left behind goes after."""
    path = world_tmp / "rt"
    yield path
    for pid in squashfs_watchers(path):
        os.kill(pid, signal.SIGKILL)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if str(path) + "/" in line.split(" - ")[0]]
    for point in points:
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _live(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _squashfuse_pids(uid: int, runtime: Path) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            owner = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        if "squashfuse" in cmdline.split("\0")[0] and owner == uid and str(runtime) in cmdline and _live(pid):
            found.append(int(pid))
    return found


def _names(runtime: Path, suffix: str) -> list[str]:
    mnt = runtime / "mnt"
    return sorted(p.name for p in mnt.glob("*" + suffix)) if mnt.exists() else []


def _run(mesobox: Mesobox, user: User, image: Path, runtime: Path, linger: str) -> None:
    env = {"MESOBOX_RUNTIME_DIR": str(runtime), LINGER_VAR: linger}
    proc = mesobox("exec", str(image), "true", as_user=user, env=env)
    assert proc.returncode == 0, proc.stderr.decode()


def _wait_gone(user: User, runtime: Path) -> None:
    wait_until(lambda: squashfuse_state(user.uid, str(runtime)) == (0, 0) and not squashfs_watchers(runtime),
               "the mount, its squashfuse and its watcher go")


def _stamp(runtime: Path) -> Path:
    [name] = _names(runtime, ".idle")
    return runtime / "mnt" / name


def _age_the_stamp(runtime: Path, seconds: float) -> None:
    """Make the idle stamp ``seconds`` old: the linger clock, as the watcher and a
    launch read it (squashmount: the stamp's mtime is when the mount went idle)."""
    past = time.time() - seconds
    os.utime(_stamp(runtime), (past, past))


def _sleeps(pid: int) -> int:
    """How often ``pid`` has gone to sleep of its own accord (voluntary context switches);
    a huge number once it is gone, so that nobody waits on a dead watcher."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    except OSError:
        return 1 << 62


def _looks_again(watcher: int) -> None:
    """Wait until ``watcher`` has looked at its key once more, all of it after this call:
    it sleeps once per look (squashmount.WATCH_S), so two more sleeps hold a whole look."""
    start = _sleeps(watcher)
    wait_until(lambda: _sleeps(watcher) >= start + 2, "the watcher looks at the mount again")


def _idle(runtime: Path) -> bool:
    """The watcher has seen the last user go: no refs, an idle stamp."""
    return _names(runtime, ".refs") == [] and len(_names(runtime, ".idle")) == 1


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


@pytest.mark.slow
@pytest.mark.userns
def test_a_lingering_mount_is_reused_then_reaped(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    _run(mesobox, user, images[1], runtime, "600")  # a window no slow machine misses
    assert squashfuse_state(user.uid, str(runtime)) == (1, 1)  # still mounted, nobody uses it
    daemon = _squashfuse_pids(user.uid, runtime)
    watchers = squashfs_watchers(runtime)
    assert len(daemon) == 1 and len(watchers) == 1
    wait_until(lambda: _idle(runtime), "the watcher drops the exited launcher's ref")
    first = _stamp(runtime).stat().st_mtime_ns
    _run(mesobox, user, images[1], runtime, "600")  # within the window: no new mount
    assert _squashfuse_pids(user.uid, runtime) == daemon
    assert squashfs_watchers(runtime) == watchers  # the same watcher serves the second run
    wait_until(lambda: _idle(runtime), "the watcher drops the second launcher's ref")
    assert _stamp(runtime).stat().st_mtime_ns > first  # the second run restarted the clock
    _looks_again(watchers[0])
    assert _squashfuse_pids(user.uid, runtime) == daemon  # a stamp younger than the linger: kept
    _age_the_stamp(runtime, 601)  # older than the linger: the watcher unmounts
    _wait_gone(user, runtime)
    assert _names(runtime, ".idle") == [] and _names(runtime, ".refs") == []
    assert not [p for p in (runtime / "mnt").iterdir() if p.is_dir()]


@pytest.mark.userns
def test_b_linger_zero_unmounts_at_once(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    _run(mesobox, user, images[1], runtime, "0")
    assert squashfuse_state(user.uid, str(runtime)) == (0, 0)
    assert squashfs_watchers(runtime) == [] and _names(runtime, ".idle") == [] and _names(runtime, ".refs") == []


@pytest.mark.slow
@pytest.mark.userns
def test_c_a_killed_watchers_mount_is_reaped_by_the_next_launch(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    _run(mesobox, user, images[1], runtime, "600")
    watchers = squashfs_watchers(runtime)
    assert len(watchers) == 1
    wait_until(lambda: _idle(runtime), "the watcher stamps the mount idle")
    os.kill(watchers[0], signal.SIGKILL)  # what Slurm's step cgroup does at the step's end
    wait_until(lambda: not _live(str(watchers[0])), "the watcher is dead")
    assert squashfuse_state(user.uid, str(runtime)) == (1, 1)  # nobody left to unmount it
    _age_the_stamp(runtime, 601)  # it lingered out with nobody to notice
    # The next launch, of another image (a directory), reaps it: its stamp is too old.
    _run(mesobox, user, images[0], runtime, "600")
    assert squashfuse_state(user.uid, str(runtime)) == (0, 0)
    assert _names(runtime, ".idle") == [] and squashfs_watchers(runtime) == []


@pytest.mark.userns
def test_c_a_launch_leaves_a_young_lingering_mount_and_deletes_leftover_files(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    _run(mesobox, user, images[1], runtime, "30")
    mnt = runtime / "mnt"
    # Leftovers of launchers long gone: refs of dead pids (an older mesobox wrote bare
    # pids) and a stamp, with no mount point.
    for name, text in (("0-0-0-0.refs", "999999999:1\\n999999998\\n"), ("1-1-1-1.idle", "")):
        user.run(["sh", "-c", f"printf '{text}' > {mnt / name}"], check=True)
    _run(mesobox, user, images[0], runtime, "30")  # a directory image
    assert squashfuse_state(user.uid, str(runtime)) == (1, 1)  # still lingering
    assert not (mnt / "0-0-0-0.refs").exists() and not (mnt / "1-1-1-1.idle").exists()
    wait_until(lambda: _idle(runtime), "the watcher stamps the mount idle")
    assert len(squashfs_watchers(runtime)) == 1


@pytest.mark.userns
def test_c_a_launch_leaves_a_watched_mount_to_its_watcher(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    """A stamp older than the linger alone does not let a launch reap the mount while
    the key's watcher lives (here: stopped): the watcher decides, once it runs again."""
    _run(mesobox, user, images[1], runtime, "30")
    wait_until(lambda: _idle(runtime), "the watcher stamps the mount idle")
    [watcher] = squashfs_watchers(runtime)
    os.kill(watcher, signal.SIGSTOP)
    try:
        _age_the_stamp(runtime, 3600)  # idle for an hour
        _run(mesobox, user, images[0], runtime, "30")  # a directory image: reap_stale runs
        assert squashfuse_state(user.uid, str(runtime)) == (1, 1)
    finally:
        os.kill(watcher, signal.SIGCONT)
    _wait_gone(user, runtime)  # resumed, it finds the stamp old and unmounts


@pytest.mark.root
@pytest.mark.userns
def test_d_the_epilog_reaps_a_lingering_mount_at_once(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    _run(mesobox, user, images[1], runtime, "60")
    assert squashfuse_state(user.uid, str(runtime)) == (1, 1)
    # Run by hand, by the user, on their own runtime dir (as root under Slurm, the epilog
    # drops to the job user for the same work: tests/test_slurm_hooks.py).
    result = mesobox("slurm", "epilog", env={"MESOBOX_RUNTIME_DIR": str(runtime), "SLURM_JOB_ID": "78"},
                     as_user=user)
    assert result.returncode == 0, result.stderr.decode()
    assert "job 78: " in result.stderr.decode() and "reaped (no container uses it)" in result.stderr.decode()
    assert squashfuse_state(user.uid, str(runtime)) == (0, 0)
    assert _names(runtime, ".idle") == []
    # The watcher finds the mount gone and leaves, leaving nothing behind.
    wait_until(lambda: squashfs_watchers(runtime) == [], "the watcher exits")
    assert _names(runtime, ".idle") == [] and _names(runtime, ".refs") == []
    assert not [p for p in (runtime / "mnt").iterdir() if p.is_dir()]


@pytest.mark.userns
@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_e_a_bad_linger_is_one_error_line(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path, value: str
) -> None:
    proc = mesobox("exec", str(images[1]), "true", as_user=user,
                   env={"MESOBOX_RUNTIME_DIR": str(runtime), LINGER_VAR: value})
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert LINGER_VAR in line and "squashfs_linger" in line
    assert squashfuse_state(user.uid, str(runtime)) == (0, 0)


def test_linger_config_values(tmp_path: Path) -> None:
    from mesobox.config import load_config
    from mesobox.errors import ConfigError

    base = {"MESOBOX_SITE_CONFIG": "/nonexistent", "MESOBOX_CONFIG": str(tmp_path / "none.toml")}
    assert load_config(base).squashfs_linger == 10.0
    assert load_config({**base, LINGER_VAR: "0"}).squashfs_linger == 0.0
    assert load_config({**base, LINGER_VAR: " 2.5 "}).squashfs_linger == 2.5
    (tmp_path / "user.toml").write_text("squashfs_linger = 4\n")
    assert load_config({**base, "MESOBOX_CONFIG": str(tmp_path / "user.toml")}).squashfs_linger == 4.0
    for bad in ("abc", "-0.5", "inf", "nan", ""):
        with pytest.raises(ConfigError):
            load_config({**base, LINGER_VAR: bad})
    (tmp_path / "bad.toml").write_text("squashfs_linger = true\n")
    with pytest.raises(ConfigError):
        load_config({**base, "MESOBOX_CONFIG": str(tmp_path / "bad.toml")})


@pytest.mark.slow
@pytest.mark.userns
def test_concurrent_launches_leave_one_watcher_and_nothing_after(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    """Rounds of launches starting and ending at nearly the same moment, each round
    inside the previous one's window: one mount and one watcher throughout, none after."""
    env = {"MESOBOX_RUNTIME_DIR": str(runtime), LINGER_VAR: "1"}
    argv, full = mesobox_argv(mesobox, user, ["exec", str(images[1]), "true"], env=env)
    for _ in range(3):
        procs = [subprocess.Popen(argv, env=full, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(6)]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errors
        assert squashfuse_state(user.uid, str(runtime)) == (1, 1)
        assert len(squashfs_watchers(runtime)) == 1
    _wait_gone(user, runtime)  # a linger (1 s) after the last round
    assert _names(runtime, ".idle") == [] and _names(runtime, ".refs") == []


@pytest.mark.userns
def test_f_with_the_default_linger_mesobox_is_the_workload(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    """No supervisor, as for a directory image: the workload runs as mesobox's own pid
    (setpriv execs, so the Popen pid is mesobox's), the ref is that pid and its start
    time, and a SIGTERM sent to it meets the workload's trap with nobody forwarding."""
    script = "trap 'echo got-term; exit 7' TERM; echo $$; i=0; while [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done"
    argv, env = mesobox_argv(mesobox, user, ["exec", str(images[1]), "sh", "-c", script],
                             env={"MESOBOX_RUNTIME_DIR": str(runtime)})  # no linger set: the default
    proc = subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the trap is set before the echo
        assert line == f"{proc.pid}\n".encode(), (line, proc.pid)
        assert squashfuse_state(user.uid, str(runtime)) == (1, 1) and len(squashfs_watchers(runtime)) == 1
        refs = [(runtime / "mnt" / name).read_text() for name in _names(runtime, ".refs")]
        assert refs == [f"{proc.pid}:{_start_time(proc.pid)}\n"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out) == (7, b"got-term\n"), err.decode()[-500:]
    wait_until(lambda: _idle(runtime), "the watcher drops the ref of the ended workload")
    assert squashfuse_state(user.uid, str(runtime)) == (1, 1)  # lingering for the next run


@pytest.mark.slow
@pytest.mark.userns
def test_g_a_killed_containers_mount_goes_a_linger_later(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    """SIGKILL the workload (which is the launcher: nothing runs a release): the
    watcher notices, and the mount goes once it has lingered, not before."""
    argv, env = mesobox_argv(mesobox, user, ["exec", str(images[1]), "sh", "-c", "echo $$; exec sleep 60"],
                             env={"MESOBOX_RUNTIME_DIR": str(runtime), LINGER_VAR: "600"})
    proc = subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == f"{proc.pid}\n".encode()
    assert _names(runtime, ".refs") and not _names(runtime, ".idle")
    proc.kill()
    proc.communicate(timeout=10)
    wait_until(lambda: _idle(runtime), "the watcher notices the killed container")
    assert squashfuse_state(user.uid, str(runtime)) == (1, 1)  # lingering, not dropped
    [watcher] = squashfs_watchers(runtime)
    _looks_again(watcher)
    assert squashfuse_state(user.uid, str(runtime)) == (1, 1)  # not before the linger is over
    _age_the_stamp(runtime, 601)
    _wait_gone(user, runtime)
    assert _names(runtime, ".idle") == [] and _names(runtime, ".refs") == []


@pytest.mark.slow
@pytest.mark.userns
def test_h_a_ref_with_a_recycled_pid_counts_as_dead(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    """A ref naming a live process of the user keeps the mount; the same pid with
    another start time (the pid was recycled after its launcher died) does not."""
    other = subprocess.Popen(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
                              "sleep", "60"])
    try:
        _run(mesobox, user, images[1], runtime, "600")
        key = _names(runtime, ".lock")[0][: -len(".lock")]
        start = _start_time(other.pid)
        _set_refs(runtime, key, user, f"{other.pid}:{start}\n")  # as an acquire by `other` would
        [watcher] = squashfs_watchers(runtime)
        _looks_again(watcher)  # it has seen the live ref: the mount stays, its user lives
        assert squashfuse_state(user.uid, str(runtime)) == (1, 1)
        assert _names(runtime, ".refs") == [key + ".refs"] and _names(runtime, ".idle") == []
        _set_refs(runtime, key, user, f"{other.pid}:{int(start) + 1}\n")  # same pid, another process
        wait_until(lambda: _idle(runtime), "the watcher drops the recycled pid's ref")
        _age_the_stamp(runtime, 601)
        _wait_gone(user, runtime)
        assert other.poll() is None  # the mount went while that pid still ran
    finally:
        other.kill()
        other.wait()


def _set_refs(runtime: Path, key: str, user: User, text: str) -> None:
    """Write ``<key>.refs`` under the key lock, and remove the idle stamp, as acquire does."""
    mnt = runtime / "mnt"
    fd = os.open(mnt / (key + ".lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        (mnt / (key + ".refs.tmp")).write_text(text)
        os.chown(mnt / (key + ".refs.tmp"), user.uid, user.gid)
        os.replace(mnt / (key + ".refs.tmp"), mnt / (key + ".refs"))
        (mnt / (key + ".idle")).unlink(missing_ok=True)
    finally:
        os.close(fd)


def test_alive_compares_pid_and_start_time() -> None:
    from mesobox.launch.squashmount import _alive

    me, start = os.getpid(), _start_time(os.getpid())
    assert _alive(f"{me}:{start}")
    assert not _alive(f"{me}:{int(start) + 1}")  # a recycled pid: another process
    assert _alive(str(me))  # a bare pid (an older mesobox's ref): alive while it runs
    zombie = subprocess.Popen(["true"])
    try:
        wait_until(lambda: not _live(str(zombie.pid)), "the child exits")
        assert not _alive(f"{zombie.pid}:{_start_time(zombie.pid)}")  # not reaped yet: a zombie
    finally:
        zombie.wait()
    for ref in ("999999999:1", "999999999", "", "abc", "12:x", f"{me}:", f":{start}"):
        assert not _alive(ref), ref


def test_root_sees_a_squashfs_rebuilt_in_place_while_the_old_mount_lingers(
    mesobox: Mesobox, world_tmp: Path
) -> None:
    """Root mounts with the kernel on a loop device.  `mount -o loop` would reuse the
    loop device still attached to the same file (same inode) for the lingering mount of
    the old version, and show its old contents; each mount gets its own device."""
    rootfs = make_busybox_rootfs(world_tmp / "inplace-rootfs")
    image = world_tmp / "inplace.sqfs"
    env = {LINGER_VAR: "600", "MESOBOX_RUNTIME_DIR": str(world_tmp / "rt-root")}
    seen = []
    try:
        for version in ("one", "two"):
            (rootfs / "version").write_text(version + "\n")
            subprocess.run(["mksquashfs", str(rootfs), str(image), "-quiet", "-noappend", "-all-root"],
                           check=True, capture_output=True)
            result = mesobox("exec", str(image), "cat", "/version", env=env)
            assert result.returncode == 0, result.stderr.decode()
            seen.append((result.stdout.decode().strip(), image.stat().st_ino))
        assert [text for text, _ in seen] == ["one", "two"]
        assert seen[0][1] == seen[1][1]  # rebuilt in place: the same inode, as the bug needs
    finally:
        release_runtime_dir(world_tmp / "rt-root")
