"""A persistent, size-capped overlay image for an ordinary user (launch/fuseoverlay.py).

`mesobox overlay create FILE SIZE` makes an ext4 image; an ordinary user's
`mesobox run --overlay FILE` serves it with fuse2fs inside the container's own
namespaces, under fuse-overlayfs.  Real tools throughout: mke2fs, fuse2fs,
fuse-overlayfs, e2fsck, mksquashfs, and /dev/fuse (the `user` fixture makes it 0666).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_busybox_rootfs, wait_until

pytestmark = [pytest.mark.userns,
              pytest.mark.skipif(shutil.which("fuse2fs") is None, reason="needs fuse2fs (apt-get install fuse2fs)")]

SIZE = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def images(shared_tmp: Path, user: User) -> tuple[Path, Path]:
    """(a directory image the user owns, as their flattened images are; the same tree as
    a squashfs file with root's owners, as `mesobox pull` stores it)."""
    tree = make_busybox_rootfs(shared_tmp / "ovl-user-tree")
    subprocess.run(["chown", "-hR", f"{user.uid}:{user.gid}", str(tree)], check=True)
    sqfs = shared_tmp / "ovl-user.sqfs"
    subprocess.run(["mksquashfs", str(tree), str(sqfs), "-quiet", "-no-progress", "-all-root"], check=True)
    return tree, sqfs


def _create(mesobox: Mesobox, user: User, path: Path) -> None:
    proc = mesobox("overlay", "create", str(path), "8m", as_user=user)
    assert proc.returncode == 0, proc.stderr
    assert path.stat().st_uid == user.uid and path.stat().st_size == SIZE


def _fsck_clean(path: Path) -> None:
    """The image is a consistent ext4 file system, marked clean."""
    proc = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = subprocess.run(["dumpe2fs", "-h", str(path)], capture_output=True, text=True, check=False).stdout
    assert any(line.split(":")[0] == "Filesystem state" and line.split()[-1] == "clean" for line in state.splitlines())


def _lock_free(path: Path) -> bool:
    """Nobody (no fuse2fs daemon) holds the image's one-writer lock."""
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def _no_daemon_of(user: User) -> bool:
    """No fuse2fs or fuse-overlayfs process of ``user`` is alive (zombies excepted)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        uid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))
        state = next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))
        if uid == user.uid and comm in ("fuse2fs", "fuse-overlayfs") and state != "Z":
            return False
    return True


@pytest.mark.parametrize("kind", ["dir", "squashfs"])
@pytest.mark.parametrize("opts", [[], ["--pid"]], ids=["plain", "pid"])
def test_writes_persist_across_runs(mesobox: Mesobox, user: User, images: tuple[Path, Path], world_tmp: Path,
                                    kind: str, opts: list[str]) -> None:
    image = images[0] if kind == "dir" else images[1]
    ovl = world_tmp / "ovl.img"
    _create(mesobox, user, ovl)
    first = mesobox("run", *opts, "--overlay", str(ovl), str(image), "sh", "-c",
                    "echo kept > /kept && mkdir -p /etc/mine && echo a > /etc/mine/a && rm /bin/true && id -u",
                    as_user=user, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout.decode().split() == [str(user.uid)]
    second = mesobox("run", *opts, "--overlay", str(ovl), str(image), "sh", "-c",
                     "cat /kept /etc/mine/a; test -e /bin/true || echo deleted", as_user=user, timeout=60)
    assert second.returncode == 0, second.stderr
    assert second.stdout.decode().split() == ["kept", "a", "deleted"]
    # The image itself is untouched; the daemons are gone and the file system is clean.
    assert not (images[0] / "kept").exists()
    wait_until(lambda: _no_daemon_of(user) and _lock_free(ovl), "the FUSE daemons to exit")
    _fsck_clean(ovl)


def test_the_image_size_caps_writes(mesobox: Mesobox, user: User, images: tuple[Path, Path],
                                    world_tmp: Path) -> None:
    ovl = world_tmp / "ovl.img"
    _create(mesobox, user, ovl)
    proc = mesobox("run", "--overlay", str(ovl), str(images[0]), "sh", "-c",
                   "dd if=/dev/zero of=/big bs=1M count=32 2>&1; echo dd=$?", as_user=user, timeout=120)
    out = proc.stdout.decode()
    assert "No space left on device" in out and "dd=1" in out, out + proc.stderr.decode()
    assert ovl.stat().st_size == SIZE  # the file never grows past its size
    wait_until(lambda: _lock_free(ovl), "the fuse2fs daemon to exit")
    _fsck_clean(ovl)
    # What fitted is kept, and removing it frees the space for the next run.
    again = mesobox("run", "--overlay", str(ovl), str(images[0]), "sh", "-c",
                    "test -s /big && rm /big && dd if=/dev/zero of=/small bs=1M count=2 2>/dev/null && echo ok",
                    as_user=user, timeout=60)
    assert again.returncode == 0 and again.stdout.decode().split() == ["ok"], again.stderr


def test_a_second_writer_is_refused(mesobox: Mesobox, user: User, images: tuple[Path, Path],
                                    world_tmp: Path) -> None:
    ovl = world_tmp / "ovl.img"
    _create(mesobox, user, ovl)
    ready = world_tmp / "ready"
    first = subprocess.Popen(
        ["runuser", "-u", user.name, "--", "env", *(f"{k}={v}" for k, v in _env(mesobox, user).items()),
         mesobox.python, "-m", "mesobox", "run", "-B", str(world_tmp), "--overlay", str(ovl), str(images[0]),
         "sh", "-c", f"touch {ready}; sleep 60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(ready.exists, "the first container to start")
        second = mesobox("run", "--overlay", str(ovl), str(images[0]), "true", as_user=user, timeout=60)
        assert second.returncode == 125
        lines = second.stderr.decode().splitlines()
        assert lines[0] == f"mesobox: error: overlay image {ovl} is in use: another container has it mounted " \
                           "read-write", lines
        assert len(lines) <= 2 and all(line.startswith("mesobox: ") for line in lines)
    finally:
        first.kill()
        first.wait()
    # Once the first is gone, its daemon writes the image back and lets go.
    wait_until(lambda: _lock_free(ovl), "the first container's fuse2fs to exit")
    third = mesobox("run", "--overlay", str(ovl), str(images[0]), "true", as_user=user, timeout=60)
    assert third.returncode == 0, third.stderr


def _env(mesobox: Mesobox, user: User) -> dict[str, str]:
    env = mesobox.base_env()
    env.update(mesobox.runtime_env(user))
    env["MESOBOX_STORE"] = str(mesobox.store_root / user.name)
    return env


@pytest.mark.parametrize("opts", [[], ["--pid"]], ids=["plain", "pid"])
def test_sigkilled_launcher_leaves_a_usable_image(mesobox: Mesobox, user: User, images: tuple[Path, Path],
                                                  world_tmp: Path, opts: list[str]) -> None:
    """SIGKILL the launcher mid-write: no daemon, lock or mount outlives it, and the next
    run finds the image consistent (repaired by e2fsck -p where fuse2fs was killed too:
    the end of a pid namespace SIGKILLs everything in it)."""
    ovl = world_tmp / "ovl.img"
    _create(mesobox, user, ovl)
    ready = world_tmp / "ready"
    launcher = subprocess.Popen(
        ["runuser", "-u", user.name, "--", "env", *(f"{k}={v}" for k, v in _env(mesobox, user).items()),
         mesobox.python, "-m", "mesobox", "run", *opts, "-B", str(world_tmp), "--overlay", str(ovl),
         str(images[0]), "sh", "-c", f"echo before > /before; echo x >> /log; touch {ready}; "
                                     "while :; do echo x >> /log; mkdir -p /d/$$; done"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(ready.exists, "the container to start")
    os.killpg(launcher.pid, signal.SIGKILL)  # runuser and the launcher
    launcher.wait()
    wait_until(lambda: _no_daemon_of(user) and _lock_free(ovl), "the FUSE daemons to exit")
    with open("/proc/self/mountinfo") as f:
        assert str(world_tmp) not in f.read()  # nothing was ever mounted on the host
    after = mesobox("run", "--overlay", str(ovl), str(images[0]), "sh", "-c", "cat /before; test -s /log && echo log",
                    as_user=user, timeout=60)
    assert after.returncode == 0, after.stderr
    assert after.stdout.decode().split() == ["before", "log"]
    wait_until(lambda: _lock_free(ovl), "the fuse2fs daemon to exit")
    _fsck_clean(ovl)


def test_an_unclean_image_is_repaired_before_use(mesobox: Mesobox, user: User, images: tuple[Path, Path],
                                                 world_tmp: Path) -> None:
    """An image marked not clean (its fuse2fs was killed) is checked with e2fsck -p
    before it is mounted again, and comes out clean."""
    ovl = world_tmp / "ovl.img"
    _create(mesobox, user, ovl)
    # s_state 0 (EXT2_VALID_FS cleared), as a killed fuse2fs leaves it; debugfs keeps the checksums right.
    subprocess.run(["debugfs", "-w", "-R", "ssv state 0", str(ovl)], check=True, capture_output=True)
    subprocess.run(["debugfs", "-w", "-R", "ssv lastcheck 20000101", str(ovl)], check=True, capture_output=True)
    assert "not clean" in subprocess.run(["dumpe2fs", "-h", str(ovl)], capture_output=True, text=True).stdout
    proc = mesobox("run", "--overlay", str(ovl), str(images[0]), "sh", "-c", "echo ok > /ok && cat /ok",
                   as_user=user, timeout=60)
    assert proc.returncode == 0 and proc.stdout.decode().split() == ["ok"], proc.stderr
    wait_until(lambda: _lock_free(ovl), "the fuse2fs daemon to exit")
    _fsck_clean(ovl)
    header = subprocess.run(["dumpe2fs", "-h", str(ovl)], capture_output=True, text=True).stdout
    assert "2000" not in next(line for line in header.splitlines() if line.startswith("Last checked:"))  # e2fsck ran


def test_another_users_image_or_a_symlink_is_refused(mesobox: Mesobox, user: User, attacker: User,
                                                     images: tuple[Path, Path], world_tmp: Path) -> None:
    theirs = world_tmp / "theirs.img"
    _create(mesobox, attacker, theirs)
    os.chmod(theirs, 0o666)  # even one the victim could write: its owner could change it underneath
    link = world_tmp / "link.img"
    link.symlink_to(theirs)
    for path, why in ((theirs, f"belongs to uid {attacker.uid}, not to you"), (link, "is a symbolic link")):
        proc = mesobox("run", "--overlay", str(path), str(images[0]), "true", as_user=user, timeout=60)
        assert proc.returncode == 13, proc.stderr
        first = proc.stderr.decode().splitlines()[0]
        assert first.startswith(f"mesobox: error: overlay image {path} {why}"), first
    _fsck_clean(theirs)  # never mounted
    assert _lock_free(theirs)


def test_not_an_overlay_image_is_one_line(mesobox: Mesobox, user: User, images: tuple[Path, Path],
                                          world_tmp: Path) -> None:
    junk = world_tmp / "junk.img"
    junk.write_bytes(b"\0" * SIZE)
    os.chown(junk, user.uid, user.gid)
    proc = mesobox("run", "--overlay", str(junk), str(images[0]), "true", as_user=user, timeout=60)
    assert proc.returncode == 125
    assert proc.stderr.decode().splitlines()[0] == f"mesobox: error: {junk} is not an ext4 overlay image"


@pytest.mark.parametrize("kind", ["dir", "squashfs"])
def test_fakeroot_writes_persist(mesobox: Mesobox, user: User, images: tuple[Path, Path], world_tmp: Path,
                                 kind: str) -> None:
    """--fakeroot: the container's root (the user outside) writes through the image too,
    and later runs, --fakeroot or not, read and change what it wrote (fuse2fs shows every
    file of the image as the caller's own, as the namespace names it)."""
    image = images[0] if kind == "dir" else images[1]
    ovl = world_tmp / "ovl.img"
    _create(mesobox, user, ovl)
    first = mesobox("run", "--fakeroot", "--overlay", str(ovl), str(image), "sh", "-c",
                    "echo root > /root/made && mkdir /etc/fake && id -u && stat -c %u /root/made /etc/fake",
                    as_user=user, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout.decode().split() == ["0", "0", "0"]
    second = mesobox("run", "--fakeroot", "--pid", "--overlay", str(ovl), str(image), "sh", "-c",
                     "cat /root/made; echo again >> /root/made", as_user=user, timeout=60)
    assert second.returncode == 0 and second.stdout.decode().split() == ["root"], second.stderr
    plain = mesobox("run", "--overlay", str(ovl), str(image), "sh", "-c",
                    "cat /root/made; stat -c %u /root/made; echo user > /etc/fake/u && cat /etc/fake/u",
                    as_user=user, timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.decode().split() == ["root", "again", str(user.uid), "user"]
    wait_until(lambda: _lock_free(ovl), "the fuse2fs daemon to exit")
    _fsck_clean(ovl)


def test_fakeroot_workload_switching_user_still_ends_fuse2fs(mesobox: Mesobox, user: User,
                                                             images: tuple[Path, Path], world_tmp: Path) -> None:
    """A --fakeroot workload that switches to another id (-u, an image's USER) may not
    signal the namespace root's fuse2fs: its watcher stops it when the workload ends,
    and the image comes out clean and unlocked."""
    ovl = world_tmp / "ovl.img"
    _create(mesobox, user, ovl)
    proc = mesobox("run", "--fakeroot", "-u", "1000", "--overlay", str(ovl), str(images[0]), "id", "-u",
                   as_user=user, timeout=60)
    assert proc.returncode == 0 and proc.stdout.decode().split() == ["1000"], proc.stderr
    wait_until(lambda: _no_daemon_of(user) and _lock_free(ovl), "fuse2fs to exit after the workload")
    _fsck_clean(ovl)
