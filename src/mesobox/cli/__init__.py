"""Command-line boundary: dispatch to a verb, turn MesoboxError into one line.

``DISPATCH`` maps each verb to ``module:function``; only the module of the verb
actually used is imported (``mesobox run`` must not pay for argparse, HTTP or JSON
schema code), by name: the package never imports its children statically, they import
it.  What each verb takes and its help live in the option table (cli/table.py), read
here only for options before the verb.  Each verb function takes ``(argv, config)``
and returns the exit status.  This is the only place that catches ``MesoboxError`` and
the only place that prints a traceback, and only with ``--debug`` (or
``MESOBOX_DEBUG=1``).  ``print_json`` is the one style of every JSON output.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# verb -> (module, function); the verbs' help is in cli/table.py
DISPATCH: dict[str, tuple[str, str]] = {
    "run": ("mesobox.cli.run", "main_run"),
    "exec": ("mesobox.cli.run", "main_exec"),
    "shell": ("mesobox.cli.run", "main_shell"),
    "build": ("mesobox.cli.build", "main_build"),
    "pull": ("mesobox.cli.image", "main_pull"),
    "images": ("mesobox.cli.image", "main_images"),
    "inspect": ("mesobox.cli.image", "main_inspect"),
    "rm": ("mesobox.cli.image", "main_rm"),
    "prune": ("mesobox.cli.image", "main_prune"),
    "export": ("mesobox.cli.image", "main_export"),
    "push": ("mesobox.cli.push", "main_push"),
    "tag": ("mesobox.cli.push", "main_tag"),
    "login": ("mesobox.cli.login", "main_login"),
    "logout": ("mesobox.cli.login", "main_logout"),
    "instance": ("mesobox.cli.instance", "main_instance"),
    "checkpoint": ("mesobox.cli.instance", "main_checkpoint"),
    "restore": ("mesobox.cli.instance", "main_restore"),
    "srun": ("mesobox.cli.slurm", "main_srun"),
    "sbatch": ("mesobox.cli.slurm", "main_sbatch"),
    "bundle": ("mesobox.cli.slurm", "main_bundle"),
    "oci": ("mesobox.cli.oci", "main_oci"),
    "slurm": ("mesobox.cli.slurm", "main_slurm"),
    "overlay": ("mesobox.cli.overlay", "main_overlay"),
    "key": ("mesobox.cli.trust", "main_key"),
    "sign": ("mesobox.cli.trust", "main_sign"),
    "verify": ("mesobox.cli.trust", "main_verify"),
    "sbom": ("mesobox.cli.audit", "main_sbom"),
    "scan": ("mesobox.cli.audit", "main_scan"),
    "diff": ("mesobox.cli.audit", "main_diff"),
    "matrix": ("mesobox.cli.tools", "main_matrix"),
    "bench": ("mesobox.cli.tools", "main_bench"),
    "help": ("mesobox.cli.usage", "main_help"),
    "completion": ("mesobox.cli.completion", "main_completion"),
    "manpage": ("mesobox.cli.usage", "main_manpage"),
}

# Verbs that start a container in this process: signals are held from the first line.
LAUNCH_VERBS = ("run", "exec", "shell")


def _load(module: str, name: str) -> Any:
    """``name`` from a module of the CLI, imported by its name (see the docstring)."""
    return getattr(__import__(module, fromlist=[name]), name)


def _usage() -> str:
    text: str = _load("mesobox.cli.usage", "help_text")("")
    return text


def print_json(data: object) -> None:
    """Every ``--json`` and every JSON mesobox prints: indented by 2, keys in the order
    they were made, ASCII only (a file name that is not UTF-8 still prints), one newline."""
    import json

    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=True) + "\n")


def _print_error(err: BaseException, debug: bool) -> None:
    from mesobox.errors import MesoboxError, os_error_text

    if debug:
        import traceback

        traceback.print_exc()
    if isinstance(err, MesoboxError):
        sys.stderr.write(f"mesobox: error: {err.message}\n")
        if err.hint:
            sys.stderr.write(f"mesobox: hint: {err.hint}\n")
    else:
        sys.stderr.write(f"mesobox: error: {os_error_text(err)}\n")


def _global_options(args: list[str], debug: bool) -> tuple[int | None, list[str], bool]:
    """``mesobox [--debug] [--version] [--help] VERB ...``: (exit status when done, the rest, debug)."""
    from mesobox.errors import MesoboxError

    options = _load("mesobox.cli.table", "toplevel")()
    try:
        values, rest = _load("mesobox.cli.table", "parse")(options, args, False)
    except MesoboxError as err:
        _print_error(err, False)
        return 2, [], debug
    if values.get("help"):
        sys.stdout.write(_usage())
        return 0, [], debug
    if values.get("version"):
        from mesobox import __version__

        sys.stdout.write(f"mesobox {__version__}\n")
        return 0, [], debug
    return None, rest, debug or bool(values.get("debug"))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("MESOBOX_DEBUG", "") not in ("", "0")
    if args and args[0].startswith("-"):  # rare: the table is read only then
        status, args, debug = _global_options(args, debug)
        if status is not None:
            return status
    if not args:
        sys.stderr.write(_usage())
        return 2
    verb = args.pop(0)
    if verb in LAUNCH_VERBS:
        # From here on a walltime warning or scancel cannot kill a half-started
        # container: it waits, pending, for the workload (launch/launcher.py).
        from mesobox.launch.signals import hold_signals

        hold_signals()
    entry = DISPATCH.get(verb)
    if entry is None:
        sys.stderr.write(f"mesobox: error: unknown verb {verb!r}\nmesobox: hint: `mesobox --help` lists them\n")
        return 2
    try:
        if verb == "help":  # no configuration needed (nor a broken one in the way)
            shown: int = _load(*entry)(args, None)
            return shown
        if verb in LAUNCH_VERBS and not debug:
            # The saved program of this very command line, when nothing it depends on
            # has changed: never returns then.  Otherwise this launch records one.
            from mesobox.launch.plancache import launch_cached

            launch_cached(verb, args)
        from mesobox.config import load_config

        config = load_config()
        if debug:
            config = config.replace(debug=True)
        # imported directly (no importlib.util.find_spec: ≈5 ms of `run` start-up)
        try:
            function = _load(*entry)
        except ModuleNotFoundError as err:
            if err.name != entry[0]:
                raise
            sys.stderr.write(f"mesobox: error: verb {verb!r} is not available in this installation\n")
            return 2
        result: int = function(args, config)
        return result
    except KeyboardInterrupt:
        sys.stderr.write("mesobox: interrupted\n")
        return 130
    except BrokenPipeError:
        return 141
    except Exception as err:
        from mesobox.errors import MesoboxError  # on failure only: ≈0.5 ms of every launch

        if not isinstance(err, MesoboxError | OSError):
            raise
        # An unexpected OS failure still gets one line; --debug shows where.
        _print_error(err, debug)
        return err.exit_code if isinstance(err, MesoboxError) else 1
