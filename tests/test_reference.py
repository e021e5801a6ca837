"""Pure unit tests: references, digests, platforms, challenges, credential files, indexes."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mesobox.errors import ConfigError, DigestMismatch, ImageNotFound, InvalidReference, UsageError
from mesobox.image import manifest as mf
from mesobox.image.auth import find_credentials, parse_challenge
from mesobox.image.digest import Verifier, parse_digest, sha256_digest
from mesobox.image.reference import Reference, parse_reference
from mesobox.image.source import host_platform

D = "sha256:" + "ab" * 32

TABLE = [
    ("ubuntu", Reference("docker", "docker.io", "library/ubuntu", "latest")),
    ("ubuntu:24.04", Reference("docker", "docker.io", "library/ubuntu", "24.04")),
    ("docker://ubuntu", Reference("docker", "docker.io", "library/ubuntu", "latest")),
    ("index.docker.io/library/ubuntu", Reference("docker", "docker.io", "library/ubuntu", "latest")),
    ("registry-1.docker.io/foo:1", Reference("docker", "docker.io", "library/foo", "1")),
    ("docker.io/user/app:v1", Reference("docker", "docker.io", "user/app", "v1")),
    ("user/app", Reference("docker", "docker.io", "user/app", "latest")),
    ("ghcr.io/owner/name", Reference("docker", "ghcr.io", "owner/name", "latest")),
    ("ghcr.io/app", Reference("docker", "ghcr.io", "app", "latest")),  # library/ only on docker.io
    ("localhost/app:x", Reference("docker", "localhost", "app", "x")),
    ("127.0.0.1:5000/a/b:tag@" + D, Reference("docker", "127.0.0.1:5000", "a/b", "tag", D)),
    ("host:5000/a/b@" + D, Reference("docker", "host:5000", "a/b", None, D)),
    ("[::1]:5000/a_b/c-d.e__f", Reference("docker", "[::1]:5000", "a_b/c-d.e__f", "latest")),
    ("oci:/x/layout", Reference("oci", path="/x/layout")),
    ("oci:/x/layout:v2", Reference("oci", path="/x/layout", tag="v2")),
    ("oci-archive:/t/img.tar:v1", Reference("oci-archive", path="/t/img.tar", tag="v1")),
    ("docker-archive:/t/d.tar", Reference("docker-archive", path="/t/d.tar")),
    ("docker-archive:/t/d.tar:busybox:1", Reference("docker-archive", path="/t/d.tar", tag="busybox:1")),
    ("docker-archive:/t/d.tar:@1", Reference("docker-archive", path="/t/d.tar", tag="@1")),
]


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_parse_table(text: str, expected: Reference) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert parse_reference(str(ref)) == ref


def test_canonical_strings() -> None:
    assert str(parse_reference("ubuntu:24.04")) == "docker://docker.io/library/ubuntu:24.04"
    assert str(parse_reference("h:5000/a/b@" + D)) == f"docker://h:5000/a/b@{D}"
    assert str(parse_reference("oci:/abs/dir:tag")) == "oci:/abs/dir:tag"


def test_relative_archive_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_reference("oci:lay:v1") == Reference("oci", path=str(tmp_path / "lay"), tag="v1")


BAD = [
    ("", "empty"),
    (" ubuntu", "empty or surrounded"),
    ("Ubuntu", "uppercase"),
    ("ghcr.io/Owner/x", "uppercase"),
    ("ubuntu:bad!tag", "bad tag"),
    ("ubuntu:bad/tag", "bad registry host"),
    ("ubuntu:-x", "bad tag"),
    ("ubuntu:" + "a" * 129, "bad tag"),
    ("ubuntu@sha256:abc", "64 lowercase hex"),
    ("ubuntu@sha256:" + "AB" * 32, "64 lowercase hex"),
    ("ubuntu@md5:" + "a" * 32, "unsupported algorithm"),
    ("ubuntu@sha256:../../../../etc/passwd" + "a" * 44, "64 lowercase hex"),
    ("a//b", "bad repository component"),
    ("a/-b", "bad repository component"),
    ("http://x/y", "unknown transport"),
    ("oci:", "no path"),
    ("oci:/x:bad tag", "bad tag"),
    ("host:port/x", "bad registry host"),
    ("docker://", "no repository"),
]


@pytest.mark.parametrize(("text", "needle"), BAD)
def test_bad_references(text: str, needle: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    assert needle in info.value.message
    assert "\n" not in info.value.message
    assert info.value.exit_code == 2


_component = st.from_regex(r"[a-z0-9]{1,5}(?:[._-][a-z0-9]{1,4}){0,2}", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_host = st.sampled_from(
    ["", "docker.io/", "index.docker.io/", "ghcr.io/", "127.0.0.1:5000/", "localhost/", "reg.example.org:443/"]
)
_digest = st.from_regex(r"[0-9a-f]{64}", fullmatch=True).map(lambda h: "sha256:" + h)


@settings(max_examples=300, deadline=None)
@given(_host, st.lists(_component, min_size=1, max_size=3), st.none() | _tag, st.none() | _digest, st.booleans())
def test_round_trip(host: str, parts: list[str], tag: str | None, digest: str | None, scheme: bool) -> None:
    # without a host, a first component with a '.' (or "localhost") is read as one, as by docker
    assume(host or ("." not in parts[0] and parts[0] != "localhost"))
    text = ("docker://" if scheme else "") + host + "/".join(parts)
    text += f":{tag}" if tag else ""
    text += f"@{digest}" if digest else ""
    ref = parse_reference(text)
    assert parse_reference(str(ref)) == ref
    assert ref.digest == digest
    assert ref.tag == (tag or (None if digest else "latest"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_text_never_crashes(text: str) -> None:
    try:
        ref = parse_reference(text)
    except InvalidReference:
        return
    assert parse_reference(str(ref)) == ref


def test_parse_digest() -> None:
    assert parse_digest(D) == ("sha256", "ab" * 32)
    assert parse_digest("sha512:" + "0" * 128) == ("sha512", "0" * 128)
    for bad in ("sha256", "sha256:", "sha256:" + "g" * 64, "sha256:" + "a" * 63, "sha256:../x", "SHA256:" + "a" * 64):
        with pytest.raises(InvalidReference):
            parse_digest(bad)


def test_verifier() -> None:
    data = b"hello world"
    ok = Verifier(sha256_digest(data), len(data))
    ok.update(data[:5])
    ok.update(data[5:])
    ok.verify()
    short = Verifier(sha256_digest(data), len(data))
    short.update(data[:4])
    with pytest.raises(DigestMismatch, match="expected 11 bytes, got 4"):
        short.verify()
    wrong = Verifier(sha256_digest(data), len(data))
    wrong.update(b"HELLO world")
    with pytest.raises(DigestMismatch, match=f"expected {sha256_digest(data)}, got sha256:"):
        wrong.verify()
    with pytest.raises(DigestMismatch, match="more than"):
        Verifier(sha256_digest(data), 3).update(data)


def test_host_platform_and_parse() -> None:
    assert host_platform().startswith("linux/")
    if os.uname().machine == "x86_64":
        assert host_platform() == "linux/amd64"
    assert mf.parse_platform("linux/arm64/v8") == ("linux", "arm64", "v8")
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(UsageError):
            mf.parse_platform(bad)


def _index(*platforms: dict[str, str]) -> bytes:
    manifests = [
        {"mediaType": mf.OCI_MANIFEST, "digest": "sha256:" + f"{i:x}" * 64, "size": 10 + i, "platform": p}
        for i, p in enumerate(platforms, start=1)
    ]
    return json.dumps({"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": manifests}).encode()


def test_select_from_index() -> None:
    data = _index(
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm", "variant": "v7"},
        {"os": "linux", "architecture": "arm64"},
        {"os": "unknown", "architecture": "unknown"},
    )
    desc, plat = mf.select_from_index(data, "linux/amd64", "x")
    assert (desc.digest, plat) == ("sha256:" + "1" * 64, "linux/amd64")
    assert mf.select_from_index(data, "linux/arm64/v8", "x")[1] == "linux/arm64"  # arm64 means v8
    assert mf.select_from_index(data, "linux/arm/v7", "x")[0].size == 12
    with pytest.raises(ImageNotFound, match="available: linux/amd64, linux/arm/v7, linux/arm64, unknown/unknown"):
        mf.select_from_index(data, "linux/arm/v6", "x")


def test_manifest_parsing_rejects_schema1_and_bad_digests() -> None:
    with pytest.raises(Exception, match="schema1"):
        mf.parse_image_manifest(b"{}", mf.DOCKER_SCHEMA1[0])
    bad = {"schemaVersion": 2, "config": {"digest": "sha256:../../x", "size": 1}, "layers": []}
    with pytest.raises(InvalidReference):
        mf.parse_image_manifest(json.dumps(bad).encode(), mf.OCI_MANIFEST)
    assert mf.media_type_of(json.dumps({"manifests": []}).encode(), None) == mf.OCI_INDEX
    assert (
        mf.media_type_of(b'{"config":{}}', "application/vnd.docker.distribution.manifest.v2+json") == mf.DOCKER_MANIFEST
    )


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "reg", "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})


def _auth_file(path: Path, key: str, user: str, password: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {key: {"auth": auth}}}))
    return path


def test_credentials_precedence(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert find_credentials("reg:5000", "a/b", env) is None
    _auth_file(tmp_path / "home/.docker/config.json", "reg:5000", "docker", "d")
    assert find_credentials("reg:5000", "a/b", env) == ("docker", "d")
    _auth_file(tmp_path / "xdg/mesobox/auth.json", "https://reg:5000", "meso", "m")
    assert find_credentials("reg:5000", "a/b", env) == ("meso", "m")
    env["REGISTRY_AUTH_FILE"] = str(_auth_file(tmp_path / "explicit.json", "reg:5000/a", "exp", "e:with:colons"))
    assert find_credentials("reg:5000", "a/b", env) == ("exp", "e:with:colons")
    assert find_credentials("other", "", env) is None


def test_docker_hub_key_and_bad_file(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    _auth_file(tmp_path / ".docker/config.json", "https://index.docker.io/v1/", "hub", "h")
    assert find_credentials("docker.io", "library/ubuntu", env) == ("hub", "h")
    (tmp_path / ".docker/config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        find_credentials("docker.io", "x", env)


def test_https_unless_loopback_or_insecure() -> None:
    from mesobox.config import Config
    from mesobox.image.registry import RegistrySource

    config = Config(insecure_registries=("lab.internal:5000", "other.lab"))
    base = {
        t: RegistrySource(parse_reference(t), config).base
        for t in (
            "ghcr.io/a",
            "ubuntu",
            "127.0.0.1:5000/a",
            "localhost:1/a",
            "[::1]:5/a",
            "lab.internal:5000/a",
            "127.example.com/a",
        )
    }
    assert base == {
        "ghcr.io/a": "https://ghcr.io",
        "ubuntu": "https://registry-1.docker.io",
        "127.0.0.1:5000/a": "http://127.0.0.1:5000",
        "localhost:1/a": "http://localhost:1",
        "[::1]:5/a": "http://[::1]:5",
        "lab.internal:5000/a": "http://lab.internal:5000",
        "127.example.com/a": "https://127.example.com",
    }
    assert RegistrySource(parse_reference("ghcr.io/a"), config, insecure=True).base == "http://ghcr.io"
    assert RegistrySource(parse_reference("other.lab:81/a"), config).base == "http://other.lab:81"
    assert RegistrySource(parse_reference("lab.internal:81/a"), config).base == "https://lab.internal:81"


# The hand-written grammar (reference.py avoids `re` for start-up time) must agree with
# the regular expressions of distribution/reference (regexp.go).
_RE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_RE_TAG = r"[\w][\w.-]{0,127}"
_RE_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_RE_DOMAIN = rf"(?:{_RE_LABEL}(?:\.{_RE_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet="aZ09._-:[]/é", max_size=12))
def test_grammar_matches_distribution_regexps(text: str) -> None:
    import re

    from mesobox.image import reference as r

    assert r._is_component(text) == bool(re.fullmatch(_RE_COMPONENT, text))
    assert r._is_tag(text) == bool(re.fullmatch(_RE_TAG, text, re.ASCII))
    assert r._is_domain(text) == bool(re.fullmatch(_RE_DOMAIN, text))


def test_reference_is_frozen_and_hashable() -> None:
    ref = parse_reference("ubuntu")
    with pytest.raises(AttributeError):
        ref.tag = "x"  # type: ignore[misc]
    assert {ref, parse_reference("docker.io/library/ubuntu:latest")} == {ref}
    assert ref.replace(tag="24.04") == parse_reference("ubuntu:24.04")
    assert repr(ref).startswith("Reference(transport='docker', registry='docker.io'")
