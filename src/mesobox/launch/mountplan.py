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
from mesobox.launch import mountops, probe
from mesobox.launch import mountops as M
from mesobox.launch import syscalls as sc
from mesobox.launch.mountops import MountOp
from mesobox.launch.syscalls import mountinfo_path
from mesobox.oci.spec import IdMap, Spec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

# OCI mount options (config.md "Mounts", mount(8)): those that set or clear a flag,
# those that set a propagation after the mount, and the rest: the filesystem's data.
_SET_FLAGS = {"ro": sc.MS_RDONLY, "nosuid": sc.MS_NOSUID, "nodev": sc.MS_NODEV, "noexec": sc.MS_NOEXEC,
              "sync": sc.MS_SYNCHRONOUS, "dirsync": sc.MS_DIRSYNC, "mand": sc.MS_MANDLOCK,
              "noatime": sc.MS_NOATIME, "nodiratime": sc.MS_NODIRATIME, "relatime": sc.MS_RELATIME,
              "strictatime": sc.MS_STRICTATIME, "silent": sc.MS_SILENT, "lazytime": sc.MS_LAZYTIME,
              "iversion": sc.MS_I_VERSION}
_CLEAR_FLAGS = {"rw": sc.MS_RDONLY, "suid": sc.MS_NOSUID, "dev": sc.MS_NODEV, "exec": sc.MS_NOEXEC,
                "async": sc.MS_SYNCHRONOUS, "nomand": sc.MS_MANDLOCK, "atime": sc.MS_NOATIME,
                "diratime": sc.MS_NODIRATIME, "norelatime": sc.MS_RELATIME, "nostrictatime": sc.MS_STRICTATIME,
                "loud": sc.MS_SILENT, "nolazytime": sc.MS_LAZYTIME, "noiversion": sc.MS_I_VERSION}
PROPAGATION = {"private": sc.MS_PRIVATE, "shared": sc.MS_SHARED, "slave": sc.MS_SLAVE,
               "unbindable": sc.MS_UNBINDABLE}
_NO_DATA = {"bind", "rbind", "defaults", *(("r" + p) for p in PROPAGATION), *PROPAGATION}
DEV_LINKS = (("dev/ptmx", "pts/ptmx"), ("dev/fd", "/proc/self/fd"), ("dev/stdin", "/proc/self/fd/0"),
             ("dev/stdout", "/proc/self/fd/1"), ("dev/stderr", "/proc/self/fd/2"))
DEFAULT_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9),
                   ("tty", 5, 0))  # runtime-spec config-linux.md "Default Devices"


def _flags(options: tuple[str, ...]) -> int:
    """The mount flags the options name, in order (a later "rw" undoes an earlier "ro");
    nodev is not implied (a --device bind has none; every -B bind names it)."""
    flags = 0
    for o in options:
        if o in _SET_FLAGS:
            flags |= _SET_FLAGS[o]
        elif o in _CLEAR_FLAGS:
            flags &= ~_CLEAR_FLAGS[o]
    return flags


def propagation(option: str) -> int:
    """``rshared`` → MS_SHARED|MS_REC; 0 for an option that is no propagation."""
    recursive = option.startswith("r") and option[1:] in PROPAGATION
    flag = PROPAGATION.get(option[1:] if recursive else option, 0)
    return flag | (sc.MS_REC if recursive and flag else 0)


def _data(options: tuple[str, ...]) -> str:
    return ",".join(o for o in options if o not in _SET_FLAGS and o not in _CLEAR_FLAGS and o not in _NO_DATA)


def mount_ops(spec: Spec, workspace: str, privileged: bool = False) -> list[MountOp]:
    """The spec's mounts (parents-first, or in order ``as_written``) plus /dev links,
    devices and passwd/group binds.  ``privileged``: set up by real root in the
    initial user namespace, which may make device nodes (owned by the host ids the
    container's user namespace, if any, maps their owners to) and mount every type."""
    ops: list[MountOp] = []
    dev_tmpfs = False
    mounts = spec.mounts if spec.mesobox.as_written else sorted(
        spec.mounts, key=lambda m: m.destination.rstrip("/").count("/"))
    for m in mounts:
        rel = m.destination.strip("/")
        flags = _flags(m.options)
        if m.type == "bind":
            recursive = "rbind" in m.options
            # A non-recursive bind of a directory with host submounts is refused (EINVAL:
            # it would reveal what they cover), so bind recursively and detach the copy
            # of our workspace instead.
            hide = os.path.relpath(workspace, m.source) if recursive and under(workspace, m.source) else ""
            ops.append(M.bind(m.source, rel, file=not probe.isdir(m.source), flags=flags, recursive=recursive,
                              hide=hide))
        elif m.type == "proc" and not privileged:
            ops.append(M.proc(rel))  # a user namespace's proc keeps the host's locked nosuid, nodev, noexec
        elif m.type == "devpts" and not privileged:
            ops.append(M.devpts(rel))  # a devpts "gid=" names a group the namespace may not map
        elif m.type == "cgroup":
            ops += _cgroup_ops(rel, flags)
        elif m.type in mountops.STEP_KINDS:  # an overlay, or a name of our own steps
            raise LaunchError(f"unsupported mount type {m.type!r} for {m.destination}")
        else:  # a new filesystem of that type: tmpfs, sysfs, mqueue, cgroup, devpts …
            ops.append(M.filesystem(m.type, rel, m.source or m.type, flags, _data(m.options)))
        ops += [M.propagate(rel, propagation(o)) for o in m.options if propagation(o)]
        if rel == "dev" and m.type == "tmpfs":
            dev_tmpfs = True
            ops += [M.symlink(link, points_to) for link, points_to in DEV_LINKS]
    uid, gid = _host_id(spec.linux.uid_mappings), _host_id(spec.linux.gid_mappings)
    if privileged and dev_tmpfs:
        ops += [M.device(f"dev/{name}", "c", major, minor, 0o666, uid(0), gid(0))
                for name, major, minor in DEFAULT_DEVICES
                if not any(d.path == f"/dev/{name}" for d in spec.linux.devices)]
    for d in spec.linux.devices:
        ops.append(M.device(d.path.strip("/"), d.type, d.major, d.minor, d.file_mode, uid(d.uid), gid(d.gid)))
    for name in ("passwd", "group") if spec.mesobox.identity_files else ():
        ops.append(M.bind(os.path.join(workspace, "etc", name), f"etc/{name}", readonly=True, file=True,
                          recursive=False))
    return ops


def _host_id(maps: tuple[IdMap, ...]) -> Callable[[int], int]:
    """A container id → the host id the maps give it (itself without maps; the
    overflow id 65534 where none does)."""
    def host(inside: int) -> int:
        if not maps:
            return inside
        return next((m.host_id + inside - m.container_id for m in maps
                     if m.container_id <= inside < m.container_id + m.size), 65534)

    return host


def _cgroup_ops(rel: str, flags: int) -> list[MountOp]:
    """An OCI "cgroup" mount as runc makes it: the cgroup2 filesystem on a unified
    host; on a v1 (or hybrid) host a tmpfs holding, for each v1 hierarchy, a bind of
    this process's own group in it (the container's, once mesobox-oci has put it
    there), read-only if the mount says "ro"."""
    own: dict[frozenset[str], str] = {}  # controllers of a hierarchy → our group in it
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            own[frozenset(names.split(","))] = path
    hierarchies: list[tuple[str, str]] = []  # (name below the tmpfs, host directory of our group)
    with open("/proc/self/mountinfo", "rb") as info:
        for raw in info:
            head, _, tail = raw.decode("utf-8", "replace").partition(" - ")
            point, (fstype, _source, options) = mountinfo_path(head.split()[4]), tail.split()[:3]
            if fstype == "cgroup2" and point == "/sys/fs/cgroup":
                return [M.filesystem("cgroup2", rel, "cgroup", flags, "")]
            if fstype == "cgroup" and os.path.dirname(point) == "/sys/fs/cgroup":
                controllers = frozenset(o for o in options.split(",") if o in _V1_CONTROLLERS or o.startswith("name="))
                if controllers in own:
                    hierarchies.append((os.path.basename(point), point + own[controllers].rstrip("/")))
    ops = [M.filesystem("tmpfs", rel, "tmpfs", flags & ~sc.MS_RDONLY, "mode=755")]
    for name, group in hierarchies:
        ops.append(M.bind(group, f"{rel}/{name}", flags=flags, recursive=False))
    return ops


_V1_CONTROLLERS = frozenset(("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "blkio",
                             "perf_event", "net_prio", "hugetlb", "pids", "rdma", "misc"))


def skeletons(ops: list[MountOp], image_dir: str) -> list[str]:
    """Image directories to rebuild as skeletons because a mount point below them is
    missing; LaunchError if one is missing inside a host bind."""
    found: set[str] = set()
    covered: list[tuple[str, MountOp]] = []
    for op in ops:
        if op.kind == "propagate":  # of a mount made just before: no mount point of its own
            continue
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
    nosuid = 0 if spec.mesobox.as_written else sc.MS_NOSUID | sc.MS_NODEV
    before: list[MountOp]
    if persistent:
        upper, work = os.path.join(persistent, "upper"), os.path.join(persistent, "work")
        before = [M.overlay(image_dir, upper, work, squash=squash)]
    elif writable is not None:
        scratch = os.path.join(workspace, "rw")
        before = [M.overlay(image_dir, scratch + "/upper", scratch + "/work", squash=squash)]
    elif not spec.root.readonly and points_in_overlay:
        # An OCI bundle's own root, writable as config.json says (runc writes in it too):
        # missing mount points are made in it, as runc makes them.
        return [M.bind(image_dir, "", flags=nosuid, recursive=False)], []
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
