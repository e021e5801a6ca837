"""Slurm's command-line grammar, as far as ``mesobox srun``/``sbatch`` must know it to
split a command line, and the split's result (``SplitArgs``).  The split itself is
cli/slurm.py ``split_args``: it reads mesobox's option names from the option table.

Mesobox's own options are recognised by their long names only, as the option table
(cli/table.py) lists them: several short letters mean something else to srun (``-e``
is srun's ``--error``, ``-B`` its ``--extra-node-info``).  Everything else before the
command is handed to Slurm untouched.  Without ``--``, the command starts at the
first word that is neither an option nor the value of an option: srun(1) says which
options take a value, listed below.  Pure data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """One ``mesobox srun``/``sbatch`` command line, sorted by who consumes each word."""

    image: str | None
    run_args: tuple[str, ...]
    slurm_args: tuple[str, ...]
    command: tuple[str, ...]
    wrap: str | None = None  # sbatch --wrap: mesobox rewrites it
    checkpoint_dir: str | None = None  # sbatch --checkpoint-dir: preemption-aware job (slurm/launch.py)
    checkpoint_signal: str | None = None  # what the steps get at the warning (default USR1)
    checkpoint_warning: str | None = None  # seconds before the time limit (default 120)


def slurm_option_width(word: str) -> int:
    """How many words a Slurm option occupies (1 or 2)."""
    if word.startswith("--"):
        return 1 if "=" in word or word in SLURM_LONG_FLAGS else 2
    letters = word[1:]
    # Bundled short options (-lN2) or an attached value (-n4): only the first letter
    # can take the next word, and only when nothing is attached to it.
    if len(letters) == 1 and letters in SLURM_SHORT_WITH_VALUE:
        return 2
    return 1
