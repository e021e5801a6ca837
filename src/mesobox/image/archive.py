"""Archive sources: OCI image layouts (``oci:``), their tars (``oci-archive:``) and
``docker save`` tars (``docker-archive:``).

Room: image/archive.  Invariants:
- Nothing is extracted to disk: tar members are read in place, through their own file
  handle and offset (thread-safe, streaming), so hostile member names cannot write
  anywhere.  Links inside a tar are followed only to other members, never outside.
- Blob paths are built only from digests that passed ``parse_digest`` (CVE-2024-3727).
- Every blob is verified (size and digest) while it is copied to ``dest``; on a
  mismatch ``dest`` is deleted and DigestMismatch raised, as for registries.
- The image config is validated (``imageconfig.checked_config``) while resolving, so a
  hostile config is refused before any layer is copied.
- docker-archive images get synthetic descriptors: digest = sha256 of each file,
  Docker media types (layer compression sniffed from its first bytes), and a
  synthetic schema2 manifest whose digest is the sha256 of its JSON.
OCI image-spec image-layout.md; docker save format: moby image/tarexport.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from pathlib import Path
from typing import IO, Any

from mesobox.errors import DigestMismatch, ImageNotFound, UsageError
from mesobox.image import manifest as mf
from mesobox.image.digest import Verifier, check_bytes, parse_digest, sha256_digest
from mesobox.image.reference import Reference, parse_docker_name
from mesobox.image.source import Descriptor, ImageSource, Progress, ResolvedImage

CHUNK = 1024 * 1024
REF_NAME = "org.opencontainers.image.ref.name"
MAX_JSON = 16 * 1024 * 1024


def open_archive(ref: Reference) -> ImageSource:
    if ref.transport == "oci":
        return LayoutSource(ref, DirFiles(Path(ref.path)))
    files = TarFiles(Path(ref.path))
    if ref.transport == "oci-archive":
        return LayoutSource(ref, files)
    return DockerArchiveSource(ref, files)


# -- file access: a directory or a tar read in place ---------------------------------
class DirFiles:
    """Files of an OCI layout directory."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise ImageNotFound(f"no OCI layout directory at {root}", hint="oci:DIR[:TAG] names a directory")
        self.root = root

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def size(self, name: str) -> int:
        try:
            return (self.root / name).stat().st_size
        except FileNotFoundError:
            raise ImageNotFound(f"{self.root}: {name} missing from the layout") from None

    def open(self, name: str) -> IO[bytes]:
        try:
            return open(self.root / name, "rb")
        except FileNotFoundError:
            raise ImageNotFound(f"{self.root}: {name} missing from the layout") from None


class _Slice:
    """Read-only view of ``size`` bytes at ``offset`` of a file (one tar member)."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        self._f.seek(offset)
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _Slice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TarFiles:
    """Members of an uncompressed tar, indexed once; links followed only inside the tar."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
            if magic[:2] == b"\x1f\x8b" or magic == b"\x28\xb5\x2f\xfd":
                raise UsageError(f"{path} is compressed", hint="decompress it first (gunzip / unzstd)")
            with tarfile.open(path, "r:") as tar:
                self.members = {posixpath.normpath(m.name.lstrip("/")): m for m in tar.getmembers()}
        except FileNotFoundError:
            raise ImageNotFound(f"no archive at {path}") from None
        except (tarfile.TarError, OSError) as err:
            raise ImageNotFound(f"{path} is not a readable tar archive: {err}") from None

    def _member(self, name: str) -> tarfile.TarInfo:
        key = posixpath.normpath(name)
        for _ in range(16):
            member = self.members.get(key)
            if member is None:
                raise ImageNotFound(f"{self.path}: {name} missing from the archive")
            if member.isfile() and not member.issparse():
                return member
            if member.issym():
                key = posixpath.normpath(posixpath.join(posixpath.dirname(key), member.linkname))
            elif member.islnk():
                key = posixpath.normpath(member.linkname.lstrip("/"))
            else:
                break
            if key.startswith("../") or key == "..":
                break
        raise ImageNotFound(f"{self.path}: {name} is not a regular file inside the archive")

    def exists(self, name: str) -> bool:
        return posixpath.normpath(name) in self.members

    def size(self, name: str) -> int:
        return self._member(name).size

    def open(self, name: str) -> _Slice:
        member = self._member(name)
        return _Slice(self.path, member.offset_data, member.size)


Files = DirFiles | TarFiles


def _read(files: Files, name: str, limit: int = MAX_JSON) -> bytes:
    if files.size(name) > limit:
        raise ImageNotFound(f"{name} in the archive is larger than {limit} bytes")
    with files.open(name) as f:
        return f.read()


def _copy_verified(files: Files, name: str, desc: Descriptor, dest: Path, progress: Progress | None) -> None:
    """Copy member ``name`` to ``dest`` verifying ``desc``; archives restart (no resume needed)."""
    verifier = Verifier(desc.digest, desc.size, "blob")
    try:
        with files.open(name) as src, open(dest, "wb") as out:
            while chunk := src.read(CHUNK):
                verifier.update(chunk)
                out.write(chunk)
                if progress:
                    progress(len(chunk))
        verifier.verify()
    except DigestMismatch:
        dest.unlink(missing_ok=True)
        raise


def blob_name(digest: str) -> str:
    algorithm, hexpart = parse_digest(digest)
    return f"blobs/{algorithm}/{hexpart}"


# -- OCI layout (directory or tar) ----------------------------------------------------
class LayoutSource:
    """``oci:DIR[:TAG]`` and ``oci-archive:FILE[:TAG]``."""

    def __init__(self, ref: Reference, files: Files) -> None:
        self.ref, self.files = ref, files
        if not files.exists("index.json"):
            raise ImageNotFound(f"{ref.path} is not an OCI image layout (no index.json)",
                                hint="create one with skopeo copy ... oci:DIR:TAG or umoci init")

    def _blob(self, desc: Descriptor) -> bytes:
        data = _read(self.files, blob_name(desc.digest))
        check_bytes(data, desc.digest, f"blob {desc.digest} of {self.ref.path}")
        return data

    def _pick(self, index: dict[str, Any]) -> Descriptor:
        entries = [mf.descriptor(e, f"{self.ref.path} index.json") for e in index.get("manifests") or []]
        tags = [e.annotations.get(REF_NAME, "") for e in entries]
        if self.ref.tag is not None:
            matches = [e for e, t in zip(entries, tags, strict=True) if t == self.ref.tag]
        else:  # image-layout.md: no name given → the only manifest, else the one named "latest"
            matches = entries if len(entries) == 1 else [e for e, t in zip(entries, tags, strict=True) if t == "latest"]
        if not matches:
            known = ", ".join(t or "(untagged)" for t in tags) or "none"
            raise ImageNotFound(f"{self.ref}: no such image in the layout; tags: {known}",
                                hint=f"name one as {self.ref.transport}:{self.ref.path}:TAG")
        return matches[0]

    def resolve(self, platform: str | None) -> ResolvedImage:
        index = mf.load_json(_read(self.files, "index.json"), f"{self.ref.path}/index.json")
        entry = self._pick(index)
        data = self._blob(entry)
        media_type = mf.media_type_of(data, entry.media_type)
        digest, index_digest, chosen = entry.digest, None, ""
        if media_type in mf.INDEXES:  # a multi-platform image inside the layout
            index_digest = digest
            sub, chosen = mf.select_from_index(data, platform, str(self.ref))
            data, digest = self._blob(sub), sub.digest
            media_type = mf.media_type_of(data, sub.media_type)
        resolved = mf.make_resolved(self.ref, data, media_type, digest, chosen, index_digest)
        config = self._blob(resolved.config)
        check_config(config, str(self.ref))
        if not chosen:
            chosen = mf.config_platform(config)
            mf.check_platform(chosen, platform, str(self.ref))
            resolved = mf.make_resolved(self.ref, data, media_type, digest, chosen, None)
        return resolved

    def fetch_blob(self, desc: Descriptor, dest: Path, progress: Progress | None = None) -> None:
        _copy_verified(self.files, blob_name(desc.digest), desc, dest, progress)

    def close(self) -> None:
        """Files are opened per read; nothing stays open."""


# -- docker save ----------------------------------------------------------------------
class DockerArchiveSource:
    """``docker-archive:FILE[:NAME:TAG|:@N]``: manifest.json with Config and Layers paths."""

    def __init__(self, ref: Reference, files: TarFiles) -> None:
        self.ref, self.files = ref, files
        self.paths: dict[str, str] = {}  # digest -> member name

    def _entry(self) -> dict[str, Any]:
        try:
            entries: list[dict[str, Any]] = json.loads(_read(self.files, "manifest.json"))
        except ValueError as err:
            raise ImageNotFound(f"{self.ref.path}: manifest.json is not JSON: {err}") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or not entries:
            raise ImageNotFound(f"{self.ref.path}: manifest.json lists no images")
        tag = self.ref.tag
        if tag is None:
            if len(entries) == 1:
                return entries[0]
        elif tag.startswith("@"):
            if int(tag[1:]) < len(entries):
                return entries[int(tag[1:])]
        else:
            wanted = str(parse_docker_name(tag))
            for entry in entries:
                if any(str(parse_docker_name(t)) == wanted for t in entry.get("RepoTags") or []):
                    return entry
        names = [", ".join(e.get("RepoTags") or ["(untagged)"]) for e in entries]
        raise ImageNotFound(f"{self.ref}: no such image in the archive; it holds: {'; '.join(names)}",
                            hint=f"name one as docker-archive:{self.ref.path}:NAME:TAG or :@INDEX")

    def _describe(self, name: str, media_type: str | None) -> Descriptor:
        digest = hashlib.sha256()
        with self.files.open(name) as f:
            head = f.read(CHUNK)
            sniffed = head
            while head:
                digest.update(head)
                head = f.read(CHUNK)
        if media_type is None:  # docker save layers are usually plain tars; sniff anyway
            media_type = (mf.DOCKER_LAYER_GZIP if sniffed[:2] == b"\x1f\x8b" else
                          mf.OCI_LAYER_ZSTD if sniffed[:4] == b"\x28\xb5\x2f\xfd" else mf.DOCKER_LAYER_TAR)
        desc = Descriptor(media_type, "sha256:" + digest.hexdigest(), self.files.size(name))
        self.paths[desc.digest] = name
        return desc

    def resolve(self, platform: str | None) -> ResolvedImage:
        entry = self._entry()
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise ImageNotFound(f"{self.ref.path}: manifest.json entry lacks Config or Layers")
        config = self._describe(config_name, mf.DOCKER_CONFIG)
        layers = tuple(self._describe(str(name), None) for name in layer_names)
        config_bytes = _read(self.files, config_name)
        check_config(config_bytes, str(self.ref))
        chosen = mf.config_platform(config_bytes)
        mf.check_platform(chosen, platform, str(self.ref))
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": mf.DOCKER_MANIFEST,
            "config": _desc_json(config),
            "layers": [_desc_json(d) for d in layers],
        }, indent=3).encode()
        return ResolvedImage(self.ref, sha256_digest(manifest), manifest, mf.DOCKER_MANIFEST,
                             config, layers, chosen, None)

    def fetch_blob(self, desc: Descriptor, dest: Path, progress: Progress | None = None) -> None:
        name = self.paths.get(desc.digest)
        if name is None:
            raise ImageNotFound(f"{self.ref}: blob {desc.digest} is not in the archive (resolve first)")
        _copy_verified(self.files, name, desc, dest, progress)

    def close(self) -> None:
        """Files are opened per read; nothing stays open."""


def check_config(data: bytes, where: str) -> None:
    """Refuse a malformed image config now, before any layer is copied."""
    from mesobox.image.imageconfig import checked_config

    checked_config(mf.load_json(data, f"image config of {where}").get("config"), f"image config of {where}")


def _desc_json(desc: Descriptor) -> dict[str, Any]:
    return {"mediaType": desc.media_type, "size": desc.size, "digest": desc.digest}

