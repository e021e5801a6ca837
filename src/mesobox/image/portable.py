"""Portable squashfs image files: the image config carried after the filesystem.

Room: image/portable.  ``mesobox export --format squashfs`` writes the store's squashfs
unchanged, then a trailer: the image's checked ``config`` object (Env, Entrypoint, Cmd,
WorkingDir, User, Labels, StopSignal…), its reference and digests as JSON, zero padding
to a 4 KiB multiple, and a fixed 32-byte footer at the very end of the file::

    [squashfs: bytes_used, padded by mksquashfs] [JSON] [zeros] [footer]
    footer: magic "mesobox.sqfs" (12 bytes), version (u32), JSON offset (u64), JSON length (u64),
            little-endian

Squashfs readers (the kernel, squashfuse, unsquashfs) stop at the superblock's
``bytes_used``, so they never see the trailer; the file mounts and unpacks as before,
and a loop device (which rounds a file down to 512-byte sectors) loses nothing.  The
squashfs part is byte for byte the store's file: its sha256 is the store's
``SquashfsDigest``.

Reading is cheap (two preads: the superblock and the tail) and imports only ``os``
until a trailer is found.  A trailer is untrusted input: bad JSON, lengths past the
file or the limit, wrong types and a config that ``imageconfig.checked_config``
refuses are one ImageConfigError line, never a traceback.  A file without a footer is
a plain squashfs: no config (it runs /bin/sh, as Apptainer's do).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

MAGIC = b"mesobox.sqfs"
VERSION = 1
FOOTER_SIZE = 32
ALIGN = 4096
MAX_JSON = 1 << 20  # an image config is a few KB; a larger trailer is refused, not read
MEDIA_TYPE = "application/vnd.mesobox.squashfs.image-config.v1+json"
_TAIL = 64 * 1024  # one pread at the end of the file holds the footer and any usual JSON
_SUPERBLOCK = 48  # squashfs 4.0: magic at 0, bytes_used (u64) at 40


def trailer(payload: dict[str, Any], offset: int) -> bytes:
    """The bytes to append to a squashfs of ``offset`` bytes: JSON, padding, footer."""
    import json

    data = json.dumps(payload, indent=None, separators=(",", ":"), ensure_ascii=True).encode()
    if len(data) > MAX_JSON:
        from mesobox.errors import ImageConfigError

        raise ImageConfigError(f"the image config is {len(data)} bytes as JSON, over the {MAX_JSON} a portable "
                               "squashfs file may carry")
    end = offset + len(data) + FOOTER_SIZE
    pad = -end % ALIGN
    footer = (MAGIC + VERSION.to_bytes(4, "little") + offset.to_bytes(8, "little")
              + len(data).to_bytes(8, "little"))
    return data + b"\0" * pad + footer


def read_trailer(fd: int, where: str) -> tuple[bytes, int] | None:
    """(JSON bytes, offset where the squashfs ends) of the open file ``fd``, or None when it
    is no squashfs or has no trailer; ImageConfigError for a footer that lies."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, _SUPERBLOCK, 0)
    if len(head) < _SUPERBLOCK or head[:4] != b"hsqs" or size < _SUPERBLOCK + FOOTER_SIZE:
        return None
    tail_start = max(size - _TAIL, 0)
    tail = os.pread(fd, size - tail_start, tail_start)
    footer = tail[-FOOTER_SIZE:]
    if len(footer) != FOOTER_SIZE or footer[:12] != MAGIC:
        return None
    version = int.from_bytes(footer[12:16], "little")
    offset = int.from_bytes(footer[16:24], "little")
    length = int.from_bytes(footer[24:32], "little")
    if version != VERSION:
        _refuse(where, f"its image config has format version {version}, this mesobox reads {VERSION}",
                "a newer mesobox wrote it: upgrade, or export the image again with this one")
    used = int.from_bytes(head[40:48], "little")
    if length > MAX_JSON:
        _refuse(where, f"its image config claims {length} bytes, over the limit of {MAX_JSON}")
    if offset < used or offset + length > size - FOOTER_SIZE:
        _refuse(where, "its image config trailer points outside the file or into the filesystem")
    if offset >= tail_start:
        data = tail[offset - tail_start:offset - tail_start + length]
    else:
        data = os.pread(fd, length, offset)
    if len(data) != length:
        _refuse(where, "its image config trailer is cut short")
    return data, offset


def parse(data: bytes, where: str) -> dict[str, Any]:
    """The trailer's JSON, checked: {"config": checked config, "reference", "digest", …}
    (every field but "config" a string or None)."""
    import json

    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        _refuse(where, "its image config is not valid JSON")
    if not isinstance(doc, dict):
        _refuse(where, "its image config is not a JSON object")
    from mesobox.image.imageconfig import checked_config

    out: dict[str, Any] = {"config": checked_config(doc.get("config"), where)}
    for key in ("reference", "digest", "indexDigest", "configDigest", "platform", "squashfsDigest", "mediaType"):
        value = doc.get(key)
        if value is not None and (not isinstance(value, str) or "\x00" in value or len(value) > 4096):
            _refuse(where, f"its image config's {key!r} is not a string")
        out[key] = value
    return out


def read_file(path: str) -> tuple[dict[str, Any] | None, int]:
    """(the checked trailer or None, bytes of the squashfs part) of the file ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        found = read_trailer(fd, f"image file {path}")
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if found is None:
        return None, size
    return parse(found[0], f"image file {path}"), found[1]


def _refuse(where: str, problem: str, hint: str = "the file is damaged or hostile; export the image again "
            "(`mesobox export --format squashfs`)") -> NoReturn:
    from mesobox.errors import ImageConfigError

    raise ImageConfigError(f"{where}: {problem}", hint=hint)
