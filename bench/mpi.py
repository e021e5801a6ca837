"""MPI in containers vs bare, side by side, on the real Slurm test cluster.

    python bench/mpi.py [--image DIR] [--repeats N] [--python PY]

DIR is what scripts/make-mpi-image.sh wrote (rootfs/ and mpi.sqfs).  Each round runs,
alternating so drift hits both sides alike:
  bare:      srun --mpi=pmix -N2 -nR DIR/rootfs/opt/mpi/PROGRAM
  container: mesobox srun --image DIR/mpi.sqfs --mpi=pmix -N2 -nR -- /opt/mpi/PROGRAM
(the same binary: the host's Open MPI is the image's Debian build), ping-pong
between the two nodes and an allreduce, one rank per node (2 ranks).  Prints the median of
each metric, the container/bare ratio of the medians and of the best runs; the
target is within 3 %.
Run as any user who may submit jobs, after scripts/slurm-cluster.sh start.

    python bench/mpi.py --intranode [--image DIR] [--repeats N]

Two ranks on one node, every way ranks start, all with default settings (no MPI
variable set by hand): bare ``mpirun -np 2``, ``mpirun -np 2 mesobox exec`` (and, for
comparison, the same with ``--userns private``), and, when Slurm answers, bare ``srun
-N1 -n2``, ``srun -N1 -n2 mesobox exec`` and ``mesobox srun -N1 -n2`` (against bare
srun); ping-pong and an allreduce.  Targets:
latency and allreduce time ≤ 1.1x bare, bandwidth ≥ 0.95x bare.  Run it as an ordinary user (mpirun
refuses root).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PING = re.compile(r"pingpong bytes=(\d+) latency_us=([\d.]+) bandwidth_MBps=([\d.]+)")
ALLRED = re.compile(r"allreduce doubles=(\d+) ranks=(\d+) time_us=([\d.]+) correct=(\d)")


def run(argv: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
    if result.returncode != 0:
        sys.exit(f"bench: {' '.join(argv[:6])}… failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result.stdout


def metrics(out: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for size, lat, bw in PING.findall(out):
        if int(size) <= 1024:
            found[f"latency {size} B (us)"] = float(lat)
        else:
            found[f"bandwidth {int(size) // 1024} KiB (MB/s)"] = float(bw)
    for count, ranks, t, ok in ALLRED.findall(out):
        if ok != "1":
            sys.exit("bench: allreduce gave a wrong answer")
        found[f"allreduce {count} doubles x{ranks} (us)"] = float(t)
    return found


def intranode(args: argparse.Namespace) -> None:
    """Two ranks on one node, each way of starting them, alternating round by round."""
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(ROOT / "src"))
    mesobox = [args.python, "-m", "mesobox"]
    programs = [["/opt/mpi/pingpong", "200"], ["/opt/mpi/allreduce", "200", "8192"]]
    rootfs, sqfs = str(args.image / "rootfs"), str(args.image / "mpi.sqfs")
    starts: dict[str, Callable[[list[str]], list[str]]] = {
        "bare mpirun": lambda prog: ["mpirun", "-np", "2", rootfs + prog[0], *prog[1:]],
        "mpirun + mesobox exec": lambda prog: ["mpirun", "-np", "2", *mesobox, "exec", rootfs, *prog],
        # For comparison: one user namespace per rank, so mesobox keeps MPI off CMA.
        "  … --userns private": lambda prog: ["mpirun", "-np", "2", *mesobox, "exec", "--userns", "private",
                                              rootfs, *prog],
    }
    if subprocess.run(["sinfo", "-h"], capture_output=True, check=False).returncode == 0:
        starts["bare srun"] = lambda prog: ["srun", "--mpi=pmix", "-N1", "-n2", rootfs + prog[0], *prog[1:]]
        starts["srun + mesobox exec"] = lambda prog: ["srun", "--mpi=pmix", "-N1", "-n2", *mesobox, "exec", sqfs,
                                                      *prog]
        starts["mesobox srun"] = lambda prog: [*mesobox, "srun", "--image", sqfs, "--mpi=pmix", "-N1", "-n2", "--",
                                               *prog]
    sides = starts
    samples: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    for _ in range(args.repeats):
        for prog in programs:
            for side, argv_of in sides.items():
                for key, value in metrics(run(argv_of(prog), env)).items():
                    samples[side].setdefault(key, []).append(value)
    keys = [k for k in samples["bare mpirun"] if not k.startswith(("bandwidth 4096", "latency 1024"))]
    print(f"{'two ranks, one node':<24} " + " ".join(f"{k:>26}" for k in keys) + f"   ({args.repeats} rounds)")
    for side in sides:
        cells = []
        # Each way of starting ranks against the bare run started the same way.
        base = "bare srun" if "srun" in side else "bare mpirun"
        for key in keys:
            mine, bare = statistics.median(samples[side][key]), statistics.median(samples[base][key])
            cells.append(f"{mine:>14.2f} ({mine / bare:>5.2f}x)")
        print(f"{side:<24} " + " ".join(f"{c:>26}" for c in cells))
    print("ratios: srun rows against bare srun, the others against bare mpirun")
    print("targets: latency and allreduce time <= 1.1x bare, bandwidth >= 0.95x bare")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=Path("/var/tmp/mesobox-test-cache/mpi-image"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs mesobox")
    parser.add_argument("--intranode", action="store_true", help="two ranks on one node, every way ranks start")
    args = parser.parse_args()
    if args.intranode:
        intranode(args)
        return
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(ROOT / "src"))
    mesobox = [args.python, "-m", "mesobox", "srun", "--image", str(args.image / "mpi.sqfs")]
    # One rank per node: the test cluster's two "nodes" share 2 real cores, and busy-polling
    # ranks beyond that measure the scheduler, not MPI.
    programs = [("pingpong", ["-N2", "-n2"], ["200"]), ("allreduce", ["-N2", "-n2"], ["200", "8192"])]
    samples: dict[str, dict[str, list[float]]] = {"bare": {}, "container": {}}
    for _ in range(args.repeats):
        for name, shape, extra in programs:
            bare = ["srun", "--mpi=pmix", *shape, str(args.image / "rootfs" / "opt" / "mpi" / name), *extra]
            boxed = [*mesobox, "--mpi=pmix", *shape, "--", f"/opt/mpi/{name}", *extra]
            for side, argv in (("bare", bare), ("container", boxed)):
                for key, value in metrics(run(argv, env)).items():
                    samples[side].setdefault(key, []).append(value)
    print(f"{'metric':<34} {'bare':>10} {'container':>10} {'ratio':>7} {'best ratio':>11}   ({args.repeats} rounds)")
    for key in samples["bare"]:
        bare, boxed = samples["bare"][key], samples["container"][key]
        # Best-of-N resists a busy host better than the median: bandwidth is
        # higher-is-better, latency and time lower-is-better.
        best = max if "MB/s" in key else min
        print(f"{key:<34} {statistics.median(bare):>10.2f} {statistics.median(boxed):>10.2f} "
              f"{statistics.median(boxed) / statistics.median(bare):>7.3f} {best(boxed) / best(bare):>11.3f}")

if __name__ == "__main__":
    main()
