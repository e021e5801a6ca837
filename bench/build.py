#!/usr/bin/env python3
"""Unprivileged image builds, side by side, as an ordinary user: a cold build and a
cached rebuild of one Dockerfile with `mesobox build`, rootless `podman build` and
`ch-image build`.

The Dockerfile starts from a busybox base image and has the steps a real recipe has: a
RUN that writes many small files, a COPY of a context directory, a RUN that reads what
was copied, ENV, WORKDIR and CMD.  "Cold" runs every step again (mesobox and podman
``--no-cache``, ch-image ``--rebuild``) with the base already local to each tool, so the
rows time the builders, not the network; "cached" builds the unchanged Dockerfile again.
The rows run interleaved, round by round.

Run as root: it makes the base image (served to mesobox by a docker-registry on
loopback, imported into podman and ch-image) and the build context, then re-runs itself
as ``--user`` (default mbtest) with runuser.

    python3 bench/build.py [-n ROUNDS] [--user NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = "/opt/mesobox/venv/bin/python"

DOCKERFILE = """\
FROM {base}
ENV APP=/opt/app GREETING=hello
RUN mkdir -p /opt/app/gen && i=0 && while [ $i -lt 400 ]; do echo "line $i" > /opt/app/gen/f$i; i=$((i+1)); done
COPY data /opt/app/data
WORKDIR /opt/app
RUN cat data/* gen/* | wc -c > /opt/app/size && rm -f gen/f1
CMD ["cat", "/opt/app/size"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def prepare(work: str) -> int:
    """As root: the base rootfs, its OCI image in a loopback registry (the port is
    returned), the build context and a byte-compiled mesobox copy."""
    from startup import make_rootfs

    rootfs = os.path.join(work, "rootfs")
    make_rootfs(rootfs)
    layout = os.path.join(work, "layout")
    subprocess.run(["umoci", "init", "--layout", layout], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:base"], check=True)
    bundle = os.path.join(work, "bundle")
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:base", bundle], check=True, capture_output=True)
    shutil.rmtree(os.path.join(bundle, "rootfs"))
    shutil.copytree(rootfs, os.path.join(bundle, "rootfs"), symlinks=True)
    subprocess.run(["umoci", "repack", "--image", f"{layout}:base", bundle], check=True, capture_output=True)
    shutil.rmtree(bundle)
    port = free_port()
    registry = os.path.join(work, "registry")
    os.makedirs(registry)
    with open(os.path.join(registry, "config.yml"), "w") as f:
        f.write(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {registry}/data\n"
                f"http:\n  addr: 127.0.0.1:{port}\nlog:\n  level: error\n")
    server = subprocess.Popen(["docker-registry", "serve", os.path.join(registry, "config.yml")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(work, "registry.pid"), "w") as f:
        f.write(str(server.pid))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:base",
                    f"docker://127.0.0.1:{port}/bench/base:1"], check=True)
    context = os.path.join(work, "context")
    os.makedirs(os.path.join(context, "data"))
    for i in range(50):
        with open(os.path.join(context, "data", f"d{i}"), "wb") as f:
            f.write(os.urandom(20_000))
    subprocess.run([VENV_PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--target", os.path.join(work, "src"),
                    ROOT], check=True)
    subprocess.run([VENV_PYTHON, "-m", "compileall", "-q", os.path.join(work, "src")], check=True)
    subprocess.run(["chmod", "-R", "a+rX", work], check=True)
    return port


def tools(work: str, port: int, home: str) -> dict[str, tuple[list[str], list[str], str]]:
    """name -> (cold argv, cached argv, Dockerfile base name)."""
    context = os.path.join(work, "context")
    out: dict[str, tuple[list[str], list[str], str]] = {}
    mesobox = [VENV_PYTHON, "-m", "mesobox", "build", "-t", "bench/app:1", "-f", os.path.join(home, "mesobox.df"),
               context]
    out["mesobox build"] = ([*mesobox[:4], "--no-cache", *mesobox[4:]], mesobox, f"127.0.0.1:{port}/bench/base:1")
    if shutil.which("podman"):
        podman = ["podman", "--cgroup-manager", "cgroupfs", "build", "-q", "--runtime", "/usr/sbin/runc",
                  "-t", "bench-app", "-f", os.path.join(home, "podman.df"), context]
        out["podman build (rootless)"] = ([*podman[:4], "--no-cache", *podman[4:]], podman, "localhost/bench-base")
    if shutil.which("ch-image"):
        ch = ["ch-image", "build", "-t", "bench-app", "-f", os.path.join(home, "ch.df"), context]
        out["ch-image build"] = ([*ch[:2], "--rebuild", *ch[2:]], ch, "bench-base")
    return out


def import_bases(work: str, env: dict[str, str], names: dict[str, tuple[list[str], list[str], str]]) -> None:
    rootfs = os.path.join(work, "rootfs")
    if "podman build (rootless)" in names:
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "-q", "-", "bench-base"], stdin=tar.stdout, env=env, check=True,
                       capture_output=True)
        tar.wait()
    if "ch-image build" in names:
        subprocess.run(["ch-image", "import", rootfs, "bench-base"], env=env, check=True, capture_output=True)


def measure(names: dict[str, tuple[list[str], list[str], str]], rounds: int,
            env: dict[str, str]) -> dict[str, list[float]]:
    import random

    results: dict[str, list[float]] = {}
    failed: set[str] = set()
    for name, (cold, _cached, _base) in names.items():  # a first build fills each cache
        proc = subprocess.run(cold, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{name}: skipped, it fails: {(proc.stderr or proc.stdout).strip()[-300:]}")
            failed.add(name)
    for _ in range(rounds):
        for name in random.sample(sorted(set(names) - failed), len(names) - len(failed)):
            for kind, argv in (("cold", names[name][0]), ("cached", names[name][1])):
                start = time.perf_counter()
                proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
                elapsed = time.perf_counter() - start
                if proc.returncode != 0:
                    sys.exit(f"{name} {kind} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
                results.setdefault(f"{name}, {kind}", []).append(elapsed)
    return results


def report(results: dict[str, list[float]]) -> None:
    print(f"{'':36} {'median s':>9} {'min s':>9}")
    for name, t in results.items():
        print(f"{name:36} {statistics.median(t):9.2f} {min(t):9.2f}")

    def ratio(a: str, b: str) -> str:
        if a in results and b in results:
            return f"{statistics.median(results[a]) / statistics.median(results[b]):.2f}x"
        return "n/a"

    print()
    for kind in ("cold", "cached"):
        print(f"mesobox / podman, {kind}:   {ratio(f'mesobox build, {kind}', f'podman build (rootless), {kind}')}"
              "  (target <= 1x)")
        print(f"mesobox / ch-image, {kind}: {ratio(f'mesobox build, {kind}', f'ch-image build, {kind}')}")
    print(json.dumps({k: statistics.median(v) for k, v in results.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("-n", "--rounds", type=int, default=3)
    parser.add_argument("--user", default="mbtest")
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.getuid() == 0:
        work = tempfile.mkdtemp(prefix="mesobox-bench-build-")
        os.chmod(work, 0o755)
        pid_file = os.path.join(work, "registry.pid")
        try:
            port = prepare(work)
            cmd = ["runuser", "-u", args.user, "--", "/usr/bin/python3", os.path.abspath(__file__),
                   "-n", str(args.rounds), "--work", work, "--port", str(port)]
            sys.exit(subprocess.run(cmd, cwd="/", check=False).returncode)
        finally:
            if os.path.exists(pid_file):
                with open(pid_file) as f:
                    subprocess.run(["kill", f.read().strip()], check=False)
            shutil.rmtree(work, ignore_errors=True)
    if not args.work or not args.port:
        sys.exit("run as root (it prepares the base image and the context, then re-runs as the user)")
    home = tempfile.mkdtemp(prefix="mesobox-bench-build-")
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": os.path.expanduser("~"),
           "USER": os.environ.get("USER", args.user), "MESOBOX_SITE_CONFIG": "/nonexistent", "LANG": "C.UTF-8",
           "PYTHONPATH": os.path.join(args.work, "src"), "MESOBOX_STORE": os.path.join(home, "store"),
           "MESOBOX_RUNTIME_DIR": os.path.join(home, "run"), "CH_IMAGE_STORAGE": os.path.join(home, "ch"),
           # ch-image keeps its build cache in git, which wants an identity
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    try:
        names = tools(args.work, args.port, home)
        for name, (_cold, _cached, base) in names.items():
            short = {"mesobox build": "mesobox", "podman build (rootless)": "podman", "ch-image build": "ch"}[name]
            with open(os.path.join(home, f"{short}.df"), "w") as f:
                f.write(DOCKERFILE.format(base=base))
        import_bases(args.work, env, names)
        report(measure(names, args.rounds, env))
    finally:
        if shutil.which("podman"):
            subprocess.run(["podman", "rmi", "-f", "bench-app", "bench-base"], env=env, capture_output=True,
                           check=False)
        subprocess.run(["rm", "-rf", home], check=False)


if __name__ == "__main__":
    main()
