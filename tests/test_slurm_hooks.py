"""Slurm site hooks, for real: the epilog unmounts a user's leftover squashfuse mount;
the prolog pre-stages the image a job names.  Run as root, as Slurm runs them — and as
a job user would try to steer them: everything below the user's runtime dir, and the
file the job names, is the user's to plant, so root must never act on it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_busybox_rootfs, need_tool
from run_support import make_squashfs
from slurm_support import MpiImage, mpi_image

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.userns]
__all__ = ["mpi_image"]


def _mounted(point: Path) -> bool:
    return any(line.split()[4] == str(point) for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_epilog_unmounts_stale_fuse_mounts_of_the_job_user(mpi_image: MpiImage, mesobox: Mesobox, user: User) -> None:
    need_tool("squashfuse", "fusermount")
    runtime = Path(f"/tmp/mesobox-{user.uid}")
    point = runtime / "epilog-test" / "mnt"
    user.run(["mkdir", "-p", str(point)], check=True)
    mounted = user.run(["squashfuse", str(mpi_image.squashfs), str(point)])
    assert mounted.returncode == 0, mounted.stderr.decode()
    try:
        assert _mounted(point)
        result = mesobox("slurm", "epilog", env={"SLURM_JOB_UID": str(user.uid), "SLURM_JOB_ID": "77"})
        assert result.returncode == 0, result.stderr.decode()
        assert f"job 77: {point} unmounted" in result.stderr.decode()
        assert not _mounted(point)
        # Nothing left: a second run is silent and still succeeds.
        again = mesobox("slurm", "epilog", env={"SLURM_JOB_UID": str(user.uid)})
        assert again.returncode == 0 and again.stderr.decode() == ""
    finally:
        if _mounted(point):
            subprocess.run(["fusermount", "-u", "-z", str(point)], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(point.parent)], check=False)


def _job(user: User, job: str, **more: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": job, "SLURM_JOB_UID": str(user.uid), "SLURM_JOB_GID": str(user.gid), **more}


def test_prolog_stages_the_named_image_and_never_fails(mpi_image: MpiImage, mesobox: Mesobox, user: User) -> None:
    size = mpi_image.squashfs.stat().st_size
    staged = mesobox("slurm", "prolog", env=_job(user, "5", SLURM_JOB_COMMENT=f"mesobox:{mpi_image.squashfs}"))
    assert staged.returncode == 0
    assert f"job 5: staged {mpi_image.squashfs} ({size} bytes)" in staged.stderr.decode()
    missing = mesobox("slurm", "prolog", env=_job(user, "6", MESOBOX_IMAGE="/nonexistent.sqfs"))
    assert missing.returncode == 0 and "not staged" in missing.stderr.decode()


@pytest.fixture(scope="module")
def small_sqfs(shared_tmp: Path) -> Path:
    return make_squashfs(make_busybox_rootfs(shared_tmp / "hooks-rootfs"), shared_tmp / "hooks.sqfs")


# Why each is refused: the check that stops it before a byte is staged (slurm/hooks.py).
REFUSED_BECAUSE = {
    "/etc/shadow": "Permission denied",
    "fifo": "not a regular file",  # opened O_NONBLOCK: no hang waiting for a writer
    "sparse-1t": "over max_image_bytes",  # refused on its size, never read
    "not-squashfs": "not a squashfs image",
    "relative.sqfs": "not an absolute path",
    "dir": "not a regular file",
}


@pytest.mark.parametrize("named", list(REFUSED_BECAUSE))
def test_prolog_reads_only_what_the_job_user_could_read(
    mesobox: Mesobox, user: User, world_tmp: Path, named: str
) -> None:
    """The job comment is the user's to write: root must not read /etc/shadow for them,
    hang on a FIFO, or spend the prolog on a 1 TiB file.  Each is refused by the check
    meant for it (the subprocess timeout is only a guard against a hang)."""
    if named == "fifo":
        path = world_tmp / "pipe.sqfs"
        os.mkfifo(path)
        os.chmod(path, 0o666)
    elif named == "sparse-1t":
        path = world_tmp / "huge.sqfs"
        with open(path, "wb") as f:
            f.write(b"hsqs")
            f.truncate(1 << 40)
        os.chmod(path, 0o644)
    elif named == "not-squashfs":
        path = world_tmp / "shadow-copy"
        path.write_text("root:$6$secret:19000:0:99999:7:::\n")
        os.chmod(path, 0o644)
    elif named == "dir":
        path = world_tmp
    else:
        path = Path(named)
    proc = mesobox("slurm", "prolog", env=_job(user, "9", SLURM_JOB_COMMENT=f"mesobox:{path}"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stderr.decode()
    assert "job 9:" in text and "not staged" in text and "staged " + str(path) not in text, text
    assert f"{path}: " in text and REFUSED_BECAUSE[named] in text, text


def test_prolog_stages_as_the_job_user(mesobox: Mesobox, user: User, small_sqfs: Path, world_tmp: Path) -> None:
    """A root-only squashfs is not staged for a user who could not read it; theirs is."""
    private = world_tmp / "root-only.sqfs"
    private.write_bytes(small_sqfs.read_bytes())
    os.chmod(private, 0o600)
    proc = mesobox("slurm", "prolog", env=_job(user, "10", SLURM_JOB_COMMENT=f"mesobox:{private}"))
    assert proc.returncode == 0 and "Permission denied; not staged" in proc.stderr.decode(), proc.stderr
    proc = mesobox("slurm", "prolog", env=_job(user, "11", SLURM_JOB_COMMENT=f"mesobox:{small_sqfs}"))
    assert f"staged {small_sqfs} ({small_sqfs.stat().st_size} bytes)" in proc.stderr.decode(), proc.stderr
    # Without SLURM_JOB_UID nobody can say whose file it is: nothing is read.
    proc = mesobox("slurm", "prolog", env={"SLURM_JOB_ID": "12", "SLURM_JOB_COMMENT": f"mesobox:{small_sqfs}"})
    assert proc.returncode == 0 and "not staged" in proc.stderr.decode()


def _fresh(victim: User) -> Path:
    runtime = Path(f"/tmp/mesobox-{victim.uid}")
    subprocess.run(["rm", "-rf", "--one-file-system", str(runtime)], check=False)
    return runtime


def test_epilog_never_follows_a_job_users_symlinks(mesobox: Mesobox, victim: User, world_tmp: Path) -> None:
    """The reported case: ``mnt/pwn -> /mnt/target`` (with an old ``pwn.idle``) and
    ``pwn.lock -> /etc/nologin`` made the root epilog unmount /mnt/target and create a
    root-owned /etc/nologin.  Here the targets are a root tmpfs and a root-only path."""
    runtime = _fresh(victim)
    target = world_tmp / "target"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    vault = world_tmp / "vault"
    vault.mkdir(mode=0o700)
    try:
        mnt = runtime / "mnt"
        victim.run(["mkdir", "-p", "-m", "0700", str(mnt)], check=True)
        victim.run(["chmod", "0700", str(runtime)], check=True)
        victim.run(["ln", "-s", str(target), str(mnt / "pwn")], check=True)
        victim.run(["touch", "-d", "2000-01-01", str(mnt / "pwn.idle")], check=True)
        victim.run(["ln", "-s", str(vault / "nologin"), str(mnt / "pwn.lock")], check=True)
        victim.run(["ln", "-s", str(vault / "refs"), str(mnt / "pwn.refs")], check=True)
        proc = mesobox("slurm", "epilog", env=_job(victim, "13"))
        assert proc.returncode == 0, proc.stderr
        assert os.path.ismount(target)
        assert list(vault.iterdir()) == []
        assert "Traceback" not in proc.stderr.decode()
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)
        _fresh(victim)


def test_epilog_leaves_a_runtime_dir_that_is_not_the_job_users(
    mesobox: Mesobox, victim: User, attacker: User, small_sqfs: Path
) -> None:
    """Someone else's /tmp/mesobox-UID (the attacker's) is not reaped for the job user,
    and the attacker's own FUSE mount in it stays: not the job's to undo."""
    need_tool("squashfuse")
    runtime = _fresh(victim)
    attacker.run(["mkdir", "-p", "-m", "0700", str(runtime / "mnt" / "k")], check=True)
    mounted = attacker.run(["squashfuse", str(small_sqfs), str(runtime / "mnt" / "k")])
    assert mounted.returncode == 0, mounted.stderr
    try:
        proc = mesobox("slurm", "epilog", env=_job(victim, "14"))
        assert proc.returncode == 0
        assert "belongs to uid" in proc.stderr.decode() and "not reaped" in proc.stderr.decode()
        assert _mounted(runtime / "mnt" / "k")
    finally:
        subprocess.run(["fusermount", "-u", "-z", str(runtime / "mnt" / "k")], check=False)
        _fresh(victim)
