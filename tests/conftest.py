"""Shared fixtures: the real parts every tier of tests stands on.

- ``mesobox_src``: a world-readable copy of ``src/`` so an ordinary user can import
  the code under test (the checkout may live under a mode-700 home).
- ``test_python``: a Python every user can execute (Debian's, via the project venv
  made by ``scripts/setup-host.sh``): the machines' default python3 may live under a
  mode-700 /root, which ordinary users cannot execute.
- ``user``: an ordinary user (created once) with a subordinate id range, and
  ``user.run([...])`` to run a command as that user with ``runuser``.
- ``mesobox``: run the mesobox CLI as root or as the user, returning CompletedProcess; each
  test gets its own store and its own runtime dir per caller (see ``Mesobox.runtime_env``).
- ``registry``: a real Debian ``docker-registry`` on a free loopback port.
- ``busybox_rootfs`` / ``make_oci_image``: test images built with busybox-static and umoci.
- ``wait_until``: wait on a condition with a generous ceiling (never a timing assertion).

What a test needs of the host (cgroup layout, CRIU, a GPU, kernel features) is probed in
tests/hostcaps.py, which gives the skip markers and their reasons.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hostcaps import unprivileged_userns

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
TEST_USER = os.environ.get("MESOBOX_TEST_USER", "mbtest")
VICTIM = os.environ.get("MESOBOX_TEST_VICTIM", "mbvictim")
# Where real root's runs go when nothing says otherwise (paths.default_runtime_dir).
ROOT_DEFAULT_RUNTIME = Path("/tmp/mesobox-0")
VENV_PYTHON = Path(os.environ.get("MESOBOX_TEST_PYTHON", "/opt/mesobox/venv/bin/python"))

if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "default_runtime_dir: the test is about mesobox's default runtime dir, so the mesobox "
                   "fixture gives its runs none of their own")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that need unprivileged user namespaces skip, saying why, where the kernel forbids them."""
    allowed, why = unprivileged_userns()
    if allowed:
        return
    skip = pytest.mark.skip(reason=f"needs unprivileged user namespaces: {why}")
    for item in items:
        if item.get_closest_marker("userns") is not None:
            item.add_marker(skip)


def wait_until(check: Callable[[], object], what: str = "the condition", ceiling: float = 60.0) -> None:
    """Poll ``check`` until it holds.  ``ceiling`` only stops a hang, so it is generous:
    a test never asserts on how long something took (bench/ measures that)."""
    deadline = time.monotonic() + ceiling
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not so after {ceiling:.0f} s")
        time.sleep(0.02)


def need_tool(*names: str) -> None:
    """Fail (not skip) when a system tool the test depends on is missing: CI installs them."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.fail(f"missing system tools {missing}: run scripts/setup-host.sh", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _make_world_readable(top: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(top):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


@pytest.fixture(scope="session")
def shared_tmp() -> Iterator[Path]:
    """A session temp dir every user can traverse (pytest's tmp_path is root-only).  Its
    name is hex only: podman makes an image name of an ``oci:`` path, and mkdtemp's
    ``_`` at the end of a path component is not a valid reference (a random failure)."""
    while True:
        top = Path("/tmp") / f"mesobox-tests-{secrets.token_hex(4)}"
        try:
            top.mkdir(mode=0o755)
            break
        except FileExistsError:
            continue
    os.chmod(top, 0o755)
    yield top
    subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)


@pytest.fixture()
def world_tmp(shared_tmp: Path, request: pytest.FixtureRequest) -> Path:
    """A per-test directory, mode 1777, usable by root and by the test user."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[:60]
    path = Path(tempfile.mkdtemp(prefix=name + "-", dir=shared_tmp))
    os.chmod(path, 0o1777)
    return path


@pytest.fixture(scope="session")
def mesobox_src(shared_tmp: Path) -> Path:
    dest = shared_tmp / "src"
    shutil.copytree(SRC, dest, ignore=shutil.ignore_patterns("__pycache__"))
    _make_world_readable(dest)
    return dest


@pytest.fixture(scope="session")
def test_python() -> str:
    if VENV_PYTHON.exists():
        return str(VENV_PYTHON)
    pytest.fail(f"{VENV_PYTHON} missing: run scripts/setup-host.sh first", pytrace=False)


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, **more: str) -> dict[str, str]:
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "LANG": "C.UTF-8",
        }
        env.update(self.extra_env)
        env.update(more)
        return env

    def run(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        timeout: float = 120,
        input: bytes | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run argv as this user (runuser keeps no privileges; a fresh session-less process)."""
        full_env = self.env()
        if env:
            full_env.update(env)
        cmd = ["runuser", "-u", self.name, "--", "env", "-i"]
        cmd += [f"{k}={v}" for k, v in full_env.items()]
        cmd += list(argv)
        return subprocess.run(
            cmd,
            cwd=cwd or self.home,
            capture_output=True,
            timeout=timeout,
            input=input,
            check=check,
        )


def ordinary_user(name: str) -> User:
    """An ordinary user (created once, with subuids) and FUSE usable by users."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
        entry = pwd.getpwnam(name)
    subid = f"{name}:200000:65536\n"
    for path in ("/etc/subuid", "/etc/subgid"):
        text = Path(path).read_text() if os.path.exists(path) else ""
        if not any(line.startswith(name + ":") for line in text.splitlines()):
            with open(path, "a") as f:
                f.write(subid)
    # FUSE for ordinary users, as on a normal distribution (some hosts make it 0600).
    if os.path.exists("/dev/fuse"):
        mode = os.stat("/dev/fuse").st_mode
        if mode & 0o666 != 0o666:
            os.chmod("/dev/fuse", stat.S_IMODE(mode) | 0o666)
    return User(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))


@pytest.fixture(scope="session")
def user() -> User:
    """The ordinary user the rootless tests run as."""
    return ordinary_user(TEST_USER)


@pytest.fixture(scope="session")
def attacker() -> User:
    """A second ordinary user, hostile: plants names in /tmp, symlinks, directories."""
    return ordinary_user(os.environ.get("MESOBOX_TEST_ATTACKER", "mbattack"))


@pytest.fixture(scope="session")
def victim() -> User:
    """A third ordinary user whose /tmp/mesobox-UID no other test uses: the attacker's
    target where a test must plant names that would disturb ``user``'s other tests."""
    return ordinary_user(VICTIM)


@dataclass
class Mesobox:
    """Runs ``python -m mesobox`` from the world-readable source copy."""

    python: str
    src: Path
    store_root: Path
    runtime_root: Path | None = None  # this test's runtime dirs, one per caller; None: the default place

    def base_env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.src), "MESOBOX_SITE_CONFIG": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"}

    def runtime_env(self, as_user: User | None) -> dict[str, str]:
        """``MESOBOX_RUNTIME_DIR`` naming this test's own runtime dir for the caller
        (mesobox makes it, private, on first use), so that no test meets another's mounts,
        instances, plans or caches, nor leaves them to a later one.  Nothing where the
        test is about the default place (marker ``default_runtime_dir``), nor for
        ``victim``: its default /tmp/mesobox-UID is where the attacker plants things."""
        if self.runtime_root is None or (as_user is not None and as_user.name == VICTIM):
            return {}
        return {"MESOBOX_RUNTIME_DIR": str(self.runtime_root / (as_user.name if as_user else "root"))}

    def __call__(
        self,
        *args: str,
        as_user: User | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 300,
        cwd: str | Path | None = None,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        full_env = self.base_env()
        if env:
            full_env.update(env)
        for key, value in self.runtime_env(as_user).items():
            full_env.setdefault(key, value)  # a runtime dir the test names wins
        argv = [self.python, "-m", "mesobox", *args]
        if as_user is not None:
            full_env.setdefault("MESOBOX_STORE", str(self.store_root / as_user.name))
            return as_user.run(argv, env=full_env, timeout=timeout, cwd=cwd, input=input)
        full_env.setdefault("MESOBOX_STORE", str(self.store_root / "root"))
        base = {k: v for k, v in os.environ.items() if not k.startswith("MESOBOX_")}
        base.update(full_env)
        return subprocess.run(
            argv, env=base, capture_output=True, timeout=timeout, cwd=cwd or "/", input=input, check=False
        )


@pytest.fixture()
def mesobox(test_python: str, mesobox_src: Path, world_tmp: Path, request: pytest.FixtureRequest) -> Iterator[Mesobox]:
    """A mesobox CLI runner with a fresh store and a fresh runtime dir per test (per user)."""
    stores = world_tmp / "stores"
    stores.mkdir(mode=0o1777)
    os.chmod(stores, 0o1777)
    runtimes = None
    if request.node.get_closest_marker("default_runtime_dir") is None:
        runtimes = world_tmp / "runtimes"
        runtimes.mkdir()
        os.chmod(runtimes, 0o1777)  # sticky, like /tmp: each caller makes its own private dir inside
    yield Mesobox(test_python, mesobox_src, stores, runtimes)
    if runtimes is not None:
        for path in runtimes.iterdir():
            release_runtime_dir(path)


def release_runtime_dir(path: Path) -> None:
    """Stop what a test's runs left running under the runtime dir ``path``: squashfs
    mounts lingering for a next run, and their watchers.  No later test meets them, and
    the session's clean-up can delete the directory."""
    if not (path / "mnt").is_dir():
        return
    prefix = f"{path}/"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith(prefix) and link.endswith(".watcher"):
                    os.kill(int(pid), signal.SIGKILL)
                    break
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


@pytest.fixture(autouse=True)
def _roots_default_runtime_dir_is_left_alone(request: pytest.FixtureRequest) -> Iterator[None]:
    """Real root's default runtime dir outlives a test and changes what later tests (and
    the host's own users) meet: no test may leave one behind.  One that was there before
    the test is not the test's doing, and is not looked at."""
    existed = os.path.lexists(ROOT_DEFAULT_RUNTIME)
    yield
    if not existed and os.path.lexists(ROOT_DEFAULT_RUNTIME):
        pytest.fail(f"{request.node.nodeid} left {ROOT_DEFAULT_RUNTIME} behind: give its root runs a runtime dir "
                    "(the mesobox fixture does), or remove it where the test is about the default", pytrace=False)


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT"
    root: Path
    process: subprocess.Popen[bytes]

    def url(self, path: str = "/v2/") -> str:
        return f"http://{self.host}{path}"

    def push_oci(self, layout: Path, tag: str, name: str) -> str:
        """Push ``oci:layout:tag`` as ``host/name:tag`` with skopeo; returns the reference."""
        ref = f"{self.host}/{name}:{tag}"
        subprocess.run(
            ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{ref}"],
            check=True,
            capture_output=True,
        )
        return ref


def start_registry(root: Path, extra_config: str = "") -> Registry:
    need_tool("docker-registry")
    port = free_port()
    (root / "data").mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n"
        "storage:\n  filesystem:\n    rootdirectory: " + str(root / "data") + "\n"
        "  delete:\n    enabled: true\n"
        "http:\n  addr: 127.0.0.1:" + str(port) + "\n" + extra_config
    )
    log = open(root / "registry.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1):
                break
        except OSError as err:
            if getattr(err, "code", None) == 401:  # auth-enabled registry is up
                break
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(root / 'registry.log').read_text()}") from None
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("docker-registry did not start within 15 s")
    return Registry(f"127.0.0.1:{port}", root, proc)


@pytest.fixture(scope="session")
def registry(shared_tmp: Path) -> Iterator[Registry]:
    reg = start_registry(shared_tmp / "registry")
    yield reg
    reg.process.terminate()
    reg.process.wait(timeout=10)


@pytest.fixture(scope="session")
def busybox_rootfs(shared_tmp: Path) -> Path:
    """A minimal rootfs: busybox-static with its applets as symlinks, /etc basics."""
    need_tool("busybox")
    root = shared_tmp / "busybox-rootfs"
    make_busybox_rootfs(root)
    return root


def make_busybox_rootfs(root: Path) -> Path:
    busybox = shutil.which("busybox")
    assert busybox
    for d in ("bin", "etc", "tmp", "root", "home", "proc", "sys", "dev", "usr/bin", "var"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return root


def open_busybox_rootfs(root: Path) -> Path:
    """make_busybox_rootfs, every directory and file usable by every user (0755; /tmp
    1777): a rootfs made by root that the test users run."""
    make_busybox_rootfs(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o1777 if name == "tmp" else 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o755)
    return root


LayerFn = Callable[[Path], None]


def make_oci_image(layout: Path, tag: str, layers: Sequence[LayerFn], config: Sequence[str] = ()) -> Path:
    """Build an OCI image with umoci: each callable edits the rootfs and becomes one layer.
    ``config`` holds extra ``umoci config`` flags (e.g. ``--config.env=A=1``).  Returns the
    layout directory (usable as ``oci:LAYOUT:TAG`` or pushed with skopeo).

    The bundle is unpacked afresh for every layer: umoci 0.4.7 bases each repack on the
    manifest the bundle was unpacked from, so repacking one bundle repeatedly collapses
    everything into a single cumulative layer."""
    need_tool("umoci")
    if not (layout / "index.json").exists():
        subprocess.run(["umoci", "init", "--layout", str(layout)], check=True, capture_output=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:{tag}"], check=True, capture_output=True)
    for fn in layers:
        bundle = Path(tempfile.mkdtemp(prefix="umoci-bundle-")) / "b"
        try:
            subprocess.run(
                ["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], check=True, capture_output=True
            )
            fn(bundle / "rootfs")
            subprocess.run(
                ["umoci", "repack", "--image", f"{layout}:{tag}", str(bundle)], check=True, capture_output=True
            )
        finally:
            subprocess.run(["rm", "-rf", str(bundle.parent)], check=False)
    if config:
        subprocess.run(["umoci", "config", "--image", f"{layout}:{tag}", *config], check=True, capture_output=True)
    return layout


@pytest.fixture()
def char_devices(world_tmp: Path) -> Path:
    """Character devices made by root with mknod under the test's own directory, usable
    by every user: ``null`` (a copy of /dev/null, 1:3) and ``zero`` (/dev/zero, 1:5)."""
    import stat

    top = world_tmp / "devs"
    top.mkdir(mode=0o755)
    for name, minor in (("null", 3), ("zero", 5)):
        os.mknod(top / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
        os.chmod(top / name, 0o666)  # past root's umask
    return top
