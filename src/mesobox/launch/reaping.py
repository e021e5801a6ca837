"""Stale shared squashfs mounts, reaped by the next launch (squashmount.py owns them).

Kept apart from squashmount so that the common case (nothing stale) costs one listdir
and not squashmount's import.
"""

import os

REAP_EVERY_S = 1.0  # reap_stale_mounts looks at other keys' mounts at most this often


def reap_stale_mounts(runtime_dir: str, linger: float) -> None:
    """A SIGKILLed supervisor leaves its shared squashfs mount behind, a killed watcher
    a lingering one: the next launch of any image reaps them (a key whose watcher lives
    is left to it).  Only a live or stale lease leaves a ``.refs`` file and only a
    lingering mount an ``.idle`` stamp, so with neither this is one listdir.  With
    them, it looks at most once every ``REAP_EVERY_S`` (the ``.reaped`` stamp): a mount
    lingering under its watcher is the common case, and the look costs ≈1.5 ms
    (squashmount's import) that every rank would pay."""
    shared = os.path.join(runtime_dir, "mnt")
    from mesobox import paths

    paths.runtime_dir(runtime_dir)  # nothing in it is acted on unless it is private
    try:
        names = os.listdir(shared)
    except OSError:
        return
    if not any(name.endswith((".refs", ".idle")) for name in names):
        return
    import time

    stamp = os.path.join(shared, ".reaped")
    try:
        if 0 <= time.time() - os.stat(stamp).st_mtime < REAP_EVERY_S:
            return
        os.utime(stamp)
    except FileNotFoundError:
        try:  # noqa: SIM105 - contextlib costs an import on the launch path
            os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError:
            pass
    except OSError:
        pass
    from mesobox.launch.squashmount import reap_stale

    reap_stale(shared, linger)
