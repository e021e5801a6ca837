"""Helpers for the runtime tests: test images, running mesobox without a forking wrapper,
squashfuse accounting, and podman as an independent reference."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import Mesobox, User, make_busybox_rootfs, need_tool


def setuid_rootfs(dest: Path) -> Path:
    """A busybox rootfs made by root with a root-owned setuid copy of busybox in
    /opt/suid (``/opt/suid/id`` runs the ``id`` applet of the setuid binary)."""
    make_busybox_rootfs(dest)
    (dest / "opt" / "suid").mkdir(parents=True)
    suid = dest / "opt" / "suid" / "busybox"
    shutil.copy2(dest / "bin" / "busybox", suid)
    (dest / "opt" / "suid" / "id").symlink_to("busybox")
    os.chown(suid, 0, 0)
    os.chmod(suid, 0o4755)
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o444 | (0o111 if os.path.isdir(path) else 0))
    os.chmod(dest, 0o755)
    return dest


def make_squashfs(rootfs: Path, dest: Path) -> Path:
    need_tool("mksquashfs")
    subprocess.run(["mksquashfs", str(rootfs), str(dest), "-quiet", "-noappend", "-all-root"],
                   check=True, capture_output=True)
    os.chmod(dest, 0o644)
    return dest


def mesobox_argv(mb: Mesobox, as_user: User | None, args: list[str], env: dict[str, str] | None = None
                 ) -> tuple[list[str], dict[str, str]]:
    """argv + env that run mesobox directly (setpriv execs, it does not fork): the
    Popen pid *is* the mesobox process, so signals sent to it are sent to mesobox."""
    full = mb.base_env()
    full["MESOBOX_STORE"] = str(mb.store_root / (as_user.name if as_user else "root"))
    full.update(mb.runtime_env(as_user))  # this test's runtime dir; a test's own ``env`` wins below
    argv = [mb.python, "-m", "mesobox", *args]
    if as_user is None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MESOBOX_")}
        base.update(full)
        base.update(env or {})
        return argv, base
    full.update(as_user.env())
    full.update(env or {})
    wrap = ["setpriv", f"--reuid={as_user.uid}", f"--regid={as_user.gid}", "--init-groups", "--"]
    return wrap + argv, full


def squashfuse_state(uid: int, runtime_dir: str) -> tuple[int, int]:
    """(mounts under runtime_dir, live squashfuse processes of uid serving them); zombies don't count."""
    with open("/proc/self/mountinfo") as f:
        mounts = sum(1 for line in f if runtime_dir + "/" in line.split(" - ")[0])
    live = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            owner = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        comm, rest = stat.split("(", 1)[1].rsplit(")", 1)
        # Only helpers serving this runtime dir: other tests of the same user run in parallel.
        if comm.startswith("squashfuse") and owner == uid and rest.split()[0] != "Z" and runtime_dir in cmdline:
            live += 1
    return mounts, live


def squashfs_watchers(runtime: Path) -> list[int]:
    """Live processes holding a squashfs watcher lock (``<key>.watcher``) of ``runtime`` open."""
    prefix, found = str(runtime / "mnt") + "/", []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X") and any(x.startswith(prefix) and x.endswith(".watcher") for x in links):
            found.append(int(pid))
    return found


def podman(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Root podman with its own storage under ``root`` (runc: crun refuses hybrid cgroups;
    no network: /dev/net/tun is root's)."""
    need_tool("podman", "runc")
    argv = ["podman", "--root", str(root / "storage"), "--runroot", str(root / "run"),
            "--runtime", "/usr/sbin/runc", "--cgroup-manager", "cgroupfs", *args]
    return subprocess.run(argv, capture_output=True, timeout=timeout, check=False)


def one_error_line(stderr: bytes) -> str:
    """The error line; asserts the format: an error line, at most a hint, no traceback."""
    text = stderr.decode()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line]
    assert 1 <= len(lines) <= 2, text
    assert lines[0].startswith("mesobox: error: "), text
    if len(lines) == 2:
        assert lines[1].startswith("mesobox: hint: "), text
    return lines[0]


def error_text(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The stderr of a command that failed as it should: non-zero, no traceback, at
    most the error line and its hint."""
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 2, err  # the error line, and its hint
    return err


def error_line(res: subprocess.CompletedProcess[bytes]) -> str:
    """The one ``mesobox: error:`` line of a command, warnings and hints aside; no traceback."""
    err = res.stderr.decode()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith(("mesobox: warning: ", "mesobox: hint: "))]
    assert len(lines) == 1 and lines[0].startswith("mesobox: error: "), err
    return lines[0]
