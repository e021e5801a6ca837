"""Image room: write a stored image out, as a directory, a squashfs file or an OCI
image layout (``mesobox export``).  A squashfs file carries the image config after the
filesystem (image/portable.py), so it runs as the stored image does.

Export holds the store's gc lock shared (``prune`` waits for it), re-hashes every blob
it writes out (a substituted blob is never exported under the original digest) and
checks a squashfs against the size and sha256 recorded when it was built; when it
fails, nothing it wrote is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from mesobox.config import Config
from mesobox.errors import DigestMismatch, StoreError, UsageError
from mesobox.image.store import HASH_CHUNK, ImageRecord, Store, force_rmtree


def export(config: Config, reference: str, fmt: str, out: Path) -> Path:
    """Write the stored image ``reference`` to ``out`` (a new path, or an empty
    directory) in format ``fmt``; returns the absolute path written."""
    store = Store(config)
    record = store.require(reference)
    out = out.absolute()
    check_output(out)
    with store.in_use(), undone_on_failure(out):
        try:
            if fmt == "oci":
                export_oci(store, record, out)
            elif fmt == "dir":
                export_dir(store, record, out)
            else:
                export_squashfs(config, record, out)
        except OSError as err:
            from mesobox.image.store import _store_error

            raise _store_error(err, f"exporting to {out}") from None
    return out


def check_output(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} already exists", hint="choose a new path, or remove it first")


@contextlib.contextmanager
def undone_on_failure(out: Path) -> Iterator[None]:
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


def export_squashfs(config: Config, record: ImageRecord, out: Path) -> None:
    """The image's squashfs (made now when the store has only the directory), checked
    against what was recorded when it was built, followed by the image config
    (image/portable.py): running the file then behaves like running the stored image."""
    from mesobox.image.portable import MEDIA_TYPE, trailer
    from mesobox.image.pull import ensure_format

    record = ensure_format(config, record, "squashfs")
    assert record.squashfs is not None
    size, digest = copy_checked(record.squashfs, out, record.squashfs_check, f"the squashfs of {record.reference}",
                                f"`mesobox pull {record.reference}` rebuilds it")
    payload = {"mediaType": MEDIA_TYPE, "reference": record.reference, "digest": record.digest,
               "indexDigest": record.index_digest, "configDigest": record.config_digest,
               "platform": record.platform, "squashfsDigest": digest, "config": record.config}
    with open(out, "ab") as f:
        f.write(trailer(payload, size))


def copy_checked(src: Path, dest: Path, check: tuple[int, str] | None, what: str, again: str) -> tuple[int, str]:
    """Copy ``src`` to a new file ``dest``, hashing what is copied; DigestMismatch (and no
    ``dest``) unless it is ``check`` (size, "sha256:HEX"); ``None`` checks nothing.
    Returns the (size, "sha256:HEX") copied."""
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
    return size, "sha256:" + digest.hexdigest()


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
        copy_checked(src, dest, (size if size is not None else src.stat().st_size, digest),
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
