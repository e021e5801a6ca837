"""Mount-plan room: ``Spec`` + workspace → the ordered list of ``mounts.Op``.

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
from mesobox.launch import mountops as M
from mesobox.launch import probe
from mesobox.launch import syscalls as sc
from mesobox.oci.spec import ANN_OVERLAY, ANN_WRITABLE_TMPFS, Spec

_FLAG_OPTIONS = {"nosuid": sc.MS_NOSUID, "nodev": sc.MS_NODEV, "noexec": sc.MS_NOEXEC}
_IGNORED = {"bind", "rbind", "ro", "rw", "private", "rprivate", "slave", "rslave"}
DEV_LINKS = (("dev/ptmx", "pts/ptmx"), ("dev/fd", "/proc/self/fd"), ("dev/stdin", "/proc/self/fd/0"),
             ("dev/stdout", "/proc/self/fd/1"), ("dev/stderr", "/proc/self/fd/2"))


def _flags(options: tuple[str, ...]) -> int:
    return sum(_FLAG_OPTIONS.get(o, 0) for o in set(options))


def _data(options: tuple[str, ...]) -> str:
    return ",".join(o for o in options if o not in _FLAG_OPTIONS and o not in _IGNORED)


def _under(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top.rstrip("/") + "/")


def mount_ops(spec: Spec, workspace: str) -> list[M.Op]:
    """The spec's mounts (parents-first) plus /dev links and passwd/group binds."""
    ops: list[M.Op] = []
    for m in sorted(spec.mounts, key=lambda m: m.destination.rstrip("/").count("/")):
        rel = m.destination.strip("/")
        if m.type == "bind":
            kind = "dir" if probe.isdir(m.source) else "file"
            recursive = "rbind" in m.options
            # A non-recursive bind of a directory with host submounts is refused (EINVAL:
            # it would reveal what they cover), so bind recursively and detach the copy
            # of our workspace instead.
            hide = os.path.relpath(workspace, m.source) if recursive and _under(workspace, m.source) else ""
            ops.append(M.Bind(source=m.source, target=rel, readonly="ro" in m.options, kind=kind,
                              flags=_flags(m.options), recursive=recursive, hide=hide))
        elif m.type == "tmpfs":
            ops.append(M.Tmpfs(target=rel, flags=_flags(m.options), data=_data(m.options)))
        elif m.type == "proc":
            ops.append(M.Proc(target=rel))
        elif m.type == "devpts":
            ops.append(M.Devpts(target=rel))
        else:
            raise LaunchError(f"unsupported mount type {m.type!r} for {m.destination}")
        if rel == "dev" and m.type == "tmpfs":
            ops += [M.Symlink(link=link, target=target) for link, target in DEV_LINKS]
    for name in ("passwd", "group"):
        ops.append(M.Bind(source=os.path.join(workspace, "etc", name), target=f"etc/{name}", readonly=True,
                          kind="file", flags=sc.MS_NOSUID | sc.MS_NODEV, recursive=False))
    return ops


def skeletons(ops: list[M.Op], image_dir: str) -> list[str]:
    """Image directories to rebuild as skeletons because a mount point below them is
    missing; LaunchError if one is missing inside a host bind."""
    found: set[str] = set()
    covered: list[tuple[str, M.Op]] = []
    for op in ops:
        target = op.link if isinstance(op, M.Symlink) else str(getattr(op, "target", ""))
        inner = next(((t, o) for t, o in reversed(covered) if t and _under(target, t)), None)
        if inner is None and not probe.image_exists(image_dir, target):
            found.add(_deepest_existing(image_dir, target))
        elif isinstance(inner, tuple) and isinstance(inner[1], M.Bind):
            rest = os.path.relpath(target, inner[0])
            if not probe.lexists(os.path.join(inner[1].source, rest)):
                raise LaunchError(f"cannot mount on /{target}: it does not exist in the bind of {inner[1].source}",
                                  hint=f"create {os.path.join(inner[1].source, rest)} on the host first")
        if not isinstance(op, M.Symlink):
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


def root_ops(spec: Spec, image_dir: str, workspace: str, skeleton_dirs: list[str]) -> tuple[list[M.Op], list[M.Op]]:
    """(ops before the mounts, ops after them) that make the container's root."""
    writable = spec.annotations.get(ANN_WRITABLE_TMPFS)
    persistent = spec.annotations.get(ANN_OVERLAY)
    nosuid = sc.MS_NOSUID | sc.MS_NODEV
    before: list[M.Op]
    if persistent:
        upper, work = os.path.join(persistent, "upper"), os.path.join(persistent, "work")
        before = [M.Overlay(lower=image_dir, upper=upper, work=work, target="")]
    elif writable is not None:
        scratch = os.path.join(workspace, "rw")
        before = [M.Overlay(lower=image_dir, upper=scratch + "/upper", work=scratch + "/work", target="")]
    else:
        before = [M.Bind(source=image_dir, target="", readonly=True, kind="dir", flags=nosuid, recursive=False)]
    before += [M.Skeleton(target=t) for t in skeleton_dirs]
    if persistent or writable is not None:
        # A writable root keeps its skeletons writable: files created next to a
        # missing mount point land in the skeleton's tmpfs (docs/running.md).
        return before, []
    after: list[M.Op] = [M.Remount(target=t, flags=sc.MS_RDONLY | nosuid, source="")
                         for t in reversed(skeleton_dirs)]
    return before, after
