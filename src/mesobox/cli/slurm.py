"""CLI wiring for the Slurm verbs: srun, sbatch, bundle and ``slurm`` site helpers.

Only wiring: parsing lives in ``mesobox.slurm.options``, the work in
``mesobox.slurm.launch``/``bundle``/``hooks``.  ``srun`` replaces this process with
Slurm's ``srun`` (os.execvp) so that signals and the exit status are Slurm's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mesobox.config import Config
from mesobox.errors import LaunchError, UsageError

SRUN_USAGE = "usage: mesobox srun [--image REF] [run options] [srun options] [--] CMD [ARGS...]\n"
SBATCH_USAGE = "usage: mesobox sbatch [--image REF] [run options] [sbatch options] SCRIPT | --wrap CMD\n"
SLURM_USAGE = (
    "usage: mesobox slurm oci-conf [--runtime CMD]\n"
    "       mesobox slurm prolog|epilog       (site hooks; see docs/slurm.md)\n"
    "       mesobox slurm task [run options] -- IMAGE CMD...   (node side of mesobox srun)\n"
)


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise LaunchError(f"{tool} not found", hint="run this on a Slurm submit host (apt-get install slurm-client)")
    return path


def main_srun(argv: list[str], config: Config) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(SRUN_USAGE)
        return 0
    from mesobox.slurm.launch import image_for, srun_argv
    from mesobox.slurm.options import split_args

    split = split_args(argv)
    image = image_for(config, split)
    args = srun_argv(image, split)
    args[0] = _need("srun")
    if config.debug:
        sys.stderr.write(f"mesobox: exec {args}\n")
    sys.stdout.flush()
    os.execv(args[0], args)  # noqa: S606 - argv from our own parser, no shell
    return 125  # not reached: execv replaces the process or raises OSError


def _take_wrap(argv: list[str]) -> tuple[list[str], str | None]:
    """Pull ``--wrap CMD`` out: it is sbatch's option, but mesobox must rewrite it."""
    wrap: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            rest += argv[i:]
            break
        if word == "--wrap" and i + 1 < len(argv):
            wrap, i = argv[i + 1], i + 2
        elif word.startswith("--wrap="):
            wrap, i = word.split("=", 1)[1], i + 1
        else:
            rest.append(word)
            i += 1
    return rest, wrap


def main_sbatch(argv: list[str], config: Config) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(SBATCH_USAGE)
        return 0
    from mesobox.slurm.launch import batch_script, image_for, wrap_script
    from mesobox.slurm.options import split_args

    rest, wrap = _take_wrap(argv)
    split = split_args(rest, need_command=wrap is None)
    image = image_for(config, split)
    script_args: list[str] = []
    if wrap is not None:
        if split.command:
            raise UsageError("give either a script or --wrap, not both")
        script = wrap_script(image, split.run_args, wrap)
    else:
        script_path, *script_args = split.command
        try:
            body = Path(script_path).read_text()
        except OSError as err:
            raise UsageError(f"cannot read batch script {script_path}: {err.strerror}") from None
        script = batch_script(image, split.run_args, body)
    if config.debug:
        sys.stderr.write(script)
    # sbatch reads the script from stdin when no file is named (sbatch(1)); arguments
    # for the script need a file name in front of them, hence /dev/stdin.
    cmd = [_need("sbatch"), *split.slurm_args, *(["/dev/stdin", *script_args] if script_args else [])]
    return subprocess.run(cmd, input=script.encode(), check=False).returncode


def main_bundle(argv: list[str], config: Config) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="mesobox bundle", description="make an OCI bundle (config.json + rootfs)")
    parser.add_argument("image", help="image reference, squashfs file or rootfs directory")
    parser.add_argument("dir", type=Path, help="bundle directory to create")
    parser.add_argument("--copy", action="store_true", help="copy the rootfs instead of linking to it")
    args = parser.parse_args(argv)
    from mesobox.oci.bundle import make_bundle
    from mesobox.slurm.launch import image_path

    bundle = make_bundle(config, image_path(config, args.image), args.dir, copy=args.copy)
    sys.stdout.write(f"{bundle}\n")
    return 0


def main_slurm(argv: list[str], config: Config) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(SLURM_USAGE)
        return 0 if argv else 2
    action, rest = argv[0], argv[1:]
    if action == "task":
        from mesobox.slurm.launch import task_setup

        exec_args = task_setup(rest, os.environ)
        from mesobox.cli.run import main_exec

        status: int = main_exec(exec_args, config)
        return status
    if action == "oci-conf":
        from mesobox.slurm.ociconf import oci_conf

        runtime = rest[1] if rest[:1] == ["--runtime"] and len(rest) > 1 else None
        sys.stdout.write(oci_conf(runtime))
        return 0
    if action in ("prolog", "epilog"):
        from mesobox.slurm import hooks

        return hooks.prolog(config) if action == "prolog" else hooks.epilog(config)
    raise UsageError(f"unknown slurm action {action!r}", hint="mesobox slurm --help")
