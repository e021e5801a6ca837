"""Image references: what the user typed, parsed and normalised once.

Room: image/reference.  Invariants:
- ``parse_reference(str(ref)) == ref`` for every Reference this module returns
  (canonical form round-trips; property-tested).
- Registry references follow the distribution/reference grammar: lowercase path
  components, tags ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``, digests validated by
  ``parse_digest`` (so they are safe as file names, CVE-2024-3727).
- Docker Hub is always spelled ``docker.io`` and its one-component names get the
  ``library/`` prefix there only (as ``docker pull ubuntu`` does).
- Archive paths are absolute (made so against the current directory).
- Import-light: ``mesobox run`` parses the image name to find it in the store, so this
  module avoids ``re`` and ``dataclasses`` (≈15 ms of start-up together); the grammar
  is checked by hand and ``Reference`` is a frozen slotted class.
"""

from __future__ import annotations

import os

from mesobox.errors import InvalidReference
from mesobox.image.digest import parse_digest

DOCKER_HUB = "docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
ARCHIVE_TRANSPORTS = ("oci", "oci-archive", "docker-archive")

_LOWER_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_ALNUM = _LOWER_ALNUM | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TAG_CHARS = _ALNUM | frozenset("_.-")
_MAX_NAME = 255
_MAX_TAG = 128
_HOST_CHARS = _ALNUM | frozenset("-")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")


def _is_component(text: str) -> bool:
    """distribution/reference: ``[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*``."""
    if not text or text[0] not in _LOWER_ALNUM or text[-1] not in _LOWER_ALNUM:
        return False
    separator = ""
    for char in text:
        if char in _LOWER_ALNUM:
            if separator not in ("", ".", "_", "__") and set(separator) != {"-"}:
                return False
            separator = ""
        else:
            separator += char
    return True


def _is_tag(text: str) -> bool:
    """``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``."""
    return 0 < len(text) <= _MAX_TAG and text[0] in _ALNUM | {"_"} and _TAG_CHARS.issuperset(text)


def _is_label(label: str) -> bool:
    return bool(label) and label[0] in _ALNUM and label[-1] in _ALNUM and _HOST_CHARS.issuperset(label)


def _is_domain(text: str) -> bool:
    """``host[:port]``: DNS labels (alnum, inner hyphens) or a bracketed IPv6 address."""
    if text.startswith("["):
        address, bracket, port = text[1:].partition("]")
        if not bracket or not address or not _IPV6_CHARS.issuperset(address):
            return False
        if port:
            port = port[1:] if port.startswith(":") and len(port) > 1 else "x"
        return not port or (port.isascii() and port.isdigit())
    host, colon, port = text.partition(":")
    if colon and not (port.isascii() and port.isdigit()):
        return False
    return all(_is_label(label) for label in host.split("."))


# Field order of Reference (constructor order, as a dataclass would have it).
_FIELDS = ("transport", "registry", "repository", "tag", "digest", "path")


class Reference:
    """A parsed reference; frozen, hashable, compared by value (like a frozen dataclass)."""

    __slots__ = _FIELDS
    transport: str  # "docker" | "oci" | "oci-archive" | "docker-archive"
    registry: str  # "docker.io", "127.0.0.1:5000", "ghcr.io"
    repository: str  # "library/ubuntu"
    tag: str | None  # "latest" by default when there is no digest
    digest: str | None
    path: str  # archives: absolute file or directory

    def __init__(self, transport: str, registry: str = "", repository: str = "", tag: str | None = None,
                 digest: str | None = None, path: str = "") -> None:
        for name, value in zip(_FIELDS, (transport, registry, repository, tag, digest, path), strict=True):
            object.__setattr__(self, name, value)

    def _fields(self) -> tuple[str | None, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Reference is frozen: use ref.replace(...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={value!r}" for name, value in zip(_FIELDS, self._fields(), strict=True))
        return f"Reference({inner})"

    def replace(self, **changes: str | None) -> Reference:
        values = dict(zip(_FIELDS, self._fields(), strict=True))
        values.update(changes)
        return Reference(**values)  # type: ignore[arg-type]

    def __str__(self) -> str:
        if self.transport == "docker":
            text = f"docker://{self.registry}/{self.repository}"
            if self.tag:
                text += ":" + self.tag
            if self.digest:
                text += "@" + self.digest
            return text
        suffix = f":{self.tag}" if self.tag else ""
        return f"{self.transport}:{self.path}{suffix}"

    @property
    def name(self) -> str:
        """``registry/repository`` for docker references, the path for archives."""
        return f"{self.registry}/{self.repository}" if self.transport == "docker" else self.path


def parse_reference(text: str) -> Reference:
    """Parse a user-typed reference; raise InvalidReference with a hint when malformed."""
    if not text or text.strip() != text:
        raise InvalidReference(f"bad image reference {text!r}: empty or surrounded by spaces",
                               hint="for example docker://docker.io/library/ubuntu:24.04 or ubuntu:24.04")
    for transport in ARCHIVE_TRANSPORTS:
        if text.startswith(transport + ":") and not text.startswith(transport + "://"):
            return _parse_archive(transport, text[len(transport) + 1:], text)
    if text.startswith("docker://"):
        return parse_docker_name(text[len("docker://"):], text)
    if "://" in text:
        raise InvalidReference(f"bad image reference {text!r}: unknown transport {text.split('://')[0]!r}",
                               hint="known: docker://, oci:, oci-archive:, docker-archive:")
    return parse_docker_name(text, text)


def _parse_archive(transport: str, rest: str, text: str) -> Reference:
    # containers-transports(5): the path ends at the first ':' (paths with ':' are not
    # expressible), the rest names the image inside the layout or archive.
    path, _, tag = rest.partition(":")
    if not path:
        raise InvalidReference(f"bad image reference {text!r}: no path after {transport}:",
                               hint=f"{transport}:/path/to/{'dir' if transport == 'oci' else 'file.tar'}[:TAG]")
    if transport == "docker-archive" and tag:
        if not (tag.startswith("@") and tag[1:].isdigit()):
            parse_docker_name(tag, text)  # validate; kept as written, matched against RepoTags
    elif tag and not _is_tag(tag):
        raise InvalidReference(f"bad image reference {text!r}: bad tag {tag!r}",
                               hint="tags are up to 128 of A-Z a-z 0-9 _ . - (not starting with . or -)")
    return Reference(transport, path=os.path.abspath(path), tag=tag or None)


def parse_docker_name(name: str, text: str | None = None) -> Reference:
    """Parse ``[HOST[:PORT]/]PATH[:TAG][@DIGEST]`` into a normalised docker Reference."""
    text = name if text is None else text
    remainder, _, digest = name.partition("@")
    if digest:
        try:
            parse_digest(digest)
        except InvalidReference as err:
            raise InvalidReference(f"bad image reference {text!r}: {err.message}", hint=err.hint) from None
    registry, path = _split_registry(remainder, text)
    path, tag = _split_tag(path, text)
    _check_path(path, text)
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in path:
            path = "library/" + path
    if tag is None and not digest:
        tag = "latest"
    return Reference("docker", registry=registry, repository=path, tag=tag, digest=digest or None)


def _split_registry(name: str, text: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    # distribution/reference normalize.go: the first component is a host when it has a
    # '.' or ':' or is "localhost"; otherwise the name lives on Docker Hub.
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not _is_domain(first):
            raise InvalidReference(f"bad image reference {text!r}: bad registry host {first!r}",
                                   hint="a registry is HOST or HOST:PORT, e.g. ghcr.io or 127.0.0.1:5000")
        return first, rest
    return DOCKER_HUB, name


def _split_tag(path: str, text: str) -> tuple[str, str | None]:
    head, sep, tag = path.rpartition(":")
    if not sep:
        return path, None
    if "/" in tag or not _is_tag(tag):
        raise InvalidReference(f"bad image reference {text!r}: bad tag {tag!r}",
                               hint="tags are up to 128 of A-Z a-z 0-9 _ . - (not starting with . or -)")
    return head, tag


def _check_path(path: str, text: str) -> None:
    if not path:
        raise InvalidReference(f"bad image reference {text!r}: no repository name",
                               hint="for example ubuntu, library/ubuntu or ghcr.io/owner/name")
    if len(path) > _MAX_NAME:
        raise InvalidReference(f"bad image reference {text!r}: repository name longer than {_MAX_NAME}")
    for component in path.split("/"):
        if _is_component(component):
            continue
        if _is_component(component.lower()):
            raise InvalidReference(f"bad image reference {text!r}: repository {path!r} has uppercase letters",
                                   hint=f"repository names must be lowercase: try {path.lower()!r}")
        raise InvalidReference(f"bad image reference {text!r}: bad repository component {component!r}",
                               hint="components are lowercase a-z 0-9 separated by '.', '_', '__' or '-'")
