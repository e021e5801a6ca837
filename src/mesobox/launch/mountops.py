"""Mount room: the container's filesystem as a list of small, frozen operations.

Each operation has ``describe()`` (one line, printed by ``--debug``) and ``step()``:
the plain tuple that ``execute.run_steps`` applies below the new root (execute.py
lists the steps and the invariants that make them safe: every target reached
without following a symlink, mount points created only in filesystems mesobox owns,
locked flags repeated on remounts).  The planner (plan.py) orders them parents-first.
"""

from __future__ import annotations

from mesobox.launch import syscalls as sc
from mesobox.records import Record


class Op(Record):
    __slots__ = ()

    def describe(self) -> str:
        raise NotImplementedError

    def step(self) -> tuple[object, ...]:
        """The mount step execute.run_steps applies (execute.py lists their fields)."""
        raise NotImplementedError


class Bind(Op):
    """Bind ``source`` (a host path) on ``target`` (relative to the new root)."""

    __slots__ = ("flags", "hide", "kind", "readonly", "recursive", "source", "target")
    _defaults = {"readonly": False, "kind": "dir", "flags": sc.MS_NOSUID | sc.MS_NODEV, "recursive": True,
                 "hide": ""}
    source: str
    target: str
    readonly: bool
    kind: str  # "dir" or "file": what to create as the mount point
    flags: int
    recursive: bool
    hide: str  # the workspace's path below source: its copy is detached after an rbind

    def describe(self) -> str:
        return f"bind {self.source} -> /{self.target} ({'ro' if self.readonly else 'rw'})"

    def step(self) -> tuple[object, ...]:
        remount = (sc.MS_RDONLY if self.readonly else 0) | self.flags
        return ("bind", self.source, self.target, self.kind, self.recursive, self.hide, remount)


class Tmpfs(Op):
    __slots__ = ("data", "flags", "target")
    _defaults = {"flags": sc.MS_NOSUID | sc.MS_NODEV, "data": "mode=755"}
    target: str
    flags: int
    data: str

    def describe(self) -> str:
        return f"tmpfs on /{self.target} ({self.data})"

    def step(self) -> tuple[object, ...]:
        return ("mount", "tmpfs", "tmpfs", self.target, self.flags, self.data)


class Proc(Op):
    """A new proc (with a pid namespace: it must show that namespace's pids)."""

    __slots__ = ("target",)
    target: str

    def describe(self) -> str:
        return f"proc on /{self.target}"

    def step(self) -> tuple[object, ...]:
        return ("mount", "proc", "proc", self.target, sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, None)


class Devpts(Op):
    """A private devpts instance: ptys made inside are not the host's (devpts docs)."""

    __slots__ = ("target",)
    target: str

    def describe(self) -> str:
        return f"devpts (newinstance) on /{self.target}"

    def step(self) -> tuple[object, ...]:
        return ("mount", "devpts", "devpts", self.target, sc.MS_NOSUID | sc.MS_NOEXEC,
                "newinstance,ptmxmode=0666,mode=620")


class Overlay(Op):
    """Overlay ``lower`` + ``upper`` on ``target`` (kernel overlayfs, fuse-overlayfs fallback)."""

    __slots__ = ("lower", "target", "upper", "work")
    lower: str
    upper: str
    work: str
    target: str

    def describe(self) -> str:
        return f"overlay lower={self.lower} upper={self.upper} -> /{self.target}"

    def step(self) -> tuple[object, ...]:
        return ("overlay", self.lower, self.upper, self.work, self.target)


class Remount(Op):
    """Make an existing mount read-only (the root, after its mount points exist)."""

    __slots__ = ("flags", "source", "target")
    target: str
    flags: int
    source: str  # whose locked flags to keep; "" for a mount made in this namespace

    def describe(self) -> str:
        return f"remount /{self.target} read-only"

    def step(self) -> tuple[object, ...]:
        return ("remount", self.target, self.flags, self.source)


class Skeleton(Op):
    """Replace the image directory ``target`` by a tmpfs holding binds of each of its
    entries (Apptainer's "underlay"): missing mount points are made in the tmpfs."""

    __slots__ = ("target",)
    target: str

    def describe(self) -> str:
        return f"skeleton of /{self.target} (tmpfs + binds of its entries)"

    def step(self) -> tuple[object, ...]:
        return ("skeleton", self.target)


class Symlink(Op):
    __slots__ = ("link", "target")
    link: str
    target: str

    def describe(self) -> str:
        return f"symlink /{self.link} -> {self.target}"

    def step(self) -> tuple[object, ...]:
        return ("symlink", self.link, self.target)
