"""The registry client behind a proxy, with per-registry certificates, and with mirrors:
real parts only.

- a forward proxy: Debian's tinyproxy, started on loopback with its own configuration
  (it accepts 127.0.0.1 only, and tunnels only to the test registry's port); its log is
  the proof that a request went through it, or did not;
- registries: docker-registry, plain on loopback, or over TLS on this machine's outside
  address (loopback registries are plain HTTP) with a CA that only a ``certs.d``
  directory, or ``SSL_CERT_FILE``, makes known; one of them demands a client certificate;
- pulls run as the ordinary user through the ``mesobox`` fixture, as on a login node.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Registry, free_port, make_oci_image, need_tool, start_registry
from mesobox.config import Config
from mesobox.errors import ConfigError, RegistryError
from mesobox.image.reference import parse_reference
from mesobox.image.registry import RegistrySource, RetryPolicy
from registry_support import images, issue, make_ca, outside_address, raw_digest, serve_registry  # noqa: F401

pytestmark = pytest.mark.registry
FAST = RetryPolicy(tries=2, base=0.02, timeout=10)
IMAGE = "hreg/proxied"


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pushed(registry: Registry, images: Path) -> Registry:  # noqa: F811
    registry.push_oci(images, "v1", IMAGE)
    return registry


@dataclass
class Pki:
    ca: Path  # the registry's CA: known to no one unless a test says so
    server: tuple[Path, Path]
    client_ca: Path
    client: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(shared_tmp: Path) -> Pki:
    top = Path(tempfile.mkdtemp(prefix="pki-", dir=shared_tmp))
    ca = make_ca(top, "ca")
    server = issue(top, "server", ca, f"subjectAltName=IP:{outside_address()}\nextendedKeyUsage=serverAuth")
    client_ca = make_ca(top, "client-ca")
    client = issue(top, "client", client_ca, "extendedKeyUsage=clientAuth")
    os.chmod(top, 0o755)
    for path in top.iterdir():
        os.chmod(path, 0o644)  # test keys: the user's copies are made from these
    return Pki(ca[0], server, client_ca[0], client)


def _tls(pki: Pki, client_ca: bool = False) -> str:
    text = f"    certificate: {pki.server[0]}\n    key: {pki.server[1]}\n"
    return text + (f"    clientcas:\n      - {pki.client_ca}\n" if client_ca else "")


@pytest.fixture(scope="module")
def tls_registry(pushed: Registry, pki: Pki, shared_tmp: Path) -> Iterator[Registry]:
    """HTTPS on the outside address, serving what ``pushed`` holds."""
    reg = serve_registry(Path(tempfile.mkdtemp(dir=shared_tmp)), outside_address(), pushed.root / "data", _tls(pki))
    yield reg
    reg.process.kill()
    reg.process.wait()


@pytest.fixture(scope="module")
def mtls_registry(pushed: Registry, pki: Pki, shared_tmp: Path) -> Iterator[Registry]:
    """Like ``tls_registry``, and it demands a client certificate issued by the client CA."""
    reg = serve_registry(Path(tempfile.mkdtemp(dir=shared_tmp)), outside_address(), pushed.root / "data",
                         _tls(pki, client_ca=True))
    yield reg
    reg.process.kill()
    reg.process.wait()


@dataclass
class Tinyproxy:
    url: str
    log: Path

    def requests(self) -> list[str]:
        """The request lines it was asked ("GET http://…", "CONNECT host:port …")."""
        if not self.log.exists():
            return []
        return re.findall(r"Request \(file descriptor \d+\): (.*)", self.log.read_text(errors="replace"))


def start_tinyproxy(top: Path, connect_port: int) -> tuple[Tinyproxy, subprocess.Popen[bytes]]:
    """tinyproxy in the foreground with a configuration of its own (no system service):
    on 127.0.0.1 only, for clients on 127.0.0.1 only, tunnelling (CONNECT) to
    ``connect_port`` only."""
    need_tool("tinyproxy")
    port = free_port()
    conf = top / "tinyproxy.conf"
    log = top / "tinyproxy.log"
    conf.write_text(
        f"Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nConnectPort {connect_port}\n"
        f'Timeout 60\nMaxClients 50\nLogLevel Connect\nLogFile "{log}"\nPidFile "{top / "tinyproxy.pid"}"\n'
        "DisableViaHeader Yes\n"
    )
    out = open(top / "tinyproxy.out", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdout=out, stderr=out)
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"tinyproxy did not start: {(top / 'tinyproxy.out').read_text()}") from None
            time.sleep(0.05)
    return Tinyproxy(f"http://127.0.0.1:{port}", log), proc


@pytest.fixture()
def tinyproxy(tmp_path: Path, tls_registry: Registry) -> Iterator[Tinyproxy]:
    proxy, proc = start_tinyproxy(tmp_path, int(tls_registry.host.rsplit(":", 1)[1]))
    yield proxy
    proc.terminate()
    proc.wait(timeout=10)


@dataclass
class Puller:
    """``mesobox pull`` as the ordinary user, each pull into a store of its own (so every
    pull talks to the registry), with a home of its own and no certs.d but the test's."""

    mesobox: Any
    user: Any
    home: Path
    certs_dirs: Path  # the site's certs.d directory (MESOBOX_REGISTRY_CERTS_DIRS): empty
    count: int = 0

    def __call__(self, ref: str, **env: str) -> subprocess.CompletedProcess[bytes]:
        self.count += 1
        full = {"HOME": str(self.home), "MESOBOX_REGISTRY_CERTS_DIRS": str(self.certs_dirs),
                "MESOBOX_STORE": str(self.mesobox.store_root / f"{self.user.name}-{self.count}"), **env}
        return self.mesobox("pull", "-q", "--format", "dir", f"docker://{ref}", as_user=self.user, env=full)

    def user_certs(self, host: str) -> Path:
        """The user's own ``~/.config/containers/certs.d/HOST`` (made, the user's)."""
        path = self.home / ".config" / "containers" / "certs.d" / host
        path.mkdir(parents=True)
        subprocess.run(["chown", "-R", f"{self.user.uid}:{self.user.gid}", str(self.home)], check=True)
        return path


@pytest.fixture()
def pull(mesobox: Any, user: Any, world_tmp: Path) -> Puller:
    home = world_tmp / "home"
    home.mkdir()
    os.chown(home, user.uid, user.gid)
    site = world_tmp / "site-certs.d"
    site.mkdir(mode=0o755)
    return Puller(mesobox, user, home, site)


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


def failed(result: subprocess.CompletedProcess[bytes]) -> str:
    """The one error line of a failed pull (warnings before it are returned too)."""
    err = result.stderr.decode()
    assert result.returncode != 0, result.stdout.decode()
    assert "Traceback" not in err, err
    return err


def copy_as(src: Path, dest: Path, uid: int, mode: int = 0o644) -> None:
    dest.write_bytes(src.read_bytes())
    os.chown(dest, uid, -1)
    os.chmod(dest, mode)


# -- proxies --------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
def test_https_pull_goes_through_the_proxy(pull: Puller, tinyproxy: Tinyproxy, tls_registry: Registry,
                                           pki: Pki, variable: str) -> None:
    digest = ok(pull(f"{tls_registry.host}/{IMAGE}:v1", **{variable: tinyproxy.url, "SSL_CERT_FILE": str(pki.ca)}))
    assert digest == raw_digest(f"docker://{tls_registry.host}/{IMAGE}:v1")
    assert f"CONNECT {tls_registry.host} HTTP/1.1" in tinyproxy.requests()


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_plain_http_pull_goes_through_the_proxy(pull: Puller, tinyproxy: Tinyproxy, pushed: Registry,
                                                variable: str) -> None:
    """Loopback registries are proxied too unless NO_PROXY names them (httpx's rule)."""
    ok(pull(f"{pushed.host}/{IMAGE}:v1", **{variable: tinyproxy.url}))
    asked = tinyproxy.requests()
    assert f"GET http://{pushed.host}/v2/{IMAGE}/manifests/v1 HTTP/1.1" in asked
    assert any(line.startswith(f"GET http://{pushed.host}/v2/{IMAGE}/blobs/sha256:") for line in asked)


@pytest.mark.parametrize("no_proxy", ["NO_PROXY={host}", "no_proxy={host}", "NO_PROXY=example.org,{addr}",
                                      "NO_PROXY=*"])
def test_no_proxy_bypasses_the_proxy(pull: Puller, tinyproxy: Tinyproxy, tls_registry: Registry, pushed: Registry,
                                     pki: Pki, no_proxy: str) -> None:
    variable, _, value = no_proxy.format(host=tls_registry.host, addr=outside_address()).partition("=")
    env = {"HTTPS_PROXY": tinyproxy.url, "SSL_CERT_FILE": str(pki.ca), variable: value}
    ok(pull(f"{tls_registry.host}/{IMAGE}:v1", **env))
    assert tinyproxy.requests() == []
    # the same pull without NO_PROXY goes through it (the check above can fail)
    del env[variable]
    ok(pull(f"{tls_registry.host}/{IMAGE}:v1", **env))
    assert tinyproxy.requests() == [f"CONNECT {tls_registry.host} HTTP/1.1"] * len(tinyproxy.requests())
    assert tinyproxy.requests()


def test_a_dead_or_refusing_proxy_is_one_line(pull: Puller, tls_registry: Registry, pki: Pki,
                                              tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    err = failed(pull(f"{tls_registry.host}/{IMAGE}:v1", HTTPS_PROXY=dead, SSL_CERT_FILE=str(pki.ca)))
    assert f"{tls_registry.host}: connection refused (gave up after 5 tries)" in err
    assert f"or the proxy {dead} in $HTTPS_PROXY" in err  # the hint names it: it may be what is down
    # a proxy that will not tunnel to the registry's port (its ConnectPort is another)
    proxy, proc = start_tinyproxy(tmp_path, free_port())
    try:
        err = failed(pull(f"{tls_registry.host}/{IMAGE}:v1", HTTPS_PROXY=proxy.url, SSL_CERT_FILE=str(pki.ca)))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "the proxy refused" in err and "403" in err
    assert f"CONNECT {tls_registry.host} HTTP/1.1" in proxy.requests()


def test_one_source_keeps_its_connection_alive(tinyproxy: Tinyproxy, tls_registry: Registry, pki: Pki,
                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Manifest, config and layers one after another through one tunnel: one CONNECT."""
    monkeypatch.setenv("HTTPS_PROXY", tinyproxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    src = RegistrySource(parse_reference(f"{tls_registry.host}/{IMAGE}:v1"), Config(registry_certs_dirs=()),
                         retry=FAST, env={"HOME": "/nonexistent"})
    resolved = src.resolve(None)
    for desc in resolved.layers:
        src.fetch_blob(desc, tmp_path / desc.digest[7:])
    src.close()
    assert len(resolved.layers) == 2  # so: a manifest, a config and two layers were asked for
    assert tinyproxy.requests() == [f"CONNECT {tls_registry.host} HTTP/1.1"]


# -- certs.d and SSL_CERT_FILE ----------------------------------------------------------------


def test_a_ca_known_only_through_certs_d(pull: Puller, tls_registry: Registry, pki: Pki) -> None:
    ref = f"{tls_registry.host}/{IMAGE}:v1"
    err = failed(pull(ref))
    assert "TLS certificate verification failed" in err
    assert f".config/containers/certs.d/{tls_registry.host}/ca.crt" in err  # the hint says where
    assert len([line for line in err.splitlines() if line.startswith("mesobox: error: ")]) == 1
    # the user's own ~/.config/containers/certs.d/HOST:PORT/ca.crt
    mine = pull.user_certs(tls_registry.host)
    copy_as(pki.ca, mine / "ca.crt", pull.user.uid)
    digest = ok(pull(ref))
    # an empty host directory of the user's is the one used (the first found wins, as in podman)
    (mine / "ca.crt").unlink()
    assert "TLS certificate verification failed" in failed(pull(ref))
    # the site's certs.d (root's files), named by the registry_certs_dirs setting
    mine.rmdir()
    site = pull.certs_dirs / tls_registry.host
    site.mkdir(mode=0o755)
    copy_as(pki.ca, site / "ca.crt", 0)
    assert ok(pull(ref)) == digest
    # SSL_CERT_FILE alone does it too
    (site / "ca.crt").unlink()
    assert ok(pull(ref, SSL_CERT_FILE=str(pki.ca))) == digest


def test_ssl_cert_dir_is_honoured(pull: Puller, tls_registry: Registry, pki: Pki, world_tmp: Path) -> None:
    hashed = world_tmp / "capath"
    hashed.mkdir(mode=0o755)
    copy_as(pki.ca, hashed / "ca.pem", 0)
    subprocess.run(["openssl", "rehash", str(hashed)], check=True, capture_output=True)
    ok(pull(f"{tls_registry.host}/{IMAGE}:v1", SSL_CERT_DIR=str(hashed)))


PLANTS = ["host-dir-of-another-user", "ca-file-of-another-user", "certs-d-writable-by-all", "group-writable-ca"]


@pytest.mark.parametrize("plant", PLANTS)
def test_planted_certificates_are_ignored(pull: Puller, tls_registry: Registry, pki: Pki, attacker: Any,
                                          world_tmp: Path, plant: str) -> None:
    """A CA another user could have put there would let them read or forge the registry's
    answers: it is ignored (one warning) and the pull fails as if it were absent."""
    top = world_tmp / "planted-certs.d"
    top.mkdir(mode=0o1777 if plant == "certs-d-writable-by-all" else 0o755)
    os.chmod(top, 0o1777 if plant == "certs-d-writable-by-all" else 0o755)
    host = top / tls_registry.host
    host.mkdir(mode=0o755)
    owner = attacker.uid if plant in ("host-dir-of-another-user", "ca-file-of-another-user") else 0
    if plant == "host-dir-of-another-user":
        os.chown(host, owner, -1)
    copy_as(pki.ca, host / "ca.crt", owner, 0o664 if plant == "group-writable-ca" else 0o644)
    if plant == "host-dir-of-another-user":
        os.chown(host / "ca.crt", 0, -1)  # the file is root's; the directory it sits in is not
    pull.certs_dirs = top
    err = failed(pull(f"{tls_registry.host}/{IMAGE}:v1"))
    assert "TLS certificate verification failed" in err
    assert "warning: ignoring the registry certificates in" in err
    reason = {"host-dir-of-another-user": f"belongs to uid {attacker.uid}",
              "ca-file-of-another-user": f"belongs to uid {attacker.uid}",
              "certs-d-writable-by-all": "others may write it", "group-writable-ca": "others may write it"}[plant]
    assert reason in err
    # the same files, owned and moded as they should be, are used (the rule, not the layout, refused them)
    os.chmod(top, 0o755)
    os.chown(host, 0, -1)
    os.chown(host / "ca.crt", 0, -1)
    os.chmod(host / "ca.crt", 0o644)
    ok(pull(f"{tls_registry.host}/{IMAGE}:v1"))


def test_client_certificate_from_certs_d(mtls_registry: Registry, pki: Pki, tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    host = certs / mtls_registry.host
    host.mkdir(parents=True)
    (host / "ca.crt").write_bytes(pki.ca.read_bytes())
    config = Config(registry_certs_dirs=(str(certs),))

    def source() -> RegistrySource:
        return RegistrySource(parse_reference(f"{mtls_registry.host}/{IMAGE}:v1"), config, retry=FAST,
                              env={"HOME": "/nonexistent"})

    with pytest.raises(RegistryError, match="gave up after 2 tries") as info:
        source().resolve(None)  # the registry wants a client certificate: none is offered
    assert "\n" not in info.value.message
    (host / "client.cert").write_bytes(pki.client[0].read_bytes())
    with pytest.raises(ConfigError, match=r"client.cert has no key client.key beside it"):
        source().resolve(None)
    (host / "client.key").write_bytes(pki.client[1].read_bytes())
    assert source().resolve(None).layers
    (host / "client.cert").unlink()
    with pytest.raises(ConfigError, match=r"client.key has no client certificate client.cert beside it"):
        source().resolve(None)
    (host / "client.cert").write_bytes(pki.server[0].read_bytes())  # not the key's certificate
    with pytest.raises(ConfigError, match="not a certificate and its key"):
        source().resolve(None)


# -- mirrors ----------------------------------------------------------------------------------


@pytest.fixture()
def mirror(tmp_path: Path, images: Path) -> Iterator[Registry]:  # noqa: F811
    """A registry holding the test image under a prefix, ``cache/hreg/only-on-mirror``."""
    reg = start_registry(tmp_path / "mirror")
    reg.push_oci(images, "v1", "cache/hreg/only-on-mirror")
    yield reg
    reg.process.kill()
    reg.process.wait()


@pytest.fixture()
def upstream(tmp_path: Path) -> Iterator[Registry]:
    """An empty registry: what a pull gets, it got from a mirror."""
    reg = start_registry(tmp_path / "upstream")
    yield reg
    reg.process.kill()
    reg.process.wait()


def test_pull_comes_from_the_mirror(pull: Puller, mirror: Registry, upstream: Registry) -> None:
    ref = f"{upstream.host}/hreg/only-on-mirror:v1"
    assert "manifest unknown" in failed(pull(ref))
    result = pull(ref, MESOBOX_REGISTRY_MIRRORS=f"{upstream.host}={mirror.host}/cache")
    assert ok(result) == raw_digest(f"docker://{mirror.host}/cache/hreg/only-on-mirror:v1")
    assert "warning" not in result.stderr.decode()


def test_pull_falls_back_when_the_mirror_is_down_or_lacks_the_image(pull: Puller, pushed: Registry,
                                                                    mirror: Registry) -> None:
    ref = f"{pushed.host}/{IMAGE}:v1"
    dead = f"127.0.0.1:{free_port()}"
    result = pull(ref, MESOBOX_REGISTRY_MIRRORS=f"{pushed.host}={dead}")
    assert ok(result) == raw_digest(f"docker://{ref}")
    warnings = [line for line in result.stderr.decode().splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"mirror {dead} of {pushed.host} failed" in warnings[0]
    assert "connection refused" in warnings[0]
    # a mirror that is up but does not have the image is passed over without a word
    result = pull(ref, MESOBOX_REGISTRY_MIRRORS=f"{pushed.host}={mirror.host}/cache")
    assert ok(result) == raw_digest(f"docker://{ref}")
    assert "warning" not in result.stderr.decode()


def test_a_mirror_is_insecure_only_when_listed(pull: Puller, mirror: Registry, upstream: Registry,
                                               tmp_path: Path) -> None:
    """A plain-HTTP mirror off loopback is refused (HTTPS is asked of it) unless
    insecure_registries names it, like any registry."""
    outside = serve_registry(tmp_path / "outside", outside_address(), mirror.root / "data")
    try:
        ref = f"{upstream.host}/hreg/only-on-mirror:v1"
        mirrors = f"{upstream.host}={outside.host}/cache"
        err = failed(pull(ref, MESOBOX_REGISTRY_MIRRORS=mirrors))
        assert f"mirror {outside.host} of {upstream.host} failed" in err and "manifest unknown" in err
        digest = ok(pull(ref, MESOBOX_REGISTRY_MIRRORS=mirrors, MESOBOX_INSECURE_REGISTRIES=outside.host))
        assert digest == raw_digest(f"docker://{mirror.host}/cache/hreg/only-on-mirror:v1")
    finally:
        outside.process.kill()
        outside.process.wait()


def test_bad_mirror_entries_are_one_line(pull: Puller, pushed: Registry) -> None:
    err = failed(pull(f"{pushed.host}/{IMAGE}:v1", MESOBOX_REGISTRY_MIRRORS="https://mirror.example"))
    assert "MESOBOX_REGISTRY_MIRRORS: bad value for 'registry_mirrors'" in err
    err = failed(pull(f"{pushed.host}/{IMAGE}:v1", MESOBOX_REGISTRY_MIRRORS=f"{pushed.host}=mirror/x"))
    assert "bad mirror 'mirror/x'" in err


def test_docker_hub_names_come_from_their_mirror(mirror: Registry, images: Path,  # noqa: F811
                                                 tmp_path: Path) -> None:
    """``docker.io=MIRROR/PREFIX`` serves Docker Hub's names (``library/`` included) with no
    access to Docker Hub at all."""
    mirror.push_oci(images, "v1", "hub/library/mesobox-mirrored")
    config = Config(registry_mirrors=(f"index.docker.io={mirror.host}/hub",), registry_certs_dirs=())
    src = RegistrySource(parse_reference("mesobox-mirrored:v1"), config, retry=FAST, env={"HOME": "/nonexistent"})
    resolved = src.resolve(None)
    assert str(resolved.reference) == "docker://docker.io/library/mesobox-mirrored:v1"
    assert resolved.manifest_digest == raw_digest(f"docker://{mirror.host}/hub/library/mesobox-mirrored:v1")
    for desc in resolved.layers:
        src.fetch_blob(desc, tmp_path / desc.digest[7:])
    src.close()
    assert [m.ref.name for m in src.mirrors] == [f"{mirror.host}/hub/library/mesobox-mirrored"]


def test_registry_settings_in_the_site_file(tmp_path: Path) -> None:
    from mesobox.config import load_config

    assert Config().registry_certs_dirs == ("/etc/containers/certs.d", "/etc/docker/certs.d")
    site = tmp_path / "mesobox.toml"
    site.write_text('registry_mirrors = ["docker.io=mirror.example:5000/hub", "ghcr.io=mirror.example:5000"]\n'
                    'registry_certs_dirs = ["/etc/mesobox/certs.d"]\n')
    env = {"MESOBOX_SITE_CONFIG": str(site), "HOME": str(tmp_path), "MESOBOX_RUNTIME_DIR": str(tmp_path / "rt")}
    config = load_config(env)
    assert config.registry_mirrors == ("docker.io=mirror.example:5000/hub", "ghcr.io=mirror.example:5000")
    assert config.registry_certs_dirs == ("/etc/mesobox/certs.d",)
    site.write_text('registry_mirrors = ["docker.io mirror.example"]\n')
    with pytest.raises(ConfigError, match="bad value for 'registry_mirrors'"):
        load_config(env)


def test_a_socks_proxy_is_one_configuration_error(monkeypatch: pytest.MonkeyPatch, pushed: Registry) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    src = RegistrySource(parse_reference(f"{pushed.host}/{IMAGE}:v1"), Config(), retry=FAST)
    with pytest.raises(ConfigError, match="the proxy the environment names cannot be used") as info:
        src.resolve(None)
    assert "ALL_PROXY" in (info.value.hint or "")


# -- start-up ---------------------------------------------------------------------------------


@pytest.mark.userns
def test_run_of_a_pulled_image_imports_no_http(pull: Puller, pushed: Registry, mesobox: Any, user: Any,
                                               busybox_rootfs: Path, tmp_path: Path) -> None:
    """httpx and the registry client cost tens of ms: `mesobox run` of a pulled image
    imports neither."""
    def busybox(rootfs: Path) -> None:
        shutil.copytree(busybox_rootfs, rootfs, symlinks=True, dirs_exist_ok=True)

    pushed.push_oci(make_oci_image(tmp_path / "layout", "v1", [busybox]), "v1", "hreg/runnable")
    store = str(mesobox.store_root / "importtime")
    ref = f"{pushed.host}/hreg/runnable:v1"
    ok(pull(ref, MESOBOX_STORE=store))
    env = {"HOME": str(pull.home), "MESOBOX_STORE": store, "PYTHONPATH": str(mesobox.src),
           "MESOBOX_SITE_CONFIG": "/nonexistent"}
    env.update(mesobox.runtime_env(user))
    result = user.run([mesobox.python, "-X", "importtime", "-m", "mesobox", "run", ref, "true"], env=env)
    assert result.returncode == 0, result.stderr.decode()
    modules = {line.split("|")[-1].strip() for line in result.stderr.decode().splitlines() if "|" in line}
    assert "mesobox.launch.execute" in modules or "mesobox.cli.run" in modules  # importtime did report
    assert not {"httpx", "httpcore", "mesobox.image.registry", "mesobox.image.http"} & modules
