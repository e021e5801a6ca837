"""Nesting: an unprivileged `mesobox exec` inside a mesobox container, as the ordinary user.

The inner mesobox is reached by binding the test venv and the host's /usr (its python)
into a busybox outer image; the source copy and the inner image live under /tmp, which
is bound by default.  Covers the combinations that change how /proc is mounted
(bind of the outer's /proc, or a new proc for --pid, which the kernel allows only when
the mounter owns the pid namespace and an unobscured proc is visible, mount_too_revealing)
and a --fakeroot outer (uid 0 inside that is *not* real root: the inner must use the
unprivileged path).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT_DEFAULT_RUNTIME, Mesobox, User, make_busybox_rootfs

pytestmark = pytest.mark.userns


@pytest.fixture(scope="module")
def images(shared_tmp: Path) -> tuple[Path, Path]:
    """(outer image: busybox + merged-/usr links for the host's python, inner image)."""
    outer = make_busybox_rootfs(shared_tmp / "nest-outer")
    for link in ("lib", "lib64"):
        (outer / link).symlink_to(f"usr/{link}")
    inner = make_busybox_rootfs(shared_tmp / "nest-inner")
    for top in (outer, inner):
        for dirpath, dirnames, _files in os.walk(top):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o1777 if name == "tmp" else 0o755)
    return outer, inner


@pytest.mark.parametrize("outer_opts", [[], ["--pid"], ["--fakeroot"]], ids=["outer", "outer-pid", "outer-fakeroot"])
@pytest.mark.parametrize("inner_opts", [[], ["--pid"], ["--fakeroot"]], ids=["inner", "inner-pid", "inner-fakeroot"])
def test_exec_inside_exec(mesobox: Mesobox, user: User, images: tuple[Path, Path], test_python: str,
                          outer_opts: list[str], inner_opts: list[str]) -> None:
    outer, inner = images
    venv = Path(test_python).parents[1]
    inner_cmd = [test_python, "-m", "mesobox", "exec", *inner_opts, str(inner), "sh", "-c",
                 "id -u; cat /proc/self/uid_map | wc -l; echo $$"]
    proc = mesobox("exec", *outer_opts, "-B", str(venv), "-B", "/usr", str(outer), *inner_cmd,
                   as_user=user, timeout=60)
    assert proc.returncode == 0, proc.stderr
    uid, map_lines, pid = proc.stdout.decode().split()
    caller_inside = 0 if "--fakeroot" in outer_opts else user.uid
    assert uid == ("0" if "--fakeroot" in inner_opts else str(caller_inside))
    assert map_lines == "1"  # one id mapped: the inner namespace is a child of the outer one
    if "--pid" in inner_opts:
        assert int(pid) <= 2  # a fresh pid namespace and its own /proc: mesobox's init is 1


def test_inner_failure_is_one_line(mesobox: Mesobox, user: User, images: tuple[Path, Path], test_python: str) -> None:
    outer, inner = images
    venv = Path(test_python).parents[1]
    proc = mesobox("exec", "-B", str(venv), "-B", "/usr", str(outer), test_python, "-m", "mesobox", "exec",
                   str(inner), "no-such-command", as_user=user, timeout=60)
    assert proc.returncode == 127, proc.stderr
    assert proc.stderr.decode().startswith("mesobox: error: no-such-command: command not found")


@pytest.fixture()
def default_runtime_dirs(user: User) -> Iterator[tuple[Path, Path]]:
    """(real root's, the user's) default runtime dirs, each removed after the test if
    the test made it: the next test, or run, must not find them."""
    made = [path for path in (ROOT_DEFAULT_RUNTIME, Path(f"/tmp/mesobox-{user.uid}")) if not path.exists()]
    yield ROOT_DEFAULT_RUNTIME, Path(f"/tmp/mesobox-{user.uid}")
    for path in made:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


@pytest.mark.root
@pytest.mark.default_runtime_dir
def test_fakeroot_inside_never_takes_real_roots_runtime_dir(
        mesobox: Mesobox, user: User, images: tuple[Path, Path], test_python: str,
        default_runtime_dirs: tuple[Path, Path]) -> None:
    """uid 0 of a --fakeroot container is the user outside: it uses the user's own
    /tmp/mesobox-UID, never real root's /tmp/mesobox-0 (which a root run leaves behind,
    and which it could not trust: it shows as unmapped)."""
    outer, inner = images
    root_runtime, _user_runtime = default_runtime_dirs
    assert mesobox("exec", str(inner), "true", env={"XDG_RUNTIME_DIR": ""}).returncode == 0
    assert root_runtime.is_dir() and root_runtime.stat().st_uid == 0
    venv = Path(test_python).parents[1]
    where = "from mesobox import paths; print(paths.default_runtime_dir({}))"
    proc = mesobox("exec", "--fakeroot", "-B", str(venv), "-B", "/usr", str(outer), "sh", "-c",
                   f"{test_python} -c '{where}' && {test_python} -m mesobox exec {inner} id -u",
                   as_user=user, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == [f"/tmp/mesobox-{user.uid}", "0"]



@pytest.mark.root
@pytest.mark.default_runtime_dir
@pytest.mark.parametrize("outer_opts", [[], ["--fakeroot"], ["--pid"]], ids=["outer", "outer-fakeroot", "outer-pid"])
def test_fakeroot_pid_inside_with_a_directory_image(
        mesobox: Mesobox, user: User, images: tuple[Path, Path], test_python: str,
        default_runtime_dirs: tuple[Path, Path], outer_opts: list[str]) -> None:
    """A nested `run --fakeroot --pid` on a directory image, with real root's
    /tmp/mesobox-0 present: uid 0 of a user namespace is not real root, so neither the
    inner launcher nor its container's init ever takes real root's runtime dir."""
    outer, inner = images
    root_runtime, _user_runtime = default_runtime_dirs
    assert mesobox("exec", str(inner), "true", env={"XDG_RUNTIME_DIR": ""}).returncode == 0
    assert root_runtime.is_dir() and root_runtime.stat().st_uid == 0
    venv = Path(test_python).parents[1]
    proc = mesobox("exec", *outer_opts, "-B", str(venv), "-B", "/usr", str(outer), test_python, "-m", "mesobox",
                   "run", "--fakeroot", "--pid", str(inner), "sh", "-c", "id -u; echo $$",
                   as_user=user, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["0", "2"]  # its own root; the child of mesobox's init (pid 1)


@pytest.mark.skipif(not Path("/usr/bin/fuse2fs").exists(), reason="needs fuse2fs")
@pytest.mark.parametrize("outer_opts", [[], ["--fakeroot"]], ids=["outer", "outer-fakeroot"])
@pytest.mark.parametrize("inner_opts", [[], ["--pid"]], ids=["inner", "inner-pid"])
def test_overlay_image_inside(mesobox: Mesobox, user: User, images: tuple[Path, Path], test_python: str,
                              world_tmp: Path, inner_opts: list[str], outer_opts: list[str]) -> None:
    """An ordinary user's --overlay FILE in a nested container: fuse2fs needs no setuid
    helper (it mounts in the inner container's own namespaces), and what the inner
    container writes is in the image for the next run, nested or not."""
    outer, inner = images
    venv = Path(test_python).parents[1]
    ovl = world_tmp / "nested-ovl.img"
    assert mesobox("overlay", "create", str(ovl), "8m", as_user=user).returncode == 0
    inner_tree = world_tmp / "inner-mine"
    subprocess.run(["cp", "-a", str(inner), str(inner_tree)], check=True)
    subprocess.run(["chown", "-hR", f"{user.uid}:{user.gid}", str(inner_tree)], check=True)
    nested = [test_python, "-m", "mesobox", "run", *inner_opts, "--overlay", str(ovl), str(inner_tree)]
    proc = mesobox("exec", *outer_opts, "-B", str(venv), "-B", "/usr", str(outer), *nested, "sh", "-c",
                   "echo in > /nested",
                   as_user=user, timeout=60)
    assert proc.returncode == 0, proc.stderr
    again = mesobox("exec", *outer_opts, "-B", str(venv), "-B", "/usr", str(outer), *nested, "cat", "/nested",
                    as_user=user, timeout=60)
    assert again.returncode == 0 and again.stdout.decode().split() == ["in"], again.stderr
    outside = mesobox("run", "--overlay", str(ovl), str(inner_tree), "cat", "/nested", as_user=user, timeout=60)
    assert outside.returncode == 0 and outside.stdout.decode().split() == ["in"], outside.stderr
