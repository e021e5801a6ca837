"""Identity room: who the process is inside — id maps, /etc/passwd and /etc/group.

Invariants:
- mesobox never runs setuid: real, effective and saved ids must be equal
  (``execute.check_ids``), as ch-run does.
- Default map is identity: the caller's uid/gid map to themselves (a single id for
  an ordinary user, user_namespaces(7)), so files on Lustre/GPFS/NFS keep their real
  owner.  ``--fakeroot`` maps the caller to 0; with a range in /etc/subuid and
  /etc/subgid and ``newuidmap``/``newgidmap`` installed, ids 1… map to that range so
  package managers can chown.
- Root isolation: a *real root* caller's container root is an unprivileged id by
  default, and each running root container has ids of its own, as Podman's rootful
  ``--userns=auto`` does: root's pool (its "root:START:COUNT" line in /etc/subuid and
  /etc/subgid, else ``ROOT_DEFAULT_POOL``) is cut in ``SLICE``-id slices and a launch
  takes the first free one (``claim_slice``).  A break-out then lands as an id that
  owns nothing on the host, and no root container can signal, ptrace or write the
  files of another.  A slice is taken with an flock on its file in a root-only
  directory (/run/mesobox/idmap, reached by dirfds, never through a symlink), held by
  the launching process (real root is always supervised) until the container ends —
  and is skipped while any process still runs with one of its uids (a daemon the
  container left behind).  ``--host-root`` opts out (whole id space mapped to itself,
  root is root) and warns on stderr.  Either way real root's user namespace is entered
  by ``enter_userns`` *after* the mounts were made as real root (so host paths such as
  /root or the runtime dir stay reachable for set-up) and just before execve, and it
  leaves the container with no supplementary group of the host's root.
- passwd/group files are generated from the image's (read without following any
  symlink, CVE-2019-16884 family) plus the caller's entries, so ``id``, ``whoami``
  and ``~`` work inside.
"""

from __future__ import annotations

import os

from mesobox.errors import LaunchError
from mesobox.launch.syscalls import write_file
from mesobox.oci.spec import IdMap

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

FULL_RANGE = 4294967295  # every id but (uid_t)-1, user_namespaces(7)
# One root container's ids: 65536, like a subuid(5) allocation by useradd.
SLICE = 65536
# Default pool for real root's containers when /etc/subuid has no "root" line: far
# above any site's LDAP uids (which stay below 2^31 in practice but above 65536), 1024
# slices.  Documented in docs/isolation.md.
ROOT_DEFAULT_POOL = (100_000_000, 1024 * SLICE)
SLICE_DIR = ("run", "mesobox", "idmap")  # below /: where the slices' lock files live
_held: tuple[int, int, int] | None = None  # (lock fd, host uid, host gid) of this process's slice
HOST_ROOT_WARNING = ("mesobox: WARNING: --host-root: container root is the host's root; a break-out owns "
                     "this machine. Use it only for trusted images.\n")


def subid_range(name: str, uid: int, path: str) -> tuple[int, int] | None:
    """The first ``NAME:START:COUNT`` (or ``UID:…``) line of subuid(5)/subgid(5)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (name, str(uid)) and parts[1].isdigit() and parts[2].isdigit():
            return int(parts[1]), int(parts[2])
    return None


def root_maps(host_root: bool, owner: tuple[int, int] | None = None
              ) -> tuple[tuple[IdMap, ...], tuple[IdMap, ...]]:
    """Maps for a real-root caller: a slice of root's pool that this process now holds
    for the container's life (``claim_slice``), unless ``host_root``.  ``owner``: the
    host ids that own the container's persistent state (an ``--overlay``, see
    ``state_owner``); when they start a slice of the pool, that slice and no other."""
    if host_root:
        full = (IdMap(container_id=0, host_id=0, size=FULL_RANGE),)
        return full, full
    pool = root_pool()
    uid, gid = claim_slice([owner], pinned=True) if owner in pool else claim_slice(pool)
    return (IdMap(container_id=0, host_id=uid, size=SLICE),), (IdMap(container_id=0, host_id=gid, size=SLICE),)


def root_pool(subuid: str = "/etc/subuid", subgid: str = "/etc/subgid") -> list[tuple[int, int]]:
    """(first host uid, first host gid) of each slice of root's pool, in order."""
    su = subid_range("root", 0, subuid) or ROOT_DEFAULT_POOL
    sg = subid_range("root", 0, subgid) or ROOT_DEFAULT_POOL
    # A range that holds host id 0 would make the container root the host's root.
    return [(su[0] + i * SLICE, sg[0] + i * SLICE) for i in range(min(su[1], sg[1]) // SLICE)
            if su[0] + i * SLICE > 0 and sg[0] + i * SLICE > 0]


def claim_slice(pool: list[tuple[int, int]] | None = None, top: str = "/", pinned: bool = False
                ) -> tuple[int, int]:
    """(host uid, host gid) of the first free slice, now held by this process until it
    exits (or the slice it already holds).  Free: its lock file is not flocked, and no
    process runs with one of its uids.  The lock fd is close-on-exec (the workload never
    has it) but forks share it: the container's own init keeps the slice held too.
    ``pinned``: ``pool`` is the one slice the container's overlay needs (root_maps)."""
    global _held
    if _held is not None:
        return _held[1], _held[2]
    import fcntl

    slots = pool if pool is not None else root_pool()
    directory = _slice_directory(top)
    try:
        for uid, gid in slots:
            fd = os.open(f"slice-{uid}-{gid}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=directory)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            # Looked at once the lock is ours: no new container can enter the slice now,
            # so a process seen in it is one that outlived its container.
            if uid_in_use(uid, SLICE):
                os.close(fd)
                continue
            _held = (fd, uid, gid)
            return uid, gid
    finally:
        os.close(directory)
    if pinned:
        raise LaunchError(f"the id range starting at {slots[0][0]}, whose ids this container's overlay carries, is "
                          "in use by another root container", hint="wait for it to end, or use another overlay")
    raise LaunchError(f"no free id range for a root container: all {len(slots)} ranges of {SLICE} ids of root's "
                      "pool are in use", hint="add ids to root's line in /etc/subuid and /etc/subgid "
                      f"(e.g. root:{ROOT_DEFAULT_POOL[0]}:{ROOT_DEFAULT_POOL[1]}), or end other root containers")


def free_slice() -> tuple[int, int]:
    """The first slice free now, not kept (``mesobox overlay create``: the slice whose ids
    a new overlay's files will carry; its launches then take that slice, ``state_owner``)."""
    global _held
    if _held is not None:
        return _held[1], _held[2]
    ids = claim_slice()
    assert _held is not None
    os.close(_held[0])
    _held = None
    return ids


def state_owner(overlay: str | None) -> tuple[int, int] | None:
    """Host ids that own a root container's persistent state: the ``--overlay`` image
    file (``overlay create`` gives it its slice's ids) or the overlay directory's
    ``upper/`` (written by the slice that first used it); None without an overlay."""
    if not overlay:
        return None
    path = overlay if os.path.isfile(overlay) else os.path.join(overlay, "upper")
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_uid, st.st_gid


def launch_maps(uid_maps: tuple[IdMap, ...], gid_maps: tuple[IdMap, ...]
                ) -> tuple[tuple[IdMap, ...], tuple[IdMap, ...]]:
    """The maps a real-root launch runs with: maps touching root's pool must be the
    slice this process holds — a spec read from a bundle's config.json names the slice
    of the process that wrote it, long released — so they become that (claimed now if
    need be).  The identity map of --host-root, or maps outside the pool, are kept."""
    held = _held is not None and len(uid_maps) == len(gid_maps) == 1 and uid_maps[0].size == SLICE \
        and (uid_maps[0].host_id, gid_maps[0].host_id) == _held[1:]
    if held or not is_shifted(uid_maps):
        return uid_maps, gid_maps
    su = subid_range("root", 0, "/etc/subuid") or ROOT_DEFAULT_POOL
    sg = subid_range("root", 0, "/etc/subgid") or ROOT_DEFAULT_POOL
    if any(_overlaps(m, su) for m in uid_maps) or any(_overlaps(m, sg) for m in gid_maps):
        return root_maps(host_root=False)
    return uid_maps, gid_maps


def in_root_pool(uid_maps: tuple[IdMap, ...], gid_maps: tuple[IdMap, ...]) -> bool:
    """Whether real root's maps use its pool of slices (launch_maps then holds one for
    the container's life: a supervisor must stay); maps of a config's own choosing
    outside the pool, or the identity map, need nothing held."""
    if not is_shifted(uid_maps):
        return False
    su = subid_range("root", 0, "/etc/subuid") or ROOT_DEFAULT_POOL
    sg = subid_range("root", 0, "/etc/subgid") or ROOT_DEFAULT_POOL
    return any(_overlaps(m, su) for m in uid_maps) or any(_overlaps(m, sg) for m in gid_maps)


def _overlaps(m: IdMap, pool: tuple[int, int]) -> bool:
    return m.host_id < pool[0] + pool[1] and pool[0] < m.host_id + m.size


def _slice_directory(top: str) -> int:
    """fd of TOP/run/mesobox/idmap, made 0700 where missing; each component opened
    without following a symlink and refused unless root's and writable by root alone
    (idmap: reachable by root alone), so nobody else can hold or free a slice."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    path = top.rstrip("/")
    try:
        for i, name in enumerate(SLICE_DIR):
            path += "/" + name
            last = i == len(SLICE_DIR) - 1
            try:
                if i:  # /run is the system's: only made-by-us directories below it
                    try:  # noqa: SIM105 - contextlib is not worth its import here
                        os.mkdir(name, 0o700, dir_fd=fd)
                    except FileExistsError:
                        pass
                nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as err:
                hint = ("it must be a directory of root's, not a symlink" if err.errno in (20, 40)  # ENOTDIR, ELOOP
                        else "root's containers take their ids there; --host-root needs none (not recommended)")
                raise LaunchError(f"cannot use {path} for root's id ranges: {err.strerror}", hint=hint) from None
            os.close(fd)
            fd = nxt
            st = os.fstat(fd)
            if st.st_uid != 0 or st.st_mode & (0o077 if last else 0o022):
                raise LaunchError(f"refusing {path} for root's id ranges: it is not root's alone "
                                  f"(owner {st.st_uid}, mode {st.st_mode & 0o7777:o})",
                                  hint="remove it; mesobox makes it anew (root-owned, mode 700)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def uid_in_use(start: int, size: int) -> bool:
    """Does any process run with a real, effective, saved or filesystem uid in
    [start, start + size)?  /proc/PID/status, not the owner of /proc/PID, which a
    non-dumpable process can make root (proc(5))."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/status", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile
        try:
            head = os.read(fd, 2048)
        except OSError:
            continue
        finally:
            os.close(fd)
        if _dead(head):
            continue
        at = head.find(b"\nUid:")
        if at >= 0 and any(start <= int(x) < start + size for x in head[at + 5:head.find(b"\n", at + 1)].split()):
            return True
    return False


def _dead(status: bytes) -> bool:
    """A zombie with no thread left: it can do nothing (an init that never reaps, as in
    some containers, keeps such zombies for ever).  A thread-group leader that exited
    while its other threads run shows as a zombie too, but with Threads > 1: alive."""
    zombie = b"\nState:\tZ" in status or b"\nState:\tX" in status
    at = status.find(b"\nThreads:")
    threads = status[at + 9:status.find(b"\n", at + 1)].strip() if at >= 0 else b"1"
    return zombie and threads == b"1"


def is_real_root() -> bool:
    """uid 0 of the initial user namespace, not the root of a container (nesting):
    only there does /proc/self/uid_map map the whole id space onto itself."""
    if os.getuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", str(FULL_RANGE)]
    except OSError:
        return False


def is_shifted(uid_maps: tuple[IdMap, ...]) -> bool:
    """True for a real-root caller's shifted map (container 0 is not host 0)."""
    return any(m.container_id == 0 and m.host_id != 0 for m in uid_maps) and is_real_root()


def enters_userns_last() -> bool:
    """Real root sets the container up with its real privileges (mounts, loop devices)
    and enters the user namespace only before execve (``enter_userns``)."""
    return is_real_root()


def enter_userns(uid_maps: tuple[IdMap, ...], gid_maps: tuple[IdMap, ...], unshare: Callable[[int], None],
                         clone_newuser: int) -> None:
    """Move this (real root) process into a new user namespace with the given maps.

    A process cannot write a multi-id map for its own new namespace: that needs
    CAP_SETUID in the *parent* namespace, which it left (user_namespaces(7)).  So a
    helper forked first, still real root outside, writes the maps, as newuidmap would."""
    go_r, go_w = os.pipe()
    me = os.getpid()  # /proc here is the container's: our pid as that /proc names it
    helper = os.fork()
    if helper == 0:
        os.close(go_w)
        code = 1
        try:
            if os.read(go_r, 1) == b"m":
                write_file(f"/proc/{me}/uid_map", map_text(uid_maps))
                write_file(f"/proc/{me}/gid_map", map_text(gid_maps))
                code = 0
        finally:
            os._exit(code)
    os.close(go_r)
    try:
        unshare(clone_newuser)
    finally:
        os.write(go_w, b"m")
        os.close(go_w)
    if os.waitpid(helper, 0)[1] != 0:
        raise LaunchError("cannot write the id maps of the container's root",
                          hint="use --host-root to run as the host's root (not recommended)")
    # The host root's supplementary groups survive unshare and keep their power over
    # host files (a root:G 0660 file through a bind): none are kept.
    try:
        os.setgroups([])
    except OSError as err:
        raise LaunchError(f"cannot drop the host's supplementary groups: {err.strerror}") from None
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def id_maps(uid: int, gid: int, fakeroot: bool, name: str, host_root: bool = False,
            overlay: str | None = None) -> tuple[tuple[IdMap, ...], tuple[IdMap, ...], bool]:
    """(uid maps, gid maps, made-with-newuidmap) for this caller."""
    if uid == 0 and is_real_root():
        return (*root_maps(host_root, None if host_root else state_owner(overlay)), False)
    inside_uid, inside_gid = (0, 0) if fakeroot else (uid, gid)
    uids: tuple[IdMap, ...] = (IdMap(container_id=inside_uid, host_id=uid, size=1),)
    gids: tuple[IdMap, ...] = (IdMap(container_id=inside_gid, host_id=gid, size=1),)
    if fakeroot and _has_helpers():
        su, sg = subid_range(name, uid, "/etc/subuid"), subid_range(name, uid, "/etc/subgid")
        if su and sg:
            uids += (IdMap(container_id=1, host_id=su[0], size=su[1]),)
            gids += (IdMap(container_id=1, host_id=sg[0], size=sg[1]),)
            return uids, gids, True
    return uids, gids, False


def _has_helpers() -> bool:
    return all(os.access(f"/usr/bin/{tool}", os.X_OK) for tool in ("newuidmap", "newgidmap"))


def map_text(maps: tuple[IdMap, ...]) -> str:
    return "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in maps)


def newidmap_argv(tool: str, pid: int, maps: tuple[IdMap, ...]) -> list[str]:
    argv = [f"/usr/bin/{tool}", str(pid)]
    for m in maps:
        argv += [str(m.container_id), str(m.host_id), str(m.size)]
    return argv


# --- passwd / group --------------------------------------------------------------------


def passwd_text(image_text: str, name: str, uid: int, gid: int, home: str, shell: str) -> str:
    """Image entries, minus any clashing with the caller's name or uid, plus the caller."""
    keep = [line for line in image_text.splitlines() if line and not _clashes(line, name, uid)]
    if uid == 0 and any(line.split(":")[2:3] == ["0"] for line in image_text.splitlines()):
        return image_text if image_text.endswith("\n") else image_text + "\n"
    keep.append(f"{name}:x:{uid}:{gid}:{name}:{home}:{shell}")
    return "\n".join(keep) + "\n"


def group_text(image_text: str, group: str, gid: int, name: str) -> str:
    lines = [line for line in image_text.splitlines() if line]
    if any(line.split(":")[2:3] == [str(gid)] for line in lines):
        return "\n".join(lines) + "\n"
    lines = [line for line in lines if line.split(":")[0] != group]
    lines.append(f"{group}:x:{gid}:{name}")
    return "\n".join(lines) + "\n"


def _clashes(line: str, name: str, uid: int) -> bool:
    fields = line.split(":")
    return fields[0] == name or (len(fields) > 2 and fields[2] == str(uid))


def host_names(uid: int, gid: int) -> tuple[str, str, str, str]:
    """(user name, group name, home, shell) from the host (probe.host_names)."""
    from mesobox.launch import probe

    return probe.host_names(uid, gid)
