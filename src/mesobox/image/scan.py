"""Offline vulnerability scan and package diff of images against an OSV feed (room: image).

**The feed** is a directory (searched recursively) or a zip of OSV JSON records
(ossf.github.io/osv-schema), as a site mirrors them, e.g. the per-ecosystem ``all.zip``
files.  It is hostile input: every record is read whole into memory under a size cap
(zip members are never extracted; a member whose name is absolute or has a ``..``
component, that is larger than the cap or that inflates past it is refused), symlinks
in a feed directory are not followed, and anything that is not an OSV record (bad JSON,
wrong types) is one error line that names the file.  Withdrawn records are skipped.

**Matching.** An ``affected[]`` entry applies to a package when its ecosystem names the
image's OS and release and its name is the package's:

- ``Debian:12`` (or ``Debian``), ``Ubuntu:22.04[:…]``: dpkg packages by *source*
  package name and source version (Debian's advisories are per source package);
- ``Alpine:v3.18``: apk packages by origin;
- ``Rocky Linux:9``, ``AlmaLinux:9``, ``Red Hat:…:9…``, ``openSUSE…``, ``SUSE…``,
  ``Mageia:…``, ``Photon OS:…``: rpm packages by binary or source rpm name, version
  ``EPOCH:VERSION-RELEASE``;
- ``PyPI``: Python distributions by their PEP 503 name.

The package is affected when its version is listed in ``versions`` or falls inside an
``ECOSYSTEM`` (or ``SEMVER``) range: the range's events sorted in the ecosystem's own
order (image/versions.py), the last ``introduced``/``fixed``/``last_affected`` event at
or below the version decides.  ``GIT`` ranges name commits, not releases: ignored.

**Severity**: the record's ``database_specific.severity`` (or the affected entry's),
else the CVSS 3.x base score computed from a ``CVSS_V3`` vector (FIRST's formula,
bands: 0.1 to 3.9 LOW, 4.0 to 6.9 MEDIUM, 7.0 to 8.9 HIGH, 9.0 to 10 CRITICAL), else UNKNOWN.
Levels order UNKNOWN < LOW < MEDIUM < HIGH < CRITICAL.

**The scan's summary** (highest severity, findings, feed identity, time) is written in
the user's store, ``scans/HEX.json`` per manifest digest, so a site can refuse images
whose last scan found something at or above ``refuse_scan_severity`` (a site-file key):
``scan_refusal``.  That function is meant for the launch path: stdlib only, one small
file read per store, and nothing at all when the key is unset.
"""

from __future__ import annotations

import os

from mesobox.errors import MesoboxError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any

    from mesobox.config import Config
    from mesobox.image.packages import Inventory, OsInfo, Package

LEVELS = ("UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL")
MAX_RECORD_BYTES = 8 << 20  # OSV records are a few kB; the largest known are well under 1 MB
MAX_FEED_BYTES = 4 << 30
MAX_FEED_RECORDS = 2_000_000
SCAN_FORMAT = 1


def level_rank(level: str) -> int:
    return LEVELS.index(level)


def parse_level(text: str, what: str = "severity") -> str:
    level = text.strip().upper()
    if level == "MODERATE":  # GitHub's word for MEDIUM
        level = "MEDIUM"
    if level not in LEVELS:
        raise UsageError(f"bad {what} {text!r}", hint=f"one of: {', '.join(LEVELS)}")
    return level


# --- the feed ---------------------------------------------------------------------------------


class Feed:
    """The OSV records of a feed, and its identity (path and a digest of its content)."""

    def __init__(self, source: str, records: list[dict[str, Any]], digest: str) -> None:
        self.source = source
        self.records = records
        self.digest = digest

    @property
    def identity(self) -> dict[str, Any]:
        return {"source": self.source, "digest": self.digest, "records": len(self.records)}


def _feed_error(source: str, what: str) -> UsageError:
    return UsageError(f"bad vulnerability feed {source}: {what}",
                      hint="the feed must be a directory or zip of OSV JSON records")


def _check_record(data: Any, source: str, name: str) -> dict[str, Any] | None:
    """The record if it is OSV-shaped (None: withdrawn), else a one-line error."""
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise _feed_error(source, f"{name} is not an OSV record (no string 'id')")
    affected = data.get("affected", [])
    if not isinstance(affected, list) or not all(isinstance(a, dict) for a in affected):
        raise _feed_error(source, f"{name}: 'affected' is not a list of objects")
    for entry in affected:
        pkg = entry.get("package", {})
        if not isinstance(pkg, dict) or not all(isinstance(pkg.get(k, ""), str) for k in ("ecosystem", "name")):
            raise _feed_error(source, f"{name}: an 'affected' entry has a malformed 'package'")
        if not isinstance(entry.get("ranges", []), list) or not isinstance(entry.get("versions", []), list):
            raise _feed_error(source, f"{name}: 'ranges' and 'versions' must be lists")
        for rng in entry.get("ranges", []):
            if not isinstance(rng, dict) or not isinstance(rng.get("events", []), list) or not all(
                    isinstance(e, dict) for e in rng.get("events", [])):
                raise _feed_error(source, f"{name}: a range's 'events' must be a list of objects")
    if data.get("withdrawn"):
        return None
    return data


def _parse_json(raw: bytes, source: str, name: str) -> Any:
    import json

    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _feed_error(source, f"{name} is not valid JSON ({text})") from None


def _dir_members(root: str) -> Iterator[tuple[str, bytes]]:
    """(relative name, bytes) of every ``*.json`` under ``root``; symlinks are skipped."""
    import errno
    import stat

    count = total = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for filename in sorted(filenames):
            if not filename.endswith(".json"):
                continue
            path = os.path.join(dirpath, filename)
            rel = os.path.relpath(path, root)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as err:
                if err.errno == errno.ELOOP:  # a symlink: not followed
                    continue
                raise _feed_error(root, f"cannot read {rel}: {err.strerror}") from None
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device: never read
                    continue
                raw = f.read(MAX_RECORD_BYTES + 1)
            if len(raw) > MAX_RECORD_BYTES:
                raise _feed_error(root, f"{rel} is larger than {MAX_RECORD_BYTES >> 20} MiB")
            count += 1
            total += len(raw)
            if count > MAX_FEED_RECORDS or total > MAX_FEED_BYTES:
                raise _feed_error(root, "more records than a feed may hold")
            yield rel, raw


def _safe_member_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return not name.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0] and "\0" not in name


def _zip_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every ``*.json`` member, read in memory under the size cap."""
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise _feed_error(path, f"not a readable zip ({err})") from None
    count = total = 0
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_FEED_RECORDS:
            raise _feed_error(path, "more members than a feed may hold")
        for info in infos:
            if not _safe_member_name(info.filename):
                raise _feed_error(path, f"member name {info.filename!r} escapes the archive")
            if info.is_dir() or not info.filename.endswith(".json"):
                continue
            if info.file_size > MAX_RECORD_BYTES:
                raise _feed_error(path, f"member {info.filename} is larger than {MAX_RECORD_BYTES >> 20} MiB")
            try:
                with archive.open(info) as member:
                    # the header's size can lie: never inflate more than the cap
                    raw = member.read(MAX_RECORD_BYTES + 1)
            except (OSError, zipfile.BadZipFile, ValueError, NotImplementedError, EOFError) as err:
                raise _feed_error(path, f"member {info.filename} is unreadable ({err})") from None
            if len(raw) > MAX_RECORD_BYTES:
                raise _feed_error(path, f"member {info.filename} inflates past {MAX_RECORD_BYTES >> 20} MiB")
            count += 1
            total += len(raw)
            if total > MAX_FEED_BYTES:
                raise _feed_error(path, "the members inflate past what a feed may hold")
            yield info.filename, raw


def load_feed(source: str) -> Feed:
    """Every OSV record of the directory or zip ``source``."""
    import hashlib

    try:
        is_dir = os.path.isdir(source)
        if not is_dir and not os.path.isfile(source):
            raise UsageError(f"no vulnerability feed at {source}", hint="--db DIR or --db FILE.zip")
    except OSError as err:
        raise UsageError(f"cannot reach the feed {source}: {err.strerror}") from None
    members = _dir_members(source) if is_dir else _zip_members(source)
    records = []
    digests = []
    for name, raw in members:
        digests.append((name, hashlib.sha256(raw).hexdigest()))
        record = _check_record(_parse_json(raw, source, name), source, name)
        if record is not None:
            records.append(record)
    whole = hashlib.sha256()
    for name, digest in sorted(digests):
        whole.update(f"{name}\0{digest}\n".encode())
    return Feed(os.path.abspath(source), records, "sha256:" + whole.hexdigest())


# --- which ecosystem an image's packages belong to -------------------------------------------

_RPM_FAMILIES = {
    "rocky": ("Rocky Linux",), "almalinux": ("AlmaLinux",), "rhel": ("Red Hat",), "centos": ("Red Hat",),
    "fedora": ("Fedora",), "opensuse-leap": ("openSUSE",), "opensuse-tumbleweed": ("openSUSE",),
    "sles": ("SUSE",), "mageia": ("Mageia",), "photon": ("Photon OS",), "amzn": ("Amazon Linux",),
    "ol": ("Oracle Linux",),
}


def _release_matches(os_info: OsInfo, family: str, release: str) -> bool:
    """Whether the release part of an OSV ecosystem (``12``, ``v3.18``, ``22.04:LTS``,
    ``enterprise_linux:9::appstream``) names the image's OS release; a bare family
    (no release) names every release."""
    if not release:
        return True
    version = os_info.version_id
    major = version.split(".")[0]
    if family == "Alpine":
        return release.removeprefix("v") == ".".join(version.split(".")[:2])
    if family == "Ubuntu":
        return release.split(":")[0] == version
    if family in ("Debian", "Rocky Linux", "AlmaLinux", "Mageia", "Photon OS", "Oracle Linux", "Amazon Linux",
                  "Fedora"):
        return release.split(":")[0] in (version, major)
    # Red Hat, SUSE, openSUSE: several fields; one of them names the release
    fields = release.split(":")
    return any(f in (version, major) or f.startswith(major + ".") for f in fields if f)


def _ecosystem_kind(ecosystem: str, os_info: OsInfo) -> str | None:
    """The package kind an OSV ecosystem applies to in this image, or None."""
    family, _, release = ecosystem.partition(":")
    if family == "PyPI":
        return "pypi"
    if (family, os_info.id) in (("Debian", "debian"), ("Ubuntu", "ubuntu")):
        return "deb" if _release_matches(os_info, family, release) else None
    if family == "Alpine" and os_info.id == "alpine":
        return "apk" if _release_matches(os_info, family, release) else None
    if family in _RPM_FAMILIES.get(os_info.id, ()):
        return "rpm" if _release_matches(os_info, family, release) else None
    return None


def _match_names(package: Package) -> tuple[str, ...]:
    if package.kind in ("deb", "apk"):
        return (package.source or package.name,)
    if package.kind == "rpm":
        return tuple(dict.fromkeys((package.name, package.source or package.name)))
    return (package.name,)


def _match_version(package: Package) -> str:
    if package.kind == "deb":
        return package.source_version or package.version
    return package.full_version


# --- ranges and severities ---------------------------------------------------------------------


def _event_order(kind: str, events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(type, version) of a range's events, in the ecosystem's order; "0" first."""
    from mesobox.image.versions import sort_key

    types = ("introduced", "fixed", "last_affected")
    pairs: list[tuple[str, str]] = [(t, str(e[t])) for e in events for t in types if t in e]
    zero = [p for p in pairs if p == ("introduced", "0")]
    rest = [p for p in pairs if p != ("introduced", "0")]
    key = sort_key(kind)
    # stable: at one version, "introduced" before "fixed" (OSV sorts by version only)
    rest.sort(key=lambda p: key(p[1]))
    return zero + rest


def in_range(kind: str, version: str, events: list[dict[str, Any]]) -> tuple[bool, str]:
    """(affected, the lowest fixed version above ``version`` or "") for one range."""
    from mesobox.image.versions import compare

    affected = False
    fixed = ""
    for event, at in _event_order(kind, events):
        if event == "introduced":
            if at == "0" or compare(kind, version, at) >= 0:
                affected = True
        elif event == "fixed":
            if compare(kind, version, at) >= 0:
                affected = False
            elif not fixed:
                fixed = at
        elif event == "last_affected" and compare(kind, version, at) > 0:
            affected = False
    return affected, fixed if affected else ""


def _roundup(value: float) -> float:
    """CVSS 3.1's Roundup: the smallest one-decimal number >= value, free of float noise."""
    scaled = round(value * 100000)
    if scaled % 10000 == 0:
        return scaled / 100000.0
    return (scaled // 10000 + 1) / 10.0


_CVSS_WEIGHTS = {
    "AV": {"N": 0.85, "A": 0.62, "L": 0.55, "P": 0.2},
    "AC": {"L": 0.77, "H": 0.44},
    "UI": {"N": 0.85, "R": 0.62},
    "C": {"H": 0.56, "L": 0.22, "N": 0.0},
    "I": {"H": 0.56, "L": 0.22, "N": 0.0},
    "A": {"H": 0.56, "L": 0.22, "N": 0.0},
}


def cvss3_base_score(vector: str) -> float:
    """The base score of a ``CVSS:3.x/AV:…`` vector (FIRST's CVSS v3.1 specification,
    section 7.1); ValueError for a vector without every base metric."""
    parts = vector.strip().split("/")
    if not parts[0].startswith("CVSS:3"):
        raise ValueError(f"not a CVSS 3 vector: {vector!r}")
    metrics = dict(p.split(":", 1) for p in parts[1:] if ":" in p)
    try:
        scope_changed = {"U": False, "C": True}[metrics["S"]]
        pr = {"N": 0.85, "L": 0.68 if scope_changed else 0.62, "H": 0.5 if scope_changed else 0.27}[metrics["PR"]]
        w = {k: _CVSS_WEIGHTS[k][metrics[k]] for k in _CVSS_WEIGHTS}
    except KeyError:
        raise ValueError(f"incomplete CVSS 3 vector: {vector!r}") from None
    iss = 1 - (1 - w["C"]) * (1 - w["I"]) * (1 - w["A"])
    impact = 7.52 * (iss - 0.029) - 3.25 * (iss - 0.02) ** 15 if scope_changed else 6.42 * iss
    exploitability = 8.22 * w["AV"] * w["AC"] * pr * w["UI"]
    if impact <= 0:
        return 0.0
    total = 1.08 * (impact + exploitability) if scope_changed else impact + exploitability
    return _roundup(min(total, 10.0))


def score_level(score: float) -> str:
    if score >= 9.0:
        return "CRITICAL"
    if score >= 7.0:
        return "HIGH"
    if score >= 4.0:
        return "MEDIUM"
    return "LOW"


def _label(value: Any) -> str | None:
    if isinstance(value, str):
        text = value.strip().upper()
        if text == "MODERATE":
            return "MEDIUM"
        if text in LEVELS[1:]:
            return text
    return None


def severity_of(record: dict[str, Any], affected: dict[str, Any]) -> str:
    """The severity of one record for one affected entry (the module docstring's rule)."""
    for holder in (record.get("database_specific"), affected.get("database_specific"),
                   affected.get("ecosystem_specific")):
        if isinstance(holder, dict) and (label := _label(holder.get("severity"))):
            return label
    for source in (record.get("severity"), affected.get("severity")):
        if not isinstance(source, list):
            continue
        for item in source:
            if isinstance(item, dict) and item.get("type") == "CVSS_V3" and isinstance(item.get("score"), str):
                try:
                    return score_level(cvss3_base_score(item["score"]))
                except ValueError:
                    continue
        for item in source:  # a distribution's own word ("Ubuntu": "medium")
            if isinstance(item, dict) and (label := _label(item.get("score"))):
                return label
    return "UNKNOWN"


# --- the scan -----------------------------------------------------------------------------------


def scan_inventory(inventory: Inventory, feed: Feed) -> tuple[list[dict[str, Any]], list[str]]:
    """(findings, warnings): one finding per installed package and advisory."""
    from mesobox.image.packages import pypi_name

    by_name: dict[tuple[str, str], list[Package]] = {}
    for p in inventory.packages:
        for name in _match_names(p):
            by_name.setdefault((p.kind, name), []).append(p)
    findings: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    warnings: list[str] = []
    for record in feed.records:
        for affected in record.get("affected", []):
            pkg = affected.get("package", {})
            kind = _ecosystem_kind(pkg.get("ecosystem", ""), inventory.os)
            if kind is None:
                continue
            name = pypi_name(pkg.get("name", "")) if kind == "pypi" else pkg.get("name", "")
            for package in by_name.get((kind, name), []):
                try:
                    hit, fixed = _affects(kind, _match_version(package), affected)
                except ValueError as err:
                    warnings.append(f"{record['id']}: {package.name}: cannot compare versions ({err})")
                    continue
                if not hit:
                    continue
                key = (package.name, package.arch, package.location, record["id"])
                findings[key] = {
                    "package": package.name,
                    "kind": package.kind,
                    "source": package.source,
                    "installed": package.full_version,
                    "fixed": fixed,
                    "advisory": record["id"],
                    "aliases": [a for a in record.get("aliases", []) if isinstance(a, str)],
                    "severity": severity_of(record, affected),
                    "summary": str(record.get("summary", ""))[:200],
                    "purl": package.purl,
                }
    ordered = sorted(findings.values(),
                     key=lambda f: (-level_rank(f["severity"]), f["package"], f["advisory"]))
    return ordered, warnings


def _affects(kind: str, version: str, affected: dict[str, Any]) -> tuple[bool, str]:
    from mesobox.image.versions import compare

    fixed_versions: list[str] = []
    hit = False
    for listed in affected.get("versions", []):
        if not isinstance(listed, str):
            continue
        try:  # a listed version the ordering rejects matches only itself
            hit = hit or listed == version or compare(kind, version, listed) == 0
        except ValueError:
            continue
    for rng in affected.get("ranges", []):
        if rng.get("type") not in ("ECOSYSTEM", "SEMVER"):
            continue
        in_it, fixed = in_range(kind, version, rng.get("events", []))
        if in_it:
            hit = True
            if fixed:
                fixed_versions.append(fixed)
    if not hit:
        return False, ""
    from mesobox.image.versions import sort_key

    return True, min(fixed_versions, key=sort_key(kind)) if fixed_versions else ""


def highest(findings: list[dict[str, Any]]) -> str:
    """The highest severity found, or "NONE"."""
    if not findings:
        return "NONE"
    return str(max((f["severity"] for f in findings), key=level_rank))


# --- the scan record and the site rule ---------------------------------------------------------


def scan_record_path(store_root: str, digest: str) -> str:
    """Where the last scan of manifest ``digest`` is kept in a store."""
    from mesobox.image.store import digest_hex

    return os.path.join(store_root, "scans", digest_hex(digest) + ".json")


def record_scan(config: Config, digest: str, findings: list[dict[str, Any]], feed: Feed, when: str) -> Path:
    """Write the scan's summary into the user's store (atomically, replacing the last)."""
    import json
    from pathlib import Path

    from mesobox import files

    path = Path(scan_record_path(config.store_str, digest))
    summary = {
        "format": SCAN_FORMAT,
        "digest": digest,
        "highest": highest(findings),
        "counts": {level: sum(1 for f in findings if f["severity"] == level) for level in LEVELS},
        "findings": len(findings),
        "feed": feed.identity,
        "time": when,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, json.dumps(summary, indent=1).encode(), mode=0o644, durable=True)
    return path


def _last_scan(path: str) -> dict[str, Any] | None:
    import json

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(1 << 16)
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def scan_refusal(config: Config, digest: str) -> str | None:
    """The refusal, as one line, when the site refuses images whose last scan found
    something at or above ``refuse_scan_severity`` and a last scan of ``digest`` (in the
    user's store or a read-only site store) did; None otherwise, and at once when the
    key is unset.  An image never scanned is not refused (the rule is about known
    findings).  A user can delete the record in their own store, not a site store's:
    a site that needs the rule to hold keeps its images, scanned, in a site store."""
    threshold = getattr(config, "refuse_scan_severity", "")
    if not threshold:
        return None
    for root in (*(str(r) for r in config.ro_stores), config.store_str):
        try:
            path = scan_record_path(root, digest)
        except MesoboxError:  # a digest the store cannot name: nothing recorded for it
            return None
        last = _last_scan(path)
        found = last.get("highest") if last else None
        if isinstance(found, str) and found in LEVELS and level_rank(found) >= level_rank(threshold):
            return (f"image {digest[:19]} is refused by the site rule refuse_scan_severity={threshold}: "
                    f"its last scan ({last.get('time', '?') if last else '?'}) found {found} findings")
    return None


# --- the diff of two images ---------------------------------------------------------------------


def diff_inventories(old: Inventory, new: Inventory) -> dict[str, list[dict[str, Any]]]:
    """Packages added, removed, upgraded and downgraded from ``old`` to ``new``, by
    (kind, name, arch), versions ordered as their ecosystem orders them."""
    from mesobox.image.versions import compare

    def index(inv: Inventory) -> dict[tuple[str, str, str], Package]:
        out: dict[tuple[str, str, str], Package] = {}
        for p in inv.packages:
            out.setdefault((p.kind, p.name, p.arch), p)  # a second copy (another site dir): the first
        return out

    before, after = index(old), index(new)
    result: dict[str, list[dict[str, Any]]] = {"added": [], "removed": [], "upgraded": [], "downgraded": [],
                                               "changed": []}
    for key in sorted(before.keys() | after.keys()):
        kind, name, arch = key
        a, b = before.get(key), after.get(key)
        row: dict[str, Any] = {"package": name, "kind": kind, "arch": arch}
        if a is None and b is not None:
            result["added"].append({**row, "version": b.full_version})
        elif b is None and a is not None:
            result["removed"].append({**row, "version": a.full_version})
        elif a is not None and b is not None and a.full_version != b.full_version:
            row.update({"from": a.full_version, "to": b.full_version})
            try:
                order = compare(kind, b.full_version, a.full_version)
            except ValueError:
                order = 0  # neither newer nor older by the ecosystem's rules: "changed"
            result["upgraded" if order > 0 else "downgraded" if order < 0 else "changed"].append(row)
    return result


def fixed_by_change(old_findings: list[dict[str, Any]],
                    new_findings: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(advisories the change fixed, advisories it brought), per package."""
    def keys(findings: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(f["package"], f["advisory"]): f for f in findings}

    before, after = keys(old_findings), keys(new_findings)
    fixed = [before[k] for k in sorted(before.keys() - after.keys())]
    brought = [after[k] for k in sorted(after.keys() - before.keys())]
    return fixed, brought
