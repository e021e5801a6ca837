"""Where mesobox keeps per-user state, as far as the environment alone says, and how a
private cache record there is read and written.

Stdlib ``os`` and ``marshal`` only: the launch path (plancache.py) needs these without
importing the config parser.  ``config.py`` builds the full ``Config`` on top of them.

Private records (``load``/``store``): one marshal record per file, in a directory only
its owner may write.  A record is ``(format, signature, payload)``; ``load`` returns the
payload only when the directory and the file belong to the caller, are writable by
nobody else, the file is not too big, and format and signature are the ones asked for:
anything else (missing, foreign, corrupt, stale) is a miss, never an error.  ``store``
writes a temporary file and renames it into place, so a concurrent reader sees the old
record or the new one, never half of one; a cache that cannot be written only means a
miss next time.  What is cached is the user's own data (parsed config files, launch
plans): a user who rewrites their own cache gains nothing they could not get by running
other options or their own launcher.  Site policy in an unprivileged tool binds the
cooperative, not the determined (docs/admin.md).
"""

from __future__ import annotations

import marshal
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SITE_CONFIG = "/etc/mesobox/mesobox.toml"


def xdg(env: dict[str, str] | os._Environ[str], var: str, default: str) -> str:
    """An XDG base directory: the variable when it is an absolute path, else ``default``."""
    value = env.get(var)
    if value and os.path.isabs(value):
        return value
    return os.path.expanduser(default)


def site_config(env: dict[str, str] | os._Environ[str]) -> str:
    return env.get("MESOBOX_SITE_CONFIG", SITE_CONFIG)


def user_config(env: dict[str, str] | os._Environ[str]) -> str:
    return env.get("MESOBOX_CONFIG") or os.path.join(xdg(env, "XDG_CONFIG_HOME", "~/.config"), "mesobox",
                                                      "mesobox.toml")


def default_store(env: dict[str, str] | os._Environ[str]) -> str:
    return os.path.join(xdg(env, "XDG_DATA_HOME", "~/.local/share"), "mesobox")


def default_runtime_dir(env: dict[str, str] | os._Environ[str]) -> str:
    """Per-user runtime state (instances, shared mounts): never on a shared filesystem."""
    base = env.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        return os.path.join(base, "mesobox")
    return f"/tmp/mesobox-{os.getuid()}"


def cache_root(env: dict[str, str] | os._Environ[str]) -> str:
    """Where per-user caches live (parsed config files, launch plans): the runtime dir
    as far as the environment alone says — a runtime_dir set *in* a config file cannot
    move the cache of that very file."""
    base = env.get("MESOBOX_RUNTIME_DIR")
    if not base:
        xdg_dir = env.get("XDG_RUNTIME_DIR")
        base = os.path.join(xdg_dir, "mesobox") if xdg_dir and os.path.isabs(xdg_dir) else f"/tmp/mesobox-{os.getuid()}"
    return os.path.expanduser(base)


# --- private records ----------------------------------------------------------------------

MAX_BYTES = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def own(st: os.stat_result) -> bool:
    """Belongs to the caller and is writable by nobody else."""
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def load(directory: str, name: str, fmt: int, signature: Any) -> Any:
    """The payload stored under ``name`` for ``signature``, or None."""
    try:
        dir_fd = os.open(directory, _DIR_FLAGS)
    except OSError:
        return None
    try:
        if not own(os.fstat(dir_fd)):
            return None
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not ((st.st_mode & 0o170000) == 0o100000 and own(st) and st.st_size <= MAX_BYTES):
                return None
            # Our own file (checked above), plain data we wrote: see the note above.
            record = marshal.loads(os.read(fd, MAX_BYTES))  # noqa: S302
        finally:
            os.close(fd)
    except (OSError, ValueError, EOFError, TypeError):
        return None
    finally:
        os.close(dir_fd)
    if isinstance(record, tuple) and len(record) == 3 and record[0] == fmt and record[1] == signature:
        return record[2]
    return None


def store(directory: str, name: str, fmt: int, signature: Any, payload: Any) -> bool:
    """Best effort; False when nothing was written (unwritable, foreign directory,
    data marshal cannot hold, too big)."""
    try:
        data = marshal.dumps((fmt, signature, payload))
    except ValueError:
        return False
    if len(data) > MAX_BYTES:
        return False
    try:
        from mesobox.runtime import private_dirs

        private_dirs(directory)
        dir_fd = os.open(directory, _DIR_FLAGS)
    except OSError:
        return False
    temp = f".{name}.{os.getpid()}.tmp"
    try:
        if not own(os.fstat(dir_fd)):
            return False
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return True
    except OSError:
        try:  # noqa: SIM105 - contextlib costs an import on the launch path
            os.unlink(temp, dir_fd=dir_fd)
        except OSError:
            pass
        return False
    finally:
        os.close(dir_fd)
