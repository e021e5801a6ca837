"""Test harness for the isolation building blocks, standing in for the launcher.

Each helper runs a small Python program (as root or as the ordinary test user) that
does what the launcher will do around the code under test: unshare namespaces with
ctypes (Python 3.11 has no os.unshare), set no_new_privs, call mesobox's functions,
then run a workload and print a JSON result.  The programs are written to a
world-readable directory so the test user can run them.

For cgroup v2 on a host whose controllers are bound to v1: ``RealCgroup2`` mounts a
real cgroup2 hierarchy in a private mount namespace, and ``FakeCgroupV2`` is a tree that
keeps the kernel's rules and resulting state (test_cgroups.py checks the two agree).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Shared by every child program: unshare via libc, uid/gid maps, no_new_privs.
PRELUDE = textwrap.dedent(
    """
    import ctypes, json, os, socket, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
    PR_SET_NO_NEW_PRIVS = 38

    def unshare(flags):
        if libc.unshare(flags) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), "unshare")

    def map_ids(inside=0):
        uid, gid = os.getuid(), os.getgid()
        unshare(CLONE_NEWUSER | CLONE_NEWNET)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{inside} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{inside} {gid} 1")

    def no_new_privs():
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")

    def syscall_errno(number, *args):
        libc.syscall.restype = ctypes.c_long
        rc = libc.syscall(ctypes.c_long(number), *[ctypes.c_long(a) for a in args])
        return 0 if rc >= 0 else ctypes.get_errno()
    """
)


def write_program(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(PRELUDE + textwrap.dedent(body))
    os.chmod(path, 0o644)
    return path


def run_program(
    python: str,
    src: Path,
    program: Path,
    *args: str,
    user: Any = None,
    timeout: float = 60,
) -> tuple[subprocess.CompletedProcess[bytes], dict[str, Any]]:
    """Run ``program`` (as ``user`` if given); the last stdout line is its JSON result."""
    env = {"PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [python, str(program), *args]
    if user is not None:
        proc = user.run(argv, env=env, timeout=timeout)
    else:
        proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, timeout=timeout, check=False)
    lines = proc.stdout.decode().strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    return proc, result


def spawn_in_cgroup(cgroup: Any, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` already inside ``cgroup``: the child moves itself before exec."""
    return subprocess.Popen(
        list(argv),
        preexec_fn=lambda: cgroup.add_pid(os.getpid()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def python_workload(code: str) -> list[str]:
    return [sys.executable, "-S", "-c", textwrap.dedent(code)]


def wait_for(check: Any, timeout: float = 60.0) -> bool:
    """Poll ``check`` until it holds or ``timeout`` (a generous ceiling against hangs,
    never a timing) has passed; returns whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


_REAL_MKDIR = Path.mkdir  # the fake stands in for these under its root, and needs the real ones
_REAL_RMDIR = Path.rmdir

# The order the kernel lists controllers in (kernel/cgroup/cgroup_subsys.h), whatever
# the order they were enabled in.
KERNEL_ORDER = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc")
# Interface files a group has from its creation (the root group lacks the last four),
# and those a controller adds once the parent enables it, as a fresh group reads them
# (Documentation/admin-guide/cgroup-v2.rst, "Core Interface Files" and "Controllers").
CORE_FILES = {
    "cgroup.procs": "", "cgroup.controllers": "", "cgroup.subtree_control": "",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    "cgroup.events": "populated 0\nfrozen 0\n", "cgroup.freeze": "0\n", "cgroup.kill": "", "cgroup.type": "domain\n",
}
NOT_IN_ROOT = ("cgroup.events", "cgroup.freeze", "cgroup.kill", "cgroup.type")
CONTROLLER_FILES = {
    "cpuset": {"cpuset.cpus": "\n", "cpuset.mems": "\n"},
    "cpu": {"cpu.max": "max 100000\n", "cpu.weight": "100\n"},
    "io": {"io.max": "", "io.stat": ""},
    "memory": {"memory.max": "max\n", "memory.current": "0\n", "memory.peak": "0\n", "memory.swap.max": "max\n",
               "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
}
IO_KEYS = ("rbps", "wbps", "riops", "wiops")


def _os_error(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def _render(controllers: Iterable[str]) -> str:
    chosen = set(controllers)
    return " ".join(c for c in KERNEL_ORDER if c in chosen) + "\n"


class FakeCgroupV2:
    """A cgroup2 tree that answers as the kernel does, for the v2 code paths on a host
    whose controllers are bound to cgroup v1.  (The real cgroup2 tier in test_cgroups.py
    runs what a cgroup2 mount allows here, and asks the fake and the kernel the same
    questions about these rules.)

    What the fake keeps is the resulting state (files' contents, groups made and gone)
    and the kernel's rules; never the order of writes, except where an order is a
    kernel rule, named below where it is enforced:
    - mkdir makes a group with the core files and those of each controller its parent
      enables in cgroup.subtree_control; its cgroup.controllers lists them;
    - a write to a file the group does not have fails EACCES, as cgroupfs cannot create
      files: a limit needs its controller enabled in the parent *first*;
    - cgroup.subtree_control takes "+name"/"-name" of names in the group's own
      cgroup.controllers (else ENOENT), and lists them in the kernel's order;
    - "no internal processes": a non-root group holding processes cannot enable a
      controller for its children (EBUSY), and no process can join a non-root group that
      has enabled one (EBUSY): so a group must be vacated *before* it hands one down;
    - cgroup.procs moves a pid out of its old group; cgroup.events says populated;
    - io.max keeps one line per device, merging the keys each write names;
    - cgroup.freeze is acknowledged in cgroup.events at once (no real tasks to stop);
      cgroup.kill empties the group and those below it;
    - rmdir fails EBUSY while the group has child groups or processes.
    """

    def __init__(self, root: Path, own: str = "/user.slice/job", controllers: str = "cpuset cpu io memory pids"):
        self.root = root
        self.own = root / own.lstrip("/")
        _REAL_MKDIR(root, parents=True)
        for name, text in CORE_FILES.items():
            if name not in NOT_IN_ROOT:
                (root / name).write_text(text)
        (root / "cgroup.controllers").write_text(_render(controllers.split()))
        group = root
        for part in self.own.relative_to(root).parts:  # every group above ours hands all down, as systemd does
            self.write(group / "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers.split()))
            group = group / part
            self.mkdir(group)
        self.proc_self_cgroup = root.parent / "proc-self-cgroup"
        self.proc_self_cgroup.write_text(f"0::{own}\n")

    # --- what the code under test reaches, patched in for open, Path.mkdir, Path.rmdir ---
    def kernel_open(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        target = Path(path)
        if mode not in ("w", "a") or not target.is_relative_to(self.root):
            return open(path, mode, *args, **kwargs)
        if not target.is_file():
            raise _os_error(errno.EACCES, target)
        return _KernelFile(self, target)

    def kernel_mkdir(self, path: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        if not path.is_relative_to(self.root):
            _REAL_MKDIR(path, mode, parents, exist_ok)
        elif path.is_dir():
            if not exist_ok:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
        else:
            self.mkdir(path)

    def kernel_rmdir(self, path: Path) -> None:
        if not path.is_relative_to(self.root):
            _REAL_RMDIR(path)
            return
        if self._children(path) or self.procs(path):
            raise _os_error(errno.EBUSY, path)
        for f in path.iterdir():
            f.unlink()
        _REAL_RMDIR(path)

    # --- the kernel's side ---------------------------------------------------------------
    def mkdir(self, group: Path) -> None:
        _REAL_MKDIR(group)
        enabled = self._enabled(group.parent)
        for name, text in CORE_FILES.items():
            (group / name).write_text(text)
        (group / "cgroup.controllers").write_text(_render(enabled))
        for controller in enabled:
            for name, text in CONTROLLER_FILES.get(controller, {}).items():
                (group / name).write_text(text)

    def write(self, path: Path, value: str) -> None:
        group, name = path.parent, path.name
        if name == "cgroup.subtree_control":
            self._subtree_control(group, value)
        elif name == "cgroup.procs":
            self._join(group, value.strip())
        elif name == "cgroup.freeze":
            path.write_text(value.strip() + "\n")
            self._events(group, frozen=value.strip() == "1")
        elif name == "cgroup.kill":
            for procs in group.rglob("cgroup.procs"):
                procs.write_text("")
            self._refresh_populated()
        elif name == "io.max":
            self._io_max(path, value)
        else:
            path.write_text(value.strip() + "\n")

    def place(self, group: Path, *pids: int) -> None:
        """Processes that were in ``group`` before the code under test ran."""
        for pid in pids:
            self._join(group, str(pid))

    def procs(self, group: Path) -> list[str]:
        procs = group / "cgroup.procs"  # the kernel makes it at mkdir
        return procs.read_text().split() if procs.exists() else []

    def _enabled(self, group: Path) -> list[str]:
        return (group / "cgroup.subtree_control").read_text().split()

    def _children(self, group: Path) -> list[Path]:
        return [p for p in group.iterdir() if p.is_dir()]

    def _subtree_control(self, group: Path, value: str) -> None:
        available = (group / "cgroup.controllers").read_text().split()
        enabled = set(self._enabled(group))
        for token in value.split():
            sign, controller = token[:1], token[1:]
            if sign not in ("+", "-") or controller not in available:
                raise _os_error(errno.ENOENT, group / "cgroup.subtree_control")
            if sign == "+" and group != self.root and self.procs(group):
                raise _os_error(errno.EBUSY, group / "cgroup.subtree_control")  # no internal processes
            if sign == "+":
                enabled.add(controller)
            else:
                enabled.discard(controller)
        (group / "cgroup.subtree_control").write_text(_render(enabled))
        for child in self._children(group):  # a child's controllers follow its parent's list
            (child / "cgroup.controllers").write_text(_render(enabled))
            for controller, files in CONTROLLER_FILES.items():
                for name, text in files.items():
                    if controller in enabled and not (child / name).exists():
                        (child / name).write_text(text)
                    elif controller not in enabled:
                        (child / name).unlink(missing_ok=True)

    def _join(self, group: Path, pid: str) -> None:
        if group != self.root and self._enabled(group):
            raise _os_error(errno.EBUSY, group / "cgroup.procs")  # no internal processes, from the other side
        for procs in self.root.rglob("cgroup.procs"):
            pids = procs.read_text().split()
            if pid in pids:
                procs.write_text("".join(f"{p}\n" for p in pids if p != pid))
        (group / "cgroup.procs").write_text("".join(f"{p}\n" for p in [*self.procs(group), pid]))
        self._refresh_populated()

    def _events(self, group: Path, populated: bool | None = None, frozen: bool | None = None) -> None:
        events = group / "cgroup.events"
        if not events.exists():
            return  # the root group has none
        now = dict(line.split() for line in events.read_text().splitlines())
        if populated is not None:
            now["populated"] = str(int(populated))
        if frozen is not None:
            now["frozen"] = str(int(frozen))
        events.write_text(f"populated {now['populated']}\nfrozen {now['frozen']}\n")

    def _refresh_populated(self) -> None:
        for events in self.root.rglob("cgroup.events"):
            group = events.parent
            self._events(group, populated=any(self.procs(p.parent) for p in group.rglob("cgroup.procs")))

    def _io_max(self, path: Path, value: str) -> None:
        device, *settings = value.split()
        limits: dict[str, dict[str, str]] = {}
        for line in path.read_text().splitlines():
            dev, *pairs = line.split()
            limits[dev] = dict(pair.split("=") for pair in pairs)
        entry = limits.setdefault(device, dict.fromkeys(IO_KEYS, "max"))
        for setting in settings:
            key, _, amount = setting.partition("=")
            if key not in IO_KEYS:
                raise _os_error(errno.EINVAL, path)
            entry[key] = amount
        path.write_text("".join(f"{dev} " + " ".join(f"{k}={v}" for k, v in kv.items()) + "\n"
                                for dev, kv in limits.items()))


class _KernelFile:
    def __init__(self, fake: FakeCgroupV2, path: Path) -> None:
        self.fake, self.path = fake, path

    def __enter__(self) -> _KernelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, value: str) -> int:
        self.fake.write(self.path, value)
        return len(value)


class RealCgroup2:
    """A real cgroup2 hierarchy, mounted (``mount -t cgroup2``) in a private mount
    namespace that a sleeping holder process keeps, reached from here through
    /proc/PID/root: the host's own mounts never change.

    Where the host's controllers are bound to cgroup v1, a cgroup2 mount still makes and
    removes groups, moves processes (cgroup.procs), freezes (cgroup.freeze, Linux 5.2),
    kills (cgroup.kill, 5.14), accounts CPU (cpu.stat) and checks who may do what, for
    real; only the controllers v1 holds are missing.  The hierarchy is the host's one
    cgroup2 tree, so everything made here lives in ``top``, a group of its own, which
    ``close`` kills and removes.
    """

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint  # as the holder's namespace names it
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             'mount -t cgroup2 none "$1" && echo mounted && exec sleep infinity', "sh", str(mountpoint)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.holder.stdout is not None and self.holder.stderr is not None
        if self.holder.stdout.readline() != b"mounted\n":
            self.holder.wait()
            raise OSError(f"mount -t cgroup2 failed: {self.holder.stderr.read().decode().strip()}")
        self.root = Path(f"/proc/{self.holder.pid}/root{mountpoint}")
        self.top = self.root / f"mesobox-tests-{os.getpid()}-{secrets.token_hex(3)}"
        self.top.mkdir()
        self.processes: list[subprocess.Popen[bytes]] = []

    def inside(self, path: Path) -> Path:
        """``path`` (below ``root``) as the holder's namespace names it."""
        return self.mountpoint / path.relative_to(self.root)

    def name(self, group: Path) -> str:
        """``group`` as /proc/PID/cgroup names it ("/a/b")."""
        return "/" + str(group.relative_to(self.root))

    def group_of(self, pid: int) -> Path:
        """The group of ``pid`` by the kernel's own record (the ``0::`` line of /proc/PID/cgroup)."""
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return self.root / line[3:].strip().lstrip("/")
        raise AssertionError(f"process {pid} is in no cgroup2 group")

    def spawn(self, group: Path, argv: Sequence[str] = ("sleep", "600")) -> subprocess.Popen[bytes]:
        """Start ``argv`` already in ``group`` (the child moves itself before exec)."""
        procs = group / "cgroup.procs"
        proc = subprocess.Popen(list(argv), preexec_fn=lambda: procs.write_text(str(os.getpid())))
        self.processes.append(proc)
        return proc

    def delegate(self, group: Path, user: Any) -> None:
        """Hand ``group`` to ``user`` as systemd's Delegate=yes does: the directory and
        the files that move processes and hand controllers down (cgroup-v2.rst,
        "Delegation")."""
        for path in (group, group / "cgroup.procs", group / "cgroup.threads", group / "cgroup.subtree_control"):
            os.chown(path, user.uid, user.gid)

    def run_as(self, user: Any, group: Path, argv: Sequence[str], env: dict[str, str]
               ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` as ``user`` in the holder's mount namespace, started inside
        ``group``: a root shell joins it, then setpriv drops to the user."""
        script = 'echo $$ > "$1" && shift && exec "$@"'
        drop = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--",
                "env", "-i", *[f"{k}={v}" for k, v in {**user.env(), **env}.items()]]
        cmd = ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--", "sh", "-c", script, "sh",
               str(self.inside(group / "cgroup.procs")), *drop, *argv]
        return subprocess.run(cmd, capture_output=True, timeout=120, cwd="/", check=False)

    def close(self) -> None:
        """Kill what runs in ``top``, remove its groups deepest first, then let the
        holder (and with it the mount) go."""
        try:
            if self.top.exists():
                if (self.top / "cgroup.kill").exists():
                    (self.top / "cgroup.kill").write_text("1")
                for proc in self.processes:
                    proc.kill()
                    proc.wait()
                groups = sorted((p for p in self.top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
                for group in [*reversed(groups), self.top]:
                    _rmdir_when_empty(group)
        finally:
            self.holder.kill()
            self.holder.wait()


def _rmdir_when_empty(group: Path) -> None:
    """rmdir ``group`` once the kernel has let its killed processes go (EBUSY until then)."""
    deadline = time.monotonic() + 60  # a ceiling against a hang, not a timing
    while True:
        try:
            group.rmdir()
            return
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@contextlib.contextmanager
def tcp_service(reply: bytes, read_request: bool = False) -> Iterator[int]:
    """A TCP server on the host's 127.0.0.1 sending ``reply`` to each client; yields its port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                if read_request:
                    conn.recv(4096)
                conn.sendall(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join()
        srv.close()
