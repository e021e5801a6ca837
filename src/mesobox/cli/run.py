"""CLI wiring for ``mesobox run``, ``exec`` and ``shell`` (the hot path).

The options are the option table's (cli/table.py) and so is the parser: a lean,
hand-rolled one instead of argparse, whose imports (gettext, re) would cost more than
half of the ≈20 ms start-up budget.  Options stop at IMAGE: everything after it is
the command.  The help text is generated from the same table, only when asked.
"""

from __future__ import annotations

import sys

from mesobox.cli import table
from mesobox.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mesobox.config import Config

def parse(verb: str, argv: list[str]) -> dict[str, Any]:
    """argv → RunOptions keyword arguments (plus "help", "debug", "mpi")."""
    values, rest = table.parse(table.LAUNCH[verb], argv, check=False)
    if values.get("help"):
        return values
    if not rest:
        raise UsageError(f"{verb}: no image given", hint=f"mesobox {verb} [OPTIONS] IMAGE ...")
    values["mode"] = verb
    values["image"], values["args"] = rest[0], tuple(rest[1:])
    return values


def _main(verb: str, argv: list[str], config: Config) -> int:
    values = parse(verb, argv)
    if values.get("help"):
        from mesobox.cli.usage import help_text  # generated from the table, only when asked

        sys.stdout.write(help_text(verb))
        return 0
    if values.pop("debug", False):
        config = config.replace(debug=True)
    mpi = values.pop("mpi", None)
    if values.get("writable_tmpfs") is not None:
        from mesobox.sizes import parse_size

        text = values["writable_tmpfs"]
        values["writable_tmpfs"] = parse_size(text, "--writable-tmpfs") if text else 0
    if verb != "run" and values.get("entrypoint") is not None:
        raise UsageError("--entrypoint is for `mesobox run`")
    from mesobox.launch.launcher import launch
    from mesobox.launch.specbuild import RunOptions, find_image, implied_options, make_spec

    if values.get("detach") or values.get("platform"):
        implied_options(RunOptions(**values))  # refused before a docker:// image is pulled
    image = find_image(values["image"], config)
    if mpi is not None:
        from mesobox.launch.hostmpi import with_host_mpi

        # Not recordable: it runs ompi_info and ldd, and probe.py saves no program
        # of a launch that runs a program while it compiles.
        values = with_host_mpi(values, mpi, image.path)
    opts = RunOptions(**values)
    spec = make_spec(opts, config, image)
    if opts.host_root:
        from mesobox.launch.identity import HOST_ROOT_WARNING

        sys.stderr.write(HOST_ROOT_WARNING)
    if config.debug:
        sys.stderr.write(f"mesobox: spec: {spec!r}\n")
    return launch(spec, config)


def main_run(argv: list[str], config: Config) -> int:
    return _main("run", argv, config)


def main_exec(argv: list[str], config: Config) -> int:
    return _main("exec", argv, config)


def main_shell(argv: list[str], config: Config) -> int:
    return _main("shell", argv, config)
