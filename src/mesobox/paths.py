"""Where mesobox keeps things, as far as the environment alone says.

Stdlib ``os`` only: the launch path (plancache.py) needs these without importing the
config parser.  ``config.py`` builds the full ``Config`` on top of them.
"""

from __future__ import annotations

import os

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
