"""Slurm tier: containers as Slurm tasks on a real two-node cluster (netns nodes).

Every job is submitted by the ordinary test user through ``mesobox srun``/``sbatch``
or Slurm's own ``srun --container``; each proves it ran in the image by reading
/etc/mesobox-mpi-image, a file only the image has.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Mesobox, Registry, User, make_busybox_rootfs, make_oci_image
from slurm_support import MpiImage, mpi_image, slurm_cluster, wait_for_file

pytestmark = [pytest.mark.slurm, pytest.mark.userns, pytest.mark.slow]
__all__ = ["mpi_image", "slurm_cluster"]  # fixtures used by name below

MARKER = "/etc/mesobox-mpi-image"


def _ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout.decode(), result.stderr.decode())
    return result.stdout.decode()


def test_srun_runs_one_container_per_task_on_both_nodes(
    slurm_cluster: Path, mpi_image: MpiImage, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    out = _ok(
        mesobox(
            "srun",
            "--image",
            str(mpi_image.squashfs),
            "-N2",
            "-n4",
            "--",
            "/bin/sh",
            "-c",
            f'echo "$SLURM_PROCID $SLURMD_NODENAME $(cat {MARKER})"',
            as_user=user,
            cwd=world_tmp,
            timeout=120,
        )
    )
    lines = sorted(out.split("\n"))[-4:]
    assert [line.split()[0] for line in lines] == ["0", "1", "2", "3"], out
    assert {line.split()[1] for line in lines} == {"n1", "n2"}, out
    assert all(line.split()[2] == mpi_image.marker for line in lines), out
    assert not Path(MARKER).exists()  # the host has no such file: the tasks ran in the image


def test_srun_exit_status_and_bad_image(
    slurm_cluster: Path, mpi_image: MpiImage, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    failed = mesobox(
        "srun",
        "--image",
        str(mpi_image.rootfs),
        "-n1",
        "--",
        "/bin/sh",
        "-c",
        "exit 3",
        as_user=user,
        cwd=world_tmp,
        timeout=120,
    )
    assert failed.returncode == 3, failed.stderr.decode()
    missing = mesobox(
        "srun",
        "--image",
        "/nonexistent/image.sqfs",
        "-n1",
        "--",
        "true",
        as_user=user,
        cwd=world_tmp,
        env={"MESOBOX_INSECURE_REGISTRIES": ""},
    )
    assert missing.returncode != 0
    err = missing.stderr.decode()
    assert err.startswith("mesobox: error:") and "Traceback" not in err, err


def test_srun_pulls_a_reference_once_on_the_submit_side(
    slurm_cluster: Path, registry: Registry, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    def marker(root: Path) -> None:
        make_busybox_rootfs(root)
        (root / "etc" / "slurm-marker").write_text("from-the-registry\n")

    layout = make_oci_image(world_tmp / "layout", "v1", [marker])
    ref = registry.push_oci(layout, "v1", "slurm/busybox")
    out = _ok(
        mesobox(
            "srun",
            "--image",
            ref,
            "-N2",
            "-n2",
            "--",
            "cat",
            "/etc/slurm-marker",
            as_user=user,
            cwd=world_tmp,
            timeout=180,
        )
    )
    assert out.split() == ["from-the-registry", "from-the-registry"]
    images = _ok(mesobox("images", as_user=user))
    assert "slurm/busybox" in images


def test_sbatch_wrap_and_script_run_steps_in_containers(
    slurm_cluster: Path, mpi_image: MpiImage, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    wrap_out = world_tmp / "wrap.out"
    _ok(
        mesobox(
            "sbatch",
            "--image",
            str(mpi_image.squashfs),
            "--wait",
            "-N1",
            f"--output={wrap_out}",
            "--wrap",
            f"cat {MARKER}; echo job=$SLURM_JOB_ID",
            as_user=user,
            cwd=world_tmp,
            timeout=120,
        )
    )
    text = wrap_out.read_text()
    assert mpi_image.marker in text and re.search(r"job=\d+", text), text

    script = world_tmp / "job.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH -N2\n#SBATCH -n2\n"
        f"test -e {MARKER} && echo host-has-marker || echo batch-host-is-bare\n"
        f"srun -l cat {MARKER}\n"
        'echo "script-arg=$1"\n'
    )
    os.chmod(script, 0o644)
    job_out = world_tmp / "job.out"
    _ok(
        mesobox(
            "sbatch",
            "--image",
            str(mpi_image.rootfs),
            "--wait",
            f"--output={job_out}",
            str(script),
            "arg-one",
            as_user=user,
            cwd=world_tmp,
            timeout=120,
        )
    )
    text = job_out.read_text()
    assert "batch-host-is-bare" in text and "script-arg=arg-one" in text, text
    assert sorted(re.findall(r"^(\d): (\S+)$", text, re.M)) == [("0", mpi_image.marker), ("1", mpi_image.marker)], text


def test_mpi_hello_and_pingpong_across_two_nodes(
    slurm_cluster: Path, mpi_image: MpiImage, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    """Hybrid model: Slurm's PMIx starts 4 ranks, each in its own container, 2 per node."""
    base = ["srun", "--image", str(mpi_image.squashfs), "--mpi=pmix", "-N2", "-n4", "--"]
    out = _ok(mesobox(*base, "/opt/mpi/hello", as_user=user, cwd=world_tmp, timeout=180))
    hello = re.findall(r"hello rank=(\d) size=4 node=\S+ slurm_node=(n\d) image=(\S+) ranksum=6", out)
    assert sorted(r for r, _, _ in hello) == ["0", "1", "2", "3"], out
    assert {n for _, n, _ in hello} == {"n1", "n2"}, out
    assert {i for _, _, i in hello} == {mpi_image.marker}, out

    out = _ok(mesobox(*base, "/opt/mpi/pingpong", "50", as_user=user, cwd=world_tmp, timeout=180))
    rows = re.findall(r"pingpong bytes=(\d+) latency_us=([\d.]+) bandwidth_MBps=([\d.]+)", out)
    assert [int(b) for b, _, _ in rows] == [8, 1024, 65536, 1048576, 4194304], out
    assert all(float(lat) > 0 for _, lat, _ in rows)


def test_walltime_warning_signal_reaches_the_container(
    slurm_cluster: Path, mpi_image: MpiImage, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    """--signal=USR1@25 with a 1-minute limit: the warning is due 35 s in; slurmctld
    checks time limits every 30 s and sends a warning that falls due before its next
    check early (sbatch(1): "up to 60 seconds earlier"), so it arrives 5-35 s in — after
    the container is up (a signal during container start-up is a separate matter)."""
    program = (
        f'trap "echo got-USR1-in-$(cat {MARKER}); exit 0" USR1; '
        "echo ready; i=0; while [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done; echo no-signal; exit 1"
    )
    out = _ok(
        mesobox(
            "srun",
            "--image",
            str(mpi_image.squashfs),
            "-n1",
            "-t",
            "1",
            "--signal=USR1@25",
            "--",
            "/bin/bash",
            "-c",
            program,
            as_user=user,
            cwd=world_tmp,
            timeout=120,
        )
    )
    # sbatch(1): the warning may come up to 60 s early, so only the order is fixed.
    assert out.split() == ["ready", f"got-USR1-in-{mpi_image.marker}"], out


@pytest.fixture()
def oci_conf(mesobox: Mesobox, test_python: str, mesobox_src: Path) -> Iterator[Path]:
    """/etc/slurm/oci.conf naming mesobox (as `mesobox slurm oci-conf` prints it)."""
    runtime = f"env PYTHONPATH={mesobox_src} MESOBOX_SITE_CONFIG=/nonexistent {test_python} -m mesobox"
    text = _ok(mesobox("slurm", "oci-conf", "--runtime", runtime))
    path = Path("/etc/slurm/oci.conf")
    path.write_text(text)
    yield path
    path.unlink()


@pytest.mark.parametrize("form", ["rootfs", "squashfs"])
def test_srun_container_uses_mesobox_as_the_oci_runtime(
    slurm_cluster: Path, mpi_image: MpiImage, oci_conf: Path, mesobox: Mesobox, user: User, world_tmp: Path,
    form: str,
) -> None:
    bundle = world_tmp / "bundle"
    _ok(mesobox("bundle", str(getattr(mpi_image, form)), str(bundle), as_user=user))
    result = user.run(
        ["srun", "-N2", "-n2", f"--container={bundle}", "/bin/sh", "-c", f'echo "$SLURMD_NODENAME $(cat {MARKER})"'],
        cwd=world_tmp,
        timeout=120,
    )
    out = _ok(result)
    assert sorted(out.split("\n"))[-2:] == [f"n1 {mpi_image.marker}", f"n2 {mpi_image.marker}"], out


PINGPONG = re.compile(r"pingpong bytes=(\d+) latency_us=([\d.]+) bandwidth_MBps=([\d.]+)")
# Shared memory only (no TCP fallback), and CMA single copy forced: it works only when
# the two ranks share a user namespace (launch/sharedns.py).
FORCED_CMA = {"OMPI_MCA_btl": "self,vader", "OMPI_MCA_btl_vader_single_copy_mechanism": "cma"}


def test_two_ranks_on_one_node_copy_with_cma_however_slurm_starts_them(
    slurm_cluster: Path, mpi_image: MpiImage, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    """``srun … mesobox exec`` (the README's hybrid line) and ``mesobox srun``: two ranks
    of one job on one node, each in its own container, with default settings."""
    env = {**mesobox.base_env(), **mesobox.runtime_env(user), "MESOBOX_STORE": str(mesobox.store_root / user.name),
           **FORCED_CMA}
    plain = user.run(["srun", "-N1", "-n2", "--mpi=pmix", mesobox.python, "-m", "mesobox", "exec",
                      str(mpi_image.squashfs), "/opt/mpi/pingpong", "20"], env=env, cwd=world_tmp, timeout=180)
    out = _ok(plain)
    assert [int(b) for b, _, _ in PINGPONG.findall(out)] == [8, 1024, 65536, 1048576, 4194304], out

    wrapped = mesobox("srun", "--image", str(mpi_image.squashfs), "--mpi=pmix", "-N1", "-n2", "--",
                      "/opt/mpi/pingpong", "20", as_user=user, cwd=world_tmp, timeout=180, env=FORCED_CMA)
    out = _ok(wrapped)
    assert [int(b) for b, _, _ in PINGPONG.findall(out)] == [8, 1024, 65536, 1048576, 4194304], out


APP = """#!/bin/sh
# A checkpointing application: counts, saves its count on SIGUSR2, resumes from it.
d=$MESOBOX_CHECKPOINT_DIR
n=$(cat "$d/count" 2>/dev/null || echo 0)
echo "run restart=${SLURM_RESTART_COUNT:-0} from=$n layer=$(cat /var/layer-mark 2>/dev/null || echo none)"
echo "written-in-run-${SLURM_RESTART_COUNT:-0}" > /var/layer-mark
if [ "$n" -gt 0 ]; then echo "resumed-and-done"; exit 0; fi
trap 'echo "$n" > "$d/count"; echo "checkpointed at $n"; exit 3' USR2
while :; do n=$((n + 1)); sleep 1; done
"""


def test_sbatch_checkpoint_dir_checkpoints_at_the_warning_and_requeues(
    slurm_cluster: Path, busybox_rootfs: Path, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    """``--checkpoint-dir``: Slurm's time-limit warning reaches the batch shell, which
    sends the steps the chosen signal; the application saves its state in the bound
    directory and stops; the job requeues itself and the next run resumes from the
    state and from the task's writable layer (a file the first run wrote in the image's
    /var).  The image is the user's own (owned by them, as a pull of theirs makes it):
    a rootless writable layer cannot copy up a directory of an unmapped owner."""
    image = world_tmp / "app.sqfs"
    subprocess.run(["mksquashfs", str(busybox_rootfs), str(image), "-quiet", "-noappend",
                    "-force-uid", str(user.uid), "-force-gid", str(user.gid)], check=True, capture_output=True)
    app = world_tmp / "app.sh"
    app.write_text(APP)
    app.chmod(0o755)
    checkpoints = world_tmp / "ckpt"
    out = world_tmp / "job.out"
    submitted = _ok(mesobox("sbatch", "--image", str(image), "--checkpoint-dir", str(checkpoints),
                            "--checkpoint-signal", "USR2", "--checkpoint-warning", "45", "-N1", "-n1", "-t", "1",
                            "--open-mode=append", f"--output={out}", "--wrap", str(app),
                            as_user=user, cwd=world_tmp, timeout=120))
    job = submitted.split()[-1]
    try:
        wait_for_file(out, "resumed-and-done", timeout=400)
    finally:
        subprocess.run(["scancel", job], check=False)
    text = out.read_text()
    runs = re.findall(r"^run restart=(\d+) from=(\d+) layer=(\S+)$", text, re.M)
    assert runs[0] == ("0", "0", "none"), text
    assert "checkpointed at" in text and "exit code 3" in text, text  # the application's own exit, not a kill
    saved = int((checkpoints / "count").read_text())
    # Slurm may send the warning up to 60 s early (sbatch(1)): a requeued run can meet it
    # again before it resumes and be requeued once more.  The run that resumed counts.
    restart, start, layer = runs[-1]
    assert int(restart) >= 1 and start == str(saved) and saved > 0, text
    assert layer.startswith("written-in-run-"), text  # the writable layer outlived the first run
    assert (checkpoints / "layers" / "task-0").is_dir()
    assert not (checkpoints / ".mesobox-requeue").exists()
