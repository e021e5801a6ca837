"""Command-line boundary: dispatch to a verb, turn MesoboxError into one line.

The verb table maps each subcommand to ``module:function``; only the module of the
verb actually used is imported (``mesobox run`` must not pay for argparse, HTTP or
JSON schema code).  Each verb function takes ``(argv, config)`` and returns the exit
status.  This is the only place that catches ``MesoboxError`` and the only place that
prints a traceback, and only with ``--debug`` (or ``MESOBOX_DEBUG=1``).
"""

from __future__ import annotations

import os
import sys

# verb -> (module, function, one-line help)
VERBS: dict[str, tuple[str, str, str]] = {
    "run": ("mesobox.cli.run", "main_run", "run an image's default command (Docker semantics)"),
    "exec": ("mesobox.cli.run", "main_exec", "run a command in an image"),
    "shell": ("mesobox.cli.run", "main_shell", "start an interactive shell in an image"),
    "pull": ("mesobox.cli.image", "main_pull", "fetch an image into the store"),
    "images": ("mesobox.cli.image", "main_images", "list stored images"),
    "inspect": ("mesobox.cli.image", "main_inspect", "show an image's configuration as JSON"),
    "rm": ("mesobox.cli.image", "main_rm", "remove an image from the store"),
    "prune": ("mesobox.cli.image", "main_prune", "delete blobs and caches no image uses"),
    "export": ("mesobox.cli.image", "main_export", "write an image as dir, squashfs or OCI layout"),
    "instance": ("mesobox.cli.instance", "main_instance", "manage long-lived containers (cloud mode)"),
    "checkpoint": ("mesobox.cli.instance", "main_checkpoint", "checkpoint an instance with CRIU"),
    "restore": ("mesobox.cli.instance", "main_restore", "restore an instance from a checkpoint"),
    "srun": ("mesobox.cli.slurm", "main_srun", "run containers as the tasks of a Slurm step"),
    "sbatch": ("mesobox.cli.slurm", "main_sbatch", "submit a batch job whose tasks are containers"),
    "bundle": ("mesobox.cli.slurm", "main_bundle", "make an OCI bundle (config.json + rootfs)"),
    "oci": ("mesobox.cli.oci", "main_oci", "OCI runtime CLI (create/start/state/kill/delete/run)"),
    "slurm": ("mesobox.cli.slurm", "main_slurm", "Slurm site helpers (oci-conf, prolog, epilog)"),
    "overlay": ("mesobox.cli.overlay", "main_overlay", "create a disk-quota overlay image (--overlay FILE)"),
}

# Verbs that start a container in this process: signals are held from the first line.
LAUNCH_VERBS = ("run", "exec", "shell")

USAGE = """\
usage: mesobox [--debug] [--version] VERB [ARGS...]

Unprivileged containers for HPC centres.  `mesobox VERB --help` for a verb's options.

verbs:
"""


def _usage() -> str:
    lines = [USAGE]
    for verb, (module, _, text) in VERBS.items():
        if _verb_available(module):
            lines.append(f"  {verb:<11} {text}\n")
    return "".join(lines)


def _verb_available(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


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


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("MESOBOX_DEBUG", "") not in ("", "0")
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt == "--debug":
            debug = True
        elif opt == "--version":
            from mesobox import __version__

            sys.stdout.write(f"mesobox {__version__}\n")
            return 0
        elif opt in ("-h", "--help"):
            sys.stdout.write(_usage())
            return 0
        else:
            sys.stderr.write(f"mesobox: error: unknown option {opt}\n{_usage()}")
            return 2
    if not args:
        sys.stderr.write(_usage())
        return 2
    verb = args.pop(0)
    if verb == "help":
        sys.stdout.write(_usage())
        return 0
    if verb in LAUNCH_VERBS:
        # From here on a walltime warning or scancel cannot kill a half-started
        # container: it waits, pending, for the workload (launch/launcher.py).
        from mesobox.launch.signals import hold_signals

        hold_signals()
    entry = VERBS.get(verb)
    if entry is None:
        sys.stderr.write(f"mesobox: error: unknown verb {verb!r}\nmesobox: hint: `mesobox --help` lists them\n")
        return 2
    try:
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
            module = __import__(entry[0], fromlist=[entry[1]])
        except ModuleNotFoundError as err:
            if err.name != entry[0]:
                raise
            sys.stderr.write(f"mesobox: error: verb {verb!r} is not available in this installation\n")
            return 2
        status: int = getattr(module, entry[1])(args, config)
        return status
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
