"""Image verbs: pull, images, inspect, rm, prune, export.

Wiring only: parse options (the option table's parser), call the image room
(image/pull.py, image/store.py, image/export.py), print.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mesobox.cli import print_json
from mesobox.cli.usage import parse
from mesobox.config import Config
from mesobox.errors import ImageNotFound, InvalidReference
from mesobox.image.store import ImageRecord, Store


def main_pull(argv: list[str], config: Config) -> int:
    parsed = parse("pull", argv)
    if parsed is None:
        return 0
    values, (reference,) = parsed
    import time

    from mesobox.image.pull import pull_image

    started = time.monotonic()
    fmt = values.get("format", config.default_format)
    result = pull_image(config, reference, fmt, platform=values.get("platform"),
                        insecure=bool(values.get("insecure")), quiet=bool(values.get("quiet")))
    if values.get("json"):
        record = result.record
        path = record.squashfs if fmt == "squashfs" else record.rootfs
        print_json({"reference": record.reference, "digest": record.digest, "platform": record.platform,
                    "format": fmt, "path": str(path) if path else None, "size": record.size,
                    "squashfsDigest": record.squashfs_sha256 or None, "fetched": result.fetched,
                    "seconds": round(time.monotonic() - started, 3)})
        return 0
    sys.stdout.write(result.record.digest + "\n")
    return 0


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def _formats(record: ImageRecord) -> str:
    return ",".join(name for name, path in (("squashfs", record.squashfs), ("dir", record.rootfs)) if path)


def main_images(argv: list[str], config: Config) -> int:
    parsed = parse("images", argv)
    if parsed is None:
        return 0
    values, _ = parsed
    records = Store(config).records()
    if values.get("json"):
        rows = [
            {"reference": r.reference, "digest": r.digest, "platform": r.platform, "size": r.size,
             "formats": _formats(r).split(",") if _formats(r) else [], "created": r.created,
             "store": str(r.store), "squashfs": str(r.squashfs) if r.squashfs else None,
             "rootfs": str(r.rootfs) if r.rootfs else None}
            for r in records
        ]
        print_json(rows)
        return 0
    sys.stdout.write(f"{'REFERENCE':<50} {'DIGEST':<19} {'PLATFORM':<12} {'SIZE':>9}  FORMATS\n")
    for r in records:
        sys.stdout.write(
            f"{r.reference:<50} {r.digest[7:19]:<19} {r.platform:<12} {_human(r.size):>9}  {_formats(r)}\n"
        )
    return 0


def config_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The image config's fields ``inspect`` shows, for a stored image or a file."""
    return {
        "Env": cfg.get("Env") or [],
        "Entrypoint": cfg.get("Entrypoint"),
        "Cmd": cfg.get("Cmd"),
        "WorkingDir": cfg.get("WorkingDir") or "",
        "User": cfg.get("User") or "",
        "Labels": cfg.get("Labels") or {},
    }


def inspect_data(record: ImageRecord) -> dict[str, Any]:
    cfg = record.config
    return {
        "Reference": record.reference,
        "Digest": record.digest,
        "IndexDigest": record.index_digest,
        "MediaType": record.media_type,
        "Platform": record.platform,
        "ConfigDigest": record.config_digest,
        "Layers": [layer["digest"] for layer in record.layers],
        "Size": record.size,
        **config_fields(cfg),
        "Squashfs": str(record.squashfs) if record.squashfs else None,
        # Reproducible (image/squashfs.py): the same manifest gives this digest in every
        # store the same user (or root) flattened.
        "SquashfsDigest": record.squashfs_sha256 or None,
        "Rootfs": str(record.rootfs) if record.rootfs else None,
    }


def main_inspect(argv: list[str], config: Config) -> int:
    parsed = parse("inspect", argv)
    if parsed is None:
        return 0
    values, (name,) = parsed
    kind = values.get("type")
    if kind != "instance" and _is_image_path(name):
        print_json(file_inspect_data(name))
        return 0
    if kind != "instance":
        try:
            print_json(inspect_data(Store(config).require(name)))
            return 0
        except (ImageNotFound, InvalidReference):
            if kind == "image" or not _is_instance(config, name):
                if _path_shaped(name):
                    raise ImageNotFound(f"no such image file or directory: {name}") from None
                raise
    from mesobox.instances import state

    inst = state.load(config, name)
    print_json({**inst.summary(), "options": inst.spec.get("options", []), "args": inst.spec.get("args", [])})
    return 0


def _path_shaped(name: str) -> bool:
    """A name that can only be a file or directory (specbuild's rules)."""
    from mesobox.launch.specbuild import IMAGE_FILE_SUFFIXES

    return name.startswith(("/", "./", "../")) or name in (".", "..") or name.endswith(IMAGE_FILE_SUFFIXES)


def _is_image_path(name: str) -> bool:
    """``name`` names a file or directory that is there (an instance's name never starts
    with ./ or /, and a bare name that is also a reference is the reference, as for run)."""
    import os

    from mesobox.launch.specbuild import is_path_name

    return is_path_name(name) and os.path.lexists(name)


def file_inspect_data(name: str) -> dict[str, Any]:
    """What a squashfs file or directory image holds: the image config a file written by
    ``mesobox export`` carries (image/portable.py), and the sha256 of its squashfs part,
    hashed now (the store's SquashfsDigest of the image it came from)."""
    import os

    from mesobox.console import warn
    from mesobox.image.portable import read_file
    from mesobox.launch.specbuild import path_image

    image = path_image(name)  # the checks and errors of a launch
    data: dict[str, Any] = {"Path": image.path, "Format": image.format}
    if image.format == "dir":
        warn(f"{name} is a directory: it carries no image config (it runs /bin/sh by default)")
        return {**data, "ImageConfig": False}
    trailer, end = read_file(image.path)
    found = trailer or {"config": {}}
    cfg = found["config"]
    digest = _sha256_prefix(image.path, end)
    data.update({
        "ImageConfig": trailer is not None,
        "Reference": found.get("reference"),
        "Digest": found.get("digest"),
        "IndexDigest": found.get("indexDigest"),
        "Platform": found.get("platform"),
        "ConfigDigest": found.get("configDigest"),
        "Size": os.stat(image.path).st_size,
        **config_fields(cfg),
        "StopSignal": cfg.get("StopSignal") or "",
        "SquashfsDigest": digest,
    })
    if trailer is None:
        warn(f"{name} carries no image config (not written by `mesobox export --format squashfs`): "
             "it runs /bin/sh by default")
    elif found.get("squashfsDigest") not in (None, digest):
        warn(f"{name}: its squashfs is not the one its image config was exported with "
             f"({found['squashfsDigest']}): the config may not describe it")
    return data


def _sha256_prefix(path: str, size: int) -> str:
    """"sha256:HEX" of the first ``size`` bytes of ``path``."""
    import hashlib

    from mesobox.image.store import HASH_CHUNK

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left and (chunk := f.read(min(HASH_CHUNK, left))):
            digest.update(chunk)
            left -= len(chunk)
    return "sha256:" + digest.hexdigest()


def _is_instance(config: Config, name: str) -> bool:
    from mesobox.errors import UsageError
    from mesobox.instances import state

    try:
        return state.instance_dir(config, state.check_name(name)).is_dir()
    except UsageError:
        return False


def main_rm(argv: list[str], config: Config) -> int:
    parsed = parse("rm", argv)
    if parsed is None:
        return 0
    _, references = parsed
    store = Store(config)
    for ref in references:
        record = store.remove_record(ref)
        sys.stdout.write(f"removed {record.reference}\n")
    return 0


def main_prune(argv: list[str], config: Config) -> int:
    if parse("prune", argv) is None:
        return 0
    store = Store(config)
    store.init()
    count, freed = store.prune()
    sys.stdout.write(f"pruned {count} entries, {_human(freed)} freed\n")
    return 0


def main_export(argv: list[str], config: Config) -> int:
    parsed = parse("export", argv)
    if parsed is None:
        return 0
    values, (reference,) = parsed
    from mesobox.image.export import export

    out = export(config, reference, values["format"], Path(values["output"]))
    sys.stdout.write(f"{out}\n")
    return 0
