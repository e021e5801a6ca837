"""Instances room: pause/resume of an instance, and freeing its cgroup.

Two mechanisms, chosen by what the instance has:
- its own cgroup (root here: the supervisor creates one, see supervisor._make_cgroup):
  the freezer (v1 ``freezer.state``, v2 ``cgroup.freeze``) stops every task of the group
  atomically, and the tasks cannot tell (kernel cgroup-v1/freezer-subsystem.rst).
- no cgroup (an unprivileged user on cgroup v1, or v2 without delegation): SIGSTOP to
  each process of the container's tree, parents first.  That is *not* atomic — a process
  forking during the walk can escape it (we walk until no new process appears) — and it
  is visible: parents get SIGCHLD, and a workload may catch SIGCONT.  Said to the user.

Invariant: ``paused.json`` exists exactly while the instance is paused, naming the method.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from mesobox.errors import LaunchError, UsageError
from mesobox.instances import state as st

SIGSTOP_NOTE = (
    "note: no cgroup freezer for this instance (unprivileged on this host): paused with SIGSTOP, "
    "which is not atomic (a process forking meanwhile may escape) and is visible to the workload"
)


def _cgroup(record: Any) -> Any:
    if not record:
        return None
    from pathlib import Path

    from mesobox.isolation.cgroups import Cgroup

    cg = Cgroup(str(record["name"]), int(record["version"]), {k: Path(v) for k, v in record["dirs"].items()})
    return cg


def _live(inst: st.Instance) -> int:
    if inst.status not in (st.RUNNING, st.PAUSED, st.DEAD):
        raise UsageError(f"instance {inst.name!r} is {inst.status}, not running")
    pid = inst.workload_pid
    if pid is None:
        raise UsageError(f"instance {inst.name!r} has no running workload")
    return pid


def _stop_tree(root: int) -> list[int]:
    """SIGSTOP the tree until a pass finds no process it has not stopped."""
    stopped: list[int] = []
    while True:
        fresh = [p for p in st.process_tree(root) if p not in stopped]
        if not fresh:
            return stopped
        for pid in fresh:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped.extend(fresh)


def pause(inst: st.Instance) -> str:
    """Freeze the instance; returns the method used ("freezer" or "sigstop")."""
    pid = _live(inst)
    if inst.paused is not None:
        raise UsageError(f"instance {inst.name!r} is already paused")
    cg = _cgroup(inst.state.get("cgroup"))
    if cg is not None:
        cg.freeze()
        st.write_json(inst.path / "paused.json", {"method": "freezer"})
        return "freezer"
    pids = _stop_tree(pid)
    st.write_json(inst.path / "paused.json", {"method": "sigstop", "pids": pids})
    return "sigstop"


def resume(inst: st.Instance) -> str:
    if inst.paused is None:
        raise UsageError(f"instance {inst.name!r} is not paused")
    method = str(inst.paused.get("method"))
    _thaw(inst, method)
    return method


def _thaw(inst: st.Instance, method: str) -> None:
    if method == "freezer":
        cg = _cgroup(inst.state.get("cgroup"))
        if cg is None:
            raise LaunchError(f"instance {inst.name!r} was frozen but its cgroup is not recorded")
        cg.thaw()
    else:
        pid = inst.workload_pid
        if pid is not None:
            st.signal_tree(pid, signal.SIGCONT)
    with contextlib.suppress(FileNotFoundError):
        (inst.path / "paused.json").unlink()


def resume_quietly(inst: st.Instance) -> None:
    """Before stopping: thaw, so SIGTERM can be handled (a frozen task does not run its
    handler, and on v1 not even SIGKILL completes until thawed)."""
    paused = st.read_json(inst.path / "paused.json")
    if paused:
        with contextlib.suppress(LaunchError, OSError):
            _thaw(inst, str(paused.get("method")))


def release_cgroup(record: Any) -> None:
    """Kill what is left in the instance's cgroup and remove the directories."""
    cg = _cgroup(record)
    if cg is None:
        return
    cg.created = [p for p in cg.dirs.values() if p.is_dir()]
    with contextlib.suppress(LaunchError):
        cg.remove()
