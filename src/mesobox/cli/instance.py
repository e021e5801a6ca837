"""``mesobox instance …``, ``mesobox checkpoint``, ``mesobox restore``: cloud-mode wiring.

Only argument handling lives here; the work is in ``runtime.instances`` (state),
``runtime.supervisor`` (the detached keeper), ``runtime.nsenter`` (exec),
``runtime.pause`` and ``runtime.checkpoint``.  See docs/instances.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mesobox import procs
from mesobox.config import Config
from mesobox.errors import LaunchError, UsageError
from mesobox.instances import state as st

USAGE = """\
usage: mesobox instance start [RUN-OPTIONS] [--restart no|on-failure[:N]|always] [--time DURATION]
                              [-t|--grace SECONDS] IMAGE NAME [ARGS...]
       mesobox instance list [--all] [--json]
       mesobox instance stop [-t GRACE] NAME...
       mesobox instance logs [-f] NAME
       mesobox instance exec NAME CMD [ARGS...]
       mesobox instance pause NAME | resume NAME
       mesobox instance snapshot NAME DEST      (DEST: a directory, or *.tar / *.tar.gz)
"""
START_TIMEOUT = 120.0
SUPERVISOR_TIMEOUT = 15.0  # for the supervisor to take its lock and write state.json


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


def _take_value(argv: list[str], i: int, word: str) -> tuple[str, int]:
    if "=" in word and word.startswith("--"):
        return word.split("=", 1)[1], i + 1
    if i + 1 >= len(argv):
        raise UsageError(f"option {word} needs a value", hint=USAGE.splitlines()[0])
    return argv[i + 1], i + 2


def _takes_value(word: str) -> bool:
    """Does this `mesobox run` option consume the next word?  Asked of cli/run.py's own
    table, so the two parsers cannot drift apart."""
    from mesobox.cli.run import OPTIONS

    kind = OPTIONS.get(word, ("", "flag"))[1]
    return "=" not in word and kind in ("value", "list")


def parse_start(argv: list[str]) -> dict[str, Any]:
    """Split ``instance start`` arguments into our own options, run options, IMAGE, NAME, ARGS."""
    spec: dict[str, Any] = {"restart": "no", "restart_max": None, "time_limit": None, "grace": 10.0, "options": []}
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        word = argv[i]
        key = word.split("=", 1)[0]
        if key == "--restart":
            value, i = _take_value(argv, i, word)
            spec["restart"], spec["restart_max"] = parse_restart(value)
        elif key == "--time":
            value, i = _take_value(argv, i, word)
            spec["time_limit"] = parse_duration(value)
        elif key in ("-t", "--grace"):
            value, i = _take_value(argv, i, word)
            spec["grace"] = parse_duration(value, "--grace")
        elif _takes_value(word):
            spec["options"] += argv[i : i + 2]
            i += 2
        else:
            spec["options"].append(word)
            i += 1
    rest = argv[i + 1 :] if i < len(argv) and argv[i] == "--" else argv[i:]
    if len(rest) < 2:
        raise UsageError("instance start needs IMAGE and NAME", hint=USAGE.splitlines()[0])
    image, name = rest[0], st.check_name(rest[1])
    if os.path.exists(image):  # a rootfs directory or squashfs file: absolute, the supervisor runs in "/"
        image = os.path.abspath(image)
    spec.update(name=name, image=image, args=rest[2:], cwd=os.getcwd())
    return spec


def cmd_start(argv: list[str], config: Config) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return 0
    spec = parse_start(argv)
    path = st.claim(config, spec["name"])
    try:
        st.write_json(path / "spec.json", spec)
        with open(path / "output.log", "ab") as log:
            # setsid: the supervisor outlives this command and its terminal; it forks again.
            first = subprocess.run(
                [sys.executable, "-m", "mesobox.instances.supervisor", str(path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", start_new_session=True, check=False,
            )
        if first.returncode != 0:
            raise LaunchError(f"the supervisor of {spec['name']!r} could not start: {_log_tail(path / 'output.log')}")
    except BaseException:
        st.remove(st.load(config, spec["name"]))
        raise
    return _await_start(config, spec["name"])


def _await_start(config: Config, name: str) -> int:
    started = time.monotonic()
    while time.monotonic() < started + START_TIMEOUT:
        inst = st.load(config, name)
        if inst.status in (st.RUNNING, st.EXITED, st.PAUSED):
            sys.stdout.write(f"{name}\n")
            return 0
        # state.json appears only once the supervisor holds its lock: before that, an
        # unlocked instance is not dead, just not there yet (unless it never comes).
        settled = bool(inst.state) or time.monotonic() > started + SUPERVISOR_TIMEOUT
        if settled and inst.status in (st.FAILED, st.DEAD) and not inst.supervisor_alive:
            tail = _log_tail(inst.log)
            code = inst.state.get("exit_code")
            st.remove(inst)
            raise LaunchError(f"instance {name!r} failed to start (exit {code}): {tail}",
                              hint="try the same options with `mesobox run` to see the whole output")
        time.sleep(0.02)
    raise LaunchError(f"instance {name!r} did not start within {START_TIMEOUT:.0f} s",
                      hint=f"see `mesobox instance logs {name}`; `mesobox instance stop {name}` removes it")


def _log_tail(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1].strip()


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def cmd_list(argv: list[str], config: Config) -> int:
    unknown = [a for a in argv if a not in ("--all", "-a", "--json")]
    if unknown:
        raise UsageError(f"unknown argument {unknown[0]!r}", hint="mesobox instance list [--all] [--json]")
    everything = "--all" in argv or "-a" in argv
    rows = [inst.summary() for inst in st.list_all(config)]
    if not everything:
        rows = [r for r in rows if r["status"] in (st.RUNNING, st.PAUSED, st.RESTARTING, st.STARTING)]
    if "--json" in argv:
        import json

        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return 0
    fmt = "{:<20} {:<30} {:<10} {:>8} {:>8} {:>7}\n"
    sys.stdout.write(fmt.format("NAME", "IMAGE", "STATUS", "PID", "RESTARTS", "UPTIME"))
    for r in rows:
        image = str(r["image"])
        image = image if len(image) <= 30 else "…" + image[-29:]
        uptime = _uptime(r["uptime_s"])
        sys.stdout.write(fmt.format(r["name"], image, r["status"], r["pid"] or "-", r["restarts"], uptime))
    return 0


def stop_one(inst: st.Instance, grace: float) -> None:
    """Ask the supervisor to stop (it does SIGTERM, grace, SIGKILL, cleanup); if it is
    dead or does not answer, do the same ourselves.  Then remove the state."""
    if inst.supervisor_alive:
        st.write_json(inst.path / "stop.json", {"grace": grace})
        pid = int(inst.state.get("supervisor_pid") or 0)
        if pid and procs.same_process(pid, inst.state.get("supervisor_start")):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace + 15
        while st.supervisor_alive(inst.path) and time.monotonic() < deadline:
            time.sleep(0.02)
        if st.supervisor_alive(inst.path) and pid and procs.same_process(pid, inst.state.get("supervisor_start")):
            os.kill(pid, signal.SIGKILL)
            st.wait_gone([pid], 5)
    from mesobox.instances.pause import kill_leftovers

    kill_leftovers(st.Instance(inst.name, inst.path, inst.spec, st.read_json(inst.path / "state.json")), grace)
    st.remove(inst)


def cmd_stop(argv: list[str], config: Config) -> int:
    grace: float | None = None
    names: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word.split("=", 1)[0] in ("-t", "--time", "--grace"):
            value, i = _take_value(argv, i, word)
            grace = parse_duration(value, "-t")
        elif word.startswith("-"):
            raise UsageError(f"unknown option {word}", hint="mesobox instance stop [-t GRACE] NAME...")
        else:
            names.append(word)
            i += 1
    if not names:
        raise UsageError("instance stop needs at least one NAME", hint="mesobox instance stop [-t GRACE] NAME...")
    instances = [st.load(config, n) for n in names]  # all names checked before stopping any
    for inst in instances:
        stop_one(inst, grace if grace is not None else float(inst.spec.get("grace", 10)))
        sys.stdout.write(f"{inst.name}\n")
    return 0


def cmd_logs(argv: list[str], config: Config) -> int:
    follow = "-f" in argv or "--follow" in argv
    names = [a for a in argv if a not in ("-f", "--follow")]
    if len(names) != 1 or names[0].startswith("-"):
        raise UsageError("instance logs needs exactly one NAME", hint="mesobox instance logs [-f] NAME")
    inst = st.load(config, names[0])
    out = sys.stdout.buffer
    with open(inst.log, "rb") as log:
        while True:
            chunk = log.read(65536)
            if chunk:
                out.write(chunk)
                continue
            out.flush()
            if not follow or not st.supervisor_alive(inst.path):
                return 0
            time.sleep(0.2)


def cmd_exec(argv: list[str], config: Config) -> int:
    if len(argv) < 2:
        raise UsageError("instance exec needs NAME and a command", hint="mesobox instance exec NAME CMD [ARGS...]")
    inst = st.load(config, argv[0])
    pid = inst.workload_pid
    if pid is None or inst.status not in (st.RUNNING, st.DEAD, st.PAUSED):
        raise UsageError(f"instance {inst.name!r} is {inst.status}: nothing to exec into")
    from mesobox.instances import nsenter

    sys.stdout.flush()
    return nsenter.run_in(st.namespace_target(pid), argv[1:])


def cmd_pause(argv: list[str], config: Config, resume: bool) -> int:
    if len(argv) != 1:
        raise UsageError(f"instance {'resume' if resume else 'pause'} needs exactly one NAME")
    from mesobox.instances import pause

    inst = st.load(config, argv[0])
    method = pause.resume(inst) if resume else pause.pause(inst)
    if method == "sigstop" and not resume:
        sys.stderr.write(f"mesobox: {pause.SIGSTOP_NOTE}\n")
    sys.stdout.write(f"{inst.name}\n")
    return 0


def cmd_snapshot(argv: list[str], config: Config) -> int:
    if len(argv) != 2:
        raise UsageError("instance snapshot needs NAME and DEST", hint=USAGE.splitlines()[-1].strip())
    from mesobox.instances.checkpoint import snapshot

    held = snapshot(st.load(config, argv[0]), Path(argv[1]).absolute())
    sys.stderr.write(f"mesobox: snapshot of {argv[0]} written to {argv[1]} (instance held with: {held})\n")
    return 0


def main_instance(argv: list[str], config: Config) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb in ("list", "ls"):
        return cmd_list(rest, config)
    if verb in ("pause", "resume"):
        return cmd_pause(rest, config, verb == "resume")
    handlers = {"start": cmd_start, "stop": cmd_stop, "logs": cmd_logs, "exec": cmd_exec, "snapshot": cmd_snapshot}
    handler = handlers.get(verb)
    if handler is None:
        raise UsageError(f"unknown instance verb {verb!r}", hint=USAGE.splitlines()[0])
    return handler(rest, config)


def _name_and_dir(argv: list[str], verb: str) -> tuple[str, Path]:
    if len(argv) != 2 or argv[0].startswith("-"):
        raise UsageError(f"{verb} needs NAME and DIR", hint=f"mesobox {verb} NAME DIR")
    return st.check_name(argv[0]), Path(argv[1]).absolute()


def main_checkpoint(argv: list[str], config: Config) -> int:
    from mesobox.instances import checkpoint

    name, images = _name_and_dir(argv, "checkpoint")
    checkpoint.require_criu()  # before touching the instance: say plainly when CRIU cannot work
    inst = st.load(config, name)
    checkpoint.checkpoint(inst, images)
    stop_one(st.load(config, name), 0)
    sys.stdout.write(f"{name}\n")
    return 0


def main_restore(argv: list[str], config: Config) -> int:
    from mesobox.instances import checkpoint

    name, images = _name_and_dir(argv, "restore")
    checkpoint.require_criu()
    pid = checkpoint.restore(name, images)
    sys.stdout.write(f"{name} restored as process {pid} (unsupervised: CRIU owns it now)\n")
    return 0
