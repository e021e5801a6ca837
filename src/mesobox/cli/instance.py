"""``mesobox instance …``, ``mesobox checkpoint``, ``mesobox restore``: cloud-mode wiring.

Only argument handling and printing live here; the work is in ``instances.lifecycle``
(start, wait, list, stop), ``instances.state``, ``instances.supervisor`` (the detached
keeper), ``instances.nsenter`` (exec), ``instances.pause``, ``instances.checkpoint``
and ``instances.stats`` (stats, top).  See docs/instances.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from mesobox.cli import print_json, table
from mesobox.cli.usage import parse, subverb
from mesobox.config import Config
from mesobox.errors import UsageError
from mesobox.instances import lifecycle
from mesobox.instances import state as st


def parse_duration(text: str, what: str = "--time") -> float:
    """``30``, ``30s``, ``10m``, ``2h``, ``1d`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise UsageError(f"bad {what} value {text!r}", hint="a number with an optional unit: 30s, 10m, 2h") from None
    if value <= 0 or value != value:
        raise UsageError(f"{what} must be positive, not {text!r}")
    return value


def parse_restart(text: str) -> tuple[str, int | None]:
    policy, _, limit = text.partition(":")
    if policy not in ("no", "on-failure", "always") or (limit and policy != "on-failure"):
        raise UsageError(f"bad --restart value {text!r}", hint="use no, on-failure, on-failure:N or always")
    if limit and not limit.isdigit():
        raise UsageError(f"bad restart count in {text!r}", hint="on-failure:N takes a whole number")
    return policy, int(limit) if limit else None


DOCKER_HABITS = ("-d", "--detach", "--rm", "-i", "--interactive", "--tty")


def parse_start(argv: list[str]) -> dict[str, Any] | None:
    """``instance start`` arguments → the instance's spec: our own options, the run
    options as typed (the supervisor hands them to ``mesobox run``), IMAGE, NAME, ARGS.
    None when it printed the help instead."""
    parsed = parse("instance start", argv)
    if parsed is None:
        return None
    values, (image, name, *args) = parsed
    restart, restart_max = parse_restart(values.get("restart", "no"))
    time_limit = parse_duration(values["time_limit"]) if "time_limit" in values else None
    grace = parse_duration(values["grace"], "--grace") if "grace" in values else 10.0
    name = st.check_name(name)
    if os.path.exists(image):  # a rootfs directory or squashfs file: absolute, the supervisor runs in "/"
        image = os.path.abspath(image)
    # An instance is detached and removed by `instance stop` anyway: Docker's -d, --rm,
    # -i and --tty mean nothing more here (and -d would stop `mesobox run`).
    options = [o for o in values.get(table.INHERITED, ()) if o not in DOCKER_HABITS]
    stop_signal = None
    if "checkpoint_dir" in values:
        from mesobox.slurm.launch import Checkpoint, checkpoint_options

        checkpoint = Checkpoint(values["checkpoint_dir"], values.get("checkpoint_signal"), None)
        options = checkpoint_options(str(checkpoint.directory), options, "layer") + options
        stop_signal = checkpoint.signal
    elif "checkpoint_signal" in values:
        raise UsageError("--checkpoint-signal needs --checkpoint-dir")
    return {"restart": restart, "restart_max": restart_max, "time_limit": time_limit, "grace": grace,
            "options": options, "name": name, "image": image, "args": args, "cwd": os.getcwd(),
            "stop_signal": stop_signal}


def cmd_start(argv: list[str], config: Config) -> int:
    spec = parse_start(argv)
    if spec is None:
        return 0
    lifecycle.start(config, spec)
    sys.stdout.write(f"{spec['name']}\n")
    return 0


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def cmd_list(argv: list[str], config: Config) -> int:
    parsed = parse("instance list", argv)
    if parsed is None:
        return 0
    values, _ = parsed
    rows = lifecycle.listing(config, everything=bool(values.get("all")))
    if values.get("json"):
        print_json(rows)
        return 0
    fmt = "{:<20} {:<30} {:<10} {:>8} {:>8} {:>7}\n"
    sys.stdout.write(fmt.format("NAME", "IMAGE", "STATUS", "PID", "RESTARTS", "UPTIME"))
    for r in rows:
        image = str(r["image"])
        image = image if len(image) <= 30 else "…" + image[-29:]
        uptime = _uptime(r["uptime_s"])
        sys.stdout.write(fmt.format(r["name"], image, r["status"], r["pid"] or "-", r["restarts"], uptime))
    return 0


def cmd_stop(argv: list[str], config: Config) -> int:
    parsed = parse("instance stop", argv)
    if parsed is None:
        return 0
    values, names = parsed
    grace = parse_duration(values["grace"], "-t") if "grace" in values else None
    instances = [st.load(config, n) for n in names]  # all names checked before stopping any
    for inst in instances:
        lifecycle.stop(inst, grace if grace is not None else float(inst.spec.get("grace", 10)))
        sys.stdout.write(f"{inst.name}\n")
    return 0


def cmd_logs(argv: list[str], config: Config) -> int:
    parsed = parse("instance logs", argv)
    if parsed is None:
        return 0
    values, (name,) = parsed
    inst = st.load(config, name)
    out = sys.stdout.buffer
    with open(inst.log, "rb") as log:
        while True:
            chunk = log.read(65536)
            if chunk:
                out.write(chunk)
                continue
            out.flush()
            if not values.get("follow") or not st.supervisor_alive(inst.path):
                return 0
            time.sleep(0.2)


def cmd_exec(argv: list[str], config: Config) -> int:
    parsed = parse("instance exec", argv)
    if parsed is None:
        return 0
    _, (name, *command) = parsed
    inst = st.load(config, name)
    pid = inst.workload_pid
    if pid is None or inst.status not in (st.RUNNING, st.DEAD, st.PAUSED):
        raise UsageError(f"instance {inst.name!r} is {inst.status}: nothing to exec into")
    from mesobox.instances import nsenter

    sys.stdout.flush()
    return nsenter.run_in(st.namespace_target(pid), command)


def cmd_pause(argv: list[str], config: Config, resume: bool) -> int:
    parsed = parse(f"instance {'resume' if resume else 'pause'}", argv)
    if parsed is None:
        return 0
    _, (name,) = parsed
    from mesobox.instances import pause

    inst = st.load(config, name)
    method = pause.resume(inst) if resume else pause.pause(inst)
    if method == "sigstop" and not resume:
        sys.stderr.write(f"mesobox: {pause.SIGSTOP_NOTE}\n")
    sys.stdout.write(f"{inst.name}\n")
    return 0


def cmd_snapshot(argv: list[str], config: Config) -> int:
    parsed = parse("instance snapshot", argv)
    if parsed is None:
        return 0
    _, (name, dest) = parsed
    from mesobox.instances.checkpoint import snapshot

    held = snapshot(st.load(config, name), Path(dest).absolute())
    sys.stderr.write(f"mesobox: snapshot of {name} written to {dest} (instance held with: {held})\n")
    return 0


def cmd_stats(argv: list[str], config: Config) -> int:
    parsed = parse("instance stats", argv)
    if parsed is None:
        return 0
    values, names = parsed
    interval = parse_duration(values["interval"], "--interval") if "interval" in values else 1.0
    from mesobox.instances import stats

    if names:
        chosen = [st.load(config, n) for n in names]
        idle = [i.name for i in chosen if i.status not in (st.RUNNING, st.PAUSED)]
        if idle:
            raise UsageError(f"instance {idle[0]!r} is not running: no usage to show")
    else:
        chosen = [i for i in st.list_all(config) if i.status in (st.RUNNING, st.PAUSED)]
    before = {i.name: stats.sample(i) for i in chosen}
    try:
        while True:
            time.sleep(interval)  # CPU % is over this interval: it needs two samples
            rows = []
            for inst in chosen:
                now = stats.sample(inst)
                rows.append(now.row(before.get(inst.name)))
                before[inst.name] = now
            _print_stats(rows, bool(values.get("json")))
            if values.get("no_stream"):
                return 0
    except KeyboardInterrupt:
        return 0


def _print_stats(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json(rows)
        sys.stdout.flush()
        return
    from mesobox.instances.stats import human

    fmt = "{:<20} {:>7} {:>10} {:>10} {:>10} {:>6}\n"
    sys.stdout.write(fmt.format("NAME", "CPU %", "MEM", "IO READ", "IO WRITE", "PIDS"))
    for r in rows:
        cpu = "-" if r["cpu_percent"] is None else f"{r['cpu_percent']:.1f}%"
        sys.stdout.write(fmt.format(r["name"], cpu, human(r["memory_bytes"]), human(r["io_read_bytes"]),
                                    human(r["io_write_bytes"]), "-" if r["pids"] is None else r["pids"]))
    sys.stdout.flush()


def cmd_top(argv: list[str], config: Config) -> int:
    parsed = parse("instance top", argv)
    if parsed is None:
        return 0
    values, (name,) = parsed
    inst = st.load(config, name)
    if inst.status not in (st.RUNNING, st.PAUSED, st.DEAD) or inst.workload_pid is None:
        raise UsageError(f"instance {inst.name!r} is {inst.status}: no processes to show")
    from mesobox.instances.stats import human, top

    rows = top(inst)
    if values.get("json"):
        print_json(rows)
        return 0
    fmt = "{:>8} {:<12} {:>6} {:>10}  {}\n"
    sys.stdout.write(fmt.format("PID", "USER", "%CPU", "RSS", "COMMAND"))
    for r in rows:
        sys.stdout.write(fmt.format(r["pid"], r["user"][:12], f"{r['cpu_percent']:.1f}", human(r["rss_bytes"]),
                                    r["command"][:200]))
    return 0


def main_instance(argv: list[str], config: Config) -> int:
    chosen = subverb("instance", argv)
    if chosen is None:
        return 0 if argv else 2
    verb, rest = chosen
    if verb in ("pause", "resume"):
        return cmd_pause(rest, config, verb == "resume")
    handlers = {"start": cmd_start, "list": cmd_list, "stop": cmd_stop, "logs": cmd_logs, "exec": cmd_exec,
                "snapshot": cmd_snapshot, "stats": cmd_stats, "top": cmd_top}
    return handlers[verb](rest, config)


def _name_and_dir(verb: str, argv: list[str]) -> tuple[str, Path] | None:
    parsed = parse(verb, argv)
    if parsed is None:
        return None
    _, (name, path) = parsed
    return st.check_name(name), Path(path).absolute()


def main_checkpoint(argv: list[str], config: Config) -> int:
    from mesobox.instances import checkpoint

    given = _name_and_dir("checkpoint", argv)
    if given is None:
        return 0
    name, images = given
    checkpoint.require_criu()  # before touching the instance: say plainly when CRIU cannot work
    inst = st.load(config, name)
    checkpoint.checkpoint(inst, images)
    lifecycle.stop(st.load(config, name), 0)
    sys.stdout.write(f"{name}\n")
    return 0


def main_restore(argv: list[str], config: Config) -> int:
    from mesobox.instances import checkpoint

    given = _name_and_dir("restore", argv)
    if given is None:
        return 0
    name, images = given
    checkpoint.require_criu()
    pid = checkpoint.restore(name, images)
    sys.stdout.write(f"{name} restored as process {pid} (unsupervised: CRIU owns it now)\n")
    return 0
