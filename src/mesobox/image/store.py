"""Content store: the single owner of every on-disk path mesobox keeps images in.

Layout of a store (``config.store``; read-only site caches in ``config.ro_stores`` have
the same layout and are consulted first)::

    version                    format version ("1"); refuse other versions
    blobs/sha256/HEX           verified blobs (manifests, configs, layers), never rewritten
    ingest/HEX.partial         a blob being downloaded (resumable after a crash)
    images/KEY.json            image record: canonical reference -> manifest digest + config
    rootfs/HEX/                flattened directory rootfs, one per manifest digest
    squashfs/HEX.sqfs          squashfs of the same, one per manifest digest
    tmp/                       work directories, named ``HEX.PID.RANDOM``
    locks/NAME.lock            lock files (flock)

Invariants, which hold under concurrent use by many processes on many nodes (
flock works on local filesystems, NFS (emulated with POSIX locks), Lustre mounted
with ``flock`` and GPFS) and under kill -9:

- a file under ``blobs/``, ``rootfs/``, ``squashfs/`` or ``images/`` is complete: it is
  built under ``ingest/`` or ``tmp/`` and renamed into place, with the lock held;
- each blob is fetched once: the fetcher holds ``blob-HEX.lock``, everyone else waits
  for it, then finds the blob present;
- digests are validated (``parse_digest``) before they become file names.

This module is on the ``mesobox run`` hot path (``Store.lookup``): stdlib only, and
heavy modules (layers, squashfs, registry) are imported inside the functions that
build things.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesobox.config import Config
from mesobox.errors import ImageNotFound, StoreError

STORE_VERSION = "1"
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@dataclass(frozen=True)
class ImageRecord:
    """What the runtime needs to start an image, and what ``inspect`` shows."""

    reference: str
    digest: str  # manifest digest
    rootfs: Path | None
    squashfs: Path | None
    config: dict[str, Any]  # the OCI image config's "config" object (Env, Cmd, …)
    platform: str = ""
    config_digest: str = ""
    layers: tuple[dict[str, Any], ...] = ()
    index_digest: str | None = None
    media_type: str = ""
    size: int = 0  # compressed bytes of config + layers
    created: str = ""
    store: Path | None = field(default=None, compare=False)


def digest_hex(digest: str) -> str:
    """The hex part of a validated ``sha256:HEX`` digest, safe as a file name."""
    from mesobox.image.digest import parse_digest

    algorithm, hexpart = parse_digest(digest)
    if algorithm != "sha256":
        raise StoreError(f"unsupported digest algorithm {algorithm!r} for the store: {digest}")
    return hexpart


def record_key(reference: str) -> str:
    """File name for an image record: the canonical reference, percent-escaped."""
    out = []
    for ch in reference:
        if ch.isascii() and (ch.isalnum() or ch in "._-"):
            out.append(ch)
        else:
            out.append(f"%{ord(ch):02X}")
    return "".join(out)


def _store_error(err: OSError, what: str) -> StoreError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(
            f"no space left while {what}",
            hint="free space (`mesobox prune`), or point MESOBOX_STORE at a larger filesystem",
        )
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"permission denied while {what}: {err.filename or ''}".rstrip(": "),
                          hint="check the store's permissions, or set MESOBOX_STORE to a directory you own")
    return StoreError(f"{what} failed: {err.strerror or err}")


def force_rmtree(path: Path) -> None:
    """Remove a tree we built even if image layers made directories read-only."""
    def onerror(func: Callable[..., Any], name: str, exc: Any) -> None:
        parent = os.path.dirname(name)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IRWXU)
        if os.path.isdir(name) and not os.path.islink(name):
            with contextlib.suppress(OSError):
                os.chmod(name, stat.S_IMODE(os.lstat(name).st_mode) | stat.S_IRWXU)
            shutil.rmtree(name, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, onerror=onerror)


class Store:
    """One writable store plus read-only site stores.  Cheap to construct."""

    def __init__(self, config: Config, root: Path | None = None) -> None:
        self.config = config
        self.root = Path(root or config.store)
        self.ro_roots = tuple(Path(p) for p in config.ro_stores)

    # -- paths: computed here and nowhere else -----------------------------------------
    def blob_path(self, digest: str, root: Path | None = None) -> Path:
        return (root or self.root) / "blobs" / "sha256" / digest_hex(digest)

    def rootfs_path(self, digest: str, root: Path | None = None) -> Path:
        return (root or self.root) / "rootfs" / digest_hex(digest)

    def squashfs_path(self, digest: str, root: Path | None = None) -> Path:
        return (root or self.root) / "squashfs" / (digest_hex(digest) + ".sqfs")

    def record_path(self, reference: str, root: Path | None = None) -> Path:
        return (root or self.root) / "images" / (record_key(reference) + ".json")

    # -- set-up and locking ---------------------------------------------------------------
    def init(self) -> None:
        """Create the writable store's layout (idempotent), or refuse a foreign version."""
        version_file = self.root / "version"
        try:
            for sub in ("blobs/sha256", "ingest", "images", "rootfs", "squashfs", "tmp", "locks"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            if not version_file.exists():
                self.write_atomic(version_file, STORE_VERSION.encode() + b"\n")
        except OSError as err:
            raise _store_error(err, f"creating the store at {self.root}") from None
        found = version_file.read_text().strip()
        if found != STORE_VERSION:
            raise StoreError(
                f"store {self.root} has format version {found!r}, this mesobox reads {STORE_VERSION!r}",
                hint="use a matching mesobox, or another MESOBOX_STORE",
            )

    @contextlib.contextmanager
    def lock(self, name: str, shared: bool = False) -> Iterator[None]:
        """Inter-process (flock) and inter-thread lock on ``locks/NAME.lock``.

        flock locks belong to the open file, not the process: POSIX (lockf) locks would
        make the kernel see the threads of one pull as one waiter and report a false
        EDEADLK when two pulls each hold one layer the other wants.  Threads of one
        process also take a per-name threading lock (layer downloads run in threads).
        On NFS, Linux emulates flock with POSIX locks: `_acquire` retries on EDEADLK."""
        with _THREAD_LOCKS_GUARD:
            tlock = _THREAD_LOCKS.setdefault(name, threading.Lock())
        path = self.root / "locks" / (name + ".lock")
        with tlock:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as err:
                raise _store_error(err, f"opening lock {path}") from None
            try:
                _acquire(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing drops the lock

    def write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _store_error(err, f"writing {path}") from None

    def make_tmpdir(self, digest: str) -> Path:
        import tempfile

        try:
            return Path(tempfile.mkdtemp(prefix=f"{digest_hex(digest)}.{os.getpid()}.", dir=self.root / "tmp"))
        except OSError as err:
            raise _store_error(err, "creating a work directory") from None

    def clean_stale_tmp(self, digest: str) -> None:
        """Remove work dirs of this digest left by killed processes (call with its lock held)."""
        prefix = digest_hex(digest) + "."
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root / "tmp"):
                if entry.name.startswith(prefix):
                    force_rmtree(Path(entry.path))

    # -- blobs ------------------------------------------------------------------------------
    def find_blob(self, digest: str) -> Path | None:
        for root in (*self.ro_roots, self.root):
            path = self.blob_path(digest, root)
            if path.is_file():
                return path
        return None

    def ensure_blob(self, digest: str, fetch: Callable[[Path], None]) -> tuple[Path, bool]:
        """Return the blob's path, calling ``fetch(partial_path)`` once across all
        processes if it is missing.  ``fetch`` must verify the digest (it resumes from
        whatever prefix ``partial_path`` already holds).  Returns (path, fetched)."""
        found = self.find_blob(digest)
        if found:
            return found, False
        hexpart = digest_hex(digest)
        final = self.blob_path(digest)
        with self.lock("blob-" + hexpart):
            if final.is_file():
                return final, False
            partial = self.root / "ingest" / (hexpart + ".partial")
            try:
                fetch(partial)
                with open(partial, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(partial, final)
            except StoreError:
                # a disk-level failure (full, quota): free the space, resuming is moot
                partial.unlink(missing_ok=True)
                raise
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    partial.unlink(missing_ok=True)
                raise _store_error(err, f"storing blob {digest[:19]}") from None
            return final, True

    def read_blob(self, digest: str) -> bytes:
        path = self.find_blob(digest)
        if path is None:
            raise ImageNotFound(f"blob {digest} is not in the store", hint="pull the image again")
        return path.read_bytes()

    # -- image records ------------------------------------------------------------------------
    def write_record(self, record: ImageRecord) -> None:
        data = {
            "reference": record.reference,
            "digest": record.digest,
            "media_type": record.media_type,
            "index_digest": record.index_digest,
            "platform": record.platform,
            "config_digest": record.config_digest,
            "layers": list(record.layers),
            "size": record.size,
            "created": record.created,
            "config": record.config,
        }
        self.write_atomic(self.record_path(record.reference), json.dumps(data, indent=1).encode())

    def _load_record(self, path: Path, root: Path) -> ImageRecord | None:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise StoreError(f"unreadable image record {path}: {err}", hint="`mesobox rm` it and pull again") from None
        digest = data["digest"]
        rootfs = self.rootfs_path(digest, root)
        squashfs = self.squashfs_path(digest, root)
        return ImageRecord(
            reference=data["reference"],
            digest=digest,
            rootfs=rootfs if rootfs.is_dir() else None,
            squashfs=squashfs if squashfs.is_file() else None,
            config=data.get("config") or {},
            platform=data.get("platform", ""),
            config_digest=data.get("config_digest", ""),
            layers=tuple(data.get("layers", ())),
            index_digest=data.get("index_digest"),
            media_type=data.get("media_type", ""),
            size=int(data.get("size", 0)),
            created=data.get("created", ""),
            store=root,
        )

    def lookup(self, text: str) -> ImageRecord | None:
        """The stored image a user's reference names, site caches first; None if absent."""
        from mesobox.image.reference import parse_reference

        reference = str(parse_reference(text))
        for root in (*self.ro_roots, self.root):
            record = self._load_record(self.record_path(reference, root), root)
            if record is not None:
                return record
        return None

    def require(self, text: str) -> ImageRecord:
        record = self.lookup(text)
        if record is None:
            raise ImageNotFound(f"no image {text!r} in the store", hint=f"`mesobox pull {text}` first")
        return record

    def records(self) -> list[ImageRecord]:
        out: list[ImageRecord] = []
        seen: set[str] = set()
        for root in (*self.ro_roots, self.root):
            images = root / "images"
            if not images.is_dir():
                continue
            for path in sorted(images.glob("*.json")):
                record = self._load_record(path, root)
                if record is not None and record.reference not in seen:
                    seen.add(record.reference)
                    out.append(record)
        return out

    def remove_record(self, text: str) -> ImageRecord:
        from mesobox.image.reference import parse_reference

        reference = str(parse_reference(text))
        path = self.record_path(reference)
        record = self._load_record(path, self.root)
        if record is None:
            if any(self.record_path(reference, r).exists() for r in self.ro_roots):
                raise StoreError(f"{text!r} is in a read-only site store", hint="ask the site admins")
            raise ImageNotFound(f"no image {text!r} in the store")
        with self.lock("images"):
            path.unlink(missing_ok=True)
            still_used = {r.digest for r in self.records() if r.store == self.root}
            if record.digest not in still_used:
                self._drop_flattened(record.digest)
        return record

    def _drop_flattened(self, digest: str) -> None:
        with self.lock("rootfs-" + digest_hex(digest)):
            force_rmtree(self.rootfs_path(digest))
            self.squashfs_path(digest).unlink(missing_ok=True)

    def prune(self) -> tuple[int, int]:
        """Delete blobs, flattened trees and leftovers no record uses: (files, bytes)."""
        count = freed = 0
        with self.lock("images"):
            used: set[str] = set()
            flattened: set[str] = set()
            for record in self.records():
                if record.store != self.root:
                    continue
                flattened.add(digest_hex(record.digest))
                used.add(digest_hex(record.digest))
                if record.config_digest:
                    used.add(digest_hex(record.config_digest))
                if record.index_digest:
                    used.add(digest_hex(record.index_digest))
                used.update(digest_hex(layer["digest"]) for layer in record.layers)
            for kind, keep in (("blobs/sha256", used), ("rootfs", flattened), ("squashfs", flattened)):
                for entry in os.scandir(self.root / kind):
                    if entry.name.removesuffix(".sqfs") in keep:
                        continue
                    size = _tree_size(Path(entry.path))
                    force_rmtree(Path(entry.path))
                    count += 1
                    freed += size
            for kind in ("tmp", "ingest"):
                for entry in os.scandir(self.root / kind):
                    hexpart = entry.name.split(".")[0]
                    with self.lock(("blob-" if kind == "ingest" else "rootfs-") + hexpart):
                        if os.path.lexists(entry.path):
                            freed += _tree_size(Path(entry.path))
                            force_rmtree(Path(entry.path))
                            count += 1
        return count, freed


def _acquire(fd: int, operation: int) -> None:
    """flock(fd, operation), retrying while a (false) deadlock is reported."""
    import time

    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, operation)
            return
        except OSError as err:
            if err.errno != errno.EDEADLK:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _tree_size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size if os.path.lexists(path) else 0
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
