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
  default — root's range in /etc/subuid and /etc/subgid (a "root:START:COUNT" line),
  else ``ROOT_DEFAULT_RANGE`` — as Podman's rootful ``--userns=auto`` takes ids from
  a dedicated sub-id range.  A break-out then lands as an id that owns nothing on the
  host.  ``--host-root`` opts out (whole id space mapped to itself, root is root) and
  warns on stderr.  Either way real root's user namespace is entered by ``enter_userns``
  *after* the mounts were made as real root (so host paths such as /root or the
  runtime dir stay reachable for set-up) and just before execve.
- passwd/group files are generated from the image's (read without following any
  symlink, CVE-2019-16884 family) plus the caller's entries, so ``id``, ``whoami``
  and ``~`` work inside.
"""

from __future__ import annotations

import os

from mesobox.errors import LaunchError
from mesobox.runtime.execute import write_file
from mesobox.runtime.spec import IdMap

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

FULL_RANGE = 4294967295  # every id but (uid_t)-1, user_namespaces(7)
# Default range for real root's containers when /etc/subuid has no "root" line: far
# above any site's LDAP uids (which stay below 2^31 in practice but above 65536), 65536
# ids like a subuid(5) allocation by useradd.  Documented in docs/isolation.md.
ROOT_DEFAULT_RANGE = (100_000_000, 65536)
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


def root_maps(host_root: bool) -> tuple[tuple[IdMap, ...], tuple[IdMap, ...]]:
    """Maps for a real-root caller: shifted to root's sub-id range unless ``host_root``."""
    if host_root:
        full = (IdMap(container_id=0, host_id=0, size=FULL_RANGE),)
        return full, full
    su = subid_range("root", 0, "/etc/subuid") or ROOT_DEFAULT_RANGE
    sg = subid_range("root", 0, "/etc/subgid") or ROOT_DEFAULT_RANGE
    return (IdMap(container_id=0, host_id=su[0], size=su[1]),), (IdMap(container_id=0, host_id=sg[0], size=sg[1]),)


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
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def id_maps(uid: int, gid: int, fakeroot: bool, name: str, host_root: bool = False
            ) -> tuple[tuple[IdMap, ...], tuple[IdMap, ...], bool]:
    """(uid maps, gid maps, made-with-newuidmap) for this caller."""
    if uid == 0 and is_real_root():
        return (*root_maps(host_root), False)
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
    from mesobox.runtime import probe

    return probe.host_names(uid, gid)
