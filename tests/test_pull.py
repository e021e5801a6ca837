"""End-to-end pulls through the CLI: real docker-registry, images made by umoci and
pushed by skopeo, rootfs compared file by file with `umoci unpack`, as root and as an
ordinary user; faults (tamper, kill -9, full disk) leave the store consistent."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import (
    Mesobox,
    Registry,
    User,
    make_busybox_rootfs,
    make_oci_image,
    need_tool,
    start_registry,
    wait_until,
)
from pull_support import build_test_image, check_store, tree, umoci_unpack, without_group_other_write

pytestmark = [pytest.mark.registry]


@pytest.fixture(scope="module")
def image(registry: Registry, shared_tmp: Path) -> tuple[str, Path]:
    """The feature-rich test image in the shared registry: (reference, OCI layout)."""
    layout = shared_tmp / "pull-layout"
    build_test_image(layout, "v1")
    ref = registry.push_oci(layout, "v1", "mb/test")
    return ref, layout


@pytest.fixture(scope="module")
def umoci_tree(image: tuple[str, Path], shared_tmp: Path) -> dict[str, tuple[str, int, str]]:
    expected = without_group_other_write(tree(umoci_unpack(image[1], "v1", shared_tmp / "umoci-bundle")))
    assert expected["tmp"] == ("dir", 0o1755, "")  # busybox's 1777 /tmp: world write dropped
    return expected


def store_of(mesobox: Mesobox, who: User | None) -> Path:
    return mesobox.store_root / (who.name if who else "root")


def one_line_error(res: subprocess.CompletedProcess[bytes]) -> str:
    err = res.stderr.decode()
    assert "Traceback" not in err, err
    assert err.startswith("mesobox: error: "), err
    return err


@pytest.mark.parametrize("as_user", [False, True], ids=["root", "user"])
def test_pull_dir_matches_umoci(
    mesobox: Mesobox, image: tuple[str, Path], umoci_tree: dict[str, tuple[str, int, str]],
    user: User, as_user: bool,
) -> None:
    who = user if as_user else None
    res = mesobox("pull", "--format", "dir", image[0], as_user=who)
    assert res.returncode == 0, res.stderr.decode()
    digest = res.stdout.decode().strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    rootfs = store_of(mesobox, who) / "rootfs" / digest.split(":")[1]
    ours = tree(rootfs)
    assert ours == umoci_tree
    # setuid dropped, whiteouts applied, hardlinks kept, file became a directory
    assert not os.stat(rootfs / "bin" / "suid-busybox").st_mode & 0o6000
    assert not (rootfs / "etc" / "motd").exists()
    assert sorted(os.listdir(rootfs / "opt" / "opq")) == ["new"]
    assert os.stat(rootfs / "opt" / "hl1").st_ino == os.stat(rootfs / "opt" / "hl2").st_ino
    assert os.stat(rootfs / "opt" / "keep").st_ino == os.stat(rootfs / "opt" / "keep-hl").st_ino
    assert (rootfs / "opt" / "a" / "y" / "inside").read_text() == "now a dir\n"
    if as_user:
        assert os.stat(rootfs / "opt" / "keep").st_uid == user.uid
    assert check_store(store_of(mesobox, who)) == []


def test_pull_squashfs_as_user(
    mesobox: Mesobox, image: tuple[str, Path], umoci_tree: dict[str, tuple[str, int, str]],
    user: User, world_tmp: Path,
) -> None:
    need_tool("unsquashfs")
    res = mesobox("pull", "-q", image[0], as_user=user)
    assert res.returncode == 0, res.stderr.decode()
    digest = res.stdout.decode().strip()
    sqfs = store_of(mesobox, user) / "squashfs" / (digest.split(":")[1] + ".sqfs")
    assert sqfs.read_bytes()[:4] == b"hsqs"
    out = world_tmp / "unsquashed"
    subprocess.run(["unsquashfs", "-q", "-no-xattrs", "-d", str(out), str(sqfs)], check=True, capture_output=True)
    assert tree(out) == umoci_tree
    # the directory work copy does not linger next to the squashfs
    assert list((store_of(mesobox, user) / "rootfs").iterdir()) == []
    assert list((store_of(mesobox, user) / "tmp").iterdir()) == []


def test_digest_matches_skopeo_and_inspect(mesobox: Mesobox, image: tuple[str, Path], user: User) -> None:
    res = mesobox("pull", "-q", image[0], as_user=user)
    assert res.returncode == 0, res.stderr.decode()
    skopeo = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{image[0]}"], capture_output=True, check=True
    )
    assert res.stdout.decode().strip() == json.loads(skopeo.stdout)["Digest"]
    info = json.loads(mesobox("inspect", image[0], as_user=user).stdout)
    assert info["Digest"] == json.loads(skopeo.stdout)["Digest"]
    assert info["Layers"] == json.loads(skopeo.stdout)["Layers"]
    assert "FOO=bar" in info["Env"]
    assert info["Entrypoint"] == ["/bin/echo"]
    assert info["Cmd"] == ["hello"]
    assert info["WorkingDir"] == "/opt"
    assert info["Labels"] == {"org.mesobox.test": "yes"}
    assert info["Platform"] == "linux/amd64"
    # the same image through docker:// and without a transport is one record
    again = mesobox("inspect", f"docker://{image[0]}", as_user=user)
    assert json.loads(again.stdout)["Digest"] == info["Digest"]


def test_images_rm_prune(mesobox: Mesobox, image: tuple[str, Path], user: User) -> None:
    assert mesobox("pull", "-q", "--format", "dir", image[0], as_user=user).returncode == 0
    listing = json.loads(mesobox("images", "--json", as_user=user).stdout)
    assert [row["reference"] for row in listing] == [f"docker://{image[0]}"]
    assert listing[0]["formats"] == ["dir"]
    assert mesobox("rm", image[0], as_user=user).returncode == 0
    assert json.loads(mesobox("images", "--json", as_user=user).stdout) == []
    store = store_of(mesobox, user)
    assert list((store / "rootfs").iterdir()) == []  # no other record used that digest
    assert any((store / "blobs" / "sha256").iterdir())  # blobs stay until prune
    res = mesobox("prune", as_user=user)
    assert res.returncode == 0 and res.stdout.startswith(b"pruned ")
    assert list((store / "blobs" / "sha256").iterdir()) == []
    missing = mesobox("rm", image[0], as_user=user)
    assert missing.returncode == 4
    one_line_error(missing)


def test_export_oci_dir_squashfs(
    mesobox: Mesobox, image: tuple[str, Path], umoci_tree: dict[str, tuple[str, int, str]],
    user: User, world_tmp: Path,
) -> None:
    assert mesobox("pull", "-q", image[0], as_user=user).returncode == 0
    oci = world_tmp / "exported-oci"
    res = mesobox("export", image[0], "--format", "oci", "-o", str(oci), as_user=user)
    assert res.returncode == 0, res.stderr.decode()
    # independent clients read the layout back
    subprocess.run(["skopeo", "inspect", f"oci:{oci}:v1"], check=True, capture_output=True)
    assert without_group_other_write(tree(umoci_unpack(oci, "v1", world_tmp / "umoci-again"))) == umoci_tree
    out_dir = world_tmp / "exported-dir"
    assert mesobox("export", image[0], "--format", "dir", "-o", str(out_dir), as_user=user).returncode == 0
    assert tree(out_dir) == umoci_tree
    sqfs = world_tmp / "exported.sqfs"
    assert mesobox("export", image[0], "--format", "squashfs", "-o", str(sqfs), as_user=user).returncode == 0
    assert sqfs.read_bytes()[:4] == b"hsqs"
    taken = mesobox("export", image[0], "--format", "dir", "-o", str(out_dir), as_user=user)
    assert taken.returncode == 2
    one_line_error(taken)


@pytest.mark.parametrize(
    ("ref", "code"),
    [("UPPER/case:tag", 2), ("docker://", 2), ("127.0.0.1:1/nothing:here", 3), ("oci:/nonexistent/dir", 4)],
)
def test_bad_references(mesobox: Mesobox, ref: str, code: int) -> None:
    res = mesobox("pull", "-q", ref, timeout=60)
    assert res.returncode == code, res.stderr.decode()
    one_line_error(res)


def test_missing_tag(mesobox: Mesobox, image: tuple[str, Path]) -> None:
    res = mesobox("pull", "-q", image[0].replace(":v1", ":nosuchtag"))
    assert res.returncode == 4
    assert "nosuchtag" in one_line_error(res) or "manifest" in res.stderr.decode()


@pytest.fixture()
def private_registry(world_tmp: Path) -> Iterator[Registry]:
    """A registry of this test's own, so tampering with its storage harms no one else."""
    reg = start_registry(world_tmp / "registry")
    yield reg
    reg.process.terminate()
    reg.process.wait(timeout=10)


def test_tampered_blob_refused(mesobox: Mesobox, private_registry: Registry, world_tmp: Path) -> None:
    layout = make_oci_image(world_tmp / "layout", "v1", [make_busybox_rootfs])
    ref = private_registry.push_oci(layout, "v1", "mb/tamper")
    blobs = private_registry.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    biggest = max(blobs.glob("*/*/data"), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    res = mesobox("pull", "-q", ref)
    assert res.returncode == 5, res.stderr.decode()
    assert "digest" in one_line_error(res).lower()
    store = mesobox.store_root / "root"
    assert not (store / "blobs" / "sha256" / biggest.parent.name).exists()
    assert check_store(store) == []
    assert json.loads(mesobox("images", "--json").stdout) == []


def _big_layer(rootfs: Path) -> None:
    make_busybox_rootfs(rootfs)
    with open(rootfs / "big.bin", "wb") as f:
        f.write(os.urandom(48 * 1024 * 1024))


def test_kill9_during_pull_then_pull_again(
    mesobox: Mesobox, private_registry: Registry, world_tmp: Path, user: User,
) -> None:
    layout = make_oci_image(world_tmp / "layout", "v1", [_big_layer])
    ref = private_registry.push_oci(layout, "v1", "mb/big")
    store = mesobox.store_root / user.name
    env = mesobox.base_env() | {"MESOBOX_STORE": str(store)}
    argv = [mesobox.python, "-m", "mesobox", "pull", "-q", "--format", "dir", ref]
    killed_in = set()
    for attempt in range(2):  # kill once while downloading, once while flattening
        proc = subprocess.Popen(["runuser", "-u", user.name, "--", "env", *[f"{k}={v}" for k, v in env.items()],
                                 *argv], start_new_session=True)
        watch = ("ingest", "tmp")[attempt]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            d = store / watch
            if d.is_dir() and any(d.iterdir()):
                os.killpg(proc.pid, signal.SIGKILL)
                killed_in.add(watch)
                break
            time.sleep(0.002)
        proc.wait()
        assert check_store(store) == []
        assert json.loads(mesobox("images", "--json", as_user=user).stdout) == []
    assert killed_in, "the pull finished before it could be killed"
    res = mesobox("pull", "-q", "--format", "dir", ref, as_user=user)
    assert res.returncode == 0, res.stderr.decode()
    digest = res.stdout.decode().strip()
    assert (store / "rootfs" / digest.split(":")[1] / "big.bin").stat().st_size == 48 * 1024 * 1024
    assert check_store(store) == []
    assert list((store / "tmp").iterdir()) == []


@pytest.mark.root
@pytest.mark.parametrize("stage", ["download", "flatten"])
def test_full_disk_clear_error(mesobox: Mesobox, image: tuple[str, Path], world_tmp: Path, stage: str) -> None:
    store = world_tmp / "tiny-store"
    store.mkdir()
    blobs = sum(p.stat().st_size for p in (image[1] / "blobs" / "sha256").iterdir())
    # "download": too small for the blobs; "flatten": the blobs fit, the rootfs does not
    size = 512 * 1024 if stage == "download" else blobs + 1024 * 1024
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(store)], check=True)
    try:
        res = mesobox("pull", "-q", "--format", "dir", image[0], env={"MESOBOX_STORE": str(store)})
        assert res.returncode == 7, res.stderr.decode()
        assert "no space left" in one_line_error(res).lower()
        assert check_store(store) == []
        assert list((store / "images").iterdir()) == []
        assert list((store / "tmp").iterdir()) == []
        stored_blobs = list((store / "blobs" / "sha256").iterdir())
        # where it failed: config + 3 layers all stored only if the download finished
        assert (len(stored_blobs) >= 4) == (stage == "flatten"), stored_blobs
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


def _blob_gets(log: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in re.finditer(r'"GET (/v2/[^ ]*/blobs/sha256:[0-9a-f]{64}) HTTP[^"]*" 200', log):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


@pytest.mark.slow
def test_20_concurrent_pulls_fetch_each_blob_once(
    mesobox: Mesobox, private_registry: Registry, world_tmp: Path, user: User,
) -> None:
    layout = build_test_image(world_tmp / "layout", "v1")
    ref = private_registry.push_oci(layout, "v1", "mb/concurrent")
    log_file = private_registry.root / "registry.log"
    before = log_file.stat().st_size
    store = mesobox.store_root / user.name
    env = mesobox.base_env() | {"MESOBOX_STORE": str(store)}
    procs = [
        subprocess.Popen(["runuser", "-u", user.name, "--", "env", *[f"{k}={v}" for k, v in env.items()],
                          mesobox.python, "-m", "mesobox", "pull", "-q", ref],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(20)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode() for o in outputs]
    assert len({o[0] for o in outputs}) == 1  # all print the same digest
    layers = json.loads(mesobox("inspect", ref, as_user=user).stdout)["Layers"]
    assert len(layers) == 3

    def logged_gets() -> dict[str, int]:
        with open(log_file) as f:
            f.seek(before)
            return _blob_gets(f.read())

    # the registry logs a request once it has answered it: wait for every layer's line
    wait_until(lambda: {p.rsplit("/", 1)[1] for p in logged_gets()} >= set(layers), "the registry logs each layer")
    gets = logged_gets()
    layer_gets = {path: n for path, n in gets.items() if path.rsplit("/", 1)[1] in layers}
    # each layer fetched exactly once across the 20 processes (the small config blob is
    # read by every resolve to learn the image's platform, so it is not counted)
    assert sorted(p.rsplit("/", 1)[1] for p in layer_gets) == sorted(layers)
    assert set(layer_gets.values()) == {1}, layer_gets
    assert check_store(store) == []
