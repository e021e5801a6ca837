"""Push and tag: a stored image out to a registry, an OCI image layout or an OCI archive
(``mesobox push``), and one more name for a stored image (``mesobox tag``).

Room: image/push.  The store keeps every image's manifest, config and layer blobs as it
pulled them (image/store.py), so a push sends those very bytes: the digest in the
destination is the stored manifest digest (an image pulled through an index is pushed
as its platform's manifest).  Steps::

    find_stored        SOURCE (a reference, or a manifest digest / 12+ of its hex digits) → record
    outgoing           the stored manifest (re-hashed) and the blobs it names, all present
    push_registry      docker://: each blob HEADed, mounted or uploaded (image/upload.py), then the manifest
    write_layout       oci:DIR[:TAG]: blobs added to the layout, index.json entry for TAG replaced
    write_archive      oci-archive:FILE[:TAG]: a new tar of such a layout, renamed over FILE

Invariants:
- Nothing unverified leaves the store: every blob is hashed while it is sent or copied,
  and a mismatch stops the push before the registry commits it, or before the layout's
  index names it.
- The whole push holds the store's gc lock shared: ``prune`` cannot delete a blob under it.
- A layout directory is written through file descriptors opened without following
  symlinks, and only when it is the caller's own; blobs and index.json are replaced by
  rename, so a reader sees the old layout or the new one.  When the push fails, what it
  added is removed (the directory too, when it made it); an archive is written under a
  temporary name and renamed over FILE only when complete.
- ``tag`` writes one more image record for the same digest: no data is copied, and
  ``rm`` of one name keeps the data for the other (store.remove_record).
- Every failure is one line (StoreError for a missing blob or a destination that cannot
  be written, ImageNotFound, RegistryError/AuthError, UsageError).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mesobox.config import Config
from mesobox.errors import DigestMismatch, ImageNotFound, InvalidReference, StoreError, UsageError
from mesobox.image.store import HASH_CHUNK, ImageRecord, Store, force_rmtree

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mesobox.image.reference import Reference

REF_NAME = "org.opencontainers.image.ref.name"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'
MIN_DIGEST_PREFIX = 12  # hex digits: what `mesobox images` shows
DESTINATIONS = ("docker", "oci", "oci-archive")

Report = Callable[[str, int, str], None]  # (digest, size, what was done)


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    path: Path | None  # the stored file; None: ``data`` holds it (the manifest)
    data: bytes = b""

    def open(self) -> IO[bytes]:
        import io

        return open(self.path, "rb") if self.path is not None else io.BytesIO(self.data)


@dataclass(frozen=True)
class Outgoing:
    """What a push sends: the stored manifest and the blobs it names (config first)."""

    record: ImageRecord
    manifest: Blob
    media_type: str
    blobs: tuple[Blob, ...]


@dataclass(frozen=True)
class Pushed:
    destination: str  # as written: docker://HOST/REPO:TAG, oci:DIR:TAG, oci-archive:FILE:TAG
    digest: str  # the manifest digest in the destination
    blobs: tuple[tuple[str, int, str], ...]  # (digest, size, "exists"|"mounted"|"uploaded"|"written")


# --- the source --------------------------------------------------------------------------------------


def _digest_wanted(text: str) -> str | None:
    """The hex (or hex prefix) ``text`` names as a manifest digest: 12 to 64 hex digits,
    after ``sha256:`` or not; None when it is no digest."""
    hexpart = text.removeprefix("sha256:")
    if not MIN_DIGEST_PREFIX <= len(hexpart) <= 64 or not all(c in "0123456789abcdef" for c in hexpart):
        return None
    return hexpart


def find_stored(store: Store, text: str) -> ImageRecord:
    """The stored image ``text`` names: a reference (as ``run`` finds it), else a manifest
    digest or 12 or more of its first hex digits (``sha256:`` optional), when one image
    has it."""
    try:
        record = store.lookup(text)
        bad: InvalidReference | None = None
    except InvalidReference as err:
        record, bad = None, err
    if record is not None:
        return record
    hexpart = _digest_wanted(text)
    if hexpart is not None:
        matches = [r for r in store.records() if r.digest.removeprefix("sha256:").startswith(hexpart)]
        digests = sorted({r.digest for r in matches})
        if len(digests) > 1:
            raise UsageError(f"{text!r} names {len(digests)} stored images: {', '.join(d[:19] for d in digests)}",
                             hint="give more of the digest, or a reference")
        if matches:
            return matches[0]
    if bad is not None:
        raise bad
    raise ImageNotFound(f"no image {text!r} in the store",
                        hint="`mesobox images` lists the stored images; `mesobox pull REF` fetches one")


def outgoing(store: Store, record: ImageRecord) -> Outgoing:
    """The stored manifest (re-hashed) and its blobs; StoreError when one is missing."""
    from mesobox.image import manifest as mf
    from mesobox.image.digest import check_bytes

    again = f"`mesobox pull {record.reference}` fetches it again"
    path = store.find_blob(record.digest)
    if path is None:
        raise StoreError(f"the manifest {record.digest} of {record.reference} is missing from the store", hint=again)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise StoreError(f"cannot read the manifest of {record.reference}: {err.strerror}") from None
    try:
        check_bytes(data, record.digest, f"the stored manifest of {record.reference}")
    except DigestMismatch as err:
        raise DigestMismatch(err.message, hint=again) from None
    media_type = record.media_type or mf.media_type_of(data, None)
    config, layers = mf.parse_image_manifest(data, media_type)
    blobs: dict[str, Blob] = {}
    for desc in (config, *layers):
        if desc.digest in blobs:
            continue  # a layer listed twice is one blob
        found = store.find_blob(desc.digest)
        if found is None:
            raise StoreError(f"blob {desc.digest} of {record.reference} is missing from the store", hint=again)
        blobs[desc.digest] = Blob(desc.digest, desc.size, found)
    return Outgoing(record, Blob(record.digest, len(data), None, data), media_type, tuple(blobs.values()))


def _source_tag(record: ImageRecord) -> str:
    """The tag the source reference carries ("latest" when none): an oci destination's default."""
    from mesobox.image.reference import parse_reference

    try:
        return parse_reference(record.reference).tag or "latest"
    except InvalidReference:
        return "latest"


# --- push ----------------------------------------------------------------------------------------------------


def parse_destination(text: str) -> Reference:
    from mesobox.image.reference import parse_reference

    dest = parse_reference(text)
    if dest.transport not in DESTINATIONS:
        raise UsageError(f"cannot push to {dest.transport}: (it is read only)",
                         hint="push to docker://HOST/REPO:TAG, oci:DIR[:TAG] or oci-archive:FILE[:TAG]")
    return dest


def push_image(config: Config, source_text: str, dest_text: str, *, insecure: bool = False,
               chunk_size: int | None = None, report: Report | None = None) -> Pushed:
    """Copy the stored image ``source_text`` to ``dest_text``."""
    from mesobox.image.upload import DEFAULT_CHUNK

    dest = parse_destination(dest_text)
    done: list[tuple[str, int, str]] = []

    def note(digest: str, size: int, action: str) -> None:
        done.append((digest, size, action))
        if report is not None:
            report(digest, size, action)

    store = Store(config)
    with store.in_use():  # `mesobox prune` waits for this push
        record = find_stored(store, source_text)
        out = outgoing(store, record)
        if dest.transport == "docker":
            digest, where = push_registry(config, store, out, dest, insecure, chunk_size or DEFAULT_CHUNK, note)
        else:
            tag = dest.tag or _source_tag(record)
            where = f"{dest.transport}:{dest.path}:{tag}"
            if dest.transport == "oci":
                write_layout(out, Path(dest.path), tag, note)
            else:
                write_archive(out, Path(dest.path), tag, note)
            digest = record.digest
    return Pushed(where, digest, tuple(done))


def mount_source(store: Store, record: ImageRecord, dest: Reference) -> str | None:
    """A repository of ``dest``'s registry the image was pulled from (under this or another
    stored name), other than ``dest``'s own: the registry may mount its blobs from there."""
    from mesobox.image.reference import parse_reference

    for other in [record, *(r for r in store.records() if r.digest == record.digest and r != record)]:
        try:
            ref = parse_reference(other.reference)
        except InvalidReference:
            continue
        if ref.transport == "docker" and ref.registry == dest.registry and ref.repository != dest.repository:
            return ref.repository
    return None


def push_registry(config: Config, store: Store, out: Outgoing, dest: Reference, insecure: bool, chunk_size: int,
                  note: Report) -> tuple[str, str]:
    """Blobs (in parallel, each HEADed first), then the manifest: (digest, destination)."""
    from concurrent.futures import ThreadPoolExecutor

    from mesobox.image import upload
    from mesobox.image.registry import RegistrySource

    if dest.digest and dest.digest != out.record.digest:
        raise UsageError(f"{dest} names the digest {dest.digest}, but the image is {out.record.digest}",
                         hint="push to a tag (docker://HOST/REPO:TAG)")
    source = RegistrySource(dest, config, insecure=insecure)
    mount_from = mount_source(store, out.record, dest)

    def push_one(blob: Blob) -> None:
        note(blob.digest, blob.size, upload.push_blob(source, blob.digest, blob.size, blob.open, chunk_size,
                                                      mount_from))

    workers = max(1, min(config.max_parallel_downloads, len(out.blobs)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(push_one, blob) for blob in out.blobs]
        errors: list[BaseException] = []
        for fut in futures:
            try:
                fut.result()
            except BaseException as err:  # keep the first error; let the others finish
                errors.append(err)
    if errors:
        raise errors[0]
    name = dest.digest or dest.tag or "latest"
    digest = upload.put_manifest(source, name, out.manifest.data, out.media_type)
    separator = "@" if dest.digest else ":"
    return digest, f"docker://{dest.registry}/{dest.repository}{separator}{name}"


# --- OCI layouts ---------------------------------------------------------------------------------------------


def _dest_error(err: OSError, dest: Path) -> StoreError | UsageError:
    """One line for a destination that cannot be written."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"no space left writing {dest}", hint="free space there, or choose another destination")
    if err.errno == errno.EROFS:
        return StoreError(f"{dest} is on a read-only filesystem", hint="choose a writable destination")
    if err.errno in (errno.EACCES, errno.EPERM):
        return StoreError(f"permission denied writing {dest}", hint="choose a destination you may write")
    if err.errno == errno.ELOOP or (err.errno == errno.ENOTDIR and os.path.islink(dest)):
        # O_NOFOLLOW | O_DIRECTORY on a symlink: ENOTDIR on Linux, ELOOP elsewhere
        return UsageError(f"{dest} is a symbolic link: not followed", hint="name the directory it points to")
    if err.errno == errno.ENOTDIR:
        return UsageError(f"{dest}: not a directory")
    return StoreError(f"writing {dest} failed: {err.strerror or err}")


def _copy_hashed(blob: Blob, out: IO[bytes]) -> None:
    """Copy ``blob`` into ``out``, hashing it; DigestMismatch unless it is what it is named."""
    hasher = hashlib.sha256()
    size = 0
    with blob.open() as src:
        while chunk := src.read(HASH_CHUNK):
            hasher.update(chunk)
            out.write(chunk)
            size += len(chunk)
    _check_copied(blob, size, "sha256:" + hasher.hexdigest())


def _check_copied(blob: Blob, size: int, digest: str) -> None:
    if (size, digest) != (blob.size, blob.digest):
        raise DigestMismatch(f"stored blob {blob.digest} no longer hashes to its name ({digest}, {size} bytes): "
                             "not written", hint="pull the image again (it fetches a good copy of the blob)")


def _open_dir(name: str, dir_fd: int | None = None, create: bool = False) -> int:
    """A directory opened without following a symlink (made first when ``create``)."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=dir_fd)  # the umask decides, as for any directory
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _read_index(top: int, dest: Path) -> dict[str, Any] | None:
    """The layout's index.json; None for an empty directory; UsageError for a directory
    that holds something else (it is not scribbled into)."""
    try:
        fd = os.open("index.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top)
    except FileNotFoundError:
        if not os.listdir(top):
            return None
        raise UsageError(f"{dest} is neither empty nor an OCI image layout (no index.json): not written",
                         hint="choose a new or empty directory, or an existing layout") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(16 * 1024 * 1024)
    try:
        index = json.loads(data)
    except ValueError:
        index = None
    if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
        raise UsageError(f"{dest}/index.json is not an OCI image index: not written")
    return index


def _place_blob(shafd: int, blob: Blob) -> bool:
    """``blobs/sha256/HEX`` in the layout: kept when it is there and intact, else written
    under a temporary name and renamed.  Returns whether it was written."""
    name = blob.digest.split(":", 1)[1]
    try:
        st = os.stat(name, dir_fd=shafd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == blob.size and _intact(shafd, name, blob):
        return False
    tmp = f".{name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=shafd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=shafd)
    try:
        with os.fdopen(fd, "wb") as out:
            _copy_hashed(blob, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, name, src_dir_fd=shafd, dst_dir_fd=shafd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=shafd)
        raise
    return True


def _intact(shafd: int, name: str, blob: Blob) -> bool:
    hasher = hashlib.sha256()
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=shafd)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest() == blob.digest


def _index_entry(out: Outgoing, tag: str) -> dict[str, Any]:
    return {"mediaType": out.media_type, "digest": out.manifest.digest, "size": out.manifest.size,
            "annotations": {REF_NAME: tag}}


def _named(entry: object, tag: str) -> bool:
    annotations = entry.get("annotations") if isinstance(entry, dict) else None
    return isinstance(annotations, dict) and annotations.get(REF_NAME) == tag


def write_layout(out: Outgoing, dest: Path, tag: str, note: Report) -> None:
    """Add the image to the OCI image layout ``dest`` (made when missing) under ``tag``:
    an image already named ``tag`` there loses the name, every other one stays."""
    dest = dest.absolute()
    made = not os.path.lexists(dest)
    try:
        if made:
            dest.parent.mkdir(parents=True, exist_ok=True)
        top = _open_dir(str(dest), create=made)
    except OSError as err:
        raise _dest_error(err, dest) from None
    added: list[str] = []
    fds = [top]
    index: dict[str, Any] | None = {}
    try:
        owner = os.fstat(top).st_uid
        if owner != os.geteuid():
            raise UsageError(f"{dest} belongs to uid {owner}, not to you: not written",
                             hint="push into a directory of your own")
        fcntl.flock(top, fcntl.LOCK_EX)  # two pushes into one layout: neither loses the other's index entry
        index = _read_index(top, dest)
        fds.append(_open_dir("blobs", top, create=True))
        fds.append(_open_dir("sha256", fds[-1], create=True))
        for blob in (*out.blobs, out.manifest):
            wrote = _place_blob(fds[2], blob)
            if wrote:
                added.append(blob.digest.split(":", 1)[1])
            note(blob.digest, blob.size, "written" if wrote else "exists")
        from mesobox import files

        if index is None:
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
            files.write_atomic("oci-layout", LAYOUT_FILE, mode=0o644, durable=True, dir_fd=top)
        kept = [entry for entry in index.get("manifests", []) if not _named(entry, tag)]
        index["manifests"] = [*kept, _index_entry(out, tag)]
        files.write_atomic("index.json", json.dumps(index, indent=2).encode() + b"\n", mode=0o644, durable=True,
                           dir_fd=top)
    except BaseException as err:
        _undo_layout(dest, made, index is None, fds, added)
        if isinstance(err, OSError):
            raise _dest_error(err, dest) from None
        raise
    finally:
        for fd in fds:
            os.close(fd)


def _undo_layout(dest: Path, made: bool, fresh: bool, fds: list[int], added: list[str]) -> None:
    """Remove what a failed push added: the whole directory when it made it, everything
    in it when it was empty, else the blobs it wrote (index.json is written last, so it
    never names them)."""
    if made:
        force_rmtree(dest)
    elif fresh:
        for name in ("blobs", "oci-layout"):
            with contextlib.suppress(OSError):
                force_rmtree(dest / name)
    elif len(fds) == 3:
        for name in added:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fds[2])


# --- OCI archives ---------------------------------------------------------------------------------------------


class _HashingReader:
    """A blob's bytes for tarfile, hashed as they are read."""

    def __init__(self, src: IO[bytes]) -> None:
        self.src, self.hasher, self.count = src, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.src.read(size)
        self.hasher.update(data)
        self.count += len(data)
        return data


def _member(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    from mesobox import files

    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = size
    info.mtime = files.source_date_epoch()  # the same image gives the same archive
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    tar.addfile(_member(name, len(data)), io.BytesIO(data))


def _fill_archive(tar: tarfile.TarFile, out: Outgoing, tag: str, note: Report) -> None:
    _add_bytes(tar, "oci-layout", LAYOUT_FILE)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [_index_entry(out, tag)]}
    _add_bytes(tar, "index.json", json.dumps(index, indent=2).encode() + b"\n")
    tar.addfile(_member("blobs", directory=True))
    tar.addfile(_member("blobs/sha256", directory=True))
    for blob in (*out.blobs, out.manifest):
        with blob.open() as src:
            reader = _HashingReader(src)
            tar.addfile(_member("blobs/sha256/" + blob.digest.split(":", 1)[1], blob.size), reader)
        _check_copied(blob, reader.count, "sha256:" + reader.hasher.hexdigest())
        note(blob.digest, blob.size, "written")


def write_archive(out: Outgoing, dest: Path, tag: str, note: Report) -> None:
    """A new tar of an OCI layout holding only this image, named ``tag``, renamed over
    ``dest`` when complete (an existing archive is replaced whole, as skopeo does)."""
    dest = dest.absolute()
    name = dest.name
    try:
        parent = _open_dir(str(dest.parent))
    except OSError as err:
        raise _dest_error(err, dest) from None
    tmp = f".{name}.{os.getpid()}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                raise UsageError(f"{dest} is a directory", hint=f"an OCI layout directory is oci:{dest}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    _fill_archive(tar, out, tag, note)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            raise
    except OSError as err:
        raise _dest_error(err, dest) from None
    finally:
        os.close(parent)


# --- tag ---------------------------------------------------------------------------------------------------------


def tag_image(config: Config, source_text: str, new_text: str) -> tuple[ImageRecord, ImageRecord]:
    """Name the stored image ``source_text`` also ``new_text`` (a registry reference with
    a tag): one more record for the same digest, no data copied.  A name that named
    another image moves to this one.  Returns (source, new) records."""
    from mesobox.image.reference import parse_reference

    new_ref = parse_reference(new_text)
    if new_ref.transport != "docker":
        raise InvalidReference(f"bad name {new_text!r}: a tag is a registry reference, not {new_ref.transport}:",
                               hint="for example myimage:v1 or registry.example.org/group/myimage:v1")
    if new_ref.digest:
        raise InvalidReference(f"bad name {new_text!r}: an image cannot be tagged with a digest",
                               hint="a digest is what the content hashes to; give a tag (REPO:TAG)")
    store = Store(config)
    store.init()
    # lock order everywhere: gc.lock, then images (store.remove_record)
    with store.in_use(), store.lock("images"):
        record = find_stored(store, source_text)  # under the lock: an `rm` cannot take it meanwhile
        if record.store != store.root:
            raise StoreError(f"{record.reference} is in a read-only site store: it cannot be tagged in yours",
                             hint=f"pull it into your own store first (`mesobox pull {record.reference}`)")
        store.write_record(dataclasses.replace(record, reference=str(new_ref)))
    new = store.lookup(str(new_ref))
    if new is None:  # pragma: no cover - written just above
        raise StoreError(f"tagging {record.reference} as {new_ref} did not stick")
    return record, new

