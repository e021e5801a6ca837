"""``mesobox oci`` lifecycle as the ordinary user, without Slurm: run a bundle, see it
running in ``state``, signal it with ``kill``, find it stopped, ``delete`` it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox, User, wait_until

pytestmark = [pytest.mark.userns]


def _state(mesobox: Mesobox, user: User, cid: str, env: dict[str, str]) -> dict[str, object]:
    result = mesobox("oci", "state", cid, as_user=user, env=env)
    assert result.returncode == 0, result.stderr.decode()
    state: dict[str, object] = json.loads(result.stdout)
    return state


def test_oci_run_state_kill_delete(
    busybox_rootfs: Path, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    env = {"MESOBOX_RUNTIME_DIR": str(world_tmp / "run")}
    bundle = world_tmp / "bundle"
    made = mesobox("bundle", str(busybox_rootfs), str(bundle), as_user=user)
    assert made.returncode == 0, made.stderr.decode()
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["args"] = ["/bin/sh", "-c", "trap 'echo got-TERM; exit 7' TERM; echo up; "
                                 "while true; do sleep 0.1; done"]
    (bundle / "config.json").write_text(json.dumps(config))
    full_env = {**mesobox.base_env(), **env, "MESOBOX_STORE": str(world_tmp / "store")}
    argv = [mesobox.python, "-m", "mesobox", "oci", "run", "--bundle", str(bundle), "c1"]
    cmd = ["runuser", "-u", user.name, "--", "env", "-i", *(f"{k}={v}" for k, v in {**user.env(), **full_env}.items())]
    proc = subprocess.Popen([*cmd, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=world_tmp)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        state = _state(mesobox, user, "c1", env)
        assert state["status"] == "running" and state["id"] == "c1" and state["bundle"] == str(bundle)
        busy = mesobox("oci", "delete", "c1", as_user=user, env=env)
        assert busy.returncode == 125 and b"is running" in busy.stderr
        assert mesobox("oci", "kill", "c1", "TERM", as_user=user, env=env).returncode == 0
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 7, err.decode()
        assert out == b"got-TERM\n"
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_until(lambda: _state(mesobox, user, "c1", env)["status"] == "stopped", "the container is stopped")
    assert mesobox("oci", "delete", "c1", as_user=user, env=env).returncode == 0
    gone = mesobox("oci", "state", "c1", as_user=user, env=env)
    assert gone.returncode == 2 and b"does not exist" in gone.stderr


@pytest.mark.parametrize("argv", [["state", "c9"], ["kill", "c9", "SIGTERM"], ["delete", "--force", "c9"]])
def test_a_query_never_makes_the_runtime_dir(mesobox: Mesobox, world_tmp: Path, argv: list[str]) -> None:
    """slurmstepd runs oci.conf's query, kill and delete as root too, with a clean
    environment: where no container was made, they answer without creating a runtime
    dir (root's would be /tmp/mesobox-0)."""
    runtime = world_tmp / "never-made"
    proc = mesobox("oci", *argv, env={"MESOBOX_RUNTIME_DIR": str(runtime)})
    assert proc.returncode != 0 and b"does not exist" in proc.stderr, proc.stderr
    assert not runtime.exists()
