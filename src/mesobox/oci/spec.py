"""The one model: a container described as the OCI runtime spec describes it.

The shape follows the OCI runtime spec's config.md (``process``, ``root``, ``mounts``,
``hostname``, ``linux``), so the OCI/Slurm side writes and reads ``config.json``
bundles with the same model (``to_oci_json`` / ``from_oci_json``).  mesobox's own
settings that have no OCI field (a squashfs root, --writable-tmpfs, --overlay, the
network mode, the names in the generated /etc/passwd) are typed fields of
``Spec.mesobox`` (``Settings``); only at the JSON boundary do they become
``org.mesobox.*`` annotations, which is what OCI annotations are for.

``Spec.hooks`` holds the OCI hooks (config.md "POSIX-platform Hooks", config.json's
``hooks``).  ``mesobox run`` runs the createContainer and startContainer ones (CDI
devices bring them: launch/cdi.py); program.py refuses the other kinds in one line.

Invariants:
- Records are immutable (``replace`` makes a changed copy) and ``validate()`` checks
  the whole spec before the launcher makes its first syscall.
- Stdlib only, no ``json`` import: every ``mesobox run`` imports this module.
"""

from __future__ import annotations

import os

from mesobox.errors import UsageError
from mesobox.launch import environ
from mesobox.records import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

NAMESPACES = ("user", "mount", "pid", "ipc", "uts", "network", "cgroup")
# config.json annotations that carry Settings across the JSON boundary (to_oci_json).
ANN_FORMAT = "org.mesobox.root.format"
ANN_WRITABLE_TMPFS = "org.mesobox.writable-tmpfs"
ANN_OVERLAY = "org.mesobox.overlay"
ANN_OVERLAY_IMAGE = "org.mesobox.overlay.image"
ANN_SUBIDS = "org.mesobox.subids"
ANN_IMAGE_LOCK = "org.mesobox.image-lock"
ANN_NET = "org.mesobox.net"
ANN_PUBLISH = "org.mesobox.publish"
ANN_USER = "org.mesobox.user"
ANN_GROUP = "org.mesobox.group"
ANN_HOME = "org.mesobox.home"
ANN_SHELL = "org.mesobox.shell"
ANN_USERNS = "org.mesobox.userns"
ANN_IMAGE = "org.mesobox.image"
ANN_DNS = "org.mesobox.dns"
# process.rlimits types mesobox sets (--ulimit's names, as Docker spells them, upper-cased).
RLIMIT_TYPES = ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_LOCKS",
                "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_RSS",
                "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK")
RLIM_INFINITY = 2**64 - 1  # OCI's (uint64) "unlimited"


class User(Record):
    __slots__ = ("additional_gids", "gid", "uid")
    _defaults = {"additional_gids": ()}
    uid: int
    gid: int
    additional_gids: tuple[int, ...]


class Process(Record):
    __slots__ = ("apparmor_profile", "args", "capabilities", "cwd", "env", "no_new_privileges", "oom_score_adj",
                 "rlimits", "selinux_label", "terminal", "umask", "user")
    _defaults = {"terminal": False, "no_new_privileges": True, "rlimits": (), "capabilities": None,
                 "oom_score_adj": None, "umask": None, "apparmor_profile": "", "selinux_label": ""}
    args: tuple[str, ...]
    env: tuple[str, ...]  # "KEY=VALUE", in order
    cwd: str
    user: User
    terminal: bool
    no_new_privileges: bool
    rlimits: tuple[tuple[str, int, int], ...]  # (type, soft, hard)
    capabilities: dict[str, tuple[str, ...]] | None  # OCI sets: bounding, effective, …
    oom_score_adj: int | None  # /proc/self/oom_score_adj of the container's process
    umask: int | None  # process.user.umask; None: the caller's
    apparmor_profile: str  # process.apparmorProfile: the profile execve switches to ("": none)
    selinux_label: str  # process.selinuxLabel: the context execve switches to ("": none)


class Root(Record):
    __slots__ = ("path", "readonly")
    _defaults = {"readonly": True}
    path: str
    readonly: bool


class Mount(Record):
    __slots__ = ("destination", "options", "source", "type")
    _defaults = {"options": ()}
    destination: str
    type: str
    source: str
    options: tuple[str, ...]


class IdMap(Record):
    __slots__ = ("container_id", "host_id", "size")
    container_id: int
    host_id: int
    size: int


class Device(Record):
    """One of ``linux.devices``: a node made in the container's /dev (config-linux.md)."""

    __slots__ = ("file_mode", "gid", "major", "minor", "path", "type", "uid")
    _defaults = {"file_mode": 0o666, "uid": 0, "gid": 0, "major": 0, "minor": 0}
    path: str
    type: str  # "c", "b", "u" (unbuffered character) or "p" (FIFO)
    major: int
    minor: int
    file_mode: int
    uid: int
    gid: int


class Linux(Record):
    __slots__ = (
        "cgroups_path",
        "devices",
        "gid_mappings",
        "masked_paths",
        "namespace_paths",
        "namespaces",
        "readonly_paths",
        "resources",
        "rootfs_propagation",
        "seccomp",
        "sysctl",
        "uid_mappings",
    )
    _defaults = {"namespaces": ("user", "mount"), "uid_mappings": (), "gid_mappings": (), "resources": None,
                 "seccomp": None, "masked_paths": (), "readonly_paths": (), "namespace_paths": (), "sysctl": (),
                 "devices": (), "rootfs_propagation": "", "cgroups_path": None}
    namespaces: tuple[str, ...]  # new namespaces, and those joined (``namespace_paths``)
    namespace_paths: tuple[tuple[str, str], ...]  # (type, path): an existing namespace to join (setns)
    sysctl: tuple[tuple[str, str], ...]  # (key, value), written below /proc/sys in the container
    devices: tuple[Device, ...]
    rootfs_propagation: str  # "", or shared/slave/private/unbindable (r-prefixed too) for the root
    cgroups_path: str | None
    uid_mappings: tuple[IdMap, ...]
    gid_mappings: tuple[IdMap, ...]
    resources: Resources | None
    seccomp: dict[str, Any] | None
    masked_paths: tuple[str, ...]
    readonly_paths: tuple[str, ...]


DeviceRates = tuple[tuple[str, int], ...]


class Resources(Record):
    """OCI runtime-spec ``linux.resources``, the subset mesobox supports.

    io_* entries are (``major:minor`` or ``/dev`` path, bytes/s or operations/s)."""

    # constructor order; kept unsorted on purpose
    __slots__ = ("memory_bytes", "cpu_quota_us", "cpu_period_us", "cpuset_cpus", "pids_limit",  # noqa: RUF023
                 "io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops")
    memory_bytes: int | None
    cpu_quota_us: int | None
    cpu_period_us: int
    cpuset_cpus: str | None
    pids_limit: int | None
    io_read_bps: DeviceRates
    io_write_bps: DeviceRates
    io_read_iops: DeviceRates
    io_write_iops: DeviceRates

    def __init__(
        self,
        memory_bytes: int | None = None,
        cpu_quota_us: int | None = None,
        cpu_period_us: int = 100_000,
        cpuset_cpus: str | None = None,
        pids_limit: int | None = None,
        io_read_bps: DeviceRates = (),
        io_write_bps: DeviceRates = (),
        io_read_iops: DeviceRates = (),
        io_write_iops: DeviceRates = (),
    ) -> None:
        rates = (io_read_bps, io_write_bps, io_read_iops, io_write_iops)
        values = (memory_bytes, cpu_quota_us, cpu_period_us, cpuset_cpus, pids_limit, *map(tuple, rates))
        for name, value in zip(type(self).__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def any_io(self) -> bool:
        return bool(self.io_read_bps or self.io_write_bps or self.io_read_iops or self.io_write_iops)

    def is_empty(self) -> bool:
        return self == Resources(cpu_period_us=self.cpu_period_us)


class Settings(Record):
    """mesobox's own settings, the ones the OCI runtime spec has no field for."""

    __slots__ = ("as_written", "container_id", "dns", "group_name", "home", "identity_files", "image",
                 "image_lock", "net", "overlay", "overlay_image", "publish", "root_format", "shell",
                 "start_fifo", "subids", "user_name", "userns", "writable_tmpfs")
    _defaults = {"root_format": "dir", "userns": "private", "image": None, "dns": (),
                 "image_lock": None, "writable_tmpfs": None, "overlay": None,
                 "overlay_image": None, "subids": False, "net": "host", "publish": (), "user_name": "user",
                 "group_name": "group", "home": "/", "shell": "/bin/sh", "identity_files": True,
                 "container_id": None, "start_fifo": None, "as_written": False}
    root_format: str  # "dir" | "squashfs": root.path is a directory, or a squashfs file to mount
    image_lock: str | None  # the store's lock file, held shared while the container runs
    writable_tmpfs: int | None  # a writable root in a tmpfs of this many bytes (0: tmpfs default)
    overlay: str | None  # a writable root whose changes are kept in this directory
    overlay_image: str | None  # the same, in an ext4 image (a disk quota) that root loop-mounts
    subids: bool  # the id maps hold sub-id ranges: newuidmap/newgidmap write them
    net: str  # "host" | "none" (loopback only) | "slirp" (slirp4netns)
    publish: tuple[tuple[int, int], ...]  # (host port, container port) forwarded by slirp4netns
    user_name: str  # the caller's entry in the generated /etc/passwd and /etc/group
    group_name: str
    home: str
    shell: str
    userns: str  # "private" | "shared": one user namespace for the node's ranks (launch/sharedns.py)
    image: str | None  # what runs, for the launch record: REFERENCE@DIGEST or a path (provenance)
    dns: tuple[str, ...]  # --dns: name servers of a generated /etc/resolv.conf (program.py)
    identity_files: bool  # bind generated /etc/passwd and /etc/group over the image's (False: a build's RUN)
    container_id: str | None  # the OCI state's "id" hooks read (mesobox-oci); None: mesobox-PID
    start_fifo: tuple[int, int] | None  # mesobox-oci create: (FIFO fd read for "start", fd told "created")
    as_written: bool  # an OCI config of another tool's, run as written: its mounts in order (not parents
    # first), its root without the nosuid/nodev mesobox gives an image


HOOK_KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")


class Hook(Record):
    """One OCI hook (config.md "POSIX-platform Hooks"): a program execve'd with exactly
    ``args`` (argv, argv[0] included) and ``env``, the container's state on its stdin."""

    __slots__ = ("args", "env", "path", "timeout")
    _defaults = {"args": (), "env": (), "timeout": None}
    path: str  # absolute: in the runtime's namespace, or the container's (startContainer)
    args: tuple[str, ...]
    env: tuple[str, ...]  # "KEY=VALUE"; nothing else is passed
    timeout: int | None  # seconds before it is killed; None: no limit


class Hooks(Record):
    """The six OCI hook lists, each run in order at its point of the lifecycle."""

    __slots__ = HOOK_KINDS  # the lifecycle's order
    _defaults = dict.fromkeys(HOOK_KINDS, ())
    prestart: tuple[Hook, ...]
    createRuntime: tuple[Hook, ...]  # the OCI field names
    createContainer: tuple[Hook, ...]
    startContainer: tuple[Hook, ...]
    poststart: tuple[Hook, ...]
    poststop: tuple[Hook, ...]

    def kinds(self) -> tuple[str, ...]:
        """The kinds that have hooks, in lifecycle order."""
        return tuple(kind for kind in HOOK_KINDS if getattr(self, kind))


class Spec(Record):
    __slots__ = ("annotations", "hooks", "hostname", "linux", "mesobox", "mounts", "process", "root")
    _defaults = {"mounts": (), "hostname": None, "annotations": {}, "mesobox": Settings(), "hooks": Hooks()}
    process: Process
    root: Root
    mounts: tuple[Mount, ...]
    hostname: str | None
    linux: Linux
    mesobox: Settings
    annotations: dict[str, str]  # other annotations, passed through as OCI has them
    hooks: Hooks  # which of them a launch runs: program.py decides

    def validate(self) -> None:
        """Check the whole spec; UsageError names the first problem."""
        _validate_process(self.process)
        if not self.root.path or not os.path.isabs(self.root.path):
            raise UsageError(f"root path must be absolute: {self.root.path!r}")
        for m in self.mounts:
            _validate_destination(m.destination)
            if m.type == "bind" and not os.path.isabs(m.source):
                raise UsageError(f"bind source must be absolute: {m.source!r}")
        _validate_linux(self.linux)
        if self.hostname is not None and "uts" not in self.linux.namespaces:
            raise UsageError("a hostname needs the uts namespace", hint="add --uts")
        if self.hostname is not None and not 0 < len(self.hostname.encode("utf-8", "surrogateescape")) <= 64:
            raise UsageError(f"bad hostname {self.hostname[:80]!r}: it must be 1 to 64 bytes (HOST_NAME_MAX)")
        for maps in (self.linux.uid_mappings, self.linux.gid_mappings):
            _validate_maps(maps)
        _validate_settings(self.mesobox)
        _validate_hooks(self.hooks)


# sysctl keys a container may set, and the namespace that makes each its own (runc's rule).
_IPC_SYSCTLS = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall", "kernel.shmmax",
                "kernel.shmmni", "kernel.shm_rmid_forced")
PROPAGATIONS = ("shared", "rshared", "slave", "rslave", "private", "rprivate", "unbindable", "runbindable")


def _validate_linux(lx: Linux) -> None:
    seen: set[str] = set()
    for ns in lx.namespaces:
        if ns not in NAMESPACES:
            raise UsageError(f"unknown namespace type {ns!r}", hint="one of " + ", ".join(NAMESPACES))
        if ns in seen:
            raise UsageError(f"namespace {ns!r} is listed twice")
        seen.add(ns)
    if "mount" not in lx.namespaces:
        raise UsageError("mesobox always needs a mount namespace")
    if "user" not in lx.namespaces and os.getuid() != 0:
        raise UsageError("only root may run a container without a user namespace",
                         hint='add {"type": "user"} to linux.namespaces')
    for ns, path in lx.namespace_paths:
        if ns == "user":
            raise UsageError(f"cannot join the user namespace {path!r}: mesobox joins every other kind by path",
                             hint="give the user namespace's mappings instead (linux.uidMappings)")
        if not os.path.isabs(path):
            raise UsageError(f"namespace path must be absolute: {path!r}")
    for key, _ in lx.sysctl:
        _validate_sysctl(key, lx.namespaces)
    if lx.rootfs_propagation and lx.rootfs_propagation not in PROPAGATIONS:
        raise UsageError(f"bad rootfsPropagation {lx.rootfs_propagation!r}", hint="one of " + ", ".join(PROPAGATIONS))
    for dev in lx.devices:
        _validate_destination(dev.path, "device path")
        if dev.type not in ("c", "b", "u", "p"):
            raise UsageError(f"device {dev.path}: bad type {dev.type!r}: c, b, u or p")


def _validate_sysctl(key: str, namespaces: tuple[str, ...]) -> None:
    """runc's rule: a container may set only sysctls of a namespace it has its own of;
    a key is dot-separated names, nothing that could lead out of /proc/sys."""
    if not key or any(not part or part in (".", "..") or "/" in part or "\0" in part for part in key.split(".")):
        raise UsageError(f"bad sysctl key {key[:80]!r}", hint="names separated by dots, e.g. net.ipv4.ip_forward")
    if key in _IPC_SYSCTLS or key.startswith("fs.mqueue."):
        need = "ipc"
    elif key.startswith("net."):
        need = "network"
    elif key in ("kernel.hostname", "kernel.domainname"):
        need = "uts"
    else:
        raise UsageError(f"sysctl {key!r} is not allowed in a container: it is not namespaced")
    if need not in namespaces:
        raise UsageError(f"sysctl {key!r} needs the container's own {need} namespace")


def _validate_hooks(hooks: Hooks) -> None:
    for kind in hooks.kinds():
        for hook in getattr(hooks, kind):
            if not os.path.isabs(hook.path) or any("\0" in text for text in (hook.path, *hook.args)):
                raise UsageError(f"{kind} hook path must be absolute, without NUL: {hook.path!r}")
            if hook.timeout is not None and (type(hook.timeout) is not int or hook.timeout <= 0):
                raise UsageError(f"{kind} hook {hook.path}: timeout must be a positive number of seconds, "
                                 f"not {hook.timeout!r}")
            environ.check(hook.env)


def _validate_settings(m: Settings) -> None:
    if m.root_format not in ("dir", "squashfs"):
        raise UsageError(f"unknown root format {m.root_format!r}: dir or squashfs")
    if m.net not in ("host", "none", "slirp"):
        raise UsageError(f"unknown --net {m.net!r}", hint="use host, none or slirp")
    if m.publish and m.net != "slirp":
        raise UsageError("-p/--publish needs --net slirp")
    if m.writable_tmpfs is not None and m.writable_tmpfs < 0:
        raise UsageError(f"bad --writable-tmpfs size {m.writable_tmpfs}")
    if m.userns not in ("private", "shared"):
        raise UsageError(f"unknown --userns {m.userns!r}", hint="use shared or private")
    for server in m.dns:  # one line each of resolv.conf: nothing that could start another
        if not server or any(c.isspace() for c in server) or "\0" in server:
            raise UsageError(f"bad --dns server {server[:80]!r}", hint="give IP addresses: --dns IP[,IP...]")


def _validate_process(p: Process) -> None:
    if not p.args or not p.args[0]:
        raise UsageError("no command to run", hint="the image has no Entrypoint/Cmd: give a command")
    if not os.path.isabs(p.cwd):
        raise UsageError(f"working directory must be absolute: {p.cwd!r}")
    environ.check(p.env)
    kinds: set[str] = set()
    for kind, soft, hard in p.rlimits:
        if kind not in RLIMIT_TYPES:
            raise UsageError(f"unknown rlimit type {kind!r}")
        if kind in kinds:
            raise UsageError(f"rlimit {kind} is set twice")
        kinds.add(kind)
        if not 0 <= soft <= hard <= RLIM_INFINITY:
            raise UsageError(f"bad {kind} limit {soft}:{hard}: the soft limit must not exceed the hard one")
    if p.capabilities is not None:
        from mesobox.isolation.caps import check_sets

        check_sets(p.capabilities)
    if p.oom_score_adj is not None and not -1000 <= p.oom_score_adj <= 1000:
        raise UsageError(f"bad oomScoreAdj {p.oom_score_adj}: it must be between -1000 and 1000")
    if p.umask is not None and not 0 <= p.umask <= 0o777:
        raise UsageError(f"bad umask {p.umask:o}")


def _validate_destination(dest: str, what: str = "mount destination") -> None:
    if not os.path.isabs(dest):
        raise UsageError(f"{what} must be absolute: {dest!r}")
    if ".." in dest.split("/"):
        raise UsageError(f"{what} must not contain '..': {dest!r}")


def _validate_maps(maps: tuple[IdMap, ...]) -> None:
    spans = sorted((m.container_id, m.container_id + m.size) for m in maps)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):  # noqa: RUF007 - no itertools import
        if start < end:
            raise UsageError("overlapping id mappings")
    for m in maps:
        if m.size < 1 or m.container_id < 0 or m.host_id < 0:
            raise UsageError(f"bad id mapping {m!r}")


# --- OCI config.json ------------------------------------------------------------------


def to_oci_json(spec: Spec) -> dict[str, Any]:
    """The spec as an OCI runtime config.json object (json.dump it)."""
    p = spec.process
    process: dict[str, Any] = {
        "terminal": p.terminal,
        "user": {"uid": p.user.uid, "gid": p.user.gid, "additionalGids": list(p.user.additional_gids)},
        "args": list(p.args), "env": list(p.env), "cwd": p.cwd,
        "noNewPrivileges": p.no_new_privileges,
        "rlimits": [{"type": t, "soft": s, "hard": h} for t, s, h in p.rlimits],
    }
    if p.capabilities is not None:
        process["capabilities"] = {k: list(v) for k, v in p.capabilities.items()}
    if p.oom_score_adj is not None:
        process["oomScoreAdj"] = p.oom_score_adj
    if p.umask is not None:
        process["user"]["umask"] = p.umask
    if p.apparmor_profile:
        process["apparmorProfile"] = p.apparmor_profile
    if p.selinux_label:
        process["selinuxLabel"] = p.selinux_label
    linux: dict[str, Any] = {
        "namespaces": [{"type": ns} for ns in spec.linux.namespaces],
        "uidMappings": [_map_json(m) for m in spec.linux.uid_mappings],
        "gidMappings": [_map_json(m) for m in spec.linux.gid_mappings],
        "maskedPaths": list(spec.linux.masked_paths), "readonlyPaths": list(spec.linux.readonly_paths),
    }
    for ns, path in spec.linux.namespace_paths:
        next(item for item in linux["namespaces"] if item["type"] == ns)["path"] = path
    if spec.linux.sysctl:
        linux["sysctl"] = dict(spec.linux.sysctl)
    if spec.linux.devices:
        linux["devices"] = [{"path": d.path, "type": d.type, "major": d.major, "minor": d.minor,
                             "fileMode": d.file_mode, "uid": d.uid, "gid": d.gid} for d in spec.linux.devices]
    if spec.linux.rootfs_propagation:
        linux["rootfsPropagation"] = spec.linux.rootfs_propagation
    if spec.linux.cgroups_path is not None:
        linux["cgroupsPath"] = spec.linux.cgroups_path
    if spec.linux.resources is not None:
        linux["resources"] = _resources_json(spec.linux.resources)
    if spec.linux.seccomp is not None:
        linux["seccomp"] = spec.linux.seccomp
    doc: dict[str, Any] = {
        "ociVersion": "1.0.2", "process": process,
        "root": {"path": spec.root.path, "readonly": spec.root.readonly},
        "mounts": [{"destination": m.destination, "type": m.type, "source": m.source, "options": list(m.options)}
                   for m in spec.mounts],
        "linux": linux, "annotations": {**spec.annotations, **_settings_json(spec.mesobox)},
    }
    if spec.hostname is not None:
        doc["hostname"] = spec.hostname
    if spec.hooks.kinds():
        doc["hooks"] = hooks_json(spec.hooks)
    return doc


def bind_sources(spec: Spec) -> dict[str, str]:
    """destination → source of the spec's bind mounts: what lies outside the container."""
    return {m.destination: m.source for m in spec.mounts if m.type == "bind" or {"bind", "rbind"} & set(m.options)}


def hooks_json(hooks: Hooks) -> dict[str, list[dict[str, Any]]]:
    """config.json's "hooks": only the kinds that have some."""
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in hooks.kinds():
        out[kind] = []
        for hook in getattr(hooks, kind):
            item: dict[str, Any] = {"path": hook.path}
            if hook.args:
                item["args"] = list(hook.args)
            if hook.env:
                item["env"] = list(hook.env)
            if hook.timeout is not None:
                item["timeout"] = hook.timeout
            out[kind].append(item)
    return out


def _settings_json(m: Settings) -> dict[str, str]:
    out = {ANN_FORMAT: m.root_format, ANN_USER: m.user_name, ANN_GROUP: m.group_name, ANN_HOME: m.home,
           ANN_SHELL: m.shell}
    optional = {ANN_IMAGE_LOCK: m.image_lock, ANN_OVERLAY: m.overlay, ANN_OVERLAY_IMAGE: m.overlay_image,
                ANN_WRITABLE_TMPFS: None if m.writable_tmpfs is None else str(m.writable_tmpfs),
                ANN_SUBIDS: "1" if m.subids else None, ANN_NET: None if m.net == "host" else m.net,
                ANN_PUBLISH: ",".join(f"{h}:{c}" for h, c in m.publish) or None,
                ANN_USERNS: None if m.userns == "private" else m.userns, ANN_IMAGE: m.image,
                ANN_DNS: ",".join(m.dns) or None}
    out.update((k, v) for k, v in optional.items() if v is not None)
    return out


def _settings_from(annotations: dict[str, str]) -> tuple[Settings, dict[str, str]]:
    """Settings read back from a config.json's annotations, and the other annotations."""
    ann = {str(k): str(v) for k, v in annotations.items()}
    take = ann.pop
    tmpfs = take(ANN_WRITABLE_TMPFS, None)
    publish = take(ANN_PUBLISH, "")
    settings = Settings(
        root_format=take(ANN_FORMAT, "dir"), image_lock=take(ANN_IMAGE_LOCK, None),
        writable_tmpfs=None if tmpfs is None else int(tmpfs), overlay=take(ANN_OVERLAY, None),
        overlay_image=take(ANN_OVERLAY_IMAGE, None), subids=take(ANN_SUBIDS, "") == "1",
        net=take(ANN_NET, "host"),
        publish=tuple((int(h), int(c)) for h, _, c in (p.partition(":") for p in publish.split(",") if p)),
        user_name=take(ANN_USER, "user"), group_name=take(ANN_GROUP, "group"), home=take(ANN_HOME, "/"),
        shell=take(ANN_SHELL, "/bin/sh"), userns=take(ANN_USERNS, "private"), image=take(ANN_IMAGE, None),
        dns=tuple(server for server in take(ANN_DNS, "").split(",") if server))
    return settings, ann


def _map_json(m: IdMap) -> dict[str, int]:
    return {"containerID": m.container_id, "hostID": m.host_id, "size": m.size}


def _resources_json(r: Resources) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if r.memory_bytes is not None:
        out["memory"] = {"limit": r.memory_bytes}
    cpu: dict[str, Any] = {}
    if r.cpu_quota_us is not None:
        cpu.update(quota=r.cpu_quota_us, period=r.cpu_period_us)
    if r.cpuset_cpus is not None:
        cpu["cpus"] = r.cpuset_cpus
    if cpu:
        out["cpu"] = cpu
    if r.pids_limit is not None:
        out["pids"] = {"limit": r.pids_limit}
    return out


def from_oci_json(doc: dict[str, Any]) -> Spec:
    """Read an OCI config.json object back into a Spec (UsageError when malformed)."""
    try:
        return _from_oci(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UsageError(f"malformed OCI runtime config: {err!r}") from None


def _from_oci(doc: dict[str, Any]) -> Spec:
    p, lx = doc["process"], doc.get("linux", {})
    u = p.get("user", {})
    caps = p.get("capabilities")
    process = Process(
        args=tuple(p["args"]), env=tuple(p.get("env", ())), cwd=p.get("cwd", "/"),
        user=User(uid=int(u.get("uid", 0)), gid=int(u.get("gid", 0)),
                  additional_gids=tuple(u.get("additionalGids") or ())),
        terminal=bool(p.get("terminal", False)), no_new_privileges=bool(p.get("noNewPrivileges", True)),
        rlimits=tuple((r["type"], int(r["soft"]), int(r["hard"])) for r in p.get("rlimits") or ()),
        capabilities={k: tuple(v or ()) for k, v in caps.items()} if caps is not None else None,
        oom_score_adj=None if p.get("oomScoreAdj") is None else int(p["oomScoreAdj"]),
        umask=None if u.get("umask") is None else int(u["umask"]),
        apparmor_profile=str(p.get("apparmorProfile") or ""), selinux_label=str(p.get("selinuxLabel") or ""),
    )
    namespaces = lx.get("namespaces", ({"type": "user"}, {"type": "mount"}))
    linux = Linux(
        namespaces=tuple(str(ns["type"]) for ns in namespaces),
        namespace_paths=tuple((str(ns["type"]), str(ns["path"])) for ns in namespaces if ns.get("path")),
        sysctl=tuple((str(k), str(v)) for k, v in (lx.get("sysctl") or {}).items()),
        devices=tuple(_device_from(d) for d in lx.get("devices") or ()),
        rootfs_propagation=str(lx.get("rootfsPropagation") or ""),
        cgroups_path=lx.get("cgroupsPath"),
        uid_mappings=tuple(_map_from(m) for m in lx.get("uidMappings") or ()),
        gid_mappings=tuple(_map_from(m) for m in lx.get("gidMappings") or ()),
        resources=_resources_from(lx.get("resources")),
        seccomp=lx.get("seccomp"),
        masked_paths=tuple(lx.get("maskedPaths") or ()), readonly_paths=tuple(lx.get("readonlyPaths") or ()),
    )
    mounts = tuple(Mount(destination=m["destination"], type=m.get("type", "bind"), source=m.get("source", ""),
                         options=tuple(m.get("options") or ())) for m in doc.get("mounts") or ())
    root = doc["root"]
    settings, annotations = _settings_from(doc.get("annotations") or {})
    return Spec(process=process, root=Root(path=root["path"], readonly=bool(root.get("readonly", True))),
                mounts=mounts, hostname=doc.get("hostname"), linux=linux, mesobox=settings,
                annotations=annotations, hooks=_hooks_from(doc.get("hooks") or {}))


def _hooks_from(doc: dict[str, Any]) -> Hooks:
    unknown = set(doc) - set(HOOK_KINDS)
    if unknown:
        raise ValueError(f"unknown hook kind {sorted(unknown)[0]!r}")
    return Hooks(**{kind: tuple(_hook_from(h) for h in doc[kind] or ()) for kind in doc})


def _hook_from(h: dict[str, Any]) -> Hook:
    timeout = h.get("timeout")
    if not isinstance(h["path"], str) or (timeout is not None and type(timeout) is not int):
        raise ValueError(f"bad hook {h!r}")
    return Hook(path=h["path"], args=tuple(str(a) for a in h.get("args") or ()),
                env=tuple(str(e) for e in h.get("env") or ()), timeout=timeout)


def _device_from(d: dict[str, Any]) -> Device:
    mode = d.get("fileMode")
    return Device(path=str(d["path"]), type=str(d["type"]), major=int(d.get("major") or 0),
                  minor=int(d.get("minor") or 0), file_mode=0o666 if mode is None else int(mode) & 0o7777,
                  uid=int(d.get("uid") or 0), gid=int(d.get("gid") or 0))


def _map_from(m: dict[str, Any]) -> IdMap:
    return IdMap(container_id=int(m["containerID"]), host_id=int(m["hostID"]), size=int(m["size"]))


def _resources_from(r: dict[str, Any] | None) -> Resources | None:
    """The limits mesobox sets; None where there are none (runc spec's device rules alone)."""
    if not r:
        return None
    cpu = r.get("cpu") or {}
    resources = Resources(
        memory_bytes=(r.get("memory") or {}).get("limit"),
        cpu_quota_us=cpu.get("quota"), cpu_period_us=cpu.get("period") or 100_000,
        cpuset_cpus=cpu.get("cpus"), pids_limit=(r.get("pids") or {}).get("limit"),
    )
    return None if resources.is_empty() else resources
