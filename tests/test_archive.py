"""Archive sources: oci: layouts, oci-archive: and docker-archive: tars made by skopeo."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from mesobox.config import Config
from mesobox.errors import DigestMismatch, ImageNotFound, UsageError
from mesobox.image.reference import parse_reference
from mesobox.image.source import ImageSource
from mesobox.image.transports import open_source
from registry_support import fetch_all, images, raw_digest, skopeo, tagged  # noqa: F401 - fixture


def open_ref(text: str) -> ImageSource:
    return open_source(parse_reference(text), Config())


@pytest.fixture(scope="module")
def archives(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    top = tmp_path_factory.mktemp("archives")
    skopeo("copy", "-q", f"oci:{images}:v1", f"oci-archive:{top}/oci.tar:v1")
    skopeo("copy", "-q", f"oci:{images}:v1", f"docker-archive:{top}/docker.tar:mesobox/test:v1")
    return top


def test_oci_layout_by_tag(images: Path, tmp_path: Path) -> None:  # noqa: F811
    src = open_ref(f"oci:{images}:v1")
    resolved = src.resolve(None)
    assert resolved.manifest_digest == tagged(images, "v1")["digest"] == raw_digest(f"oci:{images}:v1")
    assert len(resolved.layers) == 2 and resolved.platform == "linux/amd64"
    assert str(resolved.reference) == f"oci:{images}:v1"
    fetch_all(src, resolved, tmp_path)


def test_oci_layout_platforms(images: Path) -> None:  # noqa: F811
    src = open_ref(f"oci:{images}:multi")
    arm = src.resolve("linux/arm64")
    assert arm.manifest_digest == tagged(images, "arm64")["digest"]
    assert arm.index_digest == tagged(images, "multi")["digest"]
    assert src.resolve(None).manifest_digest == tagged(images, "amd64")["digest"]
    with pytest.raises(ImageNotFound, match="available: linux/amd64, linux/arm64"):
        src.resolve("linux/ppc64le")
    with pytest.raises(ImageNotFound, match="is for platform linux/arm64, not linux/amd64"):
        open_ref(f"oci:{images}:arm64").resolve("linux/amd64")


def test_oci_layout_default_and_unknown_tag(images: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ImageNotFound, match="tags: v1, amd64, arm64, multi"):
        open_ref(f"oci:{images}").resolve(None)  # several images, none named "latest"
    with pytest.raises(ImageNotFound, match="no such image in the layout"):
        open_ref(f"oci:{images}:nope").resolve(None)
    single = tmp_path / "single"
    skopeo("copy", "-q", f"oci:{images}:amd64", f"oci:{single}:only")
    assert open_ref(f"oci:{single}").resolve(None).manifest_digest == tagged(images, "amd64")["digest"]
    with pytest.raises(ImageNotFound, match="no OCI layout directory"):
        open_ref(f"oci:{tmp_path}/absent").resolve(None)


def test_oci_layout_tampered_blob(images: Path, tmp_path: Path) -> None:  # noqa: F811
    copy = tmp_path / "copy"
    shutil.copytree(images, copy)
    src = open_ref(f"oci:{copy}:v1")
    resolved = src.resolve(None)
    layer = resolved.layers[0]
    blob = copy / "blobs/sha256" / layer.digest[7:]
    data = bytearray(blob.read_bytes())
    data[10] ^= 1
    blob.write_bytes(bytes(data))
    dest = tmp_path / "out"
    with pytest.raises(DigestMismatch, match=f"expected {layer.digest}"):
        src.fetch_blob(layer, dest)
    assert not dest.exists()


def test_oci_archive(archives: Path, images: Path, tmp_path: Path) -> None:  # noqa: F811
    src = open_ref(f"oci-archive:{archives}/oci.tar:v1")
    resolved = src.resolve(None)
    assert resolved.manifest_digest == raw_digest(f"oci-archive:{archives}/oci.tar:v1")
    assert resolved.manifest_digest == tagged(images, "v1")["digest"]
    fetch_all(src, resolved, tmp_path)
    with pytest.raises(ImageNotFound, match="tags: v1"):
        open_ref(f"oci-archive:{archives}/oci.tar:v2").resolve(None)


def test_docker_archive(archives: Path, images: Path, tmp_path: Path) -> None:  # noqa: F811
    tar = archives / "docker.tar"
    skopeo_manifest = json.loads(skopeo("inspect", "--raw", f"docker-archive:{tar}"))
    for ref in (f"docker-archive:{tar}", f"docker-archive:{tar}:mesobox/test:v1", f"docker-archive:{tar}:@0"):
        src = open_ref(ref)
        resolved = src.resolve(None)
        # same synthetic descriptors as skopeo's: sha256 of the config and of each layer tar
        assert resolved.config.digest == skopeo_manifest["config"]["digest"]
        assert [d.digest for d in resolved.layers] == [d["digest"] for d in skopeo_manifest["layers"]]
        assert [d.size for d in resolved.layers] == [d["size"] for d in skopeo_manifest["layers"]]
        assert resolved.media_type == "application/vnd.docker.distribution.manifest.v2+json"
        assert {d.media_type for d in resolved.layers} == {"application/vnd.docker.image.rootfs.diff.tar"}
        assert resolved.manifest_digest == "sha256:" + hashlib.sha256(resolved.manifest).hexdigest()
        assert resolved.platform == "linux/amd64"
    paths = list(fetch_all(src, resolved, tmp_path).values())
    with tarfile.open(paths[1]) as layer:
        assert "etc/hello" in layer.getnames()
    with pytest.raises(ImageNotFound, match=r"it holds: docker\.io/mesobox/test:v1"):
        open_ref(f"docker-archive:{tar}:other:v1").resolve(None)


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def test_hostile_archives(tmp_path: Path) -> None:
    link = tarfile.TarInfo("index.json")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
    _tar(tmp_path / "escape.tar", [(link, b"")])
    with pytest.raises(ImageNotFound, match="not a regular file inside the archive"):
        open_ref(f"oci-archive:{tmp_path}/escape.tar").resolve(None)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "a" * 64, "size": 3}
        ],
    }
    _tar(
        tmp_path / "missing.tar",
        [
            (tarfile.TarInfo("index.json"), json.dumps(index).encode()),
            (tarfile.TarInfo("../blobs/sha256/" + "a" * 64), b"abc"),
        ],
    )
    with pytest.raises(ImageNotFound, match="missing from the archive"):
        open_ref(f"oci-archive:{tmp_path}/missing.tar").resolve(None)
    index["manifests"][0]["digest"] = "sha256:../../../etc/passwd"  # type: ignore[index]
    _tar(tmp_path / "baddigest.tar", [(tarfile.TarInfo("index.json"), json.dumps(index).encode())])
    with pytest.raises(UsageError, match="bad digest"):
        open_ref(f"oci-archive:{tmp_path}/baddigest.tar").resolve(None)
    (tmp_path / "plain.tar").write_bytes(b"\x1f\x8b" + b"\0" * 100)
    with pytest.raises(UsageError, match="is compressed"):
        open_ref(f"oci-archive:{tmp_path}/plain.tar").resolve(None)
    with pytest.raises(ImageNotFound, match="no archive at"):
        open_ref(f"docker-archive:{tmp_path}/absent.tar").resolve(None)


def test_user_reads_docker_archive(
    user: Any, mesobox_src: Path, test_python: str, archives: Path, world_tmp: Path
) -> None:
    """The rootless path: an ordinary user resolves a docker-archive and fetches its config."""
    tar = world_tmp / "docker.tar"
    shutil.copy(archives / "docker.tar", tar)
    tar.chmod(0o644)
    code = (
        "from pathlib import Path; from mesobox.config import Config;"
        "from mesobox.image.reference import parse_reference; from mesobox.image.transports import open_source;"
        f"s = open_source(parse_reference('docker-archive:{tar}'), Config());"
        f"r = s.resolve(None); s.fetch_blob(r.config, Path('{world_tmp}/config.json')); print(r.config.digest)"
    )
    result = user.run([test_python, "-c", code], env={"PYTHONPATH": str(mesobox_src)})
    assert result.returncode == 0, result.stderr
    manifest = json.loads(skopeo("inspect", "--raw", f"docker-archive:{tar}"))
    assert result.stdout.decode().strip() == manifest["config"]["digest"]
    assert (world_tmp / "config.json").stat().st_uid == user.uid
