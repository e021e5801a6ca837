"""CLI wiring for ``mesobox build``: options → image/build → the digest on stdout.

Wiring only; the build itself is image/build/ (imported here, never by a launch).
"""

from __future__ import annotations

import os
import sys

from mesobox.cli.usage import parse
from mesobox.config import Config
from mesobox.errors import UsageError

DOCKERFILE_NAMES = ("Dockerfile", "Containerfile")
MAX_DOCKERFILE = 1 << 20


def main_build(argv: list[str], config: Config) -> int:
    parsed = parse("build", argv)
    if parsed is None:
        return 0
    values, (context_dir,) = parsed
    from mesobox.image.build.builder import Builder, Options
    from mesobox.image.build.context import Context
    from mesobox.image.build.dockerfile import parse as parse_dockerfile

    path = _dockerfile(context_dir, values.get("file"))
    text = _read(path)
    df = parse_dockerfile(text, path)
    context = Context(context_dir)
    options = Options(tag=values["tag"], build_args=build_args(values.get("build_args") or ()),
                      target=values.get("target"), no_cache=bool(values.get("no_cache")),
                      fmt=values.get("format") or config.default_format)
    from mesobox.image.reference import parse_reference

    parse_reference(options.tag)  # a bad name is refused before anything is built
    record = Builder(config, df, context, options).build()
    sys.stdout.write(record.digest + "\n")
    return 0


def build_args(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``--build-arg NAME=VALUE``; ``NAME`` alone takes $NAME from here (left out when unset)."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not name:
            raise UsageError(f"bad --build-arg {item!r}", hint="--build-arg NAME=VALUE")
        if eq:
            out[name] = value
        elif name in os.environ:
            out[name] = os.environ[name]
    return out


def _dockerfile(context: str, given: str | None) -> str:
    if given:
        return given
    for name in DOCKERFILE_NAMES:
        path = os.path.join(context, name)
        if os.path.isfile(path):
            return path
    raise UsageError(f"no Dockerfile or Containerfile in {context}", hint="give one with -f FILE")


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DOCKERFILE + 1)
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from None
    if len(data) > MAX_DOCKERFILE:
        raise UsageError(f"{path} is larger than {MAX_DOCKERFILE} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
