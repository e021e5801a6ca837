"""Spec-building room: image config + command-line options → ``spec.Spec``.

Invariants:
- Pure: no syscalls beyond reading the image (config, /etc files) and stat()ing
  bind sources; everything it decides is visible in the spec (``--debug`` prints it).
- Docker semantics for ``run`` (ARGS replace Cmd; Entrypoint kept unless
  ``--entrypoint``, which also drops the image Cmd, as ``docker run`` does); ``exec``
  runs CMD directly; ``shell`` runs /bin/bash, else /bin/sh.  A plain directory or
  squashfs image has an empty config: its default command is /bin/sh (Apptainer's);
  a squashfs file written by ``mesobox export`` carries its image's config
  (image/portable.py) and runs as the stored image does.
- Capabilities (caps.py): Docker's default set for uid 0 inside, none otherwise;
  real root's container root is shifted to a sub-id range unless ``--host-root``.
- Default binds (unless ``--contain``): $HOME, the working directory (when it is not
  a system directory the image provides), /tmp, then config.default_binds; then the
  user's -B binds.  With allowed_bind_sources set, every source is checked: -B and
  default_binds outside it are refused; $HOME, /tmp and the working directory are
  left out with a warning (/tmp is then a private tmpfs).  A working directory the
  caller cannot reach (a checkout under /root, say) is not bound either: the
  container starts in $HOME, or /, with a warning, as Apptainer's does.
- /dev/shm is the host's (unless ``--contain``: a private tmpfs), as Apptainer's is:
  the ranks of a node, one container each, must see each other's MPI segments.  They
  then share one user namespace (``Settings.userns``, launch/sharedns.py), so MPI's CMA
  single copy works between them; where they cannot (``--userns private``, ``--pid``,
  real root, ``--fakeroot``) the MPI libraries are told not to use it (MPI_SHM_DEFAULTS),
  unless the user set those variables.
- The flags people type from Docker and Apptainer (-v, --mount, --tmpfs, --user,
  --ulimit, --containall, --no-mount, --dns, --home…: the end of this module) become
  the same binds, tmpfs mounts and spec fields; their code runs only when one is given.
- Image names: a path-shaped name (/…, ./…, ../…, *.sqfs, *.squashfs, or one that is
  not a valid reference) is a directory or squashfs file; every other name is an image
  reference, never a path: a directory planted in a shared working directory under a
  registry image's name must not stand in for it.
"""

from __future__ import annotations

import os

from mesobox.errors import ImageNotFound, PolicyError, UsageError
from mesobox.files import under
from mesobox.launch import probe
from mesobox.launch.binds import allowed_source, check_source, device_bind, require_allowed
from mesobox.oci import spec as S
from mesobox.records import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mesobox.config import Config

HOST_SHM_OPTIONS = ("rbind", "nosuid", "nodev", "rw")  # the host's /dev/shm: those of a -B bind
PRIVATE_SHM = S.Mount(destination="/dev/shm", type="tmpfs", source="shm", options=("nosuid", "nodev", "mode=1777"))
# With the host's /dev/shm, ranks of a node find each other's segments and use shared
# memory; but in separate user namespaces process_vm_readv(2) on a peer is refused
# (ptrace_may_access: same ids, other namespace), and a library that picks CMA
# single-copy for large messages then fails or hangs.  Where the ranks do not share a
# user namespace, these make it copy through the shared segments instead.  Lowest
# precedence: the host's value, the image's, an --env-file or -e one wins.
MPI_SHM_DEFAULTS = (
    ("OMPI_MCA_btl_vader_single_copy_mechanism", "none"),  # Open MPI 3-4: the vader BTL
    ("OMPI_MCA_smsc", "^cma"),  # Open MPI 5: its single-copy framework, without CMA
    ("MPIR_CVAR_CH4_CMA_ENABLE", "0"),  # MPICH >= 4.3: CH4's CMA IPC
)
PRIVATE_TMP = S.Mount(destination="/tmp", type="tmpfs", source="tmpfs", options=("nosuid", "nodev", "mode=1777"))
NO_CAPABILITIES: dict[str, tuple[str, ...]] = {"bounding": (), "effective": (), "permitted": ()}
# Working directories never bound over the image: the image's own software lives there.
SYSTEM_DIRS = ("bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "opt", "proc", "run", "sbin",
               "sys", "usr", "var")


class RunOptions(Record):
    """What the CLI parsed; defaults are mesobox's documented defaults (docs/running.md)."""

    __slots__ = (
        "args",
        "binds",
        "cap_add",
        "cap_drop",
        "cleanenv",
        "contain",
        "containall",
        "cpus",
        "cpuset_cpus",
        "detach",
        "devices",
        "dns",
        "entrypoint",
        "env",
        "env_files",
        "fakeroot",
        "home",
        "host_root",
        "hostname",
        "image",
        "init",
        "interactive",
        "io_read_bps",
        "io_read_iops",
        "io_write_bps",
        "io_write_iops",
        "ipc",
        "memory",
        "mode",
        "mounts",
        "net",
        "no_home",
        "no_mount",
        "nv",
        "overlay",
        "pid",
        "pids_limit",
        "platform",
        "publish",
        "rdma",
        "read_only",
        "rm",
        "rocm",
        "security_opts",
        "shm_size",
        "tmpfs",
        "tty",
        "ulimits",
        "user",
        "userns",
        "uts",
        "volumes",
        "workdir",
        "writable_tmpfs",
    )
    _defaults = {"args": (), "entrypoint": None, "binds": (), "contain": False, "cleanenv": False, "env": (),
                 "env_files": (), "workdir": None, "fakeroot": False, "writable_tmpfs": None, "overlay": None,
                 "pid": False, "ipc": False, "uts": False, "hostname": None, "net": None, "memory": None,
                 "cpus": None, "pids_limit": None, "security_opts": (), "cap_add": (), "cap_drop": (),
                 "host_root": False, "cpuset_cpus": None, "io_read_bps": (), "io_write_bps": (),
                 "io_read_iops": (), "io_write_iops": (), "publish": (), "devices": (),
                 "nv": False, "rocm": False, "rdma": False, "userns": None,
                 "volumes": (), "mounts": (), "tmpfs": (), "read_only": False, "user": None, "shm_size": None,
                 "ulimits": (), "init": False, "platform": None, "interactive": False, "tty": False,
                 "detach": False, "rm": False, "containall": False, "no_home": False, "no_mount": (), "dns": (),
                 "home": None}
    mode: str
    image: str
    args: tuple[str, ...]
    entrypoint: str | None
    binds: tuple[str, ...]
    devices: tuple[str, ...]  # --device HOST[:CONTAINER][:PERMS]
    nv: bool  # --nv: the host's NVIDIA GPUs (launch/gpu.py)
    rocm: bool  # --rocm: the host's AMD GPUs
    rdma: bool  # --rdma: the host's InfiniBand/RDMA devices and verbs libraries (launch/rdma.py)
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
    userns: str | None  # "shared" | "private"; None: shared where the ranks of a node need it
    hostname: str | None
    net: str | None
    publish: tuple[str, ...]  # -p HOST:CONTAINER, with --net slirp
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
    # The flags people type (docs/running.md, "The flags you know from Apptainer and Docker").
    volumes: tuple[str, ...]  # -v SRC:DST[:ro|rw]: a -B bind, Docker's spelling
    mounts: tuple[str, ...]  # --mount type=bind|tmpfs,...
    tmpfs: tuple[str, ...]  # --tmpfs DST[:size=…,mode=…]
    read_only: bool  # --read-only: the default; refused with a writable root
    user: str | None  # --user UID[:GID] | NAME[:GROUP]
    shm_size: str | None  # --shm-size SIZE: a private /dev/shm of that size
    ulimits: tuple[str, ...]  # --ulimit NAME=SOFT[:HARD] → process.rlimits
    init: bool  # --init: mesobox's init as pid 1 (a pid namespace)
    platform: str | None  # --platform: must name this host's
    interactive: bool  # -i: accepted, stdin is always passed through
    tty: bool  # -t: accepted, the terminal is always passed through
    detach: bool  # -d: refused, an instance is the detached container
    rm: bool  # --rm: accepted, nothing is left behind anyway
    containall: bool  # --containall: --contain --pid --ipc --cleanenv
    no_home: bool  # --no-home: $HOME is not bound
    no_mount: tuple[str, ...]  # --no-mount home,tmp,cwd,bind-paths,hostfs,/DST
    dns: tuple[str, ...]  # --dns IP[,IP]: a generated /etc/resolv.conf (Settings.dns)
    home: str | None  # --home SRC[:DST]


class Image(Record):
    __slots__ = ("config", "digest", "format", "lock", "path", "reference")
    _defaults = {"lock": None, "digest": None}
    format: str  # "dir" | "squashfs"
    path: str
    config: dict[str, Any]
    reference: str
    lock: str | None  # the store's in-use lock of a stored directory image (execute.hold_image)
    digest: str | None  # the stored image's manifest digest; None for a directory or file

    @property
    def provenance(self) -> str:
        """What ran, for the launch record: REFERENCE@DIGEST, or the image's path."""
        return f"{self.reference}@{self.digest}" if self.digest else self.path


# --- image -------------------------------------------------------------------------------


IMAGE_FILE_SUFFIXES = (".sqfs", ".squashfs")


def _squashfs_file(path: str) -> bool:
    """A squashfs image file by its name, or else by its magic."""
    from mesobox.files import is_squashfs as has_magic

    return path.endswith(IMAGE_FILE_SUFFIXES) or has_magic(path)


def is_path_name(text: str) -> bool:
    """Whether the image name ``text`` names a file or directory (module docstring)."""
    if text.startswith(("/", "./", "../")) or text in (".", ".."):
        return True
    from mesobox.image.reference import ARCHIVE_TRANSPORTS, parse_reference

    if text.startswith("docker://") or text.startswith(tuple(t + ":" for t in ARCHIVE_TRANSPORTS)):
        return False
    if text.endswith(IMAGE_FILE_SUFFIXES):
        return True
    from mesobox.errors import InvalidReference

    try:
        parse_reference(text)
    except InvalidReference:
        return True
    return False


def path_image(text: str) -> Image:
    """The directory or squashfs file ``text``."""
    error = probe.stat_error(text)
    if error is None and probe.isdir(text):
        if not probe.access(text, os.R_OK | os.X_OK):
            raise UsageError(f"cannot enter image directory {text}: permission denied",
                             hint="the directory must be readable and searchable by you")
        return Image(format="dir", path=probe.abspath(text), config={}, reference=text)
    if error is None and probe.file_identity(text) is not None:  # the same file: the same squashfs tree
        if not probe.access(text, os.R_OK):
            raise UsageError(f"cannot read image file {text}: permission denied")
        if not _squashfs_file(text):
            raise UsageError(f"{text} is neither a directory nor a squashfs image")
        # A file written by `mesobox export` carries its image's config (image/portable.py).
        trailer = probe.squashfs_trailer(text)
        return Image(format="squashfs", path=probe.abspath(text), config=trailer["config"] if trailer else {},
                     reference=text)
    if error in ("EACCES", "EPERM"):
        raise UsageError(f"cannot reach image {text}: permission denied",
                         hint="a directory on its path is not searchable by you")
    if error is None:
        raise UsageError(f"{text} is neither a directory nor a squashfs image")
    raise ImageNotFound(f"no such image file or directory: {text}")


def find_image(text: str, config: Config) -> Image:
    """A directory, a squashfs file, a stored reference, or docker://… (pulled if missing)."""
    if is_path_name(text):
        image = path_image(text)
        if probe.file_identity(config.policy_file) is not None:  # a site trust policy (docs/trust.md)
            from mesobox.image.policy import check_path

            check_path(config, probe.realpath(image.path), probe.file_identity)
        return image
    from mesobox.image.store import Store

    store = Store(config)
    record = store.lookup(text)
    if record is None and text.startswith("docker://"):
        from mesobox.image.pull import pull
        from mesobox.launch.signals import hold_signals, release_signals

        release_signals()  # a pull may take minutes: Ctrl-C must still stop it
        record = pull(config, text, fmt=config.default_format, quiet=False)
        hold_signals()
    if record is None:
        hint = f"run `mesobox pull {text}` first"
        if probe.lexists(text):
            hint += f"; to run the file or directory {text!r} in this directory, write ./{text}"
        raise ImageNotFound(f"image {text!r} is not in the store", hint=hint)
    path = record.rootfs or record.squashfs
    if path is None:
        raise ImageNotFound(f"image {text!r} has no rootfs or squashfs", hint=f"run `mesobox pull {text}` again")
    fmt = "dir" if record.rootfs else "squashfs"
    _note_record(store, text, record.digest)
    if probe.file_identity(config.policy_file) is not None:  # a site trust policy (docs/trust.md)
        from mesobox.image.policy import check_stored

        check_stored(config, record.reference, tuple(d for d in (record.digest, record.index_digest) if d),
                     str(store.signatures_path(record.digest, record.store)), probe.file_identity)
    if config.refuse_scan_severity:  # the site refuses images whose last scan found too much (docs/trust.md)
        _check_scan(config, store, record.digest)
    from mesobox.image.imageconfig import checked_config

    # A record written by an older mesobox (or edited) gets the same checks as a pull.
    image_config = checked_config(record.config or {}, f"image {record.reference}")
    # A directory image in the user's own store: `rm`/`prune` must not delete it under us.
    lock = str(store.inuse_lock_path(record.digest)) if fmt == "dir" and record.store == store.root else None
    return Image(format=fmt, path=str(path), config=image_config, reference=record.reference, lock=lock,
                 digest=record.digest)


def _check_scan(config: Config, store: Any, digest: str) -> None:
    from mesobox.image.scan import scan_record_path, scan_refusal

    for root in (*store.ro_roots, store.root):  # a new scan must invalidate a saved plan
        probe.file_identity(scan_record_path(str(root), digest))
    refusal = scan_refusal(config, digest)
    if refusal:
        raise PolicyError(refusal, hint="scan it again with a current feed (`mesobox scan IMAGE --db FEED`), "
                                        "or ask the site's admins")


def _note_record(store: Any, text: str, digest: str) -> None:
    """What Store.lookup read, as questions a saved program asks again: which store's
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


# --- devices ------------------------------------------------------------------------------

DEVICE_HINT = "use --device HOST[:CONTAINER][:PERMS], PERMS rw or rwm"


def parse_device(text: str) -> tuple[str, str]:
    """``HOST[:CONTAINER][:PERMS]`` (Docker's --device) → (host path, container path).

    An ordinary user cannot mknod, so a device is bound, as rootless podman does; what
    PERMS can mean for a bind decides what is accepted.  ``m`` (mknod) is accepted and
    ignored: mknod is never allowed inside (the kernel refuses it in a user namespace),
    so it grants nothing, and Docker's default is ``rwm``.  Without ``r`` or ``w`` the
    option is refused: a read-only bind does not stop a device node being opened for
    writing (a device is not written through its filesystem), so ``r`` alone would
    promise what nothing enforces; the node's own permissions decide."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UsageError(f"bad --device {text!r}", hint=DEVICE_HINT)
    src, dst, perms = parts[0], "", "rwm"
    if len(parts) == 3:
        dst, perms = parts[1], parts[2]
    elif len(parts) == 2 and _device_perms(parts[1]):  # Docker's rule: HOST:PERMS
        perms = parts[1]
    elif len(parts) == 2:
        dst = parts[1]
    dst = dst or src
    if not _device_perms(perms):
        raise UsageError(f"bad --device permissions {perms!r} in {text!r}", hint="PERMS is made of r, w and m")
    if "r" not in perms or "w" not in perms:
        raise UsageError(f"--device {text}: a bound device cannot be limited to {perms!r}",
                         hint="a bind cannot narrow access to a device node (its own permissions decide): "
                              "use rw or rwm")
    if not os.path.isabs(dst) or ".." in dst.split("/") or os.path.normpath(dst) == "/":
        raise UsageError(f"bad --device container path {dst!r}", hint="use an absolute path without '..'")
    return src, os.path.normpath(dst)


def _device_perms(text: str) -> bool:
    return 0 < len(text) <= 3 and len(set(text)) == len(text) and set(text) <= set("rwm")


def is_cdi_name(text: str) -> bool:
    """Whether a --device value names a CDI device (``vendor.com/class=name``, launch/cdi.py)
    rather than a host path; decided here so that a plain --device imports nothing."""
    return "=" in text and not text.startswith("/")


def cdi_edits(opts: RunOptions, config: Config,
              more: tuple[str, ...] = ()) -> tuple[tuple[S.Mount, ...], tuple[str, ...], S.Hooks]:
    """The binds, KEY=VALUE environment and hooks of the CDI devices among --device
    values and ``more`` (--nv through a site spec: gpu.site_cdi)."""
    names = [text for text in opts.devices if is_cdi_name(text)] + list(more)
    if not names:
        return (), (), S.Hooks()
    from mesobox.launch import cdi

    edits = cdi.cdi_edits(names, config)
    hooks = S.Hooks(**{kind: tuple(hook for k, hook in edits.hooks if k == kind) for kind in cdi.RUN_HOOKS})
    return edits.mounts, edits.env, hooks


def root_for_hooks(opts: RunOptions, hooks: S.Hooks, config: Config) -> RunOptions:
    """A createContainer hook writes into the root (nvidia-ctk's update-ldcache and
    create-symlinks): without --overlay or --writable-tmpfs it gets a writable tmpfs
    root, as Apptainer's --nvccli implies --writable-tmpfs."""
    if not hooks.createContainer or opts.writable_tmpfs is not None or opts.overlay:
        return opts
    if config.debug:
        import sys

        sys.stderr.write("mesobox: note: createContainer hooks write into the root: --writable-tmpfs implied\n")
    changed: RunOptions = opts.replace(writable_tmpfs=0)
    return changed


def device_mount(text: str, allowed: tuple[str, ...]) -> S.Mount:
    """A bind of the device ``--device text`` names (binds.device_bind)."""
    src, dst = parse_device(text)
    error = probe.stat_error(src)
    if error in ("ENOENT", "ENOTDIR"):
        raise UsageError(f"--device {src} does not exist")
    if error is not None:
        raise UsageError(f"--device {src} cannot be reached ({error})")
    real = probe.realpath(src)  # a symlink (/dev/disk/by-id/…) names its device, as in Docker
    kind = probe.node_type(real)
    if kind not in ("c", "b"):
        what = {"d": "a directory", "f": "a regular file"}.get(kind, "neither a file nor a directory")
        raise UsageError(f"--device {src} is {what}, not a character or block device",
                         hint="bind files and directories with -B" if kind in ("d", "f") else None)
    require_allowed(real, allowed, f"--device {src}")
    return device_bind(real, dst)


def bind_mounts(opts: RunOptions, config: Config, cwd: str, home: str,
                cdi_mounts: tuple[S.Mount, ...] = ()) -> tuple[S.Mount, ...]:
    allowed = tuple(config.allowed_bind_sources)
    binds: list[tuple[str, str, bool]] = []
    skip = no_mount(opts) if opts.no_mount or opts.no_home or opts.home is not None else frozenset()
    if not opts.contain:
        binds += [(path, path, False) for path in _automatic_binds(home, cwd, allowed, skip)]
        for text in () if "bind-paths" in skip else config.default_binds:
            binds += [bind for bind in parse_bind(text) if bind[1] not in skip]
    for text in opts.binds:
        binds += parse_bind(text)
    tmpfs: list[S.Mount] = []
    if opts.volumes or opts.mounts or opts.tmpfs or opts.home is not None:
        binds, tmpfs = _docker_mounts(opts, binds)
    mounts = []
    for src, dst, ro in binds:
        real = check_source(src, allowed)
        options = ("rbind", "nosuid", "nodev", "ro" if ro else "rw")
        mounts.append(S.Mount(destination=dst, type="bind", source=real, options=options))
    mounts += [device_mount(text, allowed) for text in opts.devices if not is_cdi_name(text)]
    mounts += cdi_mounts
    mounts += tmpfs
    if not opts.contain and not any(dst == "/tmp" for _src, dst, _ro in binds) \
            and not any(m.destination == "/tmp" for m in tmpfs):
        mounts.append(PRIVATE_TMP)  # the image's /tmp is read-only: a private one instead
    return tuple(mounts)


def _automatic_binds(home: str, cwd: str, allowed: tuple[str, ...], skip: frozenset[str] = frozenset()) -> list[str]:
    """$HOME, /tmp and the working directory, where they can be bound: a directory the
    caller cannot reach is left out (_cwd says where the container starts instead),
    one outside the site's allowed sources too, with a warning; those --no-mount names
    (``skip``) not at all."""
    wanted = (home, "/tmp") if not skip else [p for n, p in (("home", home), ("tmp", "/tmp")) if n not in skip]
    kept = [path for path in wanted if path and probe.isdir(path) and _allowed_automatic(path, allowed)]
    if cwd != "/" and cwd.split("/")[1] not in SYSTEM_DIRS and not any(under(cwd, p) for p in kept) \
            and "cwd" not in skip and _reachable(cwd) and _allowed_automatic(cwd, allowed):
        kept.append(cwd)
    return kept


def _allowed_automatic(path: str, allowed: tuple[str, ...]) -> bool:
    if allowed_source(probe.realpath(path), allowed):
        return True
    from mesobox.console import warn

    warn(f"{path} is not bound: it is outside the site's allowed bind sources")
    return False


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
    if probe.access("/dev/fuse", os.R_OK | os.W_OK):
        # As Apptainer's host /dev has it: FUSE is no privilege the caller lacks outside,
        # and mesobox (squashfs images, fuse-overlayfs) inside a container needs it.
        mounts.append(S.Mount(destination="/dev/fuse", type="bind", source="/dev/fuse", options=("bind",)))
    mounts.append(S.Mount(destination="/dev/pts", type="devpts", source="devpts",
                          options=("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=620")))
    mounts.append(_shm(opts))
    if opts.contain:
        mounts.append(PRIVATE_TMP)
    for name in ("/etc/hosts", "/etc/resolv.conf"):
        if name == "/etc/resolv.conf" and opts.dns:
            continue  # --dns: a generated one instead (Settings.dns, program.py)
        if probe.isfile(name):
            mounts.append(S.Mount(destination=name, type="bind", source=probe.realpath(name),
                                  options=("bind", "nosuid", "nodev", "ro")))
    return tuple(mounts)


def _shm(opts: RunOptions) -> S.Mount:
    """The host's /dev/shm, or a private tmpfs with --contain (or where the host has none,
    or a -B bind covers it anyway: ``mesobox srun`` tasks bind it themselves); with
    --shm-size a private tmpfs of that size, as Docker's."""
    if opts.shm_size is not None:
        from mesobox.sizes import parse_size

        size = parse_size(opts.shm_size, "--shm-size")
        return S.Mount(destination="/dev/shm", type="tmpfs", source="shm", options=(*PRIVATE_SHM.options,
                                                                                    f"size={size}"))
    if opts.contain or not probe.isdir("/dev/shm") or _binds_shm(opts.binds):
        return PRIVATE_SHM
    return S.Mount(destination="/dev/shm", type="bind", source=probe.realpath("/dev/shm"), options=HOST_SHM_OPTIONS)


def _binds_shm(binds: tuple[str, ...]) -> bool:
    return any(dst.rstrip("/") == "/dev/shm" for text in binds for _src, dst, _ro in parse_bind(text))


def host_shm(mounts: tuple[S.Mount, ...]) -> bool:
    """Is the container's /dev/shm a bind of the host's?  (The last mount there wins:
    ``-B /dev/shm`` with --contain too.)"""
    shm = [m for m in mounts if m.destination.rstrip("/") == "/dev/shm"]
    return bool(shm) and shm[-1].type == "bind"


def mpi_defaults(mounts: tuple[S.Mount, ...], cleanenv: bool, cma: bool = False) -> tuple[str, ...]:
    """MPI_SHM_DEFAULTS as image-Env-like entries, when the container's /dev/shm is the
    host's and ``cma`` (single copy) cannot work, less those the host environment
    already sets and passes through.  probe.environ: a saved program is used only while
    the host's answer stays the same."""
    if cma or not host_shm(mounts):
        return ()
    return tuple(f"{key}={value}" for key, value in MPI_SHM_DEFAULTS
                 if cleanenv or probe.environ(key) is None)


# --- the spec ---------------------------------------------------------------------------------


def resolve_user(text: str, image: Image, label: str = "the image's User") -> tuple[int, int]:
    """Image ``User`` ("name", "uid", "uid:gid", "name:group") → ids, read from the image."""
    name, _, group = text.partition(":")
    passwd = _image_file(image, "etc/passwd") if not _numeric(name) or (group and not _numeric(group)) else ""
    uid = int(name) if _numeric(name) else _lookup(passwd, name, 2, "user", label)
    gid = 0
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) > 3 and (fields[0] == name or fields[2] == str(uid)) and _numeric(fields[3]):
            gid = int(fields[3])
    if group:
        gid = int(group) if _numeric(group) else _lookup(_image_file(image, "etc/group"), group, 2, "group", label)
    if not (uid < MAX_ID and gid < MAX_ID):
        raise UsageError(f"{label} {text[:40]!r} names an id out of range (ids are below {MAX_ID})")
    return uid, gid


MAX_ID = 4294967295  # (uid_t)-1 is "no id" (setuid(2), user_namespaces(7))


def _numeric(text: str) -> bool:
    """ASCII digits only: str.isdigit() is true of "²", which int() refuses."""
    return text.isascii() and text.isdigit()


def _lookup(text: str, name: str, column: int, what: str, label: str = "the image's User") -> int:
    for line in text.splitlines():
        fields = line.split(":")
        if fields[0] == name and len(fields) > column and _numeric(fields[column]):
            return int(fields[column])
    raise UsageError(f"{label} {name[:40]!r} is not a {what} in the image's /etc files")


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


def _reachable(path: str) -> bool:
    """A directory the caller may enter (stat(2) alone works on /root itself)."""
    return probe.isdir(path) and probe.access(path, os.X_OK)


def _cwd(opts: RunOptions, mounts: tuple[S.Mount, ...], image_config: dict[str, Any], home: str) -> str:
    if opts.workdir:
        return opts.workdir
    here = probe.getcwd()
    bound = [m.destination for m in mounts if m.type == "bind" and m.source == m.destination]
    if here and any(under(here, b) for b in bound):
        return here
    if here and not _reachable(here):
        # Unreachable (a sudo'd command left in /root/…): not fatal, as in Apptainer.
        start = home if home and home in bound else "/"
        from mesobox.console import warn

        warn(f"cannot reach the working directory {here}; starting in {start}")
        return start
    return str(image_config.get("WorkingDir") or "/")


def _namespaces(opts: RunOptions) -> tuple[str, ...]:
    ns = ["user", "mount"]
    ns += [name for name, on in (("pid", opts.pid), ("ipc", opts.ipc), ("uts", opts.uts or bool(opts.hostname)),
                                 ("network", opts.net in ("none", "slirp"))) if on]
    return tuple(ns)


def _seccomp(opts: RunOptions, config: Config) -> dict[str, Any] | None:
    value = None
    for item in opts.security_opts:
        key, _, val = item.partition("=")
        if key == "seccomp":
            value = val
        elif key not in ("no-new-privileges", "no-new-privileges:true"):
            raise UsageError(f"unsupported --security-opt {item!r}", hint="supported: seccomp=default|unconfined|FILE")
    if value not in (None, "default") and config.require_seccomp:
        raise PolicyError(f"--security-opt seccomp={value} is refused: this site requires the default seccomp "
                          "filter (require_seccomp)", hint="drop the option")
    if value is None:
        # Docker's choice: a default filter denying what containers never need (kexec,
        # bpf, keyctl, …; see seccomp.DEFAULT_DENIED), unless seccomp=unconfined.
        return {"mesobox.builtin": True}
    from mesobox.isolation.seccomp import profile_from_option

    if value not in ("default", "unconfined"):
        probe.file_identity(value)  # the profile file, read below: the same file is the same profile
    profile = profile_from_option(value)
    if profile is None:
        return {"mesobox.builtin": True}
    return None if profile.get("unconfined") else profile


def _resources(opts: RunOptions) -> Any:
    io = (opts.io_read_bps, opts.io_write_bps, opts.io_read_iops, opts.io_write_iops)
    if opts.memory is None and opts.cpus is None and opts.pids_limit is None and opts.cpuset_cpus is None \
            and not any(io):
        return None
    from mesobox.isolation.cgroups import parse_resource_options

    return parse_resource_options(opts.memory, opts.cpus, opts.cpuset_cpus, opts.pids_limit, *(list(x) for x in io))


def make_spec(opts: RunOptions, config: Config, image: Image) -> S.Spec:
    """Everything the launcher needs, decided here, validated as a whole."""
    from mesobox.launch import environ, identity

    if opts.detach or opts.platform or opts.read_only or opts.containall or opts.init:
        opts = implied_options(opts)
    uid, gid = os.getuid(), os.getgid()
    name, group, home, shell = identity.host_names(uid, gid)
    home = probe.environ("HOME") or home
    if opts.home is not None:
        home = parse_home(opts.home)[1]  # --home SRC:DST: bound by bind_mounts, HOME=DST below
    if opts.host_root and not identity.is_real_root():
        raise UsageError("--host-root is only for the real root user",
                         hint="an ordinary user's container root (--fakeroot) is always their own uid")
    if opts.fakeroot:
        probe.subids()  # what the id maps below are made of
    uid_maps, gid_maps, subids = identity.id_maps(uid, gid, opts.fakeroot, name, opts.host_root, opts.overlay)
    # The image's User can only be honoured where ids other than one's own are mapped:
    # --fakeroot (with a sub-id range) and root; otherwise the caller keeps their ids.
    inside = (0, 0) if opts.fakeroot or uid == 0 else (uid, gid)
    if (opts.fakeroot or uid == 0) and image.config.get("User"):
        inside = resolve_user(str(image.config["User"]), image)
    if opts.user is not None:
        inside = user_option(opts.user, image, uid_maps, gid_maps, (uid, gid), opts.fakeroot)
    args = _shell(opts, image) if opts.mode == "shell" else command(opts, image.config, False)
    # A shifted root (root isolation) does not get root's home (ssh keys, mode 0700:
    # unreadable to it anyway); it uses the image's own $HOME directory.
    shifted = identity.is_shifted(uid_maps)
    nv, rocm = opts.nv, opts.rocm
    gpu_cdi: tuple[str, ...] = ()
    if nv or rocm:  # a site's CDI spec for the vendor takes the flag (gpu.py)
        from mesobox.launch.gpu import site_cdi

        gpu_cdi, nv, rocm = site_cdi(nv, rocm, config)
    cdi_mounts, cdi_env, hooks = cdi_edits(opts, config, gpu_cdi)
    opts = root_for_hooks(opts, hooks, config)
    mounts = system_mounts(opts) + bind_mounts(opts, config, _here(), "" if shifted else home, cdi_mounts)
    # The recipe, not the values: a saved program merges this launch's environment anew.
    file_pairs = tuple(pair for path in opts.env_files for pair in probe.env_file(path))
    if opts.home is not None:
        file_pairs = (("HOME", home), *file_pairs)  # Apptainer's --home sets HOME; --env-file and -e win
    # MPI defaults go first among the image's Env: the image, --env-file and -e override them.
    # A CDI device's env comes after the image's (the device's driver knows better) and
    # before --env-file and -e (the user's word is last).
    userns = _userns(opts, mounts, subids)
    image_env = (mpi_defaults(mounts, opts.cleanenv, cma=userns == "shared" and not opts.pid)
                 + tuple(image.config.get("Env") or ()) + cdi_env)
    if nv or rocm:
        from mesobox.launch.gpu import gpu_setup

        gpu_mounts, gpu_env = gpu_setup(nv, rocm, config, image_env)
        mounts += gpu_mounts
        image_env += gpu_env  # after the image's Env, before --env-file and -e
    if opts.rdma:
        from mesobox.launch.rdma import rdma_setup

        rdma_mounts, rdma_env = rdma_setup(config, image_env, image.path)
        mounts += rdma_mounts
        image_env += rdma_env  # after the image's Env, before --env-file and -e
    recipe = (image_env, opts.cleanenv, file_pairs, tuple(opts.env), home)
    probe.note_environment(recipe)
    env = environ.compose(dict(os.environ), recipe)
    settings = _settings(opts, subids).replace(
        root_format=image.format, image_lock=image.lock, user_name="root" if inside[0] == 0 else name,
        group_name=group, home=home, shell=shell, userns=userns, image=image.provenance)
    if inside[0] != 0 and not opts.cap_add and not opts.cap_drop:
        caps = dict(NO_CAPABILITIES)  # what caps.resolve says for a non-root uid, without its import
    else:
        from mesobox.isolation.caps import resolve

        caps = resolve(inside[0] == 0, opts.cap_add, opts.cap_drop)
    process = S.Process(args=args, env=env, cwd=_cwd(opts, mounts, image.config, home),
                        user=S.User(uid=inside[0], gid=inside[1]), terminal=os.isatty(0), capabilities=caps,
                        rlimits=parse_ulimits(opts.ulimits) if opts.ulimits else ())
    linux = S.Linux(namespaces=_namespaces(opts), uid_mappings=uid_maps, gid_mappings=gid_maps,
                    resources=_resources(opts), seccomp=_seccomp(opts, config))
    spec = S.Spec(process=process, root=S.Root(path=image.path, readonly=opts.writable_tmpfs is None),
                  mounts=mounts, hostname=opts.hostname, linux=linux, mesobox=settings, hooks=hooks)
    spec.validate()
    return spec


def _settings(opts: RunOptions, subids: bool) -> S.Settings:
    """mesobox-only settings with no OCI field: writable root, overlay, sub-ids, network."""
    overlay = overlay_image = None
    if opts.overlay:
        from mesobox.isolation import quota
        from mesobox.launch import identity

        probe.overlay(opts.overlay)  # what the checks below read

        if quota.is_image(opts.overlay):
            overlay_image = quota.check_can_mount(opts.overlay, identity.is_real_root())
        elif os.path.isdir(opts.overlay) or os.path.isdir(os.path.dirname(os.path.abspath(opts.overlay))):
            overlay = os.path.abspath(opts.overlay)  # made at launch when missing
        else:
            raise UsageError(f"--overlay {opts.overlay}: neither it nor its parent directory exists",
                             hint="give a directory (made if missing; changes are kept there), or an image "
                                  "made with `mesobox overlay create FILE SIZE`")
    net = opts.net or "host"
    if net not in ("host", "none", "slirp"):
        raise UsageError(f"unknown --net {opts.net!r}", hint="use host, none or slirp")
    publish: tuple[tuple[int, int], ...] = ()
    if opts.publish:
        if net != "slirp":
            raise UsageError("-p/--publish needs --net slirp")
        from mesobox.isolation.network import parse_publish

        publish = tuple(parse_publish(p) for p in opts.publish)
    return S.Settings(writable_tmpfs=opts.writable_tmpfs, overlay=overlay, overlay_image=overlay_image,
                      subids=subids, net=net, publish=publish, dns=parse_dns(opts.dns) if opts.dns else ())


def _userns(opts: RunOptions, mounts: tuple[S.Mount, ...], subids: bool) -> str:
    """``shared`` (launch/sharedns.py) where ranks of a node meet: the host's /dev/shm and
    no pid namespace of its own (CMA names peers by pid).  Private for a root inside:
    real root's containers each get their own id slice, and a --fakeroot root holds
    every capability of its namespace, which must then be its own."""
    if opts.userns == "private":
        return "private"
    if os.getuid() == 0 or subids or opts.fakeroot:
        if opts.userns == "shared":
            why = "real root's containers each get their own id slice" if os.getuid() == 0 else \
                "a --fakeroot container's root holds every capability of its user namespace"
            raise UsageError(f"--userns shared is not available here: {why}", hint="drop --userns shared")
        return "private"
    if opts.userns == "shared":
        return "shared"
    return "shared" if host_shm(mounts) and not opts.pid else "private"


def _here() -> str:
    return probe.getcwd() or "/"


# --- the flags people type (Docker/Podman and Apptainer spellings) ----------------------------
# Each is read only when given: a launch without them runs none of this.


def implied_options(opts: RunOptions) -> RunOptions:
    """The flags that stand for others (--containall, --init) and those only checked
    (--detach, --platform, --read-only)."""
    if opts.detach:
        raise UsageError("-d/--detach: mesobox run stays in the foreground; a detached container is an instance",
                         hint="mesobox instance start [OPTIONS] IMAGE NAME [ARGS...]")
    if opts.platform:
        check_platform(opts.platform)
    if opts.read_only and (opts.writable_tmpfs is not None or opts.overlay):
        other = "--overlay" if opts.overlay else "--writable-tmpfs"
        raise UsageError(f"--read-only contradicts {other}: the one keeps the root read-only, the other makes "
                         "it writable", hint=f"drop one of them (a read-only root is the default: {other} is "
                                             "what changes it)")
    if opts.containall:  # Apptainer's: file systems, PID, IPC and environment
        opts = opts.replace(contain=True, pid=True, ipc=True, cleanenv=True)
    if opts.init:  # the init that --pid already runs as pid 1 (execute._container_init)
        opts = opts.replace(pid=True)
    changed: RunOptions = opts
    return changed


def check_platform(text: str) -> None:
    """--platform: only the host's own runs (there is no emulation)."""
    from mesobox.image.manifest import parse_platform
    from mesobox.image.source import host_platform

    host = host_platform()
    want_os, want_arch, want_variant = parse_platform(text)
    host_os, host_arch, host_variant = parse_platform(host)
    # containerd's rule: arm64 without a variant is v8.
    default_variant = "v8" if host_arch == "arm64" else None
    if (want_os, want_arch) != (host_os, host_arch) or want_variant not in (None, host_variant or default_variant):
        raise UsageError(f"--platform {text}: this host runs {host}, and mesobox runs only the host's platform",
                         hint=f"drop --platform, or give --platform {host}")


NO_MOUNT_NAMES = ("home", "tmp", "cwd", "bind-paths", "hostfs")


def no_mount(opts: RunOptions) -> frozenset[str]:
    """--no-mount (Apptainer's names, comma lists ok), --no-home and --home: the default
    binds left out: names, or a site bind's destination."""
    skip = set()
    for text in opts.no_mount:
        for item in text.split(","):
            item = item.strip()
            if item.startswith("/"):
                skip.add(os.path.normpath(item))
            elif item in NO_MOUNT_NAMES:
                skip.add(item)
            elif item in ("proc", "sys", "dev", "devpts"):
                raise UsageError(f"--no-mount {item}: mesobox always makes /proc, /sys, a minimal /dev and "
                                 "/dev/pts of its own", hint=f"--no-mount takes {', '.join(NO_MOUNT_NAMES)} or a "
                                                             "site bind's destination")
            else:
                raise UsageError(f"bad --no-mount value {item[:80]!r}",
                                 hint=f"one of {', '.join(NO_MOUNT_NAMES)}, or a site bind's destination")
    if opts.no_home or opts.home is not None:
        skip.add("home")  # --home binds its own instead
    return frozenset(skip)


def _destination(dst: str, what: str) -> str:
    if not os.path.isabs(dst) or ".." in dst.split("/") or os.path.normpath(dst) == "/":
        raise UsageError(f"bad {what} destination {dst[:80]!r}", hint="use an absolute path other than /, "
                                                                      "without '..'")
    return os.path.normpath(dst)


def parse_volume(text: str) -> tuple[str, str, bool]:
    """Docker's ``-v SRC:DST[:OPTS]`` for a host path (a bind; OPTS ro or rw)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise UsageError(f"bad -v/--volume {text[:80]!r}", hint="use -v SRC:DST[:ro|rw]")
    src, dst = parts[0], parts[1]
    if not src.startswith(("/", ".")):
        raise UsageError(f"-v {text[:80]}: {src!r} names a Docker volume; mesobox binds host paths only",
                         hint=f"give a path: -v /path/to/{src}:{dst} (or ./{src}:{dst})")
    options = set(parts[2].split(",")) if len(parts) == 3 else {"rw"}
    if not options <= {"ro", "rw"} or options == {"ro", "rw"}:
        raise UsageError(f"bad -v/--volume options {parts[2][:40]!r} in {text[:80]!r}",
                         hint="ro or rw (SELinux labels and propagation modes are not mesobox's)")
    return src, _destination(dst, "-v/--volume"), "ro" in options


def parse_mount(text: str) -> tuple[str, str, bool] | S.Mount:
    """Docker's ``--mount``: type=bind (a bind tuple) or type=tmpfs (a tmpfs Mount)."""
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key = {"src": "source", "dst": "target", "destination": "target", "ro": "readonly"}.get(key, key)
        if key == "readonly" and value in ("", "true", "1", "false", "0") and (eq or not value):
            fields[key] = "false" if value in ("false", "0") else "true"
            continue
        if not eq or not value or key in fields:
            raise UsageError(f"bad --mount field {item[:80]!r} in {text[:80]!r}",
                             hint="use type=bind,source=SRC,target=DST[,readonly] or "
                                  "type=tmpfs,target=DST[,tmpfs-size=SIZE][,tmpfs-mode=MODE]")
        fields[key] = value
    kind, target = fields.pop("type", ""), fields.pop("target", "")
    if kind not in ("bind", "tmpfs"):
        raise UsageError(f"--mount {text[:80]}: type {kind!r} is not mesobox's" if kind else
                         f"--mount {text[:80]}: no type", hint="type=bind or type=tmpfs")
    if not target:
        raise UsageError(f"--mount {text[:80]}: no target", hint="add target=DST")
    readonly = fields.pop("readonly", "false") == "true"
    if kind == "bind":
        source = fields.pop("source", "")
        if not source or fields:
            raise UsageError(f"--mount {text[:80]}: " + (f"unknown field {sorted(fields)[0]!r}" if source else
                                                         "no source"),
                             hint="type=bind takes source, target and readonly")
        return source, _destination(target, "--mount"), readonly
    size, mode = fields.pop("tmpfs-size", None), fields.pop("tmpfs-mode", None)
    if fields or readonly:
        raise UsageError(f"--mount {text[:80]}: " + (f"unknown field {sorted(fields)[0]!r}" if fields else
                                                     "a read-only tmpfs would stay empty"),
                         hint="type=tmpfs takes target, tmpfs-size and tmpfs-mode")
    return tmpfs_mount(target, size, mode, "--mount")


def parse_tmpfs(text: str) -> S.Mount:
    """Docker's ``--tmpfs DST[:size=SIZE,mode=MODE,noexec]``."""
    dst, _, options = text.partition(":")
    size = mode = None
    noexec = False
    for item in options.split(",") if options else ():
        key, eq, value = item.partition("=")
        if key == "size" and eq:
            size = value
        elif key == "mode" and eq:
            mode = value
        elif item in ("noexec", "exec", "rw", "nosuid", "nodev"):
            noexec = noexec or item == "noexec"
        else:
            raise UsageError(f"bad --tmpfs option {item[:40]!r} in {text[:80]!r}",
                             hint="use --tmpfs DST[:size=SIZE,mode=MODE,noexec] (always nosuid,nodev)")
    return tmpfs_mount(dst, size, mode, "--tmpfs", noexec)


def tmpfs_mount(dst: str, size: str | None, mode: str | None, what: str, noexec: bool = False) -> S.Mount:
    """A private tmpfs at ``dst``, nosuid and nodev; Docker's default mode 1777."""
    options = ["nosuid", "nodev", *(("noexec",) if noexec else ())]
    mode = mode or "1777"
    if not (mode.isascii() and mode.isdigit() and set(mode) <= set("01234567") and int(mode, 8) <= 0o7777):
        raise UsageError(f"bad {what} mode {mode[:20]!r}", hint="an octal mode such as 1777 or 755")
    options.append(f"mode={int(mode, 8):o}")
    if size is not None:
        from mesobox.sizes import parse_size

        options.append(f"size={parse_size(size, what + ' size')}")
    return S.Mount(destination=_destination(dst, what), type="tmpfs", source="tmpfs", options=tuple(options))


def parse_home(text: str) -> tuple[str, str]:
    """Apptainer's ``--home SRC[:DST]`` → (host directory, home inside)."""
    src, _, dst = text.partition(":")
    if not src or ":" in dst:
        raise UsageError(f"bad --home {text[:80]!r}", hint="use --home SRC[:DST]")
    return src, _destination(dst or os.path.abspath(src), "--home")


def _docker_mounts(opts: RunOptions, binds: list[tuple[str, str, bool]]) -> tuple[list[tuple[str, str, bool]],
                                                                                  list[S.Mount]]:
    """-B binds plus --home, -v and --mount type=bind ones; and the tmpfs mounts of
    --tmpfs and --mount type=tmpfs.  Every bind gets the checks of a -B bind."""
    binds = list(binds)
    tmpfs: list[S.Mount] = []
    if opts.home is not None:
        src, dst = parse_home(opts.home)
        binds.append((src, dst, False))
    binds += [parse_volume(text) for text in opts.volumes]
    for text in opts.mounts:
        mount = parse_mount(text)
        if isinstance(mount, S.Mount):
            tmpfs.append(mount)
        else:
            binds.append(mount)
    tmpfs += [parse_tmpfs(text) for text in opts.tmpfs]
    return binds, tmpfs


def user_option(text: str, image: Image, uid_maps: tuple[S.IdMap, ...], gid_maps: tuple[S.IdMap, ...],
                own: tuple[int, int], fakeroot: bool) -> tuple[int, int]:
    """--user UID[:GID] or NAME[:GROUP] (the image's /etc files): honoured where those ids
    are mapped (--fakeroot with a sub-id range, real root); the caller's own ids are."""
    uid, gid = resolve_user(text, image, "--user")
    if ":" not in text and uid == own[0] and not fakeroot:
        gid = own[1]  # `--user $(id -u)`: one's own group, not the image's guess
    if _mapped(uid, uid_maps) and _mapped(gid, gid_maps):
        return uid, gid
    have = ", ".join(str(m.container_id) if m.size == 1 else f"{m.container_id}-{m.container_id + m.size - 1}"
                     for m in uid_maps)
    if fakeroot and len(uid_maps) > 1:
        hint = "pick ids your sub-id range maps (the uids above)"
    elif fakeroot:
        hint = "--fakeroot maps other ids only with a sub-id range in /etc/subuid and /etc/subgid: ask the site"
    else:
        hint = "use --fakeroot (uid 0 inside; with a sub-id range, --fakeroot --user UID:GID for other ids)"
    raise UsageError(f"--user {text[:40]}: uid {uid} gid {gid} is not mapped in this container (uids mapped: "
                     f"{have})", hint=hint)


def _mapped(number: int, maps: tuple[S.IdMap, ...]) -> bool:
    return any(m.container_id <= number < m.container_id + m.size for m in maps)


def parse_ulimits(texts: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    """Docker's ``--ulimit NAME=SOFT[:HARD]`` (HARD defaults to SOFT; -1 or unlimited:
    none) → process.rlimits; a name given twice: the last counts."""
    limits: dict[str, tuple[int, int]] = {}
    for text in texts:
        name, eq, values = text.partition("=")
        kind = "RLIMIT_" + name.upper()
        if not eq or kind not in S.RLIMIT_TYPES or not name.islower():
            names = ", ".join(k[7:].lower() for k in S.RLIMIT_TYPES)
            raise UsageError(f"bad --ulimit {text[:80]!r}", hint=f"use NAME=SOFT[:HARD], NAME one of {names}")
        soft_text, _, hard_text = values.partition(":")
        soft = _limit(soft_text, text)
        hard = _limit(hard_text, text) if hard_text else soft
        if soft > hard:
            raise UsageError(f"--ulimit {text[:80]}: the soft limit exceeds the hard one")
        limits[kind] = (soft, hard)
    return tuple((kind, soft, hard) for kind, (soft, hard) in limits.items())


def _limit(text: str, whole: str) -> int:
    if text in ("-1", "unlimited"):
        return S.RLIM_INFINITY
    if not (text.isascii() and text.isdigit()) or int(text) >= S.RLIM_INFINITY:
        raise UsageError(f"bad --ulimit value {text[:40]!r} in {whole[:80]!r}",
                         hint="a whole number, or -1 (unlimited)")
    return int(text)


def parse_dns(texts: tuple[str, ...]) -> tuple[str, ...]:
    """--dns IP[,IP] (repeatable): the name servers, checked as addresses."""
    import ipaddress

    servers = []
    for text in texts:
        for item in text.split(","):
            try:
                servers.append(str(ipaddress.ip_address(item.strip())))
            except ValueError:
                raise UsageError(f"bad --dns server {item[:80]!r}: not an IP address",
                                 hint="use --dns IP[,IP...]") from None
    return tuple(servers)
