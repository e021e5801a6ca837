"""Instances room (cloud mode): on-disk state of long-lived containers and the queries on it.

Layout, one directory per instance under ``home(config)/instances/NAME/``: the runtime
dir, except when that lies in the login session's $XDG_RUNTIME_DIR, which the login
manager deletes at logout while instances live on; then /tmp/mesobox-UID
(paths.logout_safe).  Instances an older mesobox left in ``$XDG_RUNTIME_DIR/mesobox``
are still found there (``registries``).

- ``spec.json``   what ``instance start`` asked for (written once by the CLI, before the
  supervisor starts).
- ``state.json``  the live record, written *only* by the supervisor, always atomically
  (write a temporary file, then ``os.replace``: rename(2) is atomic on one filesystem).
- ``lock``        held with ``flock(LOCK_EX)`` by the supervisor for its whole life.  The
  kernel drops the lock when the supervisor dies, even by SIGKILL, so "supervisor alive"
  never depends on a pid that may have been reused.
- ``output.log``  the workload's stdout+stderr and the supervisor's own notes.
- ``stop.json``   a stop request (grace period) from ``instance stop``.
- ``paused.json`` present while ``instance pause`` holds the instance, with the method used.

Invariants:
- A directory exists for exactly as long as the name is taken; ``mkdir`` is the atomic
  claim of a name.
- Every pid read from state is checked against its recorded start time (field 22 of
  /proc/PID/stat, proc(5)) before anyone signals it.
- Nothing here imports the launcher: the workload is ``mesobox run`` in a child process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from mesobox.config import Config
from mesobox.errors import LaunchError, UsageError
from mesobox.files import write_atomic
from mesobox.procs import proc_stat, same_process

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# Statuses written by the supervisor; "dead" and "paused" are derived when reading.
STARTING, RUNNING, RESTARTING, EXITED, FAILED = "starting", "running", "restarting", "exited", "failed"
DEAD, PAUSED = "dead", "paused"


def home(config: Config) -> str:
    """The runtime dir of instances: one that outlives the login session (see the
    module docstring), checked to be the caller's private one (paths.runtime_dir)."""
    from mesobox import paths

    return paths.runtime_dir(paths.logout_safe(config.runtime_dir_str, os.environ))


def instances_dir(config: Config) -> Path:
    """The instances directory, in a runtime dir that is the caller's private one
    (paths.runtime_dir): a directory another user planted is never looked into."""
    return Path(home(config)) / "instances"


def registries(config: Config) -> list[Path]:
    """Where instances are looked for: ``instances_dir``, then the runtime dir's own
    ``instances`` when that differs and exists (instances started before they moved
    out of $XDG_RUNTIME_DIR).  Each is trusted only when private (paths.runtime_dir)."""
    from mesobox import paths

    found = [instances_dir(config)]
    old = config.runtime_dir_str
    if os.path.normpath(old) != os.path.normpath(home(config)) and os.path.isdir(os.path.join(old, "instances")):
        found.append(Path(paths.runtime_dir(old)) / "instances")
    return found


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise UsageError(f"bad instance name {name!r}", hint="1-63 of A-Z a-z 0-9 _ . -, starting alphanumeric")
    return name


def instance_dir(config: Config, name: str) -> Path:
    """Where the instance ``name`` is: the first registry that has it, else where
    ``claim`` would make it."""
    check_name(name)
    for top in registries(config):
        if os.path.lexists(top / name):
            return top / name
    return instances_dir(config) / name


def _own_dir(path: Path) -> bool:
    """A real directory (no symlink) of the caller's that nobody else may write."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022


def claim(config: Config, name: str) -> Path:
    """Create the instance directory; a taken name (in any registry) is a clear error."""
    from mesobox import paths

    paths.private_subdir(home(config), "instances")
    path = instance_dir(config, name)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        inst = load(config, name)
        raise UsageError(
            f"an instance named {name!r} already exists ({inst.status})",
            hint=f"pick another name, or `mesobox instance stop {name}` to stop and remove it",
        ) from None
    return path


# --- atomic JSON ----------------------------------------------------------------------


def write_json(path: Path | str, data: dict[str, Any], dir_fd: int | None = None) -> None:
    """Write-then-rename, so a reader sees the old or the new record, never half of one.
    With ``dir_fd``, ``path`` is relative to it (the supervisor's own directory)."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode(), mode=0o666, durable=True, dir_fd=dir_fd)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data: dict[str, Any] = json.load(f)
            return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise LaunchError(
            f"cannot read {path}: {err}", hint="the instance state is damaged; `mesobox instance stop` removes it"
        ) from None


# --- processes --------------------------------------------------------------------------


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None:
                kids.setdefault(stat[0], []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants, parents before children."""
    if proc_stat(root) is None:
        return []
    kids = children_map()
    order, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        order.append(pid)
        queue.extend(kids.get(pid, []))
    return order


def signal_tree(root: int, sig: int) -> list[int]:
    """Signal ``root`` and every descendant, top-down; returns the pids signalled."""
    pids = process_tree(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(proc_stat(p) is not None for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- the instance record ------------------------------------------------------------------


class Instance:
    """One instance as read from disk; ``status`` folds in liveness and pause."""

    def __init__(self, name: str, path: Path, spec: dict[str, Any], state: dict[str, Any]) -> None:
        self.name, self.path, self.spec, self.state = name, path, spec, state
        self.supervisor_alive = supervisor_alive(path)
        self.paused = read_json(path / "paused.json") if (path / "paused.json").exists() else None

    @property
    def status(self) -> str:
        recorded = str(self.state.get("status", STARTING))
        if recorded in (EXITED, FAILED):
            return recorded
        if not self.supervisor_alive:
            return DEAD  # the supervisor was killed: nobody restarts or cleans up
        return PAUSED if self.paused is not None and recorded == RUNNING else recorded

    @property
    def workload_pid(self) -> int | None:
        pid = self.state.get("workload_pid")
        started = self.state.get("workload_start")
        return int(pid) if pid and same_process(int(pid), started) else None

    @property
    def log(self) -> Path:
        return self.path / "output.log"

    def summary(self) -> dict[str, Any]:
        started = self.state.get("run_started")
        live = self.status in (RUNNING, PAUSED, RESTARTING)
        return {
            "name": self.name,
            "image": self.spec.get("image"),
            "image_ran": self.state.get("image"),  # REFERENCE@DIGEST (or path) of the current run
            "status": self.status,
            "pid": self.workload_pid,
            "supervisor_pid": self.state.get("supervisor_pid"),
            "restarts": int(self.state.get("restarts", 0)),
            "uptime_s": round(time.time() - started, 1) if started and live else None,
            "exit_code": self.state.get("exit_code"),
            "started": self.state.get("started"),
        }


def supervisor_alive(path: Path) -> bool:
    """Is the supervisor's flock on ``lock`` held?  (flock(2): released when it dies.)"""
    try:
        fd = os.open(path / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def load(config: Config, name: str) -> Instance:
    path = instance_dir(config, name)
    if not _own_dir(path):  # missing; or, in a private registry, never someone else's
        raise UsageError(f"no instance named {name!r}", hint="`mesobox instance list --all` shows the instances")
    return Instance(name, path, read_json(path / "spec.json"), read_json(path / "state.json"))


def list_all(config: Config) -> list[Instance]:
    names: set[str] = set()
    for top in registries(config):
        with contextlib.suppress(FileNotFoundError):
            names.update(entry for entry in os.listdir(top) if _NAME_RE.fullmatch(entry))
    found = []
    for name in sorted(names):
        with contextlib.suppress(UsageError):  # removed while we looked
            found.append(load(config, name))
    return found


def namespace_target(root: int) -> int:
    """The process whose namespaces ``instance exec`` joins: with ``--pid`` the launcher
    stays outside the new pid namespace, so prefer the first process of the tree that is
    inside one; else the first one in another mount namespace than ours."""
    tree = process_tree(root)
    own_pid, own_mnt = os.readlink("/proc/self/ns/pid"), os.readlink("/proc/self/ns/mnt")
    for kind, own in (("pid", own_pid), ("mnt", own_mnt)):
        for pid in tree:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/{kind}") != own:
                    return pid
    raise LaunchError(f"process {root} is not inside a container", hint="the instance may still be starting; retry")


def remove(inst: Instance) -> None:
    shutil.rmtree(inst.path, ignore_errors=True)
