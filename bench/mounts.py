#!/usr/bin/env python3
"""Host mounts into the container: at what performance?  Side by side with the host.

(a) **Bind-mounted I/O**: a directory on the host, used directly and through
``mesobox exec -B DIR:/data``: sequential write of a large file (1 MiB blocks, then
fsync) and read back (after dropping the page cache when run as root; otherwise the
reads come from the page cache, and the report says so), and a metadata storm (create,
stat, unlink many small files).

(b) **An ``import`` storm**: a generated Python package of ``--modules`` small modules
(3000), byte-compiled, imported by one script, from the image as a directory, the image
as a squashfs file mounted with ``squashfuse_ll`` (an ordinary user's mesobox), the same
file with the kernel's squashfs (root's mesobox mounts it with ``mount -t squashfs -o
loop``), and an overlay (``--writable-tmpfs`` over the directory image); against the
host's python importing the same tree from a host directory.  The image's interpreter
and standard library are copies of the host's own (same binary, same .pyc files), so
only where the files come from differs.

Each configuration is timed twice: the import alone, measured inside the process
(what the mount costs), and the whole process from outside (what a job pays, including
mesobox's start-up).  Rows run interleaved round by round, in a new seeded order every
round, after one warm-up round; with ``--cold`` (root only) every run starts after the
page cache was dropped, as on a node that has never read the image.  Prints medians and
the ratios to the host.

    sudo python3 bench/mounts.py [--rounds 7] [--modules 3000] [--io-mib 512] [--files 5000]
                                 [--user mbtest] [--cold] [--dir DIR] [--json FILE]

As root, the ordinary user's rows run through ``runuser -u USER`` (its few ms are in the
whole-process times, equally for both sides, never in the import times).  Run as an
ordinary user it skips the kernel-squashfs row and does not drop caches.  ``--dir``: where
the bound directory and the work files go (default: /var/tmp; a network filesystem there
measures that filesystem).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = "/opt/mesobox/venv/bin/python"
HOST_PYTHON = os.path.realpath("/usr/bin/python3")

# Runs inside and outside the container alike: prints the import time, in seconds.
STORM_MAIN = '''
import sys, time
sys.path.insert(0, sys.argv[1])
start = time.perf_counter()
import storm_all
print(f"{time.perf_counter() - start:.6f} {storm_all.COUNT}")
'''

MODULE = '''"""Module {n} of the import storm."""
VALUE = {n}


def add(x):
    return x + VALUE


class Thing{n}:
    def __init__(self):
        self.value = VALUE

    def twice(self):
        return 2 * self.value
'''

IO = r'''
import os, sys, time
phase, top = sys.argv[1], sys.argv[2]
big = os.path.join(top, "big")
if phase == "write":
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    fd = os.open(big, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for _ in range(int(sys.argv[3])):
        os.write(fd, block)
    os.fsync(fd)
    os.close(fd)
    print(f"{time.perf_counter() - start:.6f}")
elif phase == "read":
    start = time.perf_counter()
    fd = os.open(big, os.O_RDONLY)
    while os.read(fd, 1 << 20):
        pass
    os.close(fd)
    print(f"{time.perf_counter() - start:.6f}")
    os.unlink(big)
elif phase == "meta":
    count = int(sys.argv[3])
    names = [os.path.join(top, f"f{i:06d}") for i in range(count)]
    times = []
    start = time.perf_counter()
    for name in names:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"x" * 100)
        os.close(fd)
    times.append(time.perf_counter() - start)
    start = time.perf_counter()
    for name in names:
        os.stat(name)
    times.append(time.perf_counter() - start)
    start = time.perf_counter()
    for name in names:
        os.unlink(name)
    times.append(time.perf_counter() - start)
    print(" ".join(f"{t:.6f}" for t in times))
'''


# --- preparing ------------------------------------------------------------------------


def make_tree(top: str, modules: int) -> None:
    """``storm/pNN/mNNN.py`` (100 modules a package) and ``storm_all.py`` importing them all."""
    per = 100
    lines = []
    os.makedirs(os.path.join(top, "storm"))
    open(os.path.join(top, "storm", "__init__.py"), "w").close()
    for n in range(modules):
        package = os.path.join(top, "storm", f"p{n // per:02d}")
        if n % per == 0:
            os.makedirs(package)
            open(os.path.join(package, "__init__.py"), "w").close()
        with open(os.path.join(package, f"m{n % per:03d}.py"), "w") as f:
            f.write(MODULE.format(n=n))
        lines.append(f"import storm.p{n // per:02d}.m{n % per:03d}")
    with open(os.path.join(top, "storm_all.py"), "w") as f:
        f.write("\n".join(lines) + f"\nCOUNT = {modules}\n")
    with open(os.path.join(top, "main.py"), "w") as f:
        f.write(STORM_MAIN)
    with open(os.path.join(top, "io.py"), "w") as f:
        f.write(IO)
    # Byte-compiled, as an installed stack is: a read-only image cannot write .pyc files.
    subprocess.run([HOST_PYTHON, "-m", "compileall", "-q", top], check=True)


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        words = line.split()
        if "=>" in words and len(words) > 2 and words[2].startswith("/"):
            found.append(words[2])
        elif words and words[0].startswith("/"):
            found.append(words[0])  # the dynamic loader
    return found


def make_image(rootfs: str, tree: str) -> None:
    """A busybox rootfs with the host's python3 (binary, libraries, standard library)
    and the storm tree at /opt/storm."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from startup import make_rootfs

    make_rootfs(rootfs)
    os.makedirs(os.path.join(rootfs, "usr/bin"), exist_ok=True)
    shutil.copy2(HOST_PYTHON, os.path.join(rootfs, "usr/bin", os.path.basename(HOST_PYTHON)))
    os.symlink(os.path.basename(HOST_PYTHON), os.path.join(rootfs, "usr/bin/python3"))
    for lib in _libraries(HOST_PYTHON):
        dest = os.path.join(rootfs, lib.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(lib, dest)  # the file itself, not a symlink into the host
    stdlib = f"/usr/lib/{os.path.basename(HOST_PYTHON)}"
    shutil.copytree(stdlib, os.path.join(rootfs, stdlib.lstrip("/")), symlinks=True,
                    ignore=shutil.ignore_patterns("test", "idlelib", "tkinter", "ensurepip"))
    shutil.copytree(tree, os.path.join(rootfs, "opt/storm"), symlinks=True)


def prepare(work: str, modules: int) -> None:
    make_tree(os.path.join(work, "tree"), modules)
    make_image(os.path.join(work, "rootfs"), os.path.join(work, "tree"))
    helptext = subprocess.run(["mksquashfs", "-help"], capture_output=True, text=True, check=False)
    comp = "zstd" if "zstd" in helptext.stdout + helptext.stderr else "gzip"  # as mesobox pull makes them
    subprocess.run(["mksquashfs", os.path.join(work, "rootfs"), os.path.join(work, "image.sqfs"), "-quiet",
                    "-noappend", "-all-root", "-no-xattrs", "-comp", comp], check=True)
    # A copy of mesobox every user can import (the checkout may be in a mode-700 home).
    shutil.copytree(os.path.join(ROOT, "src"), os.path.join(work, "src"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    os.makedirs(os.path.join(work, "io"))
    subprocess.run(["chmod", "-R", "a+rX", work], check=True)
    os.chmod(os.path.join(work, "io"), 0o1777)


# --- running --------------------------------------------------------------------------


class Runner:
    """Runs a command as root or as the user, with mesobox's environment; times it."""

    def __init__(self, work: str, user: str | None) -> None:
        self.work, self.user = work, user
        self.root = os.getuid() == 0
        if self.root and user:  # the user's own runtime dir and store, which it alone may write
            import pwd

            entry = pwd.getpwnam(user)
            for name in (f"runtime-{user}", f"store-{user}"):
                os.mkdir(os.path.join(work, name), 0o700)
                os.chown(os.path.join(work, name), entry.pw_uid, entry.pw_gid)

    def env(self, as_user: bool) -> dict[str, str]:
        who = self.user if as_user and self.user else ("root" if self.root else str(os.getuid()))
        home = os.path.expanduser(f"~{who}") if as_user and self.user else os.path.expanduser("~")
        return {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": home, "LANG": "C.UTF-8",
                "PYTHONPATH": os.path.join(self.work, "src"), "MESOBOX_SITE_CONFIG": "/nonexistent",
                "MESOBOX_RUNTIME_DIR": os.path.join(self.work, f"runtime-{who}"),
                "MESOBOX_STORE": os.path.join(self.work, f"store-{who}")}

    def run(self, argv: list[str], as_user: bool) -> tuple[float, str]:
        """(whole-process seconds, stdout)."""
        env = self.env(as_user)
        if as_user and self.root and self.user:
            argv = ["runuser", "-u", self.user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]
            env = {"PATH": env["PATH"]}
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, cwd=self.work, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[-6:]} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        return elapsed, proc.stdout


def drop_caches(root: bool) -> None:
    if root:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def mesobox(*args: str) -> list[str]:
    return [VENV_PYTHON, "-m", "mesobox", "exec", *args]


def storm_rows(work: str, root: bool) -> list[tuple[str, list[str], bool]]:
    """(name, argv, as the user?) of each import-storm row."""
    tree, rootfs, sqfs = (os.path.join(work, n) for n in ("tree", "rootfs", "image.sqfs"))
    inside = ["python3", "-I", "-S", "/opt/storm/main.py", "/opt/storm"]
    rows = [("host", [HOST_PYTHON, "-I", "-S", os.path.join(tree, "main.py"), tree], True),
            ("directory image", mesobox(rootfs, *inside), True),
            ("squashfs, squashfuse_ll (user)", mesobox(sqfs, *inside), True),
            ("overlay (--writable-tmpfs on the directory)", mesobox("--writable-tmpfs", rootfs, *inside), True)]
    if root:
        rows += [("host (root)", [HOST_PYTHON, "-I", "-S", os.path.join(tree, "main.py"), tree], False),
                 ("squashfs, kernel (root)", mesobox(sqfs, *inside), False)]
    return rows


def run_storm(runner: Runner, rounds: int, modules: int, cold: bool) -> dict[str, dict[str, list[float]]]:
    rows = storm_rows(runner.work, runner.root)
    times: dict[str, dict[str, list[float]]] = {name: {"import": [], "process": []} for name, _, _ in rows}
    order = random.Random(1)
    for round_ in range(rounds + 1):
        for name, argv, as_user in order.sample(rows, len(rows)):
            if cold:
                drop_caches(runner.root)
            elapsed, out = runner.run(argv, as_user)
            seconds, count = out.split()
            if int(count) != modules:
                raise RuntimeError(f"{name}: imported {count} modules, not {modules}")
            if round_ > 0:  # the first round warms up (mounts, launch plans, caches)
                times[name]["import"].append(float(seconds))
                times[name]["process"].append(elapsed)
    return times


def run_io(runner: Runner, rounds: int, mib: int, files: int) -> dict[str, dict[str, list[float]]]:
    """Host and bind, alternating which goes first; phases timed inside the process."""
    io_dir = os.path.join(runner.work, "io")
    rootfs = os.path.join(runner.work, "rootfs")
    sides = {"host": lambda *a: [HOST_PYTHON, "-I", "-S", os.path.join(runner.work, "tree", "io.py"), *a],
             "bind (-B)": lambda *a: mesobox("-B", f"{io_dir}:/data", rootfs, "python3", "-I", "-S",
                                             "/opt/storm/io.py", *a)}
    out: dict[str, dict[str, list[float]]] = {s: {"write": [], "read": [], "create": [], "stat": [], "unlink": []}
                                              for s in sides}
    for round_ in range(rounds + 1):  # the first round warms up, and is not counted
        names = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for side in names:
            where = io_dir if side == "host" else "/data"
            make = sides[side]
            _, write = runner.run(make("write", where, str(mib)), True)
            drop_caches(runner.root)
            _, read = runner.run(make("read", where), True)
            _, meta = runner.run(make("meta", where, str(files)), True)
            if round_ > 0:
                for key, value in zip(("write", "read", "create", "stat", "unlink"),
                                      [write, read, *meta.split()], strict=True):
                    out[side][key].append(float(value))
    return out


# --- reporting ------------------------------------------------------------------------


def report_storm(times: dict[str, dict[str, list[float]]], modules: int, cold: bool) -> None:
    print(f"\nimport storm: {modules} modules, {'cold' if cold else 'warm'} page cache, medians")
    print(f"{'':46} {'import s':>9} {'ratio':>7} {'process s':>10} {'ratio':>7}")
    for name, t in times.items():
        base = times["host (root)"] if "(root)" in name and "host (root)" in times else times["host"]
        imp, proc = statistics.median(t["import"]), statistics.median(t["process"])
        print(f"{name:46} {imp:9.4f} {imp / statistics.median(base['import']):6.2f}x "
              f"{proc:10.4f} {proc / statistics.median(base['process']):6.2f}x")


def report_io(io: dict[str, dict[str, list[float]]], mib: int, files: int, root: bool) -> None:
    print(f"\nbind-mounted I/O: {mib} MiB sequential (fsync'd), {files} small files; medians"
          + ("" if root else "  [reads from the page cache: not root, caches not dropped]"))
    print(f"{'':12} {'write MB/s':>11} {'read MB/s':>10} {'create/s':>10} {'stat/s':>10} {'unlink/s':>10}")
    rates = {}
    for side, t in io.items():
        rates[side] = (mib * 1.048576 / statistics.median(t["write"]), mib * 1.048576 / statistics.median(t["read"]),
                       files / statistics.median(t["create"]), files / statistics.median(t["stat"]),
                       files / statistics.median(t["unlink"]))
        print(f"{side:12} " + " ".join(f"{v:10.0f}" for v in rates[side]))
    ratio = [b / h for b, h in zip(rates["bind (-B)"], rates["host"], strict=True)]
    print(f"{'bind / host':12} " + " ".join(f"{v:9.3f}x" for v in ratio))
    # Best of N too: a virtual disk's reads are often bimodal (the hypervisor's cache), and
    # a median of a few runs can land on either mode for either side.
    best = [min(io["host"][k]) / min(io["bind (-B)"][k]) for k in ("write", "read", "create", "stat", "unlink")]
    print(f"{'  best of N':12} " + " ".join(f"{v:9.3f}x" for v in best))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--modules", type=int, default=3000)
    parser.add_argument("--io-mib", type=int, default=512)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--user", default="mbtest")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every import run (root)")
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--json", help="also write every sample here")
    args = parser.parse_args()
    root = os.getuid() == 0
    if args.cold and not root:
        sys.exit("--cold drops the page cache: run as root")
    work = tempfile.mkdtemp(prefix="mesobox-mounts-", dir=args.dir)
    os.chmod(work, 0o755)
    try:
        prepare(work, args.modules)
        runner = Runner(work, args.user if root else None)
        uname = os.uname()
        print(f"{uname.nodename}: Linux {uname.release}, {os.cpu_count()} CPUs; work dir {work} "
              f"({subprocess.run(['stat', '-f', '-c', '%T', work], capture_output=True, text=True).stdout.strip()})")
        storm = run_storm(runner, args.rounds, args.modules, args.cold)
        report_storm(storm, args.modules, args.cold)
        io = run_io(runner, args.rounds, args.io_mib, args.files)
        report_io(io, args.io_mib, args.files, root)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"storm": storm, "io": io, "modules": args.modules, "io_mib": args.io_mib,
                           "files": args.files, "cold": args.cold}, f, indent=2)
    finally:
        for name in os.listdir(work):
            if name.startswith("runtime-"):  # lingering squashfs mounts of this run
                mnt = os.path.join(work, name, "mnt")
                for point in os.listdir(mnt) if os.path.isdir(mnt) else ():
                    subprocess.run(["umount", "-l", os.path.join(mnt, point)], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", work], check=False)


if __name__ == "__main__":
    main()
