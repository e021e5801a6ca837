"""Installed packages of an image, read from its own package databases (room: image).

What is read, from the image's root only:

- the OS: ``etc/os-release`` (``usr/lib/os-release`` when absent): ID, VERSION_ID, NAME;
- dpkg: ``var/lib/dpkg/status`` (packages whose Status is ``install ok installed``)
  and ``var/lib/dpkg/status.d/*`` (distroless images: one stanza a file);
- apk: ``lib/apk/db/installed`` (P name, V version, A arch, o origin);
- rpm: the sqlite rpmdb (``var/lib/rpm/rpmdb.sqlite``, ``usr/lib/sysimage/rpm/…``):
  each row of its ``Packages`` table is an rpm header, whose index entries and data
  store are parsed here (tags NAME, VERSION, RELEASE, EPOCH, ARCH, SOURCERPM).  The
  older Berkeley DB and NDB formats are not read;
- Python: ``*.dist-info/METADATA`` and ``*.egg-info`` (``PKG-INFO``) in the
  ``site-packages``/``dist-packages`` directories of ``usr/lib``, ``usr/local/lib``
  and their ``lib64`` twins.

An image is untrusted, so every path is resolved **inside the image root**, as a
chroot would: an absolute symlink starts again at the image's root and ``..`` never
climbs above it, so ``var/lib/dpkg/status -> /etc/shadow`` names the image's own
``etc/shadow``, never the host's.  A directory image is walked from directory
descriptors one component at a time with ``O_NOFOLLOW`` (symlinks are read with
readlinkat and resolved by this module), so a tree changed during the walk cannot
redirect it either; only regular files are read, and only up to a size cap.  A squashfs
image is never mounted: its listing (``unsquashfs -lln``) gives the tree, and the few
files needed are read with ``unsquashfs -cat``, which reads only the image.

Each package gets its purl (github.com/package-url/purl-spec): ``pkg:deb/debian/…``,
``pkg:apk/alpine/…``, ``pkg:rpm/ID/…``, ``pkg:pypi/…`` with the name normalised as
PEP 503 says.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

from mesobox.errors import LayerError, UsageError

MAX_METADATA_BYTES = 64 << 20  # a dpkg status of a large image is a few MB
MAX_RPMDB_BYTES = 512 << 20
MAX_SYMLINKS = 40  # as the kernel's path walk
UNSQUASHFS_TIMEOUT = 120


@dataclass(frozen=True)
class OsInfo:
    id: str = ""  # "debian", "alpine", "rocky"…
    version_id: str = ""  # "12", "3.18.4", "9.3"
    name: str = ""  # PRETTY_NAME, else NAME

    @property
    def distro(self) -> str:
        """The purl ``distro`` qualifier: ``debian-12``, ``alpine-3.18.4``."""
        return f"{self.id}-{self.version_id}" if self.id and self.version_id else self.id


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    kind: str  # the ecosystem's version ordering: deb, apk, rpm, pypi (image/versions.py)
    arch: str = ""
    source: str = ""  # source package (dpkg Source, apk origin, the source rpm's name)
    source_version: str = ""  # dpkg: the source's own version when it differs
    epoch: str = ""  # rpm only (dpkg keeps it in the version)
    purl: str = ""
    location: str = ""  # where in the image it was found

    @property
    def full_version(self) -> str:
        """The version the ecosystem compares: rpm's EPOCH:VERSION-RELEASE, else version."""
        return f"{self.epoch}:{self.version}" if self.kind == "rpm" and self.epoch else self.version


@dataclass(frozen=True)
class Inventory:
    os: OsInfo
    packages: tuple[Package, ...] = field(default=())
    notes: tuple[str, ...] = ()  # what could not be read, for a warning


# --- reading files inside an image root ---------------------------------------------------------


class ImageFiles:
    """Read-only, in-root access to an image's files (see the module docstring)."""

    def read(self, path: str, limit: int = MAX_METADATA_BYTES) -> bytes | None:
        """The regular file ``path`` (relative to the image root), or None when it is
        missing, not a regular file, or a symlink loop.  LayerError past ``limit``."""
        raise NotImplementedError

    def listdir(self, path: str) -> list[str]:
        """The names in directory ``path``, sorted; [] when it is not a directory."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _too_big(path: str, limit: int) -> LayerError:
    return LayerError(f"image file /{path} is larger than {limit >> 20} MiB: refusing to read it",
                      hint="the image's package metadata looks hostile or broken")


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


class DirFiles(ImageFiles):
    """A directory rootfs, walked from directory descriptors."""

    def __init__(self, root: str) -> None:
        try:
            self._root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise UsageError(f"cannot open image directory {root}: {err.strerror}") from None

    def close(self) -> None:
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def _walk(self, path: str) -> tuple[list[int], str] | None:
        """Resolve every component but the last, in root: (the stack of directory fds from
        the root down, the last name, itself resolved when it is a symlink).  The caller
        closes every fd but the first.  None: missing, not a directory, or a loop."""
        stack = [self._root]
        parts = _split(path)
        links = 0
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            try:
                st = os.stat(name, dir_fd=stack[-1], follow_symlinks=False)
            except OSError:
                return self._drop(stack)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                try:
                    target = os.readlink(name, dir_fd=stack[-1])
                except OSError:
                    return self._drop(stack)
                if links > MAX_SYMLINKS or not target:
                    return self._drop(stack)
                if target.startswith("/"):  # absolute: from the image's root, not the host's
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts[:0] = _split(target) if target.strip("/") else []
                if not parts:
                    return stack, "."
                continue
            if not parts:
                return stack, name
            if not stat.S_ISDIR(st.st_mode):
                return self._drop(stack)
            try:
                # O_NOFOLLOW: a directory swapped for a symlink since the stat is refused
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            except OSError:
                return self._drop(stack)
            stack.append(fd)
        return stack, "."

    @staticmethod
    def _drop(stack: list[int]) -> None:
        for fd in stack[1:]:
            os.close(fd)
        return None

    def _open_last(self, path: str, directory: bool) -> int | None:
        walked = self._walk(path)
        if walked is None:
            return None
        stack, name = walked
        try:
            flags = (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_PATH
            try:
                return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            except OSError:
                return None
        finally:
            self._drop(stack)

    def read(self, path: str, limit: int = MAX_METADATA_BYTES) -> bytes | None:
        fd = self._open_last(path, directory=False)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None  # a FIFO, a device, a directory: never opened for reading
            if st.st_size > limit:
                raise _too_big(path, limit)
            # reopen the very file the O_PATH descriptor names, for reading
            data_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            with os.fdopen(data_fd, "rb") as f:
                data = f.read(limit + 1)
        except OSError:
            return None
        if len(data) > limit:
            raise _too_big(path, limit)
        return data

    def listdir(self, path: str) -> list[str]:
        fd = self._open_last(path, directory=True)
        if fd is None:
            return []
        try:
            return sorted(os.listdir(fd))
        except OSError:
            return []
        finally:
            os.close(fd)


class SquashFiles(ImageFiles):
    """A squashfs image, read with unsquashfs (never mounted)."""

    def __init__(self, image: str) -> None:
        self._image = image
        # path -> (kind "d" | "f" | "l" | "o", size, symlink target)
        self._tree: dict[str, tuple[str, int, str]] = {"": ("d", 0, "")}
        self._children: dict[str, list[str]] = {}
        self._load_listing()

    def _unsquashfs(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(["unsquashfs", *args], capture_output=True, timeout=UNSQUASHFS_TIMEOUT,
                                  check=False, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise UsageError("unsquashfs is not installed: it reads squashfs images",
                             hint="install squashfs-tools") from None
        except subprocess.TimeoutExpired:
            raise LayerError(f"unsquashfs took over {UNSQUASHFS_TIMEOUT} s on {self._image}") from None

    def _load_listing(self) -> None:
        result = self._unsquashfs("-no-progress", "-lln", self._image)
        if result.returncode != 0:
            text = result.stderr.decode(errors="replace").strip().splitlines()
            raise LayerError(f"cannot list squashfs image {self._image}: {text[-1] if text else 'unsquashfs failed'}")
        for line in result.stdout.split(b"\n"):
            self._add_line(os.fsdecode(line))
        for path in self._tree:
            if path:
                parent = path.rpartition("/")[0]
                self._children.setdefault(parent, []).append(path.rpartition("/")[2])

    def _add_line(self, line: str) -> None:
        """``MODE UID/GID SIZE DATE TIME squashfs-root/PATH[ -> TARGET]``.  A name with a
        newline or `` -> `` in it can make a line ambiguous: at worst this reads another
        file of the same image, never one outside it."""
        fields = line.split(None, 5)
        if len(fields) < 6 or len(fields[0]) != 10:
            return
        mode, _ids, size, _date, _time, rest = fields
        if not (rest == "squashfs-root" or rest.startswith("squashfs-root/")):
            return
        rest = rest[len("squashfs-root/"):] if rest != "squashfs-root" else ""
        kind = {"d": "d", "-": "f", "l": "l"}.get(mode[0], "o")
        target = ""
        if kind == "l":
            rest, _, target = rest.partition(" -> ")
        if rest:
            self._tree[rest] = (kind, int(size) if size.isdigit() else 0, target)

    def _resolve(self, path: str) -> str | None:
        """The in-root path ``path`` names, its symlinks followed; None: missing or a loop."""
        done: list[str] = []
        parts = _split(path)
        links = 0
        while parts:
            name = parts.pop(0)
            if name == "..":
                if done:
                    done.pop()
                continue
            here = "/".join([*done, name])
            entry = self._tree.get(here)
            if entry is None:
                return None
            if entry[0] == "l":
                links += 1
                if links > MAX_SYMLINKS or not entry[2]:
                    return None
                if entry[2].startswith("/"):
                    done = []
                parts[:0] = _split(entry[2])
                continue
            if parts and entry[0] != "d":
                return None
            done.append(name)
        return "/".join(done)

    def read(self, path: str, limit: int = MAX_METADATA_BYTES) -> bytes | None:
        real = self._resolve(path)
        if real is None or self._tree[real][0] != "f":
            return None
        if self._tree[real][1] > limit:
            raise _too_big(path, limit)
        result = self._unsquashfs("-no-progress", "-no-wildcards", "-cat", self._image, real)
        if result.returncode != 0:
            return None
        if len(result.stdout) > limit:
            raise _too_big(path, limit)
        return result.stdout

    def listdir(self, path: str) -> list[str]:
        real = self._resolve(path)
        if real is None or self._tree[real][0] != "d":
            return []
        return sorted(self._children.get(real, []))


def open_image_files(path: str) -> ImageFiles:
    """A directory rootfs or a squashfs file."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise UsageError(f"cannot read image {path}: {err.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        return DirFiles(path)
    return SquashFiles(path)


# --- the OS -----------------------------------------------------------------------------------


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
        for esc in ("\\\\", '\\"', "\\$", "\\`"):
            value = value.replace(esc, esc[1])
    return value


def read_os(files: ImageFiles) -> OsInfo:
    data = files.read("etc/os-release", 1 << 20)
    if data is None:
        data = files.read("usr/lib/os-release", 1 << 20)
    if data is None:
        return OsInfo()
    values: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines():
        key, eq, value = line.partition("=")
        if eq and key.strip().isidentifier():
            values[key.strip()] = _unquote(value)
    return OsInfo(id=values.get("ID", "").lower(), version_id=values.get("VERSION_ID", ""),
                  name=values.get("PRETTY_NAME") or values.get("NAME", ""))


# --- purls (github.com/package-url/purl-spec: "A purl is a URL") ------------------------------

_PURL_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:")


def _pct(text: str) -> str:
    """Percent-encode all but the unreserved characters (and ':', which the spec leaves
    as is), byte by byte in UTF-8."""
    return "".join(ch if ch in _PURL_SAFE else "".join(f"%{b:02X}" for b in ch.encode()) for ch in text)


def purl(kind: str, namespace: str, name: str, version: str, qualifiers: dict[str, str]) -> str:
    """``pkg:TYPE/NAMESPACE/NAME@VERSION?QUALIFIERS``: the type and qualifier keys in
    lower case, qualifiers sorted by key and empty ones dropped, every component
    percent-encoded."""
    text = f"pkg:{kind.lower()}/"
    if namespace:
        text += "/".join(_pct(seg) for seg in namespace.split("/") if seg) + "/"
    text += _pct(name)
    if version:
        text += "@" + _pct(version)
    pairs = sorted((k.lower(), v) for k, v in qualifiers.items() if v)
    if pairs:
        text += "?" + "&".join(f"{k}={_pct(v)}" for k, v in pairs)
    return text


def pypi_name(name: str) -> str:
    """PEP 503's normalised name: runs of ``-_.`` become one ``-``, lower case."""
    out: list[str] = []
    for ch in name.strip().lower():
        if ch in "-_.":
            if not out or out[-1] != "-":
                out.append("-")
        else:
            out.append(ch)
    return "".join(out)


# --- dpkg -------------------------------------------------------------------------------------


def _stanzas(text: str, continuation: bool = True) -> Iterator[dict[str, str]]:
    """RFC 822-like paragraphs separated by blank lines: ``Field: value`` lines, and
    (dpkg) continuation lines that start with a space."""
    fields: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, ""
            continue
        if continuation and line[0] in " \t":
            if last:
                fields[last] += "\n" + line.strip()
            continue
        key, colon, value = line.partition(":")
        if colon:
            last = key.strip()
            fields.setdefault(last, value.strip())
    if fields:
        yield fields


def parse_dpkg_status(text: str, os_info: OsInfo, location: str) -> list[Package]:
    out = []
    for st in _stanzas(text):
        name, version = st.get("Package", ""), st.get("Version", "")
        # a status database also lists removed and half-installed packages
        if not name or not version or st.get("Status", "install ok installed").split() != ["install", "ok",
                                                                                          "installed"]:
            continue
        source, source_version = name, ""
        if st.get("Source"):
            # "glibc" or "glibc (2.36-9+deb12u4)": the source's version when it differs
            source, _, rest = st["Source"].partition(" ")
            source_version = rest.strip().strip("()").strip()
        arch = st.get("Architecture", "")
        ns = os_info.id or "debian"
        out.append(Package(
            name=name, version=version, kind="deb", arch=arch, source=source,
            source_version=source_version if source_version != version else "",
            purl=purl("deb", ns, name, version, {"arch": arch, "distro": os_info.distro}),
            location=location,
        ))
    return out


def read_dpkg(files: ImageFiles, os_info: OsInfo) -> list[Package]:
    out = []
    data = files.read("var/lib/dpkg/status")
    if data is not None:
        out += parse_dpkg_status(data.decode(errors="replace"), os_info, "/var/lib/dpkg/status")
    for name in files.listdir("var/lib/dpkg/status.d"):
        if "." in name:  # NAME.md5sums and the like beside the stanzas
            continue
        data = files.read(f"var/lib/dpkg/status.d/{name}")
        if data is not None:
            out += parse_dpkg_status(data.decode(errors="replace"), os_info, f"/var/lib/dpkg/status.d/{name}")
    return out


# --- apk --------------------------------------------------------------------------------------


def parse_apk_installed(text: str, os_info: OsInfo, location: str) -> list[Package]:
    out = []
    for st in _stanzas(text, continuation=False):
        name, version = st.get("P", ""), st.get("V", "")
        if not name or not version:
            continue
        arch = st.get("A", "")
        out.append(Package(
            name=name, version=version, kind="apk", arch=arch, source=st.get("o", "") or name,
            purl=purl("apk", os_info.id or "alpine", name, version, {"arch": arch, "distro": os_info.distro}),
            location=location,
        ))
    return out


def read_apk(files: ImageFiles, os_info: OsInfo) -> list[Package]:
    data = files.read("lib/apk/db/installed")
    if data is None:
        return []
    return parse_apk_installed(data.decode(errors="replace"), os_info, "/lib/apk/db/installed")


# --- rpm --------------------------------------------------------------------------------------

RPMTAG_NAME, RPMTAG_VERSION, RPMTAG_RELEASE, RPMTAG_EPOCH = 1000, 1001, 1002, 1003
RPMTAG_ARCH, RPMTAG_SOURCERPM = 1022, 1044
_RPM_INT32, _RPM_STRING, _RPM_I18NSTRING = 4, 6, 9
_RPM_TAGS = (RPMTAG_NAME, RPMTAG_VERSION, RPMTAG_RELEASE, RPMTAG_EPOCH, RPMTAG_ARCH, RPMTAG_SOURCERPM)
_RPMDBS = ("var/lib/rpm/rpmdb.sqlite", "usr/lib/sysimage/rpm/rpmdb.sqlite")


def parse_rpm_header(blob: bytes) -> dict[int, str | int]:
    """The tags this module needs from an rpm header as the rpmdb stores it (no lead, no
    magic): big-endian index count and data length, index entries of (tag, type, offset,
    count), then the data store.  Malformed input gives ValueError."""
    import struct

    if len(blob) < 8:
        raise ValueError("short rpm header")
    count, length = struct.unpack_from(">II", blob, 0)
    start = 8 + 16 * count
    if count > 1 << 16 or start + length > len(blob):
        raise ValueError("rpm header sizes out of range")
    store = blob[start:start + length]
    out: dict[int, str | int] = {}
    for n in range(count):
        tag, kind, offset, items = struct.unpack_from(">iiiI", blob, 8 + 16 * n)
        if tag not in _RPM_TAGS or not 0 <= offset < length:
            continue
        if kind == _RPM_INT32 and items >= 1 and offset + 4 <= length:
            out[tag] = struct.unpack_from(">i", store, offset)[0]
        elif kind in (_RPM_STRING, _RPM_I18NSTRING):  # an I18N string: the first is the default
            end = store.find(b"\0", offset)
            if end < 0:
                raise ValueError("unterminated string in rpm header")
            out[tag] = store[offset:end].decode(errors="replace")
    return out


def _source_name(srpm: str) -> str:
    """``glibc-2.34-60.el9.src.rpm`` → ``glibc`` (NAME-VERSION-RELEASE.src.rpm)."""
    stem = srpm.removesuffix(".rpm").removesuffix(".src").removesuffix(".nosrc")
    parts = stem.rsplit("-", 2)
    return parts[0] if len(parts) == 3 else ""


def _sqlite_rows(data: bytes) -> list[bytes]:
    """The blobs of the ``Packages`` table of an sqlite database held in memory."""
    import sqlite3

    if len(data) >= 100 and data[18:20] == b"\x02\x02":
        # a WAL-mode database (rpm's default): its header's read/write versions say so,
        # and an in-memory copy cannot use a WAL; bytes 18-19 set to 1 read it as a
        # rollback-journal database (sqlite's file format, "1.3 The database header")
        data = data[:18] + b"\x01\x01" + data[20:]
    conn = sqlite3.connect(":memory:")
    try:
        conn.deserialize(data)
        # the database is untrusted: no functions from its schema, cell checks on
        conn.execute("PRAGMA trusted_schema=OFF")
        conn.execute("PRAGMA cell_size_check=ON")
        conn.execute("PRAGMA query_only=ON")
        return [bytes(row[0]) for row in conn.execute("SELECT blob FROM Packages") if isinstance(row[0], bytes)]
    finally:
        conn.close()


def parse_rpmdb(data: bytes, os_info: OsInfo, location: str) -> list[Package]:
    import sqlite3

    try:
        blobs = _sqlite_rows(data)
    except sqlite3.Error as err:
        raise LayerError(f"the image's rpm database {location} is unreadable: {err}") from None
    out = []
    for blob in blobs:
        try:
            tags = parse_rpm_header(blob)
        except ValueError as err:
            raise LayerError(f"the image's rpm database {location} holds a malformed header: {err}") from None
        name, version = str(tags.get(RPMTAG_NAME, "")), str(tags.get(RPMTAG_VERSION, ""))
        if not name or not version or name == "gpg-pubkey":  # imported keys are rows too, not packages
            continue
        release = str(tags.get(RPMTAG_RELEASE, ""))
        epoch = str(tags[RPMTAG_EPOCH]) if RPMTAG_EPOCH in tags else ""
        arch = str(tags.get(RPMTAG_ARCH, ""))
        full = f"{version}-{release}" if release else version
        out.append(Package(
            name=name, version=full, kind="rpm", arch=arch, epoch=epoch,
            source=_source_name(str(tags.get(RPMTAG_SOURCERPM, ""))) or name,
            purl=purl("rpm", os_info.id or "redhat", name, full,
                      {"arch": arch, "epoch": epoch, "distro": os_info.distro}),
            location=location,
        ))
    return out


def read_rpm(files: ImageFiles, os_info: OsInfo) -> list[Package]:
    for path in _RPMDBS:
        data = files.read(path, MAX_RPMDB_BYTES)
        if data is not None:
            return parse_rpmdb(data, os_info, "/" + path)
    return []


def unread_databases(files: ImageFiles) -> list[str]:
    """Package databases this module does not read, when the image has one."""
    names = set(files.listdir("var/lib/rpm"))
    if names & {"Packages", "Packages.db"} and "rpmdb.sqlite" not in names:
        return ["the image's rpm database is in the Berkeley DB or NDB format, which is not read: "
                "its rpm packages are not listed"]
    return []


# --- Python -----------------------------------------------------------------------------------

_PY_PREFIXES = ("usr/lib", "usr/local/lib", "usr/lib64", "usr/local/lib64")


def _site_dirs(files: ImageFiles) -> list[str]:
    out = []
    for prefix in _PY_PREFIXES:
        for entry in files.listdir(prefix):
            if entry.startswith("python"):
                out += [f"{prefix}/{entry}/{sub}" for sub in ("site-packages", "dist-packages")]
    return out


def parse_python_metadata(text: str) -> tuple[str, str]:
    """(Name, Version) from the header of a METADATA or PKG-INFO file."""
    name = version = ""
    for line in text.splitlines():
        if not line.strip():
            break  # the description follows the headers
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == "name" and not name:
            name = value.strip()
        elif colon and key.strip().lower() == "version" and not version:
            version = value.strip()
    return name, version


def read_python(files: ImageFiles) -> list[Package]:
    out = []
    seen: set[str] = set()
    for site in _site_dirs(files):
        for entry in files.listdir(site):
            if entry.endswith(".dist-info"):
                candidates = [f"{site}/{entry}/METADATA"]
            elif entry.endswith(".egg-info"):
                candidates = [f"{site}/{entry}/PKG-INFO", f"{site}/{entry}"]  # a directory, or the file itself
            else:
                continue
            for path in candidates:
                data = files.read(path)
                if data is None:
                    continue
                name, version = parse_python_metadata(data.decode(errors="replace"))
                key = f"{pypi_name(name)}@{version}@{site}"
                if name and version and key not in seen:
                    seen.add(key)
                    out.append(Package(name=pypi_name(name), version=version, kind="pypi",
                                       purl=purl("pypi", "", pypi_name(name), version, {}), location="/" + path))
                break
    return out


# --- all of it ------------------------------------------------------------------------------


def read_inventory(files: ImageFiles) -> Inventory:
    """The OS and every installed package the image's databases list, in a stable order."""
    os_info = read_os(files)
    packages = [*read_dpkg(files, os_info), *read_apk(files, os_info), *read_rpm(files, os_info),
                *read_python(files)]
    packages.sort(key=lambda p: (p.kind, p.name, p.version, p.arch, p.location))
    return Inventory(os=os_info, packages=tuple(packages), notes=tuple(unread_databases(files)))


def inventory_of(path: str) -> Inventory:
    """The inventory of the directory rootfs or squashfs file at ``path``."""
    files = open_image_files(path)
    try:
        return read_inventory(files)
    except OSError as err:
        if err.errno == errno.ENOMEM:
            raise
        raise LayerError(f"cannot read image {path}: {err.strerror or err}") from None
    finally:
        files.close()
