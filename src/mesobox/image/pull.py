"""Pull: reference → source → verified blobs in the store → flattened rootfs/squashfs.

Steps, each named after what it does::

    resolve_image      ask the source for the manifest of the wanted platform
    fetch_blobs        config + layers into the store, in parallel, each once
    flatten            apply the layers into a directory (and mksquashfs it)
    record             write the image record: reference -> digest + config

Every step is idempotent, so a pull interrupted anywhere (kill -9, network loss, full
disk) is finished by running it again; the store never shows a half-made thing.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesobox.config import Config
from mesobox.errors import LayerError
from mesobox.image.store import ImageRecord, Store, digest_hex, force_rmtree

FORMATS = ("squashfs", "dir")


class Progress:
    """A one-line progress display on a TTY; silent otherwise (or with quiet)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.lock = threading.Lock()
        self.last = 0.0
        self.stage = "fetching"

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.done += nbytes
            now = time.monotonic()
            if self.enabled and now - self.last > 0.1:
                self.last = now
                self._draw()

    def _draw(self) -> None:
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.stage:<10} [{bar:<30}] {self.done / 1e6:8.1f}/{self.total / 1e6:.1f} MB")
        sys.stderr.flush()

    def note(self, stage: str) -> None:
        if self.enabled:
            self.stage = stage
            self._draw()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


@dataclass(frozen=True)
class PullResult:
    record: ImageRecord
    fetched: int  # blobs downloaded by this process (0 when all were present)


def resolve_image(config: Config, text: str, platform: str | None, insecure: bool) -> tuple[Any, Any]:
    from mesobox.image.reference import parse_reference
    from mesobox.image.source import open_source

    ref = parse_reference(text)
    source = open_source(ref, config, insecure=insecure)
    try:
        resolved = source.resolve(platform)
    except BaseException:
        source.close()
        raise
    return source, resolved


def fetch_blobs(store: Store, source: Any, resolved: Any, progress: Progress, workers: int) -> int:
    """Config and layers into the store; each blob fetched once across all processes."""
    descriptors = [resolved.config, *resolved.layers]
    fetched = 0

    def fetch_one(desc: Any) -> bool:
        def fetch(partial: Path) -> None:
            source.fetch_blob(desc, partial, progress.add)

        _path, did_fetch = store.ensure_blob(desc.digest, fetch)
        if not did_fetch:
            progress.add(desc.size)
        return did_fetch

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(fetch_one, d) for d in descriptors]
        errors: list[BaseException] = []
        for fut in futures:
            try:
                fetched += int(fut.result())
            except BaseException as err:  # keep the first error; let the others finish
                errors.append(err)
        if errors:
            raise errors[0]
    # the manifest itself is stored too, so `export --format oci` can write it back
    manifest_path = store.blob_path(resolved.manifest_digest)
    if store.find_blob(resolved.manifest_digest) is None:
        store.write_atomic(manifest_path, resolved.manifest)
    return fetched


def _layer_policy(config: Config, total: int) -> Any:
    from mesobox.image.layers import LayerPolicy

    root = os.geteuid() == 0

    def warn(msg: str) -> None:
        sys.stderr.write(f"mesobox: warning: {msg}\n")

    return LayerPolicy(
        keep_setuid=root and config.keep_setuid_for_root,
        max_bytes=config.max_image_bytes,
        unprivileged=not root,
        warn=warn,
    )


def build_rootfs(store: Store, record_digest: str, layer_digests: list[str], into: Path) -> None:
    from mesobox.image.layers import apply_layers

    blobs = []
    for digest in layer_digests:
        path = store.find_blob(digest)
        if path is None:
            raise LayerError(f"layer {digest} is missing from the store", hint="pull the image again")
        blobs.append(path)
    apply_layers(into, blobs, _layer_policy(store.config, 0))


def flatten(store: Store, digest: str, layer_digests: list[str], fmt: str) -> None:
    """Make rootfs/HEX (fmt dir) or squashfs/HEX.sqfs (fmt squashfs), once."""
    final = store.rootfs_path(digest) if fmt == "dir" else store.squashfs_path(digest)
    if final.exists():
        return
    with store.lock("rootfs-" + digest_hex(digest)):
        if final.exists():
            return
        store.clean_stale_tmp(digest)
        work = store.make_tmpdir(digest)
        try:
            _flatten_into(store, digest, layer_digests, fmt, work, final)
        except OSError as err:
            from mesobox.image.store import _store_error

            raise _store_error(err, f"flattening {digest[:19]}") from None
        finally:
            force_rmtree(work)


def _flatten_into(store: Store, digest: str, layers: list[str], fmt: str, work: Path, final: Path) -> None:
    existing_dir = store.rootfs_path(digest)
    if fmt == "squashfs" and existing_dir.is_dir():
        source_dir = existing_dir  # already flattened as a directory: squash that
    else:
        source_dir = work / "rootfs"
        source_dir.mkdir()
        build_rootfs(store, digest, layers, source_dir)
    if fmt == "dir":
        os.chmod(source_dir, 0o755)  # noqa: S103 - a rootfs top dir is world-readable
        os.replace(source_dir, final)
        return
    from mesobox.image.squashfs import build_squashfs

    tmp_file = work / "image.sqfs"
    build_squashfs(source_dir, tmp_file, store.config.squashfs_compression)
    os.chmod(tmp_file, 0o644)
    os.replace(tmp_file, final)


def make_record(store: Store, resolved: Any) -> ImageRecord:
    try:
        image_config = json.loads(store.read_blob(resolved.config.digest))
    except ValueError as err:
        raise LayerError(f"image config {resolved.config.digest} is not JSON: {err}") from None
    layers = tuple(
        {"digest": d.digest, "size": d.size, "media_type": d.media_type} for d in resolved.layers
    )
    return ImageRecord(
        reference=str(resolved.reference),
        digest=resolved.manifest_digest,
        rootfs=None,
        squashfs=None,
        config=image_config.get("config") or {},
        platform=resolved.platform,
        config_digest=resolved.config.digest,
        layers=layers,
        index_digest=resolved.index_digest,
        media_type=resolved.media_type,
        size=resolved.config.size + sum(d.size for d in resolved.layers),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        store=store.root,
    )


def pull_image(
    config: Config,
    text: str,
    fmt: str = "squashfs",
    *,
    platform: str | None = None,
    insecure: bool = False,
    quiet: bool = True,
    progress_cb: Callable[[int], None] | None = None,
) -> PullResult:
    if fmt not in FORMATS:
        from mesobox.errors import UsageError

        raise UsageError(f"unknown format {fmt!r}", hint="use --format squashfs or --format dir")
    store = Store(config)
    store.init()
    source, resolved = resolve_image(config, text, platform, insecure)
    try:
        total = resolved.config.size + sum(d.size for d in resolved.layers)
        if total > config.max_image_bytes:
            raise LayerError(
                f"image is {total} bytes compressed, over the limit of {config.max_image_bytes}",
                hint="raise max_image_bytes in the configuration",
            )
        progress = Progress(total, enabled=not quiet and sys.stderr.isatty())
        fetched = fetch_blobs(store, source, resolved, progress, config.max_parallel_downloads)
    finally:
        source.close()
    record = make_record(store, resolved)
    progress.note("flattening")
    flatten(store, record.digest, [layer["digest"] for layer in record.layers], fmt)
    progress.finish()
    with store.lock("images"):
        store.write_record(record)
    final = store.lookup(record.reference)
    assert final is not None
    return PullResult(final, fetched)


def pull(config: Config, text: str, fmt: str = "squashfs", quiet: bool = True,
         platform: str | None = None, insecure: bool = False) -> ImageRecord:
    """Pull ``text`` into the store and return its record (the runtime's entry point)."""
    return pull_image(config, text, fmt, platform=platform, insecure=insecure, quiet=quiet).record


def ensure_format(config: Config, record: ImageRecord, fmt: str) -> ImageRecord:
    """Make sure a stored image also exists in format ``fmt`` (dir or squashfs)."""
    if (fmt == "dir" and record.rootfs) or (fmt == "squashfs" and record.squashfs):
        return record
    store = Store(config)
    if record.store != store.root:
        from mesobox.errors import StoreError

        raise StoreError(f"{record.reference} is in a read-only store without a {fmt} form",
                         hint=f"pull it into your own store with --format {fmt}")
    flatten(store, record.digest, [layer["digest"] for layer in record.layers], fmt)
    again = store.lookup(record.reference)
    assert again is not None
    return again
