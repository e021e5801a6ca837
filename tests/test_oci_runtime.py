"""mesobox-oci, the OCI runtime with runc's command line, driven as its real clients
drive it: the lifecycle verbs one by one (as conmon does), hooks, --pid-file, --log,
and podman itself running rootless containers with ``--runtime mesobox-oci``, its
output compared with runc's."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, User, make_busybox_rootfs, make_oci_image, need_tool, open_busybox_rootfs, wait_until

pytestmark = [pytest.mark.userns]

LOOP = "trap 'echo got-TERM; exit 7' TERM; echo up; while true; do sleep 0.1; done"


@pytest.fixture()
def oci(test_python: str, mesobox_src: Path, world_tmp: Path) -> Path:
    """``mesobox-oci`` as installed: a wrapper every user may run (bin/mesobox-oci needs
    the package importable; the tests' source copy is world-readable, and so is this
    copy of the script: the checkout may sit where users cannot read, as /root does)."""
    script = world_tmp / "bin-mesobox-oci"
    shutil.copyfile(ROOT / "bin" / "mesobox-oci", script)
    os.chmod(script, 0o644)
    wrapper = world_tmp / "mesobox-oci"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={mesobox_src} PYTHONDONTWRITEBYTECODE=1 "
                       f"MESOBOX_SITE_CONFIG=/nonexistent exec {test_python} {script} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    return wrapper


@pytest.fixture()
def bundle(shared_tmp: Path, world_tmp: Path, user: User) -> Path:
    """The user's bundle, its rootfs a busybox tree every user can read; config.json comes later."""
    top = world_tmp / "bundle"
    top.mkdir()
    os.chmod(top, 0o755)
    os.chown(top, user.uid, user.gid)
    rootfs = shared_tmp / "oci-busybox"
    if not rootfs.exists():
        open_busybox_rootfs(rootfs)
    (top / "rootfs").symlink_to(rootfs)
    return top


class Client:
    """Runs mesobox-oci as ``user`` with its state under ``root``.  ``create`` and
    ``run -d`` leave a container holding its stdio, so those write it to files."""

    def __init__(self, oci: Path, user: User, root: Path, world: Path) -> None:
        self.oci, self.user, self.root, self.world = oci, user, root, world

    def __call__(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        return self.user.run([str(self.oci), "--root", str(self.root), *args], cwd=cwd)

    def detached(self, name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        """The verb with the container's stdout/stderr in ``name``.out/.err."""
        out, err = self.world / f"{name}.out", self.world / f"{name}.err"
        script = 'out=$1; err=$2; shift 2; exec "$@" >"$out" 2>"$err" </dev/null'
        return self.user.run(["sh", "-c", script, "sh", str(out), str(err), str(self.oci), "--root", str(self.root),
                              *args], cwd=cwd)

    def out(self, name: str) -> str:
        path = self.world / f"{name}.out"
        return path.read_text() if path.exists() else ""

    def err(self, name: str) -> str:
        path = self.world / f"{name}.err"
        return path.read_text() if path.exists() else ""

    def state(self, cid: str) -> dict[str, Any]:
        proc = self("state", cid)
        assert proc.returncode == 0, proc.stderr.decode()
        state: dict[str, Any] = json.loads(proc.stdout)
        return state


@pytest.fixture()
def client(oci: Path, user: User, world_tmp: Path) -> Client:
    return Client(oci, user, world_tmp / "state", world_tmp)


def write_config(client: Client, bundle: Path, args: list[str], **extra: Any) -> dict[str, Any]:
    """``mesobox-oci spec --rootless`` as the user, then the command (and more) set."""
    made = client("spec", "--rootless", "--bundle", str(bundle))
    assert made.returncode == 0, made.stderr.decode()
    config: dict[str, Any] = json.loads((bundle / "config.json").read_text())
    config["process"]["args"] = args
    config.update(extra)
    (bundle / "config.json").write_text(json.dumps(config))
    return config


def test_the_lifecycle_verb_by_verb(client: Client, bundle: Path) -> None:
    """create → created, with the pid of a process that waits → start → running →
    delete refused → kill → stopped → delete → gone; the config is read once."""
    write_config(client, bundle, ["sh", "-c", LOOP])
    pid_file = client.world / "pid"
    made = client.detached("c1", "create", "--bundle", str(bundle), "--pid-file", str(pid_file), "c1")
    assert made.returncode == 0, client.err("c1")
    state = client.state("c1")
    pid = int(pid_file.read_text())
    assert state["status"] == "created" and state["pid"] == pid and state["id"] == "c1"
    assert state["bundle"] == str(bundle)
    assert Path(f"/proc/{pid}").exists()
    assert "up" not in client.out("c1")  # the command has not started: it waits for start
    (bundle / "config.json").write_text("{}")  # read at create only: start must not need it
    started = client("start", "c1")
    assert started.returncode == 0, started.stderr.decode()
    wait_until(lambda: "up" in client.out("c1"), "the container's command runs")
    assert client.state("c1")["status"] == "running"
    again = client("start", "c1")
    assert again.returncode != 0 and b"running, not created" in again.stderr
    busy = client("delete", "c1")
    assert busy.returncode != 0 and b"is running" in busy.stderr
    assert client.state("c1")["status"] == "running"
    assert client("kill", "c1", "TERM").returncode == 0
    wait_until(lambda: client.state("c1")["status"] == "stopped", "the container stops")
    assert client.state("c1")["pid"] == 0
    wait_until(lambda: "got-TERM" in client.out("c1"), "the workload got SIGTERM")
    gone = client("delete", "c1")
    assert gone.returncode == 0, gone.stderr.decode()
    missing = client("state", "c1")
    assert missing.returncode != 0 and b"does not exist" in missing.stderr


def test_kill_of_a_created_container(client: Client, bundle: Path) -> None:
    write_config(client, bundle, ["sh", "-c", LOOP])
    made = client.detached("c2", "create", "--bundle", str(bundle), "c2")
    assert made.returncode == 0, client.err("c2")
    assert client.state("c2")["status"] == "created"
    killed = client("kill", "c2", "9")
    assert killed.returncode == 0, killed.stderr.decode()
    wait_until(lambda: client.state("c2")["status"] == "stopped", "the created container is gone")
    assert "up" not in client.out("c2")  # it never ran its command
    assert client("kill", "c2", "KILL").returncode != 0  # nothing left to signal
    assert client("delete", "c2").returncode == 0


def test_delete_force_and_a_taken_id(client: Client, bundle: Path) -> None:
    write_config(client, bundle, ["sh", "-c", LOOP])
    assert client.detached("c3", "run", "--detach", "--bundle", str(bundle), "c3").returncode == 0, client.err("c3")
    wait_until(lambda: "up" in client.out("c3"), "the container's command runs")
    pid = client.state("c3")["pid"]
    taken = client.detached("c3b", "create", "--bundle", str(bundle), "c3")
    assert taken.returncode != 0 and "already exists" in client.err("c3b")
    assert client("delete", "--force", "c3").returncode == 0
    assert not Path(f"/proc/{pid}/status").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert client("state", "c3").returncode != 0


HOOK = "cat > {dir}/$0.json"


def test_hooks_get_the_state_on_stdin(client: Client, bundle: Path, world_tmp: Path) -> None:
    seen = world_tmp / "seen"
    seen.mkdir(mode=0o777)
    os.chmod(seen, 0o777)

    def hook(kind: str) -> list[dict[str, Any]]:
        return [{"path": "/bin/sh", "args": ["sh", "-c", HOOK.format(dir=seen), kind], "env": ["HOOKED=1"]}]

    kinds = ("prestart", "createRuntime", "createContainer", "poststart", "poststop")
    write_config(client, bundle, ["sh", "-c", LOOP], hooks={kind: hook(kind) for kind in kinds})
    pid_file = world_tmp / "pid"
    assert client.detached("h", "create", "--bundle", str(bundle), "--pid-file", str(pid_file), "h1").returncode == 0, \
        client.err("h")
    pid = int(pid_file.read_text())

    def state(kind: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((seen / f"{kind}.json").read_text())
        return data

    for kind in ("prestart", "createRuntime"):
        assert state(kind) == {"ociVersion": "1.0.2", "id": "h1", "status": "created", "pid": pid,
                               "bundle": str(bundle), "annotations": {}}
    assert state("createContainer")["id"] == "h1"
    assert not (seen / "poststart.json").exists()
    assert client("start", "h1").returncode == 0
    assert state("poststart")["status"] == "running" and state("poststart")["pid"] == pid
    assert not (seen / "poststop.json").exists()
    assert client("delete", "--force", "h1").returncode == 0
    assert state("poststop")["status"] == "stopped" and state("poststop")["id"] == "h1"


def test_run_in_the_foreground_with_hooks(client: Client, bundle: Path, world_tmp: Path) -> None:
    """run = create + start + wait: the container's exit status, poststart's state."""
    seen = world_tmp / "poststart.json"
    write_config(client, bundle, ["sh", "-c", "echo fg; exit 5"],
                 hooks={"poststart": [{"path": "/bin/sh", "args": ["sh", "-c", f"cat > {seen}"]}]})
    proc = client.detached("fg", "run", "--bundle", str(bundle), "fg1")
    assert proc.returncode == 5 and client.out("fg") == "fg\n", client.err("fg")
    assert json.loads(seen.read_text())["id"] == "fg1"
    assert client.state("fg1")["status"] == "stopped"
    assert client("delete", "fg1").returncode == 0


def test_a_failing_prestart_hook_fails_create(client: Client, bundle: Path) -> None:
    write_config(client, bundle, ["sh", "-c", LOOP],
                 hooks={"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 3"]}]})
    made = client.detached("f", "create", "--bundle", str(bundle), "f1")
    assert made.returncode != 0
    assert "prestart hook /bin/sh failed with exit status 3" in client.err("f"), client.err("f")
    assert client("state", "f1").returncode != 0  # nothing left behind


def test_errors_go_to_the_log_as_runc_writes_them(client: Client, bundle: Path, world_tmp: Path) -> None:
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
                                                    "process": {"cwd": "/"}}))
    log = world_tmp / "log.json"
    proc = client.user.run([str(client.oci), "--root", str(client.root), "--log", str(log), "--log-format", "json",
                            "create", "--bundle", str(bundle), "bad"])
    assert proc.returncode != 0
    lines = proc.stderr.decode().splitlines()
    assert lines and lines[0].startswith("mesobox-oci: error: ") and "Traceback" not in proc.stderr.decode()
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "no process.args" in entry["msg"] and entry["time"]
    text_log = world_tmp / "log.txt"
    client.user.run([str(client.oci), "--root", str(client.root), "--log", str(text_log), "state", "nope"])
    assert 'level=error msg="container \'nope\' does not exist"' in text_log.read_text()


def test_exec_ps_list(client: Client, bundle: Path) -> None:
    write_config(client, bundle, ["sh", "-c", LOOP])
    assert client.detached("e", "run", "-d", "--bundle", str(bundle), "e1").returncode == 0, client.err("e")
    wait_until(lambda: "up" in client.out("e"), "the container's command runs")
    ran = client("exec", "--env", "X=from-exec", "--cwd", "/tmp", "e1", "sh", "-c", "echo $X; pwd; id -u")
    assert ran.returncode == 0, ran.stderr.decode()
    assert ran.stdout.decode().split() == ["from-exec", "/tmp", "0"]
    failed = client("exec", "e1", "sh", "-c", "exit 4")
    assert failed.returncode == 4
    pids = json.loads(client("ps", "--format", "json", "e1").stdout)
    assert client.state("e1")["pid"] in pids
    listed = json.loads(client("list", "--format", "json").stdout)
    assert [(c["id"], c["status"]) for c in listed] == [("e1", "running")]
    assert client("pause", "e1").returncode == 0
    assert client.state("e1")["status"] == "paused"
    assert client("resume", "e1").returncode == 0
    assert client.state("e1")["status"] == "running"
    assert client("delete", "-f", "e1").returncode == 0


def test_the_state_root_is_checked(oci: Path, user: User, attacker: User, world_tmp: Path) -> None:
    """A --root another user made, or planted as a symlink, is never used."""
    planted = world_tmp / "planted"
    made = attacker.run(["mkdir", "-m", "0777", str(planted)])
    assert made.returncode == 0, made.stderr
    proc = user.run([str(oci), "--root", str(planted), "list"])
    assert proc.returncode != 0 and b"belongs to uid" in proc.stderr, proc.stderr
    link = world_tmp / "link"
    assert attacker.run(["ln", "-s", str(world_tmp / "elsewhere"), str(link)]).returncode == 0
    proc = user.run([str(oci), "--root", str(link), "list"])
    assert proc.returncode != 0 and b"symlink" in proc.stderr, proc.stderr
    proc = subprocess.run([str(oci), "--root", str(link), "list"], capture_output=True, check=False)
    assert proc.returncode != 0 and b"symlink" in proc.stderr, proc.stderr  # root does not follow it either
    assert not (world_tmp / "elsewhere").exists()


@pytest.mark.root
def test_checkpoint_directories_another_user_planted_are_refused(oci: Path, attacker: User,
                                                                 world_tmp: Path) -> None:
    """Root restores the process state a checkpoint holds: an image or work directory
    another user made (where they could put images of their own), or a symlink they
    planted in its place, is refused before CRIU is asked, and nothing is followed."""
    from mesobox.errors import UsageError
    from mesobox.oci.checkpoint import _image_dirs

    planted = world_tmp / "planted-images"
    assert attacker.run(["mkdir", "-m", "0777", str(planted)]).returncode == 0
    assert attacker.run(["sh", "-c", f"echo '{{\"external\": []}}' > {planted}/mesobox-oci.json"]).returncode == 0
    link = world_tmp / "planted-link"
    assert attacker.run(["ln", "-s", str(world_tmp / "elsewhere"), str(link)]).returncode == 0
    for args, why in ((["--image-path", str(planted)], "belongs to uid"),
                      (["--image-path", str(link)], "symlink"),
                      (["--image-path", str(world_tmp / "never-made")], "does not exist")):
        proc = subprocess.run([str(oci), "--root", str(world_tmp / "state"), "restore", *args,
                               "--bundle", str(world_tmp), "r1"], capture_output=True, check=False)
        assert proc.returncode != 0 and why.encode() in proc.stderr, proc.stderr
        assert proc.stderr.count(b"\n") <= 2
    for where in (planted, link):  # checkpoint's own directories: the same rule, when it makes them
        with pytest.raises(UsageError, match=r"belongs to uid|symlink"):
            _image_dirs(str(where), None, create=True)
        with pytest.raises(UsageError, match="--work-path"):
            _image_dirs(str(world_tmp / "mine"), str(where), create=True)
    assert not (world_tmp / "elsewhere").exists() and not (world_tmp / "never-made").exists()
    assert os.stat(planted).st_uid == attacker.uid and os.stat(planted).st_mode & 0o777 == 0o777


def test_the_command_and_its_queries(oci: Path, world_tmp: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(oci), *args], capture_output=True, check=False, cwd=world_tmp)

    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith(b"mesobox-oci version ")
    features = json.loads(run("features").stdout)
    assert features["ociVersionMax"] == "1.0.2" and "poststop" in features["hooks"]
    assert "user" in features["linux"]["namespaces"]
    crit = run("checkpoint", "x")
    assert crit.returncode != 0 and crit.stderr.decode().count("\n") <= 2 and b"does not exist" in crit.stderr
    unknown = run("create", "--no-such-option", "x")
    assert unknown.returncode == 2 and b"unknown option '--no-such-option'" in unknown.stderr
    assert run("spec").returncode == 0 and json.loads((world_tmp / "config.json").read_text())["process"]["args"]
    assert run("spec").returncode != 0  # never overwrites
    script_files = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines()
                        if line.startswith("script-files"))
    assert '"bin/mesobox-oci"' in script_files


def test_signal_names_and_numbers() -> None:
    from mesobox.cli.oci import signal_number
    from mesobox.errors import UsageError

    assert signal_number("9") == signal_number("KILL") == signal_number("SIGKILL") == signal_number("sigkill") == 9
    for bad in ("SIGNOPE", "0", "999"):
        with pytest.raises(UsageError):
            signal_number(bad)


# --- podman --------------------------------------------------------------------------------


def podman_as(user: User, top: Path, runtime: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Rootless podman with storage of its own (cgroupfs: no systemd user session here)."""
    argv = ["podman", "--root", str(top / "storage"), "--runroot", str(top / "run"), "--tmpdir", str(top / "tmp"),
            "--runtime", runtime, "--cgroup-manager", "cgroupfs", "--events-backend", "file", *args]
    return user.run(argv, timeout=180)


@pytest.fixture()
def podman_image(user: User, shared_tmp: Path, world_tmp: Path) -> Iterator[tuple[Path, str]]:
    need_tool("podman", "runc", "umoci")
    # podman names the image after the oci: path: only characters a reference allows
    # (world_tmp's random suffix may end in "_", which is not)
    layout = make_oci_image(shared_tmp / f"podman-layout-{secrets.token_hex(4)}", "v1", [make_busybox_rootfs])
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    top = Path(tempfile.mkdtemp(prefix="pm", dir=shared_tmp))  # podman: a runroot of at most 50 characters
    os.chown(top, user.uid, user.gid)
    pulled = podman_as(user, top, "/usr/sbin/runc", "pull", "-q", f"oci:{layout}:v1")
    try:
        assert pulled.returncode == 0, pulled.stderr.decode()
        yield top, pulled.stdout.decode().split()[-1]
    finally:
        pause = top / "tmp" / "pause.pid"  # rootless podman's user namespace holder: ours to end
        if pause.exists():
            subprocess.run(["kill", pause.read_text().strip()], check=False)


@pytest.mark.slow
def test_podman_runs_rootless_containers_like_runc(user: User, oci: Path, podman_image: tuple[Path, str],
                                                   world_tmp: Path) -> None:
    top, image = podman_image
    calls = world_tmp / "calls"
    calls.touch(mode=0o666)
    os.chmod(calls, 0o666)
    logged = world_tmp / "logged-oci"  # the runtime podman calls, each call recorded
    logged.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexec {oci} \"$@\"\n")
    os.chmod(logged, 0o755)
    script = "echo hello $FOO; id -u; id -g; pwd; ls /dev; exit 3"
    results = []
    for runtime in ("/usr/sbin/runc", str(logged)):
        proc = podman_as(user, top, runtime, "run", "--rm", "--network", "host", "-e", "FOO=bar", "-w", "/tmp", image,
                         "sh", "-c", script)
        results.append((proc.returncode, proc.stdout))
    assert results[0] == (3, results[0][1]) and results[0][1].startswith(b"hello bar\n0\n0\n/tmp\n")
    assert results[1] == results[0], proc.stderr.decode()
    verbs = [line.split()[0] for line in calls.read_text().splitlines()]
    assert verbs[:3] == ["create", "start", "delete"], verbs
    # detached: exec into it, stop it (SIGTERM reaches the trap), remove it
    started = podman_as(user, top, str(logged), "run", "-d", "--network", "host", image, "sh", "-c", LOOP)
    assert started.returncode == 0, started.stderr.decode()
    cid = started.stdout.decode().strip()
    try:
        ran = podman_as(user, top, str(logged), "exec", "-e", "X=1", cid, "sh", "-c", "echo in $X")
        assert ran.returncode == 0 and ran.stdout == b"in 1\n", ran.stderr.decode()
        stopped = podman_as(user, top, str(logged), "stop", "-t", "30", cid)
        assert stopped.returncode == 0, stopped.stderr.decode()
        shown = podman_as(user, top, str(logged), "inspect", "--format", "{{.State.ExitCode}}", cid)
        assert shown.stdout.strip() == b"7", shown.stderr.decode()
        logs = podman_as(user, top, str(logged), "logs", cid)
        assert b"got-TERM" in logs.stdout
    finally:
        podman_as(user, top, str(logged), "rm", "-f", cid)
    # podman's own network namespace (slirp4netns), joined by its path, as runc joins it
    joined = [podman_as(user, top, runtime, "run", "--rm", image, "sh", "-c", "readlink /proc/self/ns/net; ip -o link")
              for runtime in ("/usr/sbin/runc", str(logged))]
    assert joined[0].returncode == 0, joined[0].stderr.decode()
    assert joined[1].returncode == 0 and joined[1].stdout.count(b"\n") == joined[0].stdout.count(b"\n") > 1, \
        joined[1].stderr.decode()
    assert b"tap0" in joined[1].stdout or b"tap0" not in joined[0].stdout
