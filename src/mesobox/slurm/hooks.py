"""Site prolog/epilog: pre-stage a job's image on a node, clean stale mounts after.

Slurm runs Prolog/Epilog (slurm.conf(5)) as root on each node of a job with
SLURM_JOB_ID, SLURM_JOB_USER and SLURM_JOB_UID set.  The image to pre-stage is named
by MESOBOX_IMAGE in the job's environment (passed to the prolog through
PrologFlags=... only for SPANK; most sites use the job comment instead), so this hook
reads ``SLURM_JOB_COMMENT`` (or ``scontrol show job``'s Comment) for
``mesobox:IMAGE``.  Pre-staging means reading the squashfs once so its pages are in
the node's cache before the job's tasks all mount it at the same moment.

The epilog unmounts the FUSE mounts mesobox left under the job user's runtime dir
(``/tmp/mesobox-UID/...``): squashfuse helpers outlive the container when a job is
killed hard (shared/NOTES.md), and shared squashfs mounts linger after their last
user (``squashfs_linger``) for a next run that will not come once the job is over.
Hooks never fail the job: errors are logged to stderr and the exit status stays 0,
because a failing prolog drains the node.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mesobox.config import Config

_COMMENT_RE = re.compile(r"mesobox:(\S+)")


def _log(text: str) -> None:
    sys.stderr.write(f"mesobox-{text}\n")


def job_image(env: dict[str, str]) -> str | None:
    """The image a job asked to pre-stage, from its environment or comment."""
    if env.get("MESOBOX_IMAGE"):
        return env["MESOBOX_IMAGE"]
    comment = env.get("SLURM_JOB_COMMENT", "")
    if not comment and env.get("SLURM_JOB_ID"):
        out = subprocess.run(["scontrol", "show", "job", env["SLURM_JOB_ID"]],
                             capture_output=True, text=True, check=False).stdout
        found = re.search(r"Comment=(\S+)", out)
        comment = found.group(1) if found else ""
    match = _COMMENT_RE.search(comment)
    return match.group(1) if match else None


def prestage(path: Path) -> int:
    """Read a squashfs (or nothing, for a directory) once; returns bytes read."""
    if not path.is_file():
        return 0
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
    return total


def prolog(config: Config) -> int:
    env = dict(os.environ)
    text = job_image(env)
    if text is None:
        return 0
    path = Path(text)
    if not path.exists():
        _log(f"prolog: job {env.get('SLURM_JOB_ID', '?')}: {text} is not a path on this node; not staged")
        return 0
    size = prestage(path)
    _log(f"prolog: job {env.get('SLURM_JOB_ID', '?')}: staged {path} ({size} bytes)")
    return 0


def stale_mounts(runtime_root: Path, mountinfo: str) -> list[Path]:
    """FUSE mount points below ``runtime_root`` (proc(5) /proc/self/mountinfo)."""
    found: list[Path] = []
    prefix = str(runtime_root).rstrip("/") + "/"
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 10 or " - " not in line:
            continue
        point = fields[4].replace("\\040", " ")
        fstype = line.split(" - ", 1)[1].split()[0]
        if point.startswith(prefix) and fstype.startswith("fuse"):
            found.append(Path(point))
    # Deepest first, so nested mounts come off before their parents.
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def epilog(config: Config) -> int:
    uid = os.environ.get("SLURM_JOB_UID")
    root = Path(f"/tmp/mesobox-{uid}") if uid else Path(config.runtime_dir)
    # first the shared squashfs mounts no live launcher uses (refcounts say so): those
    # whose launchers all died and those lingering for a next run (linger 0: the job is
    # over, even if their watcher still lives; it may also have died with the step's cgroup) …
    from mesobox.runtime.squashmount import reap_stale

    for reaped in reap_stale(str(root / "mnt"), job_over=True):
        _log(f"epilog: job {os.environ.get('SLURM_JOB_ID', '?')}: {reaped} reaped (no container uses it)")
    # … then anything of the job's still mounted under its runtime dir
    mountinfo = Path("/proc/self/mountinfo").read_text()
    for point in stale_mounts(root, mountinfo):
        result = subprocess.run(["fusermount", "-u", "-z", str(point)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            result = subprocess.run(["umount", "-l", str(point)], capture_output=True, text=True, check=False)
        status = "unmounted" if result.returncode == 0 else f"could not unmount ({result.stderr.strip()})"
        _log(f"epilog: job {os.environ.get('SLURM_JOB_ID', '?')}: {point} {status}")
    return 0
