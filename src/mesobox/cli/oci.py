"""``mesobox oci``: the OCI runtime command line, as far as Slurm's oci.conf needs it.

Verbs (runtime-spec runtime.md "Operations"): ``state ID``, ``create --bundle DIR ID``,
``start ID``, ``run --bundle DIR ID``, ``kill ID [SIGNAL]``, ``delete [--force] ID``.
``run`` (what oci.conf's RunTimeRun calls) records the state with this process's pid
and then becomes the container, so Slurm's kill/query reach the workload itself.
Deviation, said here and in docs/slurm.md: ``start`` runs the created container in the
foreground (there is no detached monitor process); Slurm does not use create/start
when RunTimeRun is set.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from mesobox.cli import print_json
from mesobox.cli.usage import parse, subverb
from mesobox.config import Config
from mesobox.errors import LaunchError, UsageError


def _signal(text: str) -> int:
    name = text.upper()
    if name.isdigit():
        return int(name)
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise UsageError(f"unknown signal {text!r}") from None


def _launch(config: Config, bundle: Path, container_id: str) -> int:
    from mesobox.launch.launcher import launch
    from mesobox.oci.bundle import StateDir, load_bundle, spec_from_bundle

    spec = spec_from_bundle(bundle, load_bundle(bundle))
    state = StateDir(config, container_id)
    state.write(bundle, "running", os.getpid())
    return launch(spec, config)


def main_oci(argv: list[str], config: Config) -> int:
    chosen = subverb("oci", argv)
    if chosen is None:
        return 0 if argv else 2
    verb, rest = chosen
    parsed = parse(f"oci {verb}", rest)
    if parsed is None:
        return 0
    values, args = parsed
    from mesobox.oci.bundle import StateDir, load_bundle

    state = StateDir(config, args[0])
    if verb in ("create", "run"):
        bundle = Path(values["bundle"])
        if state.exists() and state.read()["status"] != "stopped":
            raise LaunchError(f"container {state.id!r} already exists")
        if verb == "run":
            return _launch(config, bundle, state.id)
        load_bundle(bundle)
        state.write(bundle, "created", 0)
        return 0
    if verb == "start":
        current = state.read()
        if current["status"] != "created":
            raise LaunchError(f"container {state.id!r} is {current['status']}, not created")
        return _launch(config, Path(current["bundle"]), state.id)
    if verb == "state":
        print_json(state.read())
        return 0
    if verb == "kill":
        current = state.read()
        if current["status"] != "running":
            raise LaunchError(f"container {state.id!r} is not running")
        os.kill(int(current["pid"]), _signal(args[1] if len(args) > 1 else "SIGTERM"))
        return 0
    current = state.read()  # delete
    if current["status"] == "running":
        if not values.get("force"):
            raise LaunchError(f"container {state.id!r} is running", hint="kill it first or use --force")
        os.kill(int(current["pid"]), signal.SIGKILL)
    state.remove()
    return 0
