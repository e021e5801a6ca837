#!/usr/bin/env python3
"""Start-up of `/bin/true` in a container, side by side, as an ordinary user.

Rows: bare exec; a minimal Python launcher floor (``python3 -I -S``: unshare +
uid_map + bind + pivot_root + exec, written below); ``ch-run`` on a directory and
on a squashfs; rootless ``podman run`` (runc); mesobox on a directory (default
binds, ``--contain``, with a site config file, without seccomp, through
``python -m``) and on a squashfs (warm: the shared mount lingers between runs;
cold: every run mounts afresh); and on the directory through the command ``pip
install`` writes into a user's venv (bin/mesobox), beside the console script pip
generates for a ``[project.scripts]`` entry point (what it was before).  All on the
same busybox image; the rows run interleaved, round by round.

Run as root it prepares the image, a wheel of mesobox and a world-readable,
byte-compiled copy of it, then re-executes itself as ``--user`` (default mbtest)
with runuser, which makes a venv of its own and pip-installs the wheel into it.

    python3 bench/startup.py [-n RUNS] [--user NAME]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = "/opt/mesobox/venv/bin/python"

FLOOR = r'''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
uid, gid, root = os.getuid(), os.getgid(), sys.argv[1]
if libc.unshare(0x10000000 | 0x00020000) != 0:
    raise OSError(ctypes.get_errno(), "unshare")
for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
    with open(f"/proc/self/{name}", "w") as f:
        f.write(text)
libc.mount(None, b"/", None, 0x4000 | 0x40000, None)  # MS_REC|MS_PRIVATE
libc.mount(root.encode(), root.encode(), None, 0x1000 | 0x4000, None)  # MS_BIND|MS_REC
libc.mount(b"/proc", (root + "/proc").encode(), None, 0x1000 | 0x4000, None)
os.chdir(root)
if libc.syscall(155, b".", b".") != 0:
    raise OSError(ctypes.get_errno(), "pivot_root")
libc.umount2(b".", 2)
os.chdir("/")
os.execv(sys.argv[2], sys.argv[2:])
'''


def make_rootfs(dest: str) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        sys.exit("bench needs busybox-static")
    for d in ("bin", "etc", "tmp", "root", "home", "proc", "sys", "dev", "usr/bin", "var"):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    shutil.copy2(busybox, os.path.join(dest, "bin", "busybox"))
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = os.path.join(dest, "bin", applet)
        if applet != "busybox" and not os.path.lexists(link):
            os.symlink("busybox", link)
    files = {"passwd": "root:x:0:0:root:/root:/bin/sh\n", "group": "root:x:0:\n", "hosts": "127.0.0.1 localhost\n",
             "resolv.conf": ""}
    for name, text in files.items():
        with open(os.path.join(dest, "etc", name), "w") as f:
            f.write(text)


def prepare(work: str) -> None:
    """As root: image dir + squashfs, floor script, byte-compiled mesobox copy."""
    make_rootfs(os.path.join(work, "rootfs"))
    subprocess.run(["mksquashfs", os.path.join(work, "rootfs"), os.path.join(work, "image.sqfs"),
                    "-quiet", "-noappend", "-all-root"], check=True, capture_output=True)
    with open(os.path.join(work, "floor.py"), "w") as f:
        f.write(FLOOR)
    # A site config file, as a real site has: its parse is cached per user (docs/admin.md);
    # dated an hour back, past the window in which a fresh file is parsed every time.
    site = os.path.join(work, "site.toml")
    with open(site, "w") as f:
        f.write('default_binds = []\nallowed_bind_sources = []\nlock = ["allowed_bind_sources"]\n')
    os.utime(site, (time.time() - 3600,) * 2)
    # Installed as pip installs it (with its dist-info RECORD, which keys saved launch
    # programs: docs/running.md), not as a source tree, whose every module file a
    # launch stats instead (≈0.25 ms more).  One wheel, for this copy and the user's venv.
    wheels = os.path.join(work, "wheels")
    subprocess.run([VENV_PYTHON, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, ROOT], check=True)
    wheel = next(os.path.join(wheels, name) for name in os.listdir(wheels) if name.startswith("mesobox-"))
    subprocess.run([VENV_PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--target", os.path.join(work, "src"),
                    wheel], check=True)
    write_entry_point_wheel(wheels)
    subprocess.run([VENV_PYTHON, "-m", "compileall", "-q", os.path.join(work, "src")], check=True)
    # the lean entry point scripts/setup-host.sh installs as /usr/local/bin/mesobox
    # (`python -IS`, site-packages added by hand), here aimed at this source copy
    purelib = subprocess.run([VENV_PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(work, "mesobox"), "w") as f:
        f.write(f"#!{VENV_PYTHON} -IS\nimport sys\nsys.path.insert(0, {os.path.join(work, 'src')!r})\n"
                f"sys.path.append({purelib!r})\nfrom mesobox.cli import main\nsys.exit(main())\n")
    os.chmod(os.path.join(work, "mesobox"), 0o755)
    subprocess.run(["chmod", "-R", "a+rX", work], check=True)
    os.chmod(work, 0o755)


ENTRY_POINT = "mesobox-entry-point"


def write_entry_point_wheel(wheels: str) -> None:
    """A wheel with nothing but a ``console_scripts`` entry point to ``mesobox.cli:main``:
    installed beside mesobox, pip writes for it the console script it wrote for
    mesobox's own ``[project.scripts]`` entry before bin/mesobox replaced it."""
    import base64
    import hashlib

    info = "mesobox_bench_entry-0.dist-info"
    files = {f"{info}/METADATA": "Metadata-Version: 2.1\nName: mesobox-bench-entry\nVersion: 0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: bench/startup.py\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n",
             f"{info}/entry_points.txt": f"[console_scripts]\n{ENTRY_POINT} = mesobox.cli:main\n"}
    record = ""
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record += f"{name},sha256={digest},{len(text.encode())}\n"
    files[f"{info}/RECORD"] = record + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(os.path.join(wheels, "mesobox_bench_entry-0-py3-none-any.whl"), "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)


def make_user_venv(work: str, venv: str) -> str:
    """As the user: a fresh venv (Debian's python3, the pip ``python3 -m venv`` gives)
    with the wheels installed by its own pip, as a user would; returns pip's version."""
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = os.path.join(venv, "bin", "pip")
    wheels = os.path.join(work, "wheels")
    subprocess.run([pip, "install", "-q", "--no-deps", "--no-index",
                    *(os.path.join(wheels, name) for name in sorted(os.listdir(wheels)))], check=True)
    return subprocess.run([pip, "--version"], check=True, capture_output=True, text=True).stdout.split()[1]


def time_rows(rows: list[tuple[str, list[str], dict[str, str]]], runs: int, env: dict[str, str]
              ) -> dict[str, list[float]]:
    """Wall-clock ms of each row, interleaved round by round (a load spike on this
    shared machine then hits every row alike), after 3 warm-up rounds.  Each round
    runs the rows in a new (seeded) order: a command's tail — namespaces torn down,
    FUSE daemons exiting, podman's conmon — then falls on every row alike instead of
    always on the row after it."""
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    failed: set[str] = set()
    order = random.Random(1)
    for round_ in range(runs + 3):
        for name, argv, extra in order.sample(rows, len(rows)):
            if name in failed:
                continue
            start = time.perf_counter()
            proc = subprocess.run(argv, env={**env, **extra}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  check=False)
            elapsed = (time.perf_counter() - start) * 1000
            if proc.returncode != 0:
                print(f"{name}: skipped: {argv[:3]}… failed: {proc.stderr.decode()[-300:]}", file=sys.stderr)
                failed.add(name)
            elif round_ >= 3:
                times[name].append(elapsed)
    return {name: t for name, t in times.items() if name not in failed}


def rows(work: str, venv: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, argv, extra environment) of each row."""
    rootfs, sqfs = os.path.join(work, "rootfs"), os.path.join(work, "image.sqfs")
    mesobox = [os.path.join(work, "mesobox"), "exec"]
    # Unmount after each run, so every launch mounts afresh (its own runtime dir: the
    # warm row's lingering mount would otherwise be reused).
    cold = {"MESOBOX_SQUASHFS_LINGER": "0", "MESOBOX_RUNTIME_DIR": f"/tmp/mesobox-bench-cold-{os.getuid()}"}
    out = [("bare exec", ["/bin/true"], {}),
           ("python floor (-I -S)", ["/usr/bin/python3", "-I", "-S", os.path.join(work, "floor.py"), rootfs,
                                     "/bin/true"], {})]
    if shutil.which("ch-run"):
        out += [("ch-run dir", ["ch-run", rootfs, "--", "/bin/true"], {}),
                ("ch-run squashfs", ["ch-run", sqfs, "--", "/bin/true"], {})]
    out += [("mesobox dir", [*mesobox, rootfs, "/bin/true"], {}),
            ("mesobox dir --contain", [*mesobox, "--contain", rootfs, "/bin/true"], {}),
            ("mesobox dir, site config", [*mesobox, rootfs, "/bin/true"],
             {"MESOBOX_SITE_CONFIG": os.path.join(work, "site.toml")}),
            ("mesobox dir, no seccomp", [*mesobox, "--security-opt", "seccomp=unconfined", rootfs, "/bin/true"], {}),
            ("mesobox dir, python -m", [VENV_PYTHON, "-m", "mesobox", "exec", rootfs, "/bin/true"],
             {"PYTHONPATH": os.path.join(work, "src")}),
            ("mesobox dir, pip script", [os.path.join(venv, "bin", "mesobox"), "exec", rootfs, "/bin/true"], {}),
            ("mesobox dir, entry point", [os.path.join(venv, "bin", ENTRY_POINT), "exec", rootfs, "/bin/true"], {}),
            ("mesobox squashfs", [*mesobox, sqfs, "/bin/true"], {}),
            ("mesobox squashfs, cold", [*mesobox, sqfs, "/bin/true"], cold)]
    if shutil.which("podman"):
        out.append(("podman run (runc)", ["podman", "run", "--rm", "--runtime", "/usr/sbin/runc", "--cgroup-manager",
                                          "cgroupfs", "--network=none", "mesobox-bench", "/bin/true"], {}))
    return out


def podman_import(work: str, env: dict[str, str]) -> None:
    tar = subprocess.Popen(["tar", "-C", os.path.join(work, "rootfs"), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "-q", "-", "mesobox-bench"], stdin=tar.stdout, env=env,
                   capture_output=True, check=True)
    tar.wait()


def report(results: dict[str, list[float]]) -> None:
    print(f"{'':24} {'mean ms':>9} {'median':>9} {'min':>9}")
    for name, t in results.items():
        print(f"{name:24} {statistics.mean(t):9.1f} {statistics.median(t):9.1f} {min(t):9.1f}")

    def ratio(a: str, b: str) -> str:
        if a in results and b in results:
            return f"{statistics.mean(results[a]) / statistics.mean(results[b]):.2f}x"
        return "n/a"

    print()
    print(f"mesobox dir / python floor:       {ratio('mesobox dir', 'python floor (-I -S)')}  (target <= 1.3x)")
    print(f"pip script / lean entry:          {ratio('mesobox dir, pip script', 'mesobox dir')}  "
          f"(entry point: {ratio('mesobox dir, entry point', 'mesobox dir')})")
    print(f"podman / mesobox dir:             {ratio('podman run (runc)', 'mesobox dir')}  (target >= 10x)")
    print(f"mesobox squashfs / ch-run squashfs: {ratio('mesobox squashfs', 'ch-run squashfs')}  (target <= 1x; "
          "the shared mount lingers between runs, see docs/running.md)")
    print(f"  cold, every run mounts:         {ratio('mesobox squashfs, cold', 'ch-run squashfs')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--runs", type=int, default=30)
    parser.add_argument("--user", default="mbtest")
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.getuid() == 0:
        work = tempfile.mkdtemp(prefix="mesobox-bench-")
        try:
            prepare(work)
            cmd = ["runuser", "-u", args.user, "--", "/usr/bin/python3", os.path.abspath(__file__),
                   "-n", str(args.runs), "--work", work]
            sys.exit(subprocess.run(cmd, cwd="/", check=False).returncode)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    work = args.work or sys.exit("run as root (it prepares the images, then re-runs as the user)")
    home = os.path.expanduser("~")
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": home, "USER": os.environ.get("USER", args.user),
           "MESOBOX_SITE_CONFIG": "/nonexistent", "LANG": "C.UTF-8"}
    if shutil.which("podman"):
        podman_import(work, env)
    venv = tempfile.mkdtemp(prefix="mesobox-bench-venv-")
    try:
        print(f"user's venv: pip {make_user_venv(work, venv)}")
        report(time_rows(rows(work, venv), args.runs, env))
    finally:
        shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    main()
