"""Pull: reference → source → verified blobs in the store → flattened rootfs/squashfs.

Steps, each named after what it does::

    open_image_source      ask the source for the manifest of the wanted platform
    check_trust        the image's signatures; the site policy (image/policy.py) accepts it
    fetch_blobs        config + layers into the store, in parallel, each once
    flatten            apply the layers into a directory (and mksquashfs it)
    record             write the image record: reference -> digest + config

Every step is idempotent, so a pull interrupted anywhere (kill -9, network loss, full
disk) is finished by running it again; the store never shows a half-made thing.

A pull also repairs: blobs already in the store are re-hashed before they are reused (a
damaged one is fetched again), and an existing squashfs is checked against the size and
sha256 recorded when it was built (a damaged one is rebuilt).  The image config is
validated (``imageconfig.checked_config``) before any layer is fetched.  The whole pull
holds the store's gc lock shared, so ``mesobox prune`` cannot delete its fresh blobs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesobox import console
from mesobox.config import Config
from mesobox.errors import DigestMismatch, LayerError
from mesobox.image.store import ImageRecord, Store, digest_hex, file_check, force_rmtree, fsync_dir

Layers = Sequence[Mapping[str, Any]]  # record.layers: {"digest", "size", "media_type"}
Verified = Mapping[str, Path]  # digest -> the stored copy this process has just hashed

FORMATS = ("squashfs", "dir")


class Progress:
    """A one-line progress display on a TTY: bytes, the transfer rate and the time left;
    silent otherwise (or with quiet).  The rate is the download's over the last
    ``WINDOW`` seconds; blobs already in the store count as done but not as transferred."""

    WINDOW = 5.0  # seconds of samples the rate is taken over
    STEADY = 0.5  # no rate (nor ETA) is shown before this many seconds of samples

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.lock = threading.Lock()
        self.last = 0.0
        self.stage = "fetching"
        self.transferred = 0
        self.samples: list[tuple[float, int]] = []  # (monotonic time, bytes transferred), oldest first

    def add(self, nbytes: int) -> None:
        """``nbytes`` more were downloaded."""
        with self.lock:
            self.done += nbytes
            self.transferred += nbytes
            now = time.monotonic()
            self.samples.append((now, self.transferred))
            while len(self.samples) > 2 and now - self.samples[1][0] >= self.WINDOW:
                del self.samples[0]
            self._maybe_draw(now)

    def have(self, nbytes: int) -> None:
        """``nbytes`` were already in the store: done, without a transfer."""
        with self.lock:
            self.done += nbytes
            self._maybe_draw(time.monotonic())

    def _maybe_draw(self, now: float) -> None:
        if self.enabled and now - self.last > 0.1:
            self.last = now
            self._draw()

    def rate(self) -> float | None:
        """Bytes per second over the window; None until it spans ``STEADY`` seconds."""
        if len(self.samples) < 2:
            return None
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 - t0 >= self.STEADY else None

    def line(self) -> str:
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        text = f"{self.stage:<10} [{bar:<30}] {self.done / 1e6:8.1f}/{self.total / 1e6:.1f} MB"
        rate = self.rate() if self.stage == "fetching" else None
        if rate is not None:
            text += f"  {_per_second(rate)}"
            left = max(self.total - self.done, 0)
            text += f"  ETA {_clock(left / rate)}" if rate > 0 else "  ETA --:--"
        return text

    def _draw(self) -> None:
        console.progress(self.line())

    def note(self, stage: str) -> None:
        if self.enabled:
            self.stage = stage
            self._draw()

    def finish(self) -> None:
        if self.enabled:
            console.end_progress()

    def abandon(self) -> None:
        """The pull failed: erase the line, so the error stands on a line of its own."""
        if self.enabled:
            console.clear_progress()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if kind is not None:
            self.abandon()


def _per_second(rate: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if rate < 1000 or unit == "GB":
            return f"{rate:5.1f} {unit}/s"
        rate /= 1000
    return f"{rate:.1f} GB/s"


def _clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    whole = int(min(seconds, 359999) + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True)
class PullResult:
    record: ImageRecord
    fetched: int  # blobs downloaded by this process (0 when all were present)


def open_image_source(config: Config, text: str, platform: str | None, insecure: bool) -> tuple[Any, Any]:
    from mesobox.image.reference import parse_reference
    from mesobox.image.transports import open_source

    ref = parse_reference(text)
    source = open_source(ref, config, insecure=insecure)
    try:
        resolved = source.resolve(platform)
    except BaseException:
        source.close()
        raise
    return source, resolved


def check_trust(config: Config, source: Any, resolved: Any) -> list[dict[str, str]]:
    """The signatures a registry holds for the image (its manifest's and its index's),
    to keep in the store for launches; PolicyError, before any layer is fetched, when
    the site policy refuses the image.  A registry that fails to answer for signatures
    only means none (a policy that needs them refuses then)."""
    from mesobox.errors import RegistryError

    digests = tuple(d for d in (resolved.manifest_digest, resolved.index_digest) if d)
    found: list[Any] = []
    if resolved.reference.transport == "docker":
        from mesobox.image.sign import fetch_signatures

        for digest in digests:
            try:
                found += fetch_signatures(source, digest)
            except (RegistryError, DigestMismatch) as err:
                _warn(f"the signatures of {digest[:19]} could not be fetched: {err.message}")
    from mesobox.image.policy import check_pull

    check_pull(config, str(resolved.reference), digests, found)
    return [sig.to_json() for sig in found]


def fetch_blobs(store: Store, source: Any, resolved: Any, progress: Progress, workers: int) -> tuple[int, Verified]:
    """Config and layers into the store; each blob fetched once across all processes.
    The config comes first and is validated: a hostile one costs no layer download.
    Returns how many blobs this process downloaded, and where the intact copies are."""
    paths: dict[str, Path] = {}
    fetched = _fetch_each(store, source, [resolved.config], progress, 1, paths)
    read_image_config(store, resolved)
    fetched += _fetch_each(store, source, list(resolved.layers), progress, workers, paths)
    # the manifest itself is stored too, so `export --format oci` can write it back
    def write_manifest(partial: Path) -> None:
        partial.write_bytes(resolved.manifest)  # checked against its digest when resolved

    store.ensure_blob(resolved.manifest_digest, write_manifest, len(resolved.manifest))
    return fetched, paths


def _fetch_each(store: Store, source: Any, descriptors: list[Any], progress: Progress, workers: int,
                paths: dict[str, Path]) -> int:
    fetched = 0

    def fetch_one(desc: Any) -> bool:
        def fetch(partial: Path) -> None:
            source.fetch_blob(desc, partial, progress.add)

        path, did_fetch = store.ensure_blob(desc.digest, fetch, desc.size)
        paths[desc.digest] = path
        if not did_fetch:
            progress.have(desc.size)
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
    return fetched


def _layer_policy(config: Config, total: int) -> Any:
    from mesobox.image.layers import LayerPolicy

    root = os.geteuid() == 0

    return LayerPolicy(
        keep_setuid=root and config.keep_setuid_for_root,
        max_bytes=config.max_image_bytes,
        unprivileged=not root,
        warn=console.warn,
    )


def _warn(msg: str) -> None:
    console.warn(msg)


def build_rootfs(store: Store, record_digest: str, layers: Layers, into: Path,
                 verified: Verified | None = None, reference: str = "",
                 owners: dict[tuple[str, ...], tuple[int, int]] | None = None) -> Any:
    """Apply the image's layers into ``into``; returns the LayerStats.  Every layer blob
    is re-hashed first unless this process has just verified it (``verified``).
    Unprivileged, ``owners`` receives the owners root's tree would have (layers.py)."""
    from mesobox.image.layers import apply_layers

    blobs = [_layer_blob(store, layer, verified or {}, reference) for layer in layers]
    return apply_layers(into, blobs, _layer_policy(store.config, 0), owners)


def _layer_blob(store: Store, layer: Mapping[str, Any], verified: Verified, reference: str) -> Path:
    digest = str(layer["digest"])
    size = layer.get("size")
    path = verified.get(digest) or store.intact_blob(digest, size)
    if path is not None:
        return path
    again = f"`mesobox pull {reference}` fetches it again" if reference else "pull the image again"
    if store.find_blob(digest) is None:
        raise LayerError(f"layer {digest} is missing from the store", hint=again)
    raise DigestMismatch(f"stored layer {digest} is damaged: its content no longer matches its digest", hint=again)


def flatten(store: Store, digest: str, layers: Layers, fmt: str, *,
            verified: Verified | None = None, reference: str = "") -> tuple[int, str] | None:
    """Make rootfs/HEX (fmt dir) or squashfs/HEX.sqfs (fmt squashfs), once.  For squashfs,
    returns its (size, sha256): an existing file is checked against what the records hold
    and rebuilt when it does not match."""
    final = store.rootfs_path(digest) if fmt == "dir" else store.squashfs_path(digest)
    with store.in_use():
        if fmt == "dir" and final.exists():
            return None
        with store.lock("rootfs-" + digest_hex(digest)):
            if fmt == "dir" and final.exists():
                return None
            if fmt == "squashfs" and (check := _existing_squashfs(store, digest, final)) is not None:
                return check
            store.clean_stale_tmp(digest)
            work = store.make_tmpdir(digest)
            try:
                check = _flatten_into(store, digest, layers, fmt, work, final, verified, reference)
            except OSError as err:
                from mesobox.image.store import _store_error

                raise _store_error(err, f"flattening {digest[:19]}") from None
            finally:
                force_rmtree(work)
            if check is not None:
                store.record_squashfs(digest, check)  # rebuilt: no record may vouch for the old file
            return check


def _existing_squashfs(store: Store, digest: str, final: Path) -> tuple[int, str] | None:
    """The (size, sha256) of an existing squashfs that may be kept; None (after deleting a
    damaged one) when it must be built.  Call with the rootfs lock held."""
    from mesobox.image.squashfs import looks_complete

    try:
        actual = file_check(final)
    except FileNotFoundError:
        return None
    except OSError as err:
        from mesobox.image.store import _store_error

        raise _store_error(err, f"reading {final}") from None
    known = store.squashfs_checks(digest)
    if actual in known:
        return actual
    # No record vouches for it (made by an older mesobox): keep it if it is whole.
    if not known and looks_complete(final):
        return actual
    why = "it no longer matches the size and sha256 recorded when it was built" if known else "it is incomplete"
    _warn(f"the squashfs of {digest[:19]} is damaged ({why}): rebuilding it")
    final.unlink(missing_ok=True)
    return None


def _flatten_into(store: Store, digest: str, layers: Layers, fmt: str, work: Path, final: Path,
                  verified: Verified | None, reference: str) -> tuple[int, str] | None:
    existing_dir = store.rootfs_path(digest)
    # Unprivileged, the squashfs needs the image's owners, which only the layers know
    # (a user's flattened directory is all theirs): it is built from them afresh.
    owners: dict[tuple[str, ...], tuple[int, int]] | None = None if os.geteuid() == 0 else {}
    if fmt == "squashfs" and owners is None and _others_may_enter(existing_dir):
        source_dir = existing_dir  # already flattened as a directory: squash that
        kept_setuid = 0
    else:
        source_dir = work / "rootfs"
        source_dir.mkdir()
        kept_setuid = build_rootfs(store, digest, layers, source_dir, verified, reference,
                                   owners if fmt == "squashfs" else None).kept_setuid
    if fmt == "dir":
        # A kept setuid-root binary must not be reachable by other users: they could exec
        # it on the host, outside any container.  Otherwise a rootfs is world-readable.
        os.chmod(source_dir, 0o700 if kept_setuid else 0o755)
        os.replace(source_dir, final)
        fsync_dir(final.parent)
        return None
    from mesobox.image.squashfs import build_squashfs

    if source_dir != existing_dir:
        # inside the private work directory, so opening it up reaches no one; the squashfs
        # is mounted nosuid by mesobox (and by users' FUSE), so it may be world-readable
        os.chmod(source_dir, 0o755)  # noqa: S103
    tmp_file = work / "image.sqfs"
    build_squashfs(source_dir, tmp_file, store.config.squashfs_compression, owners, _warn)
    os.chmod(tmp_file, 0o644)
    check = file_check(tmp_file)
    store.settle(tmp_file)  # whole now, and never written again: launches may trust it at once
    with open(tmp_file, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp_file, final)
    fsync_dir(final.parent)
    return check


def _others_may_enter(path: Path) -> bool:
    """A flattened directory others can traverse (not one sealed for kept setuid bits)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_mode & 0o005 == 0o005


def read_image_config(store: Store, resolved: Any) -> dict[str, Any]:
    """The stored image config's "config" object, validated and normalised."""
    from mesobox.image.imageconfig import checked_config

    where = f"image config of {resolved.reference}"
    path = store.intact_blob(resolved.config.digest, resolved.config.size)  # a few KB: hashing is free
    if path is None:
        raise LayerError(f"{where} ({resolved.config.digest}) is missing or damaged in the store",
                         hint="pull the image again")
    try:
        image_config = json.loads(path.read_bytes())
    except ValueError as err:
        raise LayerError(f"{where} is not JSON: {err}") from None
    except OSError as err:
        from mesobox.image.store import _store_error

        raise _store_error(err, f"reading {path}") from None
    if not isinstance(image_config, dict):
        raise LayerError(f"{where} is not a JSON object")
    return checked_config(image_config.get("config"), where)


def make_record(store: Store, resolved: Any) -> ImageRecord:
    image_config = read_image_config(store, resolved)
    layers = tuple(
        {"digest": d.digest, "size": d.size, "media_type": d.media_type} for d in resolved.layers
    )
    return ImageRecord(
        reference=str(resolved.reference),
        digest=resolved.manifest_digest,
        rootfs=None,
        squashfs=None,
        config=image_config,
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
    with store.in_use():  # `mesobox prune` waits for this pull
        source, resolved = open_image_source(config, text, platform, insecure)
        try:
            signatures = check_trust(config, source, resolved)
            total = resolved.config.size + sum(d.size for d in resolved.layers)
            if total > config.max_image_bytes:
                raise LayerError(
                    f"image is {total} bytes compressed, over the limit of {config.max_image_bytes}",
                    hint="raise max_image_bytes in the configuration",
                )
            progress = Progress(total, enabled=not quiet and sys.stderr.isatty())
            with progress:  # a failure erases the line: the error stands on its own
                fetched, verified = fetch_blobs(store, source, resolved, progress, config.max_parallel_downloads)
        finally:
            source.close()
        with progress:
            record = make_record(store, resolved)
            progress.note("flattening")
            check = flatten(store, record.digest, record.layers, fmt, reference=record.reference,
                            verified=verified)
        progress.finish()
        with store.lock("images"):
            if check is None:  # a dir pull: keep what is known of a squashfs of the same image
                known = store.squashfs_checks(record.digest)
                check = next(iter(known)) if len(known) == 1 else None
            if check is not None:
                record = dataclasses.replace(record, squashfs_size=check[0], squashfs_sha256=check[1])
            store.write_signatures(record.digest, signatures)  # before the record: launches check them
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
    flatten(store, record.digest, record.layers, fmt, reference=record.reference)  # records its squashfs check
    again = store.lookup(record.reference)
    assert again is not None
    return again
