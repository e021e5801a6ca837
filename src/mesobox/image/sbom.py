"""Software bills of materials of an image: SPDX 2.3 and CycloneDX 1.5, as JSON (room: image).

The packages are those image/packages.py reads from the image's own databases; each
carries its purl, which is how other tools (scanners, dependency trackers) match it.
The output is deterministic for one image: packages in a stable order, identifiers
derived from their content (SPDX ids, the document namespace, the CycloneDX serial
number), so two SBOMs of the same image differ only in their creation time, and not
even there when ``SOURCE_DATE_EPOCH`` is set (reproducible-builds.org's convention).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mesobox.image.packages import Inventory, Package

FORMATS = ("spdx-json", "cyclonedx-json")
# uuid5 namespace of mesobox's SBOM identifiers (a random, fixed value)
_NAMESPACE = uuid.UUID("6f1c1f8e-2b53-4a4e-9a57-6a3f9b4f0c21")


@dataclass(frozen=True)
class ImageInfo:
    """The image an SBOM or scan is about."""

    name: str  # the reference or path the user gave
    digest: str = ""  # manifest digest of a stored image ("" for a path)
    path: str = ""  # the rootfs directory or squashfs file read


def timestamp(env: dict[str, str] | None = None) -> str:
    """Now, or ``SOURCE_DATE_EPOCH`` when it is set, as RFC 3339 UTC seconds."""
    env = dict(os.environ) if env is None else env
    text = env.get("SOURCE_DATE_EPOCH", "").strip()
    seconds = int(text) if text.isdigit() else int(time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _tool_version() -> str:
    from mesobox import __version__

    return __version__


def _fingerprint(image: ImageInfo, inventory: Inventory) -> str:
    """A digest of what the SBOM says, for identifiers that are stable per image."""
    h = hashlib.sha256()
    h.update(f"{image.name}\0{image.digest}\0{inventory.os}\0".encode())
    for p in inventory.packages:
        h.update(f"{p.purl}\0{p.location}\0".encode())
    return h.hexdigest()


def _spdx_id(package: Package) -> str:
    """SPDXRef-…: letters, digits, '.' and '-' only; a digest suffix keeps it unique."""
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in ".-") else "-" for ch in package.name)
    tail = hashlib.sha256(f"{package.purl}\0{package.location}".encode()).hexdigest()[:12]
    return f"SPDXRef-Package-{package.kind}-{safe}-{tail}"


def spdx(image: ImageInfo, inventory: Inventory, created: str) -> dict[str, Any]:
    """An SPDX 2.3 JSON document: the image is the described package, and CONTAINS each
    installed package (and the OS, as an OPERATING_SYSTEM package: the JSON schema's
    spelling of the purpose; the tag-value format writes OPERATING-SYSTEM)."""
    fp = _fingerprint(image, inventory)
    root_id = "SPDXRef-Image"
    root: dict[str, Any] = {
        "name": image.name,
        "SPDXID": root_id,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "primaryPackagePurpose": "CONTAINER",
    }
    if image.digest:
        root["versionInfo"] = image.digest
        root["checksums"] = [{"algorithm": "SHA256", "checksumValue": image.digest.removeprefix("sha256:")}]
    packages = [root]
    relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                      "relatedSpdxElement": root_id}]
    if inventory.os.id:
        packages.append({
            "name": inventory.os.id,
            "SPDXID": "SPDXRef-OperatingSystem",
            "versionInfo": inventory.os.version_id or "NOASSERTION",
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "primaryPackagePurpose": "OPERATING_SYSTEM",
            "description": inventory.os.name,
        })
        relationships.append({"spdxElementId": root_id, "relationshipType": "CONTAINS",
                              "relatedSpdxElement": "SPDXRef-OperatingSystem"})
    seen: set[str] = set()
    for p in inventory.packages:
        spdx_id = _spdx_id(p)
        if spdx_id in seen:  # the same package listed twice at the same place
            continue
        seen.add(spdx_id)
        entry: dict[str, Any] = {
            "name": p.name,
            "SPDXID": spdx_id,
            "versionInfo": p.full_version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "primaryPackagePurpose": "LIBRARY" if p.kind == "pypi" else "APPLICATION",
            "sourceInfo": f"installed, listed in {p.location}",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": p.purl}],
        }
        packages.append(entry)
        relationships.append({"spdxElementId": root_id, "relationshipType": "CONTAINS",
                              "relatedSpdxElement": spdx_id})
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": image.name,
        "documentNamespace": f"https://mesobox.invalid/spdx/{uuid.uuid5(_NAMESPACE, fp)}",
        "creationInfo": {"created": created, "creators": [f"Tool: mesobox-{_tool_version()}"]},
        "documentDescribes": [root_id],
        "packages": packages,
        "relationships": relationships,
    }


def cyclonedx(image: ImageInfo, inventory: Inventory, created: str) -> dict[str, Any]:
    """A CycloneDX 1.5 JSON BOM: the image is ``metadata.component`` (a container), each
    package a component with its purl, the OS an operating-system component."""
    fp = _fingerprint(image, inventory)
    image_component: dict[str, Any] = {"type": "container", "bom-ref": "image", "name": image.name}
    if image.digest:
        image_component["version"] = image.digest
        image_component["hashes"] = [{"alg": "SHA-256", "content": image.digest.removeprefix("sha256:")}]
    components: list[dict[str, Any]] = []
    if inventory.os.id:
        components.append({"type": "operating-system", "bom-ref": "os", "name": inventory.os.id,
                           "version": inventory.os.version_id, "description": inventory.os.name})
    refs: set[str] = set()
    for p in inventory.packages:
        ref = p.purl
        n = 1
        while ref in refs:  # bom-refs are unique in a BOM: a second copy elsewhere gets a suffix
            n += 1
            ref = f"{p.purl}#{n}"
        refs.add(ref)
        component: dict[str, Any] = {
            "type": "library" if p.kind == "pypi" else "application",
            "bom-ref": ref,
            "name": p.name,
            "version": p.full_version,
            "purl": p.purl,
            "properties": [{"name": "mesobox:location", "value": p.location}],
        }
        components.append(component)
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid5(_NAMESPACE, fp)}",
        "version": 1,
        "metadata": {
            "timestamp": created,
            "tools": {"components": [{"type": "application", "name": "mesobox", "version": _tool_version()}]},
            "component": image_component,
        },
        "components": components,
    }


def make_sbom(fmt: str, image: ImageInfo, inventory: Inventory, created: str | None = None) -> dict[str, Any]:
    created = created or timestamp()
    return spdx(image, inventory, created) if fmt == "spdx-json" else cyclonedx(image, inventory, created)
