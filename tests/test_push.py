"""``mesobox push`` and ``mesobox tag`` (image/push.py, image/upload.py).

Real parts: the docker-registry fixture (and one with htpasswd Basic auth), images built
with umoci, and independent clients checking what mesobox wrote: ``skopeo inspect`` (the
digest push printed), ``skopeo copy`` + ``umoci unpack --rootless`` (the files), a second
ordinary user pulling and running the pushed image.  A small forwarding proxy in front of
the registry (``Recorder``, below) logs every request with its status, so the tests count
uploads, PATCHes and mounts as the registry saw them, and injects refusals.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import secrets
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import (
    TEST_USER,
    Mesobox,
    Registry,
    User,
    free_port,
    make_oci_image,
    need_tool,
    open_busybox_rootfs,
    ordinary_user,
    start_registry,
)
from run_support import error_line

pytestmark = [pytest.mark.registry]
PASSWORD = "pu5h-Word"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


# --- a recording proxy in front of the real registry ----------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    status: int
    headers: dict[str, str]


class Recorder:
    """Forwards every request (body included) to ``upstream`` and logs it; answers
    ``fail(method, substring, status, times)`` itself instead.  The Host header is passed
    on, so the registry's upload Locations name the proxy, and uploads stay seen."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.log: list[Seen] = []
        self.faults: list[list[object]] = []
        self.lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_any(self) -> None:
                recorder.handle(self)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def fail(self, method: str, substring: str, status: int, times: int) -> None:
        with self.lock:
            self.faults.append([method, substring, status, times])

    def _fault(self, method: str, path: str) -> int | None:
        with self.lock:
            for rule in self.faults:
                if rule[0] == method and str(rule[1]) in path and int(str(rule[3])) > 0:
                    rule[3] = int(str(rule[3])) - 1
                    return int(str(rule[2]))
        return None

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        headers = [(k, v) for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP]  # Accept: repeated
        status = self._fault(h.command, h.path)
        if status is not None:
            out = {"Content-Type": "application/json"}
            data = json.dumps({"errors": [{"code": "INJECTED", "message": f"injected {status}"}]}).encode()
        else:
            conn = http.client.HTTPConnection(self.upstream, timeout=60)
            try:
                conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
                for key, value in headers:
                    conn.putheader(key, value)
                conn.endheaders(body if length else None)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
                out = {k: v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}}
                if h.command == "HEAD" and resp.getheader("Content-Length"):
                    out["Content-Length"] = resp.getheader("Content-Length") or "0"
            finally:
                conn.close()
        with self.lock:
            self.log.append(Seen(h.command, h.path, status, {k.lower(): v for k, v in headers}))
        h.send_response(status)
        for key, value in out.items():
            h.send_header(key, value)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.send_header("Connection", "close")
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def seen(self, method: str, substring: str = "") -> list[Seen]:
        with self.lock:
            return [s for s in self.log if s.method == method and substring in s.path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def proxy(registry: Registry) -> Iterator[Recorder]:
    rec = Recorder(registry.host)
    yield rec
    rec.close()


# --- images -----------------------------------------------------------------------------------------------


def _busybox(rootfs: Path) -> None:
    open_busybox_rootfs(rootfs)


def _hello(text: str):  # type: ignore[no-untyped-def]
    def layer(rootfs: Path) -> None:
        (rootfs / "hello.txt").write_text(text)
        os.chmod(rootfs / "hello.txt", 0o644)

    return layer


def _noise(rootfs: Path) -> None:
    # incompressible: the layer stays ~1.2 MB, several chunks of a small --chunk-size
    (rootfs / "noise.bin").write_bytes(secrets.token_bytes(1200 * 1024))
    os.chmod(rootfs / "noise.bin", 0o644)


@pytest.fixture(scope="module")
def layout(shared_tmp: Path) -> Path:
    """Tags v1 ("pushed", with a big incompressible layer) and v2 ("second") over busybox,
    readable by every user."""
    need_tool("skopeo", "umoci")
    where = shared_tmp / "push-images"
    make_oci_image(where, "v1", [_busybox, _hello("pushed\n"), _noise])
    make_oci_image(where, "v2", [_busybox, _hello("second\n")])
    subprocess.run(["chmod", "-R", "a+rX", str(where)], check=True)
    return where


def _repo(name: str) -> str:
    """A repository of its own per test: tests share the session's registry."""
    return f"push/{name}-{secrets.token_hex(3)}"


def _pushed_json(proc: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr.decode()
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


def _actions(doc: dict[str, object]) -> dict[str, str]:
    blobs = doc["blobs"]
    assert isinstance(blobs, list)
    return {b["digest"]: b["action"] for b in blobs}


def _skopeo_digest(ref: str, *extra: str) -> str:
    out = subprocess.run(["skopeo", "inspect", *extra, ref], capture_output=True, check=True).stdout
    digest: str = json.loads(out)["Digest"]
    return digest


def _unpacked_file(ref: str, work: Path, name: str, *extra: str) -> bytes:
    """``name`` in the rootfs of ``ref``, as skopeo copies it and umoci unpacks it."""
    subprocess.run(["skopeo", "copy", "-q", *extra, ref, f"oci:{work}/copy:x"], check=True, capture_output=True)
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{work}/copy:x", str(work / "bundle")], check=True,
                   capture_output=True)
    data = (work / "bundle" / "rootfs" / name).read_bytes()
    shutil.rmtree(work / "copy")
    subprocess.run(["rm", "-rf", str(work / "bundle")], check=True)
    return data


def _pull(mesobox: Mesobox, ref: str, user: User | None = None, fmt: str = "dir") -> str:
    proc = mesobox("pull", "-q", "--format", fmt, ref, as_user=user)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().strip()


@pytest.fixture(scope="module")
def second_user() -> User:
    """Another ordinary user: pulls and runs what the first one pushed."""
    return ordinary_user(os.environ.get("MESOBOX_TEST_USER2", TEST_USER + "p"))


# --- registry ---------------------------------------------------------------------------------------------


@pytest.mark.userns
def test_push_is_what_other_clients_and_users_get(mesobox: Mesobox, user: User, second_user: User,
                                                  registry: Registry, layout: Path, world_tmp: Path) -> None:
    digest = _pull(mesobox, f"oci:{layout}:v1", user)
    dest = f"docker://{registry.host}/{_repo('plain')}:v1"
    proc = mesobox("push", "--json", f"oci:{layout}:v1", dest, as_user=user)
    doc = _pushed_json(proc)
    assert doc["digest"] == digest and doc["destination"] == dest
    assert set(_actions(doc).values()) == {"uploaded"}
    assert _skopeo_digest(dest, "--tls-verify=false") == digest
    assert _unpacked_file(dest, world_tmp, "hello.txt", "--src-tls-verify=false") == b"pushed\n"
    # another user, their own store: pull what was pushed and run it
    assert _pull(mesobox, dest, second_user, "squashfs") == digest
    ran = mesobox("exec", dest, "cat", "/hello.txt", as_user=second_user)
    assert ran.returncode == 0 and ran.stdout == b"pushed\n", ran.stderr.decode()


def test_push_again_skips_every_blob(mesobox: Mesobox, proxy: Recorder, layout: Path) -> None:
    _pull(mesobox, f"oci:{layout}:v2")
    dest = f"docker://{proxy.host}/{_repo('again')}:v2"
    first = _actions(_pushed_json(mesobox("push", "--json", f"oci:{layout}:v2", dest)))
    assert set(first.values()) == {"uploaded"}
    assert len(proxy.seen("POST", "/blobs/uploads/")) == len(first)
    proxy.log.clear()
    second = _actions(_pushed_json(mesobox("push", "--json", f"oci:{layout}:v2", dest)))
    assert set(second.values()) == {"exists"} and second.keys() == first.keys()
    # the registry saw one HEAD per blob and the manifest, and no upload at all
    assert sorted(s.path.rsplit("/", 1)[1] for s in proxy.seen("HEAD", "/blobs/")) == sorted(first)
    for method in ("POST", "PATCH"):
        assert proxy.seen(method) == []
    assert [s.path.rsplit("/", 1)[1] for s in proxy.seen("PUT")] == ["v2"]


def test_chunked_push(mesobox: Mesobox, proxy: Recorder, layout: Path, world_tmp: Path) -> None:
    digest = _pull(mesobox, f"oci:{layout}:v1")
    dest = f"docker://{proxy.host}/{_repo('chunked')}:v1"
    chunk = 256 * 1024
    doc = _pushed_json(mesobox("push", "--json", "--chunk-size", "256k", f"oci:{layout}:v1", dest))
    sizes = {b["digest"]: b["size"] for b in doc["blobs"]}  # type: ignore[attr-defined]
    big = [d for d, size in sizes.items() if size > chunk]
    assert big, "the image has a blob larger than the chunk size"
    patches = proxy.seen("PATCH")
    assert patches and all(s.status == 202 for s in patches)
    assert len(patches) == sum(-(-sizes[d] // chunk) for d in big)
    # each session's PATCHes cover its blob in order, a chunk at most each, and its
    # closing PUT (empty, with the digest) commits it
    sessions: dict[str, list[tuple[int, int]]] = {}
    for seen in patches:
        start, end = (int(x) for x in seen.headers["content-range"].split("-"))
        sessions.setdefault(urlsplit(seen.path).path, []).append((start, end))
    closing = {urlsplit(s.path).path: (parse_qs(urlsplit(s.path).query)["digest"][0], s)
               for s in proxy.seen("PUT", "digest=") if s.headers.get("content-length") == "0"}
    assert sorted(d for d, _ in closing.values()) == sorted(big)
    for path, (blob, put) in closing.items():
        assert put.status == 201
        spans = sessions.pop(path)
        assert spans[0][0] == 0 and spans[-1][1] == sizes[blob] - 1
        assert all(end - start < chunk for start, end in spans)
        assert all(nxt[0] == prev[1] + 1 for prev, nxt in itertools.pairwise(spans))
    assert sessions == {}
    assert _skopeo_digest(dest, "--tls-verify=false") == digest
    assert len(_unpacked_file(dest, world_tmp, "noise.bin", "--src-tls-verify=false")) == 1200 * 1024


def test_cross_repository_mount_and_its_fallback(mesobox: Mesobox, proxy: Recorder, layout: Path,
                                                 world_tmp: Path) -> None:
    src = f"{proxy.host}/{_repo('mount-src')}"
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{src}:v1"],
                   check=True, capture_output=True)
    digest = _pull(mesobox, f"docker://{src}:v1")
    proxy.log.clear()
    dst = f"docker://{proxy.host}/{_repo('mount-dst')}:v1"
    actions = _actions(_pushed_json(mesobox("push", "--json", f"docker://{src}:v1", dst)))
    assert set(actions.values()) == {"mounted"}
    mounts = proxy.seen("POST", "mount=")
    assert len(mounts) == len(actions) and all(s.status == 201 for s in mounts)
    asked = [parse_qs(urlsplit(s.path).query) for s in mounts]
    assert sorted(q["mount"][0] for q in asked) == sorted(actions)
    assert all(q["from"] == [src.split("/", 1)[1]] for q in asked)
    assert proxy.seen("PATCH") == [] and len(proxy.seen("PUT")) == 1  # the manifest only
    assert _skopeo_digest(dst, "--tls-verify=false") == digest
    # The source repository no longer holds the big layer: the registry answers the
    # mount with an upload session (202), and that blob is uploaded into it.
    big = max(json.loads(_manifest(proxy.host, src.split("/", 1)[1], "v1"))["layers"], key=lambda d: d["size"])
    req = urllib.request.Request(f"http://{proxy.host}/v2/{src.split('/', 1)[1]}/blobs/{big['digest']}",
                                 method="DELETE")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 202
    proxy.log.clear()
    other = f"docker://{proxy.host}/{_repo('mount-other')}:v1"
    actions = _actions(_pushed_json(mesobox("push", "--json", f"docker://{src}:v1", other)))
    assert actions.pop(big["digest"]) == "uploaded" and set(actions.values()) == {"mounted"}
    refused = [s for s in proxy.seen("POST", "mount=") if s.status == 202]
    assert len(refused) == 1 and parse_qs(urlsplit(refused[0].path).query)["mount"] == [big["digest"]]
    assert _skopeo_digest(other, "--tls-verify=false") == digest
    assert _unpacked_file(other, world_tmp, "hello.txt", "--src-tls-verify=false") == b"pushed\n"
    # no right to read the source repository (403 on the mount): a plain upload
    proxy.fail("POST", "mount=", 403, 100)
    third = f"docker://{proxy.host}/{_repo('mount-third')}:v1"
    actions = _actions(_pushed_json(mesobox("push", "--json", f"docker://{src}:v1", third)))
    assert set(actions.values()) == {"uploaded"}
    assert _skopeo_digest(third, "--tls-verify=false") == digest


def _manifest(host: str, repo: str, tag: str) -> bytes:
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        data: bytes = resp.read()
        return data


def test_a_lost_upload_session_starts_again(mesobox: Mesobox, proxy: Recorder, layout: Path) -> None:
    digest = _pull(mesobox, f"oci:{layout}:v1")
    dest = f"docker://{proxy.host}/{_repo('lost')}:v1"
    proxy.fail("PATCH", "/blobs/uploads/", 404, 1)  # the registry forgot the session
    proxy.fail("PUT", "/manifests/", 500, 2)  # transient: retried
    proc = mesobox("push", "-q", "--chunk-size", "256k", f"oci:{layout}:v1", dest)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == digest
    assert len([s for s in proxy.seen("PUT", "/manifests/") if s.status == 500]) == 2
    # the lost session was dropped and its blob started again in a new one
    lost = [s for s in proxy.seen("PATCH") if s.status == 404]
    assert len(lost) == 1 and [s.path for s in proxy.seen("DELETE")] == [lost[0].path]
    assert len(proxy.seen("POST", "/blobs/uploads/")) == len(proxy.seen("PUT", "digest=")) + 1
    assert _skopeo_digest(dest, "--tls-verify=false") == digest


# --- layouts and archives ------------------------------------------------------------------------------------


def test_push_to_oci_layout_and_archive(mesobox: Mesobox, user: User, layout: Path, world_tmp: Path) -> None:
    one = _pull(mesobox, f"oci:{layout}:v1", user)
    two = _pull(mesobox, f"oci:{layout}:v2", user)
    assert one != two
    out = world_tmp / "out" / "layout"  # made, parents too
    for src, tag in ((f"oci:{layout}:v1", "t1"), (f"oci:{layout}:v2", "t2")):
        proc = mesobox("push", "-q", src, f"oci:{out}:{tag}", as_user=user)
        assert proc.returncode == 0, proc.stderr.decode()
    assert _skopeo_digest(f"oci:{out}:t1") == one and _skopeo_digest(f"oci:{out}:t2") == two
    assert _unpacked_file(f"oci:{out}:t1", world_tmp, "hello.txt") == b"pushed\n"
    # the same tag again moves it; the other image stays; no tag: the source's
    assert mesobox("push", "-q", f"oci:{layout}:v2", f"oci:{out}:t1", as_user=user).returncode == 0
    assert mesobox("push", "-q", f"oci:{layout}:v1", f"oci:{out}", as_user=user).returncode == 0
    index = json.loads((out / "index.json").read_text())
    names = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
    assert names == {"t1": two, "t2": two, "v1": one}
    assert _skopeo_digest(f"oci:{out}:v1") == one
    umoci = subprocess.run(["umoci", "stat", "--image", f"{out}:t2"], capture_output=True)
    assert umoci.returncode == 0, umoci.stderr.decode()
    # an archive: a tar of such a layout
    tar = world_tmp / "image.tar"
    doc = _pushed_json(mesobox("push", "--json", f"oci:{layout}:v1", f"oci-archive:{tar}:arch", as_user=user))
    assert doc["destination"] == f"oci-archive:{tar}:arch" and doc["digest"] == one
    assert tar.stat().st_uid == user.uid
    assert _skopeo_digest(f"oci-archive:{tar}:arch") == one
    assert _unpacked_file(f"oci-archive:{tar}:arch", world_tmp, "hello.txt") == b"pushed\n"
    # replaced whole on the next push
    assert mesobox("push", "-q", f"oci:{layout}:v2", f"oci-archive:{tar}", as_user=user).returncode == 0
    assert _skopeo_digest(f"oci-archive:{tar}:v2") == two
    assert [p.name for p in world_tmp.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_destinations_another_user_prepared_are_refused(mesobox: Mesobox, user: User, attacker: User,
                                                        layout: Path, world_tmp: Path) -> None:
    _pull(mesobox, f"oci:{layout}:v2", user)
    precious = world_tmp / "precious"
    precious.mkdir()
    os.chown(precious, user.uid, user.gid)
    (precious / "keep").write_text("mine\n")
    # a directory of the attacker's, world-writable: not written into
    trap = world_tmp / "trap"
    trap.mkdir(mode=0o777)
    os.chmod(trap, 0o777)
    os.chown(trap, attacker.uid, attacker.gid)
    proc = mesobox("push", "-q", f"oci:{layout}:v2", f"oci:{trap}", as_user=user)
    assert proc.returncode == 2 and "belongs to uid" in error_line(proc)
    assert list(trap.iterdir()) == []
    # a symlink the attacker planted where the layout is to go: not followed
    link = world_tmp / "link"
    attacker.run(["ln", "-s", str(precious), str(link)], check=True)
    proc = mesobox("push", "-q", f"oci:{layout}:v2", f"oci:{link}", as_user=user)
    assert proc.returncode == 2 and "symbolic link" in error_line(proc)
    # an archive name the attacker planted as a symlink in the sticky directory: the
    # rename over it is refused, and what it points to is untouched
    planted = world_tmp / "planted.tar"
    attacker.run(["ln", "-s", str(precious / "keep"), str(planted)], check=True)
    proc = mesobox("push", "-q", f"oci:{layout}:v2", f"oci-archive:{planted}", as_user=user)
    assert proc.returncode == 7 and "permission denied" in error_line(proc)
    assert (precious / "keep").read_text() == "mine\n" and planted.is_symlink()
    assert sorted(p.name for p in world_tmp.iterdir()) == ["link", "planted.tar", "precious", "runtimes", "stores",
                                                           "trap"]
    # a directory that is not a layout is not scribbled into
    proc = mesobox("push", "-q", f"oci:{layout}:v2", f"oci:{precious}", as_user=user)
    assert proc.returncode == 2 and "neither empty nor an OCI image layout" in error_line(proc)
    assert [p.name for p in precious.iterdir()] == ["keep"]


@pytest.mark.root
def test_full_or_read_only_destination(mesobox: Mesobox, layout: Path, world_tmp: Path) -> None:
    _pull(mesobox, f"oci:{layout}:v1")
    small = world_tmp / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        proc = mesobox("push", "-q", f"oci:{layout}:v1", f"oci:{small}/layout")
        assert proc.returncode == 7 and "no space left" in error_line(proc)
        assert list(small.iterdir()) == []  # the layout it made is gone again
        proc = mesobox("push", "-q", f"oci:{layout}:v1", f"oci-archive:{small}/image.tar")
        assert proc.returncode == 7 and "no space left" in error_line(proc)
        assert list(small.iterdir()) == []
        subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
        proc = mesobox("push", "-q", f"oci:{layout}:v1", f"oci:{small}/layout")
        assert proc.returncode == 7 and "read-only" in error_line(proc)
        proc = mesobox("push", "-q", f"oci:{layout}:v1", f"oci-archive:{small}/image.tar")
        assert proc.returncode == 7 and "read-only" in error_line(proc)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


# --- tag ---------------------------------------------------------------------------------------------------


@pytest.mark.userns
def test_tag_then_run_by_the_new_name(mesobox: Mesobox, user: User, layout: Path) -> None:
    src = f"oci:{layout}:v1"
    digest = _pull(mesobox, src, user, "squashfs")
    proc = mesobox("tag", src, "tools/mine:1.0", as_user=user)
    assert proc.returncode == 0, proc.stderr.decode()
    listed = json.loads(mesobox("images", "--json", as_user=user).stdout)
    assert {(r["reference"], r["digest"]) for r in listed} == {
        (src, digest), ("docker://docker.io/tools/mine:1.0", digest)}
    store = Path(listed[0]["store"])
    assert len(list((store / "squashfs").iterdir())) == 1  # a name, not a copy
    # by a digest prefix, as `images` shows it
    assert mesobox("tag", digest[7:19], "other", as_user=user).returncode == 0
    assert mesobox("rm", src, as_user=user).returncode == 0  # the data stays for the other names
    ran = mesobox("exec", "tools/mine:1.0", "cat", "/hello.txt", as_user=user)
    assert ran.returncode == 0 and ran.stdout == b"pushed\n", ran.stderr.decode()
    ran = mesobox("exec", "other:latest", "cat", "/hello.txt", as_user=user)
    assert ran.returncode == 0 and ran.stdout == b"pushed\n", ran.stderr.decode()
    # refused in one line, nothing written
    for bad, code, words in (("Bad/Name", 2, "uppercase"), ("x:bad tag", 2, "bad"),
                             (f"mine@{digest}", 2, "cannot be tagged with a digest"),
                             (f"oci:{layout}:v9", 2, "a tag is a registry reference")):
        proc = mesobox("tag", "other", bad, as_user=user)
        assert proc.returncode == code and words in error_line(proc), bad
    proc = mesobox("tag", "nothing:here", "x:y", as_user=user)
    assert proc.returncode == 4 and "no image 'nothing:here'" in error_line(proc)
    after = json.loads(mesobox("images", "--json", as_user=user).stdout)
    assert sorted(r["reference"] for r in after) == ["docker://docker.io/library/other:latest",
                                                    "docker://docker.io/tools/mine:1.0"]


# --- errors ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private(shared_tmp: Path) -> Iterator[Registry]:
    """A registry that wants alice's password (htpasswd, Basic auth)."""
    need_tool("htpasswd")
    top = shared_tmp / "push-private"
    top.mkdir()
    line = subprocess.run(["htpasswd", "-nbB", "alice", PASSWORD], capture_output=True, text=True, check=True)
    (top / "htpasswd").write_text(line.stdout.strip() + "\n")
    reg = start_registry(top / "reg", f"auth:\n  htpasswd:\n    realm: test\n    path: {top / 'htpasswd'}\n")
    yield reg
    reg.process.kill()
    reg.process.wait()


def test_push_with_credentials(mesobox: Mesobox, user: User, private: Registry, layout: Path,
                               world_tmp: Path) -> None:
    digest = _pull(mesobox, f"oci:{layout}:v2", user)
    xdg = world_tmp / "xdg"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, user.uid, user.gid)
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    dest = f"docker://{private.host}/{_repo('private')}:v2"
    proc = mesobox("push", "-q", f"oci:{layout}:v2", dest, as_user=user, env=env)
    assert proc.returncode == 3 and "requires a login" in error_line(proc)
    login = mesobox("login", "-u", "alice", "--password-stdin", private.host, as_user=user, env=env,
                    input=PASSWORD.encode() + b"\n")
    assert login.returncode == 0, login.stderr.decode()
    proc = mesobox("push", "-q", f"oci:{layout}:v2", dest, as_user=user, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == digest
    assert _skopeo_digest(dest, "--tls-verify=false", f"--creds=alice:{PASSWORD}") == digest


@pytest.mark.parametrize(("method", "where", "status", "words"), [
    ("POST", "/blobs/uploads/", 403, "denied (HTTP 403)"),
    ("PUT", "/manifests/", 404, "HTTP 404 pushing the manifest"),
    ("POST", "/blobs/uploads/", 500, "HTTP 500: injected 500 (gave up after 5 tries)"),
])
def test_registry_refusals_are_one_line(mesobox: Mesobox, proxy: Recorder, layout: Path, method: str, where: str,
                                        status: int, words: str) -> None:
    _pull(mesobox, f"oci:{layout}:v2")
    dest = f"docker://{proxy.host}/{_repo('refused')}:v2"
    proxy.fail(method, where, status, 100)
    proc = mesobox("push", "-q", f"oci:{layout}:v2", dest)
    assert proc.returncode == 3 and words in error_line(proc), proc.stderr.decode()
    assert [s for s in proxy.seen("PUT", "/manifests/") if s.status == 201] == []


def test_unreachable_registry_and_unknown_image(mesobox: Mesobox, layout: Path) -> None:
    proc = mesobox("push", "-q", "nothing:here", f"docker://127.0.0.1:{free_port()}/x/y:z")
    assert proc.returncode == 4 and "no image 'nothing:here' in the store" in error_line(proc)
    _pull(mesobox, f"oci:{layout}:v2")
    proc = mesobox("push", "-q", f"oci:{layout}:v2", f"docker://127.0.0.1:{free_port()}/x/y:z")
    assert proc.returncode == 3 and "connection refused (gave up after 5 tries)" in error_line(proc)
    proc = mesobox("push", "-q", f"oci:{layout}:v2", "docker-archive:/tmp/x.tar")
    assert proc.returncode == 2 and "cannot push to docker-archive" in error_line(proc)


def test_missing_or_damaged_blob_is_not_pushed(mesobox: Mesobox, proxy: Recorder, layout: Path) -> None:
    digest = _pull(mesobox, f"oci:{layout}:v1")
    blobs = mesobox.store_root / "root" / "blobs" / "sha256"
    manifest = json.loads((blobs / digest[7:]).read_bytes())
    big = max(manifest["layers"], key=lambda d: d["size"])["digest"][7:]
    data = (blobs / big).read_bytes()
    dest = f"docker://{proxy.host}/{_repo('damaged')}:v1"
    # damaged (same size, other bytes): refused before the registry commits it, in chunks too
    (blobs / big).write_bytes(bytes(len(data)))
    for chunk in ("64m", "256k"):
        proc = mesobox("push", "-q", "--chunk-size", chunk, f"oci:{layout}:v1", dest)
        assert proc.returncode == 5 and f"blob sha256:{big} no longer hashes to its name" in error_line(proc)
    assert proxy.seen("PUT", "/manifests/") == []
    assert [s for s in proxy.seen("PUT", big) if s.status == 201] == []
    # missing: nothing asked of the registry at all
    (blobs / big).unlink()
    proxy.log.clear()
    proc = mesobox("push", "-q", f"oci:{layout}:v1", dest)
    assert proc.returncode == 7 and f"blob sha256:{big} of oci:{layout}:v1 is missing" in error_line(proc)
    assert proxy.log == []
    (blobs / big).write_bytes(data)
    assert mesobox("push", "-q", f"oci:{layout}:v1", dest).returncode == 0
