"""mesobox-oci's ``--log FILE`` / ``--log-format text|json``, as runc writes them.

conmon (podman) passes ``--log FILE --log-format json`` and, when the runtime fails,
reads the last ``msg`` of that file for the error it shows; so every error and warning
is written there too (and to stderr, as runc does), one line each:

- json: ``{"level": "error", "msg": "...", "time": "2026-01-01T00:00:00Z"}``
- text: ``time="2026-01-01T00:00:00Z" level=error msg="..."``

The file is opened O_APPEND|O_CREAT|O_NOFOLLOW for each line (never truncated: conmon may
share it; never through a symlink: root must not append to a file a user links there).
"""

from __future__ import annotations

import json
import os
import sys
import time

_target: tuple[str, str] | None = None  # (path, format)
prog = "mesobox-oci"  # "mesobox" for the alias `mesobox oci`: its lines look like every other verb's


def setup(path: str | None, fmt: str) -> None:
    global _target
    _target = (os.path.abspath(path), fmt) if path else None


def record(level: str, message: str) -> None:
    if _target is None:
        return
    path, fmt = _target
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if fmt == "json":
        line = json.dumps({"level": level, "msg": message, "time": when})
    else:
        line = f"time={json.dumps(when)} level={level} msg={json.dumps(message)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def warn(message: str) -> None:
    sys.stderr.write(f"{prog}: warning: {message}\n")
    record("warning", message)


def error(message: str, hint: str | None = None) -> None:
    sys.stderr.write(f"{prog}: error: {message}\n")
    if hint:
        sys.stderr.write(f"{prog}: hint: {hint}\n")
    record("error", message + (f" ({hint})" if hint else ""))


def debug(message: str) -> None:
    sys.stderr.write(f"{prog}: debug: {message}\n")
    record("debug", message)
