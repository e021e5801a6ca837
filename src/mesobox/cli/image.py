"""Image verbs: pull, images, inspect, rm, prune, export.

Wiring only: parse options, call the image room, print.  Not on the ``run`` hot
path, so argparse is fine here.

``export`` holds the store's gc lock shared (``prune`` waits for it), re-hashes every
blob it writes out (a substituted blob is never exported under the original digest) and
checks a squashfs against the size and sha256 recorded when it was built; when it
fails, nothing it wrote is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from mesobox.config import Config
from mesobox.errors import DigestMismatch, StoreError, UsageError
from mesobox.image.store import HASH_CHUNK, ImageRecord, Store, force_rmtree


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", hint=f"`{self.prog} --help` shows the options")


def _parser(verb: str, description: str) -> _Parser:
    return _Parser(prog=f"mesobox {verb}", description=description)


def main_pull(argv: list[str], config: Config) -> int:
    p = _parser("pull", "Fetch an image into the store and flatten it (prints the manifest digest).")
    p.add_argument("reference", help="docker://REF, REF, oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE")
    p.add_argument("--platform", help="OS/ARCH[/VARIANT], default: this host's")
    p.add_argument("--format", choices=("squashfs", "dir"), default=config.default_format)
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to this registry")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    args = p.parse_args(argv)
    from mesobox.image.pull import pull_image

    result = pull_image(config, args.reference, args.format, platform=args.platform,
                        insecure=args.insecure, quiet=args.quiet)
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
    p = _parser("images", "List stored images (site caches included).")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    records = Store(config).records()
    if args.json:
        rows = [
            {"reference": r.reference, "digest": r.digest, "platform": r.platform, "size": r.size,
             "formats": _formats(r).split(",") if _formats(r) else [], "created": r.created,
             "store": str(r.store), "squashfs": str(r.squashfs) if r.squashfs else None,
             "rootfs": str(r.rootfs) if r.rootfs else None}
            for r in records
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
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
    p = _parser("inspect", "Show a stored image's configuration as JSON.")
    p.add_argument("reference")
    args = p.parse_args(argv)
    record = Store(config).require(args.reference)
    sys.stdout.write(json.dumps(inspect_data(record), indent=2) + "\n")
    return 0


def main_rm(argv: list[str], config: Config) -> int:
    p = _parser("rm", "Remove images from the store (blobs stay until `mesobox prune`).")
    p.add_argument("references", nargs="+")
    args = p.parse_args(argv)
    store = Store(config)
    for ref in args.references:
        record = store.remove_record(ref)
        sys.stdout.write(f"removed {record.reference}\n")
    return 0


def main_prune(argv: list[str], config: Config) -> int:
    p = _parser("prune", "Delete blobs, flattened images and leftovers that no stored image uses.")
    p.parse_args(argv)
    store = Store(config)
    store.init()
    count, freed = store.prune()
    sys.stdout.write(f"pruned {count} entries, {_human(freed)} freed\n")
    return 0


def _check_output(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} already exists", hint="choose a new path, or remove it first")


def main_export(argv: list[str], config: Config) -> int:
    p = _parser("export", "Write a stored image as a directory, a squashfs file or an OCI layout.")
    p.add_argument("reference")
    p.add_argument("--format", choices=("dir", "squashfs", "oci"), required=True)
    p.add_argument("-o", "--output", required=True, type=Path)
    args = p.parse_args(argv)
    store = Store(config)
    record = store.require(args.reference)
    out: Path = args.output.absolute()
    _check_output(out)
    with store.in_use(), _undone_on_failure(out):
        try:
            if args.format == "oci":
                export_oci(store, record, out)
            elif args.format == "dir":
                export_dir(store, record, out)
            else:
                from mesobox.image.pull import ensure_format

                record = ensure_format(config, record, "squashfs")
                assert record.squashfs is not None
                _copy_checked(record.squashfs, out, record.squashfs_check, f"the squashfs of {record.reference}",
                              f"`mesobox pull {record.reference}` rebuilds it")
        except OSError as err:
            from mesobox.image.store import _store_error

            raise _store_error(err, f"exporting to {out}") from None
    sys.stdout.write(f"{out}\n")
    return 0


@contextlib.contextmanager
def _undone_on_failure(out: Path) -> Iterator[None]:
    """Whatever export wrote is removed when it fails: the path it made, or the contents
    of the empty directory it was given."""
    existed = out.is_dir()
    try:
        yield
    except BaseException:
        if not existed:
            force_rmtree(out)
        elif out.is_dir() and not out.is_symlink():
            for entry in list(out.iterdir()):
                force_rmtree(entry)
        raise


def export_dir(store: Store, record: ImageRecord, out: Path) -> None:
    """The image's rootfs as a plain directory (layers re-hashed before they are applied)."""
    from mesobox.image.pull import _layer_policy, build_rootfs

    # As root with setuid bits kept, the directory is private from the start: nobody else
    # may reach a setuid-root binary while (or after) it is unpacked.
    private = _layer_policy(store.config, 0).keep_setuid
    out.mkdir(mode=0o700 if private else 0o777, exist_ok=True)
    if private:
        os.chmod(out, 0o700)
    build_rootfs(store, record.digest, record.layers, out, reference=record.reference)


def _copy_checked(src: Path, dest: Path, check: tuple[int, str] | None, what: str, again: str) -> None:
    """Copy ``src`` to a new file ``dest``, hashing what is copied; DigestMismatch (and no
    ``dest``) unless it is ``check`` (size, "sha256:HEX"); ``None`` checks nothing."""
    import hashlib

    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        while chunk := fin.read(HASH_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    if check is not None and (size, "sha256:" + digest.hexdigest()) != check:
        dest.unlink(missing_ok=True)
        raise DigestMismatch(f"{what} is damaged: its content no longer matches {check[1]}", hint=again)


def export_oci(store: Store, record: ImageRecord, out: Path) -> None:
    """An OCI image layout (image-spec image-layout.md) holding this one image.  Every
    blob is copied (never hard-linked: the layout must not share inodes with the store)
    and re-hashed as it is copied."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    sizes = {layer["digest"]: layer.get("size") for layer in record.layers}
    digests = [record.digest, record.config_digest, *(layer["digest"] for layer in record.layers)]
    again = f"`mesobox pull {record.reference}` fetches it again"
    for digest in dict.fromkeys(digests):  # a layer listed twice is one blob
        size = sizes.get(digest)
        src = store.intact_blob(digest, size) or store.find_blob(digest)  # a good copy wherever it is
        if src is None:
            raise StoreError(f"blob {digest} is missing from the store", hint=again)
        dest = blobs / digest.split(":", 1)[1]
        _copy_checked(src, dest, (size if size is not None else src.stat().st_size, digest),
                      f"stored blob {digest}", again)
    manifest = store.find_blob(record.digest)
    assert manifest is not None
    tag = record.reference.rsplit("@", 1)[0]
    tag = tag.rsplit(":", 1)[1] if ":" in tag.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": record.media_type or "application/vnd.oci.image.manifest.v1+json",
            "digest": record.digest,
            "size": manifest.stat().st_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}\n')
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
