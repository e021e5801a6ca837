"""`mesobox sbom`, `mesobox scan`, `mesobox diff` and the scan rule of the site policy.

Images are written by the tests (a busybox rootfs plus dpkg status, apk installed db,
dist-info/egg-info, a real sqlite rpmdb made by rpm itself), squashed with mksquashfs,
pulled from an OCI layout made by umoci, and the debootstrap'd Debian 12 image of the MPI
tests; feeds are small OSV directories and zips the tests write.  Hostile cases: image
metadata that is a symlink to a host file, a FIFO, feeds with traversal names, oversized
members and bad JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Mesobox, User, make_oci_image, need_tool, open_busybox_rootfs
from mesobox.config import Config, load_config
from mesobox.errors import ConfigError
from slurm_support import MpiImage, mpi_image  # noqa: F401 (a fixture)

DEBIAN_OS = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n'
STATUS = """\
Package: libc6
Status: install ok installed
Priority: optional
Architecture: amd64
Source: glibc
Version: 2.36-9+deb12u4
Description: GNU C Library: Shared libraries
 Contains the standard libraries that are used by nearly all programs on
 the system.

Package: bsdutils
Status: install ok installed
Architecture: amd64
Source: util-linux (2.38.1-5+deb12u1)
Version: 1:2.38.1-5+deb12u1

Package: oldstuff
Status: deinstall ok config-files
Architecture: amd64
Version: 0.9-1

Package: zlib1g
Status: install ok installed
Architecture: amd64
Source: zlib
Version: 1:1.2.13.dfsg-1
"""
METADATA = "Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: x\n\nName: not-this\n"


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def world_readable(root: Path) -> Path:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), 0o644)
    return root


def debian_image(root: Path, status: str = STATUS) -> Path:
    """A busybox rootfs that says it is Debian 12, with dpkg and Python metadata."""
    open_busybox_rootfs(root)
    write(root, "usr/lib/os-release", DEBIAN_OS)
    os.symlink("../usr/lib/os-release", root / "etc" / "os-release")  # as Debian has it
    write(root, "var/lib/dpkg/status", status)
    write(root, "usr/lib/python3/dist-packages/Foo_Bar.Baz-1.10.dist-info/METADATA",
          METADATA.format(name="Foo_Bar.Baz", version="1.10"))
    write(root, "usr/local/lib/python3.11/site-packages/oldegg-0.5-py3.11.egg-info",
          METADATA.format(name="OldEgg", version="0.5"))
    write(root, "usr/local/lib/python3.11/site-packages/diregg.egg-info/PKG-INFO",
          METADATA.format(name="diregg", version="2.0"))
    return world_readable(root)


def alpine_image(root: Path) -> Path:
    write(root, "etc/os-release", 'NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.18.4\n')
    write(root, "lib/apk/db/installed",
          "C:Q1abc=\nP:libcrypto3\nV:3.1.4-r0\nA:x86_64\no:openssl\n\n"
          "P:musl\nV:1.2.4-r2\nA:x86_64\no:musl\nL:/lib\n\n")
    return world_readable(root)


def osv(ident: str, ecosystem: str, name: str, events: list[dict[str, str]] | None = None,
        versions: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    affected: dict[str, Any] = {"package": {"ecosystem": ecosystem, "name": name}}
    if events is not None:
        affected["ranges"] = [{"type": "ECOSYSTEM", "events": events}]
    if versions is not None:
        affected["versions"] = versions
    return {"id": ident, "modified": "2024-01-01T00:00:00Z", "affected": [affected], **extra}


def feed_dir(top: Path, *records: dict[str, Any]) -> Path:
    top.mkdir(parents=True, exist_ok=True)
    for record in records:
        (top / f"{record['id']}.json").write_text(json.dumps(record))
    os.chmod(top, 0o755)
    return top


def inventory(path: Path) -> Any:
    from mesobox.image.packages import inventory_of

    return inventory_of(str(path))


def scan(path: Path, feed: Path) -> list[dict[str, Any]]:
    from mesobox.image.scan import load_feed, scan_inventory

    findings, _ = scan_inventory(inventory(path), load_feed(str(feed)))
    return findings


def one_line_error(result: subprocess.CompletedProcess[bytes], code: int = 2) -> str:
    err = result.stderr.decode()
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mesobox: error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- reading packages ------------------------------------------------------------------------


def test_dpkg_and_python_packages(world_tmp: Path) -> None:
    inv = inventory(debian_image(world_tmp / "img"))
    assert (inv.os.id, inv.os.version_id) == ("debian", "12")
    got = {(p.kind, p.name): p for p in inv.packages}
    assert ("deb", "oldstuff") not in got  # removed, only its config files left
    assert set(got) == {("deb", "libc6"), ("deb", "bsdutils"), ("deb", "zlib1g"), ("pypi", "foo-bar-baz"),
                        ("pypi", "oldegg"), ("pypi", "diregg")}
    libc = got["deb", "libc6"]
    assert (libc.version, libc.arch, libc.source) == ("2.36-9+deb12u4", "amd64", "glibc")
    assert libc.purl == "pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64&distro=debian-12"
    bsd = got["deb", "bsdutils"]
    assert (bsd.source, bsd.source_version) == ("util-linux", "2.38.1-5+deb12u1")
    assert bsd.purl == "pkg:deb/debian/bsdutils@1:2.38.1-5%2Bdeb12u1?arch=amd64&distro=debian-12"
    assert got["pypi", "foo-bar-baz"].purl == "pkg:pypi/foo-bar-baz@1.10"  # PEP 503 name
    assert got["pypi", "oldegg"].version == "0.5"


def test_apk_packages(world_tmp: Path) -> None:
    inv = inventory(alpine_image(world_tmp / "img"))
    assert [(p.name, p.version, p.source) for p in inv.packages] == [
        ("libcrypto3", "3.1.4-r0", "openssl"), ("musl", "1.2.4-r2", "musl")]
    assert inv.packages[0].purl == "pkg:apk/alpine/libcrypto3@3.1.4-r0?arch=x86_64&distro=alpine-3.18.4"


def rpm_image(root: Path, work: Path) -> Path:
    """A real sqlite rpmdb: a package built by rpmbuild, registered by rpm itself."""
    need_tool("rpm", "rpmbuild")
    spec = write(work, "SPECS/demo.spec", "Name: demo-lib\nVersion: 1.2.3\nRelease: 4.el9\nEpoch: 2\n"
                 "Summary: demo\nLicense: MIT\nBuildArch: noarch\n%description\ndemo\n%files\n")
    subprocess.run(["rpmbuild", "--define", f"_topdir {work}", "-bb", str(spec)], check=True, capture_output=True)
    built = next((work / "RPMS" / "noarch").glob("*.rpm"))
    db = root / "var" / "lib" / "rpm"
    db.mkdir(parents=True)
    rpm = ["rpm", "--define", "_db_backend sqlite", "--dbpath", str(db)]
    subprocess.run([*rpm, "--initdb"], check=True, capture_output=True)
    subprocess.run([*rpm, "-i", "--justdb", "--nodeps", "--noscripts", str(built)], check=True, capture_output=True)
    assert (db / "rpmdb.sqlite").is_file()
    write(root, "etc/os-release", 'NAME="Rocky Linux"\nID="rocky"\nVERSION_ID="9.3"\n')
    return world_readable(root)


def test_rpm_sqlite_database(world_tmp: Path) -> None:
    inv = inventory(rpm_image(world_tmp / "img", world_tmp / "rpmbuild"))
    (pkg,) = inv.packages
    assert (pkg.name, pkg.version, pkg.epoch, pkg.arch, pkg.full_version) == (
        "demo-lib", "1.2.3-4.el9", "2", "noarch", "2:1.2.3-4.el9")
    assert pkg.source == "demo-lib"  # from SOURCERPM demo-lib-1.2.3-4.el9.src.rpm
    assert pkg.purl == "pkg:rpm/rocky/demo-lib@1.2.3-4.el9?arch=noarch&distro=rocky-9.3&epoch=2"


def test_unread_rpm_formats_are_said(world_tmp: Path, mesobox: Mesobox) -> None:
    """A Berkeley DB rpmdb (CentOS 7) is not read: a warning says so, rather than an
    SBOM that silently lists nothing."""
    root = world_tmp / "img"
    write(root, "etc/os-release", 'ID="centos"\nVERSION_ID="7"\n')
    write(root, "var/lib/rpm/Packages", "\0" * 4096)
    result = mesobox("sbom", str(root), "--format", "cyclonedx-json")
    assert result.returncode == 0
    assert b"Berkeley DB" in result.stderr
    assert [c["type"] for c in json.loads(result.stdout)["components"]] == ["operating-system"]


def test_rpm_header_parser_rejects_garbage() -> None:
    from mesobox.image.packages import parse_rpm_header

    for blob in (b"", b"\x00\x00\x00\x01", b"\xff\xff\xff\xff\x00\x00\x00\x10" + b"\0" * 32,
                 b"\x00\x00\x00\x01\x00\x00\x00\x04" + (1000).to_bytes(4, "big") + (6).to_bytes(4, "big")
                 + b"\0" * 8 + b"abcd"):  # a string that never ends
        with pytest.raises(ValueError):
            parse_rpm_header(blob)


def test_squashfs_image_reads_the_same(world_tmp: Path) -> None:
    need_tool("mksquashfs", "unsquashfs")
    root = debian_image(world_tmp / "img")
    sqfs = world_tmp / "img.sqfs"
    subprocess.run(["mksquashfs", str(root), str(sqfs), "-quiet", "-noappend"], check=True, capture_output=True)
    assert inventory(sqfs) == inventory(root)


# --- hostile images ----------------------------------------------------------------------------

LEAK = "Package: leaked-from-host\nStatus: install ok installed\nVersion: 6.6.6\n"


def hostile_images(top: Path) -> dict[str, Path]:
    """Images whose package metadata points out of the image at a host file, a FIFO."""
    secret = write(top, "host/secret-status", LEAK)
    images = {}
    for name, make in {
        "absolute": lambda r: os.symlink(str(secret), r / "var/lib/dpkg/status"),
        "climbing": lambda r: os.symlink("../../../../../../../../" + str(secret).lstrip("/"),
                                         r / "var/lib/dpkg/status"),
        "parent-dir": lambda r: (os.rmdir(r / "var/lib/dpkg"), os.symlink(str(secret.parent), r / "var/lib/dpkg")),
        "fifo": lambda r: os.mkfifo(r / "var/lib/dpkg/status"),
    }.items():
        root = top / name
        (root / "var/lib/dpkg").mkdir(parents=True)
        write(root, "etc/os-release", DEBIAN_OS)
        make(root)
        if name == "parent-dir":
            os.symlink("secret-status", secret.parent / "status")  # host dir/status -> the secret
        images[name] = root
    return images


def test_image_symlinks_never_reach_the_host(world_tmp: Path, mesobox: Mesobox) -> None:
    """As root, which could read any host file: the status links are resolved inside the
    image (where nothing is found) and a FIFO is never opened (no hang)."""
    for name, root in hostile_images(world_tmp).items():
        result = mesobox("sbom", str(root), "--format", "spdx-json", timeout=60)
        assert result.returncode == 0, (name, result.stderr)
        assert b"leaked-from-host" not in result.stdout, name
        names = {p["name"] for p in json.loads(result.stdout)["packages"]}
        assert names == {str(root), "debian"}, (name, names)


def test_image_symlinks_resolve_inside_the_image(world_tmp: Path) -> None:
    """The same absolute link names the image's own file: chroot semantics, not refusal."""
    root = world_tmp / "img"
    write(root, "etc/os-release", DEBIAN_OS)
    write(root, "opt/real/status", STATUS)
    (root / "var/lib/dpkg").mkdir(parents=True)
    os.symlink("/opt/real/status", root / "var/lib/dpkg/status")
    os.symlink("/opt/real/status", root / "opt/loop")  # unused
    assert {p.name for p in inventory(root).packages} == {"libc6", "bsdutils", "zlib1g"}


def test_squashfs_symlinks_stay_inside(world_tmp: Path) -> None:
    need_tool("mksquashfs", "unsquashfs")
    for name, root in hostile_images(world_tmp).items():
        if name == "fifo":
            continue
        sqfs = world_tmp / f"{name}.sqfs"
        subprocess.run(["mksquashfs", str(root), str(sqfs), "-quiet", "-noappend"], check=True, capture_output=True)
        assert inventory(sqfs).packages == (), name


def test_oversized_metadata_is_one_line(world_tmp: Path, mesobox: Mesobox) -> None:
    root = world_tmp / "img"
    write(root, "etc/os-release", DEBIAN_OS)
    status = root / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    with open(status, "wb") as f:
        f.truncate((64 << 20) + 1)  # sparse: costs nothing
    line = one_line_error(mesobox("sbom", str(root), "--format", "cyclonedx-json"), code=6)
    assert "larger than" in line


# --- SBOMs ----------------------------------------------------------------------------------------

SPDX_ID = re.compile(r"^SPDXRef-[A-Za-z0-9.-]+$")
PURL = re.compile(r"^pkg:[a-z][a-z0-9.+-]*/[^@?#]+(@[^?#]+)?(\?[^#]+)?$")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


# From the SPDX 2.3 JSON schema (spdx/spdx-spec, schemas/spdx-schema-2-3.json): the fields
# a document and a package may have (both "additionalProperties": false) and the enums used.
SPDX_DOCUMENT_FIELDS = {"SPDXID", "annotations", "comment", "creationInfo", "dataLicense", "externalDocumentRefs",
                        "hasExtractedLicensingInfos", "name", "revieweds", "spdxVersion", "documentNamespace",
                        "documentDescribes", "packages", "files", "snippets", "relationships"}
SPDX_PACKAGE_FIELDS = {"SPDXID", "annotations", "attributionTexts", "builtDate", "checksums", "comment",
                       "copyrightText", "description", "downloadLocation", "externalRefs", "filesAnalyzed", "hasFiles",
                       "homepage", "licenseComments", "licenseConcluded", "licenseDeclared", "licenseInfoFromFiles",
                       "name", "originator", "packageFileName", "packageVerificationCode", "primaryPackagePurpose",
                       "releaseDate", "sourceInfo", "summary", "supplier", "validUntilDate", "versionInfo"}
SPDX_PURPOSES = {"OTHER", "INSTALL", "ARCHIVE", "FIRMWARE", "APPLICATION", "FRAMEWORK", "LIBRARY", "CONTAINER",
                 "SOURCE", "DEVICE", "OPERATING_SYSTEM", "FILE"}


def check_spdx(doc: dict[str, Any]) -> None:
    """SPDX 2.3's required document and package fields, ids and relationships."""
    assert set(doc) <= SPDX_DOCUMENT_FIELDS
    assert {"SPDXID", "creationInfo", "dataLicense", "name", "spdxVersion"} <= set(doc)
    for p in doc["packages"]:
        assert set(p) <= SPDX_PACKAGE_FIELDS and {"SPDXID", "downloadLocation", "name"} <= set(p)
        assert p.get("primaryPackagePurpose", "OTHER") in SPDX_PURPOSES
        assert all(c["algorithm"] == "SHA256" and set(c) == {"algorithm", "checksumValue"}
                   for c in p.get("checksums", []))
    assert {r["relationshipType"] for r in doc["relationships"]} <= {"DESCRIBES", "CONTAINS"}
    assert doc["spdxVersion"] == "SPDX-2.3" and doc["dataLicense"] == "CC0-1.0"
    assert doc["SPDXID"] == "SPDXRef-DOCUMENT" and doc["name"]
    assert re.match(r"^https?://[^\s#]+$", doc["documentNamespace"])
    assert TIME.match(doc["creationInfo"]["created"]) and doc["creationInfo"]["creators"][0].startswith("Tool: ")
    ids = [p["SPDXID"] for p in doc["packages"]]
    assert len(ids) == len(set(ids)) and all(SPDX_ID.match(i) for i in ids)
    for p in doc["packages"]:
        assert p["name"] and p["downloadLocation"] and "filesAnalyzed" in p
        for ref in p.get("externalRefs", []):
            assert ref["referenceCategory"] == "PACKAGE-MANAGER" and ref["referenceType"] == "purl"
            assert PURL.match(ref["referenceLocator"])
    for rel in doc["relationships"]:
        assert rel["spdxElementId"] in [*ids, "SPDXRef-DOCUMENT"] and rel["relatedSpdxElement"] in ids


def check_cyclonedx(bom: dict[str, Any]) -> None:
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.5" and bom["version"] == 1
    assert re.match(r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", bom["serialNumber"])
    assert TIME.match(bom["metadata"]["timestamp"])
    assert bom["metadata"]["component"]["type"] == "container"
    refs = [c["bom-ref"] for c in bom["components"]]
    assert len(refs) == len(set(refs))
    for c in bom["components"]:
        assert c["type"] in ("library", "application", "operating-system") and c["name"]
        if c["type"] != "operating-system":
            assert PURL.match(c["purl"]) and c["version"]


def test_sbom_formats_as_a_user(world_tmp: Path, mesobox: Mesobox, user: User) -> None:
    root = debian_image(world_tmp / "img")
    spdx = mesobox("sbom", str(root), "--format", "spdx-json", as_user=user)
    assert spdx.returncode == 0, spdx.stderr
    doc = json.loads(spdx.stdout)
    check_spdx(doc)
    purls = {r["referenceLocator"] for p in doc["packages"] for r in p.get("externalRefs", [])}
    assert "pkg:deb/debian/zlib1g@1:1.2.13.dfsg-1?arch=amd64&distro=debian-12" in purls
    assert "pkg:pypi/diregg@2.0" in purls
    assert len(purls) == 6
    os_pkg = next(p for p in doc["packages"] if p.get("primaryPackagePurpose") == "OPERATING_SYSTEM")
    assert (os_pkg["name"], os_pkg["versionInfo"]) == ("debian", "12")

    cdx = mesobox("sbom", str(root), "--format", "cyclonedx-json", as_user=user)
    assert cdx.returncode == 0, cdx.stderr
    bom = json.loads(cdx.stdout)
    check_cyclonedx(bom)
    assert {c["purl"] for c in bom["components"] if "purl" in c} == purls


def test_sbom_is_deterministic(world_tmp: Path, mesobox: Mesobox) -> None:
    root = debian_image(world_tmp / "img")
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    firsts = {}
    for fmt in ("spdx-json", "cyclonedx-json"):
        first = mesobox("sbom", str(root), "--format", fmt, env=env)
        second = mesobox("sbom", str(root), "--format", fmt, env=env)
        assert first.returncode == 0 and first.stdout == second.stdout
        assert b"2023-11-14T22:13:20Z" in first.stdout
        firsts[fmt] = json.loads(first.stdout)
    write(root, "usr/lib/python3/dist-packages/new-1.0.dist-info/METADATA", METADATA.format(name="new", version="1"))
    changed = json.loads(mesobox("sbom", str(root), "--format", "spdx-json", env=env).stdout)
    assert changed["documentNamespace"] != firsts["spdx-json"]["documentNamespace"]
    changed = json.loads(mesobox("sbom", str(root), "--format", "cyclonedx-json", env=env).stdout)
    assert changed["serialNumber"] != firsts["cyclonedx-json"]["serialNumber"]


def test_sbom_of_the_debootstrap_image(mpi_image: MpiImage, mesobox: Mesobox, user: User) -> None:  # noqa: F811
    result = mesobox("sbom", str(mpi_image.squashfs), "--format", "cyclonedx-json", as_user=user)
    assert result.returncode == 0, result.stderr
    bom = json.loads(result.stdout)
    check_cyclonedx(bom)
    listed = subprocess.run(["dpkg-query", f"--admindir={mpi_image.rootfs}/var/lib/dpkg", "-W",
                             "-f", "${db:Status-Abbrev} ${Package}\n"], capture_output=True, text=True, check=True)
    installed = {line.split()[1] for line in listed.stdout.splitlines() if line.startswith("ii")}
    assert {c["name"] for c in bom["components"] if c["type"] != "operating-system"} == installed


# --- severities -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("vector", "score"), [
    ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", 9.8),
    ("CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:C/C:H/I:H/A:H", 9.9),
    ("CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N", 6.1),
    ("CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:N/A:N", 5.5),
    ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H", 7.5),
    ("CVSS:3.0/AV:N/AC:H/PR:N/UI:N/S:U/C:H/I:N/A:N", 5.9),
    ("CVSS:3.1/AV:P/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N", 1.6),
    ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N", 0.0),
])
def test_cvss3_base_score(vector: str, score: float) -> None:
    from mesobox.image.scan import cvss3_base_score

    assert cvss3_base_score(vector) == score


def test_severity_sources() -> None:
    from mesobox.image.scan import severity_of

    assert severity_of({"database_specific": {"severity": "MODERATE"}}, {}) == "MEDIUM"
    assert severity_of({"severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H"}]},
                       {}) == "HIGH"
    assert severity_of({"severity": [{"type": "Ubuntu", "score": "low"}]}, {}) == "LOW"
    assert severity_of({"severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N"}]}, {}) == "UNKNOWN"
    assert severity_of({}, {"ecosystem_specific": {"severity": "critical"}}) == "CRITICAL"


# --- scans ------------------------------------------------------------------------------------------


def test_scan_matches_each_ecosystem_with_its_own_order(world_tmp: Path) -> None:
    root = debian_image(world_tmp / "img")
    feed = feed_dir(
        world_tmp / "feed",
        # Debian advisories name the source package; fixed above what is installed: found
        osv("DSA-1", "Debian:12", "glibc", [{"introduced": "0"}, {"fixed": "2.36-9+deb12u10"}],
            database_specific={"severity": "HIGH"}),
        # fixed in what is installed: 2.36-9+deb12u4 >= 2.36-9+deb12u4
        osv("DSA-2", "Debian:12", "glibc", [{"introduced": "0"}, {"fixed": "2.36-9+deb12u4"}]),
        # fixed below: 2.36-9+deb12u4 > 2.36-9+deb12u3~1 (the ~ rule)
        osv("DSA-3", "Debian:12", "glibc", [{"introduced": "0"}, {"fixed": "2.36-9+deb12u3~1"}]),
        # another release, another distribution: never this image
        osv("DSA-4", "Debian:11", "glibc", [{"introduced": "0"}]),
        osv("ALPINE-1", "Alpine:v3.18", "glibc", [{"introduced": "0"}]),
        # the source version with an epoch-less source: 2.38.1-5+deb12u1 < 2.38.1-5+deb12u2
        osv("DSA-5", "Debian", "util-linux", [{"introduced": "0"}, {"fixed": "2.38.1-5+deb12u2"}]),
        # epoch: installed 1:1.2.13.dfsg-1 is newer than 1.9 despite the text
        osv("DSA-6", "Debian:12", "zlib", [{"introduced": "0"}, {"fixed": "1.9"}]),
        # PyPI: 1.10 is newer than 1.9 (as text it is not); the name normalised
        osv("PYSEC-1", "PyPI", "foo-bar.baz", [{"introduced": "0"}, {"fixed": "1.9"}]),
        osv("PYSEC-2", "PyPI", "Foo_Bar_Baz", [{"introduced": "1.0"}, {"fixed": "1.11"}],
            severity=[{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}]),
        osv("PYSEC-3", "PyPI", "oldegg", [{"introduced": "0.1"}, {"last_affected": "0.5"}]),
        osv("PYSEC-4", "PyPI", "diregg", [{"introduced": "0"}, {"last_affected": "1.9"}]),
        osv("PYSEC-5", "PyPI", "diregg", versions=["1.0", "2.0"]),
        osv("GHSA-withdrawn", "PyPI", "diregg", versions=["2.0"], withdrawn="2024-01-02T00:00:00Z"),
    )
    found = {(f["package"], f["advisory"]): f for f in scan(root, feed)}
    assert set(found) == {("libc6", "DSA-1"), ("bsdutils", "DSA-5"), ("foo-bar-baz", "PYSEC-2"),
                          ("oldegg", "PYSEC-3"), ("diregg", "PYSEC-5")}
    assert found["libc6", "DSA-1"]["fixed"] == "2.36-9+deb12u10"
    assert found["libc6", "DSA-1"]["severity"] == "HIGH"
    assert found["foo-bar-baz", "PYSEC-2"]["severity"] == "CRITICAL"
    assert found["oldegg", "PYSEC-3"]["fixed"] == ""
    assert found["diregg", "PYSEC-5"]["severity"] == "UNKNOWN"


def test_scan_apk_and_rpm(world_tmp: Path) -> None:
    alpine = alpine_image(world_tmp / "alpine")
    feed = feed_dir(world_tmp / "feed-a",
                    osv("ALPINE-1", "Alpine:v3.18", "openssl", [{"introduced": "0"}, {"fixed": "3.1.4-r1"}]),
                    osv("ALPINE-2", "Alpine:v3.18", "openssl", [{"introduced": "0"}, {"fixed": "3.1.4_rc1-r0"}]),
                    osv("ALPINE-3", "Alpine:v3.17", "musl", [{"introduced": "0"}]),
                    osv("ALPINE-4", "Alpine:v3.18", "musl", [{"introduced": "0"}, {"fixed": "1.2.4_p1-r0"}]))
    assert {(f["package"], f["advisory"]) for f in scan(alpine, feed)} == {
        ("libcrypto3", "ALPINE-1"), ("musl", "ALPINE-4")}

    rocky = rpm_image(world_tmp / "rocky", world_tmp / "rpmbuild")
    feed = feed_dir(world_tmp / "feed-r",
                    osv("RLSA-1", "Rocky Linux:9", "demo-lib", [{"introduced": "0"}, {"fixed": "2:1.2.3-10.el9"}]),
                    # 2:1.2.3 > 1:9.9 by the epoch
                    osv("RLSA-2", "Rocky Linux:9", "demo-lib", [{"introduced": "0"}, {"fixed": "1:9.9-1.el9"}]),
                    osv("RLSA-3", "Rocky Linux:8", "demo-lib", [{"introduced": "0"}]))
    assert [(f["advisory"], f["installed"], f["fixed"]) for f in scan(rocky, feed)] == [
        ("RLSA-1", "2:1.2.3-4.el9", "2:1.2.3-10.el9")]


def test_scan_cli_table_json_and_fail_on(world_tmp: Path, mesobox: Mesobox, user: User) -> None:
    root = debian_image(world_tmp / "img")
    feed = feed_dir(world_tmp / "feed",
                    osv("DSA-1", "Debian:12", "glibc", [{"introduced": "0"}, {"fixed": "2.36-9+deb12u10"}],
                        database_specific={"severity": "medium"}))
    table = mesobox("scan", str(root), "--db", str(feed), as_user=user)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.decode().splitlines()
    assert lines[0].split() == ["PACKAGE", "INSTALLED", "FIXED", "ADVISORY", "SEVERITY"]
    assert lines[1].split() == ["libc6", "2.36-9+deb12u4", "2.36-9+deb12u10", "DSA-1", "MEDIUM"]
    assert "highest: MEDIUM" in lines[-1]
    report = json.loads(mesobox("scan", str(root), "--db", str(feed), "--json", as_user=user).stdout)
    assert report["highest"] == "MEDIUM" and report["os"]["id"] == "debian" and report["packages"] == 6
    assert [f["advisory"] for f in report["findings"]] == ["DSA-1"]
    assert report["recorded"] is None  # a path, not a stored image: nothing to record it for
    assert mesobox("scan", str(root), "--db", str(feed), "--fail-on", "MEDIUM", as_user=user).returncode == 1
    assert mesobox("scan", str(root), "--db", str(feed), "--fail-on", "UNKNOWN", as_user=user).returncode == 1
    assert mesobox("scan", str(root), "--db", str(feed), "--fail-on", "HIGH", as_user=user).returncode == 0
    assert "--fail-on" in one_line_error(mesobox("scan", str(root), "--db", str(feed), "--fail-on", "SEVERE"))


def test_scan_of_the_debootstrap_image(mpi_image: MpiImage, world_tmp: Path, mesobox: Mesobox,  # noqa: F811
                                       user: User) -> None:
    """The real Debian 12 rootfs and its squashfs: libc6's source glibc, whose version is
    2.36-something.  Fixed in a higher version: found; in a lower one: not."""
    feed = feed_dir(world_tmp / "feed",
                    osv("DEBIAN-CVE-HIGHER", "Debian:12", "glibc", [{"introduced": "0"}, {"fixed": "2.99-1"}],
                        database_specific={"severity": "CRITICAL"}),
                    osv("DEBIAN-CVE-LOWER", "Debian:12", "glibc", [{"introduced": "0"}, {"fixed": "2.30-1"}]),
                    osv("DEBIAN-CVE-OTHER", "Debian:11", "glibc", [{"introduced": "0"}]))
    for image in (mpi_image.rootfs, mpi_image.squashfs):
        result = mesobox("scan", str(image), "--db", str(feed), "--json", "--fail-on", "CRITICAL", as_user=user)
        assert result.returncode == 1, result.stderr
        report = json.loads(result.stdout)
        assert {f["advisory"] for f in report["findings"]} == {"DEBIAN-CVE-HIGHER"}
        assert "libc6" in {f["package"] for f in report["findings"]}
        assert all(f["source"] == "glibc" for f in report["findings"])


# --- hostile feeds ----------------------------------------------------------------------------------


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    os.chmod(path, 0o644)
    return path


def test_zip_feed(world_tmp: Path) -> None:
    root = debian_image(world_tmp / "img")
    record = osv("DSA-1", "Debian:12", "glibc", [{"introduced": "0"}, {"fixed": "2.99"}])
    feed = make_zip(world_tmp / "all.zip", {"DSA-1.json": json.dumps(record).encode(), "README": b"not a record"})
    assert [(f["package"], f["advisory"]) for f in scan(root, feed)] == [("libc6", "DSA-1")]


@pytest.mark.parametrize("case", ["traversal", "absolute", "oversized", "bad-json", "not-osv", "not-a-zip"])
def test_bad_feeds_are_one_line(case: str, world_tmp: Path, mesobox: Mesobox, user: User) -> None:
    root = debian_image(world_tmp / "img")
    good = json.dumps(osv("DSA-1", "Debian:12", "glibc", [{"introduced": "0"}])).encode()
    makers: dict[str, Callable[[], Path]] = {
        "traversal": lambda: make_zip(world_tmp / "f.zip", {"ok.json": good, "../../escape.json": good}),
        "absolute": lambda: make_zip(world_tmp / "f.zip", {"/etc/cron.d/x.json": good}),
        # 9 MiB of zeros: a few kB compressed, past the 8 MiB cap inflated
        "oversized": lambda: make_zip(world_tmp / "f.zip", {"big.json": b" " * (9 << 20)}),
        "bad-json": lambda: write(world_tmp, "fd/broken.json", '{"id": "X", "affected": [').parent,
        "not-osv": lambda: make_zip(world_tmp / "f.zip", {"x.json": b'{"affected": "everything"}'}),
        "not-a-zip": lambda: write(world_tmp, "f.zip", "PK but not really"),
    }
    feed = makers[case]()
    os.chmod(feed, 0o755 if feed.is_dir() else 0o644)
    line = one_line_error(mesobox("scan", str(root), "--db", str(feed), as_user=user))
    assert "bad vulnerability feed" in line
    assert not (world_tmp / "escape.json").exists()
    if case == "traversal":
        assert "../../escape.json" in line
    if case == "bad-json":
        assert "broken.json" in line


def test_feed_directory_symlinks_are_not_followed(world_tmp: Path) -> None:
    root = debian_image(world_tmp / "img")
    outside = write(world_tmp, "elsewhere/DSA-9.json",
                    json.dumps(osv("DSA-9", "Debian:12", "glibc", [{"introduced": "0"}])))
    feed = feed_dir(world_tmp / "feed")
    os.symlink(outside, feed / "DSA-9.json")
    assert scan(root, feed) == []


# --- the scan record and the site rule ----------------------------------------------------------------


def stored_debian_image(world_tmp: Path, mesobox: Mesobox, user: User) -> str:
    def layer(rootfs: Path) -> None:
        write(rootfs, "etc/os-release", DEBIAN_OS)
        write(rootfs, "var/lib/dpkg/status", STATUS)

    layout = make_oci_image(world_tmp / "layout", "v1", [layer])
    world_readable(layout)
    pulled = mesobox("pull", "-q", "--format", "dir", f"oci:{layout}:v1", as_user=user)
    assert pulled.returncode == 0, pulled.stderr
    return pulled.stdout.decode().strip().splitlines()[-1]


def test_scan_is_recorded_and_the_site_rule_refuses(world_tmp: Path, mesobox: Mesobox, user: User) -> None:
    from mesobox.image.scan import scan_refusal

    digest = stored_debian_image(world_tmp, mesobox, user)
    reference = f"oci:{world_tmp / 'layout'}:v1"
    store = mesobox.store_root / user.name
    high = feed_dir(world_tmp / "high", osv("DSA-1", "Debian:12", "glibc", [{"introduced": "0"}],
                                            database_specific={"severity": "HIGH"}))
    low = feed_dir(world_tmp / "low", osv("DSA-2", "Debian:12", "glibc", [{"introduced": "0"}],
                                          database_specific={"severity": "LOW"}))
    site = Config(store=str(store), refuse_scan_severity="HIGH")
    assert scan_refusal(site, digest) is None  # never scanned: nothing known against it

    # a stored image's SBOMs name it by its manifest digest
    doc = json.loads(mesobox("sbom", reference, "--format", "spdx-json", as_user=user).stdout)
    check_spdx(doc)
    image_pkg = next(p for p in doc["packages"] if p["SPDXID"] == "SPDXRef-Image")
    assert image_pkg["versionInfo"] == digest and image_pkg["checksums"][0]["checksumValue"] == digest[7:]
    bom = json.loads(mesobox("sbom", reference, "--format", "cyclonedx-json", as_user=user).stdout)
    check_cyclonedx(bom)
    assert bom["metadata"]["component"]["version"] == digest

    report = json.loads(mesobox("scan", reference, "--db", str(high), "--json", as_user=user).stdout)
    assert report["image"]["digest"] == digest and report["highest"] == "HIGH"
    record = json.loads(Path(report["recorded"]).read_text())
    assert record["highest"] == "HIGH" and record["digest"] == digest
    assert record["feed"]["records"] == 1 and record["feed"]["digest"].startswith("sha256:")
    refusal = scan_refusal(site, digest)
    assert refusal is not None and "refuse_scan_severity=HIGH" in refusal and "HIGH" in refusal
    assert scan_refusal(Config(store=str(store)), digest) is None  # no rule
    assert scan_refusal(Config(store=str(store), refuse_scan_severity="CRITICAL"), digest) is None

    # the last scan counts: a newer feed without the HIGH finding clears the image
    assert mesobox("scan", reference, "--db", str(low), as_user=user).returncode == 0
    assert scan_refusal(site, digest) is None
    assert scan_refusal(Config(store=str(store), refuse_scan_severity="LOW"), digest) is not None

    # a site store's record counts too, whatever the user's own store says
    site_store = world_tmp / "site-store"
    (site_store / "scans").mkdir(parents=True)
    (site_store / "scans" / (digest.split(":")[1] + ".json")).write_text(json.dumps({"highest": "CRITICAL"}))
    assert scan_refusal(Config(store=str(store), ro_stores=(str(site_store),), refuse_scan_severity="HIGH"),
                        digest) is not None


def test_the_site_rule_refuses_launches_even_from_a_saved_plan(world_tmp: Path, mesobox: Mesobox,
                                                               user: User) -> None:
    """refuse_scan_severity at launch (launch/specbuild.find_image), as an ordinary user.
    The image has no /bin/true: exit 127 shows a launch got past the rule."""
    stored_debian_image(world_tmp, mesobox, user)
    reference = f"oci:{world_tmp / 'layout'}:v1"
    site = write(world_tmp, "site.toml", 'refuse_scan_severity = "HIGH"\n')
    os.chmod(site, 0o644)
    env = {"MESOBOX_SITE_CONFIG": str(site)}
    high = feed_dir(world_tmp / "high", osv("DSA-1", "Debian:12", "glibc", [{"introduced": "0"}],
                                            database_specific={"severity": "HIGH"}))
    low = feed_dir(world_tmp / "low", osv("DSA-2", "Debian:12", "glibc", [{"introduced": "0"}],
                                          database_specific={"severity": "LOW"}))
    world_readable(world_tmp / "high")
    world_readable(world_tmp / "low")

    def launch() -> subprocess.CompletedProcess[bytes]:
        return mesobox("exec", reference, "/bin/true", as_user=user, env=env)

    assert launch().returncode == 127  # never scanned: nothing known against it; the plan is saved
    assert mesobox("scan", reference, "--db", str(high), as_user=user, env=env).returncode == 0
    refused = launch()
    lines = refused.stderr.decode().splitlines()
    assert refused.returncode not in (0, 127) and lines[0].startswith("mesobox: error:"), lines
    assert "HIGH" in lines[0] and "Traceback" not in refused.stderr.decode()
    assert mesobox("scan", reference, "--db", str(low), as_user=user, env=env).returncode == 0
    assert launch().returncode == 127


def test_refuse_scan_severity_is_site_only(world_tmp: Path) -> None:
    site = write(world_tmp, "site.toml", 'refuse_scan_severity = "high"\n')
    user_cfg = world_tmp / "xdg"
    env = {"MESOBOX_SITE_CONFIG": str(site), "XDG_CONFIG_HOME": str(user_cfg), "HOME": str(world_tmp),
           "XDG_RUNTIME_DIR": str(world_tmp / "nort")}
    assert load_config(env).refuse_scan_severity == "HIGH"
    with pytest.raises(ConfigError):
        load_config({**env, "MESOBOX_REFUSE_SCAN_SEVERITY": ""})
    write(user_cfg, "mesobox/mesobox.toml", 'refuse_scan_severity = ""\n')
    with pytest.raises(ConfigError):
        load_config(env)
    write(world_tmp, "site.toml", 'refuse_scan_severity = "severe"\n')
    with pytest.raises(ConfigError):
        load_config({**env, "XDG_CONFIG_HOME": str(world_tmp / "none")})


# --- diff ---------------------------------------------------------------------------------------------


def test_diff(world_tmp: Path, mesobox: Mesobox, user: User) -> None:
    old = debian_image(world_tmp / "old", STATUS.replace("2.36-9+deb12u4", "2.36-9+deb12u1"))
    new_status = (STATUS.replace("Version: 1:1.2.13.dfsg-1", "Version: 1:1.2.11.dfsg-4")
                  .replace("Package: bsdutils", "Package: hello")
                  .replace("Source: util-linux (2.38.1-5+deb12u1)\n", ""))
    new = debian_image(world_tmp / "new", new_status)
    feed = feed_dir(world_tmp / "feed",
                    osv("DSA-1", "Debian:12", "glibc", [{"introduced": "0"}, {"fixed": "2.36-9+deb12u3"}],
                        database_specific={"severity": "HIGH"}),
                    osv("DSA-2", "Debian:12", "zlib", [{"introduced": "1:1.2.11"}, {"fixed": "1:1.2.12"}]))
    result = mesobox("diff", str(old), str(new), "--db", str(feed), "--json", as_user=user)
    assert result.returncode == 0, result.stderr
    diff = json.loads(result.stdout)
    assert [(c["package"], c["from"], c["to"]) for c in diff["upgraded"]] == [
        ("libc6", "2.36-9+deb12u1", "2.36-9+deb12u4")]
    assert [(c["package"], c["from"], c["to"]) for c in diff["downgraded"]] == [
        ("zlib1g", "1:1.2.13.dfsg-1", "1:1.2.11.dfsg-4")]
    assert [c["package"] for c in diff["added"]] == ["hello"]
    assert [c["package"] for c in diff["removed"]] == ["bsdutils"]
    assert [(f["package"], f["advisory"]) for f in diff["fixed_advisories"]] == [("libc6", "DSA-1")]
    assert [(f["package"], f["advisory"]) for f in diff["new_advisories"]] == [("zlib1g", "DSA-2")]

    table = mesobox("diff", str(old), str(new), "--db", str(feed), as_user=user).stdout.decode()
    assert re.search(r"^upgraded\s+libc6\s+deb\s+2\.36-9\+deb12u1\s+2\.36-9\+deb12u4$", table, re.M)
    assert "advisories fixed by the change" in table and "DSA-1" in table
    same = mesobox("diff", str(old), str(old), as_user=user)
    assert same.stdout == b"no package changed\n"
