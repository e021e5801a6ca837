"""Root isolation and capabilities, end to end through `mesobox exec`.

- Real root's container root is a sub-id range by default: a root-owned host file
  bound read-write cannot be written; ``--host-root`` opts out, with a warning.
- Capabilities: Docker's default bounding set for uid 0 inside, none for other uids;
  ``--cap-drop CHOWN`` makes chown fail under --fakeroot (a sub-id range is mapped,
  so chown to uid 1 is a real, capability-checked change).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox, User, open_busybox_rootfs

pytestmark = pytest.mark.userns

DOCKER_DEFAULT_MASK = 0xA80425FB  # CHOWN … AUDIT_WRITE, Docker's documented CapEff of a root container


@pytest.fixture(scope="module")
def rootfs(shared_tmp: Path) -> Path:
    return open_busybox_rootfs(shared_tmp / "isolation-root-rootfs")


def _status(text: str) -> dict[str, int]:
    return {k: int(v, 16) for k, v in (line.split(":\t") for line in text.splitlines() if line.startswith("Cap"))}


@pytest.fixture()
def host_file(world_tmp: Path) -> Path:
    path = world_tmp / "owned-by-root"
    path.write_text("original\n")
    os.chown(path, 0, 0)
    os.chmod(path, 0o644)
    return path


@pytest.mark.root
def test_root_container_cannot_write_root_owned_bind(mesobox: Mesobox, rootfs: Path, host_file: Path) -> None:
    script = "cat /x; id -u; cat /proc/self/uid_map; echo broken >> /x"
    proc = mesobox("exec", "-B", f"{host_file}:/x:rw", str(rootfs), "sh", "-c", script)
    out = proc.stdout.decode().split()
    assert proc.returncode != 0 and b"Permission denied" in proc.stderr, proc.stderr
    from mesobox.launch import identity

    # image files stay readable; root is shifted to a slice of root's pool
    assert out[:3] == ["original", "0", "0"]
    assert int(out[3]) in {uid for uid, _gid in identity.root_pool()} and out[4] == str(identity.SLICE)
    assert host_file.read_text() == "original\n"
    assert b"WARNING" not in proc.stderr


@pytest.mark.root
def test_host_root_opts_out_loudly(mesobox: Mesobox, rootfs: Path, host_file: Path) -> None:
    proc = mesobox("exec", "--host-root", "-B", f"{host_file}:/x:rw", str(rootfs), "sh", "-c", "echo more >> /x")
    assert proc.returncode == 0, proc.stderr
    assert host_file.read_text() == "original\nmore\n"
    assert proc.stderr.startswith(b"mesobox: WARNING: --host-root")


@pytest.mark.root
def test_shifted_root_files_land_in_the_range(mesobox: Mesobox, rootfs: Path, world_tmp: Path) -> None:
    proc = mesobox("exec", "-B", str(world_tmp), str(rootfs), "sh", "-c",
                   f"touch {world_tmp}/made; cat /proc/self/uid_map /proc/self/gid_map")
    assert proc.returncode == 0, proc.stderr
    _, uid_start, _, _, gid_start, _ = proc.stdout.decode().split()
    st = os.stat(world_tmp / "made")
    assert (st.st_uid, st.st_gid) == (int(uid_start), int(gid_start))


def test_host_root_refused_for_a_user(mesobox: Mesobox, user: User, rootfs: Path) -> None:
    proc = mesobox("exec", "--host-root", str(rootfs), "true", as_user=user)
    assert proc.returncode != 0
    assert proc.stderr.decode().startswith("mesobox: error: --host-root is only for the real root user")


@pytest.mark.parametrize(("opts", "want"), [
    (["--fakeroot"], DOCKER_DEFAULT_MASK),
    ([], 0),
    (["--fakeroot", "--cap-drop", "ALL", "--cap-add", "CAP_SYS_ADMIN"], 1 << 21),
    (["--fakeroot", "--cap-add", "sys_ptrace", "--cap-drop", "NET_RAW"], (DOCKER_DEFAULT_MASK | 1 << 19) & ~(1 << 13)),
], ids=["fakeroot-default", "user-none", "only-sys-admin", "add-and-drop"])
def test_capability_sets_inside(mesobox: Mesobox, user: User, rootfs: Path, opts: list[str], want: int) -> None:
    proc = mesobox("exec", *opts, str(rootfs), "cat", "/proc/self/status", as_user=user)
    assert proc.returncode == 0, proc.stderr
    caps = _status(proc.stdout.decode())
    assert caps["CapBnd"] == want
    assert caps["CapEff"] == want and caps["CapPrm"] == want
    assert caps["CapAmb"] == 0 and caps["CapInh"] == 0


def test_cap_drop_chown_makes_chown_fail(mesobox: Mesobox, user: User, rootfs: Path, world_tmp: Path) -> None:
    script = f"touch {world_tmp}/$1 && chown 1:1 {world_tmp}/$1"
    ok = mesobox("exec", "--fakeroot", "-B", str(world_tmp), str(rootfs), "sh", "-c", script, "sh", "a",
                 as_user=user)
    assert ok.returncode == 0, ok.stderr
    assert os.stat(world_tmp / "a").st_uid != user.uid  # the chown really happened (sub-id 1)
    denied = mesobox("exec", "--fakeroot", "--cap-drop", "CHOWN", "-B", str(world_tmp), str(rootfs),
                     "sh", "-c", script, "sh", "b", as_user=user)
    assert denied.returncode != 0 and b"Operation not permitted" in denied.stderr, denied.stderr
    assert os.stat(world_tmp / "b").st_uid == user.uid


def test_cap_add_needs_root_inside(mesobox: Mesobox, user: User, rootfs: Path) -> None:
    proc = mesobox("exec", "--cap-add", "CHOWN", str(rootfs), "true", as_user=user)
    assert proc.returncode == 2
    assert proc.stderr.decode().splitlines()[0] == (
        "mesobox: error: --cap-add needs uid 0 inside: a non-root uid loses its capabilities at execve")


def test_unknown_capability_is_a_usage_error(mesobox: Mesobox, user: User, rootfs: Path) -> None:
    proc = mesobox("exec", "--fakeroot", "--cap-drop", "FLY", str(rootfs), "true", as_user=user)
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert proc.stderr.decode().startswith("mesobox: error: unknown capability 'FLY'")


# --- disk quota for persistent overlays: `mesobox overlay create` + `--overlay FILE` -----------


def _loops_backing(path: Path) -> str:
    return subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True, check=False).stdout


@pytest.mark.root
def test_overlay_image_quota_persists_and_spares_the_host(mesobox: Mesobox, rootfs: Path, world_tmp: Path) -> None:
    image = world_tmp / "overlay.img"
    made = mesobox("overlay", "create", str(image), "8m")
    assert made.returncode == 0, made.stderr
    assert image.stat().st_size == 8 * 1024 * 1024
    fill = mesobox("exec", "--overlay", str(image), str(rootfs), "sh", "-c",
                   "echo kept > /kept; dd if=/dev/zero of=/big bs=1M count=20")
    assert fill.returncode != 0 and b"No space left on device" in fill.stderr, fill.stderr
    assert image.stat().st_size == 8 * 1024 * 1024  # the host file never grows past SIZE
    again = mesobox("exec", "--overlay", str(image), str(rootfs), "sh", "-c", "cat /kept; rm /big; ls /")
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[0] == b"kept" and b"big" not in again.stdout.split()[1:]
    assert not (rootfs / "kept").exists() and not (rootfs / "big").exists()  # the image is untouched
    assert _loops_backing(image) == ""  # the loop device went with the mount namespace


def test_overlay_image_as_user(mesobox: Mesobox, user: User, rootfs: Path, world_tmp: Path) -> None:
    image = world_tmp / "user-overlay.img"
    made = mesobox("overlay", "create", str(image), "4m", as_user=user)
    assert made.returncode == 0, made.stderr
    st = image.stat()
    assert (st.st_uid, st.st_size) == (user.uid, 4 * 1024 * 1024) and st.st_blocks * 512 < st.st_size  # sparse
    again = mesobox("overlay", "create", str(image), "4m", as_user=user)
    assert again.returncode == 2 and again.stderr.decode().startswith(f"mesobox: error: {image} already exists")
    # an ordinary user's own image is served by fuse2fs (tests/test_overlay_user.py)
    proc = mesobox("exec", "--overlay", str(image), str(rootfs), "true", as_user=user)
    assert proc.returncode == 0, proc.stderr


# --- pure: the capability sets the spec records ----------------------------------------------


def test_resolve_follows_docker_rules() -> None:
    from mesobox.isolation.caps import DEFAULT, resolve

    assert resolve(True, (), ())["bounding"] == tuple(f"CAP_{n}" for n in caps_in_kernel_order(DEFAULT))
    assert resolve(False, (), ())["bounding"] == ()
    from mesobox.launch.specbuild import NO_CAPABILITIES  # build's shortcut for a plain user

    assert resolve(False, (), ()) == NO_CAPABILITIES
    assert resolve(True, ("cap_sys_admin",), ("ALL",))["bounding"] == ("CAP_SYS_ADMIN",)
    assert "CAP_CHOWN" not in resolve(True, ("CHOWN",), ("CHOWN",))["effective"]
    assert len(resolve(True, ("ALL",), ())["permitted"]) == 41


def caps_in_kernel_order(names: tuple[str, ...]) -> list[str]:
    from mesobox.isolation.caps import NAMES

    return [n for n in NAMES if n in names]
