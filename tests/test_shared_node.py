"""A shared node is hostile: what another ordinary user can do to a mesobox user through
the names mesobox uses in /tmp, and what a user's own mistakes cost (docs/security.md).

Each test plays it as it would be played: ``attacker`` is a second ordinary user who
plants directories and symlinks where ``victim`` will look (``/tmp/mesobox-UID`` is
predictable); the victim runs mesobox as usual.  Whatever the plant, the victim never
uses it: one error line, nothing created, changed or deleted through it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Mesobox, Registry, User, make_busybox_rootfs, make_oci_image, open_busybox_rootfs
from run_support import make_squashfs, mesobox_argv, one_error_line

pytestmark = [pytest.mark.userns, pytest.mark.default_runtime_dir]


@pytest.fixture(scope="module")
def images(shared_tmp: Path) -> tuple[Path, Path]:
    rootfs = open_busybox_rootfs(shared_tmp / "shared-node-rootfs")
    (rootfs / "marker").write_text("the real image\n")
    return rootfs, make_squashfs(rootfs, shared_tmp / "shared-node.sqfs")


def fresh_runtime_dir(who: User) -> Path:
    """``/tmp/mesobox-UID`` of ``who``, gone: unmounted and removed (as root)."""
    path = Path(f"/tmp/mesobox-{who.uid}")
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if line.split()[4].startswith(f"{path}/")]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
    return path


def tree(path: Path) -> list[str]:
    """Every name below ``path`` (as root), for 'nothing was created' checks."""
    return sorted(str(Path(d, n).relative_to(path)) for d, dirs, files in os.walk(path) for n in dirs + files)


def no_fuse_mount_below(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return not any(line.split()[4].startswith(f"{path}/") for line in f)


# --- the runtime directory -------------------------------------------------------------

PLANTS = ["dir-0777", "dir-0700", "symlink-to-attackers-dir", "symlink-to-victims-home"]


@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("fmt", ["dir", "squashfs"])
def test_a_runtime_dir_planted_by_another_user_is_never_used(
    mesobox: Mesobox, victim: User, attacker: User, images: tuple[Path, Path], world_tmp: Path, plant: str,
    fmt: str,
) -> None:
    runtime = fresh_runtime_dir(victim)
    lair = world_tmp / "lair"
    attacker.run(["mkdir", "-m", "0777", str(lair)], check=True)
    home_before = tree(victim.home)
    if plant.startswith("dir"):
        attacker.run(["mkdir", "-m", plant[-4:], str(runtime)], check=True)
        attacker.run(["chmod", plant[-4:], str(runtime)], check=True)  # past the umask
        watched = runtime
    else:
        target = lair if plant == "symlink-to-attackers-dir" else victim.home
        attacker.run(["ln", "-s", str(target), str(runtime)], check=True)
        watched = target
    before = tree(watched)
    image = images[0] if fmt == "dir" else images[1]
    proc = mesobox("exec", str(image), "cat", "/marker", as_user=victim, env={"MESOBOX_SQUASHFS_LINGER": "0"})
    assert proc.returncode == 125, proc.stderr
    line = one_error_line(proc.stderr)
    assert f"runtime directory {runtime}" in line
    assert ("belongs to uid" in line) if plant.startswith("dir") else ("symlink" in line)
    assert tree(watched) == before  # nothing made in the plant …
    assert tree(victim.home) == home_before  # … nor through it
    assert no_fuse_mount_below(runtime) and no_fuse_mount_below(lair)


def test_instance_stop_never_deletes_through_a_planted_instances_dir(
    mesobox: Mesobox, victim: User, attacker: User, world_tmp: Path
) -> None:
    """The reported case: ``instances -> $HOME`` made ``instance stop web`` delete ~/web."""
    runtime = fresh_runtime_dir(victim)
    attacker.run(["mkdir", "-m", "0777", str(runtime)], check=True)
    attacker.run(["chmod", "0777", str(runtime)], check=True)
    attacker.run(["ln", "-s", str(victim.home), str(runtime / "instances")], check=True)
    victim.run(["mkdir", "-p", str(victim.home / "web")], check=True)
    try:
        for args in (["instance", "stop", "web"], ["instance", "list"]):
            proc = mesobox(*args, as_user=victim)
            assert proc.returncode == 125, proc.stderr
            assert "belongs to uid" in one_error_line(proc.stderr)
        assert (victim.home / "web").is_dir()
    finally:
        subprocess.run(["rm", "-rf", str(victim.home / "web")], check=False)


@pytest.mark.root
def test_the_prolog_gives_a_squatted_runtime_dir_back_to_the_job_user(
    mesobox: Mesobox, victim: User, attacker: User, images: tuple[Path, Path], world_tmp: Path
) -> None:
    runtime = fresh_runtime_dir(victim)
    attacker.run(["mkdir", "-m", "0777", str(runtime)], check=True)
    attacker.run(["touch", str(runtime / "planted")], check=True)
    env = {"SLURM_JOB_ID": "41", "SLURM_JOB_UID": str(victim.uid), "SLURM_JOB_GID": str(victim.gid)}
    proc = mesobox("slurm", "prolog", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"moved aside {runtime}" in proc.stderr.decode() and f"made {runtime}" in proc.stderr.decode()
    st = runtime.lstat()
    assert (st.st_uid, st.st_mode & 0o7777) == (victim.uid, 0o700) and runtime.is_dir()
    assert tree(runtime) == []
    ran = mesobox("exec", str(images[1]), "cat", "/marker", as_user=victim, env={"MESOBOX_SQUASHFS_LINGER": "0"})
    assert ran.returncode == 0 and ran.stdout == b"the real image\n", ran.stderr
    # A symlink planted there is moved aside too, never followed: its target is untouched.
    fresh_runtime_dir(victim)
    attacker.run(["ln", "-s", str(world_tmp), str(runtime)], check=True)
    before = tree(world_tmp)
    proc = mesobox("slurm", "prolog", env=env)
    assert proc.returncode == 0 and "moved aside" in proc.stderr.decode()
    assert tree(world_tmp) == before and runtime.is_dir() and not runtime.is_symlink()
    # And a right one is left alone: nothing to say.
    again = mesobox("slurm", "prolog", env=env)
    assert again.returncode == 0 and again.stderr == b""
    for aside in Path("/tmp").glob(f".mesobox-{victim.uid}.foreign.*"):
        subprocess.run(["rm", "-rf", str(aside)], check=False)


@pytest.mark.parametrize("mode", [0o755, 0o750])
def test_the_users_own_readable_runtime_dir_is_made_private(
    mesobox: Mesobox, victim: User, images: tuple[Path, Path], mode: int
) -> None:
    """Left 0755 by an older mesobox: the user's own, nobody else could write in it."""
    runtime = fresh_runtime_dir(victim)
    victim.run(["mkdir", str(runtime)], check=True)
    victim.run(["chmod", f"{mode:o}", str(runtime)], check=True)
    proc = mesobox("exec", str(images[0]), "true", as_user=victim)
    assert proc.returncode == 0, proc.stderr
    assert runtime.stat().st_mode & 0o777 == 0o700
    for dirpath, dirnames, _files in os.walk(runtime):
        for name in dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            assert st.st_uid == victim.uid and not st.st_mode & 0o077, (dirpath, name)


def test_a_runtime_dir_others_can_write_is_refused(mesobox: Mesobox, victim: User, images: tuple[Path, Path],
                                                 world_tmp: Path) -> None:
    own_but_open = world_tmp / "open-rt"
    victim.run(["mkdir", str(own_but_open)], check=True)
    victim.run(["chmod", "0777", str(own_but_open)], check=True)
    proc = mesobox("exec", str(images[0]), "true", as_user=victim, env={"MESOBOX_RUNTIME_DIR": str(own_but_open)})
    assert proc.returncode == 125
    assert "writable by other users" in one_error_line(proc.stderr)
    # Private itself, but in a directory others may write that is not sticky: they can
    # rename it away and put theirs in its place.
    shared = world_tmp / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    proc = mesobox("exec", str(images[0]), "true", as_user=victim, env={"MESOBOX_RUNTIME_DIR": str(shared / "rt")})
    assert proc.returncode == 125
    assert "other users may write" in one_error_line(proc.stderr)
    # world_tmp is sticky (1777), like /tmp: fine.
    ok = mesobox("exec", str(images[0]), "true", as_user=victim, env={"MESOBOX_RUNTIME_DIR": str(world_tmp / "rt")})
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("value", ["relative/rt", "/proc/mesobox-rt", "FILE"])
def test_a_bad_runtime_dir_setting_is_one_line(
    mesobox: Mesobox, victim: User, images: tuple[Path, Path], world_tmp: Path, value: str
) -> None:
    if value == "FILE":
        value = str(world_tmp / "a-file")
        Path(value).write_text("")
    proc = mesobox("exec", str(images[1]), "true", as_user=victim, cwd=world_tmp,
                   env={"MESOBOX_RUNTIME_DIR": value, "MESOBOX_SQUASHFS_LINGER": "0"})
    assert proc.returncode in (2, 125), proc.stderr
    line = one_error_line(proc.stderr)
    assert "runtime" in line and "Errno" not in line
    assert no_fuse_mount_below(world_tmp)


def test_nobody_else_can_reach_into_a_runtime_dir(
    mesobox: Mesobox, victim: User, attacker: User, images: tuple[Path, Path]
) -> None:
    """The squashfuse mount is swapped 17 ms after it is made, if anyone else can write
    there: nobody can, at any depth."""
    runtime = fresh_runtime_dir(victim)
    proc = mesobox("exec", str(images[1]), "true", as_user=victim, env={"MESOBOX_SQUASHFS_LINGER": "30"})
    assert proc.returncode == 0, proc.stderr
    assert not no_fuse_mount_below(runtime)  # lingering
    try:
        for path in (runtime, runtime / "mnt"):
            for argv in (["ls", str(path)], ["touch", str(path / "x")], ["mv", str(path), str(path) + ".gone"]):
                assert attacker.run(argv).returncode != 0, argv
    finally:
        victim.run(["sh", "-c", f"for m in {runtime}/mnt/*/; do fusermount -u -z $m; done"])


@pytest.mark.root
def test_roots_runtime_dir_is_checked_too(
    mesobox: Mesobox, attacker: User, images: tuple[Path, Path], world_tmp: Path
) -> None:
    """A runtime dir made by a user is never root's: no root file, mount or loop mount there."""
    planted = world_tmp / "root-rt"
    attacker.run(["mkdir", "-m", "0700", str(planted)], check=True)
    link = world_tmp / "root-rt-link"
    attacker.run(["ln", "-s", "/etc", str(link)], check=True)
    for path in (planted, link):
        proc = mesobox("exec", str(images[1]), "true", env={"MESOBOX_RUNTIME_DIR": str(path)})
        assert proc.returncode == 125, proc.stderr
        assert "runtime directory" in one_error_line(proc.stderr)
    assert tree(planted) == [] and no_fuse_mount_below(planted)
    assert not os.path.exists("/etc/mnt") and not os.path.exists("/etc/ws")


# --- what the current directory may say ---------------------------------------------------


def test_an_unreachable_working_directory_is_a_warning(
    mesobox: Mesobox, victim: User, images: tuple[Path, Path]
) -> None:
    """A checkout under /root, a command started there with sudo/runuser: start in $HOME."""
    proc = mesobox("exec", str(images[0]), "pwd", as_user=victim, cwd="/root")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().strip() == str(victim.home)
    assert "cannot reach the working directory /root" in proc.stderr.decode()


def test_a_directory_planted_in_a_shared_directory_never_replaces_an_image(
    mesobox: Mesobox, victim: User, attacker: User, images: tuple[Path, Path], world_tmp: Path
) -> None:
    """Bare names are image references, never paths: a directory named like one, planted in
    a shared project directory, is not run (unless the user writes ./NAME)."""
    project = world_tmp / "project"
    project.mkdir()
    os.chmod(project, 0o1777)
    for name in ("ubuntu:24.04", "docker:/127.0.0.1:9/ubuntu:24.04", "tools", "oci:layout:v1"):
        fake = project / name
        attacker.run(["mkdir", "-p", str(fake / "bin")], check=True)
        attacker.run(["cp", "-a", str(images[0] / "bin/busybox"), str(fake / "bin/sh")], check=True)
        attacker.run(["sh", "-c", f"echo pwned > '{fake}/marker'"], check=True)
    # (port 9, discard: nothing listens there, so the pull fails at once)
    for name in ("ubuntu:24.04", "docker://127.0.0.1:9/ubuntu:24.04", "tools", "oci:layout:v1"):
        proc = mesobox("exec", name, "cat", "/marker", as_user=victim, cwd=project)
        assert proc.returncode != 0 and b"pwned" not in proc.stdout, (name, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr.decode()
    proc = mesobox("exec", "tools", "true", as_user=victim, cwd=project)
    assert proc.returncode == 4
    assert "not in the store" in one_error_line(proc.stderr) and "./tools" in proc.stderr.decode()
    # Written as a path, the user's own choice: it runs.
    proc = mesobox("exec", "./tools", "sh", "-c", "read x < /marker; echo $x", as_user=victim, cwd=project)
    assert proc.returncode == 0 and proc.stdout == b"pwned\n", proc.stderr


# --- one line for every bad input ---------------------------------------------------------


def test_launch_errors_are_one_line_without_errno(
    mesobox: Mesobox, victim: User, images: tuple[Path, Path], world_tmp: Path
) -> None:
    private = world_tmp / "private"
    private.mkdir(mode=0o700)
    hidden = make_busybox_rootfs(private / "rootfs")
    closed = make_busybox_rootfs(world_tmp / "closed")
    os.chmod(closed, 0o700)
    cases = [
        (["--overlay", "/nonexistent/overlay"], images[0], 2, "--overlay"),
        (["--hostname", "h" * 300], images[0], 2, "hostname"),
        ([], hidden, 2, "permission denied"),
        ([], closed, 2, "cannot enter image directory"),
        (["-B", f"{private}/rootfs:/x"], images[0], 2, "cannot be reached"),
    ]
    for opts, image, code, text in cases:
        proc = mesobox("exec", *opts, str(image), "true", as_user=victim)
        assert proc.returncode == code, (opts, proc.stderr)
        line = one_error_line(proc.stderr)
        assert text in line and "Errno" not in line, (opts, line)
    assert hidden.is_dir()


# --- the store under a running container --------------------------------------------------


@pytest.fixture()
def stored_dir_image(mesobox: Mesobox, victim: User, registry: Registry, world_tmp: Path) -> tuple[str, Path]:
    """A busybox image pulled --format dir into the victim's store: (reference, store)."""
    def fill(rootfs: Path) -> None:
        make_busybox_rootfs(rootfs)

    layout = make_oci_image(world_tmp / "layout", "v1", [fill])
    ref = registry.push_oci(layout, "v1", f"shared-node/img{os.urandom(4).hex()}")
    pulled = mesobox("pull", "--format", "dir", ref, as_user=victim)
    assert pulled.returncode == 0, pulled.stderr
    return ref, mesobox.store_root / victim.name


@pytest.mark.registry
def test_rm_and_prune_never_delete_a_running_containers_root(
    mesobox: Mesobox, victim: User, stored_dir_image: tuple[str, Path], world_tmp: Path
) -> None:
    ref, store = stored_dir_image
    go, started = world_tmp / "go", world_tmp / "started"
    script = f"touch {started}; while [ ! -e {go} ]; do sleep 0.05; done; ls /bin/busybox"
    argv, env = mesobox_argv(mesobox, victim, ["exec", ref, "sh", "-c", script])
    running = subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and running.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), running.communicate()
        rootfs = [p for p in (store / "rootfs").iterdir()]
        proc = mesobox("rm", ref, as_user=victim)
        assert proc.returncode == 7, proc.stderr
        assert "in use" in one_error_line(proc.stderr)
        assert ref in mesobox("images", as_user=victim).stdout.decode()  # nothing removed
        # Its record replaced behind its back (a re-tag): prune keeps the tree all the same.
        for record in (store / "images").iterdir():
            record.unlink()
        assert mesobox("prune", as_user=victim).returncode == 0
        assert all(p.is_dir() for p in rootfs)
        go.touch()
        out, err = running.communicate(timeout=60)
        assert running.returncode == 0 and out == b"/bin/busybox\n", err
    finally:
        go.touch()
        if running.poll() is None:
            running.kill()
    assert mesobox("prune", as_user=victim).returncode == 0
    assert not any(p.exists() for p in rootfs)


@pytest.mark.registry
@pytest.mark.parametrize("config", [{"Cmd": [5]}, {"Env": [1, 2]}, {"Entrypoint": 7}, {"Cmd": ["a\x00b"]},
                                    {"User": "99999999999"}])
def test_a_stored_record_with_a_hostile_config_is_one_line_at_launch(
    mesobox: Mesobox, victim: User, stored_dir_image: tuple[str, Path], config: dict[str, object]
) -> None:
    """A record written by an older mesobox, or edited: checked again at launch."""
    ref, store = stored_dir_image
    (record,) = (store / "images").iterdir()
    data = json.loads(record.read_text())
    data["config"] = config
    record.write_text(json.dumps(data))
    proc = mesobox("run", ref, as_user=victim)
    assert proc.returncode == 6, proc.stderr
    line = one_error_line(proc.stderr)
    assert ref in line and next(iter(config)) in line, line
