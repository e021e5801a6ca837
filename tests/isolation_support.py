"""Test harness for the isolation building blocks, standing in for the launcher.

Each helper runs a small Python program (as root or as the ordinary test user) that
does what the launcher will do around the code under test: unshare namespaces with
ctypes (Python 3.11 has no os.unshare), set no_new_privs, call mesobox's functions,
then run a workload and print a JSON result.  The programs are written to a
world-readable directory so the test user can run them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
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


def wait_for(check: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


class FakeCgroupV2:
    """A cgroup2 tree laid out as the kernel presents it, for the v2 code paths.

    Only the files mesobox reads are pre-populated; a child directory made by mesobox
    gets its interface files written by the code under test, which is what we check.
    ``rmdir`` follows the kernel's rule: allowed when no child groups and no tasks.
    """

    def __init__(self, root: Path, own: str = "/user.slice/job", controllers: str = "cpuset cpu io memory pids"):
        self.root = root
        self.own = root / own.lstrip("/")
        self.own.mkdir(parents=True)
        for d in [root, *reversed(self.own.relative_to(root).parents), self.own.relative_to(root)]:
            directory = root / d
            (directory / "cgroup.controllers").write_text(controllers + "\n")
            (directory / "cgroup.subtree_control").write_text("")
            (directory / "cgroup.procs").write_text("")
        self.proc_self_cgroup = root.parent / "proc-self-cgroup"
        self.proc_self_cgroup.write_text(f"0::{own}\n")

    def kernel_open(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        """``open`` as cgroupfs answers writes: subtree_control obeys the "no internal
        processes" rule (EBUSY), cgroup.procs migrates a pid out of its old group."""
        target = Path(path)
        if mode not in ("w", "a") or not target.is_relative_to(self.root):
            return open(path, mode, *args, **kwargs)
        return _KernelFile(self, target)

    def procs(self, directory: Path) -> list[str]:
        procs = directory / "cgroup.procs"  # the kernel makes it at mkdir
        return procs.read_text().split() if procs.exists() else []

    def kernel_rmdir(self, path: Path) -> None:
        if path.is_relative_to(self.root):
            if any(p.is_dir() for p in path.iterdir()):
                raise OSError(16, "Device or resource busy", str(path))
            procs = path / "cgroup.procs"
            if procs.exists() and procs.read_text().strip():
                raise OSError(16, "Device or resource busy", str(path))
            for f in path.iterdir():
                f.unlink()
        os.rmdir(path)


class _KernelFile:
    def __init__(self, fake: FakeCgroupV2, path: Path) -> None:
        self.fake, self.path = fake, path

    def __enter__(self) -> _KernelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, value: str) -> int:
        directory, name = self.path.parent, self.path.name
        if name == "cgroup.subtree_control":
            if directory != self.fake.root and self.fake.procs(directory):
                raise OSError(16, "Device or resource busy", str(self.path))
            enabled = self.path.read_text().split()
            enabled += [tok[1:] for tok in value.split() if tok.startswith("+") and tok[1:] not in enabled]
            self.path.write_text(" ".join(enabled))
        elif name == "cgroup.procs":
            for procs in self.fake.root.rglob("cgroup.procs"):
                pids = procs.read_text().split()
                if value.strip() in pids:
                    procs.write_text(" ".join(p for p in pids if p != value.strip()))
            self.path.write_text(" ".join([*self.fake.procs(directory), value.strip()]))
        else:
            self.path.write_text(value)
        return len(value)


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
