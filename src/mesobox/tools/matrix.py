"""``mesobox matrix``: one test command across many images, as a table of results.

Each image runs ``python -m mesobox exec [EXEC-OPTIONS] IMAGE CMD...`` in a child
process (this interpreter), in a session of its own so that a timeout kills the whole
container, N at a time; or each is one task of a Slurm job array (``sbatch --array
--wait``), whose tasks run this module (``python -m mesobox.tools.matrix DIR INDEX``)
and leave one result file each in a directory the user owns.  Both ways the result of
one image is made by the same ``run_one``: status (pass: exit 0; fail; timeout;
error: it never ran), exit code, wall time, the first lines of its output (stdout and
stderr as they interleaved, capped) and where it ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from mesobox.errors import ImageNotFound, LaunchError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from mesobox.config import Config

MAX_LINES = 20  # first lines of output kept per image
MAX_LINE = 300  # characters kept of one line
MAX_BYTES = 16384  # bytes read before the rest is only drained
PLAN = "plan.json"


def mesobox_exec(run_args: Sequence[str]) -> list[str]:
    """``mesobox exec`` through this interpreter, as every container here is started."""
    return [sys.executable, "-m", "mesobox", "exec", *run_args]


def is_path(text: str) -> bool:
    from mesobox.launch.specbuild import is_path_name

    return is_path_name(text)


def check_images(config: Config, images: Sequence[str]) -> None:
    """Every image must exist before anything runs: a typo fails in one line, not
    after the other images (or a job array) ran.  A missing docker:// reference is
    fine: ``mesobox exec`` pulls it, as usual."""
    from mesobox.image.store import Store

    if not images:
        raise UsageError("no image given")
    store = Store(config)
    missing = [text for text in images
               if not (os.path.exists(text) if is_path(text)
                       else text.startswith("docker://") or store.lookup(text) is not None)]
    if missing:
        raise ImageNotFound(f"no such image: {', '.join(missing)}",
                            hint="a directory, a squashfs file, a stored reference or docker://REF")


def image_identity(config: Config, text: str) -> dict[str, str | None]:
    """What names an image's content: a stored image's manifest digest, a squashfs
    file's sha256 (the same for every store that flattened the same manifest,
    image/squashfs.py); a directory has none."""
    if is_path(text):
        path = Path(text)
        if path.is_file():
            from mesobox.image.store import file_check

            return {"kind": "squashfs file", "digest": file_check(path)[1]}
        return {"kind": "directory", "digest": None}
    from mesobox.image.store import Store

    record = Store(config).lookup(text)
    return {"kind": "stored", "digest": record.digest if record is not None else None}


def _first_lines(data: bytes, truncated: bool) -> tuple[list[str], bool]:
    text = data.decode("utf-8", "replace")
    lines = text.splitlines()
    cut = len(lines) > MAX_LINES or truncated or any(len(line) > MAX_LINE for line in lines)
    return [line[:MAX_LINE] for line in lines[:MAX_LINES]], cut


class _Reader(threading.Thread):
    """Keeps the first MAX_BYTES of a pipe and drains the rest (a chatty test must
    not block on a full pipe)."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.kept = bytearray()
        self.more = False

    def run(self) -> None:
        while chunk := self.pipe.read1(65536):
            room = MAX_BYTES - len(self.kept)
            self.kept += chunk[:max(room, 0)]
            self.more = self.more or len(chunk) > room


class Running:
    """The process groups started and not yet reaped: Ctrl-C kills them all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pids: set[int] = set()

    def kill_all(self) -> None:
        with self.lock:
            for pid in self.pids:
                _kill_group(pid)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def run_one(argv: Sequence[str], timeout: float | None, running: Running | None = None) -> dict[str, Any]:
    """Run one container to its end (or its timeout); the result record without the image."""
    start = time.monotonic()
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as err:
        return {"status": "error", "exit_code": None, "signal": None, "seconds": 0.0,
                "output": [f"cannot start {argv[0]}: {err.strerror}"], "output_truncated": False}
    if running is not None:
        with running.lock:
            running.pids.add(proc.pid)
    reader = _Reader(proc.stdout)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid)
        proc.wait()
    finally:
        seconds = time.monotonic() - start
        # Whatever the container left behind in its group goes with it.
        _kill_group(proc.pid)
        if running is not None:
            with running.lock:
                running.pids.discard(proc.pid)
    reader.join(5)
    if proc.stdout is not None:
        proc.stdout.close()
    lines, cut = _first_lines(bytes(reader.kept), reader.more)
    code = proc.returncode
    sig = signal.Signals(-code).name if code < 0 else None
    status = "timeout" if timed_out else "pass" if code == 0 else "fail"
    return {"status": status, "exit_code": 128 - code if code < 0 else code, "signal": sig,
            "seconds": round(seconds, 6), "output": lines, "output_truncated": cut}


def _where() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def run_local(config: Config, images: Sequence[str], command: Sequence[str], run_args: Sequence[str],
              jobs: int, timeout: float | None, progress: Callable[[dict[str, Any]], None] | None = None
              ) -> list[dict[str, Any]]:
    """Every image, ``jobs`` at a time; results in the order the images were given."""
    from concurrent.futures import ThreadPoolExecutor

    running = Running()

    def one(index: int) -> dict[str, Any]:
        result = {"image": images[index], "index": index, "host": _where(),
                  **run_one([*mesobox_exec(run_args), images[index], *command], timeout, running)}
        result.update(image_identity(config, images[index]))  # after the run: a docker:// is pulled by now
        if progress is not None:
            progress(result)
        return result

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = [pool.submit(one, i) for i in range(len(images))]
        return [f.result() for f in futures]
    except BaseException:
        running.kill_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


# --- Slurm: one job array ---------------------------------------------------------------


def run_slurm(config: Config, images: Sequence[str], command: Sequence[str], run_args: Sequence[str],
              jobs: int | None, timeout: float | None, sbatch_args: Sequence[str],
              notify: Callable[[str], None]) -> tuple[list[dict[str, Any]], str]:
    """One task per image in one ``sbatch --array --wait`` job; (results, job id).

    The images are resolved here, once (stored ones to their file, pulled on a miss),
    like ``mesobox srun`` does; the results come back through files in a private
    directory under the working directory (which Slurm's nodes share, where /tmp is
    per node), removed once gathered."""
    import shutil
    import tempfile

    from mesobox.slurm.launch import image_path

    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError("sbatch not found", hint="run `matrix --slurm` on a Slurm submit host")
    paths = [str(image_path(config, text)) for text in images]
    try:
        work = Path(tempfile.mkdtemp(prefix=".mesobox-matrix-", dir=os.getcwd()))
    except OSError as err:
        raise UsageError(f"cannot make the results directory in {os.getcwd()}: {err.strerror}",
                         hint="run it from a directory you can write that the nodes share") from None
    try:
        plan = {"argv": mesobox_exec(run_args), "images": paths, "command": list(command), "timeout": timeout}
        (work / PLAN).write_text(json.dumps(plan))
        script = work / "job.sh"
        import shlex

        script.write_text("#!/bin/sh\n# mesobox matrix: task N runs image N and writes result-N.json\n"
                          f"exec {shlex.join([sys.executable, '-m', 'mesobox.tools.matrix', str(work)])}"
                          ' "$SLURM_ARRAY_TASK_ID"\n')
        array = f"0-{len(images) - 1}" + (f"%{jobs}" if jobs else "")
        argv = [sbatch, "--parsable", "--wait", f"--array={array}", "--job-name=mesobox-matrix",
                f"--output={work}/task-%a.log", *sbatch_args, str(script)]
        job = _submit(argv, notify)
        results = [_gather(work, i) for i in range(len(images))]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for index, result in enumerate(results):
        result.update({"image": images[index], "index": index, **image_identity(config, images[index])})
    return results, job


def _submit(argv: list[str], notify: Callable[[str], None]) -> str:
    """sbatch --wait: the job id as soon as it is known; scancel on Ctrl-C."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    job = proc.stdout.readline().strip().split(";")[0]
    if job:
        notify(f"submitted job array {job}")
    try:
        _, err = proc.communicate()
    except KeyboardInterrupt:
        if job:
            subprocess.run(["scancel", job], check=False)
        raise
    if not job:
        raise LaunchError(f"sbatch failed: {' '.join(err.split())[:300] or f'exit status {proc.returncode}'}")
    # A non-zero status with every result present is a failed test, not a failed job.
    return job


def _gather(work: Path, index: int) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((work / f"result-{index}.json").read_text())
        return data
    except (OSError, ValueError):
        log = work / f"task-{index}.log"
        text = log.read_text(errors="replace") if log.exists() else "(no task log)"
        lines, cut = _first_lines(text.encode(), False)
        return {"status": "error", "exit_code": None, "signal": None, "seconds": 0.0, "host": None,
                "output": ["the array task left no result", *lines], "output_truncated": cut}


def task_main(work: str, index_text: str) -> int:
    """The node side: run image INDEX of the plan in WORK, write result-INDEX.json."""
    plan = json.loads((Path(work) / PLAN).read_text())
    index = int(index_text)
    result = {"host": _where(), "job": os.environ.get("SLURM_ARRAY_JOB_ID"),
              **run_one([*plan["argv"], plan["images"][index], *plan["command"]], plan["timeout"])}
    from mesobox.files import write_atomic

    write_atomic(Path(work) / f"result-{index}.json", json.dumps(result).encode(), mode=0o600)
    return 0  # the test's own status is in the result: the job failing means the task did


if __name__ == "__main__":
    sys.exit(task_main(*sys.argv[1:3]))
