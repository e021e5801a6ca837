"""CLI wiring for ``mesobox overlay create FILE SIZE``: a disk-quota overlay image
(isolation/quota.py), used with ``mesobox run --overlay FILE``."""

from __future__ import annotations

import os
import sys

from mesobox.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mesobox.config import Config

USAGE = """\
usage: mesobox overlay create FILE SIZE

Make FILE, a sparse ext4 image of SIZE (e.g. 512m, 2g) for `mesobox run --overlay FILE`:
the container's changes are kept in it across runs, and writes past SIZE fail with ENOSPC.
Mounting it needs root (loop device); ordinary users use --overlay DIR or --writable-tmpfs=SIZE.
"""


def main_overlay(argv: list[str], config: Config) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    if argv[0] != "create" or len(argv) != 3:
        raise UsageError("usage: mesobox overlay create FILE SIZE")
    from mesobox.isolation import quota
    from mesobox.launch import identity
    from mesobox.sizes import parse_size

    size = parse_size(argv[2], "overlay create")
    # Real root's: a slice free now; the file carries its ids, so its launches take that
    # slice (identity.state_owner) and its files stay writable by the container's root.
    owner = identity.free_slice() if identity.is_real_root() else (os.getuid(), os.getgid())
    quota.create(argv[1], size, owner)
    if identity.is_real_root():
        os.chown(argv[1], *owner)
    return 0
