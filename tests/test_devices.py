"""--device HOST[:CONTAINER][:PERMS]: host character devices bound into a container, run
by an ordinary user.  The devices are made by root with mknod under the test's own
directory (copies of /dev/null, 1:3, and /dev/zero, 1:5, mode 0666), so no host device
is needed; a -B bind of the same node must stay unopenable (nodev)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import Mesobox, User


def _one_error_line(proc: object) -> str:
    err = proc.stderr.decode()  # type: ignore[attr-defined]
    assert proc.returncode != 0, err  # type: ignore[attr-defined]
    assert "Traceback" not in err, err
    return err


def test_a_device_is_usable_inside(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                   char_devices: Path) -> None:
    script = "echo x > /dev/mydev && head -c 4 /dev/myzero | od -An -tx1"
    proc = mesobox("exec", "--device", f"{char_devices}/null:/dev/mydev",
                   "--device", f"{char_devices}/zero:/dev/myzero:rwm",
                   str(busybox_rootfs), "sh", "-c", script, as_user=user)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split() == [b"00"] * 4


def test_a_device_bound_with_bind_stays_nodev(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                              char_devices: Path) -> None:
    proc = mesobox("exec", "-B", f"{char_devices}/null:/dev/mydev", str(busybox_rootfs), "sh", "-c",
                   "echo x > /dev/mydev", as_user=user)
    assert proc.returncode != 0
    assert b"Permission denied" in proc.stderr or b"not permitted" in proc.stderr, proc.stderr.decode()


def test_same_path_and_host_path_perms_form(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                            char_devices: Path) -> None:
    """HOST alone binds at the same path; HOST:PERMS is Docker's two-part form."""
    dev = f"{char_devices}/zero"
    proc = mesobox("exec", "--device", f"{dev}:rw", str(busybox_rootfs), "sh", "-c",
                   f"head -c 2 {dev} | od -An -tx1; grep -c ' {dev} ' /proc/self/mountinfo", as_user=user)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split() == [b"00", b"00", b"1"]


def test_a_symlink_names_its_device(mesobox: Mesobox, user: User, busybox_rootfs: Path, char_devices: Path,
                                    world_tmp: Path) -> None:
    link = world_tmp / "by-id"
    link.symlink_to(char_devices / "null")
    proc = mesobox("exec", "--device", f"{link}:/dev/mydev", str(busybox_rootfs), "sh", "-c",
                   "echo x > /dev/mydev && echo ok", as_user=user)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"ok\n"


@pytest.mark.parametrize(("spec", "says"), [
    ("{d}/nothing", "does not exist"),
    ("{d}", "is a directory"),
    ("{d}/file", "is a regular file"),
    ("{d}/null:dev/x", "container path"),
    ("{d}/null:/dev/../x", "container path"),
    ("{d}/null:/dev/x:r", "cannot be limited"),
    ("{d}/null:/dev/x:wm", "cannot be limited"),
    ("{d}/null:/dev/x:rx", "permissions"),
    ("{d}/null:/dev/x:rw:y", "bad --device"),
])
def test_bad_devices_are_one_line(mesobox: Mesobox, user: User, busybox_rootfs: Path, char_devices: Path,
                                  spec: str, says: str) -> None:
    (char_devices / "file").write_text("not a device\n")
    proc = mesobox("exec", "--device", spec.format(d=char_devices), str(busybox_rootfs), "true", as_user=user)
    err = _one_error_line(proc)
    assert says in err and err.startswith("mesobox: error:"), err


def test_a_hostile_symlink_to_a_file_is_refused(mesobox: Mesobox, user: User, attacker: User,
                                                busybox_rootfs: Path, world_tmp: Path) -> None:
    """Another user's planted link to a regular file (or a directory) is no device."""
    planted = world_tmp / "planted"
    attacker.run(["mkdir", "-m", "755", str(planted)], check=True)
    attacker.run(["sh", "-c", f"echo secret > {planted}/mine; ln -s {planted}/mine {planted}/gpu0; "
                              f"ln -s /etc {planted}/gpu1"], check=True)
    for name, kind in (("gpu0", "a regular file"), ("gpu1", "a directory")):
        proc = mesobox("exec", "--device", f"{planted}/{name}:/dev/gpu", str(busybox_rootfs), "true", as_user=user)
        assert kind in _one_error_line(proc)


def test_site_allowed_sources_apply_to_devices(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                               char_devices: Path,
                                               world_tmp: Path) -> None:
    site = world_tmp / "site.toml"
    site.write_text('allowed_bind_sources = ["/home"]\n')
    os.chmod(site, 0o644)
    proc = mesobox("exec", "--device", f"{char_devices}/null:/dev/mydev", str(busybox_rootfs), "true", as_user=user,
                   env={"MESOBOX_SITE_CONFIG": str(site)})
    assert "outside the allowed bind sources" in _one_error_line(proc)


def test_a_saved_plan_notices_the_device_became_a_file(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                                      char_devices: Path) -> None:
    """The second launch of the same command line may replay a saved program: what the
    device check asked must be asked again (launch/probe.py)."""
    argv = ("exec", "--device", f"{char_devices}/null:/dev/mydev", str(busybox_rootfs), "sh", "-c",
            "echo x > /dev/mydev")
    for _ in range(2):
        proc = mesobox(*argv, as_user=user)
        assert proc.returncode == 0, proc.stderr.decode()
    os.unlink(char_devices / "null")
    (char_devices / "null").write_text("now a file\n")
    assert "is a regular file" in _one_error_line(mesobox(*argv, as_user=user))


def test_a_fifo_or_socket_is_no_device(mesobox: Mesobox, user: User, busybox_rootfs: Path, world_tmp: Path) -> None:
    """Only character and block devices lose nodev: a FIFO or a socket is refused too."""
    import socket

    fifo, sock = world_tmp / "fifo", world_tmp / "sock"
    os.mkfifo(fifo, 0o666)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    try:
        for path in (fifo, sock):
            proc = mesobox("exec", "--device", f"{path}:/dev/x", str(busybox_rootfs), "true", as_user=user)
            assert "not a character or block device" in _one_error_line(proc)
    finally:
        listener.close()
