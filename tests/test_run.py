"""`mesobox run/exec/shell` end to end: real user namespaces, real mounts, as the
ordinary user and as root (``who`` parametrizes the caller)."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_busybox_rootfs, wait_until
from run_support import (
    make_squashfs,
    mesobox_argv,
    one_error_line,
    setuid_rootfs,
    squashfs_watchers,
    squashfuse_state,
)

pytestmark = pytest.mark.userns
WHO = [pytest.param("user", id="user"), pytest.param("root", id="root", marks=pytest.mark.root)]


@pytest.fixture(scope="module")
def images(shared_tmp: Path) -> tuple[Path, Path]:
    """(busybox rootfs dir made by root with a setuid busybox, the same as squashfs)."""
    rootfs = setuid_rootfs(shared_tmp / "run-rootfs")
    return rootfs, make_squashfs(rootfs, shared_tmp / "run-rootfs.sqfs")


def _caller(who: str, user: User) -> User | None:
    return user if who == "user" else None


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("fmt", ["dir", "squashfs"])
def test_ids_home_and_passwd(mesobox: Mesobox, user: User, images: tuple[Path, Path], who: str, fmt: str) -> None:
    image = images[0] if fmt == "dir" else images[1]
    caller = _caller(who, user)
    proc = mesobox("exec", str(image), "sh", "-c", "id -u; id -g; whoami; cd ~ && pwd", as_user=caller)
    assert proc.returncode == 0, proc.stderr
    uid, gid, name, home = proc.stdout.decode().split()
    want = (user.uid, user.gid, user.name, str(user.home)) if caller else (0, 0, "root", os.environ["HOME"])
    assert (int(uid), int(gid), name, home) == want


@pytest.mark.parametrize("who", WHO)
def test_fakeroot_is_zero_inside_files_stay_the_users(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], world_tmp: Path, who: str
) -> None:
    caller = _caller(who, user)
    script = f"id -u; id -g; echo x > {world_tmp}/made"
    # Real root keeps host ownership only with --host-root (root isolation shifts it by
    # default: tests/test_isolation_root.py::test_shifted_root_files_land_in_the_range).
    host_root = [] if caller else ["--host-root"]
    proc = mesobox("exec", "--fakeroot", *host_root, "-B", str(world_tmp), str(images[0]), "sh", "-c", script,
                   as_user=caller)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"0", b"0"]
    st = os.stat(world_tmp / "made")
    assert (st.st_uid, st.st_gid) == ((user.uid, user.gid) if caller else (0, 0))


@pytest.mark.parametrize("who", WHO)
def test_image_root_is_read_only(mesobox: Mesobox, user: User, images: tuple[Path, Path], who: str) -> None:
    before = sorted(os.listdir(images[0]))
    proc = mesobox("exec", str(images[0]), "sh", "-c", "touch /new || touch /etc/new || exit 9",
                   as_user=_caller(who, user))
    assert proc.returncode == 9
    assert b"Read-only file system" in proc.stderr
    assert sorted(os.listdir(images[0])) == before and not (images[0] / "etc" / "new").exists()


@pytest.mark.parametrize("who", WHO)
def test_host_paths_outside_binds_are_invisible(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], world_tmp: Path, who: str
) -> None:
    secret = world_tmp / "secret"
    secret.mkdir()
    (secret / "f").write_text("s")
    shared = world_tmp / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    script = f"ls {secret} 2>/dev/null && echo SEEN; ls /work /opt/mesobox 2>/dev/null && echo SEEN; ls /data"
    proc = mesobox("exec", "--contain", "-B", f"{shared}:/data", str(images[0]), "sh", "-c", script,
                   as_user=_caller(who, user))
    assert proc.returncode == 0, proc.stderr
    assert b"SEEN" not in proc.stdout
    # Default binds (no --contain): /tmp is the host's, so the secret is visible there.
    proc = mesobox("exec", str(images[0]), "cat", str(secret / "f"), as_user=_caller(who, user))
    assert proc.stdout == b"s", proc.stderr


def test_setuid_binary_grants_nothing(mesobox: Mesobox, user: User, images: tuple[Path, Path]) -> None:
    assert os.stat(images[0] / "opt" / "suid" / "busybox").st_mode & 0o4000
    script = "/opt/suid/id -u; /opt/suid/id -u -r; grep NoNewPrivs /proc/self/status"
    for image in images:
        proc = mesobox("exec", str(image), "sh", "-c", script, as_user=user)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.decode().split()
        assert out[:2] == [str(user.uid)] * 2 and out[-1] == "1", proc.stderr


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("pid", [False, True])
def test_exit_codes_and_signal_deaths(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], who: str, pid: bool
) -> None:
    extra = ["--pid"] if pid else []
    caller = _caller(who, user)
    assert mesobox("exec", *extra, str(images[0]), "sh", "-c", "exit 3", as_user=caller).returncode == 3
    assert mesobox("exec", *extra, str(images[0]), "sh", "-c", "kill -TERM $$", as_user=caller).returncode == 143
    assert mesobox("exec", *extra, str(images[0]), "sh", "-c", "kill -KILL $$", as_user=caller).returncode == 137


@pytest.mark.parametrize("variant", ["dir", "squashfs", "pid"])
def test_sigterm_to_mesobox_reaches_workload(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], world_tmp: Path, variant: str
) -> None:
    image = images[1] if variant == "squashfs" else images[0]
    extra = ["--pid"] if variant == "pid" else []
    ready, got = world_tmp / "ready", world_tmp / "got"
    script = f"trap 'echo term > {got}; exit 7' TERM; echo > {ready}; while :; do sleep 0.05; done"
    argv, env = mesobox_argv(mesobox, user, ["exec", *extra, str(image), "sh", "-c", script])
    proc = subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert ready.exists(), proc.communicate(timeout=5)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 7, err
    assert got.read_text() == "term\n"


def test_writable_tmpfs_size_gives_enospc_and_leaves_image(
    mesobox: Mesobox, user: User, images: tuple[Path, Path]
) -> None:
    before = sorted(os.listdir(images[0]))
    script = ("echo small > /small && cat /small; dd if=/dev/zero of=/big bs=64k count=64 2>&1; "
              "echo dd=$?; echo changed > /etc/motd2 && echo etc-ok")
    proc = mesobox("exec", "--writable-tmpfs=1m", str(images[0]), "sh", "-c", script, as_user=user)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "small" in out and "No space left on device" in out and "dd=1" in out
    assert sorted(os.listdir(images[0])) == before and not (images[0] / "etc" / "motd2").exists()
    # The same on squashfs (fuse lower), and the next run starts from the clean image.
    proc = mesobox("exec", "--writable-tmpfs", str(images[1]), "sh", "-c", "touch /x && ls /x", as_user=user)
    assert proc.stdout == b"/x\n", proc.stderr
    assert mesobox("exec", str(images[0]), "ls", "/small", as_user=user).returncode != 0


def test_overlay_dir_persists(mesobox: Mesobox, user: User, images: tuple[Path, Path], world_tmp: Path) -> None:
    ovl = world_tmp / "ovl"
    assert mesobox("exec", "--overlay", str(ovl), str(images[0]), "sh", "-c", "echo 1 > /kept",
                   as_user=user).returncode == 0
    proc = mesobox("exec", "--overlay", str(ovl), str(images[0]), "cat", "/kept", as_user=user)
    assert proc.stdout == b"1\n", proc.stderr
    assert not (images[0] / "kept").exists()


def test_interactive_shell_through_a_pty(mesobox: Mesobox, user: User, images: tuple[Path, Path]) -> None:
    argv, env = mesobox_argv(mesobox, user, ["shell", str(images[0])])
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child execs
        os.chdir("/")
        os.execvpe(argv[0], argv, env)
    try:
        os.write(fd, b"echo hi-$((40+2)); tty; exit 5\n")
        buf = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        assert b"hi-42" in buf, buf
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 5, buf


@pytest.mark.parametrize("who", WHO)
def test_bad_input_one_line_distinct_codes(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], world_tmp: Path, who: str
) -> None:
    caller = _caller(who, user)
    cases = [
        (["exec", str(world_tmp / "missing"), "true"], 4, "no such image"),
        (["exec", "not-pulled:1.0", "true"], 4, "not in the store"),
        (["exec", "-B", "/a:/b:xx", str(images[0]), "true"], 2, "bad bind mode"),
        (["exec", "-B", str(world_tmp / "nope"), str(images[0]), "true"], 2, "does not exist"),
        (["exec", "--frob", str(images[0]), "true"], 2, "unknown option"),
        (["exec", str(images[0]), "no-such-command"], 127, "command not found"),
        (["exec", str(images[0]), "/etc/passwd"], 126, "cannot execute"),
    ]
    for args, code, text in cases:
        proc = mesobox(*args, as_user=caller)
        assert proc.returncode == code, (args, proc.stderr)
        assert text in one_error_line(proc.stderr), proc.stderr
    env = {"MESOBOX_ALLOWED_BIND_SOURCES": "/scratch"}
    proc = mesobox("exec", "--contain", "-B", str(world_tmp), str(images[0]), "true", as_user=caller, env=env)
    assert proc.returncode == 13
    assert "outside the allowed" in one_error_line(proc.stderr)


def test_image_symlinks_cannot_redirect_runtime_mounts(mesobox: Mesobox, user: User, world_tmp: Path) -> None:
    rootfs = make_busybox_rootfs(world_tmp / "evil")
    os.rmdir(rootfs / "proc")
    (rootfs / "proc").symlink_to("/etc")  # runc CVE-2019-16884 shape
    proc = mesobox("exec", str(rootfs), "true", as_user=user)
    assert proc.returncode == 125
    assert "symlink" in one_error_line(proc.stderr)
    assert not os.path.ismount("/etc")


def _launch_32(mesobox: Mesobox, user: User, image: Path, world_tmp: Path, linger: str
               ) -> tuple[Path, Path, list[subprocess.Popen[bytes]]]:
    """32 launches of ``image`` that each wait for a marker file: (runtime dir, marker, processes)."""
    runtime = world_tmp / "rt"
    marker = world_tmp / "go"
    script = f"while [ ! -e {marker} ]; do sleep 0.05; done"
    argv, env = mesobox_argv(mesobox, user, ["exec", str(image), "sh", "-c", script],
                             env={"MESOBOX_RUNTIME_DIR": str(runtime), "MESOBOX_SQUASHFS_LINGER": linger})
    return runtime, marker, [subprocess.Popen(argv, env=env, cwd="/", stderr=subprocess.PIPE) for _ in range(32)]


@pytest.mark.slow
def test_32_concurrent_squashfs_launches_share_one_mount(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], world_tmp: Path
) -> None:
    # No linger: the last launcher out unmounts (tests/test_squashfs_linger.py lingers).
    runtime, marker, procs = _launch_32(mesobox, user, images[1], world_tmp, linger="0")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            refs = list((runtime / "mnt").glob("*.refs")) if (runtime / "mnt").exists() else []
            if refs and len(refs[0].read_text().split()) == 32:
                break
            time.sleep(0.1)
        assert squashfuse_state(user.uid, str(runtime)) == (1, 1)
    finally:
        marker.touch()
        errors = [p.communicate(timeout=60)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert squashfuse_state(user.uid, str(runtime)) == (0, 0)


@pytest.mark.slow
def test_32_concurrent_lingering_squashfs_launches_share_one_mount_and_one_watcher(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], world_tmp: Path
) -> None:
    """With a linger no launcher supervises: each is its workload (its ref is its own
    pid), one watcher serves the mount, and a linger after the last exit nothing is left."""
    runtime, marker, procs = _launch_32(mesobox, user, images[1], world_tmp, linger="2")
    try:
        deadline = time.monotonic() + 60
        refs: list[str] = []
        while time.monotonic() < deadline:
            files = list((runtime / "mnt").glob("*.refs")) if (runtime / "mnt").exists() else []
            refs = files[0].read_text().split() if files else []
            if len(refs) == 32 and all(_cmdline(p.pid).startswith(b"sh\0") for p in procs):
                break  # every launcher has exec'd into its workload: nobody stayed to supervise
            time.sleep(0.1)
        assert squashfuse_state(user.uid, str(runtime)) == (1, 1)
        assert sorted(int(ref.split(":")[0]) for ref in refs) == sorted(p.pid for p in procs)
        assert all(_cmdline(p.pid).startswith(b"sh\0") for p in procs)
        assert len(squashfs_watchers(runtime)) == 1
    finally:
        marker.touch()
        errors = [p.communicate(timeout=60)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    wait_until(lambda: squashfuse_state(user.uid, str(runtime)) == (0, 0) and not squashfs_watchers(runtime),
               "a linger after the last exit, the mount and its watcher go")
    # flock files and the stamp of the last look for stale mounts (execute.reap_stale_mounts, ``.reaped``) stay
    assert not [p for p in (runtime / "mnt").iterdir() if not p.name.endswith((".lock", ".watcher", ".reaped"))]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


@pytest.mark.userns
def test_the_runtime_dir_is_private(
    mesobox: Mesobox, user: User, images: tuple[Path, Path], world_tmp: Path
) -> None:
    """Every directory a launch makes for its state (mounts, workspace, caches) is 0700,
    the parents it had to make too (os.makedirs would leave them 0755)."""
    runtime = world_tmp / "new" / "rt"
    for image in images:
        proc = mesobox("exec", str(image), "true", as_user=user,
                       env={"MESOBOX_RUNTIME_DIR": str(runtime), "MESOBOX_SQUASHFS_LINGER": "0"})
        assert proc.returncode == 0, proc.stderr
    made = [world_tmp / "new", runtime, *[p for p in runtime.rglob("*") if p.is_dir()]]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in made} == {p.name: "0o700" for p in made}
    assert {"mnt", "ws", "seccomp"} <= {p.name for p in made}


def test_debug_prints_the_mount_plan_and_shell_falls_back_to_sh(
    mesobox: Mesobox, user: User, images: tuple[Path, Path]
) -> None:
    proc = mesobox("--debug", "exec", str(images[0]), "true", as_user=user)
    assert proc.returncode == 0, proc.stderr
    plan = [line for line in proc.stderr.decode().splitlines() if line.startswith("mesobox: mount: ")]
    assert plan[0] == f"mesobox: mount: bind {images[0]} -> / (ro)"
    assert any("devpts" in line for line in plan) and any("/etc/passwd" in line for line in plan)
    for image in images:  # busybox images have no bash
        proc = mesobox("shell", str(image), as_user=user, input=b"echo $0; exit 4\n")
        assert (proc.returncode, proc.stdout) == (4, b"/bin/sh\n"), proc.stderr
