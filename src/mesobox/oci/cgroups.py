"""OCI runtime cgroups: ``linux.cgroupsPath`` + ``linux.resources`` onto real cgroups.

Used by ``mesobox-oci`` run as real root, the way runc's cgroupfs driver works (not
the systemd driver).  The resources dict is the OCI JSON as found in config.json
(runtime-spec config-linux.md, "Control groups"); the file names and value
conversions follow runc's libcontainer cgroups ``fs`` (v1) and ``fs2`` (v2) drivers, so
that a validator reading the files back (runtime-tools ``cgroups_v1.go``) finds what
runc would have written.

Path rules (runc, cgroupfs driver):
- an absolute cgroupsPath is taken relative to each hierarchy's mount point;
- a relative one is relative to the runtime's own cgroup of that hierarchy
  (``/proc/self/cgroup``); on pure v2 to the *parent* of the runtime's own cgroup,
  because a group with processes in it cannot enable controllers for its children;
- an absent/empty cgroupsPath means the relative path ``<container id>``.
Unlike runc, which cleans ``..`` away silently, a ``..`` component is refused.

Security: root runs this with a path from config.json, so every directory below a
hierarchy's mount point is opened one component at a time from a dirfd with
``O_NOFOLLOW|O_DIRECTORY``, every file written is a single name opened ``O_NOFOLLOW``
in that directory, and names built from config values (hugepage sizes, ``unified``
keys, rdma devices) are checked to be plain file names first.

Invariants: ``remove()`` deletes only directories ``create()`` made (``created``, to
be recorded in state.json with ``dirs``): the leaf with any sub-groups the container
made in it, then made parents while empty; nothing is killed.  On a hybrid host the
controller-less cgroup2 mount is joined too (as runc), under the key ``unified``.
A value the kernel refuses is a ``LaunchError`` naming the file and value; a
limit for a controller that is not mounted is a ``LaunchError`` (as runc).  What runc
silently ignores is ignored here too, but said in ``warnings``.  Device rules cannot
be enforced on cgroup v2 without an eBPF program, which this module does not load: on
v2 they are left unenforced and a warning says so.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import time

from mesobox.errors import LaunchError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

MOUNTINFO = "/proc/self/mountinfo"
SELF_CGROUP = "/proc/self/cgroup"
UNIFIED = "unified"  # key of the cgroup2 directory in ``dirs`` (pure v2 or hybrid)

# v1 hierarchies runc creates and joins, in the order runc's fs driver sets them.
V1_CONTROLLERS = (
    "cpuset", "devices", "memory", "cpu", "cpuacct", "pids", "blkio", "hugetlb",
    "net_cls", "net_prio", "perf_event", "freezer", "name=systemd", "rdma", "misc",
)  # fmt: skip

# runc's default device allow-list (libcontainer/specconv AllowedDevices), appended
# after the config's own rules; the runtime adds it with ``with_default_devices``.
DEFAULT_DEVICE_RULES: tuple[dict[str, object], ...] = (
    {"allow": True, "type": "c", "access": "m"},  # mknod of any device (using it is another matter)
    {"allow": True, "type": "b", "access": "m"},
    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},  # /dev/null
    {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},  # /dev/random
    {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"},  # /dev/full
    {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},  # /dev/tty
    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},  # /dev/zero
    {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},  # /dev/urandom
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},  # /dev/pts/*
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},  # /dev/ptmx
    {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rwm"},  # /dev/net/tun
)

_FREEZE_TIMEOUT = 5.0
_RMDIR_TIMEOUT = 2.0
_PAGESIZE = re.compile(r"^[0-9]+[KMGT]?B$")
_DEVICE_NAME = re.compile(r"^[^\s/]+$")
_WriteList = list[tuple[str, str, str]]
_THROTTLES_V1 = (
    ("throttleReadBpsDevice", "read_bps_device"), ("throttleWriteBpsDevice", "write_bps_device"),
    ("throttleReadIOPSDevice", "read_iops_device"), ("throttleWriteIOPSDevice", "write_iops_device"),
)  # fmt: skip  # (controller key, file name, value)


# ---------------------------------------------------------------------- paths


def cgroup_path(cgroups_path: str | None, container_id: str) -> str:
    """The cleaned cgroup path for a container: absolute (from the hierarchy roots) or
    relative (from the runtime's own group).  Absent or empty → ``container_id``,
    relative, as runc's cgroupfs driver does.  ``..`` is refused (UsageError)."""
    raw = cgroups_path if cgroups_path else container_id
    if "\0" in raw or "\n" in raw:
        raise UsageError(f"linux.cgroupsPath {raw!r}: control characters are not allowed")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UsageError(f"linux.cgroupsPath {raw!r}: '..' is not allowed")
    if not parts:
        if raw.startswith("/"):
            raise UsageError(f"linux.cgroupsPath {raw!r}: the hierarchy root itself cannot be a container's cgroup")
        raise UsageError(f"container id {container_id!r} is not a usable cgroup name")
    inner = "/".join(parts)
    return "/" + inner if raw.startswith("/") else inner


class _Mount:
    """One cgroup hierarchy: where it is mounted and which part of it the mount shows."""

    __slots__ = ("controllers", "point", "root", "v2")

    def __init__(self, point: str, root: str, controllers: tuple[str, ...], v2: bool) -> None:
        self.point = point
        self.root = root
        self.controllers = controllers
        self.v2 = v2


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(mountinfo: str) -> list[_Mount]:
    """The cgroup and cgroup2 mounts of a mountinfo text (first mount of each hierarchy)."""
    mounts: list[_Mount] = []
    seen: set[tuple[str, ...]] = set()
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, post = left.split(), right.split()
        if not sep or len(fields) < 5 or len(post) < 3 or post[0] not in ("cgroup", "cgroup2"):
            continue
        v2 = post[0] == "cgroup2"
        if v2:
            controllers: tuple[str, ...] = (UNIFIED,)
        else:
            known = [o for o in post[2].split(",") if o in V1_CONTROLLERS]
            controllers = tuple(known)
        if not controllers or controllers in seen:
            continue
        seen.add(controllers)
        mounts.append(_Mount(_unescape(fields[4]), _unescape(fields[3]), controllers, v2))
    return mounts


def parse_self_cgroup(text: str) -> dict[str, str]:
    """/proc/self/cgroup → controller → group path (cgroup2 under ``UNIFIED``)."""
    groups: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            groups[UNIFIED] = parts[2]
        for name in parts[1].split(","):
            if name:
                groups[name] = parts[2]
    return groups


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _components(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _relative_dir(mount: _Mount, inner: str, own: Mapping[str, str], pure_v2: bool) -> list[str]:
    """Components below ``mount.point`` of the container's group in that hierarchy."""
    if inner.startswith("/"):
        return _components(inner)
    key = mount.controllers[0]
    group = own.get(key)
    if group is None:
        raise LaunchError(f"cgroup: the runtime's own {key} cgroup is not in /proc/self/cgroup")
    if pure_v2:
        # A group with processes cannot enable controllers for its children (no
        # internal processes rule): nest under the parent, as runc's fs2 does.
        group = os.path.dirname(group.rstrip("/")) or "/"
    root = mount.root.rstrip("/")
    if root and group != root and not group.startswith(root + "/"):
        raise LaunchError(f"cgroup: the runtime's own {key} cgroup {group} is outside the mount at {mount.point}")
    return _components(group[len(root) :]) + _components(inner)


# ----------------------------------------------------------- safe file access


def _open_root(mount: _Mount) -> int:
    try:
        return os.open(mount.point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise LaunchError(f"cgroup: cannot open {mount.point}: {err.strerror}") from None


def _open_below(fd: int, name: str, where: str, create: bool) -> tuple[int, bool]:
    """Open (and with ``create`` make) directory ``name`` in ``fd``, never through a
    symlink.  Returns the new fd and whether it was made here."""
    made = False
    if create:
        try:
            os.mkdir(name, 0o755, dir_fd=fd)
            made = True
        except FileExistsError:
            pass
        except OSError as err:
            raise LaunchError(f"cgroup: cannot create {where}: {err.strerror}") from None
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd), made
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise LaunchError(f"cgroup: {where} is not a directory (symlink?): refused") from None
        raise LaunchError(f"cgroup: cannot open {where}: {err.strerror}") from None


def _check_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise LaunchError(f"cgroup: {name!r} is not a cgroup file name")
    return name


def _read_at(fd: int, name: str) -> str | None:
    try:
        f = os.open(_check_name(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return None
    try:
        return os.read(f, 1 << 20).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(f)


def _write_at(fd: int, name: str, value: str) -> None:
    """Write ``value`` to ``name`` in a cgroup directory with one write(2), as the
    kernel parses each write as a whole."""
    f = os.open(_check_name(name), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    try:
        os.write(f, value.encode())
    finally:
        os.close(f)


# ----------------------------------------------------------- value checking


def _section(resources: Mapping[str, object], key: str) -> dict[str, object]:
    value = resources.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LaunchError(f"linux.resources.{key}: expected an object, got {value!r}")
    return value


def _int(section: Mapping[str, object], key: str, where: str) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise LaunchError(f"linux.resources.{where}.{key}: expected an integer, got {value!r}")
    return value


def _str(section: Mapping[str, object], key: str, where: str) -> str | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or "\n" in value:
        raise LaunchError(f"linux.resources.{where}.{key}: expected a string, got {value!r}")
    return value


def _list(resources: Mapping[str, object], key: str, where: str) -> list[dict[str, object]]:
    value = resources.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise LaunchError(f"linux.resources.{where}: expected a list of objects, got {value!r}")
    return value


def _device_number(entry: Mapping[str, object], where: str) -> str:
    major, minor = _int(entry, "major", where), _int(entry, "minor", where)
    if major is None or minor is None or major < 0 or minor < 0:
        raise LaunchError(f"linux.resources.{where}: major and minor must be non-negative integers")
    return f"{major}:{minor}"


def device_rule(rule: Mapping[str, object]) -> tuple[bool, str]:
    """An OCI device cgroup rule → (allow, ``"c 1:3 rwm"``) as devices.allow/deny take it."""
    allow = rule.get("allow")
    if not isinstance(allow, bool):
        raise LaunchError(f"linux.resources.devices: 'allow' must be true or false in {dict(rule)!r}")
    kind = _str(rule, "type", "devices") or "a"
    access = _str(rule, "access", "devices") or "rwm"
    if kind not in ("a", "b", "c") or not access or set(access) - set("rwm"):
        raise LaunchError(f"linux.resources.devices: bad rule {dict(rule)!r}")
    numbers = []
    for key in ("major", "minor"):
        value = _int(rule, key, "devices")
        numbers.append("*" if value is None or value == -1 else str(value))
        if value is not None and value < -1:
            raise LaunchError(f"linux.resources.devices: bad {key} in {dict(rule)!r}")
    return allow, f"{kind} {numbers[0]}:{numbers[1]} {access}"


def with_default_devices(resources: Mapping[str, object], linux_devices: list[dict[str, object]]) -> dict[str, object]:
    """``resources`` with runc's implicit device rules appended: an allow rule for each
    ``linux.devices`` entry, then runc's default allow-list."""
    rules = list(_list(resources, "devices", "devices"))
    for dev in linux_devices:
        kind = dev.get("type")
        if kind in ("c", "b", "u"):
            rules.append({"allow": True, "type": "c" if kind == "u" else kind, "major": dev.get("major"),
                          "minor": dev.get("minor"), "access": "rwm"})  # fmt: skip
    rules.extend(dict(r) for r in DEFAULT_DEVICE_RULES)
    out = dict(resources)
    out["devices"] = rules
    return out


def cpu_weight_from_shares(shares: int) -> int:
    """runc's shares (2…262144, default 1024) → cpu.weight (1…10000, default 100)
    conversion: a quadratic in log2(shares) through both ends and the defaults."""
    if shares <= 0:
        return 0
    if shares <= 2:
        return 1
    if shares >= 262144:
        return 10000
    l2 = math.log2(shares)
    return math.ceil(10 ** ((l2 * l2 + 125 * l2) / 612.0 - 7.0 / 34.0))


def io_weight_from_blkio(weight: int) -> int:
    """runc's blkio weight (10…1000) → io.weight (1…10000) linear conversion."""
    if weight == 0:
        return 0
    return 1 + (weight - 10) * 9999 // 990


def swap_v2(swap: int, memory: int) -> int:
    """runc's memory+swap (v1 memsw) → memory.swap.max (swap alone): 0 unset, -1 max."""
    if memory == -1 and swap == 0:
        return -1
    if swap in (-1, 0):
        return swap
    if memory in (0, -1):
        raise LaunchError("linux.resources.memory.swap: a swap limit needs a memory limit")
    if swap < memory:
        raise LaunchError(f"linux.resources.memory.swap {swap}: memory+swap must be >= memory limit {memory}")
    return swap - memory


def _limit(value: int) -> str:
    return "max" if value == -1 else str(value)


# ----------------------------------------------------------- v1 write plan


def plan_v1(
    resources: Mapping[str, object], has: Callable[[str, str], bool], read: Callable[[str, str], str | None]
) -> tuple[_WriteList, list[str]]:
    """What runc's fs driver writes for ``resources``: ordered (controller, file, value)
    triples, and warnings for what it ignores.  ``has``/``read`` look at the group."""
    writes: _WriteList = []
    warnings: list[str] = []
    if resources.get("unified"):
        raise LaunchError("linux.resources.unified: needs cgroup v2, this host has cgroup v1")
    for rule in _list(resources, "devices", "devices"):
        allow, text = device_rule(rule)
        writes.append(("devices", "devices.allow" if allow else "devices.deny", text))
    writes += _memory_v1(_section(resources, "memory"), has, read, warnings)
    writes += _cpu_v1(_section(resources, "cpu"))
    pids = _int(_section(resources, "pids"), "limit", "pids")
    if pids:
        writes.append(("pids", "pids.max", str(pids) if pids > 0 else "max"))
    writes += _blkio_v1(_section(resources, "blockIO"), has)
    writes += _hugetlb(resources, has, "hugetlb", "limit_in_bytes", "rsvd.limit_in_bytes")
    net = _section(resources, "network")
    classid = _int(net, "classID", "network")
    if classid:
        writes.append(("net_cls", "net_cls.classid", str(classid)))
    for prio in _list(net, "priorities", "network.priorities"):
        name = _str(prio, "name", "network.priorities")
        if not name or not _DEVICE_NAME.match(name):
            raise LaunchError(f"linux.resources.network.priorities: bad interface name {name!r}")
        writes.append(("net_prio", "net_prio.ifpriomap", f"{name} {_int(prio, 'priority', 'network.priorities') or 0}"))
    writes += _rdma(resources)
    return writes, warnings


def _memory_v1(
    mem: Mapping[str, object], has: Callable[[str, str], bool], read: Callable[[str, str], str | None],
    warnings: list[str],
) -> _WriteList:  # fmt: skip
    limit = _int(mem, "limit", "memory") or 0
    swap = _int(mem, "swap", "memory") or 0
    out: _WriteList = []
    if limit == -1 and swap == 0 and has("memory", "memory.memsw.limit_in_bytes"):
        swap = -1  # "unlimited memory" means unlimited memory+swap too (runc)
    mem_w = ("memory", "memory.limit_in_bytes", str(limit))
    swap_w = ("memory", "memory.memsw.limit_in_bytes", str(swap))
    if limit and swap:
        # The kernel wants memory <= memsw at every step: raise memsw first when it grows.
        current = (read("memory", "memory.limit_in_bytes") or "0").strip()
        grow = swap == -1 or (current.isdigit() and int(current) < swap)
        out += [swap_w, mem_w] if grow else [mem_w, swap_w]
    elif limit:
        out.append(mem_w)
    elif swap:
        out.append(swap_w)
    reservation = _int(mem, "reservation", "memory")
    if reservation:
        out.append(("memory", "memory.soft_limit_in_bytes", str(reservation)))
    if _int(mem, "kernel", "memory") is not None:
        warnings.append("linux.resources.memory.kernel is deprecated and ignored (as runc)")
    tcp = _int(mem, "kernelTCP", "memory")
    if tcp:
        out.append(("memory", "memory.kmem.tcp.limit_in_bytes", str(tcp)))
    swappiness = _int(mem, "swappiness", "memory")
    if swappiness is not None and swappiness != -1:
        if not 0 <= swappiness <= 100:
            raise LaunchError(f"linux.resources.memory.swappiness {swappiness}: the range is 0-100")
        out.append(("memory", "memory.swappiness", str(swappiness)))
    if mem.get("disableOOMKiller") is True:
        out.append(("memory", "memory.oom_control", "1"))
    if mem.get("useHierarchy") is False:
        warnings.append("linux.resources.memory.useHierarchy=false is ignored: the kernel is always hierarchical")
    return out


def _cpu_v1(cpu: Mapping[str, object]) -> _WriteList:
    out: _WriteList = []
    rt_period, rt_runtime = _int(cpu, "realtimePeriod", "cpu"), _int(cpu, "realtimeRuntime", "cpu")
    if rt_period:
        out.append(("cpu", "cpu.rt_period_us", str(rt_period)))
    if rt_runtime:
        out.append(("cpu", "cpu.rt_runtime_us", str(rt_runtime)))
    shares = _int(cpu, "shares", "cpu")
    if shares:
        out.append(("cpu", "cpu.shares", str(shares)))
    period, quota = _int(cpu, "period", "cpu"), _int(cpu, "quota", "cpu")
    if period:
        out.append(("cpu", "cpu.cfs_period_us", str(period)))
    if quota:
        out.append(("cpu", "cpu.cfs_quota_us", str(quota)))
    burst = _int(cpu, "burst", "cpu")
    if burst is not None:
        out.append(("cpu", "cpu.cfs_burst_us", str(burst)))
    idle = _int(cpu, "idle", "cpu")
    if idle is not None:
        out.append(("cpu", "cpu.idle", str(idle)))
    for key in ("cpus", "mems"):
        value = _str(cpu, key, "cpu")
        if value:
            out.append(("cpuset", f"cpuset.{key}", value))
    return out


def _blkio_v1(bio: Mapping[str, object], has: Callable[[str, str], bool]) -> _WriteList:
    # Kernels without CFQ have BFQ's files instead, which take the same range (runc).
    bfq = not has("blkio", "blkio.weight") and has("blkio", "blkio.bfq.weight")
    weight_file = "blkio.bfq.weight" if bfq else "blkio.weight"
    out: _WriteList = []
    weight, leaf = _int(bio, "weight", "blockIO"), _int(bio, "leafWeight", "blockIO")
    if weight:
        out.append(("blkio", weight_file, str(weight)))
    if leaf:
        out.append(("blkio", "blkio.leaf_weight", str(leaf)))
    for dev in _list(bio, "weightDevice", "blockIO.weightDevice"):
        number = _device_number(dev, "blockIO.weightDevice")
        w, lw = _int(dev, "weight", "blockIO.weightDevice"), _int(dev, "leafWeight", "blockIO.weightDevice")
        if w:
            out.append(("blkio", weight_file + "_device", f"{number} {w}"))
        if lw:
            out.append(("blkio", "blkio.leaf_weight_device", f"{number} {lw}"))
    for key, name in _THROTTLES_V1:
        for dev in _list(bio, key, f"blockIO.{key}"):
            rate = _int(dev, "rate", f"blockIO.{key}")
            out.append(("blkio", f"blkio.throttle.{name}", f"{_device_number(dev, 'blockIO.' + key)} {rate or 0}"))
    return out


def _hugetlb(
    resources: Mapping[str, object], has: Callable[[str, str], bool], key: str, limit_suffix: str, rsvd_suffix: str
) -> _WriteList:
    out: _WriteList = []
    for entry in _list(resources, "hugepageLimits", "hugepageLimits"):
        size = _str(entry, "pageSize", "hugepageLimits")
        limit = _int(entry, "limit", "hugepageLimits")
        if not size or not _PAGESIZE.match(size) or limit is None:
            raise LaunchError(f"linux.resources.hugepageLimits: bad entry {dict(entry)!r}")
        out.append((key, f"hugetlb.{size}.{limit_suffix}", str(limit)))
        rsvd = f"hugetlb.{size}.{rsvd_suffix}"
        if has(key, rsvd):  # reservations are limited too where the kernel has them (runc)
            out.append((key, rsvd, str(limit)))
    return out


def _rdma(resources: Mapping[str, object]) -> _WriteList:
    rdma = _section(resources, "rdma")
    out: _WriteList = []
    for device, limits in rdma.items():
        if not _DEVICE_NAME.match(device) or not isinstance(limits, dict):
            raise LaunchError(f"linux.resources.rdma: bad entry {device!r}")
        words = [device]
        handles, objects = _int(limits, "hcaHandles", "rdma"), _int(limits, "hcaObjects", "rdma")
        if handles is not None:
            words.append(f"hca_handle={handles}")
        if objects is not None:
            words.append(f"hca_object={objects}")
        if len(words) > 1:
            out.append(("rdma", "rdma.max", " ".join(words)))
    return out


# ----------------------------------------------------------- v2 write plan


def plan_v2(resources: Mapping[str, object], has: Callable[[str, str], bool]) -> tuple[_WriteList, list[str]]:
    """What runc's fs2 driver writes for ``resources`` (all in the one v2 directory)."""
    writes: list[tuple[str, str]] = []
    warnings: list[str] = []
    if resources.get("devices"):
        warnings.append("linux.resources.devices: device rules are not enforced on cgroup v2 (needs an eBPF program)")
    mem = _section(resources, "memory")
    limit, swap = _int(mem, "limit", "memory") or 0, _int(mem, "swap", "memory") or 0
    swap2 = swap_v2(swap, limit)
    if swap2:
        if not has(UNIFIED, "memory.swap.max"):
            if swap2 != -1:
                raise LaunchError("linux.resources.memory.swap: this kernel has no swap accounting (memory.swap.max)")
        else:
            writes.append(("memory.swap.max", _limit(swap2)))
    if limit:
        writes.append(("memory.max", _limit(limit)))
    reservation = _int(mem, "reservation", "memory")
    if reservation:
        writes.append(("memory.low", _limit(reservation)))
    for key in ("kernel", "kernelTCP", "swappiness", "disableOOMKiller", "useHierarchy"):
        if mem.get(key) is not None:
            warnings.append(f"linux.resources.memory.{key} is ignored on cgroup v2 (as runc)")
    cpu = _section(resources, "cpu")
    if _int(cpu, "realtimeRuntime", "cpu") or _int(cpu, "realtimePeriod", "cpu"):
        raise LaunchError("linux.resources.cpu.realtime*: realtime scheduling limits are not supported on cgroup v2")
    idle = _int(cpu, "idle", "cpu")
    if idle is not None:
        writes.append(("cpu.idle", str(idle)))
    shares = _int(cpu, "shares", "cpu")
    if shares:
        writes.append(("cpu.weight", str(cpu_weight_from_shares(shares))))
    quota, period = _int(cpu, "quota", "cpu") or 0, _int(cpu, "period", "cpu") or 0
    if quota or period:
        writes.append(("cpu.max", ("max" if quota <= 0 else str(quota)) + (f" {period}" if period else "")))
    burst = _int(cpu, "burst", "cpu")
    if burst is not None:
        writes.append(("cpu.max.burst", str(burst)))
    for key in ("cpus", "mems"):
        value = _str(cpu, key, "cpu")
        if value:
            writes.append((f"cpuset.{key}", value))
    pids = _int(_section(resources, "pids"), "limit", "pids")
    if pids:
        writes.append(("pids.max", str(pids) if pids > 0 else "max"))
    writes += _io_v2(_section(resources, "blockIO"), has, warnings)
    out: _WriteList = [(UNIFIED, name, value) for name, value in writes]
    out += _hugetlb(resources, has, UNIFIED, "max", "rsvd.max")
    net = _section(resources, "network")
    if net.get("classID") is not None or net.get("priorities"):
        warnings.append("linux.resources.network is ignored on cgroup v2 (no net_cls/net_prio; as runc)")
    out += [(UNIFIED, name, value) for _, name, value in _rdma(resources)]
    unified = _section(resources, "unified")
    for key, raw in unified.items():  # last: explicit v2 values override the mapped ones (runc)
        if not isinstance(raw, str):
            raise LaunchError(f"linux.resources.unified.{key}: expected a string value, got {raw!r}")
        if "/" in key or key in (".", ".."):
            raise LaunchError(f"linux.resources.unified: {key!r} is not a cgroup file name")
        out.append((UNIFIED, key, raw))
    return out, warnings


def _io_v2(bio: Mapping[str, object], has: Callable[[str, str], bool], warnings: list[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    bfq = has(UNIFIED, "io.bfq.weight")
    weight = _int(bio, "weight", "blockIO")
    if weight:
        # BFQ takes the blkio range as is; io.weight needs runc's conversion.
        out.append(("io.bfq.weight", str(weight)) if bfq else ("io.weight", str(io_weight_from_blkio(weight))))
    if _int(bio, "leafWeight", "blockIO"):
        warnings.append("linux.resources.blockIO.leafWeight is ignored on cgroup v2 (as runc)")
    for dev in _list(bio, "weightDevice", "blockIO.weightDevice"):
        w = _int(dev, "weight", "blockIO.weightDevice")
        if not w:
            continue
        if not bfq:
            raise LaunchError("linux.resources.blockIO.weightDevice: cgroup v2 needs the BFQ scheduler (io.bfq.weight)")
        out.append(("io.bfq.weight", f"{_device_number(dev, 'blockIO.weightDevice')} {w}"))
    for key, word in (("throttleReadBpsDevice", "rbps"), ("throttleWriteBpsDevice", "wbps"),
                      ("throttleReadIOPSDevice", "riops"), ("throttleWriteIOPSDevice", "wiops")):  # fmt: skip
        for dev in _list(bio, key, f"blockIO.{key}"):
            rate = _int(dev, "rate", f"blockIO.{key}") or 0
            out.append(("io.max", f"{_device_number(dev, 'blockIO.' + key)} {word}={rate if rate else 'max'}"))
    return out


# ----------------------------------------------------------------- the group


class OciCgroup:
    """A container's cgroup: one directory per hierarchy (``dirs``: controller →
    absolute directory; co-mounted controllers share one), on v1 or pure v2."""

    def __init__(self, mounts: dict[str, _Mount], rel: dict[str, list[str]], v2: bool) -> None:
        self._mounts = mounts  # controller key → mount
        self._rel = rel  # controller key → components below the mount point
        self.v2 = v2
        self.created: list[str] = []  # absolute directories create() made, in order
        self.warnings: list[str] = []
        self._deferred_period: str | None = None

    # -- construction

    @property
    def dirs(self) -> dict[str, str]:
        return {key: os.path.join(self._mounts[key].point, *self._rel[key]) for key in self._mounts}

    @classmethod
    def _layout(cls, path: str, mountinfo: str | None = None, self_cgroup: str | None = None) -> OciCgroup:
        mounts = parse_mounts(mountinfo if mountinfo is not None else _read_text(MOUNTINFO))
        own = parse_self_cgroup(self_cgroup if self_cgroup is not None else _read_text(SELF_CGROUP))
        v1 = [m for m in mounts if not m.v2]
        # On a hybrid host runc joins the (controller-less) cgroup2 mount too.
        chosen = v1 + [m for m in mounts if m.v2][:1]
        if not chosen:
            raise LaunchError("cgroup: no cgroup filesystem is mounted")
        by_key: dict[str, _Mount] = {}
        rel: dict[str, list[str]] = {}
        for mount in chosen:
            parts = _relative_dir(mount, path, own, pure_v2=not v1)
            for key in mount.controllers:
                by_key[key] = mount
                rel[key] = parts
        return cls(by_key, rel, v2=not v1)

    @classmethod
    def create(
        cls, path: str, resources: Mapping[str, object], *, mountinfo: str | None = None, self_cgroup: str | None = None
    ) -> OciCgroup:
        """Make the group for ``path`` (from ``cgroup_path``) and write ``resources``.
        On failure everything made is removed again before the error is raised.
        ``mountinfo``/``self_cgroup`` stand in for the /proc files (tests)."""
        group = cls._layout(path, mountinfo, self_cgroup)
        try:
            group._make()
            group.update(resources)
        except BaseException:
            with contextlib.suppress(LaunchError):
                group.remove()  # the first error is the one to report
            raise
        return group

    @classmethod
    def from_dirs(cls, dirs: Mapping[str, str], created: list[str] | None = None) -> OciCgroup:
        """Re-open a group from ``dirs`` (and ``created``) recorded in state.json."""
        mounts = parse_mounts(_read_text(MOUNTINFO))
        by_key: dict[str, _Mount] = {}
        rel: dict[str, list[str]] = {}
        for key, directory in dirs.items():
            mount = next((m for m in mounts if key in m.controllers), None)
            base = mount.point.rstrip("/") + "/" if mount else ""
            if mount is None or not directory.startswith(base) or ".." in _components(directory):
                raise LaunchError(f"cgroup: recorded directory {directory} is not in the {key} hierarchy")
            by_key[key] = mount
            rel[key] = _components(directory[len(base) :])
        group = cls(by_key, rel, v2=not any(not m.v2 for m in by_key.values()))
        group.created = list(created or [])
        return group

    def _hierarchies(self) -> Iterator[tuple[str, _Mount, list[str]]]:
        """One (key, mount, components) per distinct hierarchy."""
        seen: set[str] = set()
        for key, mount in self._mounts.items():
            if mount.point not in seen:
                seen.add(mount.point)
                yield key, mount, self._rel[key]

    @contextlib.contextmanager
    def _opened(self, key: str, create: bool = False) -> Iterator[int]:
        """The group's directory in ``key``'s hierarchy, walked from the mount point
        without following symlinks (and made, with ``create``)."""
        mount = self._mounts[key]
        fd = _open_root(mount)
        where = mount.point
        try:
            for name in self._rel[key]:
                where = os.path.join(where, name)
                if create and self.v2:
                    _enable_controllers(fd)  # at every level, as runc's fs2 does
                new, made = _open_below(fd, name, where, create)
                parent, fd = fd, new
                try:
                    if made:
                        self.created.append(where)
                        if "cpuset" in mount.controllers:
                            _inherit_cpuset(parent, fd, where)
                finally:
                    os.close(parent)
            yield fd
        finally:
            os.close(fd)

    def _make(self) -> None:
        for key, _mount, _parts in self._hierarchies():
            with self._opened(key, create=True):
                pass

    # -- limits

    def update(self, resources: Mapping[str, object]) -> None:
        """Write every limit of ``resources`` (create, and ``runc update``)."""
        fds: dict[str, int] = {}
        stack = contextlib.ExitStack()
        with stack:

            def fd_of(key: str) -> int | None:
                if key not in self._mounts:
                    return None
                if key not in fds:
                    fds[key] = stack.enter_context(self._opened(key))
                return fds[key]

            def has(key: str, name: str) -> bool:
                fd = fd_of(key)
                return fd is not None and _read_at(fd, name) is not None

            def read(key: str, name: str) -> str | None:
                fd = fd_of(key)
                return None if fd is None else _read_at(fd, name)

            if self.v2:
                writes, warnings = plan_v2(resources, has)
            else:
                writes, warnings = plan_v1(resources, has, read)
            self.warnings += warnings
            self._deferred_period = None
            for key, name, value in writes:
                fd = fd_of(key)
                if fd is None:
                    raise LaunchError(f"cgroup: cannot set {name} to {value!r}: the {key} controller is not mounted")
                self._write(fd, key, name, value, read)
            if self._deferred_period is not None:  # no quota came to make room for it
                where = os.path.join(self.dirs["cpu"], "cpu.cfs_period_us")
                raise LaunchError(f"cgroup: cannot write {self._deferred_period!r} to {where}: Invalid argument")

    def _write(self, fd: int, key: str, name: str, value: str, read: Callable[[str, str], str | None]) -> None:
        where = os.path.join(self.dirs[key], name)
        try:
            _write_at(fd, name, value)
        except OSError as err:
            if name == "memory.limit_in_bytes" and err.errno == errno.EBUSY:
                usage = (read(key, "memory.usage_in_bytes") or "?").strip()
                raise LaunchError(f"cgroup: cannot set {where} to {value}: below current usage {usage}") from None
            if name == "cpu.cfs_period_us" and err.errno == errno.EINVAL:
                # A shorter period can exceed the parent's quota until the new quota is
                # in; runc retries the period after the quota, and so do we.
                self._deferred_period = value
                return
            detail = err.strerror or str(err)
            raise LaunchError(f"cgroup: cannot write {value!r} to {where}: {detail}") from None
        if name == "cpu.cfs_quota_us" and self._deferred_period is not None:
            period, self._deferred_period = self._deferred_period, None
            self._write(fd, key, "cpu.cfs_period_us", period, read)
        if name == "cpu.shares":
            got = (read(key, name) or "").strip()
            if got != value:
                raise LaunchError(f"cgroup: cpu.shares {value} is out of range: the kernel set {got}")

    # -- processes

    def join(self, pid: int) -> None:
        """Move ``pid`` (0: the caller) into the group in every hierarchy."""
        value = str(pid if pid else os.getpid())
        for key, _mount, _parts in self._hierarchies():
            with self._opened(key) as fd:
                try:
                    _write_at(fd, "cgroup.procs", value)
                except OSError as err:
                    where = os.path.join(self.dirs[key], "cgroup.procs")
                    raise LaunchError(f"cgroup: cannot move pid {value} into {where}: {err.strerror}") from None

    def pids(self) -> list[int]:
        """Every process in the group, sub-groups included."""
        key = next((k for k in ("freezer", "pids", "devices", "memory", UNIFIED) if k in self._mounts), None)
        key = key or next(iter(self._mounts))
        found: set[int] = set()
        with self._opened(key) as fd:
            _collect_pids(fd, found)
        return sorted(found)

    def freeze(self, frozen: bool) -> None:
        """Freeze (pause) or thaw (resume) every process in the group, and wait until
        the kernel says it is done."""
        key = UNIFIED if self.v2 else "freezer"
        if key not in self._mounts:
            raise LaunchError("cgroup: no freezer controller is mounted: cannot pause")
        with self._opened(key) as fd:
            if self.v2:
                _freeze_v2(fd, frozen, self.dirs[key])
            else:
                _freeze_v1(fd, frozen, self.dirs[key])

    def remove(self) -> None:
        """Remove what create() made, deepest first: the leaf with any sub-groups the
        container made in it, then the parents create() made while they are empty
        (another container may share one: it is left then).  A leaf that existed
        before is left alone, unlike runc, which removes it too.  Kills nothing: a
        leaf that still has processes after a short wait is an error."""
        problems: list[str] = []
        deadline = time.monotonic() + _RMDIR_TIMEOUT  # one wait for all hierarchies
        for _key, mount, parts in self._hierarchies():
            leaf = os.path.join(mount.point, *parts)
            made_here = [d for d in self.created if d.startswith(mount.point.rstrip("/") + "/")]
            for directory in sorted(made_here, key=lambda d: d.count("/"), reverse=True):
                is_leaf = directory == leaf
                problem = _remove_dir(mount, _components(directory[len(mount.point) :]), directory,
                                      deadline if is_leaf else 0.0, recursive=is_leaf)  # fmt: skip
                if problem and is_leaf:
                    problems.append(problem)
                    break
        if problems:
            raise LaunchError("cgroup: " + "; ".join(problems))


# ---------------------------------------------------------------- helpers


def _inherit_cpuset(parent: int, child: int, where: str) -> None:
    """A new v1 cpuset group starts with no CPUs or nodes, and joining it fails: copy
    the parent's, as runc does."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        if (_read_at(child, name) or "").strip():
            continue
        value = (_read_at(parent, name) or "").strip()
        try:
            _write_at(child, name, value or "\n")
        except OSError as err:
            raise LaunchError(f"cgroup: cannot copy {name} {value!r} into {where}: {err.strerror}") from None


def _enable_controllers(parent: int) -> None:
    """Enable in a v2 parent every controller it has, so that the child gets the
    interface files (runc's fs2 does the same at each level).  One at a time: a
    controller the parent cannot delegate is left off; writing its limit then fails."""
    available = (_read_at(parent, "cgroup.controllers") or "").split()
    enabled = set((_read_at(parent, "cgroup.subtree_control") or "").split())
    for name in available:
        if name not in enabled:
            with contextlib.suppress(OSError):
                _write_at(parent, "cgroup.subtree_control", "+" + name)


def _collect_pids(fd: int, found: set[int]) -> None:
    for word in (_read_at(fd, "cgroup.procs") or "").split():
        if word.isdigit():
            found.add(int(word))
    for entry in os.scandir(fd):
        if entry.is_dir(follow_symlinks=False):
            try:
                sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                continue  # a group removed meanwhile
            try:
                _collect_pids(sub, found)
            finally:
                os.close(sub)


def _freeze_v1(fd: int, frozen: bool, where: str) -> None:
    want = "FROZEN" if frozen else "THAWED"
    deadline = time.monotonic() + _FREEZE_TIMEOUT
    attempt = 0
    while True:
        # Writing again now and then lets the kernel retry tasks that were busy
        # (e.g. in vfork) when the freeze started.
        if attempt % 25 == 0:
            try:
                _write_at(fd, "freezer.state", want)
            except OSError as err:
                raise LaunchError(f"cgroup: cannot write {want} to {where}/freezer.state: {err.strerror}") from None
        state = (_read_at(fd, "freezer.state") or "").strip()
        if state == want:
            return
        if time.monotonic() > deadline:
            if frozen:
                with contextlib.suppress(OSError):
                    _write_at(fd, "freezer.state", "THAWED")
            raise LaunchError(f"cgroup: {where} did not become {want} (state {state or '?'})")
        attempt += 1
        time.sleep(0.001)


def _freeze_v2(fd: int, frozen: bool, where: str) -> None:
    try:
        _write_at(fd, "cgroup.freeze", "1" if frozen else "0")
    except OSError as err:
        raise LaunchError(f"cgroup: cannot write to {where}/cgroup.freeze: {err.strerror}") from None
    want = "frozen 1" if frozen else "frozen 0"
    deadline = time.monotonic() + _FREEZE_TIMEOUT
    while want not in (_read_at(fd, "cgroup.events") or "").splitlines():
        if time.monotonic() > deadline:
            raise LaunchError(f"cgroup: {where} did not become {'frozen' if frozen else 'thawed'}")
        time.sleep(0.001)


def _remove_dir(mount: _Mount, parts: list[str], where: str, deadline: float, recursive: bool) -> str | None:
    """rmdir ``parts`` below the mount (with ``recursive``, its sub-groups first),
    retrying until ``deadline`` while exiting tasks still hold it.  Returns a problem
    text, or None."""
    fd = _open_root(mount)
    try:
        for name in parts[:-1]:
            try:
                new = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as err:
                return f"cannot open {where}: {err.strerror}"
            os.close(fd)
            fd = new
        return _rmdir_below(fd, parts[-1], where, deadline, recursive)
    finally:
        os.close(fd)


def _rmdir_below(parent: int, name: str, where: str, deadline: float, recursive: bool) -> str | None:
    if recursive:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            return None
        except OSError as err:
            return f"cannot open {where}: {err.strerror}"
        try:
            subs = [e.name for e in os.scandir(fd) if e.is_dir(follow_symlinks=False)]
            for sub in subs:
                problem = _rmdir_below(fd, sub, os.path.join(where, sub), deadline, recursive)
                if problem:
                    return problem
        finally:
            os.close(fd)
    while True:
        try:
            os.rmdir(name, dir_fd=parent)
            return None
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                return f"cannot remove {where}: {err.strerror}"
        time.sleep(0.01)
