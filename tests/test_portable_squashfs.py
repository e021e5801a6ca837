"""Portable squashfs files (image/portable.py): ``mesobox export --format squashfs``
writes the store's squashfs followed by the image config, and running the file behaves
like running the stored image; squashfs readers (squashfuse as a user, the kernel as
root, unsquashfs) ignore the trailer; a plain squashfs still runs; a hostile trailer is
one error line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_busybox_rootfs, make_oci_image
from run_support import error_line, make_squashfs
from settled_support import age

SHOW = 'echo "args=$*"; pwd; echo FOO=$FOO'
FOOTER = 32


def _layer(rootfs: Path) -> None:
    make_busybox_rootfs(rootfs)
    (rootfs / "srv").mkdir(exist_ok=True)


@pytest.fixture(scope="module")
def layout(shared_tmp: Path) -> Path:
    path = shared_tmp / "portable-oci"
    make_oci_image(path, "v1", [_layer], [
        "--config.entrypoint=/bin/sh", "--config.entrypoint=-c", f"--config.entrypoint={SHOW}",
        "--config.entrypoint=ep", "--config.cmd=c1", "--config.cmd=c2", "--config.env=FOO=bar",
        "--config.env=PATH=/usr/bin:/bin", "--config.workingdir=/srv", "--config.label=org.test=yes"])
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chmod(os.path.join(dirpath, name), 0o755 if name in dirnames else 0o644)
    os.chmod(path, 0o755)
    return path


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def exported(mesobox: Mesobox, user: User, layout: Path, out: Path) -> tuple[str, bytes]:
    """Pull oci:LAYOUT:v1 as the user, export it as a squashfs file; (ref, the store's squashfs)."""
    ref = f"oci:{layout}:v1"
    pulled = mesobox("pull", "-q", ref, as_user=user)
    assert pulled.returncode == 0, pulled.stderr.decode()
    res = mesobox("export", ref, "--format", "squashfs", "-o", str(out), as_user=user)
    assert res.returncode == 0, res.stderr.decode()
    stored = mesobox("inspect", ref, as_user=user)
    assert stored.returncode == 0, stored.stderr.decode()
    return ref, Path(json.loads(stored.stdout)["Squashfs"]).read_bytes()


def test_exported_file_runs_like_the_stored_image(mesobox: Mesobox, user: User, layout: Path, world_tmp: Path) -> None:
    out = world_tmp / "image.sqfs"
    ref, store_file = exported(mesobox, user, layout, out)
    data = out.read_bytes()
    # the store's squashfs unchanged, then the trailer; 4 KiB aligned; the footer at the end
    assert data[:len(store_file)] == store_file and len(data) > len(store_file)
    assert len(data) % 4096 == 0 and data[-FOOTER:][:12] == b"mesobox.sqfs"
    # squashfs tools stop at bytes_used: the trailer is invisible to them
    listed = subprocess.run(["unsquashfs", "-lc", str(out)], capture_output=True, text=True, check=True)
    assert "squashfs-root/srv" in listed.stdout
    # as the ordinary user (squashfuse), the image's Entrypoint, Cmd, Env and WorkingDir apply
    want = mesobox("run", "--contain", ref, as_user=user)
    assert want.returncode == 0, want.stderr.decode()
    assert want.stdout.decode().splitlines() == ["args=c1 c2", "/srv", "FOO=bar"]
    got = mesobox("run", "--contain", str(out), as_user=user)
    assert got.returncode == 0, got.stderr.decode()
    assert got.stdout == want.stdout
    args = mesobox("run", "--contain", str(out), "x", as_user=user)  # ARGS replace Cmd
    assert args.stdout.decode().splitlines() == ["args=x", "/srv", "FOO=bar"], args.stderr.decode()
    # inspect FILE: the config, the digest it was exported from, the store's squashfs digest
    shown = mesobox("inspect", str(out), as_user=user)
    assert shown.returncode == 0, shown.stderr.decode()
    assert shown.stderr == b""
    info = json.loads(shown.stdout)
    stored = json.loads(mesobox("inspect", ref, as_user=user).stdout)
    assert info["ImageConfig"] is True and info["Format"] == "squashfs" and info["Path"] == str(out)
    for key in ("Reference", "Digest", "Env", "Entrypoint", "Cmd", "WorkingDir", "Labels", "SquashfsDigest"):
        assert info[key] == stored[key], key
    assert info["SquashfsDigest"] == sha256(store_file) and info["Labels"] == {"org.test": "yes"}


def test_a_saved_plan_notices_a_replaced_trailer(mesobox: Mesobox, user: User, layout: Path,
                                                  world_tmp: Path) -> None:
    out = world_tmp / "image.sqfs"
    exported(mesobox, user, layout, out)
    age(out)  # as image files are: not written this second, so a plan is saved
    runtime = world_tmp / "runtime"
    env = {"MESOBOX_RUNTIME_DIR": str(runtime)}
    for _ in range(2):  # compiled and saved, then from the plan
        got = mesobox("run", "--contain", str(out), as_user=user, env=env)
        assert got.stdout.decode().splitlines() == ["args=c1 c2", "/srv", "FOO=bar"], got.stderr.decode()
    assert len(list((runtime / "plans").iterdir())) == 1
    # the same squashfs with another config, written in place of the file
    data = out.read_bytes()
    offset = int.from_bytes(data[-16:-8], "little")
    length = int.from_bytes(data[-8:], "little")
    doc = json.loads(data[offset:offset + length])
    doc["config"]["Env"] = ["FOO=changed"]
    replacement = world_tmp / "new.sqfs"
    replacement.write_bytes(with_trailer(data[:offset], json.dumps(doc).encode()))
    os.chmod(replacement, 0o644)
    age(replacement)
    os.replace(replacement, out)
    got = mesobox("run", "--contain", str(out), as_user=user, env=env)
    assert got.stdout.decode().splitlines() == ["args=c1 c2", "/srv", "FOO=changed"], got.stderr.decode()


def with_trailer(squashfs: bytes, payload: bytes, *, version: int = 1, offset: int | None = None,
                 length: int | None = None) -> bytes:
    """A file as export writes it (or lies about it): squashfs, JSON, padding, footer."""
    start = len(squashfs) if offset is None else offset
    size = len(payload) if length is None else length
    body = squashfs + payload
    body += b"\0" * (-(len(body) + FOOTER) % 4096)
    footer = b"mesobox.sqfs" + version.to_bytes(4, "little") + start.to_bytes(8, "little") + size.to_bytes(8, "little")
    return body + footer


@pytest.fixture(scope="module")
def plain(shared_tmp: Path) -> bytes:
    """A plain squashfs made by mksquashfs from a busybox rootfs."""
    root = make_busybox_rootfs(shared_tmp / "portable-plain-root")
    return make_squashfs(root, shared_tmp / "portable-plain.sqfs").read_bytes()


def test_a_plain_squashfs_still_runs_and_inspect_says_it_has_no_config(
    mesobox: Mesobox, user: User, plain: bytes, world_tmp: Path,
) -> None:
    out = world_tmp / "plain.sqfs"
    out.write_bytes(plain)
    os.chmod(out, 0o644)
    ran = mesobox("run", "--contain", str(out), as_user=user, input=b"echo from-sh; pwd\n")  # /bin/sh by default
    assert ran.returncode == 0, ran.stderr.decode()
    assert ran.stdout.decode().splitlines() == ["from-sh", "/"]
    shown = mesobox("inspect", str(out), as_user=user)
    assert shown.returncode == 0, shown.stderr.decode()
    info = json.loads(shown.stdout)
    assert info["ImageConfig"] is False and info["Digest"] is None and info["Cmd"] is None
    assert info["SquashfsDigest"] == sha256(plain)
    assert "carries no image config" in shown.stderr.decode()
    gone = mesobox("inspect", str(world_tmp / "missing.sqfs"), as_user=user)
    assert gone.returncode == 4 and "no such image file" in error_line(gone)


def _config(**config: object) -> bytes:
    return json.dumps({"reference": "x", "config": {"Cmd": ["/bin/echo", "hi"], **config}}).encode()


HOSTILE = {
    "bad JSON": lambda sq: with_trailer(sq, b'{"config": {"Cmd": ['),
    "not an object": lambda sq: with_trailer(sq, b'["a"]'),
    "huge length": lambda sq: with_trailer(sq, b"{}", length=1 << 40),
    "past the file": lambda sq: with_trailer(sq, b"{}", length=1 << 19),
    "into the filesystem": lambda sq: with_trailer(sq, _config(), offset=0),
    "newer version": lambda sq: with_trailer(sq, _config(), version=99),
    "wrong type": lambda sq: with_trailer(sq, json.dumps({"reference": 5, "config": {}}).encode()),
    "refused config": lambda sq: with_trailer(sq, _config(Env="FOO=1")),
    "NUL in Cmd": lambda sq: with_trailer(sq, _config(Cmd=["/bin/echo", "a\u0000b"])),
    "deep JSON": lambda sq: with_trailer(sq, b"[" * 100000 + b"]" * 100000),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_trailer_is_one_line(mesobox: Mesobox, user: User, plain: bytes, world_tmp: Path,
                                       case: str) -> None:
    out = world_tmp / "hostile.sqfs"
    out.write_bytes(HOSTILE[case](plain))
    os.chmod(out, 0o644)
    for verb in (("run", "--contain"), ("inspect",)):
        res = mesobox(*verb, str(out), as_user=user, input=b"echo ran\n")
        assert res.returncode != 0 and b"ran" not in res.stdout, (case, verb)
        line = error_line(res)
        assert str(out) in line, (case, line)


def test_the_trailer_is_honoured_where_it_is_sound(mesobox: Mesobox, user: User, plain: bytes,
                                                   world_tmp: Path) -> None:
    """The control of the hostile cases: the same construction, told the truth, runs."""
    out = world_tmp / "sound.sqfs"
    out.write_bytes(with_trailer(plain, _config(Env=["FOO=1"], Cmd=["/bin/sh", "-c", "echo FOO=$FOO"])))
    os.chmod(out, 0o644)
    res = mesobox("run", "--contain", str(out), as_user=user)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == b"FOO=1\n"


@pytest.mark.root
def test_root_runs_and_the_kernel_mounts_the_file(mesobox: Mesobox, user: User, layout: Path,
                                                  world_tmp: Path) -> None:
    out = world_tmp / "image.sqfs"
    exported(mesobox, user, layout, out)
    point = world_tmp / "mnt"
    point.mkdir()
    subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(out), str(point)], check=True,
                   capture_output=True)
    try:
        assert (point / "srv").is_dir() and (point / "bin" / "busybox").is_file()
    finally:
        subprocess.run(["umount", str(point)], check=True)
    got = mesobox("run", "--contain", str(out))  # root: a kernel loop mount
    assert got.returncode == 0, got.stderr.decode()
    assert got.stdout.decode().splitlines() == ["args=c1 c2", "/srv", "FOO=bar"]
