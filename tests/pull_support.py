"""Helpers for the pull tests: a feature-rich test image, tree comparison, store checks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

from conftest import make_busybox_rootfs, make_oci_image

TreeEntry = tuple[str, int, str]  # (type, mode without setuid/setgid, target-or-sha256)


def layer_base(rootfs: Path) -> None:
    make_busybox_rootfs(rootfs)
    (rootfs / "etc" / "motd").write_text("welcome\n")
    opt = rootfs / "opt"
    (opt / "a").mkdir(parents=True)
    (opt / "a" / "x").write_text("x1\n")
    (opt / "a" / "y").write_text("y1\n")
    (opt / "keep").write_text("kept\n")
    (opt / "hl1").write_text("hardlinked\n")
    os.link(opt / "hl1", opt / "hl2")
    (opt / "link").symlink_to("a/x")
    (opt / "dangling").symlink_to("/nonexistent/target")
    os.mkfifo(opt / "fifo")
    (opt / "opq").mkdir()
    (opt / "opq" / "old").write_text("old\n")
    (opt / "..hiddenfile").write_text("dots\n")
    shutil.copy2(rootfs / "bin" / "busybox", rootfs / "bin" / "suid-busybox")
    os.chmod(rootfs / "bin" / "suid-busybox", 0o4755)
    (opt / "ro").mkdir()
    (opt / "ro" / "file").write_text("in a read-only dir\n")
    os.chmod(opt / "ro", 0o555)


def layer_changes(rootfs: Path) -> None:
    opt = rootfs / "opt"
    (rootfs / "etc" / "motd").unlink()  # whiteout
    shutil.rmtree(opt / "opq")  # whiteouts of a whole directory…
    (opt / "opq").mkdir()  # …recreated with new content
    (opt / "opq" / "new").write_text("new\n")
    (opt / "a" / "x").write_text("x2\n")
    os.link(opt / "keep", opt / "keep-hl")  # hardlink to a file of a lower layer
    os.chmod(opt / "ro", 0o755)


def layer_types(rootfs: Path) -> None:
    opt = rootfs / "opt"
    (opt / "a" / "y").unlink()  # file -> directory
    (opt / "a" / "y").mkdir()
    (opt / "a" / "y" / "inside").write_text("now a dir\n")
    with open(opt / "sparse", "wb") as f:
        f.seek(8 * 1024 * 1024)
        f.write(b"end")


IMAGE_CONFIG = (
    "--config.env=FOO=bar",
    "--config.env=PATH=/usr/bin:/bin",
    "--config.entrypoint=/bin/echo",
    "--config.cmd=hello",
    "--config.workingdir=/opt",
    "--config.label=org.mesobox.test=yes",
)


def build_test_image(layout: Path, tag: str = "v1") -> Path:
    return make_oci_image(layout, tag, [layer_base, layer_changes, layer_types], IMAGE_CONFIG)


def tree(root: Path) -> dict[str, TreeEntry]:
    """Path -> (type, mode minus setuid/setgid, link target or content hash)."""
    out: dict[str, TreeEntry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode) & ~0o6000
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, "")
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    out[rel] = ("file", mode, hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = ("fifo", mode, "")
            else:
                out[rel] = ("other", mode, "")
    return out


def without_group_other_write(entries: dict[str, TreeEntry]) -> dict[str, TreeEntry]:
    """What mesobox makes of a tree: nothing but symlinks group/other-writable (layers.py)."""
    return {k: (kind, mode if kind == "link" else mode & ~0o022, extra) for k, (kind, mode, extra) in entries.items()}


def umoci_unpack(layout: Path, tag: str, dest: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", str(dest)],
                   check=True, capture_output=True)
    return dest / "rootfs"


def check_store(store: Path) -> list[str]:
    """Consistency of a store: every blob hashes to its name, every record's blobs and
    flattened forms exist, no half-written file outside tmp/ and ingest/."""
    problems: list[str] = []
    blobs = store / "blobs" / "sha256"
    for path in blobs.iterdir() if blobs.is_dir() else []:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != path.name:
            problems.append(f"blob {path.name} hashes to {digest}")
    for rec_path in (store / "images").glob("*.json") if (store / "images").is_dir() else []:
        rec = json.loads(rec_path.read_text())
        needed = [rec["digest"], rec["config_digest"], *(layer["digest"] for layer in rec["layers"])]
        for digest in needed:
            if not (blobs / digest.split(":")[1]).is_file():
                problems.append(f"{rec_path.name}: missing blob {digest}")
        hexd = rec["digest"].split(":")[1]
        if not (store / "rootfs" / hexd).is_dir() and not (store / "squashfs" / f"{hexd}.sqfs").is_file():
            problems.append(f"{rec_path.name}: no flattened form")
    for sub in ("blobs/sha256", "images", "squashfs"):
        for path in (store / sub).iterdir() if (store / sub).is_dir() else []:
            if path.name.startswith(".") or path.name.endswith((".tmp", ".partial")):
                problems.append(f"half-written file {path}")
    return problems
