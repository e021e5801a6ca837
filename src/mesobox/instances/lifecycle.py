"""Instances room: an instance's life as its user drives it: start it under a
detached supervisor and wait until it runs, list them, stop one.

``start`` claims the name, writes ``spec.json`` and starts ``instances.supervisor`` in
a new session (it forks again and outlives the caller); it returns once the workload
runs, or raises with the last line of the instance's log, leaving nothing behind.
``stop`` asks the supervisor (SIGTERM, grace, SIGKILL, cleanup); a supervisor that is
dead or does not answer is replaced by ``kill_leftovers``.  Then ``release_mounts``:
the shared squashfs mounts the instance held are unmounted at once when nobody else
uses them (their linger is for the next run of a short job, not for a service that was
stopped on purpose), and as root stop returns only once the loop devices of its
``--overlay`` images and of those mounts are detached.  See docs/instances.md.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mesobox.config import Config
from mesobox.errors import LaunchError
from mesobox.instances import state as st
from mesobox.instances.pause import release_cgroup, resume_quietly
from mesobox.procs import same_process

START_TIMEOUT = 120.0
SUPERVISOR_TIMEOUT = 15.0  # for the supervisor to take its lock and write state.json
SHOWN = (st.RUNNING, st.PAUSED, st.RESTARTING, st.STARTING)  # listed without --all


def start(config: Config, spec: dict[str, Any]) -> None:
    """Start the instance ``spec`` describes (cli/instance.py parse_start) and wait until
    its workload runs (or has already run, exited or paused)."""
    path = st.claim(config, spec["name"])
    spec = {**spec, "runtime_dir": st.home(config)}  # where its runs keep their state (paths.logout_safe)
    try:
        st.write_json(path / "spec.json", spec)
        with open(path / "output.log", "ab") as log:
            # setsid: the supervisor outlives this command and its terminal; it forks again.
            first = subprocess.run(
                [sys.executable, "-m", "mesobox.instances.supervisor", str(path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", start_new_session=True, check=False,
            )
        if first.returncode != 0:
            raise LaunchError(f"the supervisor of {spec['name']!r} could not start: {log_tail(path / 'output.log')}")
    except BaseException:
        st.remove(st.load(config, spec["name"]))
        raise
    await_start(config, spec["name"])


def await_start(config: Config, name: str) -> None:
    started = time.monotonic()
    while time.monotonic() < started + START_TIMEOUT:
        inst = st.load(config, name)
        if inst.status in (st.RUNNING, st.EXITED, st.PAUSED):
            return
        # state.json appears only once the supervisor holds its lock: before that, an
        # unlocked instance is not dead, just not there yet (unless it never comes).
        settled = bool(inst.state) or time.monotonic() > started + SUPERVISOR_TIMEOUT
        if settled and inst.status in (st.FAILED, st.DEAD) and not inst.supervisor_alive:
            tail = log_tail(inst.log)
            code = inst.state.get("exit_code")
            st.remove(inst)
            raise LaunchError(f"instance {name!r} failed to start (exit {code}): {tail}",
                              hint="try the same options with `mesobox run` to see the whole output")
        time.sleep(0.02)
    raise LaunchError(f"instance {name!r} did not start within {START_TIMEOUT:.0f} s",
                      hint=f"see `mesobox instance logs {name}`; `mesobox instance stop {name}` removes it")


def log_tail(log: Path) -> str:
    """The line of an instance's output that says why it failed: the last that
    mentions an error, else the last one."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1].strip()


def listing(config: Config, everything: bool) -> list[dict[str, Any]]:
    """Each instance's summary; without ``everything``, only those running or about to."""
    rows = [inst.summary() for inst in st.list_all(config)]
    return rows if everything else [r for r in rows if r["status"] in SHOWN]


def stop(inst: st.Instance, grace: float) -> None:
    """Ask the supervisor to stop (it does SIGTERM, grace, SIGKILL, cleanup); if it is
    dead or does not answer, do the same ourselves.  Then remove the state."""
    if inst.supervisor_alive:
        st.write_json(inst.path / "stop.json", {"grace": grace})
        pid = int(inst.state.get("supervisor_pid") or 0)
        if pid and same_process(pid, inst.state.get("supervisor_start")):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace + 15
        while st.supervisor_alive(inst.path) and time.monotonic() < deadline:
            time.sleep(0.02)
        if st.supervisor_alive(inst.path) and pid and same_process(pid, inst.state.get("supervisor_start")):
            os.kill(pid, signal.SIGKILL)
            st.wait_gone([pid], 5)
    final = st.Instance(inst.name, inst.path, inst.spec, st.read_json(inst.path / "state.json"))
    kill_leftovers(final, grace)
    release_mounts(final)
    st.remove(inst)


LOOP_TIMEOUT = 30.0  # for the kernel to let go of a loop device once its last mount is gone


def release_mounts(inst: st.Instance) -> None:
    """After the workload is gone: unmount the shared squashfs mounts it held that nobody
    else uses, then (root) wait until no loop device is backed by its overlay images or
    those squashfs files; one left after LOOP_TIMEOUT, unmounted everywhere, is detached."""
    runtime = inst.spec.get("runtime_dir")
    keys = [str(k) for k in inst.state.get("mounts") or []]
    if runtime and keys:
        from mesobox.launch.squashmount import drop_unused

        # Only those dropped are waited for: a mount another run still uses keeps its loop.
        keys = [os.path.basename(mountpoint) for mountpoint in drop_unused(str(runtime), keys)]
    else:
        keys = []
    if os.geteuid() != 0:
        return  # an ordinary user's mounts are FUSE ones: no loop device
    backing = overlay_images(inst.spec.get("options") or [], str(inst.spec.get("cwd") or "/"))
    deadline = time.monotonic() + LOOP_TIMEOUT
    while True:
        held = loops_backed_by(backing, keys)
        if not held or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for device in held:  # only marks it to go with its last mount if one is still there
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


def overlay_images(options: list[str], cwd: str) -> set[str]:
    """The ``--overlay FILE`` images (files, not directories) among run options as typed
    (relative to ``cwd``, where the instance was started)."""
    found: set[str] = set()
    for i, word in enumerate(options):
        value = options[i + 1] if word == "--overlay" and i + 1 < len(options) else None
        if word.startswith("--overlay="):
            value = word.split("=", 1)[1]
        if value:
            path = os.path.join(cwd, value)
            if os.path.isfile(path):
                found.add(os.path.realpath(path))
    return found


def loops_backed_by(files: set[str], keys: list[str]) -> list[str]:
    """Loop devices (/dev/loopN) whose backing file is one of ``files`` or is the image
    of a shared-mount key (its device, inode, size, mtime: squashmount.image_key)."""
    from mesobox.launch.squashmount import image_key

    held = []
    for name in os.listdir("/sys/block") if os.path.isdir("/sys/block") else []:
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        key = None
        with contextlib.suppress(OSError):
            key = image_key(backing)
        if backing in files or (key is not None and key in keys):
            held.append(f"/dev/{name}")
    return held


def kill_leftovers(inst: st.Instance, grace: float) -> None:
    """For a dead supervisor: end the workload tree ourselves (SIGTERM, grace, SIGKILL)."""
    resume_quietly(inst)
    pid = inst.workload_pid
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not st.wait_gone([pid], grace):
            st.wait_gone(st.signal_tree(pid, signal.SIGKILL), 5)
    release_cgroup(inst.state.get("cgroup"))
