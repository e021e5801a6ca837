"""Intra-node MPI through ``mpirun … mesobox exec``: two ranks on one node, each in its
own container, as an ordinary user, with the host's Open MPI launcher and the image's
Open MPI (tests/data/mpi/pingpong.c, scripts/make-mpi-image.sh).

By default every container sees the host's /dev/shm, so Open MPI's shared-memory BTL
(vader) works between ranks, and the ranks share one user namespace
(launch/sharedns.py), so its CMA single copy (process_vm_readv) works too: forcing it
passes here, and fails with ``--userns private``.  ``OMPI_MCA_btl=self,vader`` forbids
the TCP fallback: with one private /dev/shm per container the job fails ("unable to
reach each other").  Timeouts only stop a hang; nothing here is timed.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import Mesobox, User, need_tool
from slurm_support import MpiImage, mpi_image

pytestmark = [pytest.mark.userns, pytest.mark.slow]
__all__ = ["mpi_image"]  # fixture used by name below

ROWS = re.compile(r"pingpong bytes=(\d+) latency_us=([\d.]+) bandwidth_MBps=([\d.]+)")
SIZES = [8, 1024, 65536, 1048576, 4194304]  # 4 MiB: above vader's eager limit, where single-copy would be used


def _mpirun(mesobox: Mesobox, user: User, *exec_args: str, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[bytes]:
    """``mpirun -np 2 python -m mesobox exec EXEC_ARGS`` as ``user`` (never as root:
    mpirun refuses root without --allow-run-as-root)."""
    need_tool("mpirun")
    full = {**mesobox.base_env(), **mesobox.runtime_env(user), "MESOBOX_STORE": str(mesobox.store_root / user.name)}
    full.update(env or {})
    argv = ["mpirun", "-np", "2", "--oversubscribe", mesobox.python, "-m", "mesobox", "exec", *exec_args]
    return user.run(argv, env=full, timeout=300)


def _text(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode() + result.stderr.decode()


def test_two_ranks_on_one_node_use_shared_memory_and_never_hang(
    mpi_image: MpiImage, mesobox: Mesobox, user: User
) -> None:
    result = _mpirun(mesobox, user, str(mpi_image.squashfs), "/opt/mpi/pingpong", "20",
                     env={"OMPI_MCA_btl": "self,vader"})
    text = _text(result)
    assert result.returncode == 0, text
    assert [int(b) for b, _, _ in ROWS.findall(text)] == SIZES, text
    assert "shared memory initialization" not in text, text


def test_default_needs_no_mpi_settings_and_single_copy_works_between_the_ranks(
    mpi_image: MpiImage, mesobox: Mesobox, user: User
) -> None:
    """Without OMPI_MCA_btl Open MPI picks vader on its own (no "open(2) failed" warning,
    no TCP fallback).  Forcing CMA single copy works: the ranks share one user namespace.
    With ``--userns private`` the forced CMA fails as the kernel says it must (separate
    user namespaces), and without forcing the job still runs: mesobox told Open MPI."""
    result = _mpirun(mesobox, user, str(mpi_image.rootfs), "/opt/mpi/pingpong", "20")
    text = _text(result)
    assert result.returncode == 0, text
    assert [int(b) for b, _, _ in ROWS.findall(text)] == SIZES, text
    assert "shared memory initialization" not in text, text

    cma = {"OMPI_MCA_btl": "self,vader", "OMPI_MCA_btl_vader_single_copy_mechanism": "cma"}
    result = _mpirun(mesobox, user, str(mpi_image.squashfs), "/opt/mpi/pingpong", "20", env=cma)
    text = _text(result)
    assert result.returncode == 0, text
    assert [int(b) for b, _, _ in ROWS.findall(text)] == SIZES, text

    result = _mpirun(mesobox, user, "--userns", "private", str(mpi_image.rootfs), "/opt/mpi/pingpong", "20",
                     env=cma)
    text = _text(result)
    assert result.returncode != 0 and not ROWS.search(text), text
    # Open MPI's help text relayed through mpirun is sometimes lost (an ORTE show_help
    # error); the rank's own abort line is printed directly.
    assert "different user namespaces" in text or "vader BTL is aborting" in text, text

    result = _mpirun(mesobox, user, "--userns", "private", str(mpi_image.rootfs), "/opt/mpi/pingpong", "20",
                     env={"OMPI_MCA_btl": "self,vader"})
    text = _text(result)
    assert result.returncode == 0, text
    assert [int(b) for b, _, _ in ROWS.findall(text)] == SIZES, text


def test_contain_keeps_a_private_dev_shm(mpi_image: MpiImage, mesobox: Mesobox, user: User) -> None:
    """--contain: a private tmpfs per container, so the ranks cannot use shared memory (the
    forced-vader job that passes above without --contain fails), and nothing MPI is set."""
    result = _mpirun(mesobox, user, "--contain", "-B", "/tmp", str(mpi_image.squashfs), "/opt/mpi/pingpong", "5",
                     env={"OMPI_MCA_btl": "self,vader"})
    text = _text(result)
    # Open MPI's reason ("unable to reach each other") is help text relayed through
    # mpirun, sometimes lost to an ORTE show_help error: not asserted.
    assert result.returncode != 0 and not ROWS.search(text), text
    env = mesobox("exec", "--contain", str(mpi_image.squashfs), "/usr/bin/env", as_user=user)
    assert env.returncode == 0, env.stderr.decode()
    assert "OMPI_MCA_" not in env.stdout.decode()
    env = mesobox("exec", "--userns", "private", str(mpi_image.squashfs), "/usr/bin/env", as_user=user)
    assert "OMPI_MCA_btl_vader_single_copy_mechanism=none\n" in env.stdout.decode(), env.stdout.decode()
