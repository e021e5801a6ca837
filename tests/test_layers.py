"""Layer application: hostile tars never reach outside the rootfs; legit layers match umoci."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as hs

from layers_support import (
    Entry,
    chardev,
    dir_,
    fifo,
    hard,
    make_sentinel,
    oci_layer_blobs,
    opaque,
    reg,
    snapshot,
    sym,
    tar_bytes,
    wh,
    write_blob,
    write_layer,
)
from mesobox.errors import LayerError, StoreError
from mesobox.image import layers, tarsafe
from mesobox.image.layers import LayerPolicy, LayerStats, apply_layer, apply_layers

ROOT = LayerPolicy(unprivileged=False)
USER = LayerPolicy(unprivileged=True)


class Box:
    """A rootfs next to a sentinel directory; layers are written into ``layers/``."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.rootfs = top / "rootfs"
        self.rootfs.mkdir()
        self.sentinel = make_sentinel(top)
        self.layers = top / "layers"
        self.layers.mkdir()
        self.before = self.outside()

    def outside(self) -> tuple[object, ...]:
        return (sorted(p.name for p in self.top.iterdir()), snapshot(self.sentinel, times=True))

    def layer(self, entries: list[Entry], compression: str = "gzip") -> Path:
        n = len(list(self.layers.iterdir()))
        return write_layer(self.layers / f"layer{n}", entries, compression)

    def apply(self, *layers: list[Entry], policy: LayerPolicy = ROOT) -> LayerStats:
        return apply_layers(self.rootfs, [self.layer(e) for e in layers], policy)

    def untouched(self) -> None:
        assert self.outside() == self.before


@pytest.fixture()
def box(world_tmp: Path) -> Box:
    return Box(world_tmp)


# --- hostile layers ------------------------------------------------------------------

def _hostile_cases(sentinel: str) -> dict[str, tuple[list[list[Entry]], str]]:
    return {
        "dotdot": ([[reg("../sentinel/secret", b"pwned")]], "contains '..'"),
        "dotdot-deep": ([[reg("a/b/../../../sentinel/new", b"x")]], "contains '..'"),
        "symlink-then-write": ([[sym("link", "../sentinel"), reg("link/secret", b"pwned")]], "symlink 'link'"),
        "symlink-layer1-write-layer2": ([[sym("link", sentinel)], [reg("link/secret", b"pwned")]], "symlink 'link'"),
        "symlink-to-root": ([[sym("r", "/"), reg(f"r{sentinel}/secret", b"pwned")]], "symlink 'r'"),
        "symlink-mkdir-through": ([[sym("link", sentinel), dir_("link/newdir")]], "symlink 'link'"),
        "hardlink-etc-passwd": ([[hard("passwd", "/etc/passwd")]], "does not exist in the rootfs"),
        "hardlink-dotdot": ([[hard("x", "../sentinel/secret")]], "contains '..'"),
        "hardlink-through-symlink": ([[sym("link", sentinel), hard("x", "link/secret")]], "symlink 'link'"),
        "hardlink-to-rootfs": ([[hard("x", "./")]], "hardlink to the rootfs"),
        "whiteout-dotdot-name": ([[reg(".wh...")]], "names no entry"),
        "whiteout-in-parent": ([[reg("../.wh.sentinel")]], "contains '..'"),
        "whiteout-through-symlink": ([[sym("link", sentinel)], [wh("link/secret")]], "symlink 'link'"),
        "opaque-through-symlink": ([[sym("link", sentinel)], [opaque("link")]], "symlink 'link'"),
        "symlink-named-dot": ([[sym(".", sentinel)]], "rootfs directory itself"),
        "symlink-replacing-rootfs": ([[sym("./", "/")]], "rootfs directory itself"),
        "file-replacing-rootfs": ([[reg("/", b"x")]], "rootfs directory itself"),
        "nul-in-name": ([[reg("dir-\u00fc/a\x00b", b"x")]], "NUL"),  # pax path: NUL survives
        "name-too-long": ([[reg("a/" * 2100 + "f", b"x")]], "longer than"),
    }


HOSTILE = list(_hostile_cases("/S"))


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("policy", [ROOT, USER], ids=["as-root", "unprivileged"])
def test_hostile_layer_is_refused_and_nothing_outside_changes(box: Box, case: str, policy: LayerPolicy) -> None:
    layers, expected = _hostile_cases(str(box.sentinel))[case]
    with pytest.raises(LayerError) as err:
        box.apply(*layers, policy=policy)
    message = str(err.value)
    assert expected in message
    assert "layer " in message and "\n" not in message
    box.untouched()
    assert not os.path.exists("/passwd") or not os.path.samefile("/etc/passwd", box.rootfs / "passwd")


def test_absolute_names_are_made_relative(box: Box) -> None:
    stats = box.apply([reg(f"{box.sentinel}/secret", b"inside"), reg("/etc/passwd", b"root\n")])
    box.untouched()
    assert (box.rootfs / str(box.sentinel).lstrip("/") / "secret").read_bytes() == b"inside"
    assert (box.rootfs / "etc/passwd").read_bytes() == b"root\n"
    assert stats.neutralised == 2


def test_directory_entry_over_symlink_replaces_it_never_chmods_target(box: Box) -> None:
    """containerd CVE-2021-32760: the mode of a dir entry must not reach a symlink's target."""
    box.apply([sym("link", str(box.sentinel)), sym("rel", "../sentinel")], [dir_("link", 0o737), dir_("rel", 0o700)])
    box.untouched()
    assert stat.S_IMODE(os.lstat(box.rootfs / "link").st_mode) == 0o715  # the entry's mode, less g/o write
    assert (box.rootfs / "rel").is_dir() and not (box.rootfs / "rel").is_symlink()


def test_file_over_planted_symlink_replaces_the_link(box: Box) -> None:
    box.apply([sym("passwd", f"{box.sentinel}/secret")], [reg("passwd", b"mine")])
    box.untouched()
    assert (box.rootfs / "passwd").read_bytes() == b"mine" and not (box.rootfs / "passwd").is_symlink()


def _zeros_layer(path: Path, size: int, compression: str, kind: bytes = tarfile.REGTYPE) -> Path:
    class Zeros(io.RawIOBase):
        def __init__(self, n: int) -> None:
            self.left = n

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    with open(path, "wb") as raw:
        if compression == "gzip":
            out: io.IOBase = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1)
        else:
            out = zstandard.ZstdCompressor(level=1).stream_writer(raw)
        with tarfile.open(fileobj=out, mode="w|") as tar:
            ti = tarfile.TarInfo("zeros")
            ti.type = kind
            ti.size = size
            tar.addfile(ti, io.BufferedReader(Zeros(size), 1 << 20))
        out.close()
    return path


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("kind", [tarfile.REGTYPE, b"Z"], ids=["file", "unknown-type"])
def test_decompression_bomb_stops_at_the_limit(
    box: Box, compression: str, kind: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A regular file is refused on its size before a byte is inflated; the data of a
    member type mesobox skips still streams through, and stops at the same limit.  What
    is checked is how much was inflated, not how long it took."""
    blob = _zeros_layer(box.layers / "bomb", 200 * 1024**2, compression, kind)
    assert blob.stat().st_size < 2 * 1024**2
    streams: list[layers.TarStream] = []
    inflated = [0]
    real_decompressor = tarsafe._decompressor

    class Counting:  # the decompressor, counting what it inflates (the prefetch thread reads ahead)
        def __init__(self, raw: io.BufferedReader, kind: str) -> None:
            self.src = real_decompressor(raw, kind)

        def read(self, n: int) -> bytes:
            data: bytes = self.src.read(n)
            inflated[0] += len(data)
            return data

        def close(self) -> None:
            self.src.close()

    class Recorded(layers.TarStream):
        def __init__(self, raw: io.BufferedReader, limit: int) -> None:
            super().__init__(raw, limit)
            streams.append(self)

    monkeypatch.setattr(tarsafe, "_decompressor", Counting)
    monkeypatch.setattr(layers, "TarStream", Recorded)
    limit = 50 * 1024**2
    with pytest.raises(LayerError) as err:
        apply_layers(box.rootfs, [blob], LayerPolicy(max_bytes=limit))
    assert "exceeds the limit of 52428800 bytes" in str(err.value)
    [stream] = streams
    # handed out: the first header only for the file, never past the limit for the skipped data …
    assert stream.pos <= (limit if kind == b"Z" else tarfile.BLOCKSIZE)
    # … and inflated: no more than the prefetch queue's few chunks beyond that, never the 200 MiB
    assert inflated[0] <= stream.pos + 8 * tarsafe.CHUNK, inflated
    assert "max_image_bytes" in str(err.value) + str(err.value.hint)
    box.untouched()


def test_budget_covers_all_layers_together(box: Box) -> None:
    one = box.layer([reg("a", os.urandom(3 * 1024**2))])
    two = box.layer([reg("b", os.urandom(3 * 1024**2))])
    assert apply_layers(box.rootfs, [one], LayerPolicy(max_bytes=4 * 1024**2)).tar_bytes > 3 * 1024**2
    with pytest.raises(LayerError, match="exceeds the limit"):
        apply_layers(box.rootfs, [one, two], LayerPolicy(max_bytes=4 * 1024**2))


def test_quadratic_pax_header_never_reaches_tarfile(box: Box) -> None:
    """CVE-2024-6232: tarfile's pax regexes backtrack on long digit runs (Python < 3.11.10).
    mesobox's stream refuses the payload as it reads it, so tarfile's regexes never see
    it: the refusal is mesobox's own message, not a parse that merely ended."""
    ti = tarfile.TarInfo("f")
    ti.pax_headers = {"comment": "1" * 200_000}
    blob = write_blob(box.layers / "pax", tar_bytes([Entry(ti)]), "gzip")
    with pytest.raises(LayerError, match=r"malformed pax header \(run of 64 digits\)"):
        apply_layers(box.rootfs, [blob], ROOT)


def test_negative_size_cannot_loop(box: Box) -> None:
    """A base-256 negative size makes tarfile seek backwards (CVE-2025-8194): refused."""
    header = bytearray(tar_bytes([reg("f", b"")], fmt=tarfile.GNU_FORMAT)[:512])
    header[124:136] = b"\xff" * 10 + b"\xf8\x00"  # size field, base-256: -2048
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\x00" % sum(header)
    data = bytes(header) + b"\0" * 2048
    blob = write_blob(box.layers / "neg", data, "plain")
    # mesobox's own wording, whatever this Python's tarfile says ("invalid offset" on some
    # patch levels): the header is refused before tarfile parses it
    with pytest.raises(LayerError, match=r": negative size or offset$"):
        apply_layers(box.rootfs, [blob], ROOT)
    assert os.listdir(box.rootfs) == []
    box.untouched()


@pytest.mark.parametrize(
    "damage",
    ["truncated-gzip", "truncated-zstd", "truncated-tar", "truncated-data", "garbage", "empty", "bad-crc"],
)
def test_corrupt_layers_are_layer_errors(box: Box, damage: str) -> None:
    raw = tar_bytes([reg("a", os.urandom(300_000)), reg("b", b"x" * 1000)])
    if damage == "truncated-gzip":
        data = gzip.compress(raw)[:-5000]
    elif damage == "truncated-zstd":
        data = zstandard.ZstdCompressor().compress(raw)[: len(raw) // 2]
    elif damage == "truncated-tar":
        data = raw[:1536]  # ends exactly after a header block
    elif damage == "truncated-data":
        data = raw[:100_000]  # plain tar cut inside the first file's data (copy_file_range path)
    elif damage == "garbage":
        data = os.urandom(4096)
    elif damage == "empty":
        data = b""
    else:
        data = bytearray(gzip.compress(raw))
        data[-8] ^= 0xFF  # CRC32 of the gzip trailer
        data = bytes(data)
    blob = box.layers / damage
    blob.write_bytes(data)
    with pytest.raises(LayerError) as err:
        apply_layers(box.rootfs, [blob], ROOT)
    assert str(blob) in str(err.value)


@pytest.mark.root
def test_disk_full_is_a_store_error(world_tmp: Path) -> None:
    mnt = world_tmp / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "rootfs").mkdir()
        blob = write_layer(world_tmp / "big", [reg("big", os.urandom(3 * 1024**2))])
        with pytest.raises(StoreError) as err:
            apply_layers(mnt / "rootfs", [blob], ROOT)
        assert "no space left" in str(err.value) and err.value.hint
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# --- correctness ---------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["gzip", "zstd", "plain"])
def test_entry_types_modes_and_times(box: Box, compression: str) -> None:
    warnings: list[str] = []
    entries = [
        reg("usr/bin/tool", b"#!/bin/sh\n", 0o755),
        dir_("usr/bin", 0o555),  # after its child, read-only: applied last
        reg("usr/bin/late", b"late", 0o700),
        reg("etc/shadow", b"secret", 0o640),
        reg("..hiddenfile", b"dots"),
        reg("./dotslash", b"ds"),
        reg("dup", b"first"),
        reg("dup", b"second"),
        sym("usr/bin/sh", "tool"),
        sym("abs", "/etc/shadow"),
        hard("usr/bin/tool2", "usr/bin/tool"),
        fifo("run/fifo", 0o620),
        reg("usr/bin/su", b"suid", 0o4755),
        reg("usr/bin/wall", b"sgid", 0o2755),
        dir_("tmp", 0o1777),
    ]
    stats = apply_layers(
        box.rootfs, [box.layer(entries, compression)], LayerPolicy(unprivileged=True, warn=warnings.append)
    )
    r = box.rootfs
    assert (r / "usr/bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(os.stat(r / "usr/bin").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(r / "usr/bin/late").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(r / "etc/shadow").st_mode) == 0o640
    assert (r / "..hiddenfile").read_bytes() == b"dots" and (r / "dotslash").read_bytes() == b"ds"
    assert (r / "dup").read_bytes() == b"second"
    assert os.readlink(r / "usr/bin/sh") == "tool" and os.readlink(r / "abs") == "/etc/shadow"
    assert os.path.samefile(r / "usr/bin/tool", r / "usr/bin/tool2")
    # group write dropped: nothing in an image is group/other-writable
    assert stat.S_ISFIFO(os.lstat(r / "run/fifo").st_mode) and stat.S_IMODE(os.lstat(r / "run/fifo").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(r / "usr/bin/su").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(r / "usr/bin/wall").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(r / "tmp").st_mode) == 0o1755  # sticky kept, world write dropped
    for p in ("usr/bin/tool", "usr/bin", "tmp", "etc/shadow"):
        assert os.stat(r / p).st_mtime_ns == 1_600_000_000 * 10**9, p
    assert os.lstat(r / "abs").st_mtime_ns == 1_600_000_000 * 10**9
    assert stats.dropped_setuid == 2 and stats.hardlinks == 1 and stats.entries == len(entries)
    assert any("setuid" in w and "usr/bin/su" in w for w in warnings)
    box.untouched()


def test_a_replaced_directory_never_gets_the_old_ones_mode(box: Box) -> None:
    """A 0555 directory replaced by a FIFO, then re-made as a parent of a later entry: the
    new directory (which often reuses the old inode number) keeps its own 0755."""
    box.apply([dir_("a", 0o555)], [fifo("a"), fifo("a/a")], policy=USER)
    assert stat.S_IMODE(os.stat(box.rootfs / "a").st_mode) == 0o755
    assert stat.S_ISFIFO(os.lstat(box.rootfs / "a" / "a").st_mode)


def test_whiteouts_and_opaque_directories(box: Box) -> None:
    box.apply(
        [reg("a", b"a"), reg("d/x", b"x"), reg("d/y", b"y"), reg("o/old", b"o"), reg("o/sub/deep", b"d"),
         reg("keep", b"k")],
        [wh("a"), wh("d/x"), reg("o/new1", b"1"), opaque("o"), reg("o/new2", b"2"), reg("o/sub/newdeep", b"n"),
         wh("nonexistent"), wh("missingdir/x"), reg(".wh..wh.plnk/1.2", b"")],
    )
    r = box.rootfs
    assert not (r / "a").exists() and not (r / "d/x").exists() and (r / "d/y").read_bytes() == b"y"
    assert sorted(os.listdir(r / "o")) == ["new1", "new2", "sub"]
    assert os.listdir(r / "o/sub") == ["newdeep"]
    assert (r / "keep").exists()
    assert not any(n.startswith(".wh.") for n in os.listdir(r))


def test_whiteout_spares_entries_of_its_own_layer(box: Box) -> None:
    box.apply([reg("f", b"lower"), reg("g", b"lower")], [reg("f", b"upper"), wh("f"), wh("g"), reg("g", b"new")])
    assert (box.rootfs / "f").read_bytes() == b"upper"
    assert (box.rootfs / "g").read_bytes() == b"new"


def test_whiteout_of_a_directory_removes_the_tree(box: Box) -> None:
    box.apply([dir_("d/ro", 0o555), reg("d/ro/f", b"f", 0o444)], [wh("d")], policy=USER)
    assert not (box.rootfs / "d").exists()


def test_hardlinks_within_and_across_layers(box: Box) -> None:
    box.apply([reg("bin/a", b"A", 0o755), hard("bin/b", "bin/a")], [hard("sbin/c", "bin/a"), hard("bin/b", "bin/a")])
    r = box.rootfs
    assert os.path.samefile(r / "bin/a", r / "sbin/c") and os.stat(r / "bin/a").st_nlink == 3


def test_hardlink_to_a_directory_is_refused(box: Box) -> None:
    with pytest.raises(LayerError, match="is a directory"):
        box.apply([dir_("d"), hard("x", "d")])


def test_file_and_directory_swap_types_across_layers(box: Box) -> None:
    box.apply(
        [reg("x", b"file"), reg("y/z", b"z"), sym("s", "target"), reg("deep", b"file")],
        [dir_("x"), reg("x/c", b"c"), reg("y", b"now a file"), dir_("s", 0o750), reg("deep/er/f", b"f")],
    )
    r = box.rootfs
    assert (r / "x/c").read_bytes() == b"c" and (r / "y").read_bytes() == b"now a file"
    assert (r / "s").is_dir() and not (r / "s").is_symlink() and (r / "deep/er/f").exists()


def test_umoci_whiteouts_under_a_path_turned_into_a_file(box: Box) -> None:
    """umoci writes `d/.wh.x` and then `d` as a file in the same layer (and the reverse)."""
    box.apply(
        [reg("d/x", b"x"), reg("d/y", b"y"), reg("e/x", b"x")],
        [wh("d/x"), reg("d", b"file now"), reg("e", b"file too"), wh("e/x")],
    )
    assert (box.rootfs / "d").read_bytes() == b"file now"
    assert (box.rootfs / "e").read_bytes() == b"file too"


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_files_stay_sparse(box: Box, fmt: str) -> None:
    src = box.top / "sparse-src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(64 * 1024**2)
        f.write(b"middle")
        f.truncate(128 * 1024**2)
    tar = box.layers / f"sparse-{fmt}.tar"
    subprocess.run(["tar", f"--format={fmt}", "--sparse", "-cf", str(tar), "-C", str(src), "sparse"], check=True)
    stats = apply_layers(box.rootfs, [tar], USER)
    out = box.rootfs / "sparse"
    assert out.stat().st_size == 128 * 1024**2 and out.stat().st_blocks * 512 < 1024**2
    with open(out, "rb") as f:
        f.seek(64 * 1024**2 - 2)
        assert f.read(10) == b"\0\0middle\0\0"
    assert stats.bytes_written < 1024**2


def test_device_nodes_skipped_unprivileged(box: Box) -> None:
    warnings: list[str] = []
    stats = box.apply([chardev("dev/null", 1, 3), hard("dev/null2", "dev/null"), reg("x")],
                      policy=LayerPolicy(warn=warnings.append))
    assert not (box.rootfs / "dev/null").exists() and not (box.rootfs / "dev/null2").exists()
    assert stats.skipped_devices == 1
    assert len(warnings) == 1 and "device node" in warnings[0] and "dev/null" in warnings[0]


@pytest.mark.root
def test_ownership_and_setuid_as_root_never_device_nodes(box: Box) -> None:
    warnings: list[str] = []
    os.chmod(box.rootfs, 0o755)
    stats = box.apply([chardev("dev/null", 1, 3), reg("home/u/f", b"x", 0o600, uid=1234, gid=4321),
                       dir_("home/u", 0o700, uid=1234, gid=4321), reg("bin/su", b"s", 0o4755)],
                      policy=LayerPolicy(unprivileged=False, keep_setuid=True, warn=warnings.append))
    assert not os.path.lexists(box.rootfs / "dev/null") and stats.skipped_devices == 1
    assert any("device node" in w and "dev/null" in w for w in warnings)
    assert (os.stat(box.rootfs / "home/u/f").st_uid, os.stat(box.rootfs / "home/u").st_gid) == (1234, 4321)
    assert stat.S_IMODE(os.stat(box.rootfs / "bin/su").st_mode) == 0o4755
    # a setuid-root file was kept: nobody else may reach into the rootfs
    assert stats.kept_setuid == 1 and stat.S_IMODE(os.stat(box.rootfs).st_mode) == 0o700


@pytest.mark.root
def test_unprivileged_policy_never_chowns(box: Box) -> None:
    box.apply([reg("f", b"x", uid=1234, gid=4321), reg("bin/su", b"s", 0o4755)],
              policy=LayerPolicy(unprivileged=True, keep_setuid=True))
    assert os.stat(box.rootfs / "f").st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(box.rootfs / "bin/su").st_mode) == 0o755  # keep_setuid is for root only


def test_apply_layer_single_and_stats(box: Box) -> None:
    blob = box.layer([reg("a/b", b"hello")])
    stats = apply_layer(box.rootfs, blob, USER)
    assert stats.entries == 1 and stats.bytes_written == 5 and stats.tar_bytes >= 2048
    with pytest.raises(LayerError, match="exceeds"):
        apply_layer(box.rootfs, blob, USER, budget=1000)


# --- differential against umoci ------------------------------------------------------

def _l1(r: Path) -> None:
    from conftest import make_busybox_rootfs

    make_busybox_rootfs(r)  # ~400 applet symlinks, a 1777 /tmp, /etc files
    for d in ("usr/bin", "etc", "opq/sub", "gone/inner", "willfile/child", "ro", "var/empty"):
        (r / d).mkdir(parents=True, exist_ok=True)
    (r / "usr/bin/tool").write_bytes(os.urandom(200_000))
    os.chmod(r / "usr/bin/tool", 0o755)
    os.link(r / "usr/bin/tool", r / "usr/bin/tool-hl")
    os.symlink("tool", r / "usr/bin/alias")
    os.symlink("/etc/hostname", r / "etc/abs-link")
    (r / "etc/hostname").write_text("box\n")
    (r / "usr/bin/su").write_bytes(b"suid")
    os.chmod(r / "usr/bin/su", 0o4755)
    os.mkfifo(r / "etc/fifo", 0o640)
    for n in ("a", "b", "sub/c"):
        (r / "opq" / n).write_text(n)
    (r / "gone/inner/f").write_text("f")
    (r / "willdir").write_text("file")
    (r / "willfile/child/x").parent.mkdir(exist_ok=True)
    (r / "willfile/child/x").write_text("x")
    (r / "ro/f").write_text("ro")
    os.chmod(r / "ro", 0o555)
    (r / "..hiddenfile").write_text("h")
    (r / "deleted-file").write_text("d")


def _l2(r: Path) -> None:
    (r / "deleted-file").unlink()
    shutil.rmtree(r / "gone")
    shutil.rmtree(r / "opq")
    (r / "opq").mkdir()
    (r / "opq/new").write_text("new")
    (r / "willdir").unlink()
    (r / "willdir").mkdir()
    (r / "willdir/in").write_text("in")
    shutil.rmtree(r / "willfile")
    (r / "willfile").write_text("now a file")
    os.link(r / "etc/hostname", r / "etc/hostname-hl")
    os.unlink(r / "usr/bin/alias")
    os.symlink("/usr/bin/tool-hl", r / "usr/bin/alias")


def _l3(r: Path) -> None:
    os.chmod(r / "ro", 0o755)
    (r / "ro/g").write_text("g")
    os.chmod(r / "ro", 0o500)
    os.chmod(r / "usr/bin/su", 0o6750)
    (r / "usr/bin/tool").write_bytes(b"changed")


def _comparable(tree: dict[str, tuple[object, ...]], drop: int = 0o6000) -> dict[str, tuple[object, ...]]:
    # (type, mode without setuid/setgid — umoci's rootless unpack keeps them — content/link target);
    # umoci's trees are compared with group/other write dropped too (``drop=0o6022``), as
    # mesobox never makes anything of an image group/other-writable
    return {k: (v[0], int(v[1]) & ~(0 if v[0] == stat.S_IFLNK else drop), v[4])  # type: ignore[call-overload]
            for k, v in tree.items()}


@pytest.fixture(scope="module")
def umoci_image(shared_tmp: Path) -> Path:
    layout = shared_tmp / "layers-oci"
    return make_oci_image_checked(layout)


def make_oci_image_checked(layout: Path) -> Path:
    from conftest import make_oci_image

    make_oci_image(layout, "t", [_l1, _l2, _l3])
    os.chmod(layout, 0o755)
    return layout


def test_matches_umoci_unpack_as_root(umoci_image: Path, world_tmp: Path) -> None:
    blobs = oci_layer_blobs(umoci_image, "t")
    assert len(blobs) == 3
    bundle = world_tmp / "bundle"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{umoci_image}:t", str(bundle)], check=True,
                   capture_output=True)
    ours = world_tmp / "ours"
    ours.mkdir()
    apply_layers(ours, blobs, ROOT)
    expected = _comparable(snapshot(bundle / "rootfs"), drop=0o6022)
    assert expected["tmp"][1] == 0o1755  # busybox's 1777 /tmp: world write dropped
    assert _comparable(snapshot(ours)) == expected
    assert "opq/new" in expected and "opq/a" not in expected and "willfile" in expected


@pytest.mark.userns
def test_user_reapplies_over_readonly_directories(world_tmp: Path, user, mesobox_src: Path, test_python: str) -> None:
    """Unprivileged, a 0500 directory left by an earlier call is opened up and restored."""
    box = Box(world_tmp)
    one = box.layer([dir_("ro", 0o500), reg("ro/f", b"f", 0o400), dir_("ro/sub", 0o000), chardev("dev/null")])
    two = box.layer([reg("ro/g", b"g"), reg("ro/sub/h", b"h"), wh("ro/f")])
    os.chmod(box.rootfs, 0o777)
    script = ("import sys; from pathlib import Path; from mesobox.image.layers import *\n"
              "r = Path(sys.argv[1]); p = LayerPolicy(warn=print)\n"
              "apply_layers(r, [Path(sys.argv[2])], p); apply_layers(r, [Path(sys.argv[3])], p)\n")
    res = user.run([test_python, "-c", script, str(box.rootfs), str(one), str(two)],
                   env={"PYTHONPATH": str(mesobox_src), "PYTHONDONTWRITEBYTECODE": "1"})
    assert res.returncode == 0, res.stderr.decode()
    assert b"skipped 1 device node" in res.stdout
    r = box.rootfs
    assert stat.S_IMODE(os.stat(r / "ro").st_mode) == 0o500 and stat.S_IMODE(os.stat(r / "ro/sub").st_mode) == 0
    assert sorted(os.listdir(r / "ro")) == ["g", "sub"] and os.listdir(r / "ro/sub") == ["h"]
    assert {os.lstat(p).st_uid for p in (r / "ro", r / "ro/g", r / "ro/sub/h")} == {user.uid}
    box.untouched()


@pytest.mark.userns
def test_matches_umoci_unpack_as_user_exactly(umoci_image: Path, world_tmp: Path, user, mesobox_src: Path,
                                              test_python: str) -> None:
    layout = world_tmp / "layout"
    shutil.copytree(umoci_image, layout)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(layout)], check=True)
    blobs = [str(layout / p.relative_to(umoci_image)) for p in oci_layer_blobs(umoci_image, "t")]
    bundle, ours = world_tmp / "bundle", world_tmp / "ours"
    assert user.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:t", str(bundle)]).returncode == 0
    script = ("import sys; from pathlib import Path; from mesobox.image.layers import *\n"
              "r = Path(sys.argv[1]); r.mkdir(); apply_layers(r, [Path(b) for b in sys.argv[2:]], LayerPolicy())\n")
    res = user.run([test_python, "-c", script, str(ours), *blobs],
                   env={"PYTHONPATH": str(mesobox_src), "PYTHONDONTWRITEBYTECODE": "1"})
    assert res.returncode == 0, res.stderr.decode()
    assert _comparable(snapshot(ours)) == _comparable(snapshot(bundle / "rootfs"), drop=0o6022)


# --- property: random safe layers --------------------------------------------------

NAMES = hs.sampled_from(["a", "b", "..c", ".wh.a", ".wh.b", ".wh..wh..opq"])
PATHS = hs.lists(NAMES, min_size=1, max_size=3).map("/".join)
ENTRY = hs.one_of(
    hs.builds(lambda p, d: reg(p, d), PATHS, hs.binary(max_size=64)),
    hs.builds(lambda p, m: dir_(p, m), PATHS, hs.sampled_from([0o755, 0o555, 0o700, 0o1777])),
    hs.builds(sym, PATHS, hs.sampled_from(["a", "../../..", "/", "/etc/passwd", "../sentinel", "b/a"])),
    hs.builds(hard, PATHS, PATHS),
    hs.builds(fifo, PATHS),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=hs.lists(hs.lists(ENTRY, max_size=8), min_size=1, max_size=3))
@example(layers=[[reg("a"), fifo(".wh.a/b")], [reg("a"), hard("a", ".wh.a/b"), reg(".wh.a/.wh.b")]])
@example(layers=[[reg("a"), fifo(".wh.a/a")], [reg("a"), hard("a", ".wh.a/a"), reg(".wh.a/a")]])
@example(layers=[[reg("a"), reg(".wh.b/a")], [hard("a", ".wh.b/a"), fifo(".wh..wh..opq")]])
@example(layers=[[reg("a"), reg("b")], [reg("a"), hard("a", "b"), reg("b/a")]])
def test_random_layers_stay_inside_and_are_idempotent(world_tmp: Path, layers: list[list[Entry]]) -> None:
    box = Box(Path(tempfile_dir(world_tmp)))
    blobs = [box.layer(e, "plain") for e in layers]
    try:
        apply_layers(box.rootfs, blobs, USER)
    except LayerError as err:
        event(f"refused: {str(err).rpartition(': ')[2][:30]}")
        box.untouched()
        return
    event("applied")
    box.untouched()
    if _hardlink_target_changed_later(layers[-1]):
        return  # re-applying links to what the layer itself replaced: not the same tree, by design
    first = snapshot(box.rootfs)
    try:
        apply_layers(box.rootfs, blobs[-1:], USER)
    except LayerError as err:
        # Only a layer that puts a symlink where it earlier wrote a directory's contents
        # cannot be re-applied (its own symlink now sits on the path): refused, not followed.
        assert "symlink" in str(err) and _symlink_over_own_dir(layers[-1])
    else:
        assert snapshot(box.rootfs) == first
    box.untouched()


def _hardlink_target_changed_later(entries: list[Entry]) -> bool:
    """A hardlink whose target a later entry of the same layer replaces, or that a
    whiteout of the same layer hides (of the target or of a directory above it,
    wherever it stands in the layer: whiteouts apply to the layers below first):
    the link meets the replacement or nothing, so the layer cannot be idempotent, or
    even applied (hypothesis found each case)."""
    for i, entry in enumerate(entries):
        if not entry.info.islnk():
            continue
        target = entry.info.linkname.strip("/")
        parts = target.split("/")
        hidden = set()
        for depth in range(len(parts)):
            above, name = "/".join(parts[:depth]), parts[depth]
            hidden |= {f"{above}/.wh.{name}".lstrip("/"), f"{above}/.wh..wh..opq".lstrip("/")}
        if any(e.info.name.strip("/") in hidden for e in entries):
            return True
        later = [e.info.name.strip("/") for e in entries[i + 1:]]
        # the target itself, a directory above it, or (a path below it) the target made a directory
        if any(name == target or target.startswith(name + "/") or name.startswith(target + "/") for name in later):
            return True
    return False


def _symlink_over_own_dir(entries: list[Entry]) -> bool:
    links = {e.info.name for e in entries if e.info.issym()}
    return any(e.info.name.startswith(link + "/") or e.info.linkname.startswith(link + "/")
               for e in entries for link in links)


def tempfile_dir(parent: Path) -> str:
    import tempfile

    return tempfile.mkdtemp(dir=parent)
