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
from mesobox.image.store import ImageRecord, Store


def main_pull(argv: list[str], config: Config) -> int:
    parsed = parse("pull", argv)
    if parsed is None:
        return 0
    values, (reference,) = parsed
    from mesobox.image.pull import pull_image

    result = pull_image(config, reference, values.get("format", config.default_format),
                        platform=values.get("platform"), insecure=bool(values.get("insecure")),
                        quiet=bool(values.get("quiet")))
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
        "Env": cfg.get("Env") or [],
        "Entrypoint": cfg.get("Entrypoint"),
        "Cmd": cfg.get("Cmd"),
        "WorkingDir": cfg.get("WorkingDir") or "",
        "User": cfg.get("User") or "",
        "Labels": cfg.get("Labels") or {},
        "Squashfs": str(record.squashfs) if record.squashfs else None,
        "Rootfs": str(record.rootfs) if record.rootfs else None,
    }


def main_inspect(argv: list[str], config: Config) -> int:
    parsed = parse("inspect", argv)
    if parsed is None:
        return 0
    _, (reference,) = parsed
    print_json(inspect_data(Store(config).require(reference)))
    return 0


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
