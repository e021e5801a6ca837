"""Reproducible squashfs images (the same manifest, the same bytes) and the provenance
of launches: which image digest each one ran (the runtime directory's launches.log,
and an instance's state).

The image here is an OCI layout written by hand, so that one layer names files whose
parent directories it does not list (their times come from no tar entry) and has no
entry for the root directory.  Two pulls into two stores, a second apart, must give the
same squashfs file; `mesobox inspect` shows its digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_busybox_rootfs, make_oci_image
from instances_support import Instances
from layers_support import Entry, dir_, fifo, hard, reg, sym, tar_bytes, wh, write_blob
from run_support import mesobox_argv

pytestmark = pytest.mark.userns


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


PLAIN_LAYERS = (
    [dir_("etc"), reg("etc/os-release", b"ID=test\n"), reg("usr/share/deep/er/file", b"x" * 5000),
     reg("usr/lib/python3/mod.py", b"print(1)\n"), sym("usr/bin/py", "../lib/python3/mod.py")],
    [reg("usr/share/deep/er/second", b"y" * 70000), reg("opt/app/data.bin", b"z" * 300)],
)


def _owned(entry: Entry, uid: int, gid: int) -> Entry:
    entry.info.uid, entry.info.gid = uid, gid
    return entry


# Files of other owners than root, as images have them (a service user's home, www-data's
# files, a hardlink, a symlink, a FIFO, a name with a space); owners that change from one
# layer to the next, and a path deleted then made again by root.
OWNED_LAYERS = (
    [dir_("", uid=0, gid=0), dir_("etc"), reg("etc/os-release", b"ID=test\n"),
     dir_("home/app", mode=0o700, uid=1000, gid=1000), reg("home/app/.profile", b"x=1\n", mode=0o600, uid=1000,
                                                           gid=1000),
     dir_("var/www", uid=33, gid=33), reg("var/www/index.html", b"<p>", uid=33, gid=33),
     hard("var/www/copy.html", "var/www/index.html"), _owned(sym("var/www/link", "index.html"), 33, 33),
     _owned(fifo("var/www/pipe", 0o640), 33, 4), reg("var/www/a name", b"s", uid=7, gid=7),
     reg("srv/gone", b"g", uid=5, gid=5), reg("srv/back", b"b", uid=6, gid=6),
     # names mksquashfs's pseudo file must quote: a tab, quotes, a backslash, spaces, a
     # '#', a name that is not UTF-8
     reg("var/odd/tab\tname", b"1", uid=8, gid=8), reg('var/odd/quo"te\'s', b"2", uid=8, gid=8),
     reg("var/odd/back\\slash", b"3", uid=8, gid=8), reg("var/odd/ lead and trail ", b"4", uid=8, gid=8),
     reg("var/odd/#hash", b"5", uid=8, gid=8), reg("var/odd/latin\udce9", b"6", uid=8, gid=8)],
    [reg("etc/os-release", b"ID=test2\n", uid=100, gid=101), reg("home/app/.profile", b"x=2\n", mode=0o600),
     wh("srv/gone"), wh("srv/back"), reg("srv/back", b"root again")],
)


def _layout(top: Path, layer_entries: tuple[list[Entry], ...] = PLAIN_LAYERS) -> Path:
    """An OCI layout, tag v1: two layers, implicit parents, no root entry (by default)."""
    layout = top / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    layers = []
    diff_ids = []
    for entries in layer_entries:
        raw = tar_bytes(entries)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        gz = write_blob(top / "layer.tgz", raw).read_bytes()
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(layout, gz)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      **_blob(layout, config)},
                           "layers": layers}).encode()
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                **_blob(layout, manifest),
                                                "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
    (layout / "index.json").write_text(json.dumps(index))
    subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)  # the test users read the layout
    return layout


def _inspect(mesobox: Mesobox, user: User | None, store: Path, ref: str) -> dict[str, object]:
    result = mesobox("inspect", ref, as_user=user, env={"MESOBOX_STORE": str(store)})
    assert result.returncode == 0, result.stderr.decode()
    data: dict[str, object] = json.loads(result.stdout)
    return data


@pytest.mark.parametrize("who", ["root", "user"])
def test_two_stores_make_the_same_squashfs_bytes(mesobox: Mesobox, user: User, world_tmp: Path, who: str) -> None:
    layout = _layout(world_tmp)
    caller = user if who == "user" else None
    digests = []
    for n in (1, 2):
        store = world_tmp / f"store{n}"
        store.mkdir()
        if caller is not None:
            os.chown(store, user.uid, user.gid)
        result = mesobox("pull", f"oci:{layout}:v1", as_user=caller, env={"MESOBOX_STORE": str(store)})
        assert result.returncode == 0, result.stderr.decode()
        data = _inspect(mesobox, caller, store, f"oci:{layout}:v1")
        squashfs = Path(str(data["Squashfs"]))
        assert data["SquashfsDigest"] == "sha256:" + hashlib.sha256(squashfs.read_bytes()).hexdigest()
        digests.append(data["SquashfsDigest"])
        time.sleep(1.1)  # a second later: any time taken from the clock would differ
    assert digests[0] == digests[1]


def test_root_and_two_users_make_the_same_squashfs_bytes(
        mesobox: Mesobox, user: User, attacker: User, world_tmp: Path) -> None:
    """Every store holds the same bytes for one image, whoever flattened it: an ordinary
    user's squashfs carries the image's owners (not the user's own id), as root's does."""
    layout = _layout(world_tmp, OWNED_LAYERS)
    digests = {}
    for who, caller in (("root", None), ("user", user), ("other", attacker)):
        store = world_tmp / f"store-{who}"
        store.mkdir()
        if caller is not None:
            os.chown(store, caller.uid, caller.gid)
        result = mesobox("pull", "--format", "squashfs", f"oci:{layout}:v1", as_user=caller,
                         env={"MESOBOX_STORE": str(store)})
        assert result.returncode == 0, result.stderr.decode()
        data = _inspect(mesobox, caller, store, f"oci:{layout}:v1")
        digests[who] = data["SquashfsDigest"]
        if who == "user":
            listing = subprocess.run(["unsquashfs", "-lln", str(data["Squashfs"])], capture_output=True,
                                     check=True).stdout.decode("utf-8", "surrogateescape")
    assert digests["user"] == digests["root"] == digests["other"], digests
    owners = {}
    for line in listing.splitlines():  # "MODE UID/GID SIZE DATE TIME NAME[ -> TARGET]"
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("squashfs-root"):
            owners[fields[5].split(" -> ")[0].removeprefix("squashfs-root")] = fields[1]
    assert owners[""] == "0/0" and owners["/etc"] == "0/0"
    assert owners["/home/app"] == "1000/1000" and owners["/home/app/.profile"] == "0/0"
    assert owners["/etc/os-release"] == "100/101" and owners["/var/www/copy.html"] == "33/33"
    assert owners["/var/www/link"] == "33/33" and owners["/var/www/a name"] == "7/7"
    assert owners["/var/www/pipe"] == "33/4" and owners["/srv/back"] == "0/0" and "/srv/gone" not in owners
    odd = {name: who for name, who in owners.items() if name.startswith("/var/odd/")}
    assert len(odd) == 6 and set(odd.values()) == {"8/8"}, odd


def test_source_date_epoch_sets_the_filesystem_time(mesobox: Mesobox, world_tmp: Path) -> None:
    layout = _layout(world_tmp)
    found = []
    for epoch in ("0", "1700000000"):
        store = world_tmp / f"store{epoch}"
        result = mesobox("pull", f"oci:{layout}:v1", env={"MESOBOX_STORE": str(store), "SOURCE_DATE_EPOCH": epoch})
        assert result.returncode == 0, result.stderr.decode()
        squashfs = Path(str(_inspect(mesobox, None, store, f"oci:{layout}:v1")["Squashfs"]))
        head = squashfs.read_bytes()[:12]
        found.append(int.from_bytes(head[8:12], "little"))  # superblock: mkfs_time at offset 8
    assert found == [0, 1700000000]


# --- provenance --------------------------------------------------------------------------


@pytest.fixture()
def stored_busybox(mesobox: Mesobox, user: User, world_tmp: Path) -> tuple[str, str]:
    """A busybox image pulled into the user's store: (reference as typed, manifest digest)."""
    layout = make_oci_image(world_tmp / "bb-layout", "v1", [make_busybox_rootfs])
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    ref = f"oci:{layout}:v1"
    pulled = mesobox("pull", "-q", ref, as_user=user)
    assert pulled.returncode == 0, pulled.stderr.decode()
    return ref, pulled.stdout.decode().split()[-1]


def _launches(mesobox: Mesobox, user: User) -> list[list[str]]:
    log = Path(mesobox.runtime_env(user)["MESOBOX_RUNTIME_DIR"]) / "launches.log"
    return [line.split("\t") for line in log.read_text().splitlines()]


def test_every_launch_records_the_image_digest_it_ran(
    mesobox: Mesobox, user: User, stored_busybox: tuple[str, str], busybox_rootfs: Path
) -> None:
    ref, digest = stored_busybox
    for _ in range(2):  # the second launch runs the saved plan
        result = mesobox("exec", ref, "/bin/true", as_user=user, env={"SLURM_JOB_ID": "4242"})
        assert result.returncode == 0, result.stderr.decode()
    assert mesobox("exec", str(busybox_rootfs), "/bin/true", as_user=user).returncode == 0
    rows = _launches(mesobox, user)
    assert len(rows) == 3, rows
    for when, pid, job, image in rows[:2]:
        assert time.strptime(when, "%Y-%m-%dT%H:%M:%SZ") and pid.isdigit() and job == "4242"
        assert image.endswith("@" + digest), image
    assert rows[2][2:] == ["-", str(busybox_rootfs)]


def test_ranks_starting_together_each_write_one_whole_line(
    mesobox: Mesobox, user: User, stored_busybox: tuple[str, str]
) -> None:
    ref, digest = stored_busybox
    procs = []
    for _ in range(6):
        argv, env = mesobox_argv(mesobox, user, ["exec", ref, "/bin/true"])
        procs.append(subprocess.Popen(argv, env=env, stderr=subprocess.PIPE))
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    rows = _launches(mesobox, user)
    assert sorted(int(pid) for _, pid, _, _ in rows) == sorted(p.pid for p in procs)
    assert all(len(row) == 4 and row[3].endswith("@" + digest) for row in rows), rows


def test_inspect_of_an_instance_shows_the_digest_it_runs(
    mesobox: Mesobox, user: User, stored_busybox: tuple[str, str], world_tmp: Path
) -> None:
    ref, digest = stored_busybox
    runner = Instances(mesobox, world_tmp / "runtime", user)
    try:
        runner.ok("instance", "start", ref, "prov", "sleep", "300")
        runner.wait_for("prov", lambda row: row.get("status") == "running")
        shown = json.loads(runner.ok("inspect", "prov"))
        assert shown["name"] == "prov" and shown["image_ran"].endswith("@" + digest), shown
        assert json.loads(runner.ok("inspect", "--type", "instance", "prov"))["image_ran"] == shown["image_ran"]
        refused = runner("inspect", "--type", "image", "prov")
        assert refused.returncode != 0 and refused.stderr.decode().startswith("mesobox: error:")
    finally:
        runner.stop_everything()


def test_a_name_the_pseudo_file_cannot_carry_keeps_the_users_id_with_a_warning(
        mesobox: Mesobox, user: User, world_tmp: Path) -> None:
    layout = _layout(world_tmp, ([dir_("etc"), reg("etc/new\nline", b"x", uid=9, gid=9),
                                  reg("etc/plain", b"y", uid=9, gid=9)],))
    store = world_tmp / "store"
    store.mkdir()
    os.chown(store, user.uid, user.gid)
    result = mesobox("pull", "--format", "squashfs", f"oci:{layout}:v1", as_user=user,
                     env={"MESOBOX_STORE": str(store)})
    assert result.returncode == 0, result.stderr.decode()
    assert b"1 path(s) with a newline in their name keep your own id" in result.stderr
    squashfs = str(_inspect(mesobox, user, store, f"oci:{layout}:v1")["Squashfs"])
    listing = subprocess.run(["unsquashfs", "-lln", squashfs], capture_output=True, check=True).stdout.decode()
    assert "9/9" in next(line for line in listing.splitlines() if line.endswith("etc/plain"))
