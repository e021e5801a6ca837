"""Quota room: persistent overlays with a disk quota — an ext4 image file as the
overlay's upper layer (Apptainer's ``--overlay overlay.img`` model).

Invariants:
- ``create`` makes a *sparse* ext4 image of exactly SIZE bytes with ``mke2fs -d``
  (e2fsprogs) holding empty ``upper/`` and ``work/`` directories; writes past SIZE
  fail inside the container with ENOSPC and nothing on the host grows beyond SIZE.
- The image's root and ``upper/`` belong to whoever the container's root will be on
  the host: the caller for an ordinary user, root's shifted range for real root
  (identity.py), so container root may write everywhere in the merged tree.
- Mounting (``mount_image``) happens in the container's own mount namespace and ends
  with it.  Real root: kernel ext4 on a loop device, made while the launcher still has
  real root's privileges (the loop device is freed by ``autoclear``).  An ordinary
  user: fuse2fs in the container's user namespace (launch/fuseoverlay.py), with
  fuse-overlayfs on top, since the kernel refuses a FUSE upper layer ("upper fs
  missing required features", measured on Linux 6.x).
- One writer at a time: the launch that mounts an image holds ``flock(LOCK_EX)`` on it
  for the container's life; a second launch meanwhile is refused with one line.
"""

from __future__ import annotations

import os

from mesobox.errors import LaunchError, UsageError

EXT4_MIN = 1024 * 1024  # mke2fs refuses smaller ext4 filesystems in practice


def create(path: str, size: int, owner: tuple[int, int]) -> None:
    """Make the overlay image ``path`` of ``size`` bytes, owned inside by ``owner``."""
    import shutil
    import subprocess
    import tempfile

    if os.path.lexists(path):
        raise UsageError(f"{path} already exists", hint="remove it first, or choose another file name")
    if size < EXT4_MIN:
        raise UsageError(f"overlay size {size} is too small", hint="use at least 1m")
    tool = shutil.which("mke2fs") or ("/usr/sbin/mke2fs" if os.access("/usr/sbin/mke2fs", os.X_OK) else None)
    if tool is None:
        raise UsageError("mke2fs not found", hint="install e2fsprogs")
    with tempfile.TemporaryDirectory(prefix="mesobox-overlay-") as seed:
        for sub in ("upper", "work"):
            os.mkdir(os.path.join(seed, sub), 0o755)
            if os.getuid() == 0:
                os.chown(os.path.join(seed, sub), *owner)
        argv = [tool, "-q", "-F", "-t", "ext4", "-m", "0", "-L", "mesobox-overlay", "-d", seed,
                "-E", f"root_owner={owner[0]}:{owner[1]}", path, f"{size // 1024}k"]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        import contextlib

        with contextlib.suppress(OSError):
            os.unlink(path)
        raise UsageError(f"mke2fs failed: {proc.stderr.strip()[:200]}")


def is_image(path: str) -> bool:
    return os.path.isfile(path)


def check_can_mount(path: str, real_root: bool) -> str:
    """The absolute image path, once the caller may mount it: real root loop-mounts any
    image; an ordinary user only their own regular file (not a symlink), with fuse2fs."""
    if not real_root:
        from mesobox.launch import fuseoverlay

        fuseoverlay.check(path)
    return os.path.abspath(path)


def mount_image(image: str, target: str, workspace: str, real_root: bool) -> None:
    """Mount the ext4 image on ``target`` in the caller's mount namespace: a loop mount
    for real root, fuse2fs for a user (launch/fuseoverlay.py)."""
    if not real_root:
        from mesobox.launch import fuseoverlay

        fuseoverlay.mount(image, target, workspace)
        return
    import subprocess

    from mesobox.launch import fuseoverlay

    held = _hold_lock(image)
    os.makedirs(target, exist_ok=True)
    argv = ["mount", "-t", "ext4", "-o", "loop,nosuid,nodev", image, target]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        os.close(held)
        raise LaunchError(f"cannot mount overlay image {image}: {proc.stderr.strip()[:200]}",
                          hint="make it with `mesobox overlay create FILE SIZE`")
    for sub in ("upper", "work"):
        if not os.path.isdir(os.path.join(target, sub)):
            raise LaunchError(f"{image} is not a mesobox overlay image (no {sub}/ directory)",
                              hint=fuseoverlay.HINT)


def _hold_lock(image: str) -> int:
    """Real root's one-writer lock: an fd (above 100, inherited across execve) that the
    workload keeps for the container's life, as execute.hold_image does."""
    import fcntl

    from mesobox.launch import fuseoverlay

    try:
        fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise LaunchError(f"cannot open overlay image {image}: {err.strerror}", hint=fuseoverlay.HINT) from None
    try:
        fuseoverlay.lock(fd, image)
        held = fcntl.fcntl(fd, fcntl.F_DUPFD, 100)
    finally:
        os.close(fd)
    os.set_inheritable(held, True)
    return held
