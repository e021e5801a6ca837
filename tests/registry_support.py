"""Test images for the registry and archive tests: built with umoci, pushed with skopeo.

``images`` (session fixture) is an OCI layout with:
- ``v1``: two layers, the second 3 MiB of random bytes (so a cut mid-body is mid-blob);
- ``amd64`` / ``arm64``: one small layer each, config architecture set by umoci;
- ``multi``: a hand-assembled OCI index over ``amd64`` and ``arm64``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from conftest import make_oci_image, need_tool

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


def layer_small(rootfs: Path) -> None:
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc" / "hello").write_text("hello from mesobox tests\n")


def layer_random(rootfs: Path) -> None:
    (rootfs / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024))


def arch_layer(arch: str):  # type: ignore[no-untyped-def]
    def fn(rootfs: Path) -> None:
        (rootfs / "arch").write_text(arch + "\n")

    return fn


def blob(layout: Path, digest: str) -> bytes:
    algorithm, hexpart = digest.split(":")
    return (layout / "blobs" / algorithm / hexpart).read_bytes()


def tagged(layout: Path, tag: str) -> dict[str, object]:
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get(REF_NAME) == tag:
            return dict(entry)
    raise KeyError(tag)


def add_index(layout: Path, tags: list[str], name: str) -> str:
    """Write an OCI index over ``tags`` (platform from each config) and tag it ``name``."""
    manifests = []
    for tag in tags:
        entry = tagged(layout, tag)
        config = json.loads(blob(layout, json.loads(blob(layout, str(entry["digest"])))["config"]["digest"]))
        manifests.append(
            {
                "mediaType": entry["mediaType"],
                "digest": entry["digest"],
                "size": entry["size"],
                "platform": {"os": config["os"], "architecture": config["architecture"]},
            }
        )
    data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"].append(
        {"mediaType": OCI_INDEX, "digest": digest, "size": len(data), "annotations": {REF_NAME: name}}
    )
    (layout / "index.json").write_text(json.dumps(index))
    return digest


def skopeo(*args: str) -> bytes:
    need_tool("skopeo")
    return subprocess.run(["skopeo", *args], check=True, capture_output=True).stdout


def raw_digest(transport_ref: str) -> str:
    """sha256 of the manifest skopeo reads for a reference (independent cross-check)."""
    return "sha256:" + hashlib.sha256(skopeo("inspect", "--raw", "--tls-verify=false", transport_ref)).hexdigest()


@pytest.fixture(scope="session")
def images(shared_tmp: Path) -> Path:
    # a fresh directory each time: test modules importing this fixture each get their own
    # instance of it (session scope is per defining module), so they must not share a path
    top = Path(tempfile.mkdtemp(prefix="registry-test-layout-", dir=shared_tmp))
    os.chmod(top, 0o755)
    layout = top / "layout"
    make_oci_image(layout, "v1", [layer_small, layer_random], ["--config.cmd=/bin/true"])
    make_oci_image(layout, "amd64", [arch_layer("amd64")], ["--architecture=amd64", "--os=linux"])
    make_oci_image(layout, "arm64", [arch_layer("arm64")], ["--architecture=arm64", "--os=linux"])
    add_index(layout, ["amd64", "arm64"], "multi")
    return layout


def fetch_all(src: Any, resolved: Any, dest: Path) -> dict[str, Path]:
    """Fetch config and layers with ``src.fetch_blob``, checking progress, size and digest."""
    out = {}
    for desc in (resolved.config, *resolved.layers):
        path = dest / desc.digest[7:]
        seen: list[int] = []
        src.fetch_blob(desc, path, seen.append)
        assert sum(seen) == desc.size == path.stat().st_size
        assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == desc.digest
        out[desc.digest] = path
    return out


# -- images pushed by hand: what umoci and skopeo refuse to write ----------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def push_raw_image(host: str, name: str, tag: str, config: object, layers: list[bytes]) -> str:
    """Push an image whose config is exactly ``config`` (any JSON value: hostile ones too)
    over the distribution API with plain HTTP (monolithic blob uploads, then the manifest).
    ``layers`` are gzip'd tars.  Returns ``host/name:tag``."""
    import gzip

    from mesobox.image.source import host_platform

    def upload(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status, headers = _http(host, "POST", f"/v2/{name}/blobs/uploads/", b"", {})
        assert status == 202, status
        location = urlsplit(headers["location"])
        query = f"{location.query}&" if location.query else ""
        target = f"{location.path}?{query}digest={quote(digest)}"
        status, _ = _http(host, "PUT", target, data, {"Content-Type": "application/octet-stream"})
        assert status == 201, status
        return digest

    layer_descs = [{"mediaType": OCI_LAYER_GZIP, "digest": upload(data), "size": len(data)} for data in layers]
    if isinstance(config, dict) and "rootfs" not in config:
        os_name, _, arch = host_platform().partition("/")
        diff_ids = ["sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest() for data in layers]
        config = {"architecture": arch, "os": os_name, **config,
                  "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_bytes = json.dumps(config).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": upload(config_bytes), "size": len(config_bytes)},
        "layers": layer_descs,
    }).encode()
    status, _ = _http(host, "PUT", f"/v2/{name}/manifests/{tag}", manifest, {"Content-Type": OCI_MANIFEST})
    assert status == 201, status
    return f"{host}/{name}:{tag}"


def _http(host: str, method: str, target: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    import http.client

    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request(method, target, body=body, headers={"Content-Length": str(len(body)), **headers})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def gzip_tar(entries: list[tuple[str, bytes]]) -> bytes:
    """A gzip'd tar of regular files (name, content), made with tarfile."""
    import gzip
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


# -- registries on other addresses, over TLS, behind a proxy ---------------------------


def outside_address() -> str:
    """A non-loopback IPv4 address of this machine: the registry client speaks HTTPS to
    it (loopback registries are plain HTTP), and a proxy may be asked to reach it."""
    for address in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split():
        if "." in address and not address.startswith("127."):
            return address
    pytest.fail("this machine has no non-loopback IPv4 address to test HTTPS against", pytrace=False)


def serve_registry(root: Path, bind: str, storage: Path | None = None, tls: str = "") -> Any:
    """A docker-registry on ``bind`` (a free port), its storage ``storage`` (another
    registry's, to serve what was pushed there; default: its own), ``tls`` the YAML of
    its ``http.tls`` section (indented by four).  Ready once its port accepts connections
    (the HTTP probe of conftest.start_registry cannot speak TLS)."""
    import socket
    import time

    from conftest import Registry, free_port

    need_tool("docker-registry")
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    data = storage or root / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {data}\n"
        f"http:\n  addr: {bind}:{port}\n" + (f"  tls:\n{tls}" if tls else "")
    )
    log = open(root / "registry.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection((bind, port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(root / 'registry.log').read_text()}") from None
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("docker-registry did not listen within 15 s") from None
            time.sleep(0.05)
    return Registry(f"{bind}:{port}", root, proc)


def openssl(*args: str) -> None:
    need_tool("openssl")
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(top: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (certificate, key): ECDSA P-256, valid two days."""
    cert, key = top / f"{name}.crt", top / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", f"/CN=mesobox test {name}", "-keyout", str(key), "-out", str(cert),
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def issue(top: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    """A certificate signed by ``ca`` with ``extensions`` (openssl x509v3 config lines):
    (certificate, key), both PEM."""
    cert, key, csr, ext = (top / f"{name}.crt", top / f"{name}.key", top / f"{name}.csr", top / f"{name}.ext")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(key), "-out", str(csr))
    ext.write_text("basicConstraints=CA:FALSE\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
                   + extensions + "\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return cert, key
