#!/usr/bin/env python3
"""Pull + flatten of a multi-layer Debian image: mesobox vs skopeo+umoci (and ch-image).

Side by side, in one run, on the same image served by a local docker-registry:

- ``skopeo copy docker://… oci:…`` then ``umoci unpack --rootless`` (the usual tool pair);
- ``ch-image pull`` (tried; it insists on HTTPS, so it cannot use a loopback registry);
- ``mesobox pull --format dir`` and ``mesobox pull --format squashfs`` into an empty store.

The image is a ``debootstrap --variant=minbase bookworm`` rootfs split into four layers
with umoci (cached under --cache).  Run as root:  python3 bench/pull.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from conftest import start_registry  # noqa: E402  (the tests' real-registry starter)

SPLITS = (("usr/lib",), ("usr/share",), ("usr/bin", "usr/sbin", "usr/libexec", "usr/include"))


def debootstrap(cache: Path) -> Path:
    rootfs = cache / "debian-rootfs"
    if (rootfs / "etc" / "debian_version").exists():
        return rootfs
    tmp = cache / "debian-rootfs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    print("bench: debootstrap bookworm minbase (about a minute, cached)…", flush=True)
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(tmp), "http://deb.debian.org/debian"],
                   check=True, stdout=subprocess.DEVNULL)
    tmp.rename(rootfs)
    return rootfs


def layered_image(cache: Path, rootfs: Path) -> Path:
    """An OCI layout with four layers: base (without the big /usr trees), then each tree."""
    layout = cache / "debian-layout"
    if (layout / "index.json").exists():
        return layout
    print("bench: building a 4-layer OCI image with umoci (cached)…", flush=True)
    shutil.rmtree(layout, ignore_errors=True)
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:bookworm"], check=True)
    bundle = cache / "bundle"
    excluded = [f"--exclude=./{p}" for split in SPLITS for p in split]
    steps: list[list[str]] = [[*excluded, "."], *[[f"./{p}" for p in split] for split in SPLITS]]
    for members in steps:
        # unpack afresh per layer: umoci bases each repack on the manifest it unpacked
        subprocess.run(["rm", "-rf", str(bundle)], check=True)
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:bookworm", str(bundle)], check=True,
                       stdout=subprocess.DEVNULL)
        members = [m for m in members if m.startswith("--") or m == "." or (rootfs / m[2:]).exists()]
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-cf", "-", *members], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-C", str(bundle / "rootfs"), "-xf", "-"], stdin=tar.stdout, check=True)
        tar.wait()
        subprocess.run(["umoci", "repack", "--image", f"{layout}:bookworm", str(bundle)], check=True,
                       stdout=subprocess.DEVNULL)
    shutil.rmtree(bundle, ignore_errors=True)
    return layout


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    res = subprocess.run(argv, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {res.stderr.decode().strip()[-300:]}")
    return elapsed


def bench_skopeo_umoci(ref: str, work: Path) -> float:
    layout, bundle = work / "oci", work / "bundle"
    t = timed(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:bookworm"])
    t += timed(["umoci", "unpack", "--rootless", "--image", f"{layout}:bookworm", str(bundle)])
    return t


def bench_mesobox(ref: str, work: Path, fmt: str) -> float:
    env = dict(os.environ, MESOBOX_STORE=str(work / "store"), PYTHONPATH=str(ROOT / "src"),
               MESOBOX_SITE_CONFIG="/nonexistent")
    return timed([sys.executable, "-m", "mesobox", "pull", "-q", "--format", fmt, ref], env)


def bench_ch_image(ref: str, work: Path) -> float | str:
    if shutil.which("ch-image") is None:
        return "not installed"
    # ch-image is a Debian script for /usr/bin/python3 (python3-lark), not any python3 on PATH
    env = dict(os.environ, CH_IMAGE_STORAGE=str(work / "ch"), PATH="/usr/bin:/bin:/usr/sbin:/sbin",
               USER=os.environ.get("USER", "root"))
    try:
        return timed(["ch-image", "pull", "--tls-no-verify", ref], env)
    except RuntimeError as err:
        return f"failed: {str(err).splitlines()[-1][:60]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/var/tmp/mesobox-bench"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    layout = layered_image(args.cache, debootstrap(args.cache))
    work_root = Path(tempfile.mkdtemp(prefix="mesobox-bench-pull-"))
    registry = start_registry(work_root / "registry")
    try:
        ref = registry.push_oci(layout, "bookworm", "bench/debian")
        index = json.loads((layout / "index.json").read_text())
        manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
        size = sum(layer["size"] for layer in manifest["layers"])
        print(f"image: {ref}, {len(manifest['layers'])} layers, {size / 1e6:.0f} MB compressed; {args.runs} runs each")
        results: dict[str, list[float]] = {"skopeo+umoci": [], "mesobox dir": [], "mesobox squashfs": []}
        for i in range(args.runs):
            for name, fn in (("skopeo+umoci", lambda w: bench_skopeo_umoci(ref, w)),
                             ("mesobox dir", lambda w: bench_mesobox(ref, w, "dir")),
                             ("mesobox squashfs", lambda w: bench_mesobox(ref, w, "squashfs"))):
                work = work_root / f"{name.replace(' ', '_').replace('+', '_')}-{i}"
                work.mkdir()
                results[name].append(fn(work))
                subprocess.run(["rm", "-rf", str(work)], check=False)
        ch = bench_ch_image(ref, work_root)
        base = statistics.median(results["skopeo+umoci"])
        print(f"\n{'method':<20} {'median s':>9} {'min s':>7}  speed-up vs skopeo+umoci")
        for name, times in results.items():
            med = statistics.median(times)
            print(f"{name:<20} {med:9.2f} {min(times):7.2f}  {base / med:5.2f}x")
        print(f"{'ch-image pull':<20} {ch if isinstance(ch, str) else f'{ch:9.2f}'}")
    finally:
        registry.process.terminate()
        subprocess.run(["rm", "-rf", str(work_root)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
