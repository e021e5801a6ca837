"""Mount steps: the container's filesystem as one ordered list of ``MountOp`` records.

One kind of step, as bubblewrap's setup operations and mkosi's FSOperation are: a
``kind`` and the fields that kind uses.  mountplan.py makes them from the spec (parents
first); ``describe()`` is the line ``--debug`` prints; ``step()`` is the same values
as a plain tuple (``MountStep``), which is what a program holds (the plan cache saves
programs with ``marshal``) and what ``execute.run_steps`` applies below the new root.

Kinds (targets are relative to the new root; "" is the root itself; any kind that is
not one of ``STEP_KINDS`` is a filesystem type):
  bind      ``source`` (a host path) on ``target``; ``file``: the mount point to make is
            a file; ``recursive``: rbind; ``hide``: the workspace's path below source,
            detached after an rbind; ``flags``: MS_RDONLY/NOSUID/… of the remount that
            follows (locked flags are repeated by execute)
  tmpfs, proc, sysfs, …  a new filesystem of that type (the kind), from ``source``,
            with ``flags`` and ``data``
  propagate ``target``'s propagation set to ``flags`` (MS_SHARED, MS_SLAVE, … | MS_REC)
  device    a node made at ``target`` (real root outside a user namespace): ``source``
            its type (c, b, u, p), ``flags`` its device number, ``data`` "MODE,UID,GID"
  overlay   ``source`` (lower) + ``upper`` + ``work`` on ``target`` (kernel overlayfs,
            fuse-overlayfs where the kernel refuses); ``data``: fuse-overlayfs's squash
            options, for a lower whose owners the namespace cannot map (fusemount.py)
  remount   ``target`` with ``flags``; ``source``: whose locked flags to keep ("": ours)
  skeleton  the image directory ``target`` replaced by a tmpfs holding binds of each
            of its entries (Apptainer's "underlay"): missing mount points go there
  symlink   ``target`` made a symlink to ``source``
"""

from __future__ import annotations

from mesobox.launch import syscalls as sc
from mesobox.records import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    # (kind, target, source, flags, data, file, recursive, hide, upper, work)
    MountStep = tuple[str, str, str, int, str, bool, bool, str, str, str]

NOSUID_NODEV = sc.MS_NOSUID | sc.MS_NODEV
STEP_KINDS = ("bind", "overlay", "remount", "skeleton", "symlink", "propagate", "device")


class MountOp(Record):
    # step() order; kept unsorted on purpose
    __slots__ = ("kind", "target", "source", "flags", "data", "file", "recursive", "hide",  # noqa: RUF023
                 "upper", "work")
    _defaults = {"source": "", "flags": 0, "data": "", "file": False, "recursive": False, "hide": "",
                 "upper": "", "work": ""}
    kind: str
    target: str
    source: str
    flags: int
    data: str
    file: bool
    recursive: bool
    hide: str
    upper: str
    work: str

    def describe(self) -> str:
        where = f"/{self.target}"
        if self.kind == "bind":
            return f"bind {self.source} -> {where} ({'ro' if self.flags & sc.MS_RDONLY else 'rw'})"
        if self.kind == "propagate":
            return f"propagation of {where}: {self.flags:#x}"
        if self.kind == "device":
            return f"device {where} ({self.source} {self.flags:#x}, {self.data})"
        if self.kind == "overlay":
            via = f" (fuse-overlayfs, {self.data})" if self.data else ""
            return f"overlay lower={self.source} upper={self.upper} -> {where}{via}"
        if self.kind == "remount":
            return f"remount {where} read-only"
        if self.kind == "skeleton":
            return f"skeleton of {where} (tmpfs + binds of its entries)"
        if self.kind == "symlink":
            return f"symlink {where} -> {self.source}"
        return f"{self.kind} on {where}" + (f" ({self.data})" if self.data else "")

    def step(self) -> MountStep:
        return (self.kind, self.target, self.source, self.flags, self.data, self.file, self.recursive, self.hide,
                self.upper, self.work)


def bind(source: str, target: str, readonly: bool = False, file: bool = False, flags: int = NOSUID_NODEV,
         recursive: bool = True, hide: str = "") -> MountOp:
    return MountOp(kind="bind", target=target, source=source, flags=flags | (sc.MS_RDONLY if readonly else 0),
                   file=file, recursive=recursive, hide=hide)


def tmpfs(target: str, flags: int = NOSUID_NODEV, data: str = "mode=755") -> MountOp:
    return MountOp(kind="tmpfs", target=target, source="tmpfs", flags=flags, data=data)


def proc(target: str) -> MountOp:
    """A new proc (with a pid namespace it must show that namespace's pids)."""
    return MountOp(kind="proc", target=target, source="proc", flags=NOSUID_NODEV | sc.MS_NOEXEC)


def devpts(target: str) -> MountOp:
    """A private devpts instance: ptys made inside are not the host's (devpts docs)."""
    return MountOp(kind="devpts", target=target, source="devpts", flags=sc.MS_NOSUID | sc.MS_NOEXEC,
                   data="newinstance,ptmxmode=0666,mode=620")


def overlay(lower: str, upper: str, work: str, target: str = "", squash: str = "") -> MountOp:
    return MountOp(kind="overlay", target=target, source=lower, upper=upper, work=work, data=squash)


def remount(target: str, flags: int, source: str = "") -> MountOp:
    return MountOp(kind="remount", target=target, flags=flags, source=source)


def skeleton(target: str) -> MountOp:
    return MountOp(kind="skeleton", target=target)


def symlink(link: str, points_to: str) -> MountOp:
    return MountOp(kind="symlink", target=link, source=points_to)


def filesystem(fstype: str, target: str, source: str, flags: int, data: str) -> MountOp:
    """A new filesystem of any type the kernel has (an OCI config's sysfs, mqueue, …)."""
    return MountOp(kind=fstype, target=target, source=source, flags=flags, data=data)


def propagate(target: str, flags: int) -> MountOp:
    return MountOp(kind="propagate", target=target, flags=flags)


def device(target: str, kind: str, major: int, minor: int, mode: int, uid: int, gid: int) -> MountOp:
    import os

    return MountOp(kind="device", target=target, source=kind, flags=os.makedev(major, minor),
                   data=f"{mode},{uid},{gid}")
