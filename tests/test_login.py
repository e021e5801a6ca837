"""``mesobox login``/``logout`` and the credentials a pull reads (image/auth.py), against a
real docker-registry with htpasswd Basic auth (htpasswd from apache2-utils makes the
bcrypt line), as the ordinary user: podman's auth file, ``$REGISTRY_AUTH_FILE``, Docker
credential helpers (scripts on PATH), and auth files another user planted."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Mesobox, Registry, User, make_busybox_rootfs, make_oci_image, need_tool, start_registry
from run_support import error_line

PASSWORD = "pa55-Word"


@pytest.fixture(scope="module")
def private(shared_tmp: Path) -> Iterator[tuple[Registry, str]]:
    """A registry that wants bob's password, holding private/img:v1; (registry, reference)."""
    need_tool("htpasswd", "skopeo")
    top = shared_tmp / "login-registry"
    top.mkdir()
    line = subprocess.run(["htpasswd", "-nbB", "bob", PASSWORD], capture_output=True, text=True, check=True)
    (top / "htpasswd").write_text(line.stdout.strip() + "\n")
    reg = start_registry(top / "reg", f"auth:\n  htpasswd:\n    realm: test\n    path: {top / 'htpasswd'}\n")
    layout = make_oci_image(top / "layout", "v1", [make_busybox_rootfs])
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"--dest-creds=bob:{PASSWORD}",
                    f"oci:{layout}:v1", f"docker://{reg.host}/private/img:v1"], check=True, capture_output=True)
    yield reg, f"{reg.host}/private/img:v1"
    reg.process.kill()
    reg.process.wait()


class Session:
    """The user's own HOME, XDG_RUNTIME_DIR and PATH (with a bin/ for helper scripts)."""

    def __init__(self, mesobox: Mesobox, user: User, top: Path) -> None:
        self.mesobox, self.user = mesobox, user
        self.home, self.xdg, self.bin = top / "home", top / "xdg", top / "bin"
        for path in (self.home, self.xdg, self.bin):
            path.mkdir(mode=0o700)
            os.chown(path, user.uid, user.gid)
        os.chmod(self.bin, 0o755)
        self.env = {"HOME": str(self.home), "XDG_RUNTIME_DIR": str(self.xdg),
                    "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin"}

    def __call__(self, *args: str, input: bytes | None = None, **env: str) -> subprocess.CompletedProcess[bytes]:
        return self.mesobox(*args, as_user=self.user, env={**self.env, **env}, input=input, timeout=120)

    def write(self, path: Path, text: str, mode: int = 0o600) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chown(path.parent, self.user.uid, self.user.gid)
        path.write_text(text)
        os.chmod(path, mode)
        os.chown(path, self.user.uid, self.user.gid)
        return path

    def helper(self, name: str, body: str) -> Path:
        """bin/docker-credential-NAME: a shell script that logs its stdin to NAME.asked."""
        script = f"#!/bin/sh\n[ \"$1\" = get ] || exit 2\ncat > {self.bin}/{name}.asked\n{body}\n"
        return self.write(self.bin / f"docker-credential-{name}", script, 0o755)


@pytest.fixture()
def session(mesobox: Mesobox, user: User, world_tmp: Path) -> Session:
    return Session(mesobox, user, world_tmp)


def warnings(res: subprocess.CompletedProcess[bytes]) -> list[str]:
    return [line for line in res.stderr.decode().splitlines() if line.startswith("mesobox: warning: ")]


def refused(res: subprocess.CompletedProcess[bytes]) -> None:
    assert res.returncode == 3, res.stderr.decode()
    assert "401" in error_line(res) or "requires a login" in res.stderr.decode()


def test_login_pull_logout(session: Session, private: tuple[Registry, str]) -> None:
    reg, ref = private
    refused(session("pull", "-q", ref))
    wrong = session("login", "-u", "bob", "--password-stdin", reg.host, input=b"nope\n")
    assert wrong.returncode == 3 and "refused the credentials" in error_line(wrong)
    auth_file = session.xdg / "containers" / "auth.json"
    assert not auth_file.exists()  # nothing is stored before the registry accepted it
    ok = session("login", "-u", "bob", "--password-stdin", reg.host, input=PASSWORD.encode() + b"\n")
    assert ok.returncode == 0, ok.stderr.decode()
    assert str(auth_file) in ok.stdout.decode()
    # podman's file, podman's format, private
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600 and auth_file.stat().st_uid == session.user.uid
    assert stat.S_IMODE(auth_file.parent.stat().st_mode) == 0o700
    entry = json.loads(auth_file.read_text())["auths"][reg.host]
    assert base64.b64decode(entry["auth"]).decode() == f"bob:{PASSWORD}"
    pulled = session("pull", "-q", ref)
    assert pulled.returncode == 0, pulled.stderr.decode()
    out = session("logout", reg.host)
    assert out.returncode == 0, out.stderr.decode()
    assert json.loads(auth_file.read_text())["auths"] == {}
    refused(session("pull", "-q", ref))
    again = session("logout", reg.host)
    assert again.returncode == 2 and "not logged in" in error_line(again)


def test_a_password_never_comes_from_the_command_line(session: Session, private: tuple[Registry, str]) -> None:
    reg, _ = private
    res = session("login", "-u", "bob", "-p", "Secret-On-Argv", reg.host)
    assert res.returncode == 2 and "command line is refused" in error_line(res)
    assert b"Secret-On-Argv" not in res.stderr + res.stdout
    # no terminal to prompt on (stdin is not a tty): a clear line, not a hang
    res = session("login", "-u", "bob", reg.host, input=b"")
    assert res.returncode == 2 and "no terminal" in error_line(res)
    res = session("login", "--password-stdin", reg.host, input=PASSWORD.encode())
    assert res.returncode == 2 and "needs -u" in error_line(res)


def test_authfile_keeps_the_rest_of_the_file(session: Session, private: tuple[Registry, str]) -> None:
    reg, ref = private
    other = {"auths": {"other.example:5000": {"auth": base64.b64encode(b"x:y").decode()}},
             "credHelpers": {"ghcr.io": "gh"}}
    authfile = session.write(session.home / "conf" / "auth.json", json.dumps(other))
    res = session("login", "-u", "bob", "--password-stdin", "--authfile", str(authfile), f"http://{reg.host}/",
                  input=PASSWORD.encode())
    assert res.returncode == 0, res.stderr.decode()
    doc = json.loads(authfile.read_text())
    assert doc["credHelpers"] == other["credHelpers"] and set(doc["auths"]) == {"other.example:5000", reg.host}
    assert not (session.xdg / "containers").exists()
    # a pull reads it through REGISTRY_AUTH_FILE, as podman does
    pulled = session("pull", "-q", ref, REGISTRY_AUTH_FILE=str(authfile))
    assert pulled.returncode == 0, pulled.stderr.decode()
    # a new file in a new directory: the directory is private
    fresh = session.home / "new" / "dir" / "auth.json"
    res = session("login", "-u", "bob", "--password-stdin", reg.host, input=PASSWORD.encode(),
                  REGISTRY_AUTH_FILE=str(fresh))
    assert res.returncode == 0, res.stderr.decode()
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700 and stat.S_IMODE(fresh.stat().st_mode) == 0o600
    out = session("logout", "--all", "--authfile", str(authfile))
    assert out.returncode == 0, out.stderr.decode()
    assert json.loads(authfile.read_text()) == {"auths": {}, "credHelpers": {"ghcr.io": "gh"}}


def test_docker_credential_helpers(session: Session, private: tuple[Registry, str]) -> None:
    reg, ref = private
    answer = json.dumps({"ServerURL": reg.host, "Username": "bob", "Secret": PASSWORD})
    session.helper("test", f"echo '{answer}'")
    docker = session.home / ".docker" / "config.json"
    session.write(docker, json.dumps({"credHelpers": {reg.host: "test"}}))
    pulled = session("pull", "-q", ref)
    assert pulled.returncode == 0, pulled.stderr.decode()
    assert warnings(pulled) == []
    assert (session.bin / "test.asked").read_text() == reg.host  # the server, on stdin
    (session.bin / "test.asked").unlink()
    session.write(docker, json.dumps({"credsStore": "test"}))  # the store for every registry
    pulled = session("pull", "-q", ref)
    assert pulled.returncode == 0, pulled.stderr.decode()
    assert (session.bin / "test.asked").exists()


@pytest.mark.parametrize(("helper", "body", "said"), [
    ("broken", "echo 'keyring locked' >&2; exit 1", "failed (exit 1: keyring locked)"),
    ("missing", None, "is not on PATH"),
    ("garbage", "echo not-json", "answered something other than"),
    ("../../bin/sh", None, "is not a program name"),
])
def test_a_failing_helper_is_one_warning_and_anonymous_access(
    session: Session, private: tuple[Registry, str], helper: str, body: str | None, said: str,
) -> None:
    reg, ref = private
    if body is not None:
        session.helper(helper, body)
    session.write(session.home / ".docker" / "config.json", json.dumps({"credHelpers": {reg.host: helper}}))
    res = session("pull", "-q", ref)
    refused(res)
    (warning,) = warnings(res)
    assert said in warning and reg.host in warning
    assert PASSWORD not in res.stderr.decode()


def test_a_helper_without_credentials_is_silent(session: Session, private: tuple[Registry, str]) -> None:
    _, ref = private
    session.helper("empty", "echo 'credentials not found in native keychain'; exit 1")
    session.write(session.home / ".docker" / "config.json", json.dumps({"credsStore": "empty"}))
    res = session("pull", "-q", ref)
    refused(res)
    assert warnings(res) == []


def test_a_planted_auth_file_is_ignored(session: Session, private: tuple[Registry, str], attacker: User,
                                       world_tmp: Path) -> None:
    """Another user's file (a shared REGISTRY_AUTH_FILE path, say) must choose neither the
    credentials nor a helper program; nor may a file of one's own that others can write."""
    reg, ref = private
    good = {"auths": {reg.host: {"auth": base64.b64encode(f"bob:{PASSWORD}".encode()).decode()}},
            "credHelpers": {reg.host: "test"}}
    answer = json.dumps({"Username": "bob", "Secret": PASSWORD})
    session.helper("test", f"echo '{answer}'")
    planted = world_tmp / "planted.json"
    planted.write_text(json.dumps(good))
    os.chmod(planted, 0o644)
    os.chown(planted, attacker.uid, attacker.gid)
    res = session("pull", "-q", ref, REGISTRY_AUTH_FILE=str(planted))
    refused(res)
    (warning,) = warnings(res)
    assert f"ignoring the credentials in {planted}" in warning and f"uid {attacker.uid}" in warning
    assert not (session.bin / "test.asked").exists()  # the helper it named never ran
    own = session.write(session.home / "shared.json", json.dumps(good), 0o666)
    res = session("pull", "-q", ref, REGISTRY_AUTH_FILE=str(own))
    refused(res)
    assert "others may write it" in warnings(res)[0]
    # a FIFO planted under the name does not hang the pull
    fifo = session.xdg / "containers" / "auth.json"
    fifo.parent.mkdir(mode=0o700)
    os.chown(fifo.parent, session.user.uid, session.user.gid)
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, session.user.uid, session.user.gid)
    res = session("pull", "-q", ref)
    refused(res)
    assert "not a regular file" in warnings(res)[0]
    # and login does not write through someone else's file
    res = session("login", "-u", "bob", "--password-stdin", "--authfile", str(planted), reg.host,
                  input=PASSWORD.encode())
    assert res.returncode == 2 and "not a file of your own" in error_line(res)
    assert json.loads(planted.read_text()) == good


def test_login_through_a_token_service(registry: Registry) -> None:
    """A registry that answers /v2/ with a Bearer challenge: login asks its token service
    with the credentials (and for no repository's scope), as docker login does."""
    from faultproxy import fault_proxy
    from mesobox.cli.login import check_login
    from mesobox.config import Config
    from mesobox.errors import AuthError

    with fault_proxy(registry.host) as proxy:
        proxy.faults.bearer = True
        proxy.faults.token_creds = ("alice", "s3cret")
        check_login(Config(), proxy.host, ("alice", "s3cret"), False)
        asked = proxy.entries("/token")
        assert len(asked) == 1 and "scope=" not in asked[0].path
        assert proxy.entries("/v2/")[-1].authorization.startswith("Bearer ")  # type: ignore[union-attr]
        with pytest.raises(AuthError, match=f"login to {proxy.host} failed: token service .* refused"):
            check_login(Config(), proxy.host, ("alice", "wrong"), False)


def test_login_asks_on_the_terminal(session: Session, private: tuple[Registry, str]) -> None:
    """Interactive: the user name and the password are asked for on the controlling
    terminal (a pseudo-terminal here), the password without echo."""
    import pty
    import time

    from run_support import mesobox_argv

    reg, ref = private
    argv, env = mesobox_argv(session.mesobox, session.user, ["login", reg.host], session.env)
    pid, master = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        os.execvpe(argv[0], argv, env)
    seen = bytearray()

    def until(text: bytes) -> None:
        deadline = time.monotonic() + 60  # only stops a hang
        while text not in seen:
            assert time.monotonic() < deadline, bytes(seen)
            seen.extend(os.read(master, 4096))

    until(b"Username: ")
    os.write(master, b"bob\n")
    until(b"Password: ")
    os.write(master, PASSWORD.encode() + b"\n")
    try:
        while chunk := os.read(master, 4096):
            seen.extend(chunk)
    except OSError:  # EIO: the child closed the terminal
        pass
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, bytes(seen)
    assert b"Login Succeeded" in seen and PASSWORD.encode() not in seen  # typed without echo
    assert session("pull", "-q", ref).returncode == 0
