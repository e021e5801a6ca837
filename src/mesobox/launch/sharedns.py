"""One user namespace for the ranks of a node: join it, or create it and publish it.

Why: MPI libraries copy large messages between the ranks of a node with one
process_vm_readv(2) (CMA, "single copy").  The kernel allows it between processes of
the same user only when they are in the same user namespace, or the reader holds
CAP_SYS_PTRACE over the other's (ptrace(2), "Ptrace access mode checking"): one
container per rank, each with its own user namespace, refuses it, and a library that
picked CMA then fails or hangs.  So the ranks of one Slurm job on a node (or, outside
Slurm, every such launch of one user) share one user namespace; each still has its own
mount namespace, root and workspace.  Apptainer's ``--sharens`` makes the same choice.

How, with no daemon: the launch that finds no usable namespace creates one (unshare,
then its id maps) and records itself, as pid and start time, in a small file of the
user's private runtime directory (``userns/<scope>-<maps>``); the next launch opens
``/proc/PID/ns/user`` of a recorded member and joins it with setns(2), then unshares
the rest.  A namespace lives as long as one member does; the record keeps a few live
members, newest first, so the first rank may exit before the last one starts.  A flock
on the record serialises the choice, so two ranks starting together never end up in
two namespaces; the record is rewritten in place under that lock (no file is made per
launch: ≈0.3 ms of each start-up in all, bench/README.md).

Invariants:
- Only a namespace that is exactly what this launch would have made is joined: a child
  of the caller's own user namespace (NS_GET_PARENT), owned by the caller's uid
  (NS_GET_OWNER_UID), with the same uid_map, gid_map and setgroups text.  The record
  lives in the caller's private runtime directory (paths.runtime_dir checked it), and a
  pid is trusted only with its recorded start time (procs.py), so a recycled pid names
  nothing.
- Anything unexpected (a lock that cannot be taken, a record that cannot be written)
  falls back to a private namespace, and the caller is told so: it then gives the MPI
  libraries the settings that keep them off CMA (``program["cma_env"]``), so a rank
  never hangs.
"""

from __future__ import annotations

import os
import sys

from mesobox.launch import syscalls as sc
from mesobox.procs import start_time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

# <linux/nsfs.h> ioctls on a namespace file descriptor.
NS_GET_PARENT = 0xB702
NS_GET_OWNER_UID = 0xB704
KEEP = 16  # live members kept in a record: enough for any start/exit order of a node's ranks


def scope() -> str:
    """Who shares: the ranks of one Slurm job on this node, else every launch of the user."""
    job = os.environ.get("SLURM_JOB_ID", "")
    return f"job{job}" if job.isdigit() else "user"


def record_name(uid_map: str, gid_map: str) -> str:
    """One record per scope, id maps and the caller's own user namespace: launches with
    other maps never meet, nor does a mesobox nested in a container (whose runtime
    directory may be the host's) meet the ranks outside."""
    import binascii

    key = f"{uid_map}|{gid_map}|{os.readlink('/proc/self/ns/user')}"
    return f"{scope()}-{binascii.crc32(key.encode()):08x}"


def enter(directory: str, flags: int, uid_map: str, gid_map: str, unshare: Callable[[int], None],
          made: Callable[[bool], object]) -> bool:
    """Join the recorded namespace and ``unshare`` the rest of ``flags``, then
    ``made(False)``; or ``unshare`` all of ``flags`` and let ``made(True)`` write the id
    maps.  Returns False when this launch's namespace is not shared (the caller keeps the
    MPI libraries off CMA then)."""
    try:
        record = _open_record(directory, record_name(uid_map, gid_map))
    except OSError:
        unshare(flags)
        made(True)
        return False
    try:
        live = _join_first(_read(record), uid_map, gid_map)
        if live is None:
            unshare(flags)
            made(True)
            live = []
        else:
            unshare(flags & ~sc.CLONE_NEWUSER)
            made(False)
        me = os.getpid()
        started = start_time(me)
        if started is None:  # cannot be (we run): fail safe
            return False
        try:
            _write(record, [(me, started), *[m for m in live if m[0] != me][: KEEP - 1]])
        except OSError:
            return False  # unrecorded: a later rank would make another namespace
        return True
    finally:
        os.close(record)  # and with it the lock


def _open_record(directory: str, name: str) -> int:
    """The record ``directory/name``, held exclusively (flock) while this launch chooses,
    so ranks starting together choose one after the other; a crashed holder's lock goes
    with its last fd.  Read and rewritten in place: no file is made per launch."""
    path = os.path.join(directory, name)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:  # the first shared launch of this runtime directory
        try:  # noqa: SIM105 - contextlib costs an import on the launch path
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        fd = os.open(path, flags, 0o600)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(fd: int) -> list[tuple[int, int]]:
    """The recorded members, newest first; a damaged record is an empty one."""
    try:
        raw = os.pread(fd, 4096, 0)
    except OSError:
        return []
    members = []
    for line in raw.split(b"\n"):
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            members.append((int(fields[0]), int(fields[1])))
    return members


def _write(fd: int, members: list[tuple[int, int]]) -> None:
    data = "".join(f"{pid} {started}\n" for pid, started in members).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _join_first(members: list[tuple[int, int]], uid_map: str, gid_map: str) -> list[tuple[int, int]] | None:
    """setns(2) into the namespace of the first member that is still what the record
    says, and return the members found in it (None: nobody to join)."""
    for i, (pid, started) in enumerate(members[:KEEP]):
        fd = _usable(pid, started, uid_map, gid_map)
        if fd is None:
            continue
        try:
            ino = os.fstat(fd).st_ino
            sc.setns(fd, sc.CLONE_NEWUSER)
        except OSError:
            continue
        finally:
            os.close(fd)
        live = [(pid, started)]
        for other, other_started in members[i + 1 : KEEP]:
            if _in_namespace(other, other_started, ino):
                live.append((other, other_started))
        return live
    return None


def _usable(pid: int, started: int, uid_map: str, gid_map: str) -> int | None:
    """An fd of ``pid``'s user namespace when joining it is exactly what creating one
    would give this launch; else None."""
    if start_time(pid) != started:
        return None
    try:
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not (_owned_child(fd) and _same_maps(pid, uid_map, gid_map) and start_time(pid) == started):
            os.close(fd)
            return None
    except OSError:
        os.close(fd)
        return None
    return fd


def _owned_child(fd: int) -> bool:
    """A child of the caller's own user namespace, owned by the caller's uid."""
    import fcntl

    owner = bytearray(4)
    fcntl.ioctl(fd, NS_GET_OWNER_UID, owner)
    if int.from_bytes(owner, sys.byteorder) != os.getuid():
        return False
    parent = fcntl.ioctl(fd, NS_GET_PARENT)
    try:
        here = os.stat("/proc/self/ns/user")
        there = os.fstat(parent)
        return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)
    finally:
        os.close(parent)


def _same_maps(pid: int, uid_map: str, gid_map: str) -> bool:
    def text(name: str) -> str:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return " ".join(f.read().decode().split())

    return (text("uid_map") == " ".join(uid_map.split()) and text("gid_map") == " ".join(gid_map.split())
            and text("setgroups") == "deny")


def _in_namespace(pid: int, started: int, ino: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino == ino and start_time(pid) == started
    except OSError:
        return False

