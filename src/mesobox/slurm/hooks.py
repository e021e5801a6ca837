"""Site prolog/epilog: prepare a job user's runtime dir and pre-stage the job's image on
a node; clean stale mounts after.

Slurm runs Prolog/Epilog (slurm.conf(5)) as root on each node of a job with
SLURM_JOB_ID, SLURM_JOB_USER, SLURM_JOB_UID and SLURM_JOB_GID set.  The image to
pre-stage is named by the job's comment (``--comment mesobox:/path/image.sqfs``, read
from SLURM_JOB_COMMENT or ``scontrol show job``) or MESOBOX_IMAGE.  Pre-staging means
reading the squashfs once so its pages are in the node's cache before the job's tasks
all mount it at the same moment.

The epilog unmounts the FUSE mounts mesobox left under the job user's runtime dir
(``/tmp/mesobox-UID/...``): squashfuse helpers outlive the container when a job is
killed hard, and shared squashfs mounts linger after their last user
(``squashfs_linger``) for a next run that will not come once the job is over.

Root here never acts on a path the job user controls (docs/security.md):
- everything below the user's runtime dir, and the image file the job names, is
  touched only by a child that has dropped to the job user's ids
  (``as_job_user``): a planted symlink then reaches only what that user could reach
  anyway, and ``fusermount`` (setuid, checks the mount is the user's) unmounts only
  the user's own FUSE mounts;
- the one thing root does itself is in /tmp, through a directory fd: the prolog makes
  ``/tmp/mesobox-UID`` for the job user when it is missing, and moves aside one that
  another user made first (a squatted runtime dir is refused by mesobox: without this,
  a squatter could keep a user from running containers on the node).
Hooks never fail the job: errors are logged to stderr and the exit status stays 0,
because a failing prolog drains the node.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

from mesobox.config import Config
from mesobox.files import SQUASHFS_MAGIC

_COMMENT_RE = re.compile(r"mesobox:(\S+)")
STAGE_DEADLINE_S = 120.0  # a prolog that reads for longer delays the job more than it saves
_UMOUNT_NOFOLLOW = 0x8  # umount2(2): never unmount through a symlink at the path


def _log(text: str) -> None:
    sys.stderr.write(f"mesobox-{text}\n")
    sys.stderr.flush()


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


def job_ids(env: dict[str, str]) -> tuple[int, int] | None:
    """(uid, gid) of the job's user, or None when Slurm did not say."""
    uid = env.get("SLURM_JOB_UID", "")
    if not (uid.isascii() and uid.isdigit()):
        return None
    gid = env.get("SLURM_JOB_GID", "")
    if gid.isascii() and gid.isdigit():
        return int(uid), int(gid)
    import pwd

    try:
        return int(uid), pwd.getpwuid(int(uid)).pw_gid
    except KeyError:
        return None


def as_job_user(uid: int, gid: int, body: Callable[[], None]) -> None:
    """Run ``body`` in a child that holds only the job user's ids (its supplementary
    groups from NSS when it has any, no capabilities); wait for it."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _drop_to(uid, gid)
            body()
            code = 0
        except Exception as err:  # one line, whatever went wrong; the parent carries on
            _log(f"hook: {getattr(err, 'message', None) or err}")
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


def _drop_to(uid: int, gid: int) -> None:
    import pwd

    try:
        os.initgroups(pwd.getpwuid(uid).pw_name, gid)
    except (KeyError, OSError):
        os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError(f"could not drop to uid {uid} gid {gid}")


# --- prolog ------------------------------------------------------------------------------


def prolog(config: Config) -> int:
    env = dict(os.environ)
    job = env.get("SLURM_JOB_ID", "?")
    ids = job_ids(env)
    if ids is not None and ids[0] != 0:
        try:
            note = prepare_runtime_dir(*ids)
        except OSError as err:
            note = f"could not prepare /tmp/mesobox-{ids[0]}: {err.strerror or err}"
        if note:
            _log(f"prolog: job {job}: {note}")
    text = job_image(env)
    if text is None:
        return 0
    if ids is None:
        _log(f"prolog: job {job}: no SLURM_JOB_UID, so whose file {text} is cannot be told; not staged")
        return 0
    as_job_user(*ids, lambda: stage(text, config.max_image_bytes, job))
    return 0


def prepare_runtime_dir(uid: int, gid: int, tmp: str = "/tmp") -> str:
    """Make ``TMP/mesobox-UID`` the job user's private directory, as root, from a
    directory fd of ``tmp`` and without following any symlink; returns what was done
    ("" when it was already right).  /tmp is sticky, so only root and the entry's owner
    can move an entry: once made, the user's directory stays theirs."""
    name = f"mesobox-{uid}"
    top = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        note = ""
        try:
            st = os.stat(name, dir_fd=top, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and ((st.st_mode & 0o170000) != 0o040000 or st.st_uid != uid or st.st_mode & 0o022):
            aside = f".{name}.foreign.{os.urandom(4).hex()}"
            os.rename(name, aside, src_dir_fd=top, dst_dir_fd=top)  # rename(2) never follows the last link
            note = f"moved aside {tmp}/{name} (owner uid {st.st_uid}, mode {st.st_mode & 0o7777:04o}) to {aside}"
            st = None
        if st is None:
            os.mkdir(name, 0o700, dir_fd=top)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top)
            try:
                os.fchown(fd, uid, gid)
            finally:
                os.close(fd)
            note = (note + "; " if note else "") + f"made {tmp}/{name} for uid {uid}"
        return note
    finally:
        os.close(top)


def stage(text: str, limit: int, job: str = "?") -> None:
    """Read the squashfs file ``text`` once (as the job user: see as_job_user)."""
    try:
        size = _stage(text, limit)
    except OSError as err:
        _log(f"prolog: job {job}: {text}: {err.strerror or err}; not staged")
        return
    except ValueError as err:
        _log(f"prolog: job {job}: {text}: {err}; not staged")
        return
    _log(f"prolog: job {job}: staged {text} ({size} bytes)")


def _stage(text: str, limit: int) -> int:
    if not os.path.isabs(text):
        raise ValueError("not an absolute path on this node")
    # O_NONBLOCK: a FIFO named here must not hang the prolog.
    fd = os.open(text, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_mode & 0o170000) != 0o100000:
            raise ValueError("not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{st.st_size} bytes, over max_image_bytes ({limit})")
        if os.pread(fd, 4, 0) != SQUASHFS_MAGIC:
            raise ValueError("not a squashfs image")
        deadline = time.monotonic() + STAGE_DEADLINE_S
        total = 0
        while total < st.st_size and time.monotonic() < deadline:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
        return total
    finally:
        os.close(fd)


# --- epilog ------------------------------------------------------------------------------


def stale_mounts(runtime_root: str, mountinfo: str) -> list[str]:
    """FUSE mount points below ``runtime_root`` (proc(5) /proc/self/mountinfo)."""
    from mesobox.launch.syscalls import mountinfo_path

    found: list[str] = []
    prefix = runtime_root.rstrip("/") + "/"
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 10 or " - " not in line:
            continue
        point = mountinfo_path(fields[4])
        fstype = line.split(" - ", 1)[1].split()[0]
        if point.startswith(prefix) and fstype.startswith("fuse"):
            found.append(point)
    # Deepest first, so nested mounts come off before their parents.
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def epilog(config: Config) -> int:
    env = dict(os.environ)
    job = env.get("SLURM_JOB_ID", "?")
    ids = job_ids(env)
    if ids is None:
        reap(config.runtime_dir_str, job)  # run by hand: the caller's own runtime dir
    elif ids[0] == 0:
        reap("/tmp/mesobox-0", job)
    else:
        as_job_user(*ids, lambda: reap(f"/tmp/mesobox-{ids[0]}", job))
    return 0


def reap(root: str, job: str) -> None:
    """Unmount what mesobox left under the runtime dir ``root`` — if it is the caller's
    private one (paths.runtime_dir): a directory someone else made is not looked into."""
    if not os.path.lexists(root):
        return
    from mesobox import paths
    from mesobox.errors import UnsafeDirectory

    try:
        paths.runtime_dir(root)
    except UnsafeDirectory as err:
        _log(f"epilog: job {job}: {err.message}; not reaped")
        return
    # first the shared squashfs mounts no live launcher uses (refcounts say so): those
    # whose launchers all died and those lingering for a next run (linger 0: the job is
    # over, even if their watcher still lives; it may also have died with the step's cgroup) …
    from mesobox.launch.squashmount import reap_stale

    for reaped in reap_stale(os.path.join(root, "mnt"), job_over=True):
        _log(f"epilog: job {job}: {reaped} reaped (no container uses it)")
    # … then anything of the job's still mounted under its runtime dir
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read()
    for point in stale_mounts(root, mountinfo):
        status = "unmounted" if _unmount(point) else "could not unmount"
        _log(f"epilog: job {job}: {point} {status}")


def _unmount(point: str) -> bool:
    """Lazily unmount ``point``: root with umount2(UMOUNT_NOFOLLOW), a user with
    fusermount, which unmounts only that user's own FUSE mounts."""
    if os.geteuid() == 0:
        from mesobox.launch.syscalls import MNT_DETACH, umount2

        try:
            umount2(point, MNT_DETACH | _UMOUNT_NOFOLLOW)
        except OSError:
            return False
        return True
    for tool in ("fusermount3", "fusermount"):
        try:
            done = subprocess.run([tool, "-u", "-z", "-q", point], capture_output=True, check=False)
        except FileNotFoundError:
            continue
        return done.returncode == 0
    return False
