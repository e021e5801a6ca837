"""Slurm site hooks, for real: the epilog unmounts a user's leftover squashfuse mount;
the prolog pre-stages the image a job names.  Run as root, as Slurm runs them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox, User, need_tool
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


def test_prolog_stages_the_named_image_and_never_fails(mpi_image: MpiImage, mesobox: Mesobox) -> None:
    size = mpi_image.squashfs.stat().st_size
    staged = mesobox("slurm", "prolog", env={"SLURM_JOB_ID": "5", "SLURM_JOB_COMMENT": f"mesobox:{mpi_image.squashfs}"})
    assert staged.returncode == 0
    assert f"job 5: staged {mpi_image.squashfs} ({size} bytes)" in staged.stderr.decode()
    missing = mesobox("slurm", "prolog", env={"SLURM_JOB_ID": "6", "MESOBOX_IMAGE": "/nonexistent.sqfs"})
    assert missing.returncode == 0 and "not staged" in missing.stderr.decode()
