"""CDI devices (--device VENDOR/CLASS=NAME, launch/cdi.py), run by an ordinary user.

Root makes character devices with mknod under the test's own directory (copies of
/dev/null, 1:3, and /dev/zero, 1:5, mode 0666) and writes CDI specs, JSON and YAML of
two spec versions, that point at them, into a spec directory given through the
``cdi_spec_dirs`` setting (MESOBOX_CDI_SPEC_DIRS); no host GPU is needed.  The hooks'
tests (createContainer, startContainer) are in test_hooks.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Mesobox, User, make_busybox_rootfs


@pytest.fixture()
def devices(char_devices: Path) -> Path:
    top = char_devices
    (top / "lib").mkdir()
    os.chmod(top / "lib", 0o777)  # writable to the user: only the spec's "ro" keeps it read-only inside
    (top / "lib" / "libvendor.so").write_text("vendor library\n")
    os.chmod(top / "lib" / "libvendor.so", 0o644)
    return top


def _json_spec(devs: Path) -> dict[str, Any]:
    return {
        "cdiVersion": "0.6.0",
        "kind": "example.com/test",
        "containerEdits": {"env": ["EXAMPLE_SPEC=json"],
                           "mounts": [{"hostPath": str(devs / "lib"), "containerPath": "/opt/vendor",
                                       "options": ["ro", "nosuid", "nodev", "bind"]}]},
        "devices": [
            {"name": "dev0", "containerEdits": {
                "env": ["EXAMPLE_DEV=dev0"],
                "deviceNodes": [{"path": "/dev/example0", "hostPath": str(devs / "null"), "type": "c",
                                 "major": 1, "minor": 3, "permissions": "rw"}]}},
            {"name": "dev1", "containerEdits": {
                "deviceNodes": [{"path": "/dev/example1", "hostPath": str(devs / "zero")}]}},
        ],
    }


YAML_SPEC = """\
cdiVersion: "0.8.0"
kind: other.example.org/acc
devices:
  - name: "0"
    containerEdits:
      env: ["ACC_VISIBLE=0"]
      deviceNodes:
        - path: /dev/acc0
          hostPath: {devs}/zero
          type: c
"""


@pytest.fixture()
def cdi_dir(world_tmp: Path, devices: Path) -> Path:
    specs = world_tmp / "cdi"
    specs.mkdir(mode=0o755)
    (specs / "example.json").write_text(json.dumps(_json_spec(devices)))
    (specs / "acc.yaml").write_text(YAML_SPEC.format(devs=devices))
    for path in specs.iterdir():
        os.chmod(path, 0o644)
    return specs


def _run(mesobox: Mesobox, user: User, rootfs: Path, specs: Path, *args: str) -> Any:
    return mesobox("exec", *args, env={"MESOBOX_CDI_SPEC_DIRS": str(specs)}, as_user=user)


def _one_error_line(proc: Any, says: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    assert says in err, err
    assert len([line for line in err.splitlines() if line.strip()]) <= 2, err  # the error and its hint


def test_a_cdi_device_node_env_and_mount(mesobox: Mesobox, user: User, busybox_rootfs: Path, cdi_dir: Path) -> None:
    script = ("echo x > /dev/example0 && echo wrote; echo $EXAMPLE_SPEC $EXAMPLE_DEV; cat /opt/vendor/libvendor.so; "
              "touch /opt/vendor/x 2>/dev/null || echo read-only; test -e /dev/example1 || echo no-dev1")
    proc = _run(mesobox, user, busybox_rootfs, cdi_dir, "--device", "example.com/test=dev0",
                str(busybox_rootfs), "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines() == ["wrote", "json dev0", "vendor library", "read-only", "no-dev1"]


def test_all_devices_of_a_kind(mesobox: Mesobox, user: User, busybox_rootfs: Path, cdi_dir: Path) -> None:
    proc = _run(mesobox, user, busybox_rootfs, cdi_dir, "--device", "example.com/test=all",
                str(busybox_rootfs), "sh", "-c", "echo x > /dev/example0 && head -c 2 /dev/example1 | od -An -tx1")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split() == [b"00", b"00"]


def test_a_yaml_spec(mesobox: Mesobox, user: User, busybox_rootfs: Path, cdi_dir: Path) -> None:
    proc = _run(mesobox, user, busybox_rootfs, cdi_dir, "--device", "other.example.org/acc=0", "-e", "KEEP=1",
                str(busybox_rootfs), "sh", "-c", "head -c 1 /dev/acc0 | od -An -tx1; echo $ACC_VISIBLE $KEEP")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split() == [b"00", b"0", b"1"]


def test_user_env_overrides_cdi_env(mesobox: Mesobox, user: User, busybox_rootfs: Path, cdi_dir: Path) -> None:
    proc = _run(mesobox, user, busybox_rootfs, cdi_dir, "--device", "example.com/test=dev0", "-e", "EXAMPLE_DEV=mine",
                str(busybox_rootfs), "sh", "-c", "echo $EXAMPLE_DEV")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"mine\n"


@pytest.mark.parametrize(("name", "says"), [
    ("example.com/test=dev9", "unknown CDI device example.com/test=dev9"),
    ("nobody.example/none=all", "no CDI spec describes devices of kind nobody.example/none"),
    ("example.com/te st=dev0", "bad CDI device name"),
    ("example.com=dev0", "bad CDI device name"),
])
def test_bad_names(mesobox: Mesobox, user: User, busybox_rootfs: Path, cdi_dir: Path, name: str, says: str) -> None:
    proc = _run(mesobox, user, busybox_rootfs, cdi_dir, "--device", name, str(busybox_rootfs), "true")
    _one_error_line(proc, says)


def _write(specs: Path, name: str, text: str) -> None:
    (specs / name).write_text(text)
    os.chmod(specs / name, 0o644)


def test_a_malformed_spec_is_named_when_its_device_is_asked(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                                             cdi_dir: Path) -> None:
    _write(cdi_dir, "broken.yaml", "cdiVersion: '0.7.0'\nkind: broken.example/x\ndevices: [name: \n  - : :\n")
    _write(cdi_dir, "old.json", json.dumps({"cdiVersion": "0.2.0", "kind": "old.example/x",
                                            "devices": [{"name": "a", "containerEdits": {}}]}))
    proc = _run(mesobox, user, busybox_rootfs, cdi_dir, "--device", "old.example/x=a", str(busybox_rootfs), "true")
    _one_error_line(proc, f"CDI spec {cdi_dir}/old.json: cdiVersion '0.2.0' is not supported")
    proc = _run(mesobox, user, busybox_rootfs, cdi_dir, "--device", "broken.example/x=a", str(busybox_rootfs), "true")
    _one_error_line(proc, f"CDI spec {cdi_dir}/broken.yaml: cannot be parsed")
    # Another device still works; the broken specs are warnings then.
    proc = _run(mesobox, user, busybox_rootfs, cdi_dir, "--device", "example.com/test=dev0", str(busybox_rootfs),
                "true")
    assert proc.returncode == 0, proc.stderr.decode()
    assert f"{cdi_dir}/old.json" in proc.stderr.decode()


def test_a_missing_host_node(mesobox: Mesobox, user: User, busybox_rootfs: Path, cdi_dir: Path,
                             devices: Path) -> None:
    (devices / "zero").unlink()
    proc = _run(mesobox, user, busybox_rootfs, cdi_dir, "--device", "example.com/test=dev1", str(busybox_rootfs),
                "true")
    _one_error_line(proc, f"CDI device node {devices}/zero does not exist")


def test_additional_gids_are_refused(mesobox: Mesobox, user: User, busybox_rootfs: Path, cdi_dir: Path,
                                     devices: Path) -> None:
    spec = _json_spec(devices)
    spec["kind"] = "gids.example/gpu"
    spec["containerEdits"]["additionalGIDs"] = [44]
    _write(cdi_dir, "gids.json", json.dumps(spec))
    proc = _run(mesobox, user, busybox_rootfs, cdi_dir, "--device", "gids.example/gpu=dev0", str(busybox_rootfs),
                "true")
    _one_error_line(proc, "additionalGIDs are not supported yet")


def test_a_spec_cannot_bind_past_the_allowed_sources(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                                     cdi_dir: Path, devices: Path) -> None:
    """A user's own spec directory grants nothing -B would not: its mounts obey
    allowed_bind_sources."""
    proc = mesobox("exec", "--device", "example.com/test=dev0", str(busybox_rootfs), "true", as_user=user,
                   env={"MESOBOX_CDI_SPEC_DIRS": str(cdi_dir), "MESOBOX_ALLOWED_BIND_SOURCES": "/nonexistent-dir"})
    _one_error_line(proc, "outside the allowed bind sources (spec ")


def test_a_saved_launch_notices_a_changed_spec(mesobox: Mesobox, user: User, world_tmp: Path, cdi_dir: Path,
                                               devices: Path) -> None:
    """The plan cache keeps a launch program; the spec files and the directory listing
    are its questions, so a spec that changes (or a new one) is read anew."""
    image = make_busybox_rootfs(world_tmp / "image")
    for dirpath, dirnames, _files in os.walk(image):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o1777 if name == "tmp" else 0o755)
    os.chmod(image, 0o755)
    hour_ago = time.time() - 3600
    for path in (image / "etc" / "passwd", image / "etc" / "group", cdi_dir / "example.json", cdi_dir / "acc.yaml"):
        os.utime(path, (hour_ago, hour_ago))  # settled: a launch may be saved
    runtime = world_tmp / "run"

    def echo() -> bytes:
        proc = mesobox("exec", "--device", "example.com/test=dev0", str(image), "sh", "-c", "echo $EXAMPLE_DEV",
                       as_user=user, cwd="/",
                       env={"MESOBOX_CDI_SPEC_DIRS": str(cdi_dir), "MESOBOX_RUNTIME_DIR": str(runtime)})
        assert proc.returncode == 0, proc.stderr.decode()
        return bytes(proc.stdout)

    assert echo() == b"dev0\n"
    assert list((runtime / "plans").iterdir()), "the launch saved no plan: this test would prove nothing"
    assert echo() == b"dev0\n"
    spec = _json_spec(devices)
    spec["devices"][0]["containerEdits"]["env"] = ["EXAMPLE_DEV=changed"]
    _write(cdi_dir, "example.json", json.dumps(spec))
    os.utime(cdi_dir / "example.json", (hour_ago + 60, hour_ago + 60))
    assert echo() == b"changed\n"
    assert echo() == b"changed\n"
    _write(cdi_dir, "z-later.json", json.dumps({"cdiVersion": "0.5.0", "kind": "example.com/test", "devices": [
        {"name": "dev0", "containerEdits": {"env": ["EXAMPLE_DEV=later"]}}]}))
    assert echo() == b"later\n"


@pytest.mark.parametrize("how", ["writable-directory", "others-file", "writable-file", "writable-parent"])
def test_a_spec_others_could_write_is_not_trusted(mesobox: Mesobox, user: User, attacker: User,
                                                  busybox_rootfs: Path, world_tmp: Path, devices: Path,
                                                  how: str) -> None:
    """A spec names programs to run and files to bind: one that a second user wrote, or
    could replace (its file or a directory on the way to it writable by them, not
    sticky), is refused in one line, as a broken spec is."""
    top = world_tmp / "site"
    top.mkdir(mode=0o777 if how == "writable-parent" else 0o755)
    os.chmod(top, 0o777 if how == "writable-parent" else 0o755)  # past root's umask
    specs = top / "cdi"
    specs.mkdir()
    os.chmod(specs, 0o777 if how == "writable-directory" else 0o755)
    _write(specs, "example.json", json.dumps(_json_spec(devices)))
    if how == "others-file":
        os.chown(specs / "example.json", attacker.uid, attacker.gid)
    if how == "writable-file":
        os.chmod(specs / "example.json", 0o666)
    proc = _run(mesobox, user, busybox_rootfs, specs, "--device", "example.com/test=dev0", str(busybox_rootfs),
                "true")
    _one_error_line(proc, f"CDI spec {specs}/example.json: is not trusted")


def test_a_users_own_spec_in_a_sticky_directory_is_trusted(mesobox: Mesobox, user: User, busybox_rootfs: Path,
                                                           world_tmp: Path, devices: Path) -> None:
    """world_tmp is 1777, as /tmp is: others cannot replace what is in it, so the user's
    own spec directory there counts (what it grants obeys allowed_bind_sources)."""
    specs = world_tmp / "mine"
    specs.mkdir(mode=0o755)
    _write(specs, "example.json", json.dumps(_json_spec(devices)))
    os.chown(specs, user.uid, user.gid)
    os.chown(specs / "example.json", user.uid, user.gid)
    proc = _run(mesobox, user, busybox_rootfs, specs, "--device", "example.com/test=dev0", str(busybox_rootfs),
                "sh", "-c", "echo $EXAMPLE_DEV")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"dev0\n"
