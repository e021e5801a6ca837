"""Helpers for tests/test_layers.py: crafted tar layers and whole-tree snapshots."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zstandard


@dataclass
class Entry:
    info: tarfile.TarInfo
    data: bytes = b""


def _info(name: str, kind: bytes, mode: int, mtime: int = 1_600_000_000) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = mtime
    return ti


def reg(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    ti = _info(name, tarfile.REGTYPE, mode)
    ti.size = len(data)
    ti.uid, ti.gid = uid, gid
    return Entry(ti, data)


def dir_(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    ti = _info(name, tarfile.DIRTYPE, mode)
    ti.uid, ti.gid = uid, gid
    return Entry(ti)


def sym(name: str, target: str) -> Entry:
    ti = _info(name, tarfile.SYMTYPE, 0o777)
    ti.linkname = target
    return Entry(ti)


def hard(name: str, target: str) -> Entry:
    ti = _info(name, tarfile.LNKTYPE, 0o644)
    ti.linkname = target
    return Entry(ti)


def fifo(name: str, mode: int = 0o600) -> Entry:
    return Entry(_info(name, tarfile.FIFOTYPE, mode))


def chardev(name: str, major: int = 1, minor: int = 3) -> Entry:
    ti = _info(name, tarfile.CHRTYPE, 0o666)
    ti.devmajor, ti.devminor = major, minor
    return Entry(ti)


def wh(name: str) -> Entry:
    """A whiteout for ``name`` (``dir/.wh.base``)."""
    head, _, base = name.rpartition("/")
    return reg(f"{head}/.wh.{base}" if head else f".wh.{base}")


def opaque(dirname: str) -> Entry:
    return reg(f"{dirname}/.wh..wh..opq" if dirname else ".wh..wh..opq")


def tar_bytes(entries: Iterable[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for e in entries:
            tar.addfile(e.info, io.BytesIO(e.data) if e.info.isreg() else None)
    return buf.getvalue()


def write_layer(path: Path, entries: Iterable[Entry], compression: str = "gzip") -> Path:
    data = tar_bytes(entries)
    write_blob(path, data, compression)
    return path


def write_blob(path: Path, data: bytes, compression: str = "gzip") -> Path:
    if compression == "gzip":
        data = gzip.compress(data, compresslevel=1)
    elif compression == "zstd":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def snapshot(top: Path, *, times: bool = False) -> dict[str, tuple[object, ...]]:
    """Every entry below ``top`` (never following symlinks): type, mode, owner, content."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, top)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                content: object = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(full).read_bytes()).hexdigest()
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                content = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                content = None
            extra: tuple[object, ...] = (st.st_mtime_ns,) if times else ()
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content, *extra)
    return out


def make_sentinel(top: Path) -> Path:
    """A directory outside the rootfs that no layer may touch."""
    sentinel = top / "sentinel"
    (sentinel / "sub").mkdir(parents=True)
    (sentinel / "secret").write_text("do not touch\n")
    (sentinel / "sub" / "deep").write_text("nor this\n")
    os.chmod(sentinel / "secret", 0o640)
    return sentinel


def oci_layer_blobs(layout: Path, tag: str) -> list[Path]:
    """Layer blobs of ``layout:tag`` in manifest order (base first)."""
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            manifest = json.loads(_blob(layout, desc["digest"]).read_text())
            return [_blob(layout, layer["digest"]) for layer in manifest["layers"]]
    raise KeyError(tag)


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    return layout / "blobs" / algo / hexpart
