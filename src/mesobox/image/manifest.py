"""Manifests: parsing OCI / Docker schema2 manifests and indexes, choosing a platform.

Room: image/manifest.  Invariants:
- Only image manifests with schemaVersion 2 are accepted (Docker schema1 is refused
  with advice); every descriptor's digest passes ``parse_digest`` before it is used.
- An index entry is chosen by os/architecture/variant; no match is ImageNotFound
  listing the platforms that exist.
Media types: OCI image-spec media-types.md and Docker "Image Manifest V2, Schema 2".
"""

from __future__ import annotations

import json
from typing import Any

from mesobox.errors import ImageNotFound, RegistryError, UsageError
from mesobox.image.digest import parse_digest
from mesobox.image.reference import Reference
from mesobox.image.source import Descriptor, ResolvedImage, host_platform

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

IMAGE_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution spec: registries may refuse larger


def load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise RegistryError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return value


def media_type_of(data: bytes, header: str | None) -> str:
    """The manifest's media type: its own ``mediaType`` field, else the Content-Type header."""
    doc = load_json(data, "manifest")
    own = doc.get("mediaType")
    if isinstance(own, str) and own:
        return own
    if header and header.split(";")[0].strip() not in ("", "application/json", "text/plain"):
        return header.split(";")[0].strip()
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1[0]
    # OCI allows omitting mediaType: an index has "manifests", an image "config"+"layers".
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise RegistryError(f"{what}: descriptor is not an object")
    digest, size, media_type = raw.get("digest"), raw.get("size"), raw.get("mediaType", "")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"{what}: descriptor lacks a valid digest or size")
    parse_digest(digest)
    annotations = raw.get("annotations") or {}
    if not isinstance(annotations, dict):
        annotations = {}
    return Descriptor(str(media_type), digest, size, {str(k): str(v) for k, v in annotations.items()})


def parse_image_manifest(data: bytes, media_type: str) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """(config, layers) of an image manifest."""
    if media_type in DOCKER_SCHEMA1:
        raise RegistryError("Docker schema1 manifests are not supported",
                            hint="re-push the image with a current tool (it then gets a schema2/OCI manifest)")
    if media_type not in IMAGE_MANIFESTS:
        raise RegistryError(f"unsupported manifest media type {media_type!r}")
    doc = load_json(data, "manifest")
    if doc.get("schemaVersion") != 2:
        raise RegistryError(f"manifest schemaVersion {doc.get('schemaVersion')!r} is not 2")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise RegistryError("manifest has no layers list")
    config = descriptor(doc.get("config"), "manifest config")
    return config, tuple(descriptor(layer, f"manifest layer {i}") for i, layer in enumerate(layers))


def parse_platform(text: str | None) -> tuple[str, str, str | None]:
    """``os/arch[/variant]`` → parts; None → this host's platform."""
    parts = (text or host_platform()).split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"bad platform {text!r}", hint="use OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64/v8")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def format_platform(raw: dict[str, Any]) -> str:
    text = f"{raw.get('os', '?')}/{raw.get('architecture', '?')}"
    return text + (f"/{raw['variant']}" if raw.get("variant") else "")


def _variant_matches(arch: str, wanted: str | None, have: str | None) -> bool:
    if wanted is None:
        return True
    # containerd platforms: arm64 without a variant means v8.
    default = "v8" if arch == "arm64" else None
    return (have or default) == wanted


def select_from_index(data: bytes, platform: str | None, where: str) -> tuple[Descriptor, str]:
    """The index entry for ``platform`` and its platform string; ImageNotFound otherwise."""
    doc = load_json(data, "image index")
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError(f"image index of {where} has no manifests list")
    want_os, want_arch, want_variant = parse_platform(platform)
    available = []
    for i, entry in enumerate(entries):
        raw = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(raw, dict):
            continue
        available.append(format_platform(raw))
        if (raw.get("os"), raw.get("architecture")) == (want_os, want_arch) and _variant_matches(
            want_arch, want_variant, raw.get("variant")
        ):
            return descriptor(entry, f"image index entry {i}"), format_platform(raw)
    wanted = "/".join(p for p in (want_os, want_arch, want_variant) if p)
    raise ImageNotFound(
        f"{where} has no image for platform {wanted}; available: {', '.join(available) or 'none'}",
        hint="choose one with --platform OS/ARCH[/VARIANT]",
    )


def config_platform(config_bytes: bytes) -> str:
    doc = load_json(config_bytes, "image config")
    return format_platform(doc)


def check_platform(have: str, platform: str | None, where: str) -> None:
    """A single-manifest image must match an explicitly requested platform."""
    if platform is None:
        return
    want_os, want_arch, want_variant = parse_platform(platform)
    h_os, h_arch, h_variant = parse_platform(have) if have.count("/") in (1, 2) else ("?", "?", None)
    if (h_os, h_arch) != (want_os, want_arch) or not _variant_matches(h_arch, want_variant, h_variant):
        raise ImageNotFound(f"{where} is for platform {have}, not {platform}",
                            hint=f"omit --platform or use --platform {have}")


def make_resolved(
    ref: Reference, data: bytes, media_type: str, digest: str, platform: str, index_digest: str | None
) -> ResolvedImage:
    config, layers = parse_image_manifest(data, media_type)
    return ResolvedImage(ref, digest, data, media_type, config, layers, platform, index_digest)
