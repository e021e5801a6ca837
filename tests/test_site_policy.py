"""Site settings that mesobox itself honours everywhere: every bind source is checked
against ``allowed_bind_sources`` (not only -B: $HOME, /tmp, the working directory,
``default_binds`` from any origin), ``require_seccomp`` refuses an unconfined
container, and the site file at /etc/mesobox cannot be swapped through the
environment.  For an unprivileged user these are guard rails, not barriers (they hold
the same powers without mesobox: docs/security.md); for root launches they are the
site's rules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Mesobox, User, open_busybox_rootfs
from run_support import one_error_line

pytestmark = pytest.mark.userns
SITE_FILE = Path("/etc/mesobox/mesobox.toml")


@pytest.fixture(scope="module")
def rootfs(shared_tmp: Path) -> Path:
    return open_busybox_rootfs(shared_tmp / "policy-rootfs")


def _site(world_tmp: Path, text: str) -> dict[str, str]:
    site = world_tmp / "site.toml"
    site.write_text(text)
    os.chmod(site, 0o644)
    return {"MESOBOX_SITE_CONFIG": str(site)}


def test_every_bind_source_is_checked(mesobox: Mesobox, user: User, rootfs: Path, world_tmp: Path) -> None:
    allowed = world_tmp / "allowed"
    allowed.mkdir(mode=0o777)
    os.chmod(allowed, 0o777)
    env = _site(world_tmp, f'allowed_bind_sources = ["{allowed}"]\nlock = ["allowed_bind_sources"]\n')
    # default_binds from the environment (or a user file) are binds like -B ones
    proc = mesobox("exec", str(rootfs), "true", as_user=user, cwd=allowed,
                   env={**env, "MESOBOX_DEFAULT_BINDS": "/etc"})
    assert proc.returncode == 13
    warnings = [line for line in proc.stderr.splitlines(keepends=True) if line.startswith(b"mesobox: warning: ")]
    assert len(warnings) == 2  # $HOME and /tmp (below): not bound
    assert "outside the allowed" in one_error_line(proc.stderr.replace(b"".join(warnings), b""))
    # $HOME, /tmp and a working directory outside: not bound, said so; /tmp is private
    outside = world_tmp / "outside"
    outside.mkdir(mode=0o777)
    os.chmod(outside, 0o777)
    script = f"ls {user.home} 2>/dev/null | wc -l; stat -f -c %T /tmp; pwd; ls {outside} >/dev/null 2>&1 || echo no"
    proc = mesobox("exec", str(rootfs), "sh", "-c", script, as_user=user, cwd=outside, env=env)
    assert proc.returncode == 0, proc.stderr
    home_entries, tmp_fs, cwd, outside_seen = proc.stdout.decode().split()
    assert (home_entries, tmp_fs, cwd, outside_seen) == ("0", "tmpfs", "/", "no")
    err = proc.stderr.decode()
    for path in (str(user.home), "/tmp", str(outside)):
        assert f"warning: {path} is not bound: it is outside the site's allowed bind sources" in err
    # inside the allowed directory, it is bound as usual
    proc = mesobox("exec", str(rootfs), "pwd", as_user=user, cwd=allowed, env=env)
    assert proc.stdout.decode().strip() == str(allowed)


def test_require_seccomp(mesobox: Mesobox, user: User, rootfs: Path, world_tmp: Path) -> None:
    env = _site(world_tmp, 'require_seccomp = true\nlock = ["require_seccomp"]\n')
    profile = world_tmp / "allow-all.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_ALLOW"}')
    os.chmod(profile, 0o644)
    for value in ("unconfined", str(profile)):
        proc = mesobox("exec", "--security-opt", f"seccomp={value}", str(rootfs), "true", as_user=user,
                       env={**env, "MESOBOX_REQUIRE_SECCOMP": "false"})
        assert proc.returncode == 13, proc.stderr
        assert "require_seccomp" in one_error_line(proc.stderr)
    proc = mesobox("exec", str(rootfs), "sh", "-c", "grep Seccomp: /proc/self/status", as_user=user, env=env)
    assert proc.returncode == 0 and proc.stdout.split() == [b"Seccomp:", b"2"], proc.stderr


@pytest.fixture()
def site_file(world_tmp: Path) -> Iterator[Path]:
    """/etc/mesobox/mesobox.toml for one test (refused if one is installed already)."""
    if SITE_FILE.exists():
        pytest.fail(f"{SITE_FILE} exists on this machine: this test would replace it", pytrace=False)
    made_dir = not SITE_FILE.parent.exists()
    SITE_FILE.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield SITE_FILE
    finally:
        SITE_FILE.unlink(missing_ok=True)
        if made_dir:
            SITE_FILE.parent.rmdir()


@pytest.mark.root
def test_the_installed_site_file_cannot_be_swapped(
    mesobox: Mesobox, user: User, rootfs: Path, world_tmp: Path, site_file: Path
) -> None:
    site_file.write_text('allowed_bind_sources = ["/nonexistent-allowed"]\nlock = ["allowed_bind_sources"]\n')
    site_file.chmod(0o644)
    mine = world_tmp / "mine.toml"
    mine.write_text("")
    os.chmod(mine, 0o644)
    for env in ({"MESOBOX_SITE_CONFIG": "/nonexistent"}, {"MESOBOX_SITE_CONFIG": str(mine)}):
        proc = mesobox("exec", "--contain", "-B", str(world_tmp), str(rootfs), "true", as_user=user, env=env)
        assert proc.returncode == 13, proc.stderr
        assert "outside the allowed" in one_error_line(proc.stderr)
