"""Mount plan: ``Spec`` + workspace → the ordered list of ``MountOp`` steps (mountops.py).

Invariants:
- The plan is computed completely before the first mount, and ``--debug`` prints it.
- Order: the root (bind, or overlay), then the spec's mounts parents-first (a stable
  sort on depth keeps the user's order among siblings), /dev symlinks after /dev,
  the generated /etc/passwd and /etc/group, and last the read-only remount of a root
  that needed a scratch upper layer only to hold missing mount points.
- A mount point that the image lacks is created in a tmpfs upper layer of an overlay
  on the root, never in the image; one that lies inside a host bind must exist there
  (mesobox never creates directories on the host).
- A recursive bind never shows the workspace itself (binding /tmp when the runtime
  dir lives in /tmp must not show the container its own root): its copy is detached.
"""

from __future__ import annotations

import os

from mesobox.errors import LaunchError
from mesobox.files import under
from mesobox.launch import mountops as M
from mesobox.launch import probe
from mesobox.launch import syscalls as sc
from mesobox.launch.mountops import MountOp
from mesobox.oci.spec import Spec

_FLAG_OPTIONS = {"nosuid": sc.MS_NOSUID, "nodev": sc.MS_NODEV, "noexec": sc.MS_NOEXEC}
_IGNORED = {"bind", "rbind", "ro", "rw", "private", "rprivate", "slave", "rslave"}
DEV_LINKS = (("dev/ptmx", "pts/ptmx"), ("dev/fd", "/proc/self/fd"), ("dev/stdin", "/proc/self/fd/0"),
             ("dev/stdout", "/proc/self/fd/1"), ("dev/stderr", "/proc/self/fd/2"))


def _flags(options: tuple[str, ...]) -> int:
    """The mount flags the spec's options name, and no others: nodev is not implied (a
    --device bind has none; every -B bind names it, specbuild.bind_mounts)."""
    return sum(_FLAG_OPTIONS.get(o, 0) for o in set(options))


def _data(options: tuple[str, ...]) -> str:
    return ",".join(o for o in options if o not in _FLAG_OPTIONS and o not in _IGNORED)


def mount_ops(spec: Spec, workspace: str) -> list[MountOp]:
    """The spec's mounts (parents-first) plus /dev links and passwd/group binds."""
    ops: list[MountOp] = []
    for m in sorted(spec.mounts, key=lambda m: m.destination.rstrip("/").count("/")):
        rel = m.destination.strip("/")
        if m.type == "bind":
            recursive = "rbind" in m.options
            # A non-recursive bind of a directory with host submounts is refused (EINVAL:
            # it would reveal what they cover), so bind recursively and detach the copy
            # of our workspace instead.
            hide = os.path.relpath(workspace, m.source) if recursive and under(workspace, m.source) else ""
            ops.append(M.bind(m.source, rel, readonly="ro" in m.options, file=not probe.isdir(m.source),
                              flags=_flags(m.options), recursive=recursive, hide=hide))
        elif m.type == "tmpfs":
            ops.append(M.tmpfs(rel, flags=_flags(m.options), data=_data(m.options)))
        elif m.type == "proc":
            ops.append(M.proc(rel))
        elif m.type == "devpts":
            ops.append(M.devpts(rel))
        else:
            raise LaunchError(f"unsupported mount type {m.type!r} for {m.destination}")
        if rel == "dev" and m.type == "tmpfs":
            ops += [M.symlink(link, points_to) for link, points_to in DEV_LINKS]
    for name in ("passwd", "group") if spec.mesobox.identity_files else ():
        ops.append(M.bind(os.path.join(workspace, "etc", name), f"etc/{name}", readonly=True, file=True,
                          recursive=False))
    return ops


def skeletons(ops: list[MountOp], image_dir: str) -> list[str]:
    """Image directories to rebuild as skeletons because a mount point below them is
    missing; LaunchError if one is missing inside a host bind."""
    found: set[str] = set()
    covered: list[tuple[str, MountOp]] = []
    for op in ops:
        target = op.target
        inner = next(((t, o) for t, o in reversed(covered) if t and under(target, t)), None)
        if inner is None and not probe.image_exists(image_dir, target):
            found.add(_deepest_existing(image_dir, target))
        elif inner is not None and inner[1].kind == "bind":
            rest = os.path.relpath(target, inner[0])
            if not probe.lexists(os.path.join(inner[1].source, rest)):
                raise LaunchError(f"cannot mount on /{target}: it does not exist in the bind of {inner[1].source}",
                                  hint=f"create {os.path.join(inner[1].source, rest)} on the host first")
        if op.kind != "symlink":
            covered.append((target, op))
    return sorted(found, key=lambda t: (t.count("/") + bool(t), t))


def _deepest_existing(image_dir: str, target: str) -> str:
    parts = target.split("/")
    while parts:
        parts.pop()
        candidate = "/".join(parts)
        if probe.image_exists(image_dir, candidate):
            return candidate
    return ""


def root_ops(spec: Spec, image_dir: str, workspace: str, skeleton_dirs: list[str],
             squash: str = "", points_in_overlay: bool = False) -> tuple[list[MountOp], list[MountOp]]:
    """(ops before the mounts, ops after them) that make the container's root.
    ``squash``: fuse-overlayfs options for a writable layer whose lower files have
    owners the namespace cannot map (program.py, fusemount.py); ``points_in_overlay``:
    this namespace may create files anywhere in a writable root."""
    writable = spec.mesobox.writable_tmpfs
    persistent = spec.mesobox.overlay
    nosuid = sc.MS_NOSUID | sc.MS_NODEV
    before: list[MountOp]
    if persistent:
        upper, work = os.path.join(persistent, "upper"), os.path.join(persistent, "work")
        before = [M.overlay(image_dir, upper, work, squash=squash)]
    elif writable is not None:
        scratch = os.path.join(workspace, "rw")
        before = [M.overlay(image_dir, scratch + "/upper", scratch + "/work", squash=squash)]
    else:
        before = [M.bind(image_dir, "", readonly=True, flags=nosuid, recursive=False)]
    if persistent and points_in_overlay:
        # No skeleton: what is written next to a missing mount point (/etc beside a
        # missing /etc/hosts) must be kept with the rest; the mount points are made in
        # the overlay itself, as Apptainer's overlay does (docs/running.md).
        return before, []
    before += [M.skeleton(t) for t in skeleton_dirs]
    if persistent or writable is not None:
        # A writable root keeps its skeletons writable: files created next to a
        # missing mount point land in the skeleton's tmpfs (docs/running.md).
        return before, []
    after: list[MountOp] = [M.remount(t, sc.MS_RDONLY | nosuid)
                         for t in reversed(skeleton_dirs)]
    return before, after
