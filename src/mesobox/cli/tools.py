"""CLI wiring for ``mesobox matrix`` and ``mesobox bench`` (the tools room, tools/).

Both take ``[OPTIONS] [EXEC-OPTIONS] IMAGE... -- CMD [ARGS...]``: their own options
and ``mesobox exec``'s (handed on as typed to every container) anywhere before the
``--``, which is required: a command's own options can then never be taken for
mesobox's.  Wiring only: parse, call tools/matrix.py or tools/bench.py, print the
table, write the JSON and HTML reports (tools/report.py).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from mesobox.cli import print_json, table
from mesobox.cli.usage import help_text
from mesobox.config import Config
from mesobox.errors import UsageError


def _split(path: str, argv: list[str]) -> tuple[dict[str, Any], list[str], list[str]] | None:
    """(options, images, command); None when the help was printed.  The ``--`` that
    ends the options is the first one that is not an option's value."""
    verb = table.find(path)
    assert verb is not None
    index = verb.index()
    cut = None
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            cut = i
            break
        name = word.partition("=")[0] if word.startswith("--") else word[:2]
        found = index.get(name)
        attached = "=" in word if word.startswith("--") else len(word) > 2
        i += 2 if found is not None and found[0].takes_value and not attached else 1
    head, command = (argv, []) if cut is None else (argv[:cut], argv[cut + 1:])
    values, args = table.parse(verb, head, check=False)
    if values.get("help"):
        sys.stdout.write(help_text(path))
        return None
    usage = f"usage: {table.synopsis(verb)}"
    if not args:
        raise UsageError(f"{path}: no image given", hint=usage)
    if cut is None:
        raise UsageError(f"{path}: no command: put `--` between the images and the command", hint=usage)
    if not command:
        raise UsageError(f"{path}: no command after `--`", hint=usage)
    return values, args, command


def _count(values: dict[str, Any], name: str, default: int, least: int) -> int:
    text = values.get(name)
    if text is None:
        return default
    try:
        number = int(text)
    except ValueError:
        raise UsageError(f"--{name} takes a whole number, not {text!r}") from None
    if number < least:
        raise UsageError(f"--{name} must be at least {least}")
    return number


def _write(path: str, text: str, what: str) -> None:
    """A report file, or stdout for ``-``."""
    if path == "-":
        sys.stdout.write(text)
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        raise UsageError(f"cannot write the {what} report {path}: {err.strerror}") from None


def _reports(values: dict[str, Any], data: dict[str, Any], html: Any) -> None:
    if values.get("json"):
        if values["json"] == "-":
            print_json(data)
        else:
            import contextlib
            import io

            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                print_json(data)  # the one JSON style, into the file
            _write(values["json"], text.getvalue(), "JSON")
    if values.get("html"):
        _write(values["html"], html(data), "HTML")


def _note(text: str) -> None:
    sys.stderr.write(f"mesobox: {text}\n")
    sys.stderr.flush()


# --- matrix ---------------------------------------------------------------------------


def main_matrix(argv: list[str], config: Config) -> int:
    split = _split("matrix", argv)
    if split is None:
        return 0
    values, images, command = split
    from mesobox import __version__
    from mesobox.tools import matrix, report

    run_args = list(values.get(table.INHERITED, ()))
    timeout = None
    if values.get("timeout") is not None:
        from mesobox.cli.instance import parse_duration

        timeout = parse_duration(values["timeout"], "--timeout")
    matrix.check_images(config, images)
    slurm = bool(values.get("slurm"))
    if values.get("sbatch_arg") and not slurm:
        raise UsageError("--sbatch-arg is for --slurm")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    job = None
    if slurm:
        jobs = _count(values, "jobs", 0, 1) or None
        results, job = matrix.run_slurm(config, images, command, run_args, jobs, timeout,
                                        values.get("sbatch_arg", ()), _note)
    else:
        jobs = _count(values, "jobs", min(len(images), os.cpu_count() or 1), 1)
        progress = _progress(len(images)) if sys.stderr.isatty() else None
        results = matrix.run_local(config, images, command, run_args, jobs, timeout, progress)
    data = {"tool": "mesobox matrix", "command": command, "exec_options": run_args,
            "mode": "slurm job array" if slurm else f"local, {jobs} at a time", "job": job,
            "timeout": timeout, "host": os.uname().nodename, "started": started, "mesobox_version": __version__,
            "passed": sum(1 for r in results if r["status"] == "pass"), "results": results}
    if values.get("json") != "-":
        sys.stdout.write(report.matrix_table(results))
    _reports(values, data, report.matrix_html)
    return 0 if data["passed"] == len(results) else 1


def _progress(total: int) -> Any:
    import threading

    lock = threading.Lock()
    done = [0]

    def show(result: dict[str, Any]) -> None:
        from mesobox.tools.report import seconds_text

        with lock:
            done[0] += 1
            _note(f"matrix: [{done[0]}/{total}] {result['image']}: {result['status']} "
                  f"({seconds_text(result['seconds'])})")

    return show


# --- bench ----------------------------------------------------------------------------


def main_bench(argv: list[str], config: Config) -> int:
    split = _split("bench", argv)
    if split is None:
        return 0
    values, images, command = split
    if len(images) > 1:
        raise UsageError(f"bench takes one image, not {len(images)}", hint="mesobox matrix runs one command on many")
    image = images[0]
    runs = _count(values, "runs", 10, 1)
    warmup = _count(values, "warmup", 1, 0)
    from mesobox.tools import bench, matrix, report

    run_args = list(values.get(table.INHERITED, ()))
    matrix.check_images(config, [image])
    host = bench.host_argv(command)
    binds = _binds_in_effect(config, run_args, image)  # also checks the options before any run
    identity = matrix.image_identity(config, image)
    env = bench.environment({"name": image, **identity, "exec_options": run_args}, binds)
    progress = None
    if sys.stderr.isatty():
        def progress(done: int, total: int) -> None:
            sys.stderr.write(f"\rmesobox: bench: round {done}/{total}" + ("\n" if done == total else ""))
            sys.stderr.flush()
    measured = bench.run_bench([*matrix.mesobox_exec(run_args), image, *command], host, runs, warmup, progress)
    data = bench.results(command, runs, warmup, measured, env)
    if values.get("json") != "-":
        sys.stdout.write(report.bench_table(data))
    _reports(values, data, report.bench_html)
    return 0


def _binds_in_effect(config: Config, run_args: list[str], image: str) -> list[dict[str, Any]]:
    """The host paths the container sees, as the spec ``mesobox exec`` would build
    has them: defaults ($HOME, the working directory, /tmp, the site's), -B, /dev/shm."""
    from mesobox.cli.run import parse
    from mesobox.launch.specbuild import RunOptions, find_image, make_spec

    values = parse("exec", [*run_args, image, "true"])
    values.pop("debug", None)
    values.pop("mpi", None)  # --mpi host's binds are found at launch (ompi_info): not listed
    if values.get("writable_tmpfs") is not None:
        from mesobox.sizes import parse_size

        text = values["writable_tmpfs"]
        values["writable_tmpfs"] = parse_size(text, "--writable-tmpfs") if text else 0
    spec = make_spec(RunOptions(**values), config, find_image(image, config))
    binds = []
    for mount in spec.mounts:
        bind = mount.type == "bind" or "bind" in mount.options or "rbind" in mount.options
        system = mount.destination in ("/proc", "/sys") or (mount.destination.startswith("/dev/")
                                                            and mount.destination != "/dev/shm")
        if bind and not system:
            binds.append({"source": mount.source, "destination": mount.destination,
                          "read_only": "ro" in mount.options})
    return binds
