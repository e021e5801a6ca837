"""Stored images: Entrypoint/Cmd/Env/WorkingDir/User behave as `podman run` does for
the same OCI image (podman as root with runc is the reference), and the environment
rules of docs/running.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_busybox_rootfs, make_oci_image
from run_support import podman

ENTRY = 'echo "args=$*"; pwd; echo FOO=$FOO; id -u; id -g'
PODMAN_RUN = ["run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
CASES = [
    ([], []),  # Entrypoint + Cmd
    ([], ["x", "y"]),  # ARGS replace Cmd, Entrypoint kept
    (["--entrypoint", "/bin/pwd"], []),  # --entrypoint drops the image Cmd too
    (["-e", "FOO=baz", "-w", "/tmp"], []),  # -e beats image Env, -w beats WorkingDir
]


def _layer(rootfs: Path) -> None:
    make_busybox_rootfs(rootfs)
    (rootfs / "srv").mkdir(exist_ok=True)
    with open(rootfs / "etc" / "passwd", "a") as f:
        f.write("app:x:1234:1234::/srv:/bin/sh\n")
    with open(rootfs / "etc" / "group", "a") as f:
        f.write("app:x:1234:\n")


@pytest.fixture(scope="module")
def layout(shared_tmp: Path) -> Path:
    path = shared_tmp / "run-oci"
    make_oci_image(path, "v1", [_layer], [
        "--config.entrypoint=/bin/sh", "--config.entrypoint=-c", f"--config.entrypoint={ENTRY}",
        "--config.entrypoint=ep", "--config.cmd=c1", "--config.cmd=c2", "--config.env=FOO=bar",
        "--config.env=PATH=/usr/bin:/bin", "--config.workingdir=/srv", "--config.user=app"])
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chmod(os.path.join(dirpath, name), 0o755 if name in dirnames else 0o644)
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def podman_outputs(layout: Path, shared_tmp: Path) -> list[bytes]:
    root = shared_tmp / "podman"
    pulled = podman(root, "pull", "-q", f"oci:{layout}:v1")
    assert pulled.returncode == 0, pulled.stderr
    image = pulled.stdout.decode().split()[-1]
    outs = []
    for opts, args in CASES:
        proc = podman(root, *PODMAN_RUN, *opts, image, *args)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    return outs


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("who", ["root", "user"])
def test_image_config_like_podman(
    mesobox: Mesobox, user: User, layout: Path, podman_outputs: list[bytes], who: str
) -> None:
    """As root the image User is honoured directly; as a user under --fakeroot with a
    sub-id range (the user fixture has one), through newuidmap."""
    caller = user if who == "user" else None
    ref = f"oci:{layout}:v1"
    pulled = mesobox("pull", "-q", "--format", "dir", ref, as_user=caller)
    assert pulled.returncode == 0, pulled.stderr
    extra = ["--fakeroot"] if caller else []
    for (opts, args), want in zip(CASES, podman_outputs, strict=True):
        proc = mesobox("run", "--contain", *extra, *opts, ref, *args, as_user=caller)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == want, (opts, args, proc.stdout, want)


@pytest.mark.root
def test_user_without_fakeroot_keeps_own_ids(mesobox: Mesobox, user: User, layout: Path) -> None:
    ref = f"oci:{layout}:v1"
    assert mesobox("pull", "-q", ref, as_user=user).returncode == 0  # default format: squashfs
    proc = mesobox("run", ref, as_user=user)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "args=c1 c2" and lines[2] == "FOO=bar"
    assert lines[1] == str(user.home)  # the current directory is bound, so it wins over WorkingDir
    assert lines[3:] == [str(user.uid), str(user.gid)]


def test_environment_rules(mesobox: Mesobox, user: User, layout: Path, world_tmp: Path) -> None:
    ref = f"oci:{layout}:v1"
    assert mesobox("pull", "-q", "--format", "dir", ref, as_user=user).returncode == 0
    env_file = world_tmp / "env"
    env_file.write_text("# comment\nFROM_FILE=1\nFOO=file\n\n")
    show = 'echo "$HOSTVAR|$FOO|$FROM_FILE|$PATH|$HOME"'
    host = {"HOSTVAR": "h", "FOO": "host", "PATH": "/host/bin:/usr/bin:/bin"}
    proc = mesobox("run", "--entrypoint", "/bin/sh", ref, "-c", show, as_user=user, env=host)
    assert proc.stdout.decode().strip() == f"h|bar||/usr/bin:/bin|{user.home}", proc.stderr
    proc = mesobox("run", "--cleanenv", "--env-file", str(env_file), "-e", "FROM_FILE=2",
                   "--entrypoint", "/bin/sh", ref, "-c", show, as_user=user, env=host)
    assert proc.stdout.decode().strip() == f"|file|2|/usr/bin:/bin|{user.home}", proc.stderr
