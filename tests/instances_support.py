"""Helpers for tests/test_instances.py: a per-test runtime dir and leftover scans.

Leftover checks look at the real system: /proc for processes (by pid and by instance
name in the command line), every process's mountinfo for mounts of the test image,
and the runtime directory for state.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import Mesobox, User


class Instances:
    """Runs ``mesobox instance …`` as one user with its own runtime directory."""

    def __init__(self, mesobox: Mesobox, runtime: Path, user: User | None) -> None:
        self.mesobox, self.runtime, self.user = mesobox, runtime, user

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        env = {"MESOBOX_RUNTIME_DIR": str(self.runtime)}
        return self.mesobox(*args, as_user=self.user, env=env, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """Like __call__ but not waiting (``logs -f``); stdout is a pipe."""
        assert self.user is not None
        env = {**self.user.env(), **self.mesobox.base_env(), "MESOBOX_RUNTIME_DIR": str(self.runtime),
               "MESOBOX_STORE": str(self.mesobox.store_root / self.user.name)}
        argv = ["runuser", "-u", self.user.name, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()],
                self.mesobox.python, "-m", "mesobox", *args]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, cwd="/")

    def stop_everything(self) -> None:
        names = list(self.listing("--all")) if (self.runtime / "instances").exists() else []
        if names:
            self("instance", "stop", "-t", "1", *names)

    def ok(self, *args: str) -> str:
        proc = self(*args)
        assert proc.returncode == 0, f"{args}: rc={proc.returncode} {proc.stderr.decode()}"
        return proc.stdout.decode()

    def state(self, name: str) -> dict[str, Any]:
        with open(self.runtime / "instances" / name / "state.json") as f:
            data: dict[str, Any] = json.load(f)
            return data

    def listing(self, *flags: str) -> dict[str, dict[str, Any]]:
        return {row["name"]: row for row in json.loads(self.ok("instance", "list", "--json", *flags))}

    def wait_for(self, name: str, predicate: Any, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.listing("--all").get(name, {})
            if predicate(row):
                return row
            assert time.monotonic() < deadline, f"{name}: condition not reached, last {row}"
            time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and alive(int(entry)):
            found.append((int(entry), cmdline))
    return found


def mounts_mentioning(text: str) -> list[str]:
    """Lines of any process's mountinfo (all namespaces we can see) naming ``text``."""
    found = []
    for entry in ["self", *(e for e in os.listdir("/proc") if e.isdigit())]:
        try:
            lines = Path(f"/proc/{entry}/mountinfo").read_text().splitlines()
        except OSError:
            continue
        found += [f"{entry}: {line}" for line in lines if text in line]
    return found


def wait_until(check: Any, timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.05)
