"""Environment room: the container's environment, merged like Apptainer's.

Precedence, lowest first (docs/running.md, "Environment"):
1. the host environment, passed through (Apptainer's default: modules, Slurm and MPI
   variables must reach the rank) — unless ``--cleanenv``, which keeps only
   ``CLEANENV_KEEP`` (terminal and locale basics, HOME/USER);
2. the image ``Env`` (so the image's ``PATH``, ``LD_LIBRARY_PATH``… win over the
   host's: host paths mostly do not exist inside);
3. ``--env-file`` lines, in file order;
4. ``-e/--env K=V`` (``-e K`` alone copies the host value).
``PATH`` and ``HOME`` always end up set.  Stdlib only.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CLEANENV_KEEP = ("HOME", "USER", "LOGNAME", "TERM", "LANG", "LC_ALL", "TZ")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host variables that describe the host session's runtime state and would mislead
# programs inside (they name sockets and directories the container does not have).
DROP = ("LD_PRELOAD", "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "PS1")


def parse_env_option(text: str, host: dict[str, str]) -> tuple[str, str] | None:
    """``-e K=V`` → (K, V); ``-e K`` → host value of K, or None when unset there."""
    key, sep, value = text.partition("=")
    if not key or not _valid_key(key):
        raise _usage_error(f"bad --env value {text!r}", hint="use --env KEY=VALUE")
    if not sep:
        return (key, host[key]) if key in host else None
    return key, value


def read_env_file(path: str) -> list[tuple[str, str]]:
    """Docker --env-file format: KEY=VALUE lines, '#' comments and blank lines ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise _usage_error(f"cannot read env file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise _usage_error(f"env file {path} is not UTF-8 text") from None
    out = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        if not sep or not _valid_key(key):
            raise _usage_error(f"{path}:{number}: expected KEY=VALUE, got {stripped[:40]!r}")
        out.append((key, value))
    return out


def compose(host: dict[str, str], recipe: tuple[Any, ...]) -> tuple[str, ...]:
    """The container's environment from this launch's host environment and the recipe
    make_spec decided: (image Env, cleanenv, --env-file pairs, -e options, home).  A
    saved program keeps the recipe and composes each launch's environment anew."""
    image_env, cleanenv, file_pairs, options, home = recipe
    extra = list(file_pairs)
    for item in options:
        pair = parse_env_option(item, host)
        if pair:
            extra.append(pair)
    return merge(host, image_env, cleanenv, extra, home)


def check(env: tuple[str, ...]) -> None:
    """UsageError for an entry that is not KEY=VALUE."""
    for item in env:
        if "=" not in item or item.startswith("=") or "\0" in item:
            raise _usage_error(f"bad environment entry {item!r}", hint="use KEY=VALUE")


def _usage_error(message: str, hint: str | None = None) -> Exception:
    from mesobox.errors import UsageError  # only on failure: the launch path skips its import

    return UsageError(message, hint=hint)


def _valid_key(key: str) -> bool:
    return "\0" not in key and " " not in key and "=" not in key


def merge(
    host: dict[str, str],
    image_env: list[str] | tuple[str, ...],
    cleanenv: bool,
    extra: list[tuple[str, str]],
    home: str,
) -> tuple[str, ...]:
    """The container's environment as ``KEY=VALUE`` strings."""
    if cleanenv:
        env = {k: host[k] for k in CLEANENV_KEEP if k in host}
    else:
        env = {k: v for k, v in host.items() if k not in DROP}
    for item in image_env:
        key, sep, value = item.partition("=")
        if sep and key:
            env[key] = value
    for key, value in extra:
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env["HOME"] = env.get("HOME") or home
    return tuple(f"{k}={v}" for k, v in env.items())
