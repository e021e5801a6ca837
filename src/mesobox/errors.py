"""Typed errors: every failure mesobox expects is one of these.

Each carries a one-line ``message``, an optional ``hint`` (what to do next) and the
process ``exit_code``.  They are caught at exactly one boundary, ``mesobox.cli.main``,
which prints ``mesobox: error: …`` / ``hint: …`` and exits; a traceback is shown only
with ``--debug``.  Stdlib only: imported on the ``mesobox run`` hot path.

Exit codes follow the container-runtime convention for ``run``/``exec``
(125 runtime failure, 126 command not executable, 127 command not found, 128+N
killed by signal N) and are otherwise distinct per kind of failure so that scripts
can tell a bad reference (2) from a missing image (4) or a registry outage (3).
"""

from __future__ import annotations


class MesoboxError(Exception):
    """Base class.  ``str(err)`` is the message alone."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(MesoboxError):
    """Bad command line or bad option value (bind spec, size, platform…)."""

    exit_code = 2


class ConfigError(MesoboxError):
    """A configuration file or ``MESOBOX_*`` variable is malformed."""

    exit_code = 2


class InvalidReference(UsageError):
    """An image reference that cannot be parsed."""


class RegistryError(MesoboxError):
    """The registry answered with an error, or could not be reached."""

    exit_code = 3


class AuthError(RegistryError):
    """Authentication with the registry failed (401/403)."""


class ImageNotFound(MesoboxError):
    """No such image: in the registry, the archive or the store."""

    exit_code = 4


class DigestMismatch(MesoboxError):
    """Content did not match the digest that names it: never used, never stored."""

    exit_code = 5


class LayerError(MesoboxError):
    """A layer is malformed, hostile (escapes the rootfs) or over the size limit."""

    exit_code = 6


class ImageConfigError(LayerError):
    """An image config is malformed or hostile (Cmd, Env, User…): never launched."""


class StoreError(MesoboxError):
    """The content store could not be read or written (full disk, permissions…)."""

    exit_code = 7


class PolicyError(MesoboxError):
    """Site policy forbids what was asked (bind source not allowed, …)."""

    exit_code = 13


class LaunchError(MesoboxError):
    """The container could not be set up (namespaces, mounts, pivot_root…)."""

    exit_code = 125


class UnsafeDirectory(LaunchError):
    """A directory mesobox would keep state in is not the caller's private one: another
    user could have made it, or could replace it (paths.runtime_dir)."""


class CommandNotExecutable(LaunchError):
    """The command exists in the container but cannot be executed."""

    exit_code = 126


class CommandNotFound(LaunchError):
    """The command does not exist in the container."""

    exit_code = 127


def os_error_text(err: BaseException) -> str:
    """An unexpected OSError as words ("/x: Permission denied"), not "[Errno 13] …"."""
    if isinstance(err, OSError) and err.strerror:
        names = [repr(n) if isinstance(n, bytes) else str(n) for n in (err.filename, err.filename2) if n]
        return f"{' -> '.join(names)}: {err.strerror}" if names else err.strerror
    return str(err)
