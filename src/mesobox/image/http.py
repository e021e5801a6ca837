"""HTTP for the registry client: httpx clients (proxies, keep-alive, TLS per registry)
and the per-registry certificates of ``certs.d`` directories.

Room: image/http (under image/registry.py; nothing else imports it, and ``mesobox run``
never does: httpx costs ≈55 ms of imports).  Invariants:
- One ``Connections`` per ``RegistrySource``: one httpx client per TLS identity (the
  default one, plus one per host that has a ``certs.d`` entry), each keeping its
  connections alive across requests and threads.  Clients are made on first use.
- Proxies are httpx's reading of the environment (``trust_env``): ``HTTPS_PROXY`` for
  https URLs, ``HTTP_PROXY`` for http ones, ``ALL_PROXY`` for both, lower case winning
  over upper case; ``NO_PROXY`` lists hosts that are reached directly (``*``: none is
  proxied; ``example.com`` also covers its subdomains, ``.example.com`` only them; IP
  addresses and ``localhost`` match exactly; no CIDR ranges).  Loopback registries are
  proxied like any other unless ``NO_PROXY`` names them (httpx's default, and curl's).
- Every answer is read as the server sent it: ``Accept-Encoding: identity`` is asked for
  and bodies are never decoded, so digests are of the bytes the registry holds.
- CAs: the system store, through OpenSSL's defaults, which ``SSL_CERT_FILE`` and
  ``SSL_CERT_DIR`` replace; plus, for one host, the ``*.crt`` files (added CAs) and
  ``*.cert``/``*.key`` pairs (client certificates) of the first ``certs.d/HOST:PORT``
  directory found (``HOST`` alone for port 443), in the order ``certs_dirs`` gives:
  ``~/.config/containers/certs.d`` for ordinary users, then the site's
  ``registry_certs_dirs`` (podman's and docker's layout and order).
- A ``certs.d`` directory, host directory or file is used only when it belongs to root or
  to the caller and no one else may write it: another user must not be able to plant a CA
  (and so read or forge a registry's answers).  Anything else is one warning and is
  skipped; files are opened once, checked on the open descriptor, and loaded from it.
"""

from __future__ import annotations

import os
import ssl
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from mesobox.errors import ConfigError

MAX_CERT_FILE = 1 << 20  # a PEM bundle of a few hundred CAs is well under this
_HEADERS = {"User-Agent": "mesobox", "Accept-Encoding": "identity"}
# Errors of the transport ("try again" ones among them): refused/reset connections,
# timeouts, bodies cut short, proxies that fail.  httpx wraps the OSError it met.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (OSError, httpx.TransportError)


def certs_dirs(config_dirs: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
    """Where per-registry certificates are looked for, in order (module docstring)."""
    from mesobox.image.auth import _config_home

    env = dict(os.environ) if env is None else env
    found = []
    if os.geteuid() != 0:  # root reads only the site's directories
        home = Path(env.get("HOME") or os.path.expanduser("~"))
        found.append(str(_config_home(env, home) / "containers" / "certs.d"))
    found += list(config_dirs)
    return found


class Response:
    """An open answer: status, headers and the body, read as it streams."""

    def __init__(self, resp: httpx.Response, url: str) -> None:
        self.resp, self.url, self.status = resp, url, resp.status_code
        self._chunks: Iterator[bytes] | None = None

    def header(self, name: str) -> str | None:
        value = self.resp.headers.get(name)
        return None if value is None else str(value)

    def chunk(self) -> bytes:
        """The next piece of the body as sent (b"" at its end); transport errors raise."""
        if self._chunks is None:
            # pieces as they arrive, never held back to fill a chunk size: bytes that came
            # before a cut must reach the caller (they are the prefix a resume starts after)
            self._chunks = self.resp.iter_raw()
        return next(self._chunks, b"")

    def read(self, limit: int | None = None) -> bytes:
        """The whole body (RegistryError beyond ``limit`` bytes); the answer is closed."""
        from mesobox.errors import RegistryError

        parts: list[bytes] = []
        size = 0
        try:
            while chunk := self.chunk():
                parts.append(chunk)
                size += len(chunk)
                if limit is not None and size > limit:
                    raise RegistryError(f"{self.url}: answer larger than {limit} bytes")
        finally:
            self.close()
        return b"".join(parts)

    def read_error(self, limit: int = 64 * 1024) -> bytes:
        """At most ``limit`` bytes of an error body (never raises for a long or cut one)."""
        parts: list[bytes] = []
        size = 0
        try:
            while size < limit and (chunk := self.chunk()):
                parts.append(chunk)
                size += len(chunk)
        except TRANSPORT_ERRORS:
            pass
        finally:
            self.close()
        return b"".join(parts)[:limit]

    def close(self) -> None:
        """Done with this answer: its connection goes back to the pool when the body was
        read to the end, and is closed otherwise."""
        self.resp.close()


class Connections:
    """The HTTP clients of one registry source (module docstring): thread-safe."""

    def __init__(self, timeout: float, certs_dirs: Sequence[str]) -> None:
        self._timeout = timeout
        self._dirs = tuple(certs_dirs)
        self._clients: dict[str, httpx.Client] = {}
        self._client_of: dict[str, str] = {}  # https netloc -> key in _clients ("" = default)
        self._lock = threading.Lock()

    def send(self, method: str, url: str, headers: dict[str, str], body: bytes | None = None) -> Response:
        """One exchange, the body left to stream; transport errors raise (TRANSPORT_ERRORS)."""
        client = self.client_for(url)
        try:
            request = client.build_request(method, url, headers=headers, content=body)
        except httpx.InvalidURL as err:  # a Location or a token realm the registry made up
            from mesobox.errors import RegistryError

            raise RegistryError(f"cannot fetch {url[:200]!r}: {err}") from None
        return Response(client.send(request, stream=True), url)

    def client_for(self, url: str) -> httpx.Client:
        """The client for ``url``'s host: its own when it has certificates in a ``certs.d``
        directory (looked up once per host), else the shared default one."""
        parts = urlsplit(url)
        with self._lock:
            if parts.scheme == "https" and parts.netloc not in self._client_of:
                context = host_context(parts.netloc, self._dirs)
                self._client_of[parts.netloc] = parts.netloc if context is not None else ""
                if context is not None:
                    self._clients[parts.netloc] = self._make_client(context)
            key = self._client_of.get(parts.netloc, "") if parts.scheme == "https" else ""
            if key not in self._clients:
                self._clients[key] = self._make_client(ssl.create_default_context())
            return self._clients[key]

    def _make_client(self, context: ssl.SSLContext) -> httpx.Client:
        # trust_env: proxies from the environment; redirects are followed by the caller,
        # which decides what Authorization each hop may carry.
        try:
            return httpx.Client(verify=context, timeout=httpx.Timeout(self._timeout), headers=_HEADERS,
                                trust_env=True, follow_redirects=False)
        except (ImportError, ValueError) as err:  # a SOCKS or ftp:// proxy, a malformed one
            raise ConfigError(f"the proxy the environment names cannot be used: {err}",
                              hint="mesobox speaks to HTTP and HTTPS proxies only: fix or unset "
                                   "HTTPS_PROXY, HTTP_PROXY and ALL_PROXY (lower case too)") from None

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
            self._client_of.clear()
        for client in clients:
            client.close()


# --- certs.d --------------------------------------------------------------------------------


def host_dir(netloc: str, dirs: Sequence[str]) -> str | None:
    """The ``certs.d`` directory used for ``netloc`` (module docstring), or None."""
    for top in dirs:
        found = _open_host_dir(top, netloc)
        if found is not None:
            os.close(found)
            return os.path.join(top, _host_name(netloc))
    return None


def host_context(netloc: str, dirs: Sequence[str]) -> ssl.SSLContext | None:
    """A TLS context for ``netloc`` with the CAs and client certificates of its ``certs.d``
    directory added to the system's, or None when it has none (module docstring)."""
    for top in dirs:
        fd = _open_host_dir(top, netloc)
        if fd is None:
            continue
        try:
            return _load_host_dir(fd, os.path.join(top, _host_name(netloc)))
        finally:
            os.close(fd)
    return None


def _host_name(netloc: str) -> str:
    """The directory name of a host: ``HOST:PORT``, or ``HOST`` for https' own port."""
    return netloc[: -len(":443")] if netloc.endswith(":443") else netloc


def _open_host_dir(top: str, netloc: str) -> int | None:
    """A descriptor of ``top/HOST[:PORT]`` when both are trusted directories, else None."""
    name = _host_name(netloc)
    if not name or name.startswith(".") or "/" in name or "\x00" in name:
        return None
    top_fd = _open_trusted(top, None, directory=True)
    if top_fd is None:
        return None
    try:
        return _open_trusted(name, top_fd, directory=True, shown=os.path.join(top, name))
    finally:
        os.close(top_fd)


def _open_trusted(name: str, dir_fd: int | None, directory: bool, shown: str | None = None) -> int | None:
    """``name`` (relative to ``dir_fd``) opened, when it belongs to root or the caller and no
    one else may write it; None when it is missing or (with a warning) not trusted."""
    shown = shown or name
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else os.O_NONBLOCK)
    try:
        # O_NONBLOCK: a FIFO planted under a file's name must not hang the pull
        fd = os.open(name, flags, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        _distrust(shown, f"it cannot be opened ({err.strerror})")
        return None
    st = os.fstat(fd)
    why = None
    if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
        why = "it is not a directory" if directory else "it is not a regular file"
    elif st.st_uid not in (0, os.geteuid()):
        why = f"it belongs to uid {st.st_uid}, neither to root nor to you"
    elif st.st_mode & 0o022:
        why = "others may write it (chmod go-w it)"
    if why:
        os.close(fd)
        _distrust(shown, why)
        return None
    return fd


def _load_host_dir(fd: int, shown: str) -> ssl.SSLContext:
    """The system's TLS context plus what the host directory ``fd`` holds (podman's rules:
    ``*.crt`` are CAs, ``X.cert`` goes with ``X.key``)."""
    context = ssl.create_default_context()
    names = sorted(os.listdir(fd))
    for name in names:
        if name.endswith(".crt"):
            pem = _read_trusted(name, fd, os.path.join(shown, name))
            if pem is None:
                continue
            try:
                context.load_verify_locations(cadata=pem.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as err:
                raise ConfigError(f"{shown}/{name}: not a PEM CA certificate ({_reason(err)})",
                                  hint="fix or remove the file") from None
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext == ".key" and stem + ".cert" not in names:
            raise ConfigError(f"{shown}/{name} has no client certificate {stem}.cert beside it",
                              hint="a client key needs its certificate (podman's certs.d layout)")
        if ext == ".cert":
            if stem + ".key" not in names:
                raise ConfigError(f"{shown}/{name} has no key {stem}.key beside it",
                                  hint="a client certificate needs its key (podman's certs.d layout)")
            _load_client_pair(context, fd, shown, stem)
    return context


def _load_client_pair(context: ssl.SSLContext, fd: int, shown: str, stem: str) -> None:
    cert_fd = _open_trusted(stem + ".cert", fd, directory=False, shown=f"{shown}/{stem}.cert")
    if cert_fd is None:
        return
    try:
        key_fd = _open_trusted(stem + ".key", fd, directory=False, shown=f"{shown}/{stem}.key")
        if key_fd is None:
            return
        try:
            # OpenSSL reads files by name: the descriptors checked above, by their /proc name
            context.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
        except (ssl.SSLError, OSError) as err:
            raise ConfigError(f"{shown}/{stem}.cert, {stem}.key: not a certificate and its key "
                              f"({_reason(err)})", hint="fix or remove the files") from None
        finally:
            os.close(key_fd)
    finally:
        os.close(cert_fd)


def _read_trusted(name: str, dir_fd: int, shown: str) -> bytes | None:
    fd = _open_trusted(name, dir_fd, directory=False, shown=shown)
    if fd is None:
        return None
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            if sum(map(len, chunks)) > MAX_CERT_FILE:
                raise ConfigError(f"{shown}: over {MAX_CERT_FILE} bytes, not a certificate file")
    except OSError as err:
        raise ConfigError(f"cannot read {shown}: {err.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def _reason(err: BaseException) -> str:
    return str(getattr(err, "reason", None) or getattr(err, "strerror", None) or err)


def _distrust(path: str, why: str) -> None:
    from mesobox.console import warn

    warn(f"ignoring the registry certificates in {path}: {why}")
