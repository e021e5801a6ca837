"""The image's owners in a squashfs image, as an ordinary user runs it.

An ordinary user's squashfs stores the image's own owners (root, service users), as
root's does (test_reproducible.py).  These tests run such an image the ways a user
does: as themselves (the image's root is nobody to them, so a writable layer goes
through fuse-overlayfs showing the files as theirs), with --fakeroot (the image is
mounted in the container's user namespace: its owners are exactly the image's, and a
workload that switches to a service user can read it), and inside another container.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_busybox_rootfs, make_oci_image

pytestmark = pytest.mark.userns

APP_UID = 1000


def _service_image(rootfs: Path) -> None:
    """busybox, a service user with a private home, a root-only directory, www-data's files."""
    make_busybox_rootfs(rootfs)
    with open(rootfs / "etc" / "passwd", "a") as f:
        f.write(f"appuser:x:{APP_UID}:{APP_UID}::/home/appuser:/bin/sh\nwww-data:x:33:33::/srv:/bin/false\n")
    with open(rootfs / "etc" / "group", "a") as f:
        f.write(f"appuser:x:{APP_UID}:\nwww-data:x:33:\n")
    home = rootfs / "home" / "appuser"
    home.mkdir(parents=True)
    (home / "note").write_text("mine\n")
    os.chmod(home / "note", 0o600)
    os.chmod(home, 0o700)
    os.chown(home / "note", APP_UID, APP_UID)
    os.chown(home, APP_UID, APP_UID)
    (rootfs / "root" / "secret").write_text("root only\n")
    os.chmod(rootfs / "root" / "secret", 0o600)
    os.chmod(rootfs / "root", 0o700)
    (rootfs / "srv").mkdir()
    (rootfs / "srv" / "index.html").write_text("<p>served</p>\n")
    os.chown(rootfs / "srv" / "index.html", 33, 33)


@pytest.fixture(scope="module")
def layout(shared_tmp: Path) -> Path:
    top = shared_tmp / "owners-layout"
    make_oci_image(top, "plain", [_service_image])
    make_oci_image(top, "app", [_service_image], config=[f"--config.user={APP_UID}:{APP_UID}"])
    subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
    return top


def _pulled(mesobox: Mesobox, user: User, ref: str) -> str:
    proc = mesobox("pull", "-q", "--format", "squashfs", ref, as_user=user)
    assert proc.returncode == 0, proc.stderr
    return ref


def _private_daemons(user: User) -> list[str]:
    """FUSE daemons of the user's that mesobox forks inside containers (fusemount.py)."""
    proc = subprocess.run(["pgrep", "-a", "-u", str(user.uid), "-f", "squashfuse_ll -f|fuse-overlayfs -f"],
                          capture_output=True, text=True, check=False)
    return proc.stdout.splitlines()


def test_fakeroot_workload_switching_to_a_service_user_reads_its_image(
        mesobox: Mesobox, user: User, layout: Path) -> None:
    """An image with USER appuser under --fakeroot: appuser is a sub-id, which the
    node's shared FUSE mount refused (exit 126); the container's own mount admits it."""
    ref = _pulled(mesobox, user, f"oci:{layout}:app")
    proc = mesobox("run", "--fakeroot", ref, "sh", "-c", "id -u; cat /home/appuser/note; cat /root/secret",
                   as_user=user)
    lines = proc.stdout.decode().splitlines()
    assert lines[:2] == [str(APP_UID), "mine"], proc.stderr
    assert proc.returncode != 0 and b"Permission denied" in proc.stderr  # appuser is not root: modes hold
    assert _private_daemons(user) == []  # the container's squashfuse went with it


def test_fakeroot_root_drops_to_nobody_with_start_stop_daemon(mesobox: Mesobox, user: User, layout: Path) -> None:
    ref = _pulled(mesobox, user, f"oci:{layout}:plain")
    script = ("start-stop-daemon -S -u nobody -c nobody -x /bin/sh -- -c 'id -u; cat /srv/index.html' ; "
              "ls -ln /home /srv | awk '$9 {print $3, $4, $9}'")
    proc = mesobox("run", "--fakeroot", ref, "sh", "-c", script, as_user=user)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[:2] == ["65534", "<p>served</p>"]
    assert f"{APP_UID} {APP_UID} appuser" in lines and "33 33 index.html" in lines  # the image's owners


def test_fakeroot_writable_root_keeps_the_image_owners(mesobox: Mesobox, user: User, layout: Path) -> None:
    """With sub-ids the kernel overlay copies files up with their owners, and root may
    chown to a service user, as apt-get does with _apt."""
    ref = _pulled(mesobox, user, f"oci:{layout}:plain")
    script = ("echo more >> /home/appuser/note && mkdir /srv/new && chown 33:33 /srv/new && "
              "stat -c '%u %g %n' /home/appuser/note /srv/new")
    proc = mesobox("run", "--fakeroot", "--writable-tmpfs", ref, "sh", "-c", script, as_user=user)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == [f"{APP_UID} {APP_UID} /home/appuser/note", "33 33 /srv/new"]
    assert _private_daemons(user) == []


def test_user_sees_foreign_owners_and_writes_through_a_writable_layer(
        mesobox: Mesobox, user: User, layout: Path) -> None:
    """Without --fakeroot the image's root is nobody to the user (as in Apptainer and
    Charliecloud); a writable layer still takes writes anywhere, owned by the user."""
    ref = _pulled(mesobox, user, f"oci:{layout}:plain")
    proc = mesobox("run", ref, "stat", "-c", "%u", "/bin/busybox", "/home/appuser", as_user=user)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["65534", "65534"]
    script = ("echo extra >> /home/appuser/note && echo new > /root/made && echo x >> /srv/index.html && "
              "stat -c '%u %n' /home/appuser/note /root/made /srv/index.html /bin/busybox && tail -n1 "
              "/home/appuser/note")
    proc = mesobox("run", "--writable-tmpfs", ref, "sh", "-c", script, as_user=user)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines() == [f"{user.uid} /home/appuser/note", f"{user.uid} /root/made",
                                                 f"{user.uid} /srv/index.html", f"{user.uid} /bin/busybox",
                                                 "extra"]
    assert _private_daemons(user) == []


def test_persistent_overlay_dir_over_a_squashfs(mesobox: Mesobox, user: User, layout: Path,
                                               world_tmp: Path) -> None:
    ref = _pulled(mesobox, user, f"oci:{layout}:plain")
    keep = world_tmp / "keep"
    keep.mkdir()
    os.chown(keep, user.uid, user.gid)
    first = mesobox("run", "--overlay", str(keep), ref, "sh", "-c", "echo kept > /srv/kept && echo too > /etc/kept",
                    as_user=user)
    assert first.returncode == 0, first.stderr
    again = mesobox("run", "--overlay", str(keep), ref, "cat", "/srv/kept", "/etc/kept", as_user=user)
    # /etc lacks the /etc/hosts mount point: it is made in the overlay, not in a
    # throw-away tmpfs skeleton that would lose what is written beside it
    assert again.returncode == 0 and again.stdout == b"kept\ntoo\n", again.stderr


def test_squashfs_image_inside_a_container(mesobox: Mesobox, user: User, layout: Path, test_python: str,
                                           world_tmp: Path) -> None:
    """mesobox in mesobox with the default squashfs format: the inner launch cannot use
    fusermount3 (no setuid in a user namespace), so it mounts the image in namespaces of
    its own; /dev/fuse is in every container where the caller may use it."""
    outer = make_busybox_rootfs(world_tmp / "outer")
    for link in ("lib", "lib64"):
        (outer / link).symlink_to(f"usr/{link}")
    subprocess.run(["chmod", "-R", "a+rX", str(outer)], check=True)
    image = world_tmp / "inner.sqfs"
    inner_tree = make_busybox_rootfs(world_tmp / "inner")
    (inner_tree / "etc" / "inner-marker").write_text("inner\n")
    subprocess.run(["mksquashfs", str(inner_tree), str(image), "-quiet", "-no-progress", "-all-root"], check=True)
    os.chmod(image, 0o644)
    venv = Path(test_python).parents[1]
    for opts in ([], ["--fakeroot"], ["--writable-tmpfs"], ["--pid"]):
        inner = [test_python, "-m", "mesobox", "exec", *opts, str(image), "sh", "-c",
                 "cat /etc/inner-marker; id -u; (echo w > /etc/w) 2>/dev/null && echo wrote; true"]
        proc = mesobox("exec", "-B", str(venv), "-B", "/usr", str(outer), *inner, as_user=user, timeout=60)
        assert proc.returncode == 0, (opts, proc.stderr)
        lines = proc.stdout.decode().splitlines()
        assert lines[:2] == ["inner", "0" if "--fakeroot" in opts else str(user.uid)], (opts, lines)
        assert ("wrote" in lines) == ("--writable-tmpfs" in opts), (opts, lines)
    outer_image = world_tmp / "outer.sqfs"
    subprocess.run(["mksquashfs", str(outer), str(outer_image), "-quiet", "-no-progress", "-all-root"], check=True)
    os.chmod(outer_image, 0o644)
    for opts in ([], ["--fakeroot"]):  # a squashfs outer image too
        inner = [test_python, "-m", "mesobox", "exec", str(image), "cat", "/etc/inner-marker"]
        proc = mesobox("exec", *opts, "-B", str(venv), "-B", "/usr", str(outer_image), *inner,
                       as_user=user, timeout=60)
        assert proc.returncode == 0 and proc.stdout == b"inner\n", (opts, proc.stderr)
    assert _private_daemons(user) == []


def test_fakeroot_service_user_with_the_store_behind_a_private_directory(
        mesobox: Mesobox, user: User, layout: Path, world_tmp: Path) -> None:
    """The container's squashfuse serves a workload that switched to a sub-id, and reads
    the image through a descriptor: a store in a 0700 directory (a private home) works."""
    private = world_tmp / "private"
    private.mkdir(mode=0o700)
    os.chown(private, user.uid, user.gid)
    env = {"MESOBOX_STORE": str(private / "store")}
    ref = f"oci:{layout}:app"
    assert mesobox("pull", "-q", ref, as_user=user, env=env).returncode == 0
    proc = mesobox("run", "--fakeroot", ref, "sh", "-c", "id -u; cat /home/appuser/note", as_user=user, env=env)
    assert proc.returncode == 0 and proc.stdout.decode().split() == [str(APP_UID), "mine"], proc.stderr
    assert _private_daemons(user) == []


def test_fakeroot_user_switch_on_a_file_only_the_caller_may_read_is_one_line(
        mesobox: Mesobox, user: User, world_tmp: Path) -> None:
    tree = make_busybox_rootfs(world_tmp / "tree")
    image = world_tmp / "mine.sqfs"
    subprocess.run(["mksquashfs", str(tree), str(image), "-quiet", "-no-progress", "-all-root"], check=True)
    os.chown(image, user.uid, user.gid)
    os.chmod(image, 0o600)
    proc = mesobox("run", "--fakeroot", "-u", "65534", str(image), "id", "-u", as_user=user)
    assert proc.returncode != 0 and b"chmod o+r" in proc.stderr, proc.stderr
    assert len(proc.stderr.decode().splitlines()) <= 2 and b"Traceback" not in proc.stderr
    os.chmod(image, 0o644)
    proc = mesobox("run", "--fakeroot", "-u", "65534", str(image), "id", "-u", as_user=user)
    assert proc.returncode == 0 and proc.stdout == b"65534\n", proc.stderr
    assert _private_daemons(user) == []
