"""Registry client: OCI distribution spec over httpx (image/http.py: proxies from the
environment, keep-alive connections, per-registry certificates in ``certs.d``).

Room: image/registry.  Invariants:
- Plain HTTP only for loopback hosts, ``config.insecure_registries`` or ``insecure=True``;
  HTTPS otherwise (also for redirects and token realms), verified against the system's
  CAs (``SSL_CERT_FILE``/``SSL_CERT_DIR``) plus the host's ``certs.d`` entry.
- Mirrors (``config.registry_mirrors``, "REGISTRY=MIRROR[/PREFIX]", in order) serve pulls
  first: manifests and blobs are asked of each mirror, then of the registry itself.  A
  mirror that does not have something is passed over silently; one that fails (down,
  refusing, its retries spent: two tries at most) is one warning and is not asked again
  by this source.  A mirror is trusted for tags as the registry is; every digest is still
  checked.  Pushes, logins and ``ping`` go to the registry alone.
- Authorization is sent only to the registry's own host: it is dropped when a redirect
  (blob GETs are often 307s to object storage) changes host.  At most 5 redirects.
- Transient failures (429, 5xx, refused/reset connections, timeouts) are retried with
  exponential backoff (``RetryPolicy``), honouring Retry-After up to a cap; a blob cut
  mid-body resumes with a Range request where the server answers 206.
- Only bytes that are exactly what was asked for reach the ``.partial`` file (it is
  trusted as a prefix when the pull resumes, even in another process): a 206 must carry
  the asked range of this blob, a 200 (Range ignored: start again from byte 0) the whole
  blob, and a declared Content-Length must be the length asked for; anything else is
  never written.  A body that ends early without an error (no length declared) is not
  trusted either: the file goes back to where that answer started.
- Manifests are checked against the digest asked for (by digest) or the
  Docker-Content-Digest header (by tag); blobs by ``Verifier`` while they stream.
- Every failure is one line: ImageNotFound (404), AuthError (401/403 after auth),
  RegistryError (anything else, with the status and the registry's errors[].message).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

from mesobox.config import Config
from mesobox.errors import (
    AuthError,
    ConfigError,
    DigestMismatch,
    ImageNotFound,
    InvalidReference,
    RegistryError,
    StoreError,
)
from mesobox.image import manifest as mf
from mesobox.image.auth import AUTH_HINT, Authenticator
from mesobox.image.digest import Verifier, check_bytes, sha256_digest
from mesobox.image.http import TRANSPORT_ERRORS, Connections, certs_dirs, host_dir
from mesobox.image.http import Response as Response  # upload.py reads answers through it
from mesobox.image.reference import DOCKER_HUB, Reference, parse_docker_name
from mesobox.image.source import Descriptor, Progress, ResolvedImage

MAX_REDIRECTS = 5
CHUNK = 1024 * 1024  # local reads of a partial download
MIRROR_TRIES = 2  # a mirror that fails twice in a row is left for the registry itself
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# Errors that mean "try again": refused/reset connections, timeouts, truncated bodies.
TRANSIENT = TRANSPORT_ERRORS
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    tries: int = 5
    base: float = 0.2  # seconds; attempt n waits base * 2**n
    retry_after_cap: float = 10.0
    timeout: float = 30.0  # socket timeout per operation

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.retry_after_cap)
            except ValueError:
                pass  # an HTTP-date: fall back to backoff
        return float(self.base * (2**attempt))


def is_loopback(host: str) -> bool:
    name = urlsplit("//" + host).hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_listed(registry: str, hosts: tuple[str, ...]) -> bool:
    """``registry`` (host[:port]) matches an entry given as host:port or as a bare host."""
    hostname = urlsplit("//" + registry).hostname or registry
    return any(entry in (registry, hostname) for entry in hosts)


def mirrors_of(registry: str, entries: tuple[str, ...]) -> list[str]:
    """The mirrors (``HOST[:PORT][/PREFIX]``) configured for ``registry``, in order: entries
    ``REGISTRY=MIRROR`` whose REGISTRY is ``registry`` (host:port or bare host)."""
    hostname = urlsplit("//" + registry).hostname or registry
    found = []
    for entry in entries:
        name, _, mirror = entry.partition("=")
        name = name.strip().lower()
        if name in ("index.docker.io", "registry-1.docker.io"):
            name = DOCKER_HUB
        if name in (registry, hostname) and mirror.strip():
            found.append(mirror.strip().rstrip("/"))
    return found


def mirror_reference(ref: Reference, mirror: str) -> Reference:
    """``ref``'s repository on ``mirror`` (``HOST[:PORT][/PREFIX]``); ConfigError when the
    entry is not a registry host (with a dot, a port or ``localhost``) and a path."""
    try:
        moved = parse_docker_name(f"{mirror}/{ref.repository}")
    except InvalidReference as err:
        moved = None
        why = err.message
    else:
        why = "the mirror must start with a registry host (with a dot or a port, or localhost)"
    if moved is None or moved.registry != mirror.partition("/")[0]:
        raise ConfigError(f"registry_mirrors: bad mirror {mirror!r} for {ref.registry}: {why}",
                          hint='entries are "REGISTRY=HOST[:PORT][/PREFIX]", e.g. "docker.io=mirror.example:5000"')
    return Reference("docker", registry=moved.registry, repository=moved.repository)


class RegistrySource:
    """An ``ImageSource`` for ``docker://`` references."""

    def __init__(self, ref: Reference, config: Config, insecure: bool = False,
                 retry: RetryPolicy | None = None, env: dict[str, str] | None = None,
                 credentials: tuple[str, str] | None = None, mirrors: bool = True) -> None:
        self.ref = ref
        self.retry = retry or RetryPolicy()
        self.insecure = insecure or is_listed(ref.registry, config.insecure_registries)
        # Docker Hub's API lives on registry-1.docker.io (docker.io only redirects there).
        host = "registry-1.docker.io" if ref.registry == DOCKER_HUB else ref.registry
        scheme = "http" if self._plain_ok(host) else "https"
        self.base = f"{scheme}://{host}"
        self.host = host
        self.scope = f"repository:{ref.repository}:pull"
        # credentials: given (`mesobox login` checks them), else looked up in the auth files
        self.auth = Authenticator(ref.registry, ref.repository, self._fetch_token, env, credentials)
        self.certs_dirs = certs_dirs(config.registry_certs_dirs, env)
        self._conns = Connections(self.retry.timeout, self.certs_dirs)
        self._small: dict[str, bytes] = {}  # verified config blobs read by resolve()
        # Pulls ask the mirrors first (module docstring); each is a source of its own,
        # with its own connections, credentials and fewer tries, made when a pull first
        # needs them (a push or a login never does).
        self._mirror_names = mirrors_of(ref.registry, config.registry_mirrors) if mirrors else []
        self._config, self._env = config, env
        self._mirrors: list[RegistrySource] | None = None
        self._failed: set[int] = set()  # indexes of mirrors that failed: not asked again
        self._lock = threading.Lock()

    def _plain_ok(self, host: str) -> bool:
        return self.insecure or is_loopback(host)

    # -- one HTTP exchange -------------------------------------------------------------
    def _connect(self, url: str) -> None:
        """Refuse ``url`` unless it is HTTPS, or plain HTTP to a host that may have it."""
        parts = urlsplit(url)
        if parts.scheme == "https" or (parts.scheme == "http" and self._plain_ok(parts.netloc)):
            return
        raise RegistryError(f"refusing {parts.scheme or 'schemeless'} URL {url}: only HTTPS outside loopback",
                            hint="add the host to insecure_registries or pass --insecure if you trust it")

    def _send(self, method: str, url: str, headers: dict[str, str], body: bytes | None = None) -> Response:
        self._connect(url)
        return self._conns.send(method, url, headers, body)

    def _fetch_token(self, url: str, basic: str | None) -> tuple[int, bytes]:
        resp = self._retrying(lambda: self._follow("GET", url, {"Authorization": basic} if basic else {}, None))
        return resp.status, resp.read(1024 * 1024)

    def _follow(self, method: str, url: str, headers: dict[str, str], scope: str | None,
                body: bytes | None = None) -> Response:
        """One request, answering one auth challenge and following up to 5 redirects."""
        own_host = urlsplit(url).netloc
        challenged = False
        for _hop in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            same_host = urlsplit(url).netloc == own_host
            if not same_host:
                sent.pop("Authorization", None)  # never leak credentials to another host
            elif scope is not None and (auth := self.auth.header(scope)):
                sent["Authorization"] = auth
            resp = self._send(method, url, sent, body)
            if resp.status == 401 and scope is not None and same_host and not challenged:
                challenge = resp.header("WWW-Authenticate")
                resp.read_error()
                self.auth.answer(challenge, scope)
                challenged = True
                continue
            if resp.status in (301, 302, 303, 307, 308) and resp.header("Location"):
                url = urljoin(url, resp.header("Location") or "")
                resp.read_error()
                method = "GET" if resp.status == 303 else method
                continue
            return resp
        raise RegistryError(f"more than {MAX_REDIRECTS} redirects fetching {url}")

    def _retrying(self, attempt_fn: Callable[[], Response]) -> Response:
        last = ""
        for attempt in range(self.retry.tries):
            try:
                resp = attempt_fn()
            except (AuthError, RegistryError):
                raise
            except TRANSIENT as err:
                if (bad := _cause(err, ssl.SSLCertVerificationError)) is not None:
                    raise self._certificate_error(bad) from None  # retrying cannot help
                last = _describe(err)
                retry_after = None
            else:
                if resp.status not in RETRY_STATUS:
                    return resp
                retry_after = resp.header("Retry-After")
                last = f"HTTP {resp.status}{_error_message(resp.read_error())}"
            if attempt + 1 < self.retry.tries:
                time.sleep(self.retry.delay(attempt, retry_after))
        raise RegistryError(f"{self.ref.registry}: {last} (gave up after {self.retry.tries} tries)",
                            hint="the registry is down or overloaded; try again later" + _proxy_note())

    def _certificate_error(self, err: ssl.SSLCertVerificationError) -> RegistryError:
        used = host_dir(self.host, self.certs_dirs)
        where = (f"add it to {used}" if used else
                 f"put it in {os.path.join(self.certs_dirs[0], self.host)}/ca.crt" if self.certs_dirs else
                 "install it system-wide")
        return RegistryError(f"{self.ref.registry}: TLS certificate verification failed: "
                             f"{err.verify_message or err.reason}",
                             hint=f"if you trust the registry's CA certificate, {where} (or name a bundle "
                                  "in SSL_CERT_FILE); use --insecure only for a registry you trust")

    def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> Response:
        """``method`` on ``/v2/...`` with retries and auth; the caller checks the status."""
        url = self.base + path
        return self._retrying(lambda: self._follow(method, url, dict(headers or {}), self.scope))

    def push_request(self, method: str, target: str, headers: dict[str, str] | None = None,
                     body: bytes | None = None) -> Response:
        """``method`` on ``target`` (a ``/v2/...`` path, or the Location of an upload,
        relative or absolute) with a token for pull and push (image/upload.py); the
        caller checks the status."""
        url = urljoin(self.base + "/", target)
        scope = f"repository:{self.ref.repository}:pull,push"
        return self._retrying(lambda: self._follow(method, url, dict(headers or {}), scope, body))

    def _check(self, resp: Response, what: str) -> None:
        if resp.status in (200, 206):
            return
        message = _error_message(resp.read_error())
        if resp.status == 404:
            raise ImageNotFound(f"{what} unknown: {self.ref}{message}",
                                hint="check the name and tag (and that you may see this repository)")
        if resp.status in (401, 403):
            raise AuthError(f"{self.ref.registry}: access to {self.ref.repository} denied "
                            f"(HTTP {resp.status}){message}", hint=AUTH_HINT)
        raise RegistryError(f"{self.ref.registry}: HTTP {resp.status} fetching {what}{message}")

    # -- distribution API --------------------------------------------------------------
    def ping(self) -> int:
        """GET /v2/: 200 or 401 means a distribution API is there; returns the status."""
        resp = self._retrying(lambda: self._send("GET", self.base + "/v2/", {}))
        resp.read_error()
        if resp.status not in (200, 401):
            raise RegistryError(f"{self.ref.registry}: /v2/ answered HTTP {resp.status}: not a registry?")
        return resp.status

    # -- mirrors ----------------------------------------------------------------------
    @property
    def mirrors(self) -> list[RegistrySource]:
        """The sources of this registry's mirrors, in order (ConfigError for a bad entry)."""
        with self._lock:
            if self._mirrors is None:
                retry = dataclasses.replace(self.retry, tries=min(self.retry.tries, MIRROR_TRIES))
                self._mirrors = [RegistrySource(mirror_reference(self.ref, name), self._config, retry=retry,
                                                env=self._env, mirrors=False) for name in self._mirror_names]
            return self._mirrors

    def _from_mirrors(self, what: Callable[[RegistrySource], T]) -> T:
        """``what`` of the first mirror that answers it, else of the registry itself
        (module docstring: a missing answer is passed over, a failure warned about)."""
        for index, mirror in enumerate(self.mirrors):
            if index in self._failed:
                continue
            try:
                return what(mirror)
            except (ImageNotFound, DigestMismatch):
                continue  # not there (or not as asked): the registry is the authority
            except RegistryError as err:  # AuthError too
                self._failed.add(index)
                from mesobox.console import warn

                warn(f"mirror {mirror.ref.registry} of {self.ref.registry} failed ({err.message}); "
                     f"pulling from {self.ref.registry}")
        return what(self)

    def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest by tag or digest, digest-checked:
        from the first mirror that has it, else from the registry."""
        return self._from_mirrors(lambda place: place._get_manifest_here(reference))

    def _get_manifest_here(self, reference: str) -> tuple[bytes, str, str]:
        resp = self.request("GET", f"/v2/{self.ref.repository}/manifests/{reference}", {"Accept": mf.ACCEPT})
        self._check(resp, "manifest")
        header_digest = resp.header("Docker-Content-Digest")
        data = resp.read(mf.MAX_MANIFEST_BYTES)
        if reference.startswith(("sha256:", "sha512:")):
            check_bytes(data, reference, f"manifest of {self.ref.name}")
            digest = reference
        else:
            digest = sha256_digest(data)
            if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
                raise DigestMismatch(f"manifest of {self.ref} hashes to {digest} but the registry says "
                                     f"{header_digest}", hint="a proxy or the registry altered the manifest")
        return data, mf.media_type_of(data, resp.header("Content-Type")), digest

    def get_blob_bytes(self, desc: Descriptor, limit: int = 16 * 1024 * 1024) -> bytes:
        if desc.size > limit:
            raise RegistryError(f"blob {desc.digest} is {desc.size} bytes, over the {limit} limit for JSON")
        data = self._from_mirrors(lambda place: place._get_blob_bytes_here(desc, limit))
        self._small[desc.digest] = data
        return data

    def _get_blob_bytes_here(self, desc: Descriptor, limit: int) -> bytes:
        resp = self.request("GET", f"/v2/{self.ref.repository}/blobs/{desc.digest}")
        self._check(resp, f"blob {desc.digest}")
        data = resp.read(limit)
        verifier = Verifier(desc.digest, desc.size, "blob")
        verifier.update(data)
        verifier.verify()
        return data

    def resolve(self, platform: str | None) -> ResolvedImage:
        wanted = self.ref.digest or self.ref.tag or "latest"
        data, media_type, digest = self.get_manifest(wanted)
        index_digest = None
        chosen = None
        if media_type in mf.INDEXES:
            index_digest = digest
            entry, chosen = mf.select_from_index(data, platform, str(self.ref))
            data, media_type, digest = self.get_manifest(entry.digest)
        resolved = mf.make_resolved(self.ref, data, media_type, digest, chosen or "", index_digest)
        if chosen is None:
            chosen = mf.config_platform(self.get_blob_bytes(resolved.config))
            mf.check_platform(chosen, platform, str(self.ref))
            resolved = mf.make_resolved(self.ref, data, media_type, digest, chosen, None)
        return resolved

    def fetch_blob(self, desc: Descriptor, dest: Path, progress: Progress | None = None) -> None:
        report = _Reporter(progress)  # one for every place asked: each byte is reported once
        cached = self._small.get(desc.digest)
        if cached is not None:  # fetched (and verified) by resolve(): no second download
            verifier = Verifier(desc.digest, desc.size, "blob")
            verifier.update(cached)
            _write_local(dest, 0, cached)
            report.advance_to(verifier.count)
            self._verify_or_remove(verifier, dest)
            return
        self._from_mirrors(lambda place: place._fetch_blob_here(desc, dest, report))

    def _fetch_blob_here(self, desc: Descriptor, dest: Path, report: _Reporter) -> None:
        """Download into ``dest``, resuming after what it holds (what another place left
        there included: every byte is checked against the digest in the end)."""
        verifier = Verifier(desc.digest, desc.size, "blob")
        try:
            _hash_prefix(dest, verifier, desc.size)
            self._download(desc, dest, verifier, report)
        except DigestMismatch:
            dest.unlink(missing_ok=True)
            raise
        self._verify_or_remove(verifier, dest)

    @staticmethod
    def _verify_or_remove(verifier: Verifier, dest: Path) -> None:
        try:
            verifier.verify()
        except DigestMismatch:
            dest.unlink(missing_ok=True)
            raise

    def _download(self, desc: Descriptor, dest: Path, verifier: Verifier, report: _Reporter) -> None:
        problem = ""
        for attempt in range(self.retry.tries):
            problem = self._stream_blob(desc, dest, verifier, report)
            if not problem:
                return
            if attempt + 1 < self.retry.tries:
                time.sleep(self.retry.delay(attempt))
        raise RegistryError(f"blob {desc.digest}: download kept failing after {self.retry.tries} tries "
                            f"({problem})", hint="the connection to the registry is unstable; try again")

    def _stream_blob(self, desc: Descriptor, dest: Path, verifier: Verifier, report: _Reporter) -> str:
        """One GET (ranged when resuming): "" when the blob is complete, else why it must
        be tried again (from ``verifier.count``)."""
        offset = verifier.count
        if offset == desc.size:
            return ""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self.request("GET", f"/v2/{self.ref.repository}/blobs/{desc.digest}", headers)
        try:
            self._check(resp, f"blob {desc.digest}")
            start, problem = _body_start(resp, offset, desc.size)
            if problem:
                return problem  # not the bytes asked for: nothing of it is written
            if start != offset:
                verifier.reset()  # RFC 9110 §14.2: Range ignored, the whole blob follows
            report.advance_to(start)
            return _write_body(resp, dest, start, verifier, report)
        finally:
            resp.close()

    def close(self) -> None:
        """Close the connections kept alive (the mirrors' too)."""
        for mirror in self._mirrors or []:
            mirror.close()
        self._conns.close()



def _body_start(resp: Response, offset: int, size: int) -> tuple[int, str]:
    """Where in the blob this answer's body starts (0 or ``offset``), or why it is not the
    bytes asked for: (start, "") or (0, problem)."""
    length = _content_length(resp.header("Content-Length"))
    if resp.status == 200:
        if length is not None and length != size:
            return 0, f"HTTP 200 with {length} bytes for a blob of {size}"
        return 0, ""
    if resp.status == 206 and offset:
        got = _content_range(resp.header("Content-Range"))
        if got is None or got[0] != offset or got[1] not in (None, size - 1) or got[2] not in (None, size):
            return 0, f"HTTP 206 for {resp.header('Content-Range')!r}, asked for bytes {offset}-{size - 1}/{size}"
        if length is not None and length != size - offset:
            return 0, f"HTTP 206 with {length} bytes, asked for {size - offset}"
        return offset, ""
    return 0, f"HTTP {resp.status} for a request without Range"


def _write_body(resp: Response, dest: Path, start: int, verifier: Verifier, report: _Reporter) -> str:
    """Stream the body into ``dest`` from ``start``: "" when the blob is complete, else why
    the caller must resume (from ``verifier.count``)."""
    try:
        with open(dest, "r+b" if start else "wb") as out:
            out.seek(start)
            out.truncate()
            offset = start
            while True:
                try:
                    chunk = resp.chunk()
                except TRANSIENT as err:
                    # cut mid-body: what arrived is what was asked for, a prefix to resume after
                    return f"cut after {offset} bytes: {_describe(err)}"
                if not chunk:
                    break
                verifier.update(chunk)
                out.write(chunk)
                offset += len(chunk)
                report.advance_to(offset)
            if verifier.count == verifier.size:
                return ""
            if _content_length(resp.header("Content-Length")) is not None:
                # short of the length _body_start checked (should the HTTP library report
                # a closed connection as the end): a prefix of what was asked for
                return f"cut after {offset} bytes"
            # Ended early without an error and without a declared length: the server said
            # "that is all", so this was not the blob; back to where this answer started.
            out.truncate(start)
    except OSError as err:  # only local file errors reach here (network ones return above)
        raise StoreError(f"cannot write {dest}: {err.strerror}", hint="check free space and permissions") from None
    verifier.reset()
    _hash_prefix(dest, verifier, verifier.size or 0)
    return f"the body ended after {offset - start} bytes, short of the blob"


class _Reporter:
    """Reports each byte to ``progress`` once, even when a download starts over."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress, self.seen = progress, 0

    def advance_to(self, count: int) -> None:
        if self.progress and count > self.seen:
            self.progress(count - self.seen)
            self.seen = count


def _write_local(dest: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of ``dest`` (truncating there); disk errors are StoreError."""
    try:
        with open(dest, "r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate()
            out.write(data)
    except OSError as err:
        raise StoreError(f"cannot write {dest}: {err.strerror}", hint="check free space and permissions") from None


def _hash_prefix(dest: Path, verifier: Verifier, size: int) -> None:
    """Feed an earlier partial download into ``verifier`` so the fetch can resume after it."""
    try:
        have = os.path.getsize(dest)
    except FileNotFoundError:
        return
    if have > size:
        os.truncate(dest, 0)
        return
    with open(dest, "rb") as f:
        while chunk := f.read(CHUNK):
            verifier.update(chunk)


def _content_range(content_range: str | None) -> tuple[int, int | None, int | None] | None:
    """RFC 9110 §14.4 "bytes START-END/LENGTH" (LENGTH may be "*"): (START, END, LENGTH)."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    span, _, total = content_range[6:].partition("/")
    first, _, last = span.partition("-")
    if not (first.isascii() and first.isdigit()):
        return None
    end = int(last) if last.isascii() and last.isdigit() else None
    length = int(total) if total.isascii() and total.isdigit() else None
    return int(first), end, length


def _content_length(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


def _error_message(body: bytes) -> str:
    """": message" from a distribution-spec error body ({"errors":[{"message":…}]}), or ""."""
    try:
        errors = json.loads(body).get("errors") or []
        messages = [str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict)]
    except (ValueError, AttributeError, TypeError):
        return ""
    return (": " + " ".join("; ".join(messages).split())) if messages else ""  # one line


def _cause(err: BaseException, kind: type[T]) -> T | None:
    """The first exception of ``kind`` in ``err``'s chain (httpx wraps what it met)."""
    seen: BaseException | None = err
    for _depth in range(10):
        if seen is None:
            return None
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(err: BaseException) -> str:
    """A few words for a transport error (the root cause httpx wrapped, where it says more)."""
    import httpx

    if _cause(err, socket.timeout) or _cause(err, TimeoutError) or isinstance(err, httpx.TimeoutException):
        return "timed out"
    if _cause(err, ConnectionRefusedError):
        return "connection refused" + (" by the proxy" if isinstance(err, httpx.ProxyError) else "")
    if (tls := _cause(err, ssl.SSLError)) is not None:
        return f"TLS error: {tls.reason or tls}"
    if isinstance(err, httpx.ProxyError):
        return f"the proxy refused: {err}"
    if (os_err := _cause(err, OSError)) is not None and os_err.strerror:
        return str(os_err.strerror)
    text = str(err) or type(err).__name__
    return " ".join(text.split())  # one line


def _proxy_note() -> str:
    """Where the environment names a proxy, say so: it may be the part that is down."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        for spelling in (name.lower(), name):  # lower case wins, as httpx reads them
            if os.environ.get(spelling):
                return (f" (or the proxy {os.environ[spelling]} in ${spelling}; NO_PROXY lists hosts "
                        "reached directly)")
    return ""
