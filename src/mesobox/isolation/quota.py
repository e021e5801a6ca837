"""Quota room: persistent overlays with a disk quota — an ext4 image file as the
overlay's upper layer (Apptainer's ``--overlay overlay.img`` model).

Invariants:
- ``create`` makes a *sparse* ext4 image of exactly SIZE bytes with ``mke2fs -d``
  (e2fsprogs) holding empty ``upper/`` and ``work/`` directories; writes past SIZE
  fail inside the container with ENOSPC and nothing on the host grows beyond SIZE.
- The image's root and ``upper/`` belong to whoever the container's root will be on
  the host: the caller for an ordinary user, root's shifted range for real root
  (identity.py), so container root may write everywhere in the merged tree.
- Mounting (``mount_image``) is kernel ext4 on a loop device, done by the launcher in
  the container's own mount namespace while it still has real root's privileges: the
  mount disappears with the namespace and the loop device is freed (``autoclear``).
  Ordinary users cannot mount it: a fuse2fs-mounted ext4 is refused by the kernel as an
  overlay upper layer ("upper fs missing required features", as seen on Debian 12 with a 6.x kernel),
  so they get a clear error pointing at ``--overlay DIR`` / ``--writable-tmpfs=SIZE``.
"""

from __future__ import annotations

import os

from mesobox.errors import LaunchError, PolicyError, UsageError

EXT4_MIN = 1024 * 1024  # mke2fs refuses smaller ext4 filesystems in practice
IMAGE_HINT = "use --overlay DIR (kept, no quota) or --writable-tmpfs=SIZE (quota, discarded at exit)"


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
    """The absolute image path; PolicyError for callers that cannot mount it."""
    if not real_root:
        raise PolicyError("an overlay image (disk quota) needs root to mount: the kernel refuses a "
                          "fuse2fs-mounted ext4 as overlay upper layer", hint=IMAGE_HINT)
    return os.path.abspath(path)


def mount_image(image: str, target: str) -> None:
    """Loop-mount the ext4 image on ``target`` (in the caller's mount namespace)."""
    import subprocess

    os.makedirs(target, exist_ok=True)
    argv = ["mount", "-t", "ext4", "-o", "loop,nosuid,nodev", image, target]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LaunchError(f"cannot mount overlay image {image}: {proc.stderr.strip()[:200]}",
                          hint="make it with `mesobox overlay create FILE SIZE`")
    for sub in ("upper", "work"):
        if not os.path.isdir(os.path.join(target, sub)):
            raise LaunchError(f"{image} is not a mesobox overlay image (no {sub}/ directory)",
                              hint="make it with `mesobox overlay create FILE SIZE`")

