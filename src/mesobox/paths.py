"""Where mesobox keeps per-user state, as far as the environment alone says; how that
runtime directory is trusted; how a private cache record there is read and written.

The runtime directory (``$XDG_RUNTIME_DIR/mesobox``, else ``/tmp/mesobox-UID``, or
``runtime_dir``) holds each user's shared squashfs mounts, the container workspace,
instances and caches.  Its name in /tmp is predictable, so another user may have made
it first, or planted a symlink there, to have the victim mount, bind, write or delete
where the attacker chooses.  ``runtime_dir`` therefore trusts a directory only when it
is the caller's own, is not a symlink, is writable by nobody else, and no ancestor
lets another user replace it (each ancestor belongs to root or the caller and is
writable by nobody else unless sticky, as /tmp is): then nobody but the caller (and
root) can change anything below it, and paths inside need no further checks against
other users.  Anything else is refused with one line that says what to do; nothing is
ever reused, chmod'ed or deleted on someone else's behalf.

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
    """The site file: /etc/mesobox/mesobox.toml wherever an admin installed one;
    ``$MESOBOX_SITE_CONFIG`` only where there is none (tests, installs without /etc
    access), so a user cannot swap the site's settings and ``lock`` for their own."""
    if os.path.lexists(SITE_CONFIG):
        return SITE_CONFIG
    return env.get("MESOBOX_SITE_CONFIG", SITE_CONFIG)


def user_config(env: dict[str, str] | os._Environ[str]) -> str:
    return env.get("MESOBOX_CONFIG") or os.path.join(xdg(env, "XDG_CONFIG_HOME", "~/.config"), "mesobox",
                                                      "mesobox.toml")


def default_store(env: dict[str, str] | os._Environ[str]) -> str:
    return os.path.join(xdg(env, "XDG_DATA_HOME", "~/.local/share"), "mesobox")


def default_runtime_dir(env: dict[str, str] | os._Environ[str]) -> str:
    """Per-user runtime state (instances, shared mounts): never on a shared filesystem."""
    base = env.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base) and os.path.isdir(base) and os.access(base, os.W_OK):
        return os.path.join(base, "mesobox")
    return f"/tmp/mesobox-{outer_uid()}"


def logout_safe(runtime_dir: str, env: dict[str, str] | os._Environ[str]) -> str:
    """Where state that must outlive the login session lives (instances, and the runs
    their supervisors start): ``runtime_dir``, unless it lies in the login manager's
    per-session directory ($XDG_RUNTIME_DIR, /run/user/UID), which pam_systemd removes
    at the user's last logout while a detached instance keeps running; then the
    node-local fallback /tmp/mesobox-UID (per node like the instance, kept until
    reboot).  Either way it is trusted only through ``runtime_dir`` (private checks)."""
    volatile = [f"/run/user/{os.getuid()}"]
    base = env.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base):
        volatile.append(os.path.normpath(base))
    path = os.path.normpath(runtime_dir)
    if any(top != "/" and (path == top or path.startswith(top + "/")) for top in volatile):
        return f"/tmp/mesobox-{outer_uid()}"
    return runtime_dir


def outer_uid() -> int:
    """The caller's uid as the parent user namespace knows it.  Root inside a
    ``--fakeroot`` container is an ordinary user outside: it shares that user's
    /tmp/mesobox-UID (shown to it as its own), never real root's /tmp/mesobox-0 (shown
    as unmapped), which it could not trust.  Only uid 0 reads the map: an ordinary
    uid is the same one level up in every map mesobox makes."""
    uid = os.getuid()
    if uid != 0:
        return uid
    try:
        with open("/proc/self/uid_map", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    # The line that maps uid 0 wherever it is: newuidmap writes the lines in the order
    # it was given (--fakeroot with sub-ids), so it need not be the first.
    for line in lines:
        inside, outside, _count = [*line.split(), b"", b"", b""][:3]
        if inside == b"0" and outside.isdigit():
            return int(outside)
    return 0


def cache_root(env: dict[str, str] | os._Environ[str]) -> str:
    """Where per-user caches live (parsed config files, saved launch programs): the runtime dir
    as far as the environment alone says — a runtime_dir set *in* a config file cannot
    move the cache of that very file.  A relative MESOBOX_RUNTIME_DIR is refused by
    the config; here it only means the default place."""
    base = os.path.expanduser(env.get("MESOBOX_RUNTIME_DIR") or "")
    return base if os.path.isabs(base) else default_runtime_dir(env)


# --- the runtime directory: trusted only when private -----------------------------------

_checked: set[str] = set()  # runtime dirs this process has found private (fork keeps it)
_DIR_FLAGS_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def _unsafe(path: str, why: str, hint: str | None = None) -> Exception:
    from mesobox.errors import UnsafeDirectory

    return UnsafeDirectory(
        f"runtime directory {path} {why}",
        hint=hint or "set MESOBOX_RUNTIME_DIR to a directory of your own (mode 0700) on local disk, "
                     "or ask an admin to remove the foreign one (docs/security.md)")


def _foreign(path: str, uid: int) -> Exception:
    return _unsafe(path, f"belongs to uid {uid}, not to you: another user may have made it to take over "
                         "your containers; mesobox will not use it")


def runtime_dir(path: str) -> str:
    """``path``, made if missing (mode 0700), once it is known to be the caller's
    private directory (see the module docstring); UnsafeDirectory otherwise."""
    if path in _checked:
        return path
    if not os.path.isabs(path):
        raise _unsafe(path, "is not an absolute path", "set runtime_dir / MESOBOX_RUNTIME_DIR to an absolute path")
    fd = _open_or_make(path)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise _foreign(path, st.st_uid)
        if st.st_mode & 0o022:
            raise _unsafe(path, f"is writable by other users (mode {st.st_mode & 0o7777:04o}): "
                                "what it holds cannot be trusted")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)  # readable by others (made so by an older mesobox): ours to tighten
        _check_ancestors(path, fd)
    except OSError as err:  # an unsearchable parent, a refused chmod: one line, never a traceback
        raise _unsafe(path, f"cannot be checked: {err.strerror}") from None
    finally:
        os.close(fd)
    _checked.add(path)
    return path


def forget_checked(path: str) -> None:
    """Check ``path`` again at its next ``runtime_dir`` (a long-lived process whose
    runtime dir may have been deleted meanwhile: an instance's supervisor)."""
    _checked.discard(path)


def _open_or_make(path: str) -> int:
    """An fd of the directory ``path`` (never through a symlink at its last
    component), made with its missing parents, each 0700, if need be."""
    for _ in range(2):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        except OSError as err:
            import errno

            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _unsafe(path, "is a symlink or not a directory: another user may have planted it; "
                                    "mesobox will not follow it") from None
            try:
                owner = os.lstat(path).st_uid
            except OSError:
                owner = os.geteuid()
            if owner != os.geteuid():
                raise _foreign(path, owner) from None
            raise _unsafe(path, f"cannot be opened: {err.strerror}") from None
        try:
            _make_dirs(path)
        except OSError as err:
            raise _unsafe(path, f"cannot be created: {err.strerror}") from None
    raise _unsafe(path, "keeps disappearing")


def _make_dirs(path: str) -> None:
    """``mkdir -p`` where every directory made is 0700 (os.makedirs gives the parents
    0755); one that exists already (another launch made it meanwhile) is checked by
    the caller like any other."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent == path:
            raise
        _make_dirs(parent)
        try:  # noqa: SIM105 - contextlib costs an import on the launch path
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass


def _check_ancestors(path: str, fd: int) -> None:
    """Every directory above ``fd``, found through ``..`` (so a symlinked path checks
    the real parents), must let nobody but root and the caller rename what it holds."""
    parent = os.open("..", _DIR_FLAGS_PATH, dir_fd=fd)
    try:
        below = os.fstat(fd)
        while True:
            st = os.fstat(parent)
            if (st.st_dev, st.st_ino) == (below.st_dev, below.st_ino):
                return  # "/" is its own parent
            if not _trusted_owner(st.st_uid):
                raise _unsafe(path, f"lies in a directory of uid {st.st_uid}, who could replace it")
            if st.st_mode & 0o022 and not st.st_mode & 0o1000:
                raise _unsafe(path, "lies in a directory other users may write to (and it is not sticky), "
                                    "so they could replace it")
            up = os.open("..", _DIR_FLAGS_PATH, dir_fd=parent)
            os.close(parent)
            parent, below = up, st
    finally:
        os.close(parent)


def _trusted_owner(uid: int) -> bool:
    """Root, the caller, or — inside a user namespace, where host root's directories
    (/tmp, /) show as the overflow uid — that overflow uid (user_namespaces(7))."""
    if uid in (0, os.geteuid()):
        return True
    try:
        with open("/proc/sys/kernel/overflowuid", "rb") as f:
            overflow = int(f.read())
        with open("/proc/self/uid_map", "rb") as f:
            initial = f.read().split() == [b"0", b"0", b"4294967295"]
    except (OSError, ValueError):
        return False
    return uid == overflow and not initial


def private_subdir(top: str, *names: str) -> str:
    """``top/names…`` below the private runtime dir ``top``, each made 0700 if missing
    and refused unless it is the caller's own directory (not a symlink)."""
    path = runtime_dir(top)
    for name in names:
        path = os.path.join(path, name)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            st = os.lstat(path)
            if (st.st_mode & 0o170000) != 0o040000 or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise _unsafe(path, "is not a private directory of yours") from None
    return path


# --- private records ----------------------------------------------------------------------

MAX_BYTES = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def own(st: os.stat_result) -> bool:
    """Belongs to the caller and is writable by nobody else."""
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def load_cached(directory: str, name: str, fmt: int, signature: Any) -> Any:
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


def save_cached(directory: str, name: str, fmt: int, signature: Any, payload: Any) -> bool:
    """Best effort; False when nothing was written (unwritable, foreign directory,
    data marshal cannot hold, too big).  ``directory`` is a subdirectory of a runtime
    dir (``cache_root``), which must be private (``runtime_dir``)."""
    try:
        data = marshal.dumps((fmt, signature, payload))
    except ValueError:
        return False
    if len(data) > MAX_BYTES:
        return False
    try:
        private_subdir(os.path.dirname(directory), os.path.basename(directory))
        dir_fd = os.open(directory, _DIR_FLAGS)
    except Exception:  # UnsafeDirectory too: an unusable runtime dir only means no cache
        return False
    try:
        if not own(os.fstat(dir_fd)):
            return False
        from mesobox.files import write_atomic

        write_atomic(name, data, dir_fd=dir_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(dir_fd)


# A file changed this recently may change again within the same timestamp and size
# (git's "racy" files): caches keyed on (mtime, size) never trust such a file.
RACY_NS = 2_000_000_000


def racy(mtime_ns: int) -> bool:
    """Changed so recently that another change could keep the same timestamp and size."""
    import time

    return abs(time.time_ns() - mtime_ns) < RACY_NS
