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
    __slots__ = ("args", "capabilities", "cwd", "env", "no_new_privileges", "rlimits", "terminal", "user")
    _defaults = {"terminal": False, "no_new_privileges": True, "rlimits": (), "capabilities": None}
    args: tuple[str, ...]
    env: tuple[str, ...]  # "KEY=VALUE", in order
    cwd: str
    user: User
    terminal: bool
    no_new_privileges: bool
    rlimits: tuple[tuple[str, int, int], ...]  # (type, soft, hard)
    capabilities: dict[str, tuple[str, ...]] | None  # OCI sets: bounding, effective, …


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


class Linux(Record):
    __slots__ = (
        "gid_mappings",
        "masked_paths",
        "namespaces",
        "readonly_paths",
        "resources",
        "seccomp",
        "uid_mappings",
    )
    _defaults = {"namespaces": ("user", "mount"), "uid_mappings": (), "gid_mappings": (), "resources": None,
                 "seccomp": None, "masked_paths": (), "readonly_paths": ()}
    namespaces: tuple[str, ...]
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

    __slots__ = ("container_id", "dns", "group_name", "home", "identity_files", "image", "image_lock", "net",
                 "overlay", "overlay_image", "publish", "root_format", "shell", "start_fifo", "subids",
                 "user_name", "userns", "writable_tmpfs")
    _defaults = {"root_format": "dir", "userns": "private", "image": None, "dns": (),
                 "image_lock": None, "writable_tmpfs": None, "overlay": None,
                 "overlay_image": None, "subids": False, "net": "host", "publish": (), "user_name": "user",
                 "group_name": "group", "home": "/", "shell": "/bin/sh", "identity_files": True,
                 "container_id": None, "start_fifo": None}
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
        for ns in self.linux.namespaces:
            if ns not in NAMESPACES:
                raise UsageError(f"unknown namespace {ns!r}")
        if "user" not in self.linux.namespaces or "mount" not in self.linux.namespaces:
            raise UsageError("mesobox always needs the user and mount namespaces")
        if self.hostname is not None and "uts" not in self.linux.namespaces:
            raise UsageError("a hostname needs the uts namespace", hint="add --uts")
        if self.hostname is not None and not 0 < len(self.hostname.encode("utf-8", "surrogateescape")) <= 64:
            raise UsageError(f"bad hostname {self.hostname[:80]!r}: it must be 1 to 64 bytes (HOST_NAME_MAX)")
        for maps in (self.linux.uid_mappings, self.linux.gid_mappings):
            _validate_maps(maps)
        _validate_settings(self.mesobox)
        _validate_hooks(self.hooks)


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
    for kind, soft, hard in p.rlimits:
        if kind not in RLIMIT_TYPES:
            raise UsageError(f"unknown rlimit type {kind!r}")
        if not 0 <= soft <= hard <= RLIM_INFINITY:
            raise UsageError(f"bad {kind} limit {soft}:{hard}: the soft limit must not exceed the hard one")


def _validate_destination(dest: str) -> None:
    if not os.path.isabs(dest):
        raise UsageError(f"mount destination must be absolute: {dest!r}")
    if ".." in dest.split("/"):
        raise UsageError(f"mount destination must not contain '..': {dest!r}")


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
    linux: dict[str, Any] = {
        "namespaces": [{"type": ns} for ns in spec.linux.namespaces],
        "uidMappings": [_map_json(m) for m in spec.linux.uid_mappings],
        "gidMappings": [_map_json(m) for m in spec.linux.gid_mappings],
        "maskedPaths": list(spec.linux.masked_paths), "readonlyPaths": list(spec.linux.readonly_paths),
    }
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
        capabilities={k: tuple(v) for k, v in caps.items()} if caps else None,
    )
    linux = Linux(
        namespaces=tuple(ns["type"] for ns in lx.get("namespaces", ({"type": "user"}, {"type": "mount"}))),
        uid_mappings=tuple(_map_from(m) for m in lx.get("uidMappings") or ()),
        gid_mappings=tuple(_map_from(m) for m in lx.get("gidMappings") or ()),
        resources=_resources_from(lx["resources"]) if lx.get("resources") else None,
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


def _map_from(m: dict[str, Any]) -> IdMap:
    return IdMap(container_id=int(m["containerID"]), host_id=int(m["hostID"]), size=int(m["size"]))


def _resources_from(r: dict[str, Any]) -> Resources:
    cpu = r.get("cpu") or {}
    return Resources(
        memory_bytes=(r.get("memory") or {}).get("limit"),
        cpu_quota_us=cpu.get("quota"), cpu_period_us=cpu.get("period") or 100_000,
        cpuset_cpus=cpu.get("cpus"), pids_limit=(r.get("pids") or {}).get("limit"),
    )
