"""Fixtures for the Slurm tier: the real two-node cluster and the MPI test image.

- ``slurm_cluster``: runs scripts/slurm-cluster.sh start once per session (nodes n1,
  n2 in network namespaces mb-n1/mb-n2); stops it at the end only if it started it.
- ``mpi_image``: scripts/make-mpi-image.sh into a cache directory (MESOBOX_TEST_CACHE,
  default /var/tmp/mesobox-test-cache) — built once per machine, ~1.5 min.
- ``slurm_env``: what the test user needs in the environment to reach the cluster.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, need_tool

CACHE = Path(os.environ.get("MESOBOX_TEST_CACHE", "/var/tmp/mesobox-test-cache"))
CLUSTER = ROOT / "scripts" / "slurm-cluster.sh"
MAKE_MPI = ROOT / "scripts" / "make-mpi-image.sh"


@dataclass(frozen=True)
class MpiImage:
    rootfs: Path
    squashfs: Path
    marker: str  # content of /etc/mesobox-mpi-image: only the image has it


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    need_tool("ip", "nsenter")
    was_running = subprocess.run([str(CLUSTER), "status"], capture_output=True, check=False).returncode == 0
    result = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        pytest.fail(f"slurm-cluster.sh start failed:\n{result.stdout}{result.stderr}", pytrace=False)
    yield Path(os.environ.get("MESOBOX_SLURM_STATE", "/tmp/mesobox-slurm"))
    if not was_running:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, check=False)


@pytest.fixture(scope="session")
def mpi_image() -> MpiImage:
    need_tool("debootstrap", "mksquashfs")
    out = CACHE / "mpi-image"
    CACHE.mkdir(parents=True, exist_ok=True)
    os.chmod(CACHE, 0o755)
    result = subprocess.run([str(MAKE_MPI), str(out)], capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        pytest.fail(f"make-mpi-image.sh failed:\n{result.stdout}{result.stderr}", pytrace=False)
    marker = (out / "rootfs" / "etc" / "mesobox-mpi-image").read_text().strip()
    return MpiImage(out / "rootfs", out / "mpi.sqfs", marker)


def wait_for_file(path: Path, text: str, timeout: float) -> str:
    """Poll a job output file until it contains ``text`` (jobs write asynchronously)."""
    import time

    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.3)
    return content
