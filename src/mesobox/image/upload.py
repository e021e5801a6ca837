"""Pushing to a registry: the calls of the OCI distribution spec that ``mesobox push``
and ``mesobox sign`` need, on top of the registry client's connections, retries and
auth (image/registry.py).

Room: image/upload.  Invariants:
- A blob is uploaded only when the registry does not have it already (HEAD first).
  Given a repository of the same registry that holds it, the registry is asked to mount
  it from there (POST ``?mount=&from=``): 201 means done, 202 means it would not (the
  answer then is an upload session, and the blob is uploaded into it); 401/403 (no
  right to read that repository) means a plain upload.
- Up to the chunk size a blob goes up in one PUT (monolithic: POST for a session, then
  PUT with ``?digest=``); above it in PATCHes of the chunk size, each with its
  Content-Range, then an empty PUT with ``?digest=``.  Every request after the POST goes
  to the Location the registry answered last (it is opaque and may carry state).
- The digest is computed here from the bytes sent, and compared before the final PUT:
  a blob that no longer hashes to its name (a damaged store) is never committed.  The
  registry checks it again itself.
- A session the registry lost (404, 416, a Range that is not what was sent, a digest it
  rejects after a resent chunk) starts again from byte 0, at most ``UPLOAD_SESSIONS``
  times; transient failures of one request are retried by the registry client.
- Credentials go to the registry's own host only: an upload Location on another host
  (object storage) is sent no Authorization.
- A manifest is PUT under a tag (or its digest) with its media type as Content-Type; the
  digest the registry answers (Docker-Content-Digest) must be the digest of the bytes sent.
- Every failure is one line: AuthError (401/403: "push ... denied"), RegistryError,
  DigestMismatch (the local blob).
- Pulls never import this module.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import IO
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

from mesobox.errors import AuthError, DigestMismatch, MesoboxError, RegistryError
from mesobox.image.auth import AUTH_HINT
from mesobox.image.digest import sha256_digest
from mesobox.image.registry import TRANSIENT, RegistrySource, Response, _error_message

UPLOAD_SESSIONS = 3
DEFAULT_CHUNK = 32 * 1024 * 1024
OCTET_STREAM = "application/octet-stream"
# Answers to a PATCH or the final PUT that mean the session is lost or holds other bytes.
_LOST = (400, 404, 416)

Opener = Callable[[], IO[bytes]]  # a fresh reader of the blob from byte 0, for each session


class _Restart(Exception):
    """The upload session is lost: start the blob again (why: the message)."""


def push_scope(source: RegistrySource) -> str:
    return f"repository:{source.ref.repository}:pull,push"


def request(source: RegistrySource, method: str, target: str, headers: dict[str, str] | None = None,
            body: bytes | None = None, scope: str | None = None) -> Response:
    """``method`` on ``target`` (a ``/v2/...`` path or an upload Location, relative or
    absolute) with retries; with a token for ``scope`` (default: pull and push of the
    repository) on the registry's own host, and no credentials anywhere else."""
    url = urljoin(source.base + "/", target)
    own = urlsplit(url).netloc == urlsplit(source.base).netloc
    wanted = (scope or push_scope(source)) if own else None
    return source._retrying(lambda: source._follow(method, url, dict(headers or {}), wanted, body))


def _expect(source: RegistrySource, resp: Response, wanted: tuple[int, ...], what: str) -> None:
    """Raise one line unless ``resp.status`` is one of ``wanted`` (the body is consumed then)."""
    if resp.status in wanted:
        return
    message = _error_message(resp.read_error())
    if resp.status in (401, 403):
        raise AuthError(f"{source.ref.registry}: push to {source.ref.repository} denied "
                        f"(HTTP {resp.status}){message}", hint=AUTH_HINT)
    raise RegistryError(f"{source.ref.registry}: HTTP {resp.status} {what}{message}")


def _session_step(source: RegistrySource, resp: Response, wanted: tuple[int, ...], what: str) -> None:
    """As ``_expect``, but an answer that means the session is lost restarts the blob."""
    if resp.status in _LOST:
        message = _error_message(resp.read_error())
        raise _Restart(f"HTTP {resp.status} {what}{message}")
    _expect(source, resp, wanted, what)


def has_blob(source: RegistrySource, digest: str) -> bool:
    """Whether the repository already holds the blob ``digest`` (HEAD)."""
    resp = request(source, "HEAD", f"/v2/{source.ref.repository}/blobs/{digest}")
    if resp.status == 200:
        resp.read_error()
        return True
    if resp.status == 404:
        resp.read_error()
        return False
    _expect(source, resp, (200,), f"checking blob {digest}")
    return False


def start_upload(source: RegistrySource, digest: str, mount_from: str | None = None) -> str | None:
    """POST for an upload session: its Location, or None when the registry mounted
    ``digest`` from the repository ``mount_from`` (201)."""
    path = f"/v2/{source.ref.repository}/blobs/uploads/"
    scope = None
    if mount_from:
        path += "?" + urlencode({"mount": digest, "from": mount_from})
        # the token must also let this user read the repository it is mounted from
        scope = f"{push_scope(source)} repository:{mount_from}:pull"
    resp = request(source, "POST", path, {"Content-Length": "0"}, b"", scope)
    location = resp.header("Location")
    if mount_from and resp.status == 201:
        resp.read_error()
        return None
    if mount_from and resp.status in (401, 403):
        # not allowed to read the other repository: an upload needs only this one
        resp.read_error()
        return start_upload(source, digest)
    _expect(source, resp, (202,), "starting a blob upload")
    resp.read_error()
    if not location:
        raise RegistryError(f"{source.ref.registry}: a blob upload was started without a Location")
    return location


def _with_digest(location: str, digest: str) -> str:
    """The upload URL with ``digest=`` added to whatever query the registry put there
    (distribution spec: the Location is opaque and may carry its own state)."""
    parts = urlsplit(location)
    query = f"{parts.query}&digest={digest}" if parts.query else f"digest={digest}"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _damaged(digest: str, got: str, sent: int) -> DigestMismatch:
    return DigestMismatch(f"blob {digest} no longer hashes to its name ({got} over {sent} bytes): not pushed",
                          hint="pull the image again (it fetches a good copy of the blob)")


def _upload_whole(source: RegistrySource, location: str, opener: Opener, digest: str, size: int) -> None:
    """One PUT with the whole blob (read into memory: only blobs up to the chunk size)."""
    with opener() as f:
        data = f.read(size + 1)
    got = sha256_digest(data)
    if got != digest or len(data) != size:
        raise _damaged(digest, got, len(data))
    resp = request(source, "PUT", _with_digest(location, digest),
                   {"Content-Type": OCTET_STREAM, "Content-Length": str(size)}, data)
    _session_step(source, resp, (201, 204), f"uploading blob {digest}")
    resp.read_error()


def _upload_chunks(source: RegistrySource, location: str, opener: Opener, digest: str, size: int,
                   chunk_size: int) -> None:
    """PATCHes of ``chunk_size`` bytes, each to the Location the last answer named, then
    the closing PUT; the bytes sent are hashed on the way."""
    hasher = hashlib.sha256()
    offset = 0
    with opener() as f:
        while data := f.read(chunk_size):
            hasher.update(data)
            end = offset + len(data) - 1
            resp = request(source, "PATCH", location,
                           {"Content-Type": OCTET_STREAM, "Content-Range": f"{offset}-{end}",
                            "Content-Length": str(len(data))}, data)
            _session_step(source, resp, (202, 204), f"uploading bytes {offset}-{end} of blob {digest}")
            location = resp.header("Location") or location
            held = resp.header("Range")
            resp.read_error()
            if held and held.removeprefix("bytes=") != f"0-{end}":
                raise _Restart(f"the registry holds bytes {held}, not 0-{end}")
            offset = end + 1
    got = "sha256:" + hasher.hexdigest()
    if got != digest or offset != size:
        raise _damaged(digest, got, offset)
    resp = request(source, "PUT", _with_digest(location, digest), {"Content-Length": "0"}, b"")
    _session_step(source, resp, (201, 204), f"closing the upload of blob {digest}")
    resp.read_error()


def _cancel(source: RegistrySource, location: str) -> None:
    """Ask the registry to drop an upload session (once; it expires anyway)."""
    url = urljoin(source.base + "/", location)
    own = urlsplit(url).netloc == urlsplit(source.base).netloc
    try:
        source._follow("DELETE", url, {}, push_scope(source) if own else None).read_error()
    except MesoboxError:
        pass
    except TRANSIENT:
        pass


def push_blob(source: RegistrySource, digest: str, size: int, opener: Opener, chunk_size: int = DEFAULT_CHUNK,
              mount_from: str | None = None) -> str:
    """Make the repository hold the blob ``digest``: "exists" (it had it), "mounted"
    (from ``mount_from``, a repository of the same registry) or "uploaded"."""
    if has_blob(source, digest):
        return "exists"
    why = ""
    for _session in range(UPLOAD_SESSIONS):
        location = start_upload(source, digest, mount_from)
        if location is None:
            return "mounted"
        mount_from = None  # refused once (202): the blob is uploaded from now on
        try:
            if size <= chunk_size:
                _upload_whole(source, location, opener, digest, size)
            else:
                _upload_chunks(source, location, opener, digest, size, chunk_size)
            return "uploaded"
        except _Restart as lost:
            why = str(lost)
            _cancel(source, location)
        except BaseException:
            _cancel(source, location)  # nothing is committed: the session goes too
            raise
    raise RegistryError(f"{source.ref.registry}: the upload of blob {digest} failed {UPLOAD_SESSIONS} times "
                        f"(last: {why})", hint="the registry lost the upload sessions; try again")


def put_blob(source: RegistrySource, data: bytes) -> str:
    """Upload ``data`` as a blob (unless it is there already); returns its digest."""
    digest = sha256_digest(data)
    push_blob(source, digest, len(data), lambda: io.BytesIO(data), max(len(data), 1))
    return digest


def put_manifest(source: RegistrySource, tag: str, data: bytes, media_type: str) -> str:
    """PUT the manifest ``data`` under ``tag`` (or its own digest); returns its digest."""
    digest = sha256_digest(data)
    resp = request(source, "PUT", f"/v2/{source.ref.repository}/manifests/{tag}",
                   {"Content-Type": media_type, "Content-Length": str(len(data))}, data)
    answered = resp.header("Docker-Content-Digest")
    _expect(source, resp, (201, 204), f"pushing the manifest {source.ref.repository}:{tag}")
    resp.read_error()
    if answered and answered.startswith("sha256:") and answered != digest:
        raise RegistryError(f"{source.ref.registry}: stored the manifest as {answered}, not {digest}",
                            hint="a proxy or the registry altered the manifest")
    return digest
