"""CLI wiring for ``mesobox overlay create FILE SIZE``: a disk-quota overlay image
(isolation/quota.py), used with ``mesobox run --overlay FILE``."""

from __future__ import annotations

import os

from mesobox.cli.usage import parse, subverb

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mesobox.config import Config


def main_overlay(argv: list[str], config: Config) -> int:
    chosen = subverb("overlay", argv)
    if chosen is None:
        return 0 if argv else 2
    parsed = parse("overlay create", chosen[1])
    if parsed is None:
        return 0
    _, (path, size_text) = parsed
    from mesobox.isolation import quota
    from mesobox.launch import identity
    from mesobox.sizes import parse_size

    size = parse_size(size_text, "overlay create")
    # Real root's: a slice free now; the file carries its ids, so its launches take that
    # slice (identity.state_owner) and its files stay writable by the container's root.
    owner = identity.free_slice() if identity.is_real_root() else (os.getuid(), os.getgid())
    quota.create(path, size, owner)
    if identity.is_real_root():
        os.chown(path, *owner)
    return 0
