"""A fault-injecting HTTP proxy in front of a real registry, for tests.

It forwards every request to ``upstream`` (a real docker-registry) and can, on demand:
answer a status (429/500/503…) N times for paths containing a string; cut a response
body after K bytes (then drop the connection); ignore Range requests; answer a Range
request with 200 and a short body of its choosing (with or without Content-Length), or
forward it asking upstream for another range (a 206 of the wrong bytes); redirect blob GETs
to a second listener ("storage", like S3 behind a registry) and record whether that hop
carried Authorization; hold a request back until the test releases it; demand a Bearer
token issued by its own ``/token`` endpoint (the token is stripped before forwarding).
Every request is logged (``log``, ``count``) so tests can prove how many times each blob
was fetched.
"""

from __future__ import annotations

import http.client
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
}


@dataclass
class Entry:
    listener: str  # "registry" | "storage" | "token"
    method: str
    path: str  # with query
    headers: dict[str, str]
    status: int = 0

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class Faults:
    statuses: list[list[object]] = field(default_factory=list)  # [substring, status, times_left, retry_after]
    cuts: list[list[object]] = field(default_factory=list)  # [substring, after_bytes, times_left]
    ignore_range: bool = False
    redirect_blobs: bool = False
    bearer: bool = False
    token_creds: tuple[str, str] | None = None  # demand Basic creds at /token
    stalls: list[list[object]] = field(default_factory=list)  # [substring, seconds, times_left]
    redirect_loop: bool = False  # the storage listener redirects to itself forever
    tamper: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # (path substring, old, new)
    range_200: list[list[object]] = field(default_factory=list)  # [substring, body, times_left, declare_length]
    range_shift: list[list[object]] = field(default_factory=list)  # [substring, delta, times_left]
    holds: list[list[object]] = field(default_factory=list)  # [substring, threading.Event, times_left]


class FaultProxy:
    def __init__(self, upstream: str, bind: str = "127.0.0.1", tls: tuple[str, str] | None = None) -> None:
        """``tls`` = (certificate, key) files: the registry listener then speaks HTTPS on ``bind``."""
        self.upstream = upstream
        self.bind, self.tls = bind, tls
        self.faults = Faults()
        self.log: list[Entry] = []
        self.tokens: set[str] = set()
        self._lock = threading.Lock()
        self._main = self._serve("registry")
        self._storage = self._serve("storage")
        self.host = f"{bind}:{self._main.server_address[1]}"
        self.storage_host = f"127.0.0.1:{self._storage.server_address[1]}"

    # -- configuration used by tests ----------------------------------------------------
    def fail(self, substring: str, status: int, times: int, retry_after: str | None = None) -> None:
        with self._lock:
            self.faults.statuses.append([substring, status, times, retry_after])

    def cut(self, substring: str, after_bytes: int, times: int = 1) -> None:
        with self._lock:
            self.faults.cuts.append([substring, after_bytes, times])

    def short_200_for_range(self, substring: str, body: bytes, times: int = 1, declare_length: bool = True) -> None:
        """Answer a GET carrying Range with 200 and ``body`` (not the blob), Content-Length
        included or not (then the body ends when the connection closes)."""
        with self._lock:
            self.faults.range_200.append([substring, body, times, declare_length])

    def shift_range(self, substring: str, delta: int, times: int = 1) -> None:
        """Forward a GET carrying Range with its start moved by ``delta`` bytes: the client
        gets a real 206, for bytes it did not ask for."""
        with self._lock:
            self.faults.range_shift.append([substring, delta, times])

    def hold(self, substring: str, times: int = 1) -> threading.Event:
        """Hold matching requests back until the returned event is set (or 300 s pass)."""
        release = threading.Event()
        with self._lock:
            self.faults.holds.append([substring, release, times])
        return release

    def stall(self, substring: str, seconds: float, times: int = 1) -> None:
        """Hold the answer back for ``seconds`` (to trip the client's timeout)."""
        with self._lock:
            self.faults.stalls.append([substring, seconds, times])

    def count(self, substring: str, listener: str | None = None, method: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for e in self.log
                if substring in e.path and listener in (None, e.listener) and method in (None, e.method)
            )

    def entries(self, substring: str = "") -> list[Entry]:
        with self._lock:
            return [e for e in self.log if substring in e.path]

    def close(self) -> None:
        for server in (self._main, self._storage):
            server.shutdown()
            server.server_close()

    # -- internals -----------------------------------------------------------------------
    def _take(self, table: list[list[object]], path: str) -> list[object] | None:
        with self._lock:
            for rule in table:
                if str(rule[0]) in path and int(str(rule[2])) > 0:
                    rule[2] = int(str(rule[2])) - 1
                    return rule
        return None

    def _record(self, entry: Entry) -> None:
        with self._lock:
            self.log.append(entry)

    def _serve(self, listener: str) -> ThreadingHTTPServer:
        proxy = self

        class Handler(_Handler):
            pass

        Handler.proxy, Handler.listener = proxy, listener
        server = ThreadingHTTPServer((self.bind if listener == "registry" else "127.0.0.1", 0), Handler)
        if self.tls is not None and listener == "registry":
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        server.request_queue_size = 128
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    listener: str

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _handle(self) -> None:
        entry = Entry(self.listener, self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        self.proxy._record(entry)
        entry.status = self._dispatch(entry)

    def _dispatch(self, entry: Entry) -> int:
        faults = self.proxy.faults
        path = urlsplit(self.path).path
        if self.listener == "registry" and path == "/token":
            return self._token(entry)
        if self.listener == "registry" and faults.bearer and not self._authorized(entry, path):
            return self._challenge(path)
        stall = self.proxy._take(faults.stalls, self.path)
        if stall is not None:
            time.sleep(float(str(stall[1])))
        held = self.proxy._take(faults.holds, self.path)
        if held is not None:
            release = held[1]
            assert isinstance(release, threading.Event)
            release.wait(300)
        if self.listener == "storage" and faults.redirect_loop:
            return self._reply(307, b"", {"Location": f"http://{self.proxy.storage_host}{self.path}"})
        rule = self.proxy._take(faults.statuses, self.path)
        if rule is not None:
            extra = {"Retry-After": str(rule[3])} if rule[3] is not None else {}
            return self._reply(int(str(rule[1])), b'{"errors":[{"code":"INJECTED","message":"injected fault"}]}', extra)
        if self.listener == "registry" and faults.redirect_blobs and "/blobs/" in path and self.command == "GET":
            return self._reply(307, b"", {"Location": f"http://{self.proxy.storage_host}{self.path}"})
        if self.command == "GET" and "range" in entry.headers:
            short = self.proxy._take(faults.range_200, self.path)
            if short is not None:
                body = bytes(short[1])  # type: ignore[call-overload]
                return self._reply(200, body, {"Content-Type": "text/html"}, declare_length=bool(short[3]))
        return self._forward(entry)

    def _authorized(self, entry: Entry, path: str) -> bool:
        auth = entry.authorization or ""
        return auth.startswith("Bearer ") and auth[7:] in self.proxy.tokens

    def _challenge(self, path: str) -> int:
        parts = path.split("/")
        scheme = "https" if self.proxy.tls else "http"
        value = f'Bearer realm="{scheme}://{self.proxy.host}/token",service="faultproxy"'
        for marker in ("manifests", "blobs"):
            if marker in parts:
                repo = "/".join(parts[2 : parts.index(marker)])
                value += f',scope="repository:{repo}:pull"'
        return self._reply(
            401,
            b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
            {"WWW-Authenticate": value},
        )

    def _token(self, entry: Entry) -> int:
        import base64

        entry.listener = "token"
        creds = self.proxy.faults.token_creds
        if creds is not None:
            want = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            if entry.authorization != want:
                return self._reply(401, b'{"details":"bad credentials"}', {})
        query = parse_qs(urlsplit(self.path).query)
        token = secrets.token_hex(16)
        with self.proxy._lock:
            self.proxy.tokens.add(token)
        body = json.dumps({"token": token, "expires_in": 300, "scope": query.get("scope", [""])[0]}).encode()
        return self._reply(200, body, {"Content-Type": "application/json"})

    def _forward(self, entry: Entry) -> int:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"authorization", "host"}}
        if self.proxy.faults.ignore_range:
            headers.pop("Range", None)
        shift = self.proxy._take(self.proxy.faults.range_shift, self.path) if "Range" in headers else None
        if shift is not None:
            start = int(headers["Range"].removeprefix("bytes=").split("-")[0])
            headers["Range"] = f"bytes={max(start + int(str(shift[1])), 0)}-"
        conn = http.client.HTTPConnection(self.proxy.upstream, timeout=30)
        try:
            conn.request(self.command, self.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}}
        finally:
            conn.close()
        for substring, old, new in self.proxy.faults.tamper:
            if substring in self.path:
                body = body.replace(old, new)
        rule = self.proxy._take(self.proxy.faults.cuts, self.path) if self.command == "GET" else None
        if rule is not None and resp.status in (200, 206) and len(body) > int(str(rule[1])):
            self._reply(resp.status, body[: int(str(rule[1]))], out, length=len(body))
            self.close_connection = True
            return resp.status
        return self._reply(resp.status, body, out)

    def _reply(self, status: int, body: bytes, headers: dict[str, str], length: int | None = None,
               declare_length: bool = True) -> int:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if declare_length:
            self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self.wfile.flush()
        return status


@contextmanager
def fault_proxy(upstream: str, bind: str = "127.0.0.1", tls: tuple[str, str] | None = None) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream, bind, tls)
    try:
        yield proxy
    finally:
        proxy.close()
