"""Image sources: the common types every transport (registry, OCI layout, archives) returns.

Room: image/source.  Invariants:
- A ``ResolvedImage`` only ever holds a manifest whose bytes were checked against
  ``manifest_digest`` (by the registry client or the archive reader).
- ``ImageSource.fetch_blob`` never leaves unverified content under ``dest``: on a
  digest or size mismatch it deletes ``dest`` and raises DigestMismatch.
- ``transports.open_source`` imports only the transport asked for (the registry client is never
  imported for archives, nor anything of this room by ``mesobox run``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mesobox.image.reference import Reference

Progress = Callable[[int], None]

# uname(2) machine -> GOARCH/variant, as used by the OCI image-spec platform field
# (image-index.md "platform"; Go's GOARCH values).
_MACHINE_TO_PLATFORM = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm/v7",
    "armv6l": "arm/v6",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "mips64": "mips64le",
    "loongarch64": "loong64",
}


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (image-spec descriptor.md)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ResolvedImage:
    reference: Reference
    manifest_digest: str
    manifest: bytes
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    platform: str  # "linux/amd64", "linux/arm64/v8"
    index_digest: str | None


class ImageSource(Protocol):
    def resolve(self, platform: str | None) -> ResolvedImage:
        """The manifest for ``platform`` ("os/arch[/variant]"; None = this host's)."""
        ...

    def fetch_blob(self, desc: Descriptor, dest: Path, progress: Progress | None = None) -> None:
        """Stream the blob into ``dest`` (resuming a prefix where possible), verified."""
        ...

    def close(self) -> None: ...


def host_platform() -> str:
    """This host as an OCI platform string: ``linux/`` + GOARCH[/variant] of uname's machine."""
    machine = os.uname().machine
    return "linux/" + _MACHINE_TO_PLATFORM.get(machine, machine)
