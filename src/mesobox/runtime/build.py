"""Spec-building room: image config + command-line options → ``spec.Spec``.

Invariants:
- Pure: no syscalls beyond reading the image (config, /etc files) and stat()ing
  bind sources; everything it decides is visible in the spec (``--debug`` prints it).
- Docker semantics for ``run`` (ARGS replace Cmd; Entrypoint kept unless
  ``--entrypoint``, which also drops the image Cmd, as ``docker run`` does); ``exec``
  runs CMD directly; ``shell`` runs /bin/bash, else /bin/sh.  A plain directory or
  squashfs image has an empty config: its default command is /bin/sh (Apptainer's).
- Capabilities (caps.py): Docker's default set for uid 0 inside, none otherwise;
  real root's container root is shifted to a sub-id range unless ``--host-root``.
- Default binds (unless ``--contain``): $HOME, the working directory (when it is not
  a system directory the image provides), /tmp, then config.default_binds; then the
  user's -B binds.  Only -B sources are checked against allowed_bind_sources.
"""

from __future__ import annotations

import os

from mesobox.errors import ImageNotFound, PolicyError, UsageError
from mesobox.runtime import probe
from mesobox.runtime import spec as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mesobox.config import Config

SQUASHFS_MAGIC = b"hsqs"
NO_CAPABILITIES: dict[str, tuple[str, ...]] = {"bounding": (), "effective": (), "permitted": ()}
# Working directories never bound over the image: the image's own software lives there.
SYSTEM_DIRS = ("bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "opt", "proc", "run", "sbin",
               "sys", "usr", "var")


class RunOptions(S._Record):
    """What the CLI parsed; defaults are mesobox's documented defaults (docs/running.md)."""

    __slots__ = (
        "args",
        "binds",
        "cap_add",
        "cap_drop",
        "cleanenv",
        "contain",
        "cpus",
        "cpuset_cpus",
        "entrypoint",
        "env",
        "env_files",
        "fakeroot",
        "host_root",
        "hostname",
        "image",
        "io_read_bps",
        "io_read_iops",
        "io_write_bps",
        "io_write_iops",
        "ipc",
        "memory",
        "mode",
        "net",
        "overlay",
        "pid",
        "pids_limit",
        "security_opts",
        "uts",
        "workdir",
        "writable_tmpfs",
    )
    _defaults = {"args": (), "entrypoint": None, "binds": (), "contain": False, "cleanenv": False, "env": (),
                 "env_files": (), "workdir": None, "fakeroot": False, "writable_tmpfs": None, "overlay": None,
                 "pid": False, "ipc": False, "uts": False, "hostname": None, "net": None, "memory": None,
                 "cpus": None, "pids_limit": None, "security_opts": (), "cap_add": (), "cap_drop": (),
                 "host_root": False, "cpuset_cpus": None, "io_read_bps": (), "io_write_bps": (),
                 "io_read_iops": (), "io_write_iops": ()}
    mode: str
    image: str
    args: tuple[str, ...]
    entrypoint: str | None
    binds: tuple[str, ...]
    contain: bool
    cleanenv: bool
    env: tuple[str, ...]
    env_files: tuple[str, ...]
    workdir: str | None
    fakeroot: bool
    host_root: bool  # real root only: container root is host root (no id shift)
    writable_tmpfs: int | None  # bytes; 0 = tmpfs default size
    overlay: str | None
    pid: bool
    ipc: bool
    uts: bool
    hostname: str | None
    net: str | None
    memory: str | None
    cpus: str | None
    pids_limit: str | None
    cpuset_cpus: str | None
    io_read_bps: tuple[str, ...]
    io_write_bps: tuple[str, ...]
    io_read_iops: tuple[str, ...]
    io_write_iops: tuple[str, ...]
    security_opts: tuple[str, ...]
    cap_add: tuple[str, ...]
    cap_drop: tuple[str, ...]


class Image(S._Record):
    __slots__ = ("config", "format", "path", "reference")
    format: str  # "dir" | "squashfs"
    path: str
    config: dict[str, Any]
    reference: str


# --- image -------------------------------------------------------------------------------


def is_squashfs(path: str) -> bool:
    if path.endswith((".sqfs", ".squashfs")):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == SQUASHFS_MAGIC
    except OSError:
        return False


def resolve_image(text: str, config: Config) -> Image:
    """A directory, a squashfs file, a stored reference, or docker://… (pulled if missing)."""
    if probe.isdir(text):
        return Image(format="dir", path=probe.abspath(text), config={}, reference=text)
    if probe.file_identity(text) is not None:  # the same file: the same squashfs tree
        if not is_squashfs(text):
            raise UsageError(f"{text} is neither a directory nor a squashfs image")
        return Image(format="squashfs", path=probe.abspath(text), config={}, reference=text)
    if text.startswith(("/", "./", "../")) or text.endswith((".sqfs", ".squashfs")):
        raise ImageNotFound(f"no such image file or directory: {text}")
    from mesobox.image.store import Store

    store = Store(config)
    record = store.lookup(text)
    if record is None and text.startswith("docker://"):
        from mesobox.image.pull import pull
        from mesobox.runtime import hold_signals, release_signals

        probe.untracked()  # pulled by this launch: the next one records the stored image
        release_signals()  # a pull may take minutes: Ctrl-C must still stop it
        record = pull(config, text, fmt=config.default_format, quiet=False)
        hold_signals()
    if record is None:
        raise ImageNotFound(f"image {text!r} is not in the store", hint=f"run `mesobox pull {text}` first")
    path = record.rootfs or record.squashfs
    if path is None:
        raise ImageNotFound(f"image {text!r} has no rootfs or squashfs", hint=f"run `mesobox pull {text}` again")
    fmt = "dir" if record.rootfs else "squashfs"
    _note_record(store, text, record.digest)
    return Image(format=fmt, path=str(path), config=dict(record.config or {}), reference=record.reference)


def _note_record(store: Any, text: str, digest: str) -> None:
    """What Store.lookup read, as questions a launch plan asks again: which store's
    record file names the image (the same file is the same record: digest and config),
    and whether that store holds its rootfs or squashfs (and which squashfs file)."""
    from mesobox.image.reference import parse_reference

    reference = str(parse_reference(text))
    for root in (*store.ro_roots, store.root):
        if probe.file_identity(str(store.record_path(reference, root))) is not None:
            if not probe.isdir(str(store.rootfs_path(digest, root))):
                probe.file_identity(str(store.squashfs_path(digest, root)))
            return


# --- command --------------------------------------------------------------------------------


def command(opts: RunOptions, image_config: dict[str, Any], has_bash: bool) -> tuple[str, ...]:
    if opts.mode == "exec":
        if not opts.args:
            raise UsageError("exec needs a command", hint="mesobox exec IMAGE CMD [ARGS...]")
        return opts.args
    if opts.mode == "shell":
        return ("/bin/bash" if has_bash else "/bin/sh", *opts.args)
    if opts.entrypoint is not None:
        entry = [opts.entrypoint] if opts.entrypoint else []
        cmd = list(opts.args)  # docker run --entrypoint clears the image Cmd
    else:
        entry = list(image_config.get("Entrypoint") or [])
        cmd = list(opts.args) or list(image_config.get("Cmd") or [])
    argv = entry + cmd
    if not argv and not image_config:
        argv = ["/bin/sh"]
    if not argv:
        raise UsageError("the image has no Entrypoint or Cmd", hint="give a command after the image")
    return tuple(argv)


# --- binds --------------------------------------------------------------------------------


def parse_bind(text: str) -> list[tuple[str, str, bool]]:
    """``SRC[:DST[:ro|rw]]``, comma-separated lists allowed → [(src, dst, readonly)]."""
    out = []
    for item in text.split(","):
        parts = item.split(":")
        if not item or len(parts) > 3 or not parts[0]:
            raise UsageError(f"bad bind spec {item!r}", hint="use -B SRC[:DST[:ro|rw]]")
        src = parts[0]
        dst = parts[1] if len(parts) > 1 and parts[1] else src
        mode = parts[2] if len(parts) == 3 else "rw"
        if mode not in ("ro", "rw"):
            raise UsageError(f"bad bind mode {mode!r} in {item!r}", hint="the mode is ro or rw")
        if not os.path.isabs(dst) or ".." in dst.split("/") or os.path.normpath(dst) == "/":
            raise UsageError(f"bad bind destination {dst!r}", hint="use an absolute path other than /")
        out.append((src, os.path.normpath(dst), mode == "ro"))
    return out


def check_source(src: str, allowed: tuple[str, ...], user_bind: bool) -> str:
    if not probe.exists(src):
        raise UsageError(f"bind source {src} does not exist")
    real = probe.realpath(src)
    if user_bind and allowed and not any(_under(real, probe.realpath(a)) for a in allowed):
        raise PolicyError(f"bind source {src} is outside the allowed sources",
                          hint="the site allows: " + ", ".join(allowed))
    return real


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def bind_mounts(opts: RunOptions, config: Config, cwd: str, home: str) -> tuple[S.Mount, ...]:
    binds: list[tuple[str, str, bool, bool]] = []
    if not opts.contain:
        for path in (home, "/tmp"):
            if path and probe.isdir(path):
                binds.append((path, path, False, False))
        if cwd != "/" and cwd.split("/")[1] not in SYSTEM_DIRS and not any(_under(cwd, b[1]) for b in binds):
            binds.append((cwd, cwd, False, False))
        for text in config.default_binds:
            binds += [(s, d, ro, False) for s, d, ro in parse_bind(text)]
    for text in opts.binds:
        binds += [(s, d, ro, True) for s, d, ro in parse_bind(text)]
    mounts = []
    for src, dst, ro, user_bind in binds:
        real = check_source(src, tuple(config.allowed_bind_sources), user_bind)
        options = ("rbind", "nosuid", "nodev", "ro" if ro else "rw")
        mounts.append(S.Mount(destination=dst, type="bind", source=real, options=options))
    return tuple(mounts)


def system_mounts(opts: RunOptions) -> tuple[S.Mount, ...]:
    """/proc, /sys, a minimal /dev, /dev/pts, /dev/shm, /tmp (runtime-spec's defaults,
    with host device nodes bound as rootless runc does: mknod is not allowed)."""
    proc = (S.Mount(destination="/proc", type="proc", source="proc", options=("nosuid", "nodev", "noexec"))
            if opts.pid else S.Mount(destination="/proc", type="bind", source="/proc", options=("rbind",)))
    mounts = [proc,
              S.Mount(destination="/sys", type="bind", source="/sys", options=("rbind", "nosuid", "nodev", "ro")),
              S.Mount(destination="/dev", type="tmpfs", source="tmpfs",
                      options=("nosuid", "noexec", "mode=755", "size=65536k"))]
    # Plain binds: nosuid/noexec would cost a remount each and mean nothing on a
    # character device (execve(2) refuses it whatever the mount flags).
    for node in ("null", "zero", "full", "random", "urandom", "tty"):
        mounts.append(S.Mount(destination=f"/dev/{node}", type="bind", source=f"/dev/{node}", options=("bind",)))
    mounts.append(S.Mount(destination="/dev/pts", type="devpts", source="devpts",
                          options=("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=620")))
    mounts.append(S.Mount(destination="/dev/shm", type="tmpfs", source="shm",
                          options=("nosuid", "nodev", "mode=1777")))
    if opts.contain:
        mounts.append(S.Mount(destination="/tmp", type="tmpfs", source="tmpfs",
                              options=("nosuid", "nodev", "mode=1777")))
    for name in ("/etc/hosts", "/etc/resolv.conf"):
        if probe.isfile(name):
            mounts.append(S.Mount(destination=name, type="bind", source=probe.realpath(name),
                                  options=("bind", "nosuid", "nodev", "ro")))
    return tuple(mounts)


# --- the spec ---------------------------------------------------------------------------------


def parse_size(text: str, option: str) -> int:
    units = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    low = text.strip().lower().removesuffix("ib").removesuffix("b") if text else ""
    number, unit = (low[:-1], low[-1]) if low and low[-1] in units else (low, "")
    if not number.isdigit() or int(number) == 0:
        raise UsageError(f"bad size {text!r} for {option}", hint="use e.g. 512m or 2g")
    return int(number) * units[unit]


def resolve_user(text: str, image: Image) -> tuple[int, int]:
    """Image ``User`` ("name", "uid", "uid:gid", "name:group") → ids, read from the image."""
    name, _, group = text.partition(":")
    passwd = _image_file(image, "etc/passwd") if not name.isdigit() or (group and not group.isdigit()) else ""
    uid = int(name) if name.isdigit() else _lookup(passwd, name, 2, "user")
    gid = 0
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) > 3 and (fields[0] == name or fields[2] == str(uid)) and fields[3].isdigit():
            gid = int(fields[3])
    if group:
        gid = int(group) if group.isdigit() else _lookup(_image_file(image, "etc/group"), group, 2, "group")
    return uid, gid


def _lookup(text: str, name: str, column: int, what: str) -> int:
    for line in text.splitlines():
        fields = line.split(":")
        if fields[0] == name and len(fields) > column and fields[column].isdigit():
            return int(fields[column])
    raise UsageError(f"the image's User {name!r} is not a {what} in its /etc files")


def _image_file(image: Image, rel: str) -> str:
    if image.format == "dir":
        return probe.image_text(image.path, rel)
    import subprocess

    proc = subprocess.run(["unsquashfs", "-cat", image.path, rel], capture_output=True, check=False)
    return proc.stdout.decode("utf-8", "replace") if proc.returncode == 0 else ""


def _shell(opts: RunOptions, image: Image) -> tuple[str, ...]:
    if image.format == "dir":
        return command(opts, image.config, probe.image_exists(image.path, "bin/bash"))
    # Not mounted yet: let the container's own sh pick bash when it has one.
    pick = 'if [ -x /bin/bash ]; then exec /bin/bash "$@"; fi; exec /bin/sh "$@"'
    return ("/bin/sh", "-c", pick, "sh", *opts.args)


def _cwd(opts: RunOptions, mounts: tuple[S.Mount, ...], image_config: dict[str, Any]) -> str:
    if opts.workdir:
        return opts.workdir
    here = probe.getcwd()
    if here and any(m.type == "bind" and m.source == m.destination and _under(here, m.destination)
                    for m in mounts):
        return here
    return str(image_config.get("WorkingDir") or "/")


def _namespaces(opts: RunOptions) -> tuple[str, ...]:
    ns = ["user", "mount"]
    ns += [name for name, on in (("pid", opts.pid), ("ipc", opts.ipc), ("uts", opts.uts or bool(opts.hostname)),
                                 ("network", opts.net in ("none", "slirp"))) if on]
    return tuple(ns)


def _seccomp(opts: RunOptions) -> dict[str, Any] | None:
    value = None
    for item in opts.security_opts:
        key, _, val = item.partition("=")
        if key == "seccomp":
            value = val
        elif key not in ("no-new-privileges", "no-new-privileges:true"):
            raise UsageError(f"unsupported --security-opt {item!r}", hint="supported: seccomp=default|unconfined|FILE")
    if value is None:
        # Docker's choice: a default filter denying what containers never need (kexec,
        # bpf, keyctl, …; see seccomp.DEFAULT_DENIED), unless seccomp=unconfined.
        return {"mesobox.builtin": True}
    from mesobox.runtime.seccomp import profile_from_option

    if value not in ("default", "unconfined"):
        probe.untracked()  # a profile file's content is not recorded (plancache.py)
    profile = profile_from_option(value)
    if profile is None:
        return {"mesobox.builtin": True}
    return None if profile.get("unconfined") else profile


def _resources(opts: RunOptions) -> Any:
    io = (opts.io_read_bps, opts.io_write_bps, opts.io_read_iops, opts.io_write_iops)
    if opts.memory is None and opts.cpus is None and opts.pids_limit is None and opts.cpuset_cpus is None \
            and not any(io):
        return None
    from mesobox.runtime.cgroups import parse_resource_options

    return parse_resource_options(opts.memory, opts.cpus, opts.cpuset_cpus, opts.pids_limit, *(list(x) for x in io))


def make_spec(opts: RunOptions, config: Config, image: Image) -> S.Spec:
    """Everything the launcher needs, decided here, validated as a whole."""
    from mesobox.runtime import environ, identity

    uid, gid = os.getuid(), os.getgid()
    name, group, home, shell = identity.host_names(uid, gid)
    home = probe.environ("HOME") or home
    if opts.host_root and not identity.is_real_root():
        raise UsageError("--host-root is only for the real root user",
                         hint="an ordinary user's container root (--fakeroot) is always their own uid")
    if opts.fakeroot:
        probe.untracked()  # reads /etc/subuid and /etc/subgid: not recorded (plancache.py)
    uid_maps, gid_maps, subids = identity.id_maps(uid, gid, opts.fakeroot, name, opts.host_root)
    # The image's User can only be honoured where ids other than one's own are mapped:
    # --fakeroot (with a sub-id range) and root; otherwise the caller keeps their ids.
    inside = (0, 0) if opts.fakeroot or uid == 0 else (uid, gid)
    if (opts.fakeroot or uid == 0) and image.config.get("User"):
        inside = resolve_user(str(image.config["User"]), image)
    args = _shell(opts, image) if opts.mode == "shell" else command(opts, image.config, False)
    # A shifted root (root isolation) does not get root's home (ssh keys, mode 0700:
    # unreadable to it anyway); it uses the image's own $HOME directory.
    shifted = identity.is_shifted(uid_maps)
    mounts = system_mounts(opts) + bind_mounts(opts, config, _here(), "" if shifted else home)
    # The recipe, not the values: a launch plan merges this launch's environment anew.
    file_pairs = tuple(pair for path in opts.env_files for pair in probe.env_file(path))
    recipe = (tuple(image.config.get("Env") or ()), opts.cleanenv, file_pairs, tuple(opts.env), home)
    probe.note_environment(recipe)
    env = environ.compose(dict(os.environ), recipe)
    ann = {S.ANN_FORMAT: image.format, "org.mesobox.user": "root" if inside[0] == 0 else name,
           "org.mesobox.group": group, "org.mesobox.home": home, "org.mesobox.shell": shell}
    ann.update(_option_annotations(opts, subids))
    if inside[0] != 0 and not opts.cap_add and not opts.cap_drop:
        caps = dict(NO_CAPABILITIES)  # what caps.resolve says for a non-root uid, without its import
    else:
        from mesobox.runtime.caps import resolve

        caps = resolve(inside[0] == 0, opts.cap_add, opts.cap_drop)
    process = S.Process(args=args, env=env, cwd=_cwd(opts, mounts, image.config),
                        user=S.User(uid=inside[0], gid=inside[1]), terminal=os.isatty(0), capabilities=caps)
    linux = S.Linux(namespaces=_namespaces(opts), uid_mappings=uid_maps, gid_mappings=gid_maps,
                    resources=_resources(opts), seccomp=_seccomp(opts))
    spec = S.Spec(process=process, root=S.Root(path=image.path, readonly=opts.writable_tmpfs is None),
                  mounts=mounts, hostname=opts.hostname, linux=linux, annotations=ann)
    spec.validate()
    return spec


def _option_annotations(opts: RunOptions, subids: bool) -> dict[str, str]:
    """mesobox-only settings with no OCI field: writable root, overlay, sub-ids, network."""
    ann: dict[str, str] = {}
    if opts.writable_tmpfs is not None:
        ann[S.ANN_WRITABLE_TMPFS] = str(opts.writable_tmpfs)
    if opts.overlay:
        from mesobox.runtime import identity, quota

        probe.untracked()  # an overlay's state is not recorded (plancache.py)

        if quota.is_image(opts.overlay):
            ann[S.ANN_OVERLAY_IMAGE] = quota.check_can_mount(opts.overlay, identity.is_real_root())
        else:
            ann[S.ANN_OVERLAY] = os.path.abspath(opts.overlay)
    if subids:
        ann[S.ANN_SUBIDS] = "1"
    if opts.net in ("none", "slirp"):
        ann["org.mesobox.net"] = opts.net
    elif opts.net not in (None, "host"):
        raise UsageError(f"unknown --net {opts.net!r}", hint="use host, none or slirp")
    return ann


def _here() -> str:
    return probe.getcwd() or "/"
