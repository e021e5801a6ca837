"""Resource limits room: one container's cgroup, on cgroup v1 or v2.

Invariants:
- mesobox only ever creates cgroups *below* a group it may write: the caller's own
  group (``/proc/self/cgroup``), a Slurm job's group, or the hierarchy root (root only).
  It never changes a group it did not create, except enabling controllers in the
  parent's ``cgroup.subtree_control`` on v2, which is how delegation is meant to work
  (kernel Documentation/admin-guide/cgroup-v2.rst, "Delegation").
- A limit that cannot be applied is an error (``PolicyError`` with a hint naming what
  the admin must delegate), never a silent no-op.  Accounting-only controllers
  (freezer, cpuacct…) are joined when writable and simply absent otherwise.
- ``remove()`` deletes exactly the directories ``create()`` made.

Limits follow the OCI runtime spec ``linux.resources`` (memory.limit, cpu.quota/period,
cpu.cpus, pids.limit, blockIO.throttle*Device) and Docker's option syntax.  Stdlib only,
no dataclasses: imported by `mesobox run` whenever a resource option is given.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

from mesobox.errors import LaunchError, PolicyError, UsageError
from mesobox.oci.spec import Resources
from mesobox.records import Record
from mesobox.sizes import parse_size

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

CGROUP_ROOT = Path("/sys/fs/cgroup")
_ADMIN_HINT_V1 = (
    "cgroup v1 has no safe delegation to users: ask the admin for cgroup v2 with delegation (systemd Delegate=yes "
    "or Slurm's cgroup/v2 plugin), or to start your session/job in a v1 group you own (chown the directory with its "
    "cgroup.procs and tasks; mesobox nests below your own group); see docs/isolation.md"
)
_ADMIN_HINT_V2 = (
    "ask the admin to delegate a cgroup v2 subtree to you (systemd: `systemd-run --user --scope -p Delegate=yes`, "
    "or Slurm with cgroup/v2 and the controllers in cgroup.conf; see docs/isolation.md)"
)


class _Frozen(Record):
    """The runtime spec's frozen record (value equality, ``replace``), built from
    positional arguments in ``__slots__`` order.  Not a dataclass: importing dataclasses
    (with inspect) costs ≈16 ms of `mesobox run` start-up (see mesobox.config)."""

    __slots__ = ()

    def _set(self, *values: object) -> None:
        names: tuple[str, ...] = type(self).__slots__
        for name, value in zip(names, values, strict=True):
            object.__setattr__(self, name, value)


class Usage(_Frozen):
    """What the container used; ``None`` where the controller was not joined."""

    __slots__ = ("memory_peak_bytes", "cpu_time_ns", "oom_kills", "pids_current")  # noqa: RUF023 - constructor order
    memory_peak_bytes: int | None
    cpu_time_ns: int | None
    oom_kills: int
    pids_current: int | None

    def __init__(
        self, memory_peak_bytes: int | None, cpu_time_ns: int | None, oom_kills: int, pids_current: int | None
    ) -> None:
        self._set(memory_peak_bytes, cpu_time_ns, oom_kills, pids_current)


# --- option parsing --------------------------------------------------------------

def _parse_cpus(text: str) -> tuple[int, int]:
    try:
        cpus = float(text)
    except ValueError:
        raise UsageError(f"bad --cpus value {text!r}", hint="use a number of CPUs like 0.5 or 2") from None
    available = os.cpu_count() or 1
    if not 0.01 <= cpus <= available:
        raise UsageError(f"bad --cpus value {text!r}: must be between 0.01 and {available} (CPUs on this host)")
    period = 100_000
    # CFS quota is in µs per period; the kernel's minimum quota is 1 ms (sched/core.c).
    return max(1000, round(cpus * period)), period


def _parse_cpuset(text: str) -> str:
    value = text.strip()
    for part in value.split(","):
        bounds = part.split("-")
        if not 1 <= len(bounds) <= 2 or not all(b.isdigit() for b in bounds) or int(bounds[0]) > int(bounds[-1]):
            raise UsageError(f"bad --cpuset-cpus value {text!r}", hint="use a CPU list like 0-1 or 0,2")
    return value


def _parse_count(text: str, option: str, what: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise UsageError(f"bad {option} value {text!r}", hint=f"use a whole number of {what}, at least 1")
    return int(text)


def _parse_device_rates(values: list[str], option: str, sizes: bool) -> tuple[tuple[str, int], ...]:
    out = []
    for spec in values:
        device, sep, rate = spec.rpartition(":")
        if not sep or not device or not rate:
            raise UsageError(f"bad {option} value {spec!r}", hint=f"use {option} DEVICE:RATE, e.g. /dev/sda:10mb")
        amount = parse_size(rate, f"{option} rate") if sizes else _parse_count(rate, option, "operations per second")
        out.append((device_number(device, option), amount))
    return tuple(out)


def device_number(device: str, option: str = "device") -> str:
    """``/dev/sda`` or ``8:0`` → ``"8:0"`` (what blkio/io files take)."""
    majmin = device.split(":")
    if len(majmin) == 2 and all(p.isdigit() for p in majmin):
        return device
    try:
        st = os.stat(device)
    except OSError as err:
        raise UsageError(f"{option}: cannot use device {device!r}: {err.strerror}") from None
    import stat as stat_mod

    if not stat_mod.S_ISBLK(st.st_mode):
        raise UsageError(f"{option}: {device!r} is not a block device", hint="name a disk like /dev/sda or MAJ:MIN")
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def parse_resource_options(
    memory: str | None,
    cpus: str | None,
    cpuset: str | None,
    pids: str | None,
    io_read_bps: list[str],
    io_write_bps: list[str],
    io_read_iops: list[str],
    io_write_iops: list[str],
) -> Resources:
    """Docker-style option values → Resources; UsageError on a bad value."""
    memory_bytes = parse_size(memory, "--memory value") if memory is not None else None
    if memory_bytes is not None and memory_bytes < 4 * 1024**2:
        # Below a few MiB even the launcher's own pages get the container OOM-killed.
        raise UsageError(f"--memory {memory!r} is too small", hint="use at least 4m")
    quota, period = _parse_cpus(cpus) if cpus is not None else (None, 100_000)
    return Resources(
        memory_bytes=memory_bytes,
        cpu_quota_us=quota,
        cpu_period_us=period,
        cpuset_cpus=_parse_cpuset(cpuset) if cpuset is not None else None,
        pids_limit=_parse_count(pids, "--pids-limit", "processes") if pids is not None else None,
        io_read_bps=_parse_device_rates(io_read_bps, "--io-read-bps", True),
        io_write_bps=_parse_device_rates(io_write_bps, "--io-write-bps", True),
        io_read_iops=_parse_device_rates(io_read_iops, "--io-read-iops", False),
        io_write_iops=_parse_device_rates(io_write_iops, "--io-write-iops", False),
    )


# --- finding a place -----------------------------------------------------------------


def read_self_cgroup(path: Path = Path("/proc/self/cgroup")) -> dict[str, str]:
    """``/proc/self/cgroup`` → {controller: group}; the v2 group is under key ``""``."""
    groups: dict[str, str] = {}
    for line in path.read_text().splitlines():
        _hid, controllers, group = line.split(":", 2)
        for name in controllers.split(","):
            groups[name.removeprefix("name=")] = group
    return groups


def _writable(directory: Path) -> bool:
    # Creating a child needs write access to the directory; moving a task needs
    # write access to the target's cgroup.procs, which mkdir gives to the creator.
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)


def candidate_parents(base: Path, group: str) -> list[Path]:
    """Where a child may go, best first: own group, the Slurm job's group, the root."""
    own = base / group.lstrip("/")
    found = [own]
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        for parent in [own, *own.parents]:
            if parent.name == f"job_{job}":
                found.append(parent)
                break
            if parent == base:
                break
    found.append(base)
    return found


def _pick_parent(base: Path, group: str) -> Path | None:
    for parent in candidate_parents(base, group):
        if _writable(parent):
            return parent
    return None


def _safe_name(name: str) -> str:
    if not name or name.startswith(".") or not all((c.isascii() and c.isalnum()) or c in "-_." for c in name):
        raise UsageError(f"bad cgroup name {name!r}", hint="use letters, digits, '-', '_' and '.'")
    return f"mesobox-{name}"


def _write(path: Path, value: str) -> None:
    """Write one control file; the kernel reports a rejected value as an OSError."""
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as err:
        raise LaunchError(
            f"cannot set {path.name} = {value!r} in {path.parent}: {err.strerror}",
            hint="check the value against the host's limits (CPUs, devices, parent cgroup limits)",
        ) from None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def _read_keyed(path: Path) -> dict[str, int]:
    """Flat-keyed files like memory.events, cpu.stat, memory.oom_control."""
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


# --- the cgroup ---------------------------------------------------------------------


class Cgroup:
    """A container's cgroup: one directory on v2, one per joined controller on v1."""

    def __init__(self, name: str, version: int, dirs: dict[str, Path]) -> None:
        self.name = name
        self.version = version
        self.dirs = dirs  # v1: controller → dir; v2: {"": dir}
        self.created: list[Path] = []  # what remove() deletes, in creation order

    @classmethod
    def create(
        cls,
        name: str,
        resources: Resources,
        root: Path = CGROUP_ROOT,
        self_cgroup: Path = Path("/proc/self/cgroup"),
    ) -> Cgroup:
        """Make the group, apply the limits; PolicyError when nothing writable."""
        dirname = _safe_name(name)
        groups = read_self_cgroup(self_cgroup)
        if (root / "cgroup.controllers").exists():
            return _create_v2(dirname, resources, root, groups.get("", "/"))
        return _create_v1(dirname, resources, root, groups)

    def add_pid(self, pid: int) -> None:
        """Move a process (and, on v1, nothing else) into every joined group."""
        for path in self.dirs.values():
            _write(path / "cgroup.procs", str(pid))

    def usage(self) -> Usage:
        if self.version == 2:
            return _usage_v2(self.dirs[""])
        return _usage_v1(self.dirs)

    def freeze(self) -> None:
        self._set_frozen(True)

    def thaw(self) -> None:
        self._set_frozen(False)

    def _set_frozen(self, frozen: bool) -> None:
        if self.version == 2:
            target = self.dirs[""]
            _write(target / "cgroup.freeze", "1" if frozen else "0")
            # The kernel reports completion in cgroup.events "frozen 0|1".
            _wait_for(
                lambda: _read_keyed(target / "cgroup.events").get("frozen") == int(frozen),
                "frozen" if frozen else "thawed",
            )
            return
        freezer = self.dirs.get("freezer")
        if freezer is None:
            raise PolicyError("cannot pause: the freezer cgroup controller is not available here", hint=_ADMIN_HINT_V1)
        state = "FROZEN" if frozen else "THAWED"
        _write(freezer / "freezer.state", state)
        # v1 reports FREEZING until every task is frozen (cgroups/freezer-subsystem.rst).
        _wait_for(lambda: (freezer / "freezer.state").read_text().strip() == state, state.lower())

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self.dirs.values():
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
        return sorted(found)

    def remove(self, timeout: float = 2.0) -> None:
        """Wait briefly for the group to empty, kill stragglers, rmdir what we made."""
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.pids():
            self._kill_stragglers()
        for path in reversed(self.created):
            _rmdir_retrying(path)
        self.created.clear()

    def _kill_stragglers(self) -> None:
        # Processes the container left behind (daemons) die with it, as with runc's
        # "kill all on delete"; v2 has cgroup.kill (kernel 5.14) for exactly this.
        if self.version == 2 and (self.dirs[""] / "cgroup.kill").exists():
            _write(self.dirs[""] / "cgroup.kill", "1")
        else:
            if "freezer" in self.dirs:
                self.freeze()  # so none can fork while we kill
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if "freezer" in self.dirs:
                self.thaw()
        _wait_for(lambda: not self.pids(), "empty")


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise LaunchError(f"cgroup did not become {what} within {timeout:.0f} s")
        time.sleep(0.005)


def _rmdir_retrying(path: Path) -> None:
    # The kernel may still hold a just-exited task for a moment (EBUSY).
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as err:
            last = err
            time.sleep(0.02)
    raise LaunchError(f"cannot remove cgroup {path}: {last.strerror}", hint="processes may still be running in it")


# --- cgroup v1 -----------------------------------------------------------------------

_V1_ACCOUNTING = ("memory", "cpuacct", "pids", "freezer")


def _needed(r: Resources, io_controller: str) -> list[str]:
    """Controllers that carry a requested limit (the I/O one is blkio on v1, io on v2)."""
    wanted = {
        "memory": r.memory_bytes,
        "cpu": r.cpu_quota_us,
        "cpuset": r.cpuset_cpus,
        "pids": r.pids_limit,
        io_controller: r.any_io() or None,
    }
    return [controller for controller, value in wanted.items() if value is not None]


def _create_v1(dirname: str, resources: Resources, root: Path, groups: dict[str, str]) -> Cgroup:
    needed = _needed(resources, "blkio")
    cg = Cgroup(dirname, 1, {})
    try:
        for controller in [*needed, *(c for c in _V1_ACCOUNTING if c not in needed)]:
            base = root / controller
            if not (base / "cgroup.procs").exists():
                if controller in needed:
                    raise PolicyError(f"the {controller} cgroup controller is not mounted at {base}")
                continue
            parent = _pick_parent(base, groups.get(controller, "/"))
            if parent is None:
                if controller in needed:
                    raise PolicyError(
                        f"cannot apply the {controller} limit: no writable {controller} cgroup for this user "
                        f"(tried its own group {groups.get(controller, '/')} and the root of {base})",
                        hint=_ADMIN_HINT_V1,
                    )
                continue
            cg.dirs[controller] = _mkdir(cg, parent / dirname)
        if not cg.dirs:
            raise PolicyError(f"no writable cgroup v1 hierarchy under {root}", hint=_ADMIN_HINT_V1)
        _apply_v1(cg.dirs, resources)
    except BaseException:
        cg.remove()
        raise
    return cg


def _mkdir(cg: Cgroup, path: Path) -> Path:
    try:
        path.mkdir()
    except FileExistsError:
        raise LaunchError(f"cgroup {path} already exists", hint="another container uses this name") from None
    except OSError as err:
        raise PolicyError(f"cannot create cgroup {path}: {err.strerror}", hint=_ADMIN_HINT_V1) from None
    cg.created.append(path)
    return path


def _apply_v1(dirs: dict[str, Path], r: Resources) -> None:
    if r.memory_bytes is not None:
        _write(dirs["memory"] / "memory.limit_in_bytes", str(r.memory_bytes))
        # Limit RAM+swap to the same value so the workload is OOM-killed rather than
        # swapped out (Docker's default --memory-swap = 2x; we choose no swap, like
        # Apptainer's --memory without --memory-swap on a swapless HPC node).
        memsw = dirs["memory"] / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            _write(memsw, str(r.memory_bytes))
    if r.cpu_quota_us is not None:
        _write(dirs["cpu"] / "cpu.cfs_period_us", str(r.cpu_period_us))
        _write(dirs["cpu"] / "cpu.cfs_quota_us", str(r.cpu_quota_us))
    if "cpuset" in dirs:
        # A new v1 cpuset starts with empty cpus/mems and refuses tasks until both are set.
        parent = dirs["cpuset"].parent
        _write(dirs["cpuset"] / "cpuset.mems", (parent / "cpuset.mems").read_text().strip())
        cpus = r.cpuset_cpus or (parent / "cpuset.cpus").read_text().strip()
        _write(dirs["cpuset"] / "cpuset.cpus", cpus)
    if r.pids_limit is not None:
        _write(dirs["pids"] / "pids.max", str(r.pids_limit))
    throttles = (
        ("blkio.throttle.read_bps_device", r.io_read_bps),
        ("blkio.throttle.write_bps_device", r.io_write_bps),
        ("blkio.throttle.read_iops_device", r.io_read_iops),
        ("blkio.throttle.write_iops_device", r.io_write_iops),
    )
    for filename, rates in throttles:
        for device, rate in rates:
            _write(dirs["blkio"] / filename, f"{device_number(device)} {rate}")


def _usage_v1(dirs: dict[str, Path]) -> Usage:
    memory = dirs.get("memory")
    peak = _read_int(memory / "memory.max_usage_in_bytes") if memory else None
    # oom_kill in memory.oom_control exists since kernel 4.13.
    ooms = _read_keyed(memory / "memory.oom_control").get("oom_kill", 0) if memory else 0
    cpuacct = dirs.get("cpuacct")
    cpu = _read_int(cpuacct / "cpuacct.usage") if cpuacct else None
    pids = dirs.get("pids")
    return Usage(peak, cpu, ooms, _read_int(pids / "pids.current") if pids else None)


# --- cgroup v2 -----------------------------------------------------------------------


def _create_v2(dirname: str, resources: Resources, root: Path, group: str) -> Cgroup:
    if group.rsplit("/", 1)[-1] == "mesobox-leaf":
        group = group.rsplit("/", 1)[0] or "/"  # an earlier run vacated our group: reuse it
    parent = _pick_parent(root, group)
    if parent is None:
        raise PolicyError(f"no writable cgroup v2 group for this user (own group: {group})", hint=_ADMIN_HINT_V2)
    needed = _needed(resources, "io")
    available = (parent / "cgroup.controllers").read_text().split()
    missing = [c for c in needed if c not in available]
    if missing:
        raise PolicyError(f"cgroup controllers {' '.join(missing)} are not delegated to {parent}", hint=_ADMIN_HINT_V2)
    own = parent == root / group.lstrip("/")
    _enable_controllers(parent, [c for c in ("memory", "pids", "cpu", *needed) if c in available], own)
    cg = Cgroup(dirname, 2, {})
    try:
        cg.dirs[""] = _mkdir(cg, parent / dirname)
        _apply_v2(cg.dirs[""], resources)
    except BaseException:
        cg.remove()
        raise
    return cg


def _enable_controllers(parent: Path, controllers: list[str], own: bool) -> None:
    enabled = (parent / "cgroup.subtree_control").read_text().split()
    for controller in dict.fromkeys(controllers):
        if controller in enabled:
            continue
        try:
            _append(parent / "cgroup.subtree_control", f"+{controller}")
        except OSError as err:
            # EBUSY: the "no internal processes" rule (cgroup-v2.rst): a group holding
            # processes, like the scope mesobox was started in, cannot hand controllers
            # to children.  Move our group's processes into a leaf first, as Docker's
            # dind entrypoint does with /init, then retry once.
            if err.errno != errno.EBUSY or not own:
                raise PolicyError(
                    f"cannot enable the {controller} controller below {parent}: {err.strerror}", hint=_ADMIN_HINT_V2
                ) from None
            _vacate(parent)
            _enable_controllers(parent, controllers, own=False)
            return


def _append(path: Path, value: str) -> None:
    with open(path, "a") as f:
        f.write(value)


def _vacate(parent: Path) -> None:
    """Move every process of ``parent`` (all ours: it is our delegated group) to a leaf."""
    leaf = parent / "mesobox-leaf"  # shared by concurrent mesobox runs, never removed by them
    leaf.mkdir(exist_ok=True)
    for pid in (parent / "cgroup.procs").read_text().split():
        try:
            _append(leaf / "cgroup.procs", pid)
        except ProcessLookupError:
            continue  # exited meanwhile
        except OSError as err:
            raise PolicyError(
                f"cannot move process {pid} out of {parent} to enable controllers: {err.strerror}",
                hint="start mesobox in a delegated group of its own: `systemd-run --user --scope -p Delegate=yes`",
            ) from None


def _apply_v2(directory: Path, r: Resources) -> None:
    if r.memory_bytes is not None:
        _write(directory / "memory.max", str(r.memory_bytes))
        if (directory / "memory.swap.max").exists():
            _write(directory / "memory.swap.max", "0")  # same policy as v1 memsw
    if r.cpu_quota_us is not None:
        _write(directory / "cpu.max", f"{r.cpu_quota_us} {r.cpu_period_us}")
    if r.cpuset_cpus is not None:
        _write(directory / "cpuset.cpus", r.cpuset_cpus)
    if r.pids_limit is not None:
        _write(directory / "pids.max", str(r.pids_limit))
    per_device: dict[str, list[str]] = {}
    for key, rates in (
        ("rbps", r.io_read_bps),
        ("wbps", r.io_write_bps),
        ("riops", r.io_read_iops),
        ("wiops", r.io_write_iops),
    ):
        for device, rate in rates:
            per_device.setdefault(device_number(device), []).append(f"{key}={rate}")
    for device, settings in per_device.items():
        _write(directory / "io.max", f"{device} {' '.join(settings)}")


def _usage_v2(directory: Path) -> Usage:
    # memory.peak appeared in kernel 5.19; older kernels only have memory.current.
    peak = _read_int(directory / "memory.peak")
    if peak is None:
        peak = _read_int(directory / "memory.current")
    cpu = _read_keyed(directory / "cpu.stat").get("usage_usec")
    return Usage(
        memory_peak_bytes=peak,
        cpu_time_ns=cpu * 1000 if cpu is not None else None,
        oom_kills=_read_keyed(directory / "memory.events").get("oom_kill", 0),
        pids_current=_read_int(directory / "pids.current"),
    )


def apply_resources(pid: int, resources: Resources, name: str) -> Cgroup:
    """For the launcher: create the group, apply limits, move ``pid`` in."""
    cg = Cgroup.create(name, resources)
    try:
        cg.add_pid(pid)
    except BaseException:
        cg.remove()
        raise
    return cg
