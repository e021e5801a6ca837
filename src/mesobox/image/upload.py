"""Pushing to a registry: the few calls of the OCI distribution spec that ``mesobox sign``
needs (small blobs and one manifest), on top of the registry client's connections,
retries and auth (image/registry.py, ``RegistrySource.push_request``).

Room: image/upload.  Invariants:
- A blob is uploaded only when the registry does not have it already (HEAD first), in
  one monolithic upload (POST for a session, then PUT with ``?digest=``): the registry
  checks the digest itself, and the digest is computed here from the bytes sent.
- A manifest is PUT under a tag with its media type as Content-Type; the digest the
  registry answers (Docker-Content-Digest) must be the digest of the bytes sent.
- Every failure is one line: AuthError (401/403: "push access denied"), RegistryError.
- Pulls never import this module.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from mesobox.errors import AuthError, RegistryError
from mesobox.image.auth import AUTH_HINT
from mesobox.image.digest import sha256_digest
from mesobox.image.registry import RegistrySource, Response, _error_message


def _expect(source: RegistrySource, resp: Response, wanted: tuple[int, ...], what: str) -> None:
    """Raise one line unless ``resp.status`` is one of ``wanted`` (the body is consumed then)."""
    if resp.status in wanted:
        return
    message = _error_message(resp.read_error())
    if resp.status in (401, 403):
        raise AuthError(f"{source.ref.registry}: push to {source.ref.repository} denied "
                        f"(HTTP {resp.status}){message}", hint=AUTH_HINT)
    raise RegistryError(f"{source.ref.registry}: HTTP {resp.status} {what}{message}")


def has_blob(source: RegistrySource, digest: str) -> bool:
    """Whether the repository already holds the blob ``digest`` (HEAD)."""
    resp = source.push_request("HEAD", f"/v2/{source.ref.repository}/blobs/{digest}")
    resp.read_error()
    if resp.status == 200:
        return True
    if resp.status == 404:
        return False
    _expect(source, resp, (200,), f"checking blob {digest}")
    return False


def put_blob(source: RegistrySource, data: bytes) -> str:
    """Upload ``data`` as a blob (unless it is there already); returns its digest."""
    digest = sha256_digest(data)
    if has_blob(source, digest):
        return digest
    resp = source.push_request("POST", f"/v2/{source.ref.repository}/blobs/uploads/",
                               {"Content-Length": "0"}, b"")
    location = resp.header("Location")
    _expect(source, resp, (202,), "starting a blob upload")
    resp.read_error()
    if not location:
        raise RegistryError(f"{source.ref.registry}: a blob upload was started without a Location")
    resp = source.push_request("PUT", _with_digest(location, digest),
                               {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
                               data)
    _expect(source, resp, (201, 204), f"uploading blob {digest}")
    resp.read_error()
    return digest


def _with_digest(location: str, digest: str) -> str:
    """The upload URL with ``digest=`` added to whatever query the registry put there
    (distribution spec: the Location is opaque and may carry its own state)."""
    parts = urlsplit(location)
    query = f"{parts.query}&digest={digest}" if parts.query else f"digest={digest}"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def put_manifest(source: RegistrySource, tag: str, data: bytes, media_type: str) -> str:
    """PUT the manifest ``data`` under ``tag``; returns its digest."""
    digest = sha256_digest(data)
    resp = source.push_request("PUT", f"/v2/{source.ref.repository}/manifests/{tag}",
                               {"Content-Type": media_type, "Content-Length": str(len(data))}, data)
    answered = resp.header("Docker-Content-Digest")
    _expect(source, resp, (201, 204), f"pushing the manifest {source.ref.repository}:{tag}")
    resp.read_error()
    if answered and answered.startswith("sha256:") and answered != digest:
        raise RegistryError(f"{source.ref.registry}: stored the manifest as {answered}, not {digest}",
                            hint="a proxy or the registry altered the manifest")
    return digest
