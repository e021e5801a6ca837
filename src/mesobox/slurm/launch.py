"""Submit side and node side of ``mesobox srun`` / ``mesobox sbatch``.

Submit side: resolve the image once (a path, or the store, pulling on a miss) into a
file or directory every node can read, then hand over to Slurm: ``srun [slurm
options] PYTHON -m mesobox slurm task [run options] IMAGE CMD...``.  Slurm starts
every task itself, so each container is a task of the step: it lives in the job's
cgroup, gets the job's environment (SLURM_*, PMIX_*, CUDA_VISIBLE_DEVICES…) and
Slurm's signals (``--signal``, ``scancel``), and counts in ``sacct``.

Node side (``mesobox slurm task``): adds what an MPI rank in a container needs from
the host and then runs ``mesobox exec`` in the same process (no second interpreter):
binds for the PMIx server directory Slurm names in the environment (its socket
rendezvous and shared-memory data store live there, pmix(7) PMIX_SERVER_TMPDIR), the
host's /dev/shm (intra-node MPI segments must be visible to every rank of the node).
The ranks of the job on a node then share one user namespace (launch/sharedns.py), so
MPI's single copy (CMA, process_vm_readv) works between them.  With ``--mpi host`` it
also binds the node's own MPI (``mesobox.launch.hostmpi``).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import MutableMapping
from pathlib import Path

from mesobox.config import Config
from mesobox.errors import ImageNotFound, UsageError
from mesobox.slurm.options import SplitArgs

# Environment a rank needs from the host, named by path: Slurm's PMIx plugin sets them.
PMIX_DIR_VARS = ("PMIX_SERVER_TMPDIR",)
IMAGE_ENV = "MESOBOX_SLURM_IMAGE"  # set in generated batch scripts for `mesobox srun`
CHECKPOINT_ENV = "MESOBOX_CHECKPOINT_DIR"  # set by `sbatch --checkpoint-dir`; the tasks bind it
REQUEUE_MARK = ".mesobox-requeue"  # in the checkpoint directory: the job was asked to checkpoint


def mesobox_argv() -> list[str]:
    """The interpreter and module of *this* mesobox, so nodes run the same code."""
    return [sys.executable, "-m", "mesobox"]


def image_path(config: Config, text: str) -> Path:
    """A path to hand to every task: an existing path as is, else the store's copy.

    A stored image is pulled at most once here, on the submit side; squashfs is
    preferred because one file is cheaper on a shared filesystem than a tree."""
    path = Path(text)
    if path.exists():
        return path.resolve()
    from mesobox.image.store import Store

    record = Store(config).lookup(text)
    if record is None:
        from mesobox.image.pull import pull

        record = pull(config, text, fmt=config.default_format, quiet=True)
    found = record.squashfs or record.rootfs
    if found is None:
        raise ImageNotFound(f"image {text!r} has neither a squashfs nor a directory form",
                            hint=f"`mesobox pull {text}` again")
    return found


def image_for(config: Config, split: SplitArgs) -> Path:
    text = split.image or os.environ.get(IMAGE_ENV)
    if not text:
        raise UsageError("no image given", hint="pass --image REF (a reference, a squashfs file or a directory)")
    return image_path(config, text)


def task_argv(image: Path, run_args: tuple[str, ...], command: tuple[str, ...]) -> list[str]:
    """What srun starts on each node: one container per task."""
    return [*mesobox_argv(), "slurm", "task", *run_args, "--", str(image), *command]


def srun_argv(image: Path, split: SplitArgs) -> list[str]:
    return ["srun", *split.slurm_args, *task_argv(image, split.run_args, split.command)]


class Checkpoint:
    """``sbatch --checkpoint-dir``: a preemption-aware job (Slurm's own mechanisms only).

    Slurm signals the batch shell ``--checkpoint-warning`` seconds before the time limit
    (``--signal=B:USR1@T``), and with SIGTERM at a preemption.  The shell then sends the
    steps ``--checkpoint-signal`` (``scancel --signal``: every task, the containers'
    workloads themselves), marks the directory, and lets the steps finish: the
    application saves its state in the directory, bound into every task as
    ``$MESOBOX_CHECKPOINT_DIR``, where each task's writable layer also lives
    (``--overlay DIR/layers/task-N``).  When the script ends, a marked job requeues
    itself (``--requeue``, ``scontrol requeue``) and starts again from both; Slurm
    counts the restarts in ``SLURM_RESTART_COUNT``."""

    def __init__(self, directory: str, signal_name: str | None, warning: str | None) -> None:
        sig = (signal_name or "USR1").upper().removeprefix("SIG")
        if not sig.isalnum():
            raise UsageError(f"bad --checkpoint-signal {signal_name!r}", hint="a signal name such as USR1 or TERM")
        import signal as _signal

        if not hasattr(_signal, f"SIG{sig}") and not sig.isdigit():
            raise UsageError(f"unknown --checkpoint-signal {signal_name!r}", hint="a signal name such as USR1 or TERM")
        seconds = warning or "120"
        if not seconds.isdigit() or not 0 < int(seconds) <= 65535:
            raise UsageError(f"bad --checkpoint-warning {warning!r}", hint="whole seconds before the time limit")
        path = Path(directory).resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot make the checkpoint directory {directory}: {err.strerror}") from None
        self.directory, self.signal, self.warning = path, sig, int(seconds)

    def sbatch_args(self) -> list[str]:
        return ["--requeue", f"--signal=B:USR1@{self.warning}"]

    def preamble(self) -> list[str]:
        d = shlex.quote(str(self.directory))
        mark = shlex.quote(f"{self.directory}/{REQUEUE_MARK}")
        return [
            f"export {CHECKPOINT_ENV}={d}",
            # A trap runs only once the shell's foreground command ends: steps run in the
            # background and the shell waits (wait(1) returns at a trapped signal).
            f"__mesobox_checkpoint() {{ __mesobox_trapped=1; : > {mark}; "
            f"scancel --signal={self.signal} \"$SLURM_JOB_ID\"; }}",
            "trap __mesobox_checkpoint USR1 TERM",
            f"__mesobox_end() {{ if [ -e {mark} ]; then rm -f {mark}; scontrol requeue \"$SLURM_JOB_ID\"; fi; }}",
            "trap __mesobox_end EXIT",
            "__mesobox_wait() { while :; do __mesobox_trapped=; wait \"$1\"; __mesobox_rc=$?; "
            "[ -n \"$__mesobox_trapped\" ] || return \"$__mesobox_rc\"; done; }",
        ]


def batch_script(image: Path, run_args: tuple[str, ...], body: str, checkpoint: Checkpoint | None = None) -> str:
    """Turn a user's batch script into one whose ``srun`` lines start containers.

    ``#SBATCH`` lines stay where they are (sbatch reads them only before the first
    command, sbatch(1)); a preamble after them defines ``srun`` as a shell function
    calling ``mesobox srun``, so every step of the script runs in the image while
    the rest of the script runs on the batch host as usual."""
    lines = body.splitlines()
    shebang = lines.pop(0) if lines and lines[0].startswith("#!") else "#!/bin/bash"
    head: list[str] = []
    while lines and (lines[0].startswith("#SBATCH") or not lines[0].strip()):
        head.append(lines.pop(0))
    srun = shlex.join([*mesobox_argv(), "srun", *run_args])
    preamble = [
        "# --- added by mesobox sbatch: srun steps run in the container image ---",
        f"export {IMAGE_ENV}={shlex.quote(str(image))}",
    ]
    if checkpoint is None:
        preamble.append(f"srun() {{ {srun} \"$@\"; }}")
    else:
        preamble += checkpoint.preamble()
        preamble.append(f"srun() {{ {srun} \"$@\" & __mesobox_wait $!; }}")
    preamble.append("# --- end of mesobox preamble ---")
    return "\n".join([shebang, *head, *preamble, *lines]) + "\n"


def wrap_script(image: Path, run_args: tuple[str, ...], command: str, checkpoint: Checkpoint | None = None) -> str:
    """``sbatch --wrap CMD``: one step running CMD (through /bin/sh) in the image."""
    if checkpoint is not None:  # the batch shell stays, to catch the warning
        # The steps get the signal: a simple command runs as is, so that no shell between
        # it and the signal dies of it first (and Slurm then ends the step).
        words = _simple_command(command)
        step = shlex.join(words) if words else f"/bin/sh -c {shlex.quote(command)}"
        body = f"#!/bin/bash\n# generated by mesobox sbatch --wrap\nsrun {step}\n"
        return batch_script(image, run_args, body, checkpoint)
    step = shlex.join(["srun", *task_argv(image, run_args, ("/bin/sh", "-c", command))])
    return f"#!/bin/sh\n# generated by mesobox sbatch --wrap\nexec {step}\n"


def _simple_command(command: str) -> list[str] | None:
    """The words of a command line that needs no shell (no operator, expansion or
    redirection), else None."""
    if any(ch in command for ch in ";&|<>$`()*?[]{}~\n#=\\"):
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    return words or None


def task_setup(argv: list[str], env: MutableMapping[str, str]) -> list[str]:
    """Node side: ``[run options] -- IMAGE CMD...`` plus the binds and environment a
    containerised rank needs from its host, as ``mesobox exec`` arguments."""
    if "--" not in argv:
        raise UsageError("mesobox slurm task: expected [run options] -- IMAGE CMD...")
    cut = argv.index("--")
    run_args, rest = argv[:cut], argv[cut + 1 :]
    if len(rest) < 2:
        raise UsageError("mesobox slurm task: expected an image and a command")
    # The host's /dev/shm, shared by all tasks of the node: MPI (Open MPI's vader, MPICH's
    # nemesis), NCCL and UCX put their intra-node segments there; with one private
    # /dev/shm per container, ranks cannot attach each other's segments (measured:
    # Open MPI warns "open(2) failed" and falls back to TCP, ~2x slower).  `mesobox
    # exec` shares it by default now (specbuild, with the MPI defaults); the explicit
    # bind stays so that a task run with --contain shares it too (specbuild then mounts
    # no second one).
    extra: list[str] = ["--bind", "/dev/shm"] if os.path.isdir("/dev/shm") else []
    for var in PMIX_DIR_VARS:
        value = env.get(var)
        if value and os.path.isdir(value) and os.path.realpath(value) != "/":
            extra += ["--bind", os.path.realpath(value)]
    extra += _checkpoint_binds(run_args, env)
    run_args, mpi_host = _take_mpi_host(run_args)
    if mpi_host:
        from mesobox.launch.hostmpi import host_mpi_args

        extra += host_mpi_args(Path(rest[0]), env)
    return [*extra, *run_args, *rest]


def _checkpoint_binds(run_args: list[str], env: MutableMapping[str, str]) -> list[str]:
    """In a ``--checkpoint-dir`` job: the directory, and this task's writable layer in
    it (unless the options choose a writable root themselves)."""
    directory = env.get(CHECKPOINT_ENV)
    if not directory or not os.path.isabs(directory) or not os.path.isdir(directory):
        return []
    task = env.get("SLURM_PROCID", "0")
    return checkpoint_options(directory, run_args, os.path.join("layers", f"task-{task if task.isdigit() else 0}"))


def checkpoint_options(directory: str, run_args: list[str], layer: str) -> list[str]:
    """Run options for a checkpointing container: the directory bound (and named in
    $MESOBOX_CHECKPOINT_DIR inside), and its writable layer kept there, at ``layer``
    below it, unless the options choose a writable root themselves."""
    extra = ["--bind", directory, "--env", f"{CHECKPOINT_ENV}={directory}"]
    if not any(a.split("=", 1)[0] in ("--overlay", "--writable-tmpfs") for a in run_args):
        path = os.path.join(directory, layer)
        os.makedirs(path, exist_ok=True)
        extra += ["--overlay", path]
    return extra


def _take_mpi_host(run_args: list[str]) -> tuple[list[str], bool]:
    """Remove ``--mpi host`` (split_args' normal form) from run options."""
    out: list[str] = []
    found = False
    i = 0
    while i < len(run_args):
        if run_args[i : i + 2] == ["--mpi", "host"]:
            found, i = True, i + 2
        else:
            out.append(run_args[i])
            i += 1
    return out, found
