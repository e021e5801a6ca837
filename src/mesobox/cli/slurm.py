"""CLI wiring for the Slurm verbs: srun, sbatch, bundle and ``slurm`` site helpers.

Only wiring: ``split_args`` sorts an srun/sbatch command line (Slurm's grammar is in
``mesobox.slurm.options``, mesobox's in the option table), the work is in
``mesobox.slurm.launch``/``ociconf``/``hooks`` and ``mesobox.oci.bundle``.  ``srun``
replaces this process with Slurm's ``srun`` (os.execv) so that signals and the exit
status are Slurm's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mesobox.cli import table
from mesobox.cli.usage import help_text, parse, subverb
from mesobox.config import Config
from mesobox.errors import LaunchError, UsageError
from mesobox.slurm.options import MPI_HOST, SplitArgs, slurm_option_width


def _mesobox_options(verb: table.Verb) -> dict[str, table.Option]:
    """The options of an srun/sbatch command line that are mesobox's: the verb's own
    (--image, --wrap) and the run options by their long names; ``--mpi`` is decided by
    its value."""
    assert verb.inherit is not None
    run = {n: o for o in verb.inherit.options for n in o.names if n.startswith("--") and n != "--mpi"}
    return {**run, **{n: o for o in verb.options for n in o.names}}


def _take_value(argv: list[str], i: int, name: str) -> tuple[str, int]:
    if i + 1 >= len(argv):
        raise UsageError(f"option {name} needs a value")
    return argv[i + 1], i + 2


def split_args(argv: list[str], need_command: bool = True, verb: str = "srun") -> SplitArgs:
    """Sort ``[--image REF] [run opts] [slurm opts] [--] CMD...`` into its parts."""
    table_verb = table.find(verb)
    assert table_verb is not None
    mine = _mesobox_options(table_verb)
    own = {n for o in table_verb.options for n in o.names}
    found: dict[str, str] = {}  # --image, --wrap
    run_args: list[str] = []
    slurm_args: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or word == "-":
            break
        name, eq, value = word.partition("=")
        opt = mine.get(name)
        if name == "--mpi" and (value if eq else "".join(argv[i + 1 : i + 2])) == MPI_HOST:
            # `--mpi host` is mesobox's bind model (mesobox.launch.hostmpi); any other
            # --mpi value (pmix, pmi2, none) is srun's plugin choice and goes to Slurm.
            run_args += ["--mpi", MPI_HOST]
            i += 1 if eq else 2
        elif opt is None:
            width = slurm_option_width(word)
            if i + width > len(argv):
                raise UsageError(f"option {word} needs a value")
            slurm_args += argv[i : i + width]
            i += width
        elif name in own:
            found[opt.field], i = (value, i + 1) if eq else _take_value(argv, i, name)
        elif opt.takes_value and not eq:
            value, i = _take_value(argv, i, name)
            run_args += [name, value]
        else:
            run_args.append(word)
            i += 1
    command = tuple(argv[i:])
    if need_command and not command and "wrap" not in found:
        raise UsageError("no command given", hint="mesobox srun --image IMAGE [options] -- CMD [ARGS...]")
    return SplitArgs(found.get("image"), tuple(run_args), tuple(slurm_args), command, found.get("wrap"),
                     found.get("checkpoint_dir"), found.get("checkpoint_signal"), found.get("checkpoint_warning"))


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise LaunchError(f"{tool} not found", hint="run this on a Slurm submit host (apt-get install slurm-client)")
    return path


def main_srun(argv: list[str], config: Config) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(help_text("srun"))
        return 0
    from mesobox.slurm.launch import image_for, srun_argv

    split = split_args(argv)
    image = image_for(config, split)
    args = srun_argv(image, split)
    args[0] = _need("srun")
    if config.debug:
        sys.stderr.write(f"mesobox: exec {args}\n")
    sys.stdout.flush()
    os.execv(args[0], args)  # noqa: S606 - argv from our own parser, no shell
    return 125  # not reached: execv replaces the process or raises OSError


def main_sbatch(argv: list[str], config: Config) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(help_text("sbatch"))
        return 0
    from mesobox.slurm.launch import Checkpoint, batch_script, image_for, wrap_script

    split = split_args(argv, verb="sbatch")
    checkpoint = None
    if split.checkpoint_dir is not None:
        checkpoint = Checkpoint(split.checkpoint_dir, split.checkpoint_signal, split.checkpoint_warning)
    elif split.checkpoint_signal is not None or split.checkpoint_warning is not None:
        raise UsageError("--checkpoint-signal and --checkpoint-warning need --checkpoint-dir")
    image = image_for(config, split)
    script_args: list[str] = []
    if split.wrap is not None:
        if split.command:
            raise UsageError("give either a script or --wrap, not both")
        script = wrap_script(image, split.run_args, split.wrap, checkpoint)
    else:
        script_path, *script_args = split.command
        try:
            body = Path(script_path).read_text()
        except OSError as err:
            raise UsageError(f"cannot read batch script {script_path}: {err.strerror}") from None
        script = batch_script(image, split.run_args, body, checkpoint)
    if config.debug:
        sys.stderr.write(script)
    # sbatch reads the script from stdin when no file is named (sbatch(1)); arguments
    # for the script need a file name in front of them, hence /dev/stdin.
    slurm_args = [*(checkpoint.sbatch_args() if checkpoint else []), *split.slurm_args]
    cmd = [_need("sbatch"), *slurm_args, *(["/dev/stdin", *script_args] if script_args else [])]
    return subprocess.run(cmd, input=script.encode(), check=False).returncode


def main_bundle(argv: list[str], config: Config) -> int:
    parsed = parse("bundle", argv)
    if parsed is None:
        return 0
    values, (image, directory) = parsed
    from mesobox.oci.bundle import make_bundle
    from mesobox.slurm.launch import image_path

    bundle = make_bundle(config, image_path(config, image), Path(directory), copy=bool(values.get("copy")))
    sys.stdout.write(f"{bundle}\n")
    return 0


def main_slurm(argv: list[str], config: Config) -> int:
    chosen = subverb("slurm", argv, noun="action")
    if chosen is None:
        return 0 if argv else 2
    action, rest = chosen
    if action == "task":  # its arguments are `mesobox exec`'s, handed on as they are
        if rest[:1] in (["-h"], ["--help"]):
            sys.stdout.write(help_text("slurm task"))
            return 0
        from mesobox.slurm.launch import task_setup

        exec_args = task_setup(rest, os.environ)
        from mesobox.cli.run import main_exec

        status: int = main_exec(exec_args, config)
        return status
    parsed = parse(f"slurm {action}", rest)
    if parsed is None:
        return 0
    values, _ = parsed
    if action == "oci-conf":
        from mesobox.slurm.ociconf import oci_conf

        sys.stdout.write(oci_conf(values.get("runtime")))
        return 0
    from mesobox.slurm import hooks

    return hooks.prolog(config) if action == "prolog" else hooks.epilog(config)
