"""OCI hooks that CDI devices bring (launch/cdi.py → Spec.hooks → program.py's "hooks"
→ execute.run_hooks), run by an ordinary user for real.

Root writes the hook programs into a root-owned directory of the test's own (a
createContainer hook's path is the host's) and CDI specs naming them into another; the
image is a busybox tree that belongs to the user, so that a hook may write into its
root (a tmpfs over it: --writable-tmpfs, implied by a createContainer hook)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Mesobox, User, make_busybox_rootfs

# The createContainer hook: reads the OCI state on stdin, then the bundle's config.json,
# and writes what it saw into the root that config.json names.  Its environment is read
# from /proc/self/environ: what execve gave it (Python's locale coercion adds to
# os.environ).
CREATE_HOOK = r"""#!/usr/bin/python3 -I
import json, os, sys
state = json.load(sys.stdin)
with open(os.path.join(state["bundle"], "config.json")) as f:
    config = json.load(f)
root = config["root"]["path"]
with open("/proc/self/environ", "rb") as f:
    env = sorted(item for item in f.read().decode().split("\0") if item)
report = {
    "argv": sys.argv[1:], "env": env, "status": state["status"], "id": state["id"], "bundle": state["bundle"],
    # the state's pid is the container's process, in the mount namespace the hook runs in
    "same_mount_ns": os.readlink(f"/proc/{state['pid']}/ns/mnt") == os.readlink("/proc/self/ns/mnt"),
    "root_is_image": os.path.isfile(os.path.join(root, "etc", "from-image")),
    "root": root, "root_readonly": config["root"]["readonly"], "kinds": sorted(config["hooks"]),
    "from_host": [item for item in config["process"]["env"] if item.startswith("FROM_HOST=")],
}
with open(os.path.join(root, "etc", "hooked"), "w") as f:
    json.dump(report, f)
log = os.environ.get("HOOK_LOG")
if log:
    with open(log, "a") as f:
        f.write("ran\n")
print("create hook ran")
"""


@pytest.fixture()
def hooks(world_tmp: Path) -> Path:
    top = world_tmp / "hooks"
    top.mkdir(mode=0o755)
    os.chmod(top, 0o755)
    for name, text in (("create", CREATE_HOOK), ("fail", "#!/bin/sh\nexit 3\n"),
                       ("hang", "#!/bin/sh\n/bin/sleep 100 &\nwait\n")):
        (top / name).write_text(text)
        os.chmod(top / name, 0o755)
    return top


@pytest.fixture()
def image(world_tmp: Path, user: User) -> Path:
    root = make_busybox_rootfs(world_tmp / "image")
    (root / "etc" / "from-image").write_text("yes\n")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(root)], check=True)
    return root


def _spec(**hooks: list[dict[str, Any]]) -> dict[str, Any]:
    """A spec of kind hooks.example/dev whose device "d" brings ``hooks`` (CDI form)."""
    listed = [{"hookName": kind, **hook} for kind, items in hooks.items() for hook in items]
    return {"cdiVersion": "0.6.0", "kind": "hooks.example/dev",
            "devices": [{"name": "d", "containerEdits": {"env": ["DEV_ENV=d"], "hooks": listed}}]}


def _specs(world_tmp: Path, spec: dict[str, Any]) -> Path:
    specs = world_tmp / "cdi"
    specs.mkdir(mode=0o755, exist_ok=True)
    (specs / "hooks.json").write_text(json.dumps(spec))
    os.chmod(specs / "hooks.json", 0o644)
    return specs


def _run(mesobox: Mesobox, user: User, specs: Path, image: Path, *args: str, **env: str) -> Any:
    return mesobox("exec", "--device", "hooks.example/dev=d", str(image), *args, as_user=user, timeout=60,
                   env={"MESOBOX_CDI_SPEC_DIRS": str(specs), **env})


def _one_error_line(proc: Any, says: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("mesobox: error:")]
    assert len(errors) == 1 and says in errors[0], err
    return err


# The startContainer hook: busybox's sh in the container, after pivot_root (it sees what
# the createContainer hook wrote), with only its own environment.
START = ["sh", "-c", 'cat > /tmp/start-state; echo "$START_VAR/${DEV_ENV:-unset}/$(cat /etc/from-image)" '
                     "> /tmp/start-env; test -e /etc/hooked && echo start-hook-sees-hooked"]


def test_create_and_start_hooks_run_in_the_container(mesobox: Mesobox, user: User, world_tmp: Path,
                                                     hooks: Path, image: Path) -> None:
    spec = _spec(createContainer=[{"path": str(hooks / "create"), "args": ["create", "one", "two"],
                                   "env": ["HOOK_VAR=hello", "SECOND=2"], "timeout": 30}],
                 startContainer=[{"path": "/bin/sh", "args": START, "env": ["START_VAR=inside"]}])
    specs = _specs(world_tmp, spec)
    proc = _run(mesobox, user, specs, image, "sh", "-c",
                "cat /etc/hooked; echo; cat /tmp/start-state; echo; cat /tmp/start-env; echo $DEV_ENV",
                FROM_HOST="first")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "create hook ran" in proc.stderr.decode()  # the hook's stdout goes to mesobox's stderr
    lines = proc.stdout.decode().splitlines()
    report = json.loads(lines[0])
    assert report["argv"] == ["one", "two"]
    assert report["env"] == ["HOOK_VAR=hello", "SECOND=2"]  # exactly what the spec gives, nothing else
    assert report["status"] == "creating" and report["id"].startswith("mesobox-")
    assert report["same_mount_ns"] is True
    assert report["root_is_image"] is True  # root.path is the container's root as the hook sees it
    assert report["root"] != "/" and report["root_readonly"] is False
    assert report["kinds"] == ["createContainer", "startContainer"]
    assert report["from_host"] == ["FROM_HOST=first"]  # process.env is the container's
    start = json.loads(lines[1])
    assert start["status"] == "created" and start["pid"] > 0
    assert lines[2:] == ["inside/unset/yes", "d"]  # its env, not the container's, in the container's root
    assert "start-hook-sees-hooked" in proc.stderr.decode()


def test_a_hook_implies_a_writable_root(mesobox: Mesobox, user: User, world_tmp: Path, hooks: Path,
                                        image: Path) -> None:
    """nvidia-ctk's hooks write into the root: a createContainer hook gives the container
    a tmpfs over its root, as --writable-tmpfs does; its changes are gone afterwards."""
    specs = _specs(world_tmp, _spec(createContainer=[{"path": str(hooks / "create")}]))
    proc = mesobox("exec", "--debug", "--device", "hooks.example/dev=d", str(image), "sh", "-c",
                   "test -f /etc/hooked && touch /etc/also && echo writable", as_user=user, timeout=60,
                   env={"MESOBOX_CDI_SPEC_DIRS": str(specs)})
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"writable\n"
    assert "--writable-tmpfs implied" in proc.stderr.decode()
    assert not (image / "etc" / "hooked").exists() and not (image / "etc" / "also").exists()


def test_a_failing_hook_stops_the_launch(mesobox: Mesobox, user: User, world_tmp: Path, hooks: Path,
                                         image: Path) -> None:
    specs = _specs(world_tmp, _spec(createContainer=[{"path": str(hooks / "fail")}]))
    proc = _run(mesobox, user, specs, image, "sh", "-c", "echo started")
    _one_error_line(proc, f"createContainer hook {hooks}/fail failed with exit status 3")
    assert proc.stdout == b""


def test_a_failing_start_hook_stops_the_launch(mesobox: Mesobox, user: User, world_tmp: Path, hooks: Path,
                                               image: Path) -> None:
    specs = _specs(world_tmp, _spec(startContainer=[{"path": "/bin/sh", "args": ["sh", "-c", "exit 4"]}]))
    proc = _run(mesobox, user, specs, image, "sh", "-c", "echo started")
    _one_error_line(proc, "startContainer hook /bin/sh failed with exit status 4")
    assert proc.stdout == b""


def test_a_missing_hook_program(mesobox: Mesobox, user: User, world_tmp: Path, image: Path) -> None:
    specs = _specs(world_tmp, _spec(createContainer=[{"path": "/nonexistent/hook"}]))
    proc = _run(mesobox, user, specs, image, "sh", "-c", "echo started")
    _one_error_line(proc, "createContainer hook /nonexistent/hook: cannot execute: No such file or directory")
    assert proc.stdout == b""


def test_a_hanging_hook_is_killed_at_its_timeout(mesobox: Mesobox, user: User, world_tmp: Path, hooks: Path,
                                                 image: Path) -> None:
    """The whole hook is killed, its children too: one left behind would hold mesobox's
    stderr open, and this run would not end before its 60 s limit."""
    specs = _specs(world_tmp, _spec(createContainer=[{"path": str(hooks / "hang"), "timeout": 1}]))
    proc = _run(mesobox, user, specs, image, "sh", "-c", "echo started")
    _one_error_line(proc, f"createContainer hook {hooks}/hang did not finish within its timeout of 1 s")
    assert proc.stdout == b""


@pytest.mark.parametrize("kind", ["prestart", "createRuntime", "poststart", "poststop"])
def test_hooks_mesobox_does_not_run_are_refused(mesobox: Mesobox, user: User, world_tmp: Path, hooks: Path,
                                                image: Path, kind: str) -> None:
    specs = _specs(world_tmp, _spec(**{kind: [{"path": str(hooks / "create")}]}))
    proc = _run(mesobox, user, specs, image, "sh", "-c", "echo started")
    _one_error_line(proc, f"{kind} hooks are not run by mesobox run yet")
    assert proc.stdout == b""


@pytest.mark.parametrize(("hook", "says"), [
    ({"hookName": "sometime", "path": "/bin/true"}, "bad hookName 'sometime'"),
    ({"hookName": "createContainer", "path": "bin/true"}, "a hook needs an absolute path"),
    ({"hookName": "createContainer", "path": "/bin/true", "timeout": 0}, "timeout must be a positive number"),
    ({"hookName": "createContainer", "path": "/bin/true", "env": ["NOVALUE"]}, "env must be a list of KEY=VALUE"),
])
def test_a_malformed_hook_is_a_broken_spec(mesobox: Mesobox, user: User, world_tmp: Path, image: Path,
                                           hook: dict[str, Any], says: str) -> None:
    spec = _spec()
    spec["devices"][0]["containerEdits"]["hooks"] = [hook]
    proc = _run(mesobox, user, _specs(world_tmp, spec), image, "true")
    _one_error_line(proc, says)


def test_a_saved_launch_runs_its_hooks_again(mesobox: Mesobox, user: User, world_tmp: Path, hooks: Path,
                                             image: Path) -> None:
    """The plan cache keeps the program, hooks and all: a replayed launch runs them (with
    the bundle's process.env of this launch), and compiling runs none (the hook's log
    has one line per launch)."""
    log = world_tmp / "hook.log"
    log.touch()
    os.chown(log, user.uid, user.gid)
    specs = _specs(world_tmp, _spec(createContainer=[{"path": str(hooks / "create"),
                                                      "env": [f"HOOK_LOG={log}"]}]))
    hour_ago = time.time() - 3600
    for path in (image / "etc" / "passwd", image / "etc" / "group", specs / "hooks.json"):
        os.utime(path, (hour_ago, hour_ago))  # settled: a launch may be saved
    runtime = world_tmp / "run"

    def launch(value: str) -> dict[str, Any]:
        proc = mesobox("exec", "--device", "hooks.example/dev=d", str(image), "cat", "/etc/hooked", as_user=user,
                       cwd="/", timeout=60, env={"MESOBOX_CDI_SPEC_DIRS": str(specs), "FROM_HOST": value,
                                                 "MESOBOX_RUNTIME_DIR": str(runtime)})
        assert proc.returncode == 0, proc.stderr.decode()
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    assert launch("one")["from_host"] == ["FROM_HOST=one"]
    assert list((runtime / "plans").iterdir()), "the launch saved no plan: this test would prove nothing"
    assert launch("two")["from_host"] == ["FROM_HOST=two"]
    assert launch("three")["from_host"] == ["FROM_HOST=three"]
    assert log.read_text() == "ran\n" * 3


def test_hooks_cross_the_config_json_boundary() -> None:
    """Spec.hooks is config.json's "hooks", both ways; validate() checks each hook."""
    from mesobox.errors import UsageError
    from mesobox.oci.spec import Hook, Hooks, Linux, Process, Root, Spec, User, from_oci_json, to_oci_json

    spec = Spec(process=Process(args=("true",), env=(), cwd="/", user=User(uid=1, gid=1)),
                root=Root(path="/image"),
                linux=Linux(),
                hooks=Hooks(createContainer=(Hook(path="/usr/bin/nvidia-ctk", args=("nvidia-ctk", "hook"),
                                                  env=("A=1",), timeout=5),),
                            poststop=(Hook(path="/bin/true"),)))
    doc = to_oci_json(spec)
    assert doc["hooks"] == {"createContainer": [{"path": "/usr/bin/nvidia-ctk", "args": ["nvidia-ctk", "hook"],
                                                 "env": ["A=1"], "timeout": 5}],
                            "poststop": [{"path": "/bin/true"}]}
    assert from_oci_json(doc) == spec
    assert "hooks" not in to_oci_json(spec.replace(hooks=Hooks()))  # a bundle without hooks is as before
    for bad, says in ((Hook(path="true"), "must be absolute"), (Hook(path="/x", timeout=0), "positive"),
                      (Hook(path="/x", env=("NOVALUE",)), "bad environment entry")):
        with pytest.raises(UsageError, match=says):
            spec.replace(hooks=Hooks(startContainer=(bad,))).validate()
    with pytest.raises(UsageError, match="malformed OCI runtime config"):
        from_oci_json({**doc, "hooks": {"sometime": []}})
