"""The registry client against a real docker-registry (and a fault-injecting proxy)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Registry, free_port, start_registry
from faultproxy import FaultProxy, fault_proxy
from mesobox.config import Config
from mesobox.errors import AuthError, DigestMismatch, ImageNotFound, RegistryError
from mesobox.image import registry as registry_module
from mesobox.image.reference import parse_reference
from mesobox.image.registry import RegistrySource, RetryPolicy
from mesobox.image.transports import open_source
from registry_support import fetch_all, images, raw_digest, skopeo  # noqa: F401 - fixture

pytestmark = pytest.mark.registry
FAST = RetryPolicy(tries=4, base=0.02, timeout=5)


@pytest.fixture(scope="module")
def pushed(registry: Registry, images: Path) -> Registry:  # noqa: F811
    registry.push_oci(images, "v1", "hreg/simple")
    skopeo(
        "copy",
        "-q",
        "--all",
        "--dest-tls-verify=false",
        f"oci:{images}:multi",
        f"docker://{registry.host}/hreg/multi:v1",
    )
    return registry


@pytest.fixture()
def proxy(pushed: Registry) -> Iterator[FaultProxy]:
    with fault_proxy(pushed.host) as p:
        yield p


class SleepLog:
    """Stands in for the registry module's ``time``: records each backoff it sleeps (and
    sleeps it), so a test checks the waits the policy chose instead of timing them."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        time.sleep(seconds)


@pytest.fixture()
def backoff(monkeypatch: pytest.MonkeyPatch) -> SleepLog:
    log = SleepLog()
    monkeypatch.setattr(registry_module, "time", log)
    return log


def source(host: str, name: str = "hreg/simple:v1", **kw: object) -> RegistrySource:
    kw.setdefault("env", {"HOME": "/nonexistent"})
    kw.setdefault("retry", FAST)
    return RegistrySource(parse_reference(f"{host}/{name}"), Config(), **kw)  # type: ignore[arg-type]


def test_ping(pushed: Registry) -> None:
    assert source(pushed.host).ping() == 200


def test_pull_by_tag_matches_skopeo(pushed: Registry, tmp_path: Path) -> None:
    src = open_source(parse_reference(f"{pushed.host}/hreg/simple:v1"), Config())
    resolved = src.resolve(None)
    assert resolved.manifest_digest == raw_digest(f"docker://{pushed.host}/hreg/simple:v1")
    inspect = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{pushed.host}/hreg/simple:v1"))
    assert resolved.manifest_digest == inspect["Digest"]
    assert [d.digest for d in resolved.layers] == inspect["Layers"]
    assert resolved.platform == "linux/amd64" and resolved.index_digest is None
    assert str(resolved.reference) == f"docker://{pushed.host}/hreg/simple:v1"
    assert resolved.layers[1].size > 3_000_000
    config = json.loads(fetch_all(src, resolved, tmp_path)[resolved.config.digest].read_bytes())
    assert config["config"]["Cmd"] == ["/bin/true"]
    src.close()


def test_pull_by_digest(pushed: Registry) -> None:
    digest = raw_digest(f"docker://{pushed.host}/hreg/simple:v1")
    resolved = source(pushed.host, f"hreg/simple@{digest}").resolve(None)
    assert resolved.manifest_digest == digest
    assert resolved.reference.tag is None


def test_manifest_bytes_are_checked(proxy: FaultProxy) -> None:
    digest = raw_digest(f"docker://{proxy.upstream}/hreg/simple:v1")
    proxy.faults.tamper.append(("/manifests/", b'"schemaVersion":2', b'"schemaVersion": 2'))
    with pytest.raises(DigestMismatch, match="but the registry says " + digest):
        source(proxy.host).resolve(None)
    with pytest.raises(DigestMismatch, match=f"expected {digest}, got sha256:"):
        source(proxy.host, f"hreg/simple@{digest}").resolve(None)


def test_not_found(pushed: Registry) -> None:
    with pytest.raises(ImageNotFound, match=r"manifest unknown: docker://.*hreg/simple:nope: manifest unknown"):
        source(pushed.host, "hreg/simple:nope").resolve(None)
    with pytest.raises(ImageNotFound):
        source(pushed.host, "hreg/absent:v1").resolve(None)


def test_platform_selection(pushed: Registry, images: Path) -> None:  # noqa: F811
    index = raw_digest(f"docker://{pushed.host}/hreg/multi:v1")
    src = source(pushed.host, "hreg/multi:v1")
    arm = src.resolve("linux/arm64/v8")
    assert (arm.platform, arm.index_digest) == ("linux/arm64", index)
    amd = src.resolve(None)
    assert amd.platform == "linux/amd64"
    # cross-check with the index as skopeo reads it (skopeo may rewrite manifests on push:
    # its blob-info cache substitutes blobs, so the layout's digests are not the registry's)
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{pushed.host}/hreg/multi:v1"))
    by_arch = {m["platform"]["architecture"]: m["digest"] for m in raw["manifests"]}
    assert (arm.manifest_digest, amd.manifest_digest) == (by_arch["arm64"], by_arch["amd64"])
    with pytest.raises(ImageNotFound, match="no image for platform linux/s390x; available: linux/amd64, linux/arm64"):
        src.resolve("linux/s390x")
    with pytest.raises(ImageNotFound, match="is for platform linux/amd64, not linux/arm64"):
        source(pushed.host).resolve("linux/arm64")


def test_tampered_blob_is_refused_and_removed(tmp_path: Path, images: Path) -> None:  # noqa: F811
    reg = start_registry(tmp_path / "reg")
    try:
        reg.push_oci(images, "v1", "tamper/me")
        src = source(reg.host, "tamper/me:v1")
        resolved = src.resolve(None)
        layer = resolved.layers[0]
        data = reg.root / "data/docker/registry/v2/blobs/sha256" / layer.digest[7:9] / layer.digest[7:] / "data"
        content = bytearray(data.read_bytes())
        content[len(content) // 2] ^= 0xFF
        data.write_bytes(bytes(content))
        dest = tmp_path / "blob"
        with pytest.raises(DigestMismatch, match=f"expected {layer.digest}, got sha256:"):
            src.fetch_blob(layer, dest)
        assert not dest.exists()
    finally:
        reg.process.kill()
        reg.process.wait()


def test_retries_on_429_and_500(proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.fail("/manifests/v1", 429, 2, retry_after="0")
    proxy.fail("/blobs/", 500, 2)
    src = source(proxy.host)
    resolved = src.resolve(None)  # also fetches the config blob
    assert proxy.count("/manifests/v1") == 3
    fetch_all(src, resolved, tmp_path)
    statuses = [e.status for e in proxy.entries("/blobs/")]
    assert statuses[:2] == [500, 500] and statuses[2:] == [200] * (len(statuses) - 2)


def test_gives_up_with_registry_error(proxy: FaultProxy, backoff: SleepLog) -> None:
    proxy.fail("/manifests/", 503, 100)
    with pytest.raises(RegistryError, match="HTTP 503: injected fault \\(gave up after 4 tries\\)"):
        source(proxy.host).resolve(None)
    assert proxy.count("/manifests/") == 4
    assert backoff.slept == [FAST.delay(n) for n in range(3)]  # one backoff between tries, none after the last


def test_registry_down_gives_up_after_the_policys_backoff(backoff: SleepLog) -> None:
    with pytest.raises(RegistryError, match="connection refused"):
        source(f"127.0.0.1:{free_port()}").resolve(None)
    assert backoff.slept == [FAST.delay(n) for n in range(FAST.tries - 1)]
    # default policy: 5 tries, 0.2 s * 2^n between them; a refused connection waits for no timeout
    backoff.slept.clear()
    default = RegistrySource(parse_reference(f"127.0.0.1:{free_port()}/a"), Config())
    with pytest.raises(RegistryError, match="gave up after 5 tries") as err:
        default.ping()
    assert backoff.slept == [0.2, 0.4, 0.8, 1.6]
    assert "connection refused" in err.value.message


def test_resume_after_cut(proxy: FaultProxy, tmp_path: Path) -> None:
    src = source(proxy.host)
    resolved = src.resolve(None)
    big = resolved.layers[1]
    proxy.cut(big.digest, 1_000_000)
    fetch_all(src, resolved, tmp_path)
    gets = proxy.entries(big.digest)
    assert len(gets) == 2
    assert "range" not in gets[0].headers and gets[1].headers["range"] == "bytes=1000000-"


def test_resume_from_existing_prefix_and_restart_without_range(proxy: FaultProxy, tmp_path: Path) -> None:
    src = source(proxy.host)
    resolved = src.resolve(None)
    big = resolved.layers[1]
    whole = tmp_path / "whole"
    src.fetch_blob(big, whole)
    dest = tmp_path / "partial"
    dest.write_bytes(whole.read_bytes()[:123_456])
    seen: list[int] = []
    src.fetch_blob(big, dest, seen.append)
    assert dest.read_bytes() == whole.read_bytes() and sum(seen) == big.size
    assert proxy.entries(big.digest)[-1].headers["range"] == "bytes=123456-"
    # a server that ignores Range (200 with the whole body): start over, still correct
    proxy.faults.ignore_range = True
    dest.write_bytes(whole.read_bytes()[:5000])
    src.fetch_blob(big, dest)
    assert dest.read_bytes() == whole.read_bytes()
    # a wrong prefix is caught by the digest, and the file removed
    proxy.faults.ignore_range = False
    dest.write_bytes(b"x" * 5000)
    with pytest.raises(DigestMismatch):
        src.fetch_blob(big, dest)
    assert not dest.exists()


def _cut_then(proxy: FaultProxy, tmp_path: Path) -> tuple[RegistrySource, Any, bytes]:
    """The big layer's bytes, and a source whose next fetch of it is cut after 1 MB."""
    src = source(proxy.host)
    resolved = src.resolve(None)
    big = resolved.layers[1]
    whole = tmp_path / "whole"
    src.fetch_blob(big, whole)
    proxy.cut(big.digest, 1_000_000)
    return src, big, whole.read_bytes()


def test_range_answered_200_with_a_short_body_is_never_written(proxy: FaultProxy, tmp_path: Path) -> None:
    """A resume answered "200 OK" with 1 KB of HTML (a captive portal, a busy mirror) is not
    the blob: it must neither replace nor extend the good prefix."""
    src, big, whole = _cut_then(proxy, tmp_path)
    proxy.short_200_for_range(big.digest, b"<html>" + b"busy " * 200 + b"</html>")
    dest = tmp_path / "partial"
    src.fetch_blob(big, dest)
    assert dest.read_bytes() == whole
    ranges = [e.headers.get("range") for e in proxy.entries(big.digest)][-3:]
    assert ranges == [None, "bytes=1000000-", "bytes=1000000-"]  # the prefix survived the 200


@pytest.mark.parametrize("declare_length", [True, False], ids=["with-length", "close-delimited"])
def test_partial_stays_a_true_prefix_when_range_keeps_failing(
    proxy: FaultProxy, tmp_path: Path, declare_length: bool,
) -> None:
    """Every resume answered 200 + junk.  With a Content-Length that is not the blob's,
    the answer is refused unread and the fetch gives up with the prefix intact; without
    one, the junk ends "cleanly" short, is dropped, and the fetch starts over without
    Range.  Either way the partial (which the next pull trusts as a prefix) never holds
    anything but the blob's beginning."""
    src, big, whole = _cut_then(proxy, tmp_path)
    proxy.short_200_for_range(big.digest, b"<html>try later</html>", times=100, declare_length=declare_length)
    dest = tmp_path / "partial"
    if declare_length:
        with pytest.raises(RegistryError, match=r"kept failing.*HTTP 200 with 22 bytes"):
            src.fetch_blob(big, dest)
        assert dest.read_bytes() == whole[:1_000_000]
        proxy.faults.range_200.clear()
        src.fetch_blob(big, dest)  # the next pull resumes from it
    else:
        src.fetch_blob(big, dest)
        assert [e.headers.get("range") for e in proxy.entries(big.digest)][-1] is None
    assert dest.read_bytes() == whole


def test_206_for_other_bytes_is_never_written(proxy: FaultProxy, tmp_path: Path) -> None:
    src, big, whole = _cut_then(proxy, tmp_path)
    proxy.shift_range(big.digest, -4096)  # upstream answers 206 for bytes 995904-
    dest = tmp_path / "partial"
    src.fetch_blob(big, dest)
    assert dest.read_bytes() == whole
    assert [e.headers.get("range") for e in proxy.entries(big.digest)][-2:] == ["bytes=1000000-"] * 2


def test_redirect_drops_authorization_and_token_flow(proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.faults.bearer = True
    proxy.faults.redirect_blobs = True
    src = source(proxy.host)
    resolved = src.resolve(None)
    fetch_all(src, resolved, tmp_path)
    token_calls = [e for e in proxy.log if e.listener == "token"]
    assert len(token_calls) == 1  # cached for the scope
    assert "scope=repository%3Ahreg%2Fsimple%3Apull" in token_calls[0].path
    assert "service=faultproxy" in token_calls[0].path
    registry_blobs = [e for e in proxy.log if e.listener == "registry" and "/blobs/" in e.path and e.status == 307]
    storage_blobs = [e for e in proxy.log if e.listener == "storage"]
    # the config is downloaded once (by resolve, for the platform); fetch_blob reuses it
    assert len(storage_blobs) == 1 + len(resolved.layers)
    assert all(e.authorization and e.authorization.startswith("Bearer ") for e in registry_blobs)
    assert all(e.authorization is None for e in storage_blobs)


def test_token_endpoint_with_credentials(proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.faults.bearer = True
    proxy.faults.token_creds = ("alice", "s3cret")
    with pytest.raises(AuthError, match="refused the credentials") as info:
        source(proxy.host).resolve(None)
    assert "docker/config.json" in (info.value.hint or "")
    conf = tmp_path / ".docker/config.json"
    conf.parent.mkdir()
    conf.write_text(json.dumps({"auths": {proxy.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    assert source(proxy.host, env={"HOME": str(tmp_path)}).resolve(None).layers


def _crypt_bcrypt(password: str) -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # stdlib (libxcrypt); docker-registry's htpasswd accepts only bcrypt

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


def test_basic_auth_with_docker_config(
    tmp_path: Path,
    images: Path,  # noqa: F811 - the fixture imported from registry_support
    user: Any,
    world_tmp: Path,
    mesobox_src: Path,
    test_python: str,
) -> None:
    (tmp_path / "htpasswd").write_text(f"bob:{_crypt_bcrypt('pa55')}\n")
    reg = start_registry(
        tmp_path / "reg", "auth:\n  htpasswd:\n    realm: test\n    path: " + str(tmp_path / "htpasswd") + "\n"
    )
    try:
        skopeo(
            "copy",
            "-q",
            "--dest-tls-verify=false",
            "--dest-creds=bob:pa55",
            f"oci:{images}:v1",
            f"docker://{reg.host}/private/img:v1",
        )
        with pytest.raises(AuthError, match="requires a login"):
            source(reg.host, "private/img:v1").resolve(None)
        home = tmp_path / "home"
        (home / ".docker").mkdir(parents=True)
        auth = {"auths": {reg.host: {"auth": base64.b64encode(b"bob:wrong").decode()}}}
        (home / ".docker/config.json").write_text(json.dumps(auth))
        with pytest.raises(AuthError, match=r"access to private/img denied \(HTTP 401\)"):
            source(reg.host, "private/img:v1", env={"HOME": str(home)}).resolve(None)
        auth["auths"][reg.host]["auth"] = base64.b64encode(b"bob:pa55").decode()
        (home / ".docker/config.json").write_text(json.dumps(auth))
        src = source(reg.host, "private/img:v1", env={"HOME": str(home)})
        resolved = src.resolve(None)
        fetch_all(src, resolved, tmp_path)
        # the rootless path: an ordinary user's own ~/.docker/config.json is what counts
        user_home = world_tmp / "home"
        (user_home / ".docker").mkdir(parents=True)
        (user_home / ".docker/config.json").write_text(json.dumps(auth))
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(user_home)], check=True)
        code = (
            "from mesobox.config import Config; from mesobox.image.reference import parse_reference;"
            "from mesobox.image.transports import open_source;"
            f"print(open_source(parse_reference('{reg.host}/private/img:v1'), Config()).resolve(None)"
            ".manifest_digest)"
        )
        result = user.run([test_python, "-c", code], env={"PYTHONPATH": str(mesobox_src), "HOME": str(user_home)})
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().strip() == resolved.manifest_digest
    finally:
        reg.process.kill()
        reg.process.wait()


def test_plain_http_refused_for_remote_redirect(proxy: FaultProxy) -> None:
    src = source(proxy.host)
    with pytest.raises(RegistryError, match="only HTTPS outside loopback"):
        src._connect("http://example.com/x")


def test_one_source_is_thread_safe(proxy: FaultProxy, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    proxy.faults.bearer = True
    proxy.faults.redirect_blobs = True
    src = source(proxy.host)
    resolved = src.resolve(None)
    jobs = [(d, tmp_path / f"{i}-{d.digest[7:]}") for i in range(6) for d in (resolved.config, *resolved.layers)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda job: src.fetch_blob(*job), jobs))
    for desc, path in jobs:
        assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == desc.digest
    assert proxy.count(resolved.layers[1].digest, listener="storage") == 6
    assert len([e for e in proxy.log if e.listener == "token"]) == 1


def test_other_errors_redirect_loop_and_timeouts(proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.fail("/manifests/", 400, 1)
    with pytest.raises(RegistryError, match=r"HTTP 400 fetching manifest: injected fault$"):
        source(proxy.host).resolve(None)
    assert proxy.count("/manifests/") == 1  # not retried
    proxy.fail("/manifests/", 403, 1)
    with pytest.raises(AuthError, match=r"access to hreg/simple denied \(HTTP 403\): injected fault"):
        source(proxy.host).resolve(None)
    src = source(proxy.host)
    resolved = src.resolve(None)
    proxy.faults.redirect_blobs = proxy.faults.redirect_loop = True
    with pytest.raises(RegistryError, match="more than 5 redirects"):
        src.fetch_blob(resolved.layers[0], tmp_path / "loop")
    proxy.faults.redirect_blobs = proxy.faults.redirect_loop = False
    proxy.stall(resolved.layers[0].digest, 1.5)
    slow = source(proxy.host, retry=RetryPolicy(tries=3, base=0.01, timeout=0.5))
    slow.fetch_blob(resolved.layers[0], tmp_path / "stalled")  # timed out once, then fetched
    assert proxy.count(resolved.layers[0].digest) >= 2


def test_docker_schema2_manifest_and_list(pushed: Registry, images: Path) -> None:  # noqa: F811
    skopeo(
        "copy",
        "-q",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        f"oci:{images}:v1",
        f"docker://{pushed.host}/hreg/docker:v1",
    )
    resolved = source(pushed.host, "hreg/docker:v1").resolve(None)
    assert resolved.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert resolved.manifest_digest == raw_digest(f"docker://{pushed.host}/hreg/docker:v1")
    assert resolved.config.media_type == "application/vnd.docker.container.image.v1+json"
    skopeo(
        "copy",
        "-q",
        "--all",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        f"oci:{images}:multi",
        f"docker://{pushed.host}/hreg/dockerlist:v1",
    )
    listed = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{pushed.host}/hreg/dockerlist:v1"))
    arm = source(pushed.host, "hreg/dockerlist:v1").resolve("linux/arm64")
    assert arm.index_digest == raw_digest(f"docker://{pushed.host}/hreg/dockerlist:v1")
    assert listed["mediaType"] == "application/vnd.docker.distribution.manifest.list.v2+json"
    assert arm.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert arm.platform == "linux/arm64"


def _outside_address() -> str:
    """A non-loopback address of this machine: the client must use HTTPS to reach it."""
    for address in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split():
        if "." in address and not address.startswith("127."):
            return address
    pytest.fail("this machine has no non-loopback IPv4 address to test HTTPS against", pytrace=False)


def test_https_with_verification(
    pushed: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backoff: SleepLog
) -> None:
    address = _outside_address()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=mesobox-test",
            "-addext",
            f"subjectAltName=IP:{address}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    with fault_proxy(pushed.host, bind=address, tls=(str(cert), str(key))) as tls_proxy:
        tls_proxy.faults.bearer = True  # the token realm is HTTPS too
        src = source(tls_proxy.host)
        assert src.base == f"https://{tls_proxy.host}"
        with pytest.raises(RegistryError, match="TLS certificate verification failed") as info:
            src.resolve(None)
        assert "\n" not in info.value.message
        assert backoff.slept == []  # refused at once: no retry can fix a certificate
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # OpenSSL's default verify paths honour it
        resolved = source(tls_proxy.host).resolve(None)
        assert resolved.manifest_digest == raw_digest(f"docker://{pushed.host}/hreg/simple:v1")
        assert [e for e in tls_proxy.log if e.listener == "token"]
