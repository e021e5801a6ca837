"""Slurm tier, pure parts: command-line splitting, generated scripts, OCI bundle
translation, oci.conf, epilog mount selection.  No daemons needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import Mesobox
from mesobox.cli.slurm import split_args
from mesobox.config import Config
from mesobox.errors import UsageError
from mesobox.oci.bundle import StateDir, check_id, load_bundle, make_bundle, spec_from_bundle
from mesobox.slurm.hooks import job_image, stale_mounts
from mesobox.slurm.launch import batch_script, srun_argv, task_setup, wrap_script
from mesobox.slurm.ociconf import oci_conf


def test_split_with_double_dash() -> None:
    s = split_args(["--image", "img.sqfs", "--bind", "/data", "-N2", "--mpi=pmix", "-n", "4", "--", "app", "-x"])
    assert s.image == "img.sqfs"
    assert s.run_args == ("--bind", "/data")
    assert s.slurm_args == ("-N2", "--mpi=pmix", "-n", "4")
    assert s.command == ("app", "-x")


def test_split_without_double_dash_uses_srun_value_table() -> None:
    s = split_args(["-l", "-t", "5", "--partition", "debug", "--exclusive", "--env=A=1", "hostname", "-s"])
    assert s.slurm_args == ("-l", "-t", "5", "--partition", "debug", "--exclusive")
    assert s.run_args == ("--env=A=1",)
    assert s.command == ("hostname", "-s")


def test_split_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        split_args(["--image"])
    with pytest.raises(UsageError):
        split_args(["-N2", "--"])
    with pytest.raises(UsageError):
        split_args(["-n"])
    assert split_args(["-N2"], need_command=False).command == ()


@given(st.lists(st.text(min_size=1).filter(lambda w: w != "--"), min_size=1, max_size=5))
def test_command_after_double_dash_is_kept_verbatim(command: list[str]) -> None:
    assert split_args(["-n1", "--", *command]).command == tuple(command)


def test_srun_argv_runs_this_interpreter_on_the_nodes(tmp_path: Path) -> None:
    s = split_args(["--bind", "/scratch", "-N2", "--", "app"])
    argv = srun_argv(tmp_path / "img.sqfs", s)
    assert argv[:2] == ["srun", "-N2"]
    assert argv[2:6] == [sys.executable, "-m", "mesobox", "slurm"]
    assert argv[6:] == ["task", "--bind", "/scratch", "--", str(tmp_path / "img.sqfs"), "app"]


def test_task_setup_binds_pmix_dir_and_dev_shm_and_leaves_mpi_settings_alone(tmp_path: Path) -> None:
    """The ranks share /dev/shm and one user namespace (sharedns.py): CMA works, so the
    task sets no MPI variable; the user's own choice passes through untouched."""
    env = {"PMIX_SERVER_TMPDIR": str(tmp_path)}
    argv = task_setup(["--env", "A=1", "--", "/img", "app"], env)
    assert argv == ["--bind", "/dev/shm", "--bind", str(tmp_path), "--env", "A=1", "/img", "app"]
    assert env == {"PMIX_SERVER_TMPDIR": str(tmp_path)}
    env2 = {"OMPI_MCA_btl_vader_single_copy_mechanism": "cma"}
    task_setup(["--", "/img", "app"], env2)
    assert env2 == {"OMPI_MCA_btl_vader_single_copy_mechanism": "cma"}
    with pytest.raises(UsageError):
        task_setup(["/img", "app"], {})


def test_batch_script_keeps_sbatch_header_and_wraps_srun(tmp_path: Path) -> None:
    body = "#!/bin/bash\n#SBATCH -N2\n#SBATCH --time=5\n\nhostname\nsrun -l app 'a b'\n"
    script = batch_script(tmp_path / "img", ("--bind", "/x"), body)
    lines = script.splitlines()
    assert lines[:3] == ["#!/bin/bash", "#SBATCH -N2", "#SBATCH --time=5"]
    assert f"export MESOBOX_SLURM_IMAGE={tmp_path / 'img'}" in lines
    assert lines[-2:] == ["hostname", "srun -l app 'a b'"]
    # The script is valid shell and its srun function calls `mesobox srun`.
    check = subprocess.run(["bash", "-n"], input=script.encode(), check=False)
    assert check.returncode == 0
    probe = script.replace(sys.executable, "echo")  # run it with `echo` as "python"
    out = subprocess.run(
        ["bash"], input=probe.replace("hostname\n", ""), capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "-m mesobox srun --bind /x -l app a b"


def test_wrap_script_runs_command_through_sh(tmp_path: Path) -> None:
    script = wrap_script(tmp_path / "i.sqfs", (), "echo $HOME; hostname")
    assert script.startswith("#!/bin/sh\n")
    assert "exec srun " in script and "/bin/sh -c 'echo $HOME; hostname'" in script


def _bundle(tmp_path: Path, data: dict[str, object]) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


def test_spec_from_slurm_rewritten_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Slurm 22.05 writes into the step's spool (measured): process replaced,
    root.path absolute, no user and no id maps — mesobox fills in the caller's."""
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    (tmp_path / "rootfs").mkdir()
    data = {
        "ociVersion": "1.0.2",
        "process": {"args": ["hostname", "-s"], "cwd": "/work", "env": ["A=1", "PATH=/bin"], "terminal": False},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/data", "source": "/srv/data", "type": "bind", "options": ["rbind", "ro"]}],
    }
    bundle = _bundle(tmp_path, data)
    spec = spec_from_bundle(bundle, load_bundle(bundle))
    assert spec.root.path == str(tmp_path / "rootfs")
    assert spec.process.args == ("hostname", "-s") and spec.process.cwd == "/work"
    assert spec.process.env == ("A=1", "PATH=/bin", "SLURMD_NODENAME=n7")
    assert (spec.process.user.uid, spec.process.user.gid) == (os.getuid(), os.getgid())
    # an ordinary caller keeps its uid; real root's container root is shifted to a sub-id range
    from mesobox.launch.identity import is_real_root, root_pool

    expected = {uid for uid, _gid in root_pool()} if is_real_root() else {os.getuid()}
    assert spec.linux.uid_mappings and spec.linux.uid_mappings[0].host_id in expected
    assert [m.destination for m in spec.mounts] == ["/data"]
    assert load_bundle(bundle) == data  # the bundle itself is not modified


@pytest.mark.parametrize("data", [{}, {"process": {"args": []}, "root": {"path": "r"}}, {"process": {"args": ["a"]}}])
def test_bad_bundles_are_usage_errors(tmp_path: Path, data: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        load_bundle(_bundle(tmp_path, data))
    with pytest.raises(UsageError):
        load_bundle(tmp_path / "absent")


def test_make_bundle_from_directory_image_round_trips(tmp_path: Path, busybox_rootfs: Path) -> None:
    rootfs = busybox_rootfs
    config = Config(store=tmp_path / "store", runtime_dir=tmp_path / "run")
    bundle = make_bundle(config, rootfs, tmp_path / "b")
    data = load_bundle(bundle)
    assert data["root"]["path"] == "rootfs" and (bundle / "rootfs").resolve() == rootfs.resolve()
    assert data["annotations"]["org.mesobox.root.format"] == "dir"
    assert {"/proc", "/dev", "/tmp"} <= {m["destination"] for m in data["mounts"]}
    assert not any(m["source"] == str(Path.home()) for m in data["mounts"])  # --contain: no host binds
    spec = spec_from_bundle(bundle, data)
    assert spec.root.path == str(rootfs.resolve()) and spec.process.args
    with pytest.raises(UsageError):
        make_bundle(config, rootfs, tmp_path / "b")  # not empty
    with pytest.raises(UsageError):  # "new/.." is the (non-empty) parent, never written
        make_bundle(config, rootfs, tmp_path / "new" / "..")
    assert not (tmp_path / "config.json").exists()


def test_container_ids_and_state(tmp_path: Path) -> None:
    assert check_id("n1.alice.12.0.3") == "n1.alice.12.0.3"
    for bad in ("", "../x", "a/b", ".hidden", "x" * 200):
        with pytest.raises(UsageError):
            check_id(bad)
    config = Config(store=tmp_path / "store", runtime_dir=tmp_path / "run")
    state = StateDir(config, "n1.u.1.0.0")
    with pytest.raises(UsageError):
        state.read()
    proc = subprocess.Popen(["sleep", "30"])
    try:
        state.write(tmp_path, "running", proc.pid)
        assert state.read()["status"] == "running"
    finally:
        proc.kill()
        proc.wait()
    assert state.read()["status"] == "stopped"


def test_oci_conf_uses_only_patterns_slurm_22_05_knows() -> None:
    text = oci_conf("/opt/mesobox/bin/mesobox")
    keys = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert set(keys) == {"RunTimeQuery", "RunTimeKill", "RunTimeDelete", "RunTimeRun"}
    assert "%U" not in text  # kills the step on 22.05 (it knows %u, not %U)
    clean = "env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin SLURMD_NODENAME=%n"
    assert keys["RunTimeRun"] == f'"{clean} /opt/mesobox/bin/mesobox oci run --bundle %b %n.%u.%j.%s.%t"'


def test_stale_mounts_picks_fuse_mounts_below_runtime_dir() -> None:
    mountinfo = (
        "36 25 0:32 / /tmp/mesobox-1001/mnt/abc rw,nosuid - fuse.squashfuse squashfuse rw\n"
        "37 36 0:33 / /tmp/mesobox-1001/mnt/abc/inner rw - fuse.fuse-overlayfs x rw\n"
        "38 25 0:34 / /tmp/mesobox-10010/mnt/x rw - fuse.squashfuse squashfuse rw\n"
        "39 25 0:35 / /tmp/mesobox-1001/tmpfs rw - tmpfs tmpfs rw\n"
        "40 25 0:36 / /tmp/mesobox-1001/with\\040space rw - fuse.squashfuse squashfuse rw\n"
    )
    assert stale_mounts("/tmp/mesobox-1001", mountinfo) == [
        "/tmp/mesobox-1001/mnt/abc/inner",
        "/tmp/mesobox-1001/mnt/abc",
        "/tmp/mesobox-1001/with space",
    ]


def test_job_image_from_env_or_comment() -> None:
    assert job_image({"MESOBOX_IMAGE": "/a.sqfs"}) == "/a.sqfs"
    assert job_image({"SLURM_JOB_COMMENT": "stage mesobox:/img/x.sqfs please"}) == "/img/x.sqfs"
    assert job_image({"SLURM_JOB_COMMENT": "nothing"}) is None


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["srun", "-n1", "--", "true"], "no image given"),
        (["srun", "--image", "/nonexistent-dir/"], "no command given"),
        (["sbatch", "--image", "/", "/nonexistent/job.sh"], "cannot read batch script"),
        (["oci", "state", "../escape"], "invalid container id"),
        (["oci", "state", "n1.nobody.1.0.0"], "does not exist"),
        (["oci", "run", "x1"], "needs --bundle"),
        (["oci", "frobnicate", "x1"], "unknown oci verb"),
        (["slurm", "nonsense"], "unknown slurm action"),
        (["bundle", "/", "/etc"], "is not empty"),
    ],
)
def test_bad_input_is_one_line_error(mesobox: Mesobox, argv: list[str], needle: str) -> None:
    result = mesobox(*argv)  # in this test's own runtime dir (the fixture's), which nothing else uses
    err = result.stderr.decode()
    assert result.returncode in (2, 125), (result.returncode, err)
    assert err.startswith("mesobox: error:") and needle in err and "Traceback" not in err, err


def test_checkpoint_script_is_valid_bash_and_runs_simple_commands_without_a_shell(tmp_path: Path) -> None:
    from mesobox.slurm.launch import Checkpoint, wrap_script

    ckpt = Checkpoint(str(tmp_path / "ck"), "sigusr2", "45")
    assert (ckpt.signal, ckpt.warning) == ("USR2", 45) and (tmp_path / "ck").is_dir()
    assert ckpt.sbatch_args() == ["--requeue", "--signal=B:USR1@45"]
    simple = wrap_script(tmp_path / "img", (), "/opt/app --steps 10", ckpt)
    assert "\nsrun /opt/app --steps 10\n" in simple and "scancel --signal=USR2" in simple
    compound = wrap_script(tmp_path / "img", (), "cd /x && ./app > log", ckpt)
    assert "\nsrun /bin/sh -c 'cd /x && ./app > log'\n" in compound
    for script in (simple, compound):
        assert subprocess.run(["bash", "-n"], input=script.encode(), check=False).returncode == 0
    for bad in (("NOPE", "45"), ("USR1;rm", "45"), ("USR1", "soon"), ("USR1", "0")):
        with pytest.raises(UsageError):
            Checkpoint(str(tmp_path / "ck"), *bad)


def test_checkpoint_task_binds_the_directory_and_a_layer_per_task(tmp_path: Path) -> None:
    env = {"MESOBOX_CHECKPOINT_DIR": str(tmp_path), "SLURM_PROCID": "3"}
    argv = task_setup(["--", "/img", "app"], env)
    assert argv[argv.index(str(tmp_path)) - 1] == "--bind"
    assert argv[argv.index("--overlay") + 1] == str(tmp_path / "layers" / "task-3")
    assert (tmp_path / "layers" / "task-3").is_dir()
    mine = task_setup(["--writable-tmpfs", "--", "/img", "app"], env)  # the user's own writable root wins
    assert "--overlay" not in mine
