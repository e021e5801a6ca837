"""`pip install` as an ordinary user (README.md, "Installing as a user"): each way a user
installs gives a working `mesobox` command, and `python -m mesobox` beside it.

- into a venv of their own, with the dependencies, from a copy of the source tree: the
  command prints its version and runs a container from an image built here and pulled
  from the loopback registry;
- with `pip install --user` under the system's Python: the command runs a container;
- editable (`pip install -e`): the command runs the source tree, edits included.

The command is bin/mesobox (pyproject.toml: script-files), a `#!python` script pip
points at its interpreter; the venv test also checks that it imports nothing beyond
what that interpreter running `mesobox.cli.main` imports (the console script older pips
generate for a `[project.scripts]` entry imports `re` and 17 other modules first: ≈5 ms
of every launch, bench/README.md).

Each install builds a wheel with build isolation, which fetches the build back-end
(setuptools ≥ 77) from the package index, as a user's pip does; the venv also fetches
the dependencies.  CI reaches PyPI; pip's cache in the user's home keeps reruns quick.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, Registry, User, make_busybox_rootfs, make_oci_image, open_busybox_rootfs, release_runtime_dir

pytestmark = [pytest.mark.slow, pytest.mark.userns]

# What a checkout holds beside its source: none of it goes into a copy a user installs from.
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "__pycache__", "*.egg-info", ".mypy_cache",
                                    ".ruff_cache", ".pytest_cache", ".hypothesis", ".venv", ".gl", ".whl")
INSTALL_TIMEOUT = 900  # a first install downloads setuptools and the dependencies
MAIN = "import sys; from mesobox.cli import main; sys.exit(main())"


def version() -> str:
    from mesobox import __version__

    return __version__


@pytest.fixture()
def work(world_tmp: Path, user: User) -> Path:
    """A directory of the user's own (pip builds in the source copy, as in a checkout)."""
    path = world_tmp / "pip"
    path.mkdir()
    os.chown(path, user.uid, user.gid)
    return path


@pytest.fixture()
def base_python(test_python: str) -> str:
    """The system's Python the test venv is made from (Debian's python3), by its real path."""
    return str(Path(test_python).resolve())


def source_copy(work: Path, user: User) -> Path:
    """A copy of this checkout's source tree, owned by the user."""
    dest = work / "mesobox-src"
    shutil.copytree(ROOT, dest, ignore=NOT_SOURCE, symlinks=True)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(dest)], check=True)
    return dest


def network_env() -> dict[str, str]:
    """pip's settings and proxies from this environment: the user's pip reaches the index as root's does."""
    names = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
    return {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.lower() in names}


def as_user(user: User, argv: list[str | Path], env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run argv as the user; fail with its output unless it exits 0."""
    res = user.run([str(a) for a in argv], env=env, timeout=timeout)
    assert res.returncode == 0, f"{argv[:3]}… exited {res.returncode}:\n{res.stderr.decode()[-3000:]}"
    return res


def pip_install(user: User, pip: list[str | Path], *args: str | Path, env: dict[str, str] | None = None) -> None:
    as_user(user, [*pip, "install", "-q", *args], env={**network_env(), **(env or {})}, timeout=INSTALL_TIMEOUT)


def make_venv(user: User, base_python: str, venv: Path) -> Path:
    as_user(user, [base_python, "-m", "venv", venv])
    return venv / "bin"


def runtime_env(work: Path) -> dict[str, str]:
    """A store and runtime dir of this test's own, and no site configuration."""
    return {"MESOBOX_STORE": str(work / "store"), "MESOBOX_RUNTIME_DIR": str(work / "run"),
            "MESOBOX_SITE_CONFIG": "/nonexistent"}


def interpreter_of(command: Path) -> str:
    first = command.read_text().splitlines()[0]
    assert first.startswith("#!/"), f"{command}: {first!r} is not the absolute interpreter pip writes"
    return first[2:]


def imported(user: User, argv: list[str | Path], env: dict[str, str]) -> set[str]:
    """The modules a run imports (-X importtime's list, by PYTHONPROFILEIMPORTTIME)."""
    res = as_user(user, argv, env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
    lines = [line for line in res.stderr.decode().splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # [0]: the header


def _marked_layer(rootfs: Path) -> None:
    make_busybox_rootfs(rootfs)
    (rootfs / "pip-marker").write_text("installed by pip\n")


@pytest.mark.registry
def test_venv_install_runs_a_container(user: User, work: Path, base_python: str, registry: Registry) -> None:
    src = source_copy(work, user)
    bin_dir = make_venv(user, base_python, work / "venv")
    pip_install(user, [bin_dir / "pip"], src)
    command = bin_dir / "mesobox"
    assert interpreter_of(command).startswith(f"{work}/venv/bin/python")
    assert as_user(user, [command, "--version"]).stdout.decode() == f"mesobox {version()}\n"
    assert as_user(user, [bin_dir / "python", "-m", "mesobox", "--version"]).stdout.decode() == \
        f"mesobox {version()}\n"

    layout = make_oci_image(work / "layout", "v1", [_marked_layer])
    ref = registry.push_oci(layout, "v1", "pipinstall/busybox")
    env = runtime_env(work)
    rootfs = open_busybox_rootfs(work / "rootfs")
    try:
        as_user(user, [command, "pull", "-q", ref], env=env)  # the dependencies at work (HTTP, layers)
        res = as_user(user, [command, "run", ref, "cat", "/pip-marker"], env=env)
        assert res.stdout == b"installed by pip\n"
        # The same launch path for both, whatever the timing: each compiles its program
        # (no saved plans), in a runtime dir without squashfs mounts to reap, once warm
        # (the seccomp filter compiled by a first run).
        compiled = {**env, "MESOBOX_RUNTIME_DIR": str(work / "run-imports"), "MESOBOX_PLAN_CACHE": "0"}
        as_user(user, [command, "exec", rootfs, "/bin/true"], env=compiled)
        bare = imported(user, [bin_dir / "python", "-c", MAIN, "exec", rootfs, "/bin/true"], compiled)
        ours = imported(user, [command, "exec", rootfs, "/bin/true"], compiled)
        assert "mesobox.cli" in ours
        assert ours - bare == set(), "the command imports more than mesobox's main under its interpreter"
    finally:
        release_runtime_dir(work / "run")
        release_runtime_dir(work / "run-imports")


def test_user_install(user: User, work: Path, base_python: str) -> None:
    """`pip install --user` with the system's Python (Debian marks it externally
    managed, hence --break-system-packages); dependencies left out: a directory image
    needs none."""
    src = source_copy(work, user)
    userbase = {"PYTHONUSERBASE": str(work / "userbase")}
    pip_install(user, [base_python, "-m", "pip"], "--user", "--no-deps", "--break-system-packages", src,
                env=userbase)
    command = work / "userbase" / "bin" / "mesobox"
    assert Path(interpreter_of(command)).resolve() == Path(base_python)
    where = as_user(user, [base_python, "-c", "import mesobox; print(mesobox.__file__)"], env=userbase)
    assert where.stdout.decode().startswith(f"{work}/userbase/lib/")
    assert as_user(user, [command, "--version"], env=userbase).stdout.decode() == f"mesobox {version()}\n"
    rootfs = open_busybox_rootfs(work / "rootfs")
    try:
        res = as_user(user, [command, "exec", rootfs, "/bin/echo", "from the user site"],
                      env={**userbase, **runtime_env(work)})
        assert res.stdout == b"from the user site\n"
    finally:
        release_runtime_dir(work / "run")


def test_editable_install(user: User, work: Path, base_python: str) -> None:
    src = source_copy(work, user)
    bin_dir = make_venv(user, base_python, work / "venv")
    pip_install(user, [bin_dir / "pip"], "--no-deps", "-e", src)
    init = src / "src" / "mesobox" / "__init__.py"
    text = init.read_text()
    line = f'__version__ = "{version()}"'
    assert line in text
    init.write_text(text.replace(line, f'__version__ = "{version()}+edited"'))  # an edit after the install
    for argv in ([bin_dir / "mesobox"], [bin_dir / "python", "-m", "mesobox"]):
        assert as_user(user, [*argv, "--version"]).stdout.decode() == f"mesobox {version()}+edited\n"
