"""A shared squashfs mount lingers ``squashfs_linger`` seconds after its last user, so
the next run of the image finds it mounted and warm; then a forked reaper unmounts it.

Real mounts and processes, as the ordinary user with a runtime dir per test:
- within the window a second run reuses the same ``squashfuse_ll``; after it, the
  mount, the daemon and the reaper are all gone;
- ``squashfs_linger = 0`` unmounts at once (the behaviour before lingering);
- a SIGKILLed reaper (Slurm's step cgroup) leaves the mount to the next launch;
- ``mesobox slurm epilog`` reaps a lingering mount at once: the job is over;
- concurrent releases never leave two reapers or a mount nobody will reap.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_busybox_rootfs
from run_support import make_squashfs, mesobox_argv, one_error_line, squashfuse_state

LINGER_VAR = "MESOBOX_SQUASHFS_LINGER"


@pytest.fixture(scope="module")
def images(shared_tmp: Path) -> tuple[Path, Path]:
    rootfs = make_busybox_rootfs(shared_tmp / "linger-rootfs")
    return rootfs, make_squashfs(rootfs, shared_tmp / "linger-rootfs.sqfs")


@pytest.fixture
def runtime(world_tmp: Path) -> Iterator[Path]:
    """The user's runtime dir; a reaper or mount a failing test left behind goes after."""
    path = world_tmp / "rt"
    yield path
    for pid in _reapers(path):
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


def _reapers(runtime: Path) -> list[int]:
    """Live processes holding a ``<key>.reaper`` lock file of ``runtime`` open."""
    prefix = str(runtime / "mnt") + "/"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if any(link.startswith(prefix) and link.endswith(".reaper") for link in links) and _live(pid):
            found.append(int(pid))
    return found


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


def _wait_gone(user: User, runtime: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while squashfuse_state(user.uid, str(runtime)) != (0, 0) or _reapers(runtime):
        assert time.monotonic() < deadline, (squashfuse_state(user.uid, str(runtime)), _reapers(runtime))
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.userns
def test_a_lingering_mount_is_reused_then_reaped(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    _run(mesobox, user, images[1], runtime, "3")
    first_end = time.monotonic()
    assert squashfuse_state(user.uid, str(runtime)) == (1, 1)  # still mounted, nobody uses it
    daemon = _squashfuse_pids(user.uid, runtime)
    assert len(daemon) == 1 and len(_reapers(runtime)) == 1
    assert _names(runtime, ".refs") == [] and len(_names(runtime, ".idle")) == 1
    time.sleep(1)
    _run(mesobox, user, images[1], runtime, "3")  # within the window: no new mount
    assert _squashfuse_pids(user.uid, runtime) == daemon
    assert len(_reapers(runtime)) == 1
    # The second release restarted the clock: later than 3 s after the first run, but
    # earlier than 3 s after the second, the mount is still there.
    time.sleep(max(0.0, first_end + 3.3 - time.monotonic()))
    assert _squashfuse_pids(user.uid, runtime) == daemon
    _wait_gone(user, runtime, timeout=3 + 10)
    assert _names(runtime, ".idle") == [] and _names(runtime, ".refs") == []
    assert not [p for p in (runtime / "mnt").iterdir() if p.is_dir()]


@pytest.mark.userns
def test_b_linger_zero_unmounts_at_once(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    _run(mesobox, user, images[1], runtime, "0")
    assert squashfuse_state(user.uid, str(runtime)) == (0, 0)
    assert _reapers(runtime) == [] and _names(runtime, ".idle") == []


@pytest.mark.slow
@pytest.mark.userns
def test_c_a_killed_reapers_mount_is_reaped_by_the_next_launch(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    _run(mesobox, user, images[1], runtime, "1")
    reapers = _reapers(runtime)
    assert len(reapers) == 1
    os.kill(reapers[0], signal.SIGKILL)  # what Slurm's step cgroup does at the step's end
    time.sleep(1.5)
    assert squashfuse_state(user.uid, str(runtime)) == (1, 1)  # nobody left to unmount it
    # The next launch, of another image (a directory), reaps it: its stamp is too old.
    _run(mesobox, user, images[0], runtime, "1")
    assert squashfuse_state(user.uid, str(runtime)) == (0, 0)
    assert _names(runtime, ".idle") == [] and _reapers(runtime) == []


@pytest.mark.userns
def test_c_a_launch_leaves_a_young_lingering_mount_and_deletes_leftover_files(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    _run(mesobox, user, images[1], runtime, "30")
    mnt = runtime / "mnt"
    # Leftovers of launchers long gone: refs of a dead pid and a stamp, with no mount point.
    for name, text in (("0-0-0-0.refs", "999999999\n"), ("1-1-1-1.idle", "")):
        user.run(["sh", "-c", f"printf '{text}' > {mnt / name}"], check=True)
    _run(mesobox, user, images[0], runtime, "30")  # a directory image
    assert squashfuse_state(user.uid, str(runtime)) == (1, 1)  # still lingering
    assert len(_names(runtime, ".idle")) == 1 and _names(runtime, ".refs") == []


@pytest.mark.root
@pytest.mark.userns
def test_d_the_epilog_reaps_a_lingering_mount_at_once(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    _run(mesobox, user, images[1], runtime, "60")
    assert squashfuse_state(user.uid, str(runtime)) == (1, 1)
    # As Slurm runs it: root, on the node, after the job (here: this test's runtime dir).
    result = mesobox("slurm", "epilog", env={"MESOBOX_RUNTIME_DIR": str(runtime), "SLURM_JOB_ID": "78"})
    assert result.returncode == 0, result.stderr.decode()
    assert "job 78: " in result.stderr.decode() and "reaped (no container uses it)" in result.stderr.decode()
    assert squashfuse_state(user.uid, str(runtime)) == (0, 0)
    assert _names(runtime, ".idle") == []


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
def test_concurrent_releases_leave_one_reaper_and_nothing_after(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], runtime: Path
) -> None:
    """Rounds of launches ending at nearly the same moment, each round inside the
    previous one's window: one mount throughout, at most one reaper, none after."""
    env = {"MESOBOX_RUNTIME_DIR": str(runtime), LINGER_VAR: "1"}
    argv, full = mesobox_argv(mesobox, user, ["exec", str(images[1]), "true"], env=env)
    for _ in range(3):
        procs = [subprocess.Popen(argv, env=full, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(6)]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errors
        assert squashfuse_state(user.uid, str(runtime)) == (1, 1)
        assert len(_reapers(runtime)) <= 1
    _wait_gone(user, runtime, timeout=1 + 10)
    assert _names(runtime, ".idle") == [] and _names(runtime, ".refs") == []
