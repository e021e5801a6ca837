"""Audit verbs: sbom, scan, diff.

Wiring only: parse options (the option table's parser), find the image, call the image
room (image/packages.py reads the packages, image/sbom.py writes SBOMs, image/scan.py
scans and diffs), print.  Never on the ``mesobox run`` path.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from mesobox.cli import print_json
from mesobox.cli.usage import parse
from mesobox.config import Config
from mesobox.errors import ImageNotFound, UsageError
from mesobox.image.packages import Inventory, inventory_of
from mesobox.image.sbom import ImageInfo

# `scan --fail-on`: a finding at or above the level; errors keep their own codes (2 and up)
EXIT_FINDINGS = 1


def find_image(text: str, config: Config) -> ImageInfo:
    """A directory rootfs, a squashfs file or a stored reference (never pulled here)."""
    from mesobox.launch.specbuild import is_path_name

    if is_path_name(text):
        if os.path.isdir(text):
            return ImageInfo(name=text, path=os.path.abspath(text))
        from mesobox import files

        if os.path.isfile(text) and files.is_squashfs(text):
            return ImageInfo(name=text, path=os.path.abspath(text))
        if os.path.lexists(text):
            raise UsageError(f"{text} is neither a directory nor a squashfs image")
        raise ImageNotFound(f"no such image file or directory: {text}")
    from mesobox.image.store import Store

    record = Store(config).lookup(text)
    if record is None:
        raise ImageNotFound(f"image {text!r} is not in the store", hint=f"run `mesobox pull {text}` first")
    path = record.rootfs or record.squashfs
    if path is None:
        raise ImageNotFound(f"image {text!r} has no rootfs or squashfs", hint=f"run `mesobox pull {text}` again")
    return ImageInfo(name=record.reference, digest=record.digest, path=str(path))


def _inventory(image: ImageInfo) -> Inventory:
    inventory = inventory_of(image.path)
    if inventory.notes:
        from mesobox.console import warn

        for note in inventory.notes:
            warn(f"{image.name}: {note}")
    return inventory


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [str(cell).ljust(widths[i]) for i, cell in enumerate(row)]
        sys.stdout.write("  ".join(cells).rstrip() + "\n")


def main_sbom(argv: list[str], config: Config) -> int:
    parsed = parse("sbom", argv)
    if parsed is None:
        return 0
    values, (name,) = parsed
    from mesobox.image.sbom import make_sbom

    image = find_image(name, config)
    print_json(make_sbom(values["format"], image, _inventory(image)))
    return 0


def _scan(image: ImageInfo, inventory: Inventory, feed: Any) -> list[dict[str, Any]]:
    from mesobox.console import warn
    from mesobox.image.scan import scan_inventory

    findings, warnings = scan_inventory(inventory, feed)
    for line in warnings[:20]:
        warn(line)
    if len(warnings) > 20:
        warn(f"… and {len(warnings) - 20} more versions that could not be compared")
    return findings


def main_scan(argv: list[str], config: Config) -> int:
    parsed = parse("scan", argv)
    if parsed is None:
        return 0
    values, (name,) = parsed
    from mesobox.image.sbom import timestamp
    from mesobox.image.scan import LEVELS, highest, level_rank, load_feed, record_scan

    image = find_image(name, config)
    feed = load_feed(values["db"])
    inventory = _inventory(image)
    findings = _scan(image, inventory, feed)
    when = timestamp({})  # the scan's real time: SOURCE_DATE_EPOCH is for documents
    recorded = None
    if image.digest:
        try:
            recorded = str(record_scan(config, image.digest, findings, feed, when))
        except OSError as err:
            from mesobox.console import warn

            warn(f"the scan could not be recorded in the store: {err.strerror or err}")
    if values.get("json"):
        print_json({
            "image": {"name": image.name, "digest": image.digest or None, "path": image.path},
            "os": {"id": inventory.os.id, "version_id": inventory.os.version_id, "name": inventory.os.name},
            "packages": len(inventory.packages),
            "feed": feed.identity,
            "time": when,
            "highest": highest(findings),
            "findings": findings,
            "recorded": recorded,
        })
    else:
        rows = [(f["package"], f["installed"], f["fixed"] or "-", f["advisory"], f["severity"]) for f in findings]
        if rows:
            _table(("PACKAGE", "INSTALLED", "FIXED", "ADVISORY", "SEVERITY"), rows)
        os_text = inventory.os.name or inventory.os.id or "unknown OS"
        sys.stdout.write(f"{len(findings)} finding(s) in {len(inventory.packages)} packages ({os_text}); "
                         f"highest: {highest(findings)}\n")
    fail_on = values.get("fail_on")
    if fail_on in LEVELS and any(level_rank(f["severity"]) >= level_rank(fail_on) for f in findings):
        return EXIT_FINDINGS
    return 0


def main_diff(argv: list[str], config: Config) -> int:
    parsed = parse("diff", argv)
    if parsed is None:
        return 0
    values, (first, second) = parsed
    from mesobox.image.scan import diff_inventories, fixed_by_change, load_feed

    old_image, new_image = find_image(first, config), find_image(second, config)
    feed = load_feed(values["db"]) if values.get("db") else None
    old, new = _inventory(old_image), _inventory(new_image)
    changes = diff_inventories(old, new)
    fixed: list[dict[str, Any]] = []
    brought: list[dict[str, Any]] = []
    if feed is not None:
        fixed, brought = fixed_by_change(_scan(old_image, old, feed), _scan(new_image, new, feed))
    if values.get("json"):
        out: dict[str, Any] = {"from": old_image.name, "to": new_image.name, **changes}
        if feed is not None:
            out.update({"feed": feed.identity, "fixed_advisories": fixed, "new_advisories": brought})
        print_json(out)
        return 0
    rows: list[tuple[Any, ...]] = []
    for change in ("added", "removed"):
        rows += [(change, c["package"], c["kind"], "-" if change == "added" else c["version"],
                  c["version"] if change == "added" else "-") for c in changes[change]]
    for change in ("upgraded", "downgraded", "changed"):
        rows += [(change, c["package"], c["kind"], c["from"], c["to"]) for c in changes[change]]
    if rows:
        _table(("CHANGE", "PACKAGE", "KIND", "FROM", "TO"), rows)
    else:
        sys.stdout.write("no package changed\n")
    if feed is not None:
        for title, items in (("fixed", fixed), ("new", brought)):
            if items:
                sys.stdout.write(f"\nadvisories {title} by the change:\n")
                _table(("PACKAGE", "ADVISORY", "SEVERITY", "FIXED IN"),
                       [(f["package"], f["advisory"], f["severity"], f["fixed"] or "-") for f in items])
        if not fixed and not brought:
            sys.stdout.write("\nno advisory fixed or brought by the change\n")
    return 0
