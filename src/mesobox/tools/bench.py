"""``mesobox bench``: a command in a container against the same command on the host.

Runs are interleaved round by round, and which side goes first alternates (container,
host; host, container; ...): a load spike, a frequency change or a cache warmed by the
run before then falls on both sides alike, as in bench/ (bench/README.md).  The first
``warmup`` rounds are run and dropped (page cache, the squashfs mount, saved launch
plans).  Each run is timed by its wall clock, from the fork to the reaped exit, with
the command's output sent to a scratch file (a terminal would time the terminal).
A run that fails stops the bench: timings of a failing command compare nothing.

The container side is ``python -m mesobox exec [EXEC-OPTIONS] IMAGE CMD...``, so its
time includes mesobox's start-up, as a job's does; the host side is CMD itself.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time

from mesobox.errors import LaunchError
from mesobox.tools import stats

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

GOVERNOR = "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first processor's model, as /proc/cpuinfo names it on x86 ("model name"),
    POWER ("cpu") or Arm ("Model", else the implementer and part numbers)."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown"
    for key in ("model name", "cpu", "Model", "Hardware"):
        if fields.get(key):
            return fields[key]
    if "CPU implementer" in fields:
        return f"implementer {fields['CPU implementer']} part {fields.get('CPU part', '?')}"
    return "unknown"


def governor(path: str = GOVERNOR) -> str:
    """cpu0's frequency governor; "unknown" where the kernel shows none (a VM, no cpufreq)."""
    try:
        with open(path) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


def environment(image: dict[str, Any], binds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Where the numbers were measured: what a reader needs to compare two reports."""
    from mesobox import __version__

    uname = os.uname()
    return {
        "host": uname.nodename,
        "kernel": f"{uname.sysname} {uname.release} {uname.version}",
        "machine": uname.machine,
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count() or 0,
        "governor": governor(),
        "python": platform.python_version(),
        "mesobox_version": __version__,
        "image": image,
        "binds": list(binds),
    }


def _timed(argv: Sequence[str], out: Any) -> tuple[float, int]:
    out.seek(0)
    out.truncate()
    start = time.perf_counter()
    proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False)
    return time.perf_counter() - start, proc.returncode


def _failure(side: str, code: int, out: Any) -> LaunchError:
    out.seek(0)
    tail = out.read()[-400:].decode("utf-8", "replace").strip().splitlines()
    detail = f": {tail[-1]}" if tail else ""
    return LaunchError(f"the {side} run exited with status {code}{detail}",
                       hint="bench times a command that succeeds; try it with `mesobox exec` first")


def run_bench(container: Sequence[str], host: Sequence[str], runs: int, warmup: int,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Interleaved runs (module docstring): the samples of both sides, in seconds, and
    which side ran first in each kept round."""
    samples: dict[str, list[float]] = {"container": [], "host": []}
    first: list[str] = []
    argv = {"container": container, "host": host}
    with tempfile.TemporaryFile(prefix="mesobox-bench-") as out:
        for round_ in range(warmup + runs):
            order = ("container", "host") if round_ % 2 == 0 else ("host", "container")
            for side in order:
                seconds, code = _timed(argv[side], out)
                if code != 0:
                    raise _failure(side, code, out)
                if round_ >= warmup:
                    samples[side].append(seconds)
            if round_ >= warmup:
                first.append(order[0])
            if progress is not None:
                progress(round_ + 1, warmup + runs)
    return {"container": samples["container"], "host": samples["host"], "first": first}


def results(command: Sequence[str], runs: int, warmup: int, measured: dict[str, Any],
            env: dict[str, Any]) -> dict[str, Any]:
    """The whole report's data: what ``--json`` writes and the HTML shows."""
    container, host = measured["container"], measured["host"]
    sc, sh = stats.summary(container), stats.summary(host)
    return {
        "tool": "mesobox bench",
        "command": list(command),
        "runs": runs,
        "warmup": warmup,
        "order": "interleaved; the side that runs first alternates every round",
        "unit": "seconds",
        "ci_method": "order statistics of the median (binomial, distribution-free); ci_level is its exact coverage",
        "environment": env,
        "container": {"samples": container, "summary": sc},
        "host": {"samples": host, "summary": sh},
        "first": measured["first"],
        "ratio_median": sc["median"] / sh["median"] if sh["median"] else None,
        "ratio_min": sc["min"] / sh["min"] if sh["min"] else None,
    }


def host_argv(command: Sequence[str]) -> list[str]:
    """The command as the host runs it: found on the host's PATH, or said why not."""
    import shutil

    if "/" not in command[0] and shutil.which(command[0]) is None:
        raise LaunchError(f"{command[0]}: command not found on the host",
                          hint="bench runs the command on the host too: it must exist on both sides")
    return list(command)
