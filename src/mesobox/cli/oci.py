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

import json
import os
import signal
import sys
from pathlib import Path

from mesobox.config import Config
from mesobox.errors import LaunchError, UsageError

USAGE = """\
usage: mesobox oci state ID
       mesobox oci create --bundle DIR ID
       mesobox oci start ID
       mesobox oci run --bundle DIR ID
       mesobox oci kill ID [SIGNAL]
       mesobox oci delete [--force] ID
"""


def _options(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    opts: dict[str, str | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in ("--bundle", "-b") and i + 1 < len(argv):
            opts["bundle"], i = argv[i + 1], i + 2
        elif word.startswith("--bundle="):
            opts["bundle"], i = word.split("=", 1)[1], i + 1
        elif word in ("--force", "-f"):
            opts["force"], i = True, i + 1
        elif word.startswith("-") and not word[1:].isdigit():
            raise UsageError(f"unknown option {word}", hint=USAGE.splitlines()[0])
        else:
            rest.append(word)
            i += 1
    return opts, rest


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
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    from mesobox.oci.bundle import StateDir, load_bundle

    verb = argv[0]
    opts, rest = _options(argv[1:])
    if not rest:
        raise UsageError(f"oci {verb}: missing container id", hint=USAGE.splitlines()[0])
    state = StateDir(config, rest[0])
    if verb in ("create", "run"):
        if "bundle" not in opts:
            raise UsageError(f"oci {verb} needs --bundle DIR")
        bundle = Path(str(opts["bundle"]))
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
        sys.stdout.write(json.dumps(state.read(), indent=2) + "\n")
        return 0
    if verb == "kill":
        current = state.read()
        if current["status"] != "running":
            raise LaunchError(f"container {state.id!r} is not running")
        os.kill(int(current["pid"]), _signal(rest[1] if len(rest) > 1 else "SIGTERM"))
        return 0
    if verb == "delete":
        current = state.read()
        if current["status"] == "running":
            if not opts.get("force"):
                raise LaunchError(f"container {state.id!r} is running", hint="kill it first or use --force")
            os.kill(int(current["pid"]), signal.SIGKILL)
        state.remove()
        return 0
    raise UsageError(f"unknown oci verb {verb!r}", hint=USAGE.splitlines()[0])
