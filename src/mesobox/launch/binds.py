"""Host paths bound into a container: the site's allowed sources, and device binds.

One rule for every source a container gets from the host, whatever asked for it (``-B``,
``--device``, a CDI spec, ``--nv``): it must exist and be reachable, and, when the site
lists ``allowed_bind_sources``, its real path (symlinks resolved) must lie under one of
them.  Every answer is asked through probe.py, so a saved launch program sees a change.
"""

from __future__ import annotations

from mesobox.errors import PolicyError, UsageError
from mesobox.files import under
from mesobox.launch import probe
from mesobox.oci import spec as S

DEVICE_OPTIONS = ("bind", "nosuid")  # no nodev: the node's permissions and device cgroup decide


def allowed_source(real: str, allowed: tuple[str, ...]) -> bool:
    return not allowed or any(under(real, probe.realpath(a)) for a in allowed)


def require_allowed(real: str, allowed: tuple[str, ...], what: str, where: str = "") -> None:
    """PolicyError naming ``what`` when ``real`` lies outside the allowed sources."""
    if not allowed_source(real, allowed):
        raise PolicyError(f"{what} is outside the allowed bind sources{where}",
                          hint="the site allows: " + ", ".join(allowed))


def check_source(src: str, allowed: tuple[str, ...], what: str = "bind source", where: str = "") -> str:
    """The real path of source ``src``: it must exist, be reachable and be allowed."""
    error = probe.stat_error(src)
    if error in ("ENOENT", "ENOTDIR"):
        raise UsageError(f"{what} {src} does not exist{where}")
    if error is not None:
        raise UsageError(f"{what} {src} cannot be reached ({error}){where}",
                         hint="a directory on its path is not searchable by you" if error == "EACCES" else None)
    real = probe.realpath(src)
    require_allowed(real, allowed, f"{what} {src}", where)
    return real


def device_bind(real: str, destination: str) -> S.Mount:
    """A bind of the device node ``real``: nosuid but not nodev (a ``-B`` bind is nodev,
    so a device bound that way cannot be opened).  Leaving nodev off adds no privilege:
    the node's permissions and the device cgroup still decide, and a source on a nodev
    host mount keeps that flag (it is locked in a user namespace)."""
    return S.Mount(destination=destination, type="bind", source=real, options=DEVICE_OPTIONS)
