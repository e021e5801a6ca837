"""Content store: the single owner of every on-disk path mesobox keeps images in.

Layout of a store (``config.store``; read-only site caches in ``config.ro_stores`` have
the same layout and are consulted first)::

    version                    format version ("1"); refuse other versions
    blobs/sha256/HEX           verified blobs (manifests, configs, layers), never rewritten
    ingest/HEX.partial         a blob being downloaded (resumable after a crash)
    images/KEY.json            image record: canonical reference -> manifest digest + config
                               (+ size and sha256 of the squashfs, to check it on the next pull)
    rootfs/HEX/                flattened directory rootfs, one per manifest digest
    squashfs/HEX.sqfs          squashfs of the same, one per manifest digest
    signatures/HEX             the cosign signatures the registry held for it at pull (JSON),
                               verified at each launch against the site policy (image/policy.py)
    tmp/                       work directories, named ``HEX.PID.RANDOM``
    locks/NAME.lock            lock files (flock)

Invariants, which hold under concurrent use by many processes on many nodes (
flock works on local filesystems, NFS (emulated with POSIX locks), Lustre mounted
with ``flock`` and GPFS) and under kill -9:

- a file under ``blobs/``, ``rootfs/``, ``squashfs/`` or ``images/`` is complete: it is
  built under ``ingest/`` or ``tmp/``, fsynced, renamed into place with the lock held, and
  the rename fsynced (the directory), so a crash never leaves a named but empty file;
- each blob is fetched once: the fetcher holds ``blob-HEX.lock``, everyone else waits
  for it, then finds the blob present;
- a stored blob is trusted only after it hashes to its name again: every pull re-hashes
  the blobs it reuses (a damaged one is deleted and fetched again), flattening and
  ``export`` hash what they read (:meth:`Store.intact_blob`, :func:`file_check`);
- ``prune`` never deletes what a pull, flatten or export is working with: those hold
  ``locks/gc.lock`` shared for their whole run (:meth:`Store.in_use`), prune holds it
  exclusively;
- digests are validated (``parse_digest``) before they become file names.

The squashfs check recorded in image records (``squashfs_size``/``squashfs_sha256``) is
computed once, when the squashfs is built, and verified by ``pull`` only: looking a
record up (the ``mesobox run`` path) never hashes anything.

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

from mesobox import files
from mesobox.config import Config
from mesobox.errors import ImageNotFound, StoreError

STORE_VERSION = "1"
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
# store root -> [fd holding gc.lock shared, users in this process] (see Store.in_use)
_GC_HOLDS: dict[str, list[int]] = {}
HASH_CHUNK = 1 << 20


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
    squashfs_size: int = 0  # bytes of the squashfs when it was built (0: not known)
    squashfs_sha256: str = ""  # "sha256:HEX" of the squashfs when it was built ("" : not known)

    @property
    def squashfs_check(self) -> tuple[int, str] | None:
        return (self.squashfs_size, self.squashfs_sha256) if self.squashfs_sha256 else None


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


def file_check(path: Path) -> tuple[int, str]:
    """(size, "sha256:HEX") of a file, read once (blobs, squashfs files)."""
    import hashlib  # lazily: never needed by a store lookup

    digest = hashlib.sha256()
    size = 0
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return size, "sha256:" + digest.hexdigest()


def _same_record(path: Path, data: dict[str, Any]) -> bool:
    """``path`` already holds ``data``, but for the time of the pull ("created")."""
    try:
        old = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    new = json.loads(json.dumps(data))  # as it would read back (lists, not tuples)
    return isinstance(old, dict) and {**old, "created": None} == {**new, "created": None}


def fsync_dir(path: Path) -> None:
    """Make a rename (or creation) in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def signatures_path(self, digest: str, root: Path | None = None) -> Path:
        return (root or self.root) / "signatures" / digest_hex(digest)

    # -- set-up and locking ---------------------------------------------------------------
    def init(self) -> None:
        """Create the writable store's layout (idempotent), or refuse a foreign version."""
        version_file = self.root / "version"
        try:
            for sub in ("blobs/sha256", "ingest", "images", "rootfs", "squashfs", "signatures", "tmp", "locks"):
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
        with _thread_lock(name):
            fd = self._open_lock(name)
            assert fd is not None
            try:
                _acquire(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing drops the lock

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold ``locks/gc.lock`` shared: ``prune`` (exclusive) waits until this ends.

        Re-entrant within a process (a pull flattens; an export builds a rootfs): the
        lock is taken once per process and store, and dropped when its last user is
        done.  One fd per process matters on NFS, where flock is emulated with POSIX
        locks and closing *any* fd of the file drops the process's lock on it.  A store
        without a ``locks/`` directory, or one this user cannot write (an export from it),
        has nothing this user's prune could delete: no lock then."""
        key = str(self.root)
        with _thread_lock("gc:" + key):
            hold = _GC_HOLDS.get(key)
            if hold is None:
                fd = self._open_lock("gc", missing_ok=True)
                if fd is not None:
                    try:
                        _acquire(fd, fcntl.LOCK_SH)
                    except BaseException:
                        os.close(fd)
                        raise
                hold = _GC_HOLDS[key] = [-1 if fd is None else fd, 0]
            hold[1] += 1
        try:
            yield
        finally:
            with _thread_lock("gc:" + key):
                hold[1] -= 1
                if hold[1] == 0:
                    del _GC_HOLDS[key]
                    if hold[0] >= 0:
                        os.close(hold[0])  # closing drops the lock

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        """Hold ``locks/gc.lock`` exclusively (prune): no pull, flatten or export runs."""
        with _thread_lock("gc:" + str(self.root)):
            fd = self._open_lock("gc")
            assert fd is not None
            try:
                _acquire(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _open_lock(self, name: str, missing_ok: bool = False) -> int | None:
        path = self.root / "locks" / (name + ".lock")
        try:
            # 0600: a user who could open it could also hold it, and block the owner's pulls
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            if missing_ok and err.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise _store_error(err, f"opening lock {path}") from None

    def write_atomic(self, path: Path, data: bytes) -> None:
        try:
            files.write_atomic(path, data, mode=0o666, durable=True)  # the umask decides, as open() does
            self.settle(path)
        except OSError as err:
            raise _store_error(err, f"writing {path}") from None

    @staticmethod
    def settle(path: Path) -> None:
        """Date the mtime of a file written whole 1 ns back, so that its ctime (now) is
        later.  The store never writes a file in place (it renames a new one over it),
        and a file whose mtime is older than its ctime shows it was not written since:
        a launch trusts its identity at once, with no 2-second wait after a pull
        (launch/probe.py: settled)."""
        st = os.stat(path, follow_symlinks=False)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 1), follow_symlinks=False)

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

    def blob_intact(self, path: Path, digest: str, size: int | None = None) -> bool:
        """Does the stored blob at ``path`` still hash to ``digest`` (and have ``size``)?"""
        try:
            if size is not None and path.stat().st_size != size:
                return False
            return file_check(path)[1] == "sha256:" + digest_hex(digest)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise _store_error(err, f"reading blob {digest[:19]}") from None

    def intact_blob(self, digest: str, size: int | None = None) -> Path | None:
        """The first stored copy of ``digest`` (site caches first) that hashes to it."""
        for root in (*self.ro_roots, self.root):
            path = self.blob_path(digest, root)
            if path.is_file() and self.blob_intact(path, digest, size):
                return path
        return None

    def ensure_blob(self, digest: str, fetch: Callable[[Path], None], size: int | None = None) -> tuple[Path, bool]:
        """Return the path of an intact copy of the blob, calling ``fetch(partial_path)``
        once across all processes if there is none.  A stored copy is re-hashed first:
        a damaged one in this store is deleted and fetched again.  ``fetch`` must verify
        the digest (it resumes from whatever prefix ``partial_path`` already holds).
        Returns (path, fetched)."""
        found = self.intact_blob(digest, size)
        if found:
            return found, False
        hexpart = digest_hex(digest)
        final = self.blob_path(digest)
        with self.lock("blob-" + hexpart):
            if final.is_file():
                if self.blob_intact(final, digest, size):
                    return final, False  # fetched by another process while we waited
                _warn(f"stored blob {digest} was damaged (it no longer hashes to its name): fetching it again")
                final.unlink(missing_ok=True)
            partial = self.root / "ingest" / (hexpart + ".partial")
            try:
                fetch(partial)
                with open(partial, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(partial, final)
                fsync_dir(final.parent)
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

    # -- signatures ---------------------------------------------------------------------------
    def write_signatures(self, digest: str, entries: list[dict[str, str]]) -> None:
        """Keep the signatures of ``digest`` (sign.Signature.to_json each), added to those
        kept before: a signature is about the digest, and stays true."""
        path = self.signatures_path(digest)
        try:
            old = json.loads(path.read_bytes()).get("signatures")
        except (OSError, ValueError, AttributeError):
            old = None
        merged = [e for e in old if isinstance(e, dict)] if isinstance(old, list) else []
        for entry in entries:
            if entry not in merged:
                merged.append(entry)
        if not merged or merged == old:
            return  # nothing new: the file (and every verdict that read it) stays
        (self.root / "signatures").mkdir(exist_ok=True)  # a store made before signatures were kept
        self.write_atomic(path, json.dumps({"digest": digest, "signatures": merged}, indent=1).encode())

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
        if record.squashfs_check is not None:
            data["squashfs_size"], data["squashfs_sha256"] = record.squashfs_check
        path = self.record_path(record.reference)
        if _same_record(path, data):
            return  # the same image again: the record stays, and every launch plan that names it
        self.write_atomic(path, json.dumps(data, indent=1).encode())

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
            squashfs_size=int(data.get("squashfs_size") or 0),
            squashfs_sha256=str(data.get("squashfs_sha256") or ""),
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

    def _own_record_files(self) -> list[tuple[Path, dict[str, Any]]]:
        out = []
        for path in sorted((self.root / "images").glob("*.json")):
            try:
                data = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue  # unreadable records are reported by lookup, not here
            if isinstance(data, dict):
                out.append((path, data))
        return out

    def squashfs_checks(self, digest: str) -> set[tuple[int, str]]:
        """The (size, sha256) this store's records hold for the squashfs of ``digest``."""
        return {(int(data.get("squashfs_size") or 0), str(data["squashfs_sha256"]))
                for _path, data in self._own_record_files()
                if data.get("digest") == digest and data.get("squashfs_sha256")}

    def record_squashfs(self, digest: str, check: tuple[int, str]) -> None:
        """Write ``check`` into every record of this store that names ``digest`` (after the
        squashfs was built or rebuilt, so no record vouches for a file that is gone)."""
        with self.lock("images"):
            for path, data in self._own_record_files():
                if data.get("digest") == digest and (data.get("squashfs_size"), data.get("squashfs_sha256")) != check:
                    data["squashfs_size"], data["squashfs_sha256"] = check
                    self.write_atomic(path, json.dumps(data, indent=1).encode())

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

    def inuse_lock_path(self, digest: str) -> Path:
        """The lock every container of the directory image ``digest`` holds shared while it
        runs (launch/execute.hold_image): what it names must not be deleted."""
        return self.root / "locks" / f"inuse-{digest_hex(digest)}.lock"

    @contextlib.contextmanager
    def unused(self, digest: str) -> Iterator[bool]:
        """Whether no running container has ``digest``'s directory tree as its root; while
        this is held (True), no container can start from it either."""
        if not self.rootfs_path(digest).is_dir():
            yield True
            return
        try:
            fd = os.open(self.inuse_lock_path(digest), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise _store_error(err, "opening an in-use lock") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def remove_record(self, text: str) -> ImageRecord:
        from mesobox.image.reference import parse_reference

        reference = str(parse_reference(text))
        path = self.record_path(reference)
        record = self._load_record(path, self.root)
        if record is None:
            if any(self.record_path(reference, r).exists() for r in self.ro_roots):
                raise StoreError(f"{text!r} is in a read-only site store", hint="ask the site admins")
            raise ImageNotFound(f"no image {text!r} in the store")
        # lock order everywhere: gc.lock, then rootfs-HEX, then images
        with self.in_use(), self.lock("rootfs-" + digest_hex(record.digest)), self.lock("images"):
            still_used = {r.digest for r in self.records() if r.store == self.root and r.reference != reference}
            drop = record.digest not in still_used
            with self.unused(record.digest) as unused:
                if drop and not unused:  # refused before anything is removed: nothing is lost
                    raise StoreError(f"{text!r} is in use: a running container has it as its root",
                                     hint="stop that container first, then remove the image")
                path.unlink(missing_ok=True)
                if drop:
                    force_rmtree(self.rootfs_path(record.digest))
                    self.squashfs_path(record.digest).unlink(missing_ok=True)
        return record

    def _remove_unused_tree(self, entry: os.DirEntry[str]) -> bool:
        """Remove the directory tree ``rootfs/NAME`` unless a running container has it
        as its root (its record was replaced or removed meanwhile)."""
        from mesobox.errors import InvalidReference

        try:
            digest_hex("sha256:" + entry.name)
        except InvalidReference:  # not a digest: litter
            force_rmtree(Path(entry.path))
            return True
        with self.unused("sha256:" + entry.name) as unused:
            if unused:  # under the lock: no launch can start from it meanwhile
                force_rmtree(Path(entry.path))
            return unused

    def prune(self) -> tuple[int, int]:
        """Delete blobs, flattened trees and leftovers no record uses: (files, bytes)."""
        count = freed = 0
        with self.collecting(), self.lock("images"):
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
            for kind, keep in (("blobs/sha256", used), ("rootfs", flattened), ("squashfs", flattened),
                               ("signatures", flattened)):
                if not (self.root / kind).is_dir():
                    continue  # signatures/: not in a store made before they were kept
                for entry in os.scandir(self.root / kind):
                    if entry.name.removesuffix(".sqfs") in keep:
                        continue
                    size = _tree_size(Path(entry.path))
                    if kind == "rootfs" and not self._remove_unused_tree(entry):
                        continue  # the root of a running container: kept
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


def _thread_lock(name: str) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(name, threading.Lock())


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


def _warn(message: str) -> None:
    from mesobox.console import warn

    warn(message)


def _tree_size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size if os.path.lexists(path) else 0
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
