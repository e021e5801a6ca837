"""Configuration: one frozen ``Config`` built once and passed explicitly.

Precedence, highest first: command line (applied by the CLI with
``dataclasses.replace``) > ``MESOBOX_*`` environment variables > user file
(``$XDG_CONFIG_HOME/mesobox/mesobox.toml``) > site file
(``/etc/mesobox/mesobox.toml``, or ``$MESOBOX_SITE_CONFIG``) > defaults.

The site file may also set ``lock = [...]``: keys a user file or environment variable
may not override (for example ``allowed_bind_sources``).  Keys are documented in
docs/admin.md.  Stdlib only; TOML is parsed only when a file exists.

Registries are configured per host with flat keys like every other: ``insecure_registries``
(plain HTTP allowed), ``registry_mirrors`` (``"REGISTRY=MIRROR"`` entries, tried in order
before the registry) and ``registry_certs_dirs`` (certs.d directories of per-registry CAs
and client certificates), e.g.::

    insecure_registries = ["mirror.cluster.local:5000"]
    registry_mirrors = ["docker.io=mirror.cluster.local:5000/hub", "ghcr.io=mirror.cluster.local:5000/ghcr"]
"""

from __future__ import annotations

import os

from mesobox import paths
from mesobox.errors import ConfigError

# typing and pathlib cost ≈15 ms of `mesobox run` start-up (pathlib pulls in re,
# fnmatch and urllib.parse): paths are kept as strings and turned into Path objects
# only when a caller asks.  mypy reads TYPE_CHECKING like typing's.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

SITE_CONFIG = paths.SITE_CONFIG


def default_store() -> str:
    return paths.default_store(os.environ)


def default_runtime_dir() -> str:
    """Per-user runtime state (instances, shared mounts): never on a shared filesystem."""
    return paths.default_runtime_dir(os.environ)


_PATHY = ("store", "ro_stores", "runtime_dir")


class Config:
    """Frozen settings.  A plain class with ``__slots__`` rather than a dataclass:
    importing ``dataclasses`` pulls in ``inspect``, ``re`` and ``enum`` (≈10 ms), more
    than half of the start-up budget of ``mesobox run``."""

    # (name, default) in documentation order; see docs/admin.md.
    FIELDS: tuple[tuple[str, object], ...] = (
        # Image store (the only writable one) and read-only site caches consulted first.
        ("store", None),
        ("ro_stores", ()),
        # Registries that may be reached over plain HTTP (host or host:port); loopback
        # addresses always may.  A mirror is a registry of its own here.
        ("insecure_registries", ()),
        # Pull mirrors, "REGISTRY=MIRROR" (REGISTRY: host or host:port, docker.io for
        # Docker Hub; MIRROR: host[:port][/path-prefix]), asked in order before the
        # registry itself, which a pull falls back to (image/registry.py).
        ("registry_mirrors", ()),
        # Directories of per-registry certificates, podman's and docker's certs.d layout
        # (HOST:PORT/*.crt CAs, *.cert + *.key client certificates), the first holding the
        # host winning; an ordinary user's ~/.config/containers/certs.d comes before them.
        ("registry_certs_dirs", ("/etc/containers/certs.d", "/etc/docker/certs.d")),
        # Binds added to every container unless --contain: "SRC[:DST[:ro|rw]]".
        ("default_binds", ()),
        # If not empty, bind sources must lie under one of these directories.
        ("allowed_bind_sources", ()),
        # Directories of CDI specs (--device VENDOR/CLASS=NAME), in order: a later one's
        # device of the same name wins.
        ("cdi_spec_dirs", ("/etc/cdi", "/var/run/cdi")),
        # --nv / --rocm: the driver libraries to bind, by name prefix (empty: mesobox's
        # lists in launch/gpu.py; Apptainer's nvliblist.conf).
        ("nv_libraries", ()),
        ("rocm_libraries", ()),
        # --nv / --rocm: where the GPU device nodes are ("": /dev) and the ldconfig cache
        # file to read ("": the host's); for tests of a fake driver tree.
        ("gpu_dev_dir", ""),
        ("gpu_ld_cache", ""),
        # --rdma (and --mpi host): where the RDMA device nodes are ("": /dev/infiniband),
        # the libibverbs config directory ("": /etc/libibverbs.d) and the ldconfig cache
        # file host libraries are found in ("": the host's); for tests of a fake tree.
        ("rdma_dev_dir", ""),
        ("rdma_config_dir", ""),
        ("host_ld_cache", ""),
        # Pull limits: uncompressed bytes per image; parallel layer downloads.
        ("max_image_bytes", 64 * 1024**3),
        ("max_parallel_downloads", 4),
        # Keep setuid/setgid bits when root pulls (site policy); never for users.
        ("keep_setuid_for_root", False),
        # mksquashfs compressor; "zstd" falls back to "gzip" when unsupported.
        ("squashfs_compression", "zstd"),
        # Format for `mesobox pull` and for implicit pulls by `run`.
        ("default_format", "squashfs"),
        # Per-user runtime state (instances, shared squashfs mounts).
        ("runtime_dir", None),
        # Seconds a shared squashfs mount stays after its last user (0: unmount at once):
        # the next run of the image then finds it mounted and its page cache warm.
        ("squashfs_linger", 10.0),
        # Reuse the launch program of an identical command line while nothing it depends
        # on has changed (launch/plancache.py); false: compile every launch.
        ("plan_cache", True),
        # Every container gets the default seccomp filter: --security-opt seccomp=unconfined
        # and profile files are refused (lock it in the site file to make it the site's rule).
        ("require_seccomp", False),
        # The image trust policy (containers-policy.json syntax, docs/trust.md), checked at
        # every pull and launch when the file exists.  Site file only (SITE_ONLY_KEYS).
        ("policy_file", "/etc/mesobox/policy.json"),
        # Refuse to launch an image whose last `mesobox scan` found something at or above
        # this severity (LOW, MEDIUM, HIGH, CRITICAL; "": no such rule; image/scan.py).
        # Site file only (SITE_ONLY_KEYS).
        ("refuse_scan_severity", ""),
        ("debug", False),
    )
    __slots__ = tuple(("_" + name) if name in _PATHY else name for name, _ in FIELDS)

    insecure_registries: tuple[str, ...]
    registry_mirrors: tuple[str, ...]
    registry_certs_dirs: tuple[str, ...]
    default_binds: tuple[str, ...]
    allowed_bind_sources: tuple[str, ...]
    cdi_spec_dirs: tuple[str, ...]
    nv_libraries: tuple[str, ...]
    rocm_libraries: tuple[str, ...]
    gpu_dev_dir: str
    gpu_ld_cache: str
    rdma_dev_dir: str
    rdma_config_dir: str
    host_ld_cache: str
    max_image_bytes: int
    max_parallel_downloads: int
    keep_setuid_for_root: bool
    squashfs_compression: str
    default_format: str
    squashfs_linger: float
    plan_cache: bool
    require_seccomp: bool
    policy_file: str
    refuse_scan_severity: str
    debug: bool
    _store: str
    _ro_stores: tuple[str, ...]
    _runtime_dir: str

    def __init__(self, **values: Any) -> None:
        for name, default in self.FIELDS:
            value = values.pop(name, default)
            if value is None:
                value = default_store() if name == "store" else default_runtime_dir()
            if name == "ro_stores":
                value = tuple(os.fspath(v) for v in value)
            elif name in _PATHY:
                value = os.fspath(value)
            object.__setattr__(self, ("_" + name) if name in _PATHY else name, value)
        if values:
            raise TypeError(f"unknown Config fields: {sorted(values)}")

    @property
    def store(self) -> Path:
        from pathlib import Path

        return Path(self._store)

    @property
    def runtime_dir(self) -> Path:
        from pathlib import Path

        return Path(self._runtime_dir)

    @property
    def runtime_dir_str(self) -> str:
        """runtime_dir as a string, for the launch path (no pathlib import)."""
        return self._runtime_dir

    @property
    def store_str(self) -> str:
        return self._store

    @property
    def ro_stores(self) -> tuple[Path, ...]:
        from pathlib import Path

        return tuple(Path(p) for p in self._ro_stores)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Config is frozen: use config.replace(...)")

    def replace(self, **changes: Any) -> Config:
        values = {name: getattr(self, name) for name, _ in self.FIELDS}
        values.update(changes)
        return Config(**values)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name, _ in self.FIELDS)
        return f"Config({inner})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and all(
            getattr(self, n) == getattr(other, n) for n, _ in self.FIELDS
        )

    __hash__ = None  # type: ignore[assignment]


_PATH_KEYS = {"store", "runtime_dir", "policy_file"}
_PATHS_KEYS = {"ro_stores", "cdi_spec_dirs", "registry_certs_dirs"}
_TUPLE_KEYS = {"insecure_registries", "default_binds", "allowed_bind_sources", "nv_libraries", "rocm_libraries",
               "registry_mirrors"}
_INT_KEYS = {"max_image_bytes", "max_parallel_downloads"}
_BOOL_KEYS = {"keep_setuid_for_root", "plan_cache", "require_seccomp", "debug"}
_STR_KEYS = {"squashfs_compression", "default_format", "gpu_dev_dir", "gpu_ld_cache", "rdma_dev_dir",
             "rdma_config_dir", "host_ld_cache"}
_SECONDS_KEYS = {"squashfs_linger"}
# Keys only the site file may set: neither a user file nor the environment, locked or
# not (a user who could name the trust policy could name an empty one).
SITE_ONLY_KEYS = {"policy_file", "refuse_scan_severity"}
_SEVERITY_KEYS = {"refuse_scan_severity"}


def _coerce(key: str, value: Any, origin: str) -> Any:
    """Turn a TOML or environment value into the field's type, or raise ConfigError."""
    try:
        if key in _PATH_KEYS:
            if not isinstance(value, str):
                raise TypeError
            path = os.path.expanduser(value)
            if key in ("runtime_dir", "policy_file") and not os.path.isabs(path):
                # relative to the cwd: another directory (and mount) for every cwd
                raise ConfigError(f"{origin}: {key} must be an absolute path, not {value!r}")
            return path
        if key in _PATHS_KEYS or key in _TUPLE_KEYS:
            items = value.split(":" if key in _PATHS_KEYS else ",") if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
                raise TypeError
            items = [i.strip() for i in items if i.strip()]
            if key == "allowed_bind_sources" and not all(os.path.isabs(i) for i in items):
                raise ValueError
            if key == "registry_mirrors" and not all(_is_mirror_entry(i) for i in items):
                raise ValueError
            if key in _PATHS_KEYS:
                return tuple(os.path.expanduser(i) for i in items)
            return tuple(items)
        if key in _INT_KEYS:
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        if key in _BOOL_KEYS:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if key in _STR_KEYS:
            if not isinstance(value, str):
                raise TypeError
            return value
        if key in _SEVERITY_KEYS:
            if not isinstance(value, str) or value.strip().upper() not in ("", "LOW", "MEDIUM", "HIGH", "CRITICAL"):
                raise ValueError
            return value.strip().upper()
        if key in _SECONDS_KEYS:
            if isinstance(value, bool):
                raise TypeError
            seconds = float(value)
            if not 0 <= seconds < float("inf"):  # also rejects nan
                raise ValueError
            return seconds
    except (TypeError, ValueError):
        raise ConfigError(
            f"{origin}: bad value for {key!r}: {value!r}", hint="see docs/admin.md for the expected types"
        ) from None
    raise ConfigError(f"{origin}: unknown setting {key!r}", hint="see docs/admin.md for the known keys")


def _is_mirror_entry(entry: str) -> bool:
    """``REGISTRY=MIRROR``: two names without a scheme or spaces (image/registry.py checks
    the MIRROR's grammar when a pull uses it)."""
    registry, equals, mirror = entry.partition("=")
    return bool(equals and registry.strip() and mirror.strip()) and not any(
        bad in entry for bad in ("://", " ", "\t", "@")) and "=" not in mirror


def _read_toml(path: str, cache_dir: str | None = None) -> dict[str, Any]:
    """The parsed TOML file at ``path`` ({} if there is none), through the parse cache
    in ``cache_dir`` when one is given."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        signature = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        # A file changed in the last seconds may change again within one timestamp tick
        # at the same size (git's "racy" files): parse it, cache it only once it is older.
        if cache_dir and paths.racy(st.st_mtime_ns):
            cache_dir = None
        cached = _cache_load(cache_dir, signature) if cache_dir else None
        if cached is not None:
            return cached
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    finally:
        os.close(fd)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
    try:
        parsed: dict[str, Any] = tomllib.loads(b"".join(chunks).decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    if cache_dir:
        _cache_store(cache_dir, signature, parsed)
    return parsed


# --- parse cache ---------------------------------------------------------------------------
# Importing tomllib costs ≈25 ms here (it pulls in re, typing, datetime, string): more
# than a whole `mesobox run`, paid by every MPI rank on a site with a config file.  So
# each file's parse is cached, per user, as marshal data keyed by the file's identity
# (device, inode, size, mtime, ctime): an edited file is parsed again (and a file edited
# in the last 2 s is never cached: see paths.racy).  The cache lives in the per-user runtime
# directory and is used only if that directory and the file are the user's own and
# writable by nobody else (paths.py, which says why that is enough).

_CACHE_FORMAT = 1


def parse_cache_dir(env: dict[str, str]) -> str:
    """Where parsed config files are cached (paths.cache_root: the environment alone)."""
    return os.path.join(paths.cache_root(env), "config")


def _cache_name(signature: tuple[Any, ...]) -> str | None:
    name = signature[0].replace("%", "%25").replace("/", "%2F") + ".marshal"
    return name if len(name) < 250 else None


def _cache_load(cache_dir: str, signature: tuple[Any, ...]) -> dict[str, Any] | None:
    name = _cache_name(signature)
    parsed = paths.load_cached(cache_dir, name, _CACHE_FORMAT, signature) if name else None
    return parsed if isinstance(parsed, dict) else None


def _cache_store(cache_dir: str, signature: tuple[Any, ...], parsed: dict[str, Any]) -> None:
    """Best effort: TOML dates, which marshal cannot hold, are parsed again next time."""
    name = _cache_name(signature)
    if name is not None:
        paths.save_cached(cache_dir, name, _CACHE_FORMAT, signature, parsed)


def _locked_keys(value: Any, origin: str, known: set[str]) -> set[str]:
    """The site's ``lock``: a list of setting names.  Anything else is an error rather
    than a lock that silently locks nothing (``lock = "key"`` is not ``["key"]``)."""
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{origin}: 'lock' must be a list of setting names, not {value!r}",
                          hint='e.g. lock = ["allowed_bind_sources", "require_seccomp"]')
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{origin}: 'lock' names unknown settings {unknown}",
                          hint="see docs/admin.md for the known keys")
    return set(value)


def load_config(env: dict[str, str] | None = None) -> Config:
    """Build the Config from site file, user file and environment."""
    env = dict(os.environ) if env is None else env
    known = {name for name, _ in Config.FIELDS}
    values: dict[str, Any] = {
        "store": default_store(),
        "runtime_dir": default_runtime_dir(),
    }
    cache = parse_cache_dir(env)
    site_path = paths.site_config(env)
    site = _read_toml(site_path, cache)
    locked = _locked_keys(site.pop("lock", []), site_path, known)
    for key, value in site.items():
        values[key] = _coerce(key, value, str(site_path))
    user_path = paths.user_config(env)
    for key, value in _read_toml(user_path, cache).items():
        if key in SITE_ONLY_KEYS:
            raise ConfigError(f"{user_path}: {key!r} can be set only in the site file")
        if key in locked:
            raise ConfigError(f"{user_path}: {key!r} is set by the site and cannot be changed")
        values[key] = _coerce(key, value, str(user_path))
    for key in known:
        var = "MESOBOX_" + key.upper()
        if var in env and key in SITE_ONLY_KEYS:
            raise ConfigError(f"{var}: {key!r} can be set only in the site file", hint=f"unset {var}")
        if var in env and key not in locked:
            values[key] = _coerce(key, env[var], var)
    return Config(**values)
