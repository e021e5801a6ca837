"""Image trust: keys, signatures in cosign's format, and the site policy at pull and launch.

Real parts: a docker-registry (the ``registry`` fixture), images built with umoci and
pushed with skopeo, ``openssl`` as an independent check of every signature (payload and
signature fetched from the registry with plain HTTP, not through mesobox), and an
ordinary user under a policy that root writes (the site file named by
MESOBOX_SITE_CONFIG, as /etc/mesobox/mesobox.toml would).  cosign itself is not in
Debian 12: interoperability rests on the format and on openssl's verdict.
"""

from __future__ import annotations

import base64
import hashlib
import json
import marshal
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import Mesobox, Registry, User, make_oci_image, open_busybox_rootfs, start_registry
from run_support import one_error_line

pytestmark = [pytest.mark.registry, pytest.mark.userns]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = ", ".join((OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json"))


def _file_layer(name: str, text: str):  # type: ignore[no-untyped-def]
    def layer(rootfs: Path) -> None:
        (rootfs / name).write_text(text)

    return layer


@pytest.fixture(scope="module")
def layout(shared_tmp: Path) -> Path:
    """Two different images (tags a and b) over a busybox rootfs, so they can run."""
    def busybox(rootfs: Path) -> None:
        open_busybox_rootfs(rootfs)

    where = shared_tmp / "trust-images"
    make_oci_image(where, "a", [busybox, _file_layer("which", "a\n")])
    make_oci_image(where, "b", [busybox, _file_layer("which", "b\n")])
    subprocess.run(["chmod", "-R", "a+rX", str(where)], check=True)  # users pull oci:LAYOUT too
    return where


@pytest.fixture(scope="module")
def pushed(registry: Registry, layout: Path) -> Registry:
    for repo in ("trust/signed", "trust/other", "trust/keys", "trust/ident", "open/img", "elsewhere/img"):
        for tag in ("a", "b"):
            registry.push_oci(layout, tag, repo)
    return registry


def _get(registry: Registry, path: str, accept: str = ACCEPT) -> tuple[bytes, dict[str, str]]:
    req = urllib.request.Request(registry.url(path), headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read(), dict(resp.headers)


def _digest(registry: Registry, repo: str, tag: str) -> str:
    data, _ = _get(registry, f"/v2/{repo}/manifests/{tag}")
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _signatures(registry: Registry, repo: str, digest: str) -> dict[str, Any]:
    data, _ = _get(registry, f"/v2/{repo}/manifests/sha256-{digest[7:]}.sig", OCI_MANIFEST)
    doc: dict[str, Any] = json.loads(data)
    return doc


def _keys(mesobox: Mesobox, where: Path, name: str) -> tuple[Path, Path]:
    proc = mesobox("key", "generate", "--output", str(where / name))
    assert proc.returncode == 0, proc.stderr
    os.chmod(where / f"{name}.pub", 0o644)
    return where / f"{name}.key", where / f"{name}.pub"


def _openssl_verifies(pub: Path, payload: bytes, signature_b64: str, work: Path) -> bool:
    (work / "payload").write_bytes(payload)
    (work / "sig.der").write_bytes(base64.b64decode(signature_b64))
    proc = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature", str(work / "sig.der"),
                           str(work / "payload")], capture_output=True, check=False)
    return proc.returncode == 0 and proc.stdout.strip() == b"Verified OK"


# --- keys ------------------------------------------------------------------------------------------------


def test_key_generate_writes_pem_keys_openssl_reads(mesobox: Mesobox, world_tmp: Path) -> None:
    key, pub = _keys(mesobox, world_tmp, "site")
    assert oct(key.stat().st_mode & 0o777) == oct(0o600)
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    text = subprocess.run(["openssl", "pkey", "-in", str(key), "-noout", "-text"], capture_output=True,
                          check=True).stdout.decode()
    assert "prime256v1" in text or "P-256" in text
    derived = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout"], capture_output=True, check=True).stdout
    assert derived == pub.read_bytes()
    # never overwritten
    proc = mesobox("key", "generate", "--output", str(world_tmp / "site"))
    assert proc.returncode == 2 and "exists already" in one_error_line(proc.stderr)
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    # encrypted with a password from the environment; openssl opens it with the same one
    proc = mesobox("key", "generate", "--output", str(world_tmp / "locked"), "--password-env", "KEYPASS",
                   env={"KEYPASS": "s3cret"})
    assert proc.returncode == 0, proc.stderr
    locked = world_tmp / "locked.key"
    assert locked.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    subprocess.run(["openssl", "pkey", "-in", str(locked), "-passin", "pass:s3cret", "-noout"], check=True,
                   capture_output=True)


# --- sign and verify ---------------------------------------------------------------------------------------


def test_sign_pushes_cosign_layout_that_openssl_verifies(mesobox: Mesobox, pushed: Registry,
                                                         world_tmp: Path) -> None:
    key, pub = _keys(mesobox, world_tmp, "one")
    key2, pub2 = _keys(mesobox, world_tmp, "two")
    repo = "trust/signed"
    image = f"docker://{pushed.host}/{repo}:a"
    digest = _digest(pushed, repo, "a")
    proc = mesobox("sign", "--key", str(key), image)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == f"signed {digest}: pushed {pushed.host}/{repo}:sha256-{digest[7:]}.sig\n"

    doc = _signatures(pushed, repo, digest)
    assert doc["mediaType"] == OCI_MANIFEST and doc["schemaVersion"] == 2
    assert doc["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    (layer,) = doc["layers"]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    payload, _ = _get(pushed, f"/v2/{repo}/blobs/{layer['digest']}", "*/*")
    assert "sha256:" + hashlib.sha256(payload).hexdigest() == layer["digest"]
    assert json.loads(payload) == {
        "critical": {"identity": {"docker-reference": f"{pushed.host}/{repo}:a"},
                     "image": {"docker-manifest-digest": digest},
                     "type": "cosign container image signature"},
        "optional": {}}
    signature = layer["annotations"]["dev.cosignproject.cosign/signature"]
    assert _openssl_verifies(pub, payload, signature, world_tmp)
    assert not _openssl_verifies(pub2, payload, signature, world_tmp)

    # a second key appends; the same key again adds nothing
    assert mesobox("sign", "--key", str(key2), image).returncode == 0
    proc = mesobox("sign", "--key", str(key), image)
    assert proc.returncode == 0 and "already there" in proc.stdout.decode()
    layers = _signatures(pushed, repo, digest)["layers"]
    assert len(layers) == 2
    second = layers[1]["annotations"]["dev.cosignproject.cosign/signature"]
    assert _openssl_verifies(pub2, payload, second, world_tmp)

    for public in (pub, pub2):
        proc = mesobox("verify", "--key", str(public), image)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode() == f"verified {digest}: signed for {pushed.host}/{repo}:a\n"


def _put(registry: Registry, path: str, data: bytes, content_type: str, method: str = "PUT") -> dict[str, str]:
    req = urllib.request.Request(registry.url(path), data=data, method=method,
                                 headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return dict(resp.headers)


def _push_blob(registry: Registry, repo: str, data: bytes) -> str:
    """A blob upload by plain HTTP (POST, then PUT with the digest): not mesobox's code."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    location = _put(registry, f"/v2/{repo}/blobs/uploads/", b"", "application/octet-stream", "POST")["Location"]
    location = location.split(f"http://{registry.host}")[-1]
    _put(registry, f"{location}{'&' if '?' in location else '?'}digest={digest}", data, "application/octet-stream")
    return digest


def test_verify_refuses_wrong_key_unsigned_and_tampered(mesobox: Mesobox, pushed: Registry, world_tmp: Path) -> None:
    key, pub = _keys(mesobox, world_tmp, "good")
    _other_key, other_pub = _keys(mesobox, world_tmp, "other")
    repo = "trust/other"
    image = f"docker://{pushed.host}/{repo}:a"
    proc = mesobox("verify", "--key", str(pub), image)
    assert proc.returncode == 13
    assert "no signature" in one_error_line(proc.stderr) and "has no signatures" in proc.stderr.decode()
    assert mesobox("sign", "--key", str(key), image).returncode == 0
    proc = mesobox("verify", "--key", str(other_pub), image)
    assert proc.returncode == 13 and "none verifies with the key" in one_error_line(proc.stderr)

    # Tampered: the payload now names image b's digest; the signature is the original's.
    digest = _digest(pushed, repo, "a")
    doc = _signatures(pushed, repo, digest)
    payload, _ = _get(pushed, f"/v2/{repo}/blobs/{doc['layers'][0]['digest']}", "*/*")
    forged = payload.replace(digest.encode(), _digest(pushed, repo, "b").encode())
    assert forged != payload
    doc["layers"][0]["digest"] = _push_blob(pushed, repo, forged)
    doc["layers"][0]["size"] = len(forged)
    _put(pushed, f"/v2/{repo}/manifests/sha256-{digest[7:]}.sig", json.dumps(doc).encode(), OCI_MANIFEST)
    assert not _openssl_verifies(pub, forged, doc["layers"][0]["annotations"][
        "dev.cosignproject.cosign/signature"], world_tmp)
    proc = mesobox("verify", "--key", str(pub), image)
    assert proc.returncode == 13 and "none verifies with the key" in one_error_line(proc.stderr)
    # signing afresh keeps the forged layer and appends a good one: verify passes again
    assert mesobox("sign", "--key", str(key), image).returncode == 0
    assert len(_signatures(pushed, repo, digest)["layers"]) == 2
    assert mesobox("verify", "--key", str(pub), image).returncode == 0


def test_sign_refuses_bad_keys_in_one_line(mesobox: Mesobox, pushed: Registry, world_tmp: Path) -> None:
    image = f"docker://{pushed.host}/trust/keys:b"
    assert mesobox("key", "generate", "-o", str(world_tmp / "locked"), "--password-env", "P",
                   env={"P": "pw"}).returncode == 0
    proc = mesobox("sign", "--key", str(world_tmp / "locked.key"), image)
    assert proc.returncode == 2 and "is encrypted" in one_error_line(proc.stderr)
    proc = mesobox("sign", "--key", str(world_tmp / "locked.key"), "--password-env", "P", image, env={"P": "no"})
    assert proc.returncode == 2 and "password is wrong" in one_error_line(proc.stderr)
    (world_tmp / "cosign.key").write_text("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\neyJ9\n"
                                          "-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    proc = mesobox("sign", "--key", str(world_tmp / "cosign.key"), image)
    assert proc.returncode == 2 and "cosign's encrypted key format" in one_error_line(proc.stderr)
    rsa = world_tmp / "rsa.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(rsa)],
                   check=True, capture_output=True)
    proc = mesobox("sign", "--key", str(rsa), image)
    assert proc.returncode == 2 and "not an ECDSA P-256 key" in one_error_line(proc.stderr)
    # an encrypted key with its password signs; a SEC1 key made by openssl too
    proc = mesobox("sign", "--key", str(world_tmp / "locked.key"), "--password-env", "P", image, env={"P": "pw"})
    assert proc.returncode == 0, proc.stderr
    sec1 = world_tmp / "sec1.key"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(sec1)], check=True,
                   capture_output=True)
    assert sec1.read_text().startswith("-----BEGIN EC PRIVATE KEY-----")
    assert mesobox("sign", "--key", str(sec1), image).returncode == 0
    assert mesobox("verify", "--key", str(world_tmp / "locked.pub"), image).returncode == 0


# --- the site policy, for an ordinary user ------------------------------------------------------------------


class Site:
    """The site file and the policy root writes (world-readable, not writable by users)."""

    def __init__(self, where: Path) -> None:
        self.dir = where / "site"
        self.dir.mkdir(mode=0o755)
        os.chmod(self.dir, 0o755)
        self.policy = self.dir / "policy.json"
        self.config = self.dir / "mesobox.toml"
        self.config.write_text(f'policy_file = "{self.policy}"\n')
        os.chmod(self.config, 0o644)
        past = time.time() - 3600
        os.utime(self.config, (past, past))  # a settled file: plans may rest on it at once
        self.env = {"MESOBOX_SITE_CONFIG": str(self.config)}

    def write(self, doc: object, settle: bool = True) -> None:
        """A new file (a new inode, as an editor's save is), dated back so that plans
        and verdicts may rest on it at once (probe.settled)."""
        tmp = self.dir / "policy.tmp"
        tmp.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.policy)
        if settle:
            past = time.time() - 3600
            os.utime(self.policy, (past, past))

    def key(self, source: Path, name: str) -> Path:
        dest = self.dir / name
        dest.write_bytes(source.read_bytes())
        os.chmod(dest, 0o644)
        past = time.time() - 3600
        os.utime(dest, (past, past))
        return dest


@pytest.fixture()
def site(world_tmp: Path) -> Site:
    return Site(world_tmp)


def _signed(key: Path) -> dict[str, Any]:
    return {"type": "sigstoreSigned", "keyPath": str(key)}


ACCEPT_ALL = [{"type": "insecureAcceptAnything"}]
REJECT = [{"type": "reject"}]


def _run(mesobox: Mesobox, user: User, site: Site, image: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return mesobox("exec", image, "cat", "/which", as_user=user, env={**site.env, **env})


def test_pull_follows_the_policy(mesobox: Mesobox, pushed: Registry, user: User, site: Site,
                                 world_tmp: Path) -> None:
    key, pub = _keys(mesobox, world_tmp, "k")
    site_pub = site.key(pub, "site.pub")
    host = pushed.host
    assert mesobox("sign", "--key", str(key), f"docker://{host}/trust/signed:a").returncode == 0
    site.write({"default": REJECT, "transports": {"docker": {
        f"{host}/open": ACCEPT_ALL,
        f"{host}/trust": [_signed(site_pub)],
    }}})
    pull = ("pull", "-q", "--format", "dir")
    # default: reject, before anything is stored
    proc = mesobox(*pull, f"docker://{host}/elsewhere/img:a", as_user=user, env=site.env)
    assert proc.returncode == 13
    assert one_error_line(proc.stderr).endswith(f"refuses docker://{host}/elsewhere/img:a: default is reject")
    # a scope that accepts anything
    assert mesobox(*pull, f"docker://{host}/open/img:a", as_user=user, env=site.env).returncode == 0
    # sigstoreSigned: the signed tag is accepted, the unsigned one refused at pull
    proc = mesobox(*pull, f"docker://{host}/trust/signed:a", as_user=user, env=site.env)
    assert proc.returncode == 0, proc.stderr
    proc = mesobox(*pull, f"docker://{host}/trust/signed:b", as_user=user, env=site.env)
    assert proc.returncode == 13
    line = one_error_line(proc.stderr)
    assert f'transports.docker["{host}/trust"] requires sigstoreSigned (key {site_pub})' in line
    assert "has no signatures" in line
    listed = mesobox("images", "--json", as_user=user, env=site.env)
    assert sorted(r["reference"] for r in json.loads(listed.stdout)) == [
        f"docker://{host}/open/img:a", f"docker://{host}/trust/signed:a"]
    # launches: the stored signatures are checked offline (the registry is not asked)
    proc = _run(mesobox, user, site, f"docker://{host}/trust/signed:a", MESOBOX_PLAN_CACHE="0")
    assert proc.returncode == 0 and proc.stdout == b"a\n", proc.stderr
    # Signed as cosign signs (by digest: the payload names the repository, no tag): a pull
    # by tag needs signedIdentity matchRepository, as with podman.
    digest = _digest(pushed, "trust/ident", "b")
    assert mesobox("sign", "--key", str(key), f"docker://{host}/trust/ident@{digest}").returncode == 0
    proc = mesobox(*pull, f"docker://{host}/trust/ident:b", as_user=user, env=site.env)
    assert proc.returncode == 13
    assert f"signed, but for '{host}/trust/ident', which matchRepoDigestOrExact" in one_error_line(proc.stderr)
    assert mesobox(*pull, f"docker://{host}/trust/ident@{digest}", as_user=user, env=site.env).returncode == 0
    site.write({"default": REJECT, "transports": {"docker": {
        f"{host}/trust": [{**_signed(site_pub), "signedIdentity": {"type": "matchRepository"}}]}}})
    proc = mesobox(*pull, f"docker://{host}/trust/ident:b", as_user=user, env=site.env)
    assert proc.returncode == 0, proc.stderr


def test_launch_of_a_stored_image_follows_a_changed_policy(mesobox: Mesobox, pushed: Registry, user: User,
                                                           site: Site) -> None:
    host = pushed.host
    image = f"docker://{host}/open/img:b"
    assert mesobox("pull", "-q", image, as_user=user, env=site.env).returncode == 0  # no policy file yet
    runtime = mesobox.runtime_root / user.name  # type: ignore[operator]
    for _ in range(2):  # the second one saves its plan (no policy: one stat asked)
        proc = _run(mesobox, user, site, image)
        assert proc.returncode == 0 and proc.stdout == b"b\n", proc.stderr
    assert list((runtime / "plans").iterdir()), "the launch saved no plan: the replay would go untested"
    site.write({"default": ACCEPT_ALL, "transports": {"docker": {f"{host}/open/img": REJECT}}})
    proc = _run(mesobox, user, site, image)
    assert proc.returncode == 13 and proc.stdout == b""
    assert one_error_line(proc.stderr).endswith(f'refuses {image}: transports.docker["{host}/open/img"] is reject')
    # accepted again: launched from the plan of that policy too, then refused after a change
    site.write({"default": ACCEPT_ALL})
    for _ in range(3):
        assert _run(mesobox, user, site, image).stdout == b"b\n"
    site.write({"default": REJECT})
    proc = _run(mesobox, user, site, image)
    assert proc.returncode == 13 and one_error_line(proc.stderr).endswith(f"refuses {image}: default is reject")


def test_verdict_cache_follows_policy_and_key_files(mesobox: Mesobox, pushed: Registry, user: User, site: Site,
                                                    world_tmp: Path) -> None:
    key, pub = _keys(mesobox, world_tmp, "k1")
    _key2, pub2 = _keys(mesobox, world_tmp, "k2")
    host = pushed.host
    image = f"docker://{host}/trust/signed:a"
    assert mesobox("sign", "--key", str(key), image).returncode == 0
    assert mesobox("pull", "-q", image, as_user=user, env=site.env).returncode == 0
    one, two = site.key(pub, "one.pub"), site.key(pub2, "two.pub")
    site.write({"default": [_signed(one)]})
    nocache = {"MESOBOX_PLAN_CACHE": "0"}  # the verdict cache alone
    proc = _run(mesobox, user, site, image, **nocache)
    assert proc.returncode == 0 and proc.stdout == b"a\n", proc.stderr
    verdicts = mesobox.runtime_root / user.name / "trust"  # type: ignore[operator]
    assert len(list(verdicts.iterdir())) == 1
    assert _run(mesobox, user, site, image, **nocache).stdout == b"a\n"
    # another policy: the cached verdict does not apply
    site.write({"default": [_signed(two)]})
    proc = _run(mesobox, user, site, image, **nocache)
    assert proc.returncode == 13 and "none verifies with the key" in one_error_line(proc.stderr)
    # the first policy again, but its key file now holds the other key: not believed either
    site.write({"default": [_signed(one)]})
    assert _run(mesobox, user, site, image, **nocache).returncode == 0
    site.key(pub2, "one.pub")
    proc = _run(mesobox, user, site, image, **nocache)
    assert proc.returncode == 13 and "none verifies with the key" in one_error_line(proc.stderr)


def test_policy_cannot_be_chosen_or_planted_by_users(mesobox: Mesobox, pushed: Registry, user: User,
                                                    attacker: User, site: Site, world_tmp: Path) -> None:
    host = pushed.host
    image = f"docker://{host}/open/img:a"
    assert mesobox("pull", "-q", image, as_user=user, env=site.env).returncode == 0
    site.write({"default": REJECT})
    # the policy's path is the site's: neither the environment nor a user file may move it
    own_policy = world_tmp / "mine.json"
    own_policy.write_text(json.dumps({"default": ACCEPT_ALL}))
    os.chmod(own_policy, 0o644)
    proc = _run(mesobox, user, site, image, MESOBOX_POLICY_FILE=str(own_policy))
    assert proc.returncode == 2 and "can be set only in the site file" in one_error_line(proc.stderr)
    user_file = world_tmp / "user.toml"
    user_file.write_text(f'policy_file = "{own_policy}"\n')
    os.chmod(user_file, 0o644)
    proc = _run(mesobox, user, site, image, MESOBOX_CONFIG=str(user_file))
    assert proc.returncode == 2 and "can be set only in the site file" in one_error_line(proc.stderr)

    # An accepted verdict planted where the user's cache would be: the attacker makes the
    # user's runtime dir first (the runtimes directory is sticky and shared, as /tmp is).
    from mesobox.image import policy

    shown = json.loads(mesobox("inspect", image, as_user=user, env=site.env).stdout)
    digests = tuple(d for d in (shown["Digest"], shown.get("IndexDigest")) if d)
    st = os.stat(site.policy)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    _dir, name, key = policy.verdict_place(str(site.policy), identity, policy.reference_target(image, digests))
    record = marshal.dumps((policy.FORMAT, key, ()))
    planted = world_tmp / "planted"
    planted.write_bytes(record)
    os.chmod(planted, 0o644)
    victim_runtime = world_tmp / "runtimes" / "victim-rt"
    script = (f"mkdir -m 777 {victim_runtime} {victim_runtime}/trust && cp {planted} {victim_runtime}/trust/{name}"
              f" && chmod 666 {victim_runtime}/trust/{name}")
    assert attacker.run(["sh", "-c", script]).returncode == 0
    proc = _run(mesobox, user, site, image, MESOBOX_RUNTIME_DIR=str(victim_runtime))
    assert proc.returncode != 0 and proc.stdout == b""
    assert "default is reject" in proc.stderr.decode() or "runtime directory" in proc.stderr.decode()
    # The same record in the user's own private cache is believed: proof that the planted
    # one was well-formed (and that a user's own cache is theirs: docs/trust.md says why).
    own_runtime = world_tmp / "runtimes" / "own-rt"
    script = (f"mkdir -m 700 {own_runtime} {own_runtime}/trust && cp {planted} {own_runtime}/trust/{name}"
              f" && chmod 600 {own_runtime}/trust/{name}")
    assert user.run(["sh", "-c", script]).returncode == 0
    proc = _run(mesobox, user, site, image, MESOBOX_RUNTIME_DIR=str(own_runtime), MESOBOX_PLAN_CACHE="0")
    assert proc.returncode == 0 and proc.stdout == b"a\n", proc.stderr


def test_path_images_use_the_dir_transport(mesobox: Mesobox, user: User, site: Site, world_tmp: Path) -> None:
    allowed = world_tmp / "approved"
    allowed.mkdir(mode=0o755)
    os.chmod(allowed, 0o755)
    rootfs = open_busybox_rootfs(allowed / "rootfs")
    (rootfs / "which").write_text("dir\n")
    os.chmod(rootfs / "which", 0o644)
    elsewhere = open_busybox_rootfs(world_tmp / "elsewhere")
    (elsewhere / "which").write_text("other\n")
    os.chmod(elsewhere / "which", 0o644)
    site.write({"default": REJECT, "transports": {"dir": {str(allowed): ACCEPT_ALL}}})
    proc = _run(mesobox, user, site, str(rootfs))
    assert proc.returncode == 0 and proc.stdout == b"dir\n", proc.stderr
    proc = _run(mesobox, user, site, str(elsewhere))
    assert proc.returncode == 13 and one_error_line(proc.stderr).endswith("default is reject")
    # a symlink into the approved directory from elsewhere is judged by where it leads
    link = world_tmp / "link"
    link.symlink_to(elsewhere)
    assert _run(mesobox, user, site, str(link)).returncode == 13
    # sigstoreSigned cannot hold for a path: no signatures
    site.write({"default": [{"type": "sigstoreSigned", "keyData": base64.b64encode(b"x").decode()}]})
    proc = _run(mesobox, user, site, str(rootfs))
    assert proc.returncode == 13 and "only registry images carry signatures" in one_error_line(proc.stderr)


@pytest.mark.parametrize(("text", "says"), [
    ("{not json", "is not valid JSON"),
    (json.dumps({"transports": {}}), 'no "default"'),
    (json.dumps({"default": [{"type": "acceptIfNice"}]}), "unknown requirement acceptIfNice"),
    (json.dumps({"default": []}), "not a non-empty list"),
    (json.dumps({"default": [{"type": "sigstoreSigned"}]}), "exactly one of keyPath"),
])
def test_a_broken_policy_refuses_everything(mesobox: Mesobox, user: User, site: Site, world_tmp: Path,
                                            text: str, says: str) -> None:
    rootfs = open_busybox_rootfs(world_tmp / "rootfs")
    site.write(text)
    proc = mesobox("exec", str(rootfs), "true", as_user=user, env=site.env)
    assert proc.returncode == 13
    line = one_error_line(proc.stderr)
    assert says in line and "every image is refused" in line


def test_gpg_and_keyless_requirements_say_not_supported(mesobox: Mesobox, pushed: Registry, user: User,
                                                        site: Site) -> None:
    image = f"docker://{pushed.host}/open/img:a"
    site.write({"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/etc/pki/key.gpg"}]})
    proc = mesobox("pull", "-q", image, as_user=user, env=site.env)
    assert proc.returncode == 13 and "GPG signatures (signedBy) are not supported" in one_error_line(proc.stderr)
    site.write({"default": [{"type": "sigstoreSigned", "fulcio": {"caPath": "/x"}}]})
    proc = mesobox("pull", "-q", image, as_user=user, env=site.env)
    assert proc.returncode == 13 and "keyless signatures are not supported" in one_error_line(proc.stderr)


def test_launch_checks_stored_signatures_offline(mesobox: Mesobox, layout: Path, user: User, site: Site,
                                                 world_tmp: Path) -> None:
    """A compute node without the registry: the launch verifies what the pull kept."""
    own = start_registry(world_tmp / "registry")
    try:
        own.push_oci(layout, "a", "lab/img")
        image = f"docker://{own.host}/lab/img:a"
        key, pub = _keys(mesobox, world_tmp, "lab")
        assert mesobox("sign", "--key", str(key), image).returncode == 0
        assert mesobox("pull", "-q", image, as_user=user, env=site.env).returncode == 0
    finally:
        own.process.terminate()
        own.process.wait(timeout=10)
    site.write({"default": [_signed(site.key(pub, "lab.pub"))]})
    proc = _run(mesobox, user, site, image, MESOBOX_PLAN_CACHE="0")
    assert proc.returncode == 0 and proc.stdout == b"a\n", proc.stderr
    # prune keeps the signatures of a stored image, and drops those of a removed one
    store = mesobox.store_root / user.name
    kept = list((store / "signatures").iterdir())
    assert len(kept) == 1
    assert mesobox("prune", as_user=user, env=site.env).returncode == 0
    assert list((store / "signatures").iterdir()) == kept
    shutil.rmtree(mesobox.runtime_root / user.name / "trust")  # type: ignore[operator]
    assert _run(mesobox, user, site, image, MESOBOX_PLAN_CACHE="0").stdout == b"a\n"
    assert mesobox("rm", image, as_user=user, env=site.env).returncode == 0
    assert mesobox("prune", as_user=user, env=site.env).returncode == 0
    assert list((store / "signatures").iterdir()) == []


def test_a_checked_launch_reads_only_what_its_plan_asks(mesobox: Mesobox, pushed: Registry, user: User,
                                                         site: Site, world_tmp: Path) -> None:
    """Under the plan-cache audit (tests/test_plancache_audit.py): the policy, the key and
    the stored signatures are read only after their identities are asked, so a saved plan
    depends on each of them; the verdict cache lives in the runtime dir."""
    from test_plancache_audit import Audit, _none

    class CheckedAudit(Audit):
        def allowed(self, seen: dict[str, Any], path: str) -> bool:
            import cryptography

            # the library's code, imported to verify: what it computes is a function of
            # the files asked (policy, key, signatures), as json's is of the policy
            library = os.path.dirname(os.path.dirname(cryptography.__file__))
            return super().allowed(seen, path) or path.startswith(library + "/")

    key, pub = _keys(mesobox, world_tmp, "audit")
    image = f"docker://{pushed.host}/trust/signed:a"
    assert mesobox("sign", "--key", str(key), image).returncode == 0
    assert mesobox("pull", "-q", image, as_user=user, env=site.env).returncode == 0
    site.write({"default": [_signed(site.key(pub, "audit.pub"))]})
    audit = CheckedAudit(mesobox, user, world_tmp)
    audit.env = dict(site.env)
    _none(audit(image, "true"))  # the verdict checked afresh


def test_archive_pulls_use_their_transport(mesobox: Mesobox, layout: Path, user: User, site: Site) -> None:
    site.write({"default": REJECT, "transports": {"oci": {str(layout): ACCEPT_ALL}}})
    proc = mesobox("pull", "-q", f"oci:{layout}:a", as_user=user, env=site.env)
    assert proc.returncode == 0, proc.stderr
    assert _run(mesobox, user, site, f"oci:{layout}:a").stdout == b"a\n"
    site.write({"default": ACCEPT_ALL, "transports": {"oci": {f"{layout}:a": REJECT}}})
    proc = _run(mesobox, user, site, f"oci:{layout}:a")
    assert proc.returncode == 13
    assert one_error_line(proc.stderr).endswith(f'transports.oci["{layout}:a"] is reject')
    assert mesobox("pull", "-q", f"oci:{layout}:b", as_user=user, env=site.env).returncode == 0
