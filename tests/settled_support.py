"""Files as a saved launch program trusts them: settled, dated an hour back.

A launch trusts a file by its identity only once it is settled (launch/probe.py): a
file written this very second may change again within the same timestamp.  Images and
config files are not that fresh in real use; tests that expect a program to be saved
date theirs back with these.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import make_busybox_rootfs

HOUR_AGO = time.time() - 3600


def age(*paths: Path) -> None:
    for path in paths:
        os.utime(path, (HOUR_AGO, HOUR_AGO), follow_symlinks=False)


def world_file(path: Path, text: str) -> Path:
    """``text`` in ``path``, readable by every user, dated an hour back."""
    path.write_text(text)
    os.chmod(path, 0o644)
    age(path)
    return path


def rootfs_an_hour_old(root: Path) -> None:
    """An image layer as images are: its /etc files are not from this very second (a
    tar's whole-second mtime may be rounded up into the future: not settled yet)."""
    make_busybox_rootfs(root)
    age(root / "etc" / "passwd", root / "etc" / "group")


def world_image(root: Path) -> Path:
    """A busybox rootfs every user can read, its /etc files settled."""
    make_busybox_rootfs(root)
    age(root / "etc" / "passwd", root / "etc" / "group")
    for dirpath, dirnames, _files in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o1777 if name == "tmp" else 0o755)
    os.chmod(root, 0o755)
    return root
