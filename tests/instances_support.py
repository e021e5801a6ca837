"""Helpers for tests/test_instances.py: a per-test runtime dir and leftover scans.

Leftover checks look at the real system: /proc for processes (by pid and by instance
name in the command line), every process's mountinfo for mounts of the test image,
and the runtime directory for state.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from conftest import Mesobox, User, make_busybox_rootfs, need_tool
from conftest import wait_until as wait_until  # waits on a condition, a generous ceiling against hangs


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

    def wait_for(self, name: str, predicate: Any) -> dict[str, Any]:
        """The ``instance list`` row of ``name`` once ``predicate`` holds for it."""
        rows: list[dict[str, Any]] = [{}]

        def holds() -> bool:
            rows[0] = self.listing("--all").get(name, {})
            return bool(predicate(rows[0]))

        wait_until(holds, f"{name}: the condition on its row")
        return rows[0]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def process_tree(pid: int) -> dict[int, str]:
    """``pid`` and its descendants, each with the kernel's one-letter state (by PPid)."""
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        states[int(entry)] = fields[0]
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = {}, [pid]
    while todo:
        p = todo.pop()
        if p in states:
            tree[p] = states[p]
            todo.extend(children.get(p, []))
    return tree


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


def instance_rootfs(path: Path) -> Path:
    """A busybox rootfs every user can use, with the /etc files any real image has."""
    need_tool("busybox")
    root = make_busybox_rootfs(path)
    for name in ("hosts", "resolv.conf"):
        (root / "etc" / name).write_text("")
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o1777 if d == "tmp" else 0o755)
    return root

