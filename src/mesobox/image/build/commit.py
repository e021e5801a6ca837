"""The built image into the store, in the same forms a pull leaves (image/pull.py).

Config, manifest (OCI) and layer blobs under ``blobs/``; the flattened rootfs or
squashfs made by ``pull.flatten`` from those blobs (the same hardened extractor, the
same checks); the image record last.  ``mesobox run``, ``images``, ``inspect``,
``export`` and ``push`` then treat it as any pulled image.

The config's ``created`` and the history's times are those of the cache entries that
made the layers (or SOURCE_DATE_EPOCH when set): a rebuild wholly from the cache gives
the same config, manifest and digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from mesobox.config import Config
from mesobox.image.manifest import DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR, OCI_CONFIG, OCI_MANIFEST

OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
_OCI_TYPES = {DOCKER_LAYER_GZIP: OCI_LAYER_GZIP, DOCKER_LAYER_TAR: OCI_LAYER_TAR}


def iso_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def oci_layer_type(media_type: str) -> str:
    """A Docker layer type's OCI name (the same bytes)."""
    return _OCI_TYPES.get(media_type, media_type)


def put_blob(store: Any, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    def write(partial: Path) -> None:
        partial.write_bytes(data)

    store.ensure_blob(digest, write, len(data))
    return digest


def put_layer_file(store: Any, path: str, digest: str, size: int) -> None:
    """A layer tar.gz written by changes.write_layer, moved into the store."""

    def move(partial: Path) -> None:
        os.replace(path, partial)

    store.ensure_blob(digest, move, size)
    if os.path.exists(path):
        os.unlink(path)  # it was stored already


def commit(config: Config, reference: str, image_config: dict[str, Any], layers: list[dict[str, Any]],
           fmt: str) -> Any:
    """Store the image; returns its ImageRecord."""
    from mesobox.image.imageconfig import checked_config
    from mesobox.image.pull import flatten
    from mesobox.image.reference import parse_reference
    from mesobox.image.store import ImageRecord, Store

    store = Store(config)
    store.init()
    canonical = str(parse_reference(reference))
    config_bytes = json.dumps(image_config, separators=(",", ":")).encode()
    with store.in_use():
        config_digest = put_blob(store, config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": [{"mediaType": layer["media_type"], "digest": layer["digest"], "size": layer["size"]}
                       for layer in layers],
        }
        manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
        digest = put_blob(store, manifest_bytes)
        record = ImageRecord(
            reference=canonical, digest=digest, rootfs=None, squashfs=None,
            config=checked_config(image_config.get("config"), f"built image {canonical}"),
            platform=f"{image_config.get('os', 'linux')}/{image_config.get('architecture', '')}",
            config_digest=config_digest, layers=tuple(layers), index_digest=None, media_type=OCI_MANIFEST,
            size=len(config_bytes) + sum(int(layer["size"]) for layer in layers),
            created=str(image_config.get("created", "")), store=store.root)
        check = flatten(store, digest, record.layers, fmt, reference=canonical)
        with store.lock("images"):
            if check is None:
                known = store.squashfs_checks(digest)
                check = next(iter(known)) if len(known) == 1 else None
            if check is not None:
                record = dataclasses.replace(record, squashfs_size=check[0], squashfs_sha256=check[1])
            store.write_record(record)
        final = store.lookup(canonical)
    return final
