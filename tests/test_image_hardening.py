"""The image room on a hostile shared node: each test plays the attacker against a real
pull (docker-registry, umoci/skopeo-built or hand-pushed images, the mesobox CLI as root
and as ordinary users) and checks the store gives nothing away.

1. device nodes are never created (root or not)          test_root_pull_makes_no_device_nodes…
2. nothing of an image is group/other-writable            test_*_cannot_be_rewritten_by_others
3. kept setuid bits: the rootfs is private                test_kept_setuid_rootfs_is_private…
4. sparse-file bombs count at their logical size          test_sparse_bomb_is_refused…
5. prune waits for pulls                                  test_prune_during_a_pull…
6. stored blobs are re-hashed when reused                 test_substituted_layer_…
7. a damaged squashfs is rebuilt                          test_damaged_squashfs_…
8. mksquashfs dies with its puller                        test_mksquashfs_dies_with_a_killed_pull
10. hostile image configs: one line, no record            test_hostile_config_…
11. negative tar sizes: mesobox's own message             test_negative_size_…
(9, Range answers that are not the blob, is in test_registry.py.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Mesobox, Registry, User, make_busybox_rootfs, make_oci_image, need_tool
from faultproxy import fault_proxy
from layers_support import Entry, oci_layer_blobs, reg, tar_bytes, write_blob
from mesobox.errors import LayerError
from mesobox.image.layers import LayerPolicy, apply_layers
from pull_support import check_store
from registry_support import gzip_tar, push_raw_image

pytestmark = [pytest.mark.registry]


# --- helpers ---------------------------------------------------------------------------

def one_line_error(res: subprocess.CompletedProcess[bytes]) -> str:
    err = res.stderr.decode()
    assert "Traceback" not in err, err
    assert "internal" not in err.lower(), err
    lines = [line for line in err.splitlines() if not line.startswith(("mesobox: warning: ", "mesobox: hint: "))]
    assert len(lines) == 1 and lines[0].startswith("mesobox: error: "), err
    return lines[0]


def store_of(mesobox: Mesobox, who: User | None) -> Path:
    return mesobox.store_root / (who.name if who else "root")


def digest_of(res: subprocess.CompletedProcess[bytes]) -> str:
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout.decode().strip().split(":")[1]


def wait_for(predicate: Callable[[], bool], ceiling: float = 60.0) -> bool:
    """Poll ``predicate`` until it holds or ``ceiling`` seconds pass (never an assertion on time)."""
    deadline = time.monotonic() + ceiling
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def run_as_nobody(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """A second ordinary user, hostile to the first."""
    return subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True, timeout=60, check=False)


def no_record(mesobox: Mesobox, who: User | None) -> None:
    store = store_of(mesobox, who)
    assert json.loads(mesobox("images", "--json", as_user=who).stdout) == []
    for sub in ("images", "rootfs", "squashfs", "tmp"):
        assert not (store / sub).is_dir() or list((store / sub).iterdir()) == [], sub
    assert check_store(store) == []


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def record_of(mesobox: Mesobox, who: User | None) -> tuple[Path, dict[str, object]]:
    (path,) = (store_of(mesobox, who) / "images").glob("*.json")
    return path, json.loads(path.read_text())


# --- 1 + 2: device nodes, world-writable entries ----------------------------------------

def _hostile_modes(rootfs: Path) -> None:
    make_busybox_rootfs(rootfs)  # its /tmp is 1777
    os.mknod(rootfs / "dev" / "loop0", stat.S_IFBLK | 0o666, os.makedev(7, 0))
    os.mknod(rootfs / "dev" / "mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))
    os.chmod(rootfs / "dev" / "loop0", 0o666)
    os.chmod(rootfs / "dev" / "mem", 0o666)
    os.mkfifo(rootfs / "fifo")
    os.chmod(rootfs / "fifo", 0o666)
    app = rootfs / "opt" / "app"
    app.mkdir(parents=True)
    (app / "tool").write_text("#!/bin/sh\necho genuine\n")
    os.chmod(app / "tool", 0o777)
    os.chmod(app, 0o777)
    (rootfs / "etc" / "profile").write_text("# profile\n")
    os.chmod(rootfs / "etc" / "profile", 0o666)


@pytest.fixture(scope="module")
def hostile_modes_image(registry: Registry, shared_tmp: Path) -> str:
    layout = make_oci_image(shared_tmp / "hardening-modes", "v1", [_hostile_modes])
    return registry.push_oci(layout, "v1", "hard/modes")


def _assert_nothing_writable_by_others(rootfs: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), f"device node {name}"
            if not stat.S_ISLNK(st.st_mode):
                assert st.st_mode & 0o022 == 0, f"{dirpath}/{name} is {stat.filemode(st.st_mode)}"


def test_root_pull_makes_no_device_nodes_and_others_cannot_rewrite_it(
    mesobox: Mesobox, hostile_modes_image: str, user: User,
) -> None:
    res = mesobox("pull", "-q", "--format", "dir", hostile_modes_image)
    rootfs = store_of(mesobox, None) / "rootfs" / digest_of(res)
    assert "device node" in res.stderr.decode() and "dev/loop0" in res.stderr.decode()
    assert not os.path.lexists(rootfs / "dev" / "loop0") and not os.path.lexists(rootfs / "dev" / "mem")
    assert stat.S_ISFIFO(os.lstat(rootfs / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(rootfs / "tmp").st_mode) == 0o1755
    _assert_nothing_writable_by_others(rootfs)
    # the attacker: an ordinary user, on a store root made traversable
    assert os.stat(store_of(mesobox, None)).st_mode & 0o005 == 0o005
    tool = rootfs / "opt" / "app" / "tool"
    for argv in (["sh", "-c", f"echo 'echo pwned' > {tool}"], ["touch", str(tool.parent / "planted")],
                 ["touch", str(rootfs / "tmp" / "planted")], ["sh", "-c", f"echo x >> {rootfs}/etc/profile"],
                 ["dd", f"if={rootfs}/dev/loop0", "of=/dev/null", "count=1"]):
        assert user.run(argv).returncode != 0, argv
    assert tool.read_text() == "#!/bin/sh\necho genuine\n"
    assert not (tool.parent / "planted").exists() and not (rootfs / "tmp" / "planted").exists()


def test_users_dir_store_cannot_be_rewritten_by_other_users(
    mesobox: Mesobox, hostile_modes_image: str, user: User,
) -> None:
    res = mesobox("pull", "-q", "--format", "dir", hostile_modes_image, as_user=user)
    rootfs = store_of(mesobox, user) / "rootfs" / digest_of(res)
    _assert_nothing_writable_by_others(rootfs)
    tool = rootfs / "opt" / "app" / "tool"
    assert run_as_nobody(["sh", "-c", f"echo 'echo pwned' > {tool}"]).returncode != 0
    assert run_as_nobody(["sh", "-c", f"mv {tool} {tool}.old && echo pwned > {tool}"]).returncode != 0
    assert tool.read_text() == "#!/bin/sh\necho genuine\n"
    # the owner loses nothing: it may still change its own copy
    assert user.run(["sh", "-c", f"echo '# mine' >> {tool}"]).returncode == 0


def test_layers_never_make_devices_as_root_and_fifos_lose_group_write(world_tmp: Path) -> None:
    def special(name: str, kind: bytes, mode: int) -> Entry:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.devmajor, info.devminor = kind, mode, 7, 0
        return Entry(info)

    blob = write_blob(world_tmp / "layer", tar_bytes([special("loop0", tarfile.BLKTYPE, 0o666),
                                                      special("tty", tarfile.CHRTYPE, 0o666),
                                                      special("pipe", tarfile.FIFOTYPE, 0o666)]), "gzip")
    rootfs = world_tmp / "rootfs"
    rootfs.mkdir()
    warnings: list[str] = []
    stats = apply_layers(rootfs, [blob], LayerPolicy(unprivileged=False, warn=warnings.append))
    assert sorted(os.listdir(rootfs)) == ["pipe"] and stats.skipped_devices == 2
    assert stat.S_IMODE(os.lstat(rootfs / "pipe").st_mode) == 0o644
    assert len(warnings) == 1 and "2 device node(s)" in warnings[0]


# --- 3: setuid bits kept for root --------------------------------------------------------

def _setuid_layer(rootfs: Path) -> None:
    make_busybox_rootfs(rootfs)
    suid = rootfs / "bin" / "suid-busybox"
    suid.write_bytes((rootfs / "bin" / "busybox").read_bytes())
    os.chmod(suid, 0o4755)


@pytest.fixture(scope="module")
def setuid_image(registry: Registry, shared_tmp: Path) -> str:
    layout = make_oci_image(shared_tmp / "hardening-suid", "v1", [_setuid_layer])
    return registry.push_oci(layout, "v1", "hard/suid")


def test_kept_setuid_rootfs_is_private_and_squashfs_stays_usable(
    mesobox: Mesobox, setuid_image: str, user: User, world_tmp: Path,
) -> None:
    keep = {"MESOBOX_KEEP_SETUID_FOR_ROOT": "1"}
    res = mesobox("pull", "-q", "--format", "dir", setuid_image, env=keep)
    hexd = digest_of(res)
    store = store_of(mesobox, None)
    rootfs = store / "rootfs" / hexd
    suid = rootfs / "bin" / "suid-busybox"
    assert os.stat(suid).st_mode & stat.S_ISUID and os.stat(suid).st_uid == 0  # the site asked to keep it
    assert stat.S_IMODE(os.stat(rootfs).st_mode) == 0o700
    assert os.stat(store / "rootfs").st_mode & 0o005 == 0o005  # the way there is open: the rootfs is the wall
    # the attacker execs the setuid-root binary straight from the store, on the host
    attempt = user.run([str(suid), "id", "-u"])
    assert attempt.returncode != 0 and attempt.stdout == b"", attempt
    # the squashfs of the same image is built afresh (not from the private directory) and
    # is usable by everyone: its root is 0755, the file 0644 (mounted nosuid)
    need_tool("unsquashfs")
    res = mesobox("pull", "-q", setuid_image, env=keep)
    sqfs = store / "squashfs" / f"{digest_of(res)}.sqfs"
    assert stat.S_IMODE(os.stat(sqfs).st_mode) == 0o644
    listing = subprocess.run(["unsquashfs", "-lln", str(sqfs)], capture_output=True, text=True, check=True).stdout
    root_line = next(line for line in listing.splitlines() if line.endswith(" squashfs-root"))
    assert root_line.startswith("drwxr-xr-x"), root_line
    assert any(line.startswith("-rwsr-xr-x") and line.endswith("/bin/suid-busybox") for line in listing.splitlines())
    # without the setting the bit is dropped and the rootfs is an ordinary 0755 one
    other = mesobox.store_root / "root-nokeep"
    res = mesobox("pull", "-q", "--format", "dir", setuid_image, env={"MESOBOX_STORE": str(other)})
    plain = other / "rootfs" / digest_of(res)
    assert stat.S_IMODE(os.stat(plain).st_mode) == 0o755
    assert not os.stat(plain / "bin" / "suid-busybox").st_mode & stat.S_ISUID


# --- 4: sparse-file bomb ----------------------------------------------------------------

@pytest.fixture(scope="module", params=["gnu", "posix"])
def sparse_bomb(registry: Registry, shared_tmp: Path, request: pytest.FixtureRequest) -> str:
    """A ~200-byte layer whose one file is 1 TiB of holes, made by GNU tar --sparse."""
    top = shared_tmp / f"sparse-bomb-{request.param}"
    (top / "src").mkdir(parents=True)
    with open(top / "src" / "bomb", "wb") as f:
        f.truncate(1024**4)
    layer = top / "layer.tar.gz"
    subprocess.run(["tar", f"--format={request.param}", "--sparse", "-czf", str(layer), "-C", str(top / "src"),
                    "bomb"], check=True)
    data = layer.read_bytes()
    assert len(data) < 10_000
    return push_raw_image(registry.host, f"hard/sparse-{request.param}", "v1", {"config": {"Cmd": ["/bomb"]}}, [data])


@pytest.mark.parametrize("fmt", ["dir", "squashfs"])
def test_sparse_bomb_is_refused_before_writing(mesobox: Mesobox, sparse_bomb: str, user: User, fmt: str) -> None:
    res = mesobox("pull", "-q", "--format", fmt, sparse_bomb, as_user=user, timeout=120)
    assert res.returncode == LayerError.exit_code, res.stderr.decode()
    line = one_line_error(res)
    assert "exceeds the limit of 68719476736 bytes" in line and "sparse" in line and "'bomb'" in line
    no_record(mesobox, user)


# --- 5: prune during a pull ----------------------------------------------------------------

def _small_layer(rootfs: Path) -> None:
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc" / "second").write_text("second layer\n")


def _blocked_on(pid: int, lock_file: Path) -> bool:
    """Is ``pid`` waiting for a lock on ``lock_file`` (a ``->`` line of /proc/locks)?"""
    if not lock_file.exists():
        return False
    inode = f":{lock_file.stat().st_ino} "
    with open("/proc/locks") as f:
        return any("->" in line and f" {pid} " in line and inode in line for line in f)


def test_prune_during_a_pull_waits_and_deletes_nothing_it_needs(
    mesobox: Mesobox, registry: Registry, world_tmp: Path,
) -> None:
    layout = make_oci_image(world_tmp / "layout", "v1", [make_busybox_rootfs, _small_layer])
    registry.push_oci(layout, "v1", "hard/prune")
    first, last = ("sha256:" + p.name for p in oci_layer_blobs(layout, "v1"))
    store = store_of(mesobox, None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESOBOX_")}
    env |= mesobox.base_env() | {"MESOBOX_STORE": str(store)}
    with fault_proxy(registry.host) as proxy:
        release = proxy.hold(last)  # the pull has its config and first layer, and waits for the last
        pull = subprocess.Popen([mesobox.python, "-m", "mesobox", "pull", "-q", "--format", "dir",
                                 f"{proxy.host}/hard/prune:v1"], env=env, stderr=subprocess.PIPE)
        prune = None
        try:
            blobs = store / "blobs" / "sha256"
            assert wait_for(lambda: blobs.is_dir() and (blobs / first[7:]).exists()), "the pull never started"
            assert pull.poll() is None
            prune = subprocess.Popen([mesobox.python, "-m", "mesobox", "prune"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            wait_for(lambda: prune.poll() is not None or _blocked_on(prune.pid, store / "locks" / "gc.lock"))
        finally:
            release.set()
            pull_err = pull.communicate(timeout=120)[1]
            prune_out, prune_err = prune.communicate(timeout=120) if prune else (b"", b"")
    assert pull.returncode == 0, pull_err.decode()
    assert prune is not None and prune.returncode == 0, prune_err.decode()
    assert prune_out.startswith(b"pruned 0 entries"), prune_out  # it ran after the pull: all in use
    assert check_store(store) == []
    assert [r["reference"] for r in json.loads(mesobox("images", "--json").stdout)] == [
        f"docker://{proxy.host}/hard/prune:v1"]


# --- 6: stored blobs re-hashed when reused ----------------------------------------------------

def test_substituted_layer_is_never_used_nor_exported(
    mesobox: Mesobox, registry: Registry, world_tmp: Path, user: User,
) -> None:
    layout = make_oci_image(world_tmp / "layout", "v1", [make_busybox_rootfs, _small_layer])
    ref = registry.push_oci(layout, "v1", "hard/substitute")
    hexd = digest_of(mesobox("pull", "-q", ref, as_user=user))
    store = store_of(mesobox, user)
    victim = store / "blobs" / "sha256" / oci_layer_blobs(layout, "v1")[1].name
    evil = gzip_tar([("etc/second", b"substituted\n"), ("bin/evil", b"#!/bin/sh\n")])
    victim.write_bytes(evil)  # same name, other content: what a store writer could plant
    digest = "sha256:" + victim.name
    out = world_tmp / "exported"
    for fmt in ("oci", "dir"):  # the layout copies the blob; a directory is flattened from it
        res = mesobox("export", ref, "--format", fmt, "-o", str(out), as_user=user)
        assert res.returncode == 5, (fmt, res.stderr.decode())
        assert digest in one_line_error(res), fmt
        assert "mesobox pull" in res.stderr.decode()
        assert not out.exists(), fmt  # nothing half-written
    # the squashfs was built from the genuine layer before: it still matches its record
    sqfs_out = world_tmp / "exported.sqfs"
    assert mesobox("export", ref, "--format", "squashfs", "-o", str(sqfs_out), as_user=user).returncode == 0
    stored = store / "squashfs" / f"{hexd}.sqfs"
    # the exported file is the stored squashfs followed by the image config (image/portable.py)
    assert sqfs_out.read_bytes()[: stored.stat().st_size] == stored.read_bytes()
    # a pull re-hashes what it finds, deletes the bad blob and fetches it again, before
    # flattening anything from it
    res = mesobox("pull", "-q", "--format", "dir", ref, as_user=user)
    assert res.returncode == 0, res.stderr.decode()
    assert "damaged" in res.stderr.decode() and digest in res.stderr.decode()
    assert sha256_file(victim) == digest and check_store(store) == []
    rootfs = store / "rootfs" / hexd
    assert (rootfs / "etc" / "second").read_text() == "second layer\n" and not (rootfs / "bin" / "evil").exists()
    assert mesobox("export", ref, "--format", "oci", "-o", str(out), as_user=user).returncode == 0
    subprocess.run(["skopeo", "inspect", f"oci:{out}:v1"], check=True, capture_output=True)
    for blob in (out / "blobs" / "sha256").iterdir():
        assert sha256_file(blob) == "sha256:" + blob.name
        assert blob.stat().st_ino != (store / "blobs" / "sha256" / blob.name).stat().st_ino  # a copy, not a link


# --- 7: a damaged squashfs is rebuilt -----------------------------------------------------------

def _damage(path: Path, how: str) -> None:
    if how == "flip":
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_squashfs_is_rebuilt_on_pull(
    mesobox: Mesobox, setuid_image: str, user: User, world_tmp: Path, how: str,
) -> None:
    need_tool("unsquashfs")
    hexd = digest_of(mesobox("pull", "-q", setuid_image, as_user=user))
    sqfs = store_of(mesobox, user) / "squashfs" / f"{hexd}.sqfs"
    _, record = record_of(mesobox, user)
    assert (record["squashfs_size"], record["squashfs_sha256"]) == (sqfs.stat().st_size, sha256_file(sqfs))
    _damage(sqfs, how)
    res = mesobox("pull", "-q", setuid_image, as_user=user)
    assert res.returncode == 0, res.stderr.decode()
    assert "damaged" in res.stderr.decode() and "rebuilding" in res.stderr.decode()
    _, record = record_of(mesobox, user)
    assert (record["squashfs_size"], record["squashfs_sha256"]) == (sqfs.stat().st_size, sha256_file(sqfs))
    subprocess.run(["unsquashfs", "-l", str(sqfs)], check=True, capture_output=True)
    assert list((store_of(mesobox, user) / "tmp").iterdir()) == []


def test_squashfs_from_an_older_mesobox_is_checked_then_recorded(
    mesobox: Mesobox, setuid_image: str, user: User,
) -> None:
    """A record without a squashfs check: a whole file is kept (and its check recorded), a
    truncated one rebuilt."""
    hexd = digest_of(mesobox("pull", "-q", setuid_image, as_user=user))
    sqfs = store_of(mesobox, user) / "squashfs" / f"{hexd}.sqfs"
    path, record = record_of(mesobox, user)

    def forget_check() -> None:
        data = json.loads(path.read_text())
        del data["squashfs_size"], data["squashfs_sha256"]
        path.write_text(json.dumps(data))

    forget_check()
    inode = sqfs.stat().st_ino
    assert mesobox("pull", "-q", setuid_image, as_user=user).returncode == 0
    assert sqfs.stat().st_ino == inode  # kept
    assert record_of(mesobox, user)[1]["squashfs_sha256"] == sha256_file(sqfs) == record["squashfs_sha256"]
    forget_check()
    _damage(sqfs, "truncate")
    res = mesobox("pull", "-q", setuid_image, as_user=user)
    assert res.returncode == 0 and "rebuilding" in res.stderr.decode(), res.stderr.decode()
    assert record_of(mesobox, user)[1]["squashfs_sha256"] == sha256_file(sqfs)


def test_store_lookup_never_hashes(mesobox: Mesobox, setuid_image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run path reads the record only: the check is for pull."""
    import mesobox.image.store as store_module
    from mesobox.config import Config

    assert mesobox("pull", "-q", setuid_image).returncode == 0

    def no_hashing(path: Path) -> tuple[int, str]:
        raise AssertionError(f"hashed {path} on the lookup path")

    monkeypatch.setattr(store_module, "file_check", no_hashing)
    monkeypatch.setattr(hashlib, "sha256", no_hashing)
    record = store_module.Store(Config(store=store_of(mesobox, None))).lookup(setuid_image)
    assert record is not None and record.squashfs is not None and record.squashfs_check is not None


# --- 8: mksquashfs dies with its puller --------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(p) for p in (task / "children").read_text().split()]
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _running(pid: int, comm: str) -> bool:
    """``pid`` is ``comm`` and alive: a zombie is dead (whether its new parent reaps it at
    once depends on the init of the namespace the tests run in)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = stat.partition("(")[2].rpartition(")")
    return name == comm and rest.split()[0] not in ("Z", "X")


def _squashing(pid: int) -> bool:
    """The mksquashfs that builds the image (not the `mksquashfs -help` probe before it)."""
    try:
        return _comm(pid) == "mksquashfs" and b"-noappend" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _slow_to_squash(rootfs: Path) -> None:
    make_busybox_rootfs(rootfs)
    with open(rootfs / "holes", "wb") as f:  # mksquashfs reads every hole: seconds of work
        f.truncate(1024**3)


def test_mksquashfs_dies_with_a_killed_pull(mesobox: Mesobox, registry: Registry, world_tmp: Path) -> None:
    layout = make_oci_image(world_tmp / "layout", "v1", [_slow_to_squash])
    ref = registry.push_oci(layout, "v1", "hard/slowsquash")
    store = store_of(mesobox, None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESOBOX_")}
    env |= mesobox.base_env() | {"MESOBOX_STORE": str(store)}
    pull = subprocess.Popen([mesobox.python, "-m", "mesobox", "pull", "-q", ref], env=env)
    found: list[int] = []
    try:
        assert wait_for(lambda: bool(found.extend(c for c in _children(pull.pid) if _squashing(c)) or found),
                        120), "no mksquashfs seen"
        child = found[0]
        os.kill(child, signal.SIGSTOP)  # it cannot finish on its own now: only the death signal ends it
        os.kill(pull.pid, signal.SIGKILL)  # the puller alone, not its process group
        pull.wait()
        gone = wait_for(lambda: not _running(child, "mksquashfs"), 60)
    finally:
        pull.kill()
        for pid in found:
            if _comm(pid) == "mksquashfs":
                os.kill(pid, signal.SIGKILL)
    assert gone, "mksquashfs outlived the pull that started it"
    res = mesobox("pull", "-q", ref)
    assert res.returncode == 0, res.stderr.decode()
    assert check_store(store) == [] and list((store / "tmp").iterdir()) == []


# --- 10: hostile image configs -------------------------------------------------------------------

HOSTILE_CONFIGS: dict[str, tuple[object, str]] = {
    "env-numbers": ({"config": {"Env": [1, 2]}}, "Env[0] must be a string"),
    "env-no-name": ({"config": {"Env": ["=x"]}}, "Env[0] must be"),
    "cmd-number": ({"config": {"Cmd": [5]}}, "Cmd[0] must be a string"),
    "entrypoint-number": ({"config": {"Entrypoint": 7}}, "Entrypoint must be a list of strings"),
    "cmd-nul": ({"config": {"Cmd": ["/bin/sh\u0000-c"]}}, "Cmd[0] contains a NUL byte"),
    "user-huge-uid": ({"config": {"User": "99999999999"}}, "User has a user id above 4294967294"),
    "user-minus-one": ({"config": {"User": "0:4294967295"}}, "User has a group id above"),
    "user-three-parts": ({"config": {"User": "a:b:c"}}, "User must be USER or USER:GROUP"),
    "labels-number": ({"config": {"Labels": {"a": 1}}}, 'Labels["a"] must be a string'),
    "volumes-list": ({"config": {"Volumes": ["/data"]}}, "Volumes must be a JSON object"),
    "config-list": ({"config": [1]}, "config must be a JSON object"),
    "workdir-object": ({"config": {"WorkingDir": {"a": 1}}}, "WorkingDir must be a string"),
}
LAYER = gzip_tar([("etc/hello", b"hello\n")])


@pytest.fixture(scope="module")
def hostile_configs(registry: Registry) -> dict[str, str]:
    return {case: push_raw_image(registry.host, f"hard/config-{case}", "v1", config, [LAYER])
            for case, (config, _expected) in HOSTILE_CONFIGS.items()}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
def test_hostile_config_is_one_line_and_stores_no_record(
    mesobox: Mesobox, hostile_configs: dict[str, str], user: User, case: str,
) -> None:
    res = mesobox("pull", "-q", hostile_configs[case], as_user=user)
    assert res.returncode == LayerError.exit_code, res.stderr.decode()
    line = one_line_error(res)
    assert HOSTILE_CONFIGS[case][1] in line and "hard/config-" in line, line
    no_record(mesobox, user)
    layer = "sha256:" + hashlib.sha256(LAYER).hexdigest()
    assert not (store_of(mesobox, user) / "blobs" / "sha256" / layer[7:]).exists()  # refused before the layers


def test_string_cmd_is_one_argument(mesobox: Mesobox, registry: Registry, user: User) -> None:
    """Docker's strslice: a JSON string Cmd/Entrypoint is one argument, never its characters."""
    config = {"config": {"Cmd": "echo hi there", "Entrypoint": "/bin/sh", "Env": ["A=1=2"], "User": "app:1000"}}
    ref = push_raw_image(registry.host, "hard/strcmd", "v1", config, [LAYER])
    assert mesobox("pull", "-q", "--format", "dir", ref, as_user=user).returncode == 0
    info = json.loads(mesobox("inspect", ref, as_user=user).stdout)
    assert (info["Cmd"], info["Entrypoint"], info["Env"], info["User"]) == (
        ["echo hi there"], ["/bin/sh"], ["A=1=2"], "app:1000")


def test_hostile_config_in_an_oci_layout(mesobox: Mesobox, world_tmp: Path, user: User) -> None:
    layout = world_tmp / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = put(json.dumps({"architecture": "amd64", "os": "linux", "config": {"Env": [1, 2]}}).encode())
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       **put(LAYER)}]}).encode()
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(manifest),
             "annotations": {"org.opencontainers.image.ref.name": "v1"}}
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    res = mesobox("pull", "-q", f"oci:{layout}:v1", as_user=user)
    assert res.returncode == LayerError.exit_code, res.stderr.decode()
    assert "Env[0] must be a string" in one_line_error(res)
    no_record(mesobox, user)


# --- 11: negative sizes ---------------------------------------------------------------------------

def _negative_base256(world_tmp: Path) -> Path:
    header = bytearray(tar_bytes([reg("f", b"")], fmt=tarfile.GNU_FORMAT)[:512])
    header[124:136] = b"\xff" * 10 + b"\xf8\x00"  # size field, base-256: -2048
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\x00" % sum(header)
    return write_blob(world_tmp / "neg", bytes(header) + b"\0" * 2048, "plain")


def _negative_pax(world_tmp: Path) -> Path:
    info = tarfile.TarInfo("f")
    info.pax_headers = {"size": "-2048"}
    return write_blob(world_tmp / "neg", tar_bytes([Entry(info), reg("g", b"x" * 4096)]), "gzip")


@pytest.mark.parametrize("make", [_negative_base256, _negative_pax], ids=["base256", "pax"])
def test_negative_size_has_mesoboxs_own_message(world_tmp: Path, make: Callable[[Path], Path]) -> None:
    rootfs = world_tmp / "rootfs"
    rootfs.mkdir()
    with pytest.raises(LayerError, match=r": negative size or offset$"):
        apply_layers(rootfs, [make(world_tmp)], LayerPolicy(unprivileged=False))
    assert os.listdir(rootfs) == []


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
