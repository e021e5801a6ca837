"""Split ``mesobox srun``/``sbatch`` command lines: run options, Slurm options, command.

Mesobox's own options (those ``mesobox exec`` takes) are recognised by their long
names only: several short letters mean something else to srun (``-e`` is srun's
``--error``, ``-B`` its ``--extra-node-info``).  Everything else before the command is
handed to Slurm untouched.  Without ``--``, the command starts at the first word
that is neither an option nor the value of an option: srun(1) says which options
take a value, listed below.  Pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesobox.errors import UsageError

# mesobox exec options (mesobox.cli.run.OPTIONS, long names): name -> takes a value.
RUN_OPTIONS: dict[str, bool] = {
    "--bind": True,
    "--env": True,
    "--env-file": True,
    "--workdir": True,
    "--pwd": True,
    "--overlay": True,
    "--hostname": True,
    "--net": True,
    "--network": True,
    "--memory": True,
    "--cpus": True,
    "--pids-limit": True,
    "--security-opt": True,
    "--cap-add": True,
    "--cap-drop": True,
    "--contain": False,
    "--cleanenv": False,
    "--fakeroot": False,
    "--writable-tmpfs": False,  # optional value: only as --writable-tmpfs=SIZE
    "--pid": False,
    "--ipc": False,
    "--uts": False,
}

MPI_HOST = "host"  # `--mpi host`: bind the host's MPI into the containers

# srun(1)/sbatch(1) short options that take a value in the next word.
SLURM_SHORT_WITH_VALUE = frozenset("ABCDGJLMNSTWabcdeimnopqrtwx")
# srun(1)/sbatch(1) long options that take no value (all others do, as `--opt VAL` or
# `--opt=VAL`; options with an optional value must use the `=` form, as in srun(1)).
SLURM_LONG_FLAGS = frozenset(
    {
        "--contiguous", "--disable-status", "--exact", "--exclusive", "--help", "--hold", "--immediate",
        "--label", "--kill-on-bad-exit", "--multi-prog", "--no-allocate", "--no-kill", "--no-requeue",
        "--overcommit", "--overlap", "--oversubscribe", "--parsable", "--preserve-env", "--pty", "--quiet",
        "--reboot", "--requeue", "--spread-job", "--test-only", "--unbuffered", "--usage", "--use-min-nodes",
        "--verbose", "--version", "--whole", "--wait", "--ignore-pbs", "--get-user-env", "--x11",
    }
)


@dataclass(frozen=True)
class SplitArgs:
    """One ``mesobox srun`` command line, sorted by who consumes each word."""

    image: str | None
    run_args: tuple[str, ...]
    slurm_args: tuple[str, ...]
    command: tuple[str, ...]


def _take_value(argv: list[str], i: int, name: str) -> tuple[str, int]:
    if i + 1 >= len(argv):
        raise UsageError(f"option {name} needs a value")
    return argv[i + 1], i + 2


def _slurm_option_width(word: str) -> int:
    """How many words a Slurm option occupies (1 or 2)."""
    if word.startswith("--"):
        return 1 if "=" in word or word in SLURM_LONG_FLAGS else 2
    letters = word[1:]
    # Bundled short options (-lN2) or an attached value (-n4): only the first letter
    # can take the next word, and only when nothing is attached to it.
    if len(letters) == 1 and letters in SLURM_SHORT_WITH_VALUE:
        return 2
    return 1


def split_args(argv: list[str], need_command: bool = True) -> SplitArgs:
    """Sort ``[--image REF] [run opts] [slurm opts] [--] CMD...`` into its parts."""
    image: str | None = None
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
        if name == "--image":
            image, i = (value, i + 1) if eq else _take_value(argv, i, name)
        elif name == "--mpi" and (value if eq else "".join(argv[i + 1 : i + 2])) == MPI_HOST:
            # `--mpi host` is mesobox's bind model (mesobox.launch.hostmpi); any other
            # --mpi value (pmix, pmi2, none) is srun's plugin choice and goes to Slurm.
            run_args += ["--mpi", MPI_HOST]
            i += 1 if eq else 2
        elif name in RUN_OPTIONS:
            if RUN_OPTIONS[name] and not eq:
                value, i = _take_value(argv, i, name)
                run_args += [name, value]
            else:
                run_args.append(word)
                i += 1
        else:
            width = _slurm_option_width(word)
            if i + width > len(argv):
                raise UsageError(f"option {word} needs a value")
            slurm_args += argv[i : i + width]
            i += width
    command = tuple(argv[i:])
    if need_command and not command:
        raise UsageError("no command given", hint="mesobox srun --image IMAGE [options] -- CMD [ARGS...]")
    return SplitArgs(image, tuple(run_args), tuple(slurm_args), command)
