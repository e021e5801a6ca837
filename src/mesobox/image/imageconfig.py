"""Image configs: the OCI image config's ``config`` object, checked and normalised.

Room: image/imageconfig.  Called where an image record is made (``pull.make_record``,
and by the archive sources while they resolve) and by the runtime before a launch, so it
imports nothing beyond mesobox.errors (json only to word an error), and costs one pass
over the config.  It is idempotent:
a normalised config passes through unchanged.

Rules (OCI image-spec config.md; Docker's ``strslice`` for Cmd/Entrypoint):

- a missing or ``null`` config is ``{}``; anything else must be a JSON object;
- ``Cmd``, ``Entrypoint``: ``null``, a list of strings, or one JSON string, which is a
  one-element list (``"echo hi"`` is ``["echo hi"]``, never split into characters);
- ``Env``: a list of ``"NAME=VALUE"`` strings with a non-empty NAME;
- ``WorkingDir``, ``StopSignal``: strings;
- ``User``: ``""`` or ``USER[:GROUP]``, each a name or a number below 2**32-1
  (``(uid_t)-1`` means "unchanged" to setresuid(2), so it is never a real id);
- ``Labels``: an object of strings; ``ExposedPorts``, ``Volumes``: objects;
- no string anywhere in those fields contains a NUL (it cannot reach execve(2) or an
  environment intact, and it would silently cut the value short).

Other keys are kept as they are (mesobox reads none of them).  A violation raises
ImageConfigError (exit 6) with one line naming the image and the field; a hostile config never
becomes a traceback or an "internal error".
"""

from __future__ import annotations

from mesobox.errors import ImageConfigError

TYPE_CHECKING = False  # typing costs ≈5 ms of a launch: this runs before stored images start
if TYPE_CHECKING:
    from typing import Any, NoReturn

MAX_ID = 2**32 - 2  # the largest valid uid/gid: (uid_t)-1 is reserved
_STRING_LISTS = ("Cmd", "Entrypoint")
_STRINGS = ("WorkingDir", "StopSignal")
_OBJECTS = ("ExposedPorts", "Volumes")


def checked_config(config: object, where: str) -> dict[str, Any]:
    """The image config's ``config`` object, normalised; ImageConfigError when it is malformed."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        _refuse(where, "config", "must be a JSON object", config)
    out: dict[str, Any] = dict(config)
    for key in _STRING_LISTS:
        if out.get(key) is not None:
            out[key] = _string_list(out[key], where, key)
    if out.get("Env") is not None:
        out["Env"] = _env(out["Env"], where)
    for key in _STRINGS:
        if out.get(key) is not None:
            _string(out[key], where, key)
    if out.get("User") is not None:
        _user(out["User"], where)
    if out.get("Labels") is not None:
        _labels(out["Labels"], where)
    for key in _OBJECTS:
        if out.get(key) is not None and not isinstance(out[key], dict):
            _refuse(where, key, "must be a JSON object", out[key])
    return out


def _refuse(where: str, field: str, problem: str, value: object) -> NoReturn:
    raise ImageConfigError(f"{where}: {field} {problem}, got {_show(value)}",
                     hint="the image is malformed or hostile; fix its config and push it again")


def _show(value: object) -> str:
    """A short, one-line rendering of a JSON value (NULs and newlines escaped)."""
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _string(value: object, where: str, field: str) -> str:
    if not isinstance(value, str):
        _refuse(where, field, "must be a string", value)
    if "\x00" in value:
        _refuse(where, field, "contains a NUL byte", value)
    return value


def _string_list(value: object, where: str, field: str) -> list[str]:
    if isinstance(value, str):
        return [_string(value, where, field)]  # Docker's strslice: one string, one argument
    if not isinstance(value, list):
        _refuse(where, field, "must be a list of strings", value)
    return [_string(item, where, f"{field}[{i}]") for i, item in enumerate(value)]


def _env(value: object, where: str) -> list[str]:
    if not isinstance(value, list):
        _refuse(where, "Env", 'must be a list of "NAME=VALUE" strings', value)
    out = []
    for i, item in enumerate(value):
        text = _string(item, where, f"Env[{i}]")
        if text.find("=") < 1:
            _refuse(where, f"Env[{i}]", 'must be "NAME=VALUE" with a non-empty NAME', item)
        out.append(text)
    return out


def _user(value: object, where: str) -> None:
    text = _string(value, where, "User")
    if not text:
        return
    parts = text.split(":")
    if len(parts) > 2:
        _refuse(where, "User", "must be USER or USER:GROUP", value)
    for part, what in zip(parts, ("user", "group"), strict=False):
        if part.isascii() and part.isdigit():
            if int(part) > MAX_ID:
                _refuse(where, "User", f"has a {what} id above {MAX_ID}", value)
        elif not part or part.startswith("-") or not part.isprintable() or any(c.isspace() or c == "/" for c in part):
            _refuse(where, "User", f"has an invalid {what} name", value)


def _labels(value: object, where: str) -> None:
    if not isinstance(value, dict):
        _refuse(where, "Labels", "must be a JSON object of strings", value)
    for key, item in value.items():
        _string(key, where, "Labels key")
        _string(item, where, f"Labels[{_show(key)}]")
