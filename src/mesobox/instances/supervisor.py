"""Instances room: the detached supervisor that keeps one instance's workload alive.

Started by ``mesobox instance start`` as ``python -m mesobox.instances.supervisor DIR`` in a
new session (setsid) with stdin from /dev/null and stdout/stderr on ``DIR/output.log``;
it forks once more so it is not a session leader and can never acquire a controlling
terminal again (the classic double fork, see daemon(7) "SysV Daemons").

Invariants:
- It holds ``flock(DIR/lock)`` for its whole life: that lock *is* "the instance is
  supervised" (instances.supervisor_alive).
- It is the only writer of ``DIR/state.json``, always atomically, through a descriptor of
  DIR opened at its start: should DIR be deleted under it (a login manager's clean-up of
  $XDG_RUNTIME_DIR, where older versions kept instances), it goes on supervising
  instead of dying on a missing path and leaving the workload unmanaged, and registers
  the instance again (``reregister``): a new DIR in the logout-safe place holding its
  spec, state, a new held lock and the output so far, so list/logs/stop find it.
- It records in ``state.json`` the shared squashfs mounts each run holds (``mounts``)
  so that ``instance stop`` can unmount them without their linger.
- It is a child subreaper (prctl(2) PR_SET_CHILD_SUBREAPER), so anything the workload
  forks and orphans is re-parented to it and is killed when the workload ends: an
  instance leaves no process behind, with or without a cgroup.
- The workload is ``mesobox run OPTIONS IMAGE ARGS`` in a child process; without
  ``--pid`` that child execs the container's process, so its pid is the workload's.
- Signals never run code beyond setting a byte: they are read from a wakeup pipe
  (signal.set_wakeup_fd) in the one select() loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mesobox import procs
from mesobox.errors import MesoboxError
from mesobox.instances import state as st

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
MAX_BACKOFF = 5.0
STABLE_RUN = 10.0


class Supervisor:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.spec: dict[str, Any] = st.read_json(path / "spec.json")
        now = time.time()
        self.state: dict[str, Any] = {
            "supervisor_pid": os.getpid(), "supervisor_start": procs.start_time(os.getpid()),
            "status": st.STARTING, "restarts": 0, "started": now, "run_started": now,
            "workload_pid": None, "workload_start": None, "exit_code": None, "cgroup": None,
        }
        self.child: subprocess.Popen[bytes] | None = None
        self.child_status: int | None = None
        self.stopping = False
        self.deadline = now + float(self.spec["time_limit"]) if self.spec.get("time_limit") else None
        self.cgroup: Any = None
        self.quick_failures = 0
        self.log_offset = 0
        self.dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.old_log: int | None = None  # after a re-registration: the deleted log the workload still writes
        self.unregistered = False  # the directory is gone and could not be made again
        self.lock: int | None = None

    # --- state -----------------------------------------------------------------------
    def save(self, **changes: Any) -> None:
        self.state.update(changes)
        st.write_json("state.json", self.state, dir_fd=self.dirfd)

    def note(self, text: str) -> None:
        sys.stderr.write(f"mesobox: instance {self.spec['name']}: {text}\n")
        sys.stderr.flush()

    # --- the workload -----------------------------------------------------------------
    def launch(self) -> None:
        sys.stdout.flush()
        self.log_offset = os.lseek(sys.stdout.fileno(), 0, os.SEEK_END)
        # An instance is a service, not an MPI rank: its own user namespace unless its
        # options say otherwise (the last --userns given counts).
        argv = [sys.executable, "-m", "mesobox", "run", "--userns=private", *self.spec["options"], self.spec["image"],
                *self.spec["args"]]
        cgroup = self.cgroup
        join = (lambda: cgroup.add_pid(os.getpid())) if cgroup is not None else None
        # Its runs keep their runtime state (workspace, shared mounts) where the instance
        # is registered: out of $XDG_RUNTIME_DIR, which goes at logout (paths.logout_safe).
        env = dict(os.environ)
        if self.spec.get("runtime_dir"):
            env["MESOBOX_RUNTIME_DIR"] = str(self.spec["runtime_dir"])
        # The child joins the freezer cgroup *before* exec, so nothing it forks escapes.
        self.child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=sys.stdout, stderr=sys.stderr,
            cwd=self.spec.get("cwd") or "/", preexec_fn=join, start_new_session=False, env=env,
        )
        self.child_status = None
        self.save(workload_pid=self.child.pid, workload_start=procs.start_time(self.child.pid),
                  run_started=time.time(), exit_code=None)

    def launcher_failed(self) -> bool:
        """Did this launch's output include the CLI boundary's ``mesobox: error:`` line?"""
        try:
            with open("output.log", "rb", opener=lambda name, flags: os.open(name, flags, dir_fd=self.dirfd)) as log:
                log.seek(self.log_offset)
                return any(line.startswith(b"mesobox: error:") for line in log.read(1 << 20).splitlines())
        except OSError:
            return False

    def reached_workload(self) -> bool:
        """True once `mesobox run` has exec'd the container's process (its command line
        changed) or forked one in a new pid namespace.  A helper it runs on the host
        while it sets up (losetup, mount, squashfuse, newuidmap, slirp4netns) has
        another command line too, but our mount namespace: it does not count."""
        assert self.child is not None
        own = _cmdline(self.child.pid)
        ours = os.readlink("/proc/self/ns/mnt")
        for pid in st.process_tree(self.child.pid):
            if _cmdline(pid) not in (own, b"") and pid != self.child.pid and _mount_ns(pid) not in (ours, None):
                return True
        return own != b"" and own != _cmdline_of_argv(self.child.args)

    def mounts_held(self) -> list[str]:
        """The shared squashfs mounts of this instance's runs so far: those its launcher
        (the workload's pid and start time) holds now, and those recorded before."""
        held = set(self.state.get("mounts") or [])
        runtime = self.spec.get("runtime_dir")
        if runtime and self.state.get("workload_pid"):
            from mesobox.launch.squashmount import held_by

            held.update(held_by(str(runtime), f"{self.state['workload_pid']}:{self.state['workload_start']}"))
        return sorted(held)

    def reap(self) -> None:
        """Collect every exited child: the workload and any orphan re-parented to us."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.child is not None and pid == self.child.pid:
                self.child_status = os.waitstatus_to_exitcode(status)
                self.child.returncode = self.child_status

    def terminate(self, grace: float) -> None:
        """SIGTERM the container's process (or, with --checkpoint-dir, the checkpoint
        signal), wait ``grace`` seconds, then SIGKILL the tree."""
        if self.child is None or self.child_status is not None:
            return
        from mesobox.instances.pause import resume_quietly

        resume_quietly(st.Instance(self.spec["name"], self.path, self.spec, self.state))
        name = self.spec.get("stop_signal") or "TERM"
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child.pid, getattr(signal, f"SIG{name}", signal.SIGTERM))
        deadline = time.monotonic() + grace
        while self.child_status is None and time.monotonic() < deadline:
            time.sleep(0.02)
            self.reap()
        if self.child_status is None:
            self.note(f"still running {grace:g} s after SIG{name}: sending SIGKILL")
            st.signal_tree(self.child.pid, signal.SIGKILL)
            while self.child_status is None:
                time.sleep(0.01)
                self.reap()

    def kill_orphans(self) -> None:
        """Anything the workload left behind is re-parented to us (subreaper): end it —
        except the helpers of a shared squashfs mount (its FUSE daemon, its watcher),
        which daemonised into our care too but serve every container of that image:
        they go with the mount (lifecycle.release_mounts, or the linger)."""
        mine = [p for p in st.process_tree(os.getpid()) if p != os.getpid() and not _mount_helper(p)]
        for pid in mine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while mine and time.monotonic() < deadline:
            self.reap()
            mine = [p for p in mine if procs.proc_stat(p) is not None]
            time.sleep(0.01)

    # --- registration -------------------------------------------------------------------
    def check_registered(self) -> None:
        """Register again when our directory was deleted (st_nlink 0 on its descriptor)."""
        if self.unregistered or os.fstat(self.dirfd).st_nlink > 0:
            return
        try:
            self.reregister()
        except (OSError, MesoboxError) as err:  # nowhere to go: supervise on, unlisted
            self.unregistered = True
            self.note(f"its state directory {self.path} was deleted and cannot be made again: {err}")

    def reregister(self) -> None:
        """Make the instance's directory again, in the logout-safe runtime dir (private
        checks included): spec, state, a held lock, and the output so far, copied from
        the deleted log that the workload may still be writing (pumped on from then)."""
        from mesobox import paths

        home = paths.logout_safe(str(self.spec.get("runtime_dir") or self.path.parent.parent), os.environ)
        paths.forget_checked(home)  # it may be gone too: check and make it afresh
        path = Path(paths.private_subdir(home, "instances")) / self.spec["name"]
        path.mkdir(mode=0o700)  # FileExistsError: someone took the name meanwhile
        dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        lock = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
        fcntl.flock(lock, fcntl.LOCK_EX)
        st.write_json("spec.json", self.spec, dir_fd=dirfd)
        sys.stdout.flush()
        sys.stderr.flush()
        old = os.open(f"/proc/self/fd/{sys.stdout.fileno()}", os.O_RDONLY | os.O_CLOEXEC)
        log = os.open("output.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=dirfd)
        os.dup2(log, sys.stdout.fileno())
        os.dup2(log, sys.stderr.fileno())
        os.close(log)
        if self.old_log is not None:
            os.close(self.old_log)
        self.old_log = old
        self.pump_old_log()
        os.close(self.dirfd)
        self.dirfd, self.path, self.lock = dirfd, path, lock
        self.save()
        self.note(f"its state directory was deleted: registered again as {path}")

    def pump_old_log(self) -> None:
        """Copy what the workload wrote to the deleted log since the last look."""
        if self.old_log is None:
            return
        while chunk := os.read(self.old_log, 1 << 16):
            os.write(sys.stdout.fileno(), chunk)

    # --- policy ----------------------------------------------------------------------
    def should_restart(self, code: int) -> bool:
        policy, limit = self.spec.get("restart", "no"), self.spec.get("restart_max")
        if self.stopping or policy == "no" or (policy == "on-failure" and code == 0):
            return False
        return limit is None or int(self.state["restarts"]) < int(limit)

    def wait_events(self, wake: int, timeout: float) -> None:
        self.check_registered()
        self.pump_old_log()
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([wake], [], [], max(timeout, 0))
            if ready:
                with contextlib.suppress(BlockingIOError):
                    for sig in os.read(wake, 64):
                        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                            self.stopping = True
        self.reap()

    def grace(self) -> float:
        request = st.read_json(Path(f"/proc/self/fd/{self.dirfd}/stop.json"))
        return float(request.get("grace", self.spec.get("grace", 10)))

    def run_once(self, wake: int) -> int:
        """Launch, watch, and return the workload's exit code."""
        self.launch()
        up = False
        started = time.monotonic()
        while self.child_status is None:
            if not up and self.reached_workload():
                up = True
                self.save(status=st.RUNNING, image=image_ran(self.spec["image"]), mounts=self.mounts_held())
            elif up and self.mounts_held() != self.state.get("mounts"):
                # "up" can be seen before `mesobox run` has made every mount (a helper it
                # spawned has another command line too): look again while it runs.
                self.save(mounts=self.mounts_held())
            if self.stopping:
                self.save(mounts=self.mounts_held())  # its launcher is alive: its refs are still there
                self.terminate(self.grace())
                break
            if self.deadline is not None and time.time() >= self.deadline:
                self.note(f"time limit of {self.spec['time_limit']:g} s reached: stopping")
                self.stopping = True
                self.terminate(float(self.spec.get("grace", 10)))
                break
            # Poll fast while `mesobox run` sets up (usually ~20 ms), slower during a long pull.
            wait = min(0.01 + (time.monotonic() - started) / 20, 0.5) if not up else 1.0
            if self.deadline is not None:
                wait = min(wait, self.deadline - time.time())
            self.wait_events(wake, wait)
        self.kill_orphans()
        assert self.child_status is not None
        code = self.child_status if self.child_status >= 0 else 128 - self.child_status
        # `mesobox run` itself failed (bad image, mount, command not found) when it said so
        # on stderr before the workload ever ran; any other exit is the workload's business.
        if not up and self.state["restarts"] == 0 and not self.stopping and code and self.launcher_failed():
            self.save(status=st.FAILED, exit_code=code)
            raise SystemExit(0)
        return code

    def main(self, wake: int) -> None:
        self.cgroup = _make_cgroup(self.spec["name"])
        if self.cgroup is not None:
            self.save(cgroup={"name": self.cgroup.name, "version": self.cgroup.version,
                              "dirs": {k: str(v) for k, v in self.cgroup.dirs.items()}})
        try:
            while True:
                code = self.run_once(wake)
                if not self.should_restart(code):
                    self.save(status=st.EXITED, exit_code=code)
                    return
                # Docker's rule: the delay doubles while the workload keeps failing fast and
                # starts over once a run lasted STABLE_RUN seconds.
                ran = time.time() - float(self.state["run_started"])
                self.quick_failures = 0 if ran >= STABLE_RUN else self.quick_failures + 1
                backoff = min(0.1 * 2 ** (self.quick_failures - 1), MAX_BACKOFF) if self.quick_failures else 0.1
                self.note(f"workload exited with {code}: restarting in {backoff:.1f} s")
                self.save(status=st.RESTARTING, exit_code=code, restarts=int(self.state["restarts"]) + 1)
                self.wait_events(wake, backoff)
                if self.stopping:
                    self.save(status=st.EXITED)
                    return
        finally:
            with contextlib.suppress(OSError):
                (self.path / "paused.json").unlink()
            if self.cgroup is not None:
                with contextlib.suppress(Exception):
                    self.cgroup.remove()


def _make_cgroup(name: str) -> Any:
    """A freezer/accounting cgroup when this user may create one (root on v1 here);
    None otherwise: pause then falls back to SIGSTOP (see instances/pause.py)."""
    from mesobox.errors import MesoboxError
    from mesobox.isolation.cgroups import Cgroup
    from mesobox.oci.spec import Resources

    try:
        return Cgroup.create(f"instance-{os.getuid()}-{name}", Resources())
    except (MesoboxError, OSError):
        return None


def _mount_helper(pid: int) -> bool:
    """A squashfuse daemon or a ``mesobox-watcher`` in our own mount namespace (where
    shared mounts are made; a container's processes are always in a namespace of their
    own, so none of them passes for one)."""
    try:
        if os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
            return False
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False
    return comm == "mesobox-watcher" or exe.startswith("squashfuse")


def _mount_ns(pid: int) -> str | None:
    """The mount namespace of ``pid``; None when it is gone or not ours to look at (a
    setuid helper such as newuidmap while it runs)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _cmdline_of_argv(argv: Any) -> bytes:
    return b"".join(os.fsencode(str(a)) + b"\0" for a in argv)


def image_ran(image: str) -> str | None:
    """The provenance of the run that just started: REFERENCE@DIGEST of the stored image
    its name resolves to now (the run has pulled it if it had to), or the image's path."""
    if image.startswith("/"):
        return image
    try:
        from mesobox.config import load_config
        from mesobox.image.store import Store

        record = Store(load_config()).lookup(image)
    except Exception:  # a name the run itself refused: nothing ran from it
        return None
    return f"{record.reference}@{record.digest}" if record is not None else None


def _daemonize() -> None:
    """Second fork: the session leader exits, the supervisor lives on as its child."""
    if os.fork() > 0:
        os._exit(0)


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    _daemonize()
    lock = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel when we exit, however we exit
    from mesobox.launch.syscalls import prctl

    prctl(PR_SET_CHILD_SUBREAPER, 1)
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_end)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, lambda *_: None)  # the byte on the wakeup pipe is what counts
    sup = Supervisor(path)
    try:
        sup.save()
        sup.main(read_end)
    except SystemExit:
        pass
    except BaseException as err:  # the log is the only place left to say it
        sup.note(f"supervisor failed: {err!r}")
        sup.kill_orphans()
        sup.save(status=st.FAILED, exit_code=125)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
