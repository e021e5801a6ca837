"""The CLI boundary and configuration precedence (pure unit tier, plus one subprocess check)."""

from __future__ import annotations

import marshal
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Mesobox
from mesobox.cli import main
from mesobox.config import Config, load_config
from mesobox.errors import ConfigError

SRC = str(Path(__file__).resolve().parent.parent / "src")


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("mesobox ")
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("pull", "images", "inspect", "rm", "prune", "export"):
        assert f"  {verb} " in out


def test_unknown_verb_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown verb 'frobnicate'" in capsys.readouterr().err
    assert main(["--frob"]) == 2
    assert main([]) == 2


def test_precedence_site_user_env(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('default_binds = ["/scratch"]\nmax_parallel_downloads = 2\ninsecure_registries = ["a:5000"]\n')
    user = tmp_path / "user.toml"
    user.write_text("max_parallel_downloads = 3\n")
    env = {
        "MESOBOX_SITE_CONFIG": str(site),
        "MESOBOX_CONFIG": str(user),
        "HOME": str(tmp_path),
        "MESOBOX_INSECURE_REGISTRIES": "b:1,c:2",
        "MESOBOX_STORE": "/x/store",
        "MESOBOX_RUNTIME_DIR": str(tmp_path / "rt"),
    }
    cfg = load_config(env)
    assert cfg.default_binds == ("/scratch",)  # site
    assert cfg.max_parallel_downloads == 3  # user beats site
    assert cfg.insecure_registries == ("b:1", "c:2")  # env beats site
    assert cfg.store == Path("/x/store")


def test_locked_keys_and_bad_values(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('allowed_bind_sources = ["/home"]\nlock = ["allowed_bind_sources"]\n')
    user = tmp_path / "user.toml"
    user.write_text('allowed_bind_sources = ["/"]\n')
    env = {"MESOBOX_SITE_CONFIG": str(site), "MESOBOX_CONFIG": str(user), "HOME": str(tmp_path),
           "MESOBOX_RUNTIME_DIR": str(tmp_path / "rt")}
    with pytest.raises(ConfigError, match="set by the site"):
        load_config(env)
    # an environment variable cannot override a locked key either
    user.write_text("")
    env["MESOBOX_ALLOWED_BIND_SOURCES"] = "/"
    assert load_config(env).allowed_bind_sources == ("/home",)
    user.write_text("max_parallel_downloads = 'many'\n")
    with pytest.raises(ConfigError, match="bad value"):
        load_config(env)
    user.write_text("no_such_key = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(env)
    user.write_text("this is [not toml\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(env)


def _aged(path: Path, text: str, age: float = 3600) -> None:
    """Write ``path`` and date it ``age`` seconds back: older than the racy window."""
    path.write_text(text)
    when = time.time() - age
    os.utime(path, (when, when))


def _cache_env(tmp_path: Path, site: Path) -> dict[str, str]:
    return {"MESOBOX_SITE_CONFIG": str(site), "MESOBOX_CONFIG": str(tmp_path / "none.toml"),
            "HOME": str(tmp_path), "MESOBOX_RUNTIME_DIR": str(tmp_path / "rt")}


def test_parsed_config_files_are_cached_and_revalidated(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    _aged(site, "max_parallel_downloads = 2\n")
    env = _cache_env(tmp_path, site)
    assert load_config(env).max_parallel_downloads == 2
    (cached,) = (tmp_path / "rt" / "config").iterdir()
    assert cached.stat().st_mode & 0o777 == 0o600
    # The cache is what is read: change the parsed value it holds, keep its key.
    fmt, signature, parsed = marshal.loads(cached.read_bytes())
    cached.write_bytes(marshal.dumps((fmt, signature, {**parsed, "max_parallel_downloads": 7})))
    assert load_config(env).max_parallel_downloads == 7
    # An edited file is parsed again (its size, mtime and ctime are in the key).
    _aged(site, "max_parallel_downloads = 3\n", age=1800)
    assert load_config(env).max_parallel_downloads == 3
    # Garbage in the cache is ignored and replaced.
    cached.write_bytes(b"\x00not marshal")
    assert load_config(env).max_parallel_downloads == 3
    assert marshal.loads(cached.read_bytes())[2] == {"max_parallel_downloads": 3}


def test_config_cache_must_be_private_and_files_must_settle(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    _aged(site, "max_parallel_downloads = 2\n")
    env = _cache_env(tmp_path, site)
    load_config(env)
    (cached,) = (tmp_path / "rt" / "config").iterdir()
    fmt, signature, _ = marshal.loads(cached.read_bytes())
    cached.write_bytes(marshal.dumps((fmt, signature, {"max_parallel_downloads": 9})))
    cached.chmod(0o666)  # writable by others: not trusted
    assert load_config(env).max_parallel_downloads == 2
    cached.write_bytes(marshal.dumps((fmt, signature, {"max_parallel_downloads": 9})))
    cached.chmod(0o600)
    os.chown(cached, 4242, 4242)  # someone else's file: not trusted either
    assert load_config(env).max_parallel_downloads == 2
    # A file written just now is parsed every time and never cached (racy timestamps).
    fresh = tmp_path / "fresh.toml"
    fresh.write_text("max_parallel_downloads = 5\n")
    shutil.rmtree(tmp_path / "rt")
    assert load_config(_cache_env(tmp_path, fresh)).max_parallel_downloads == 5
    assert not list((tmp_path / "rt" / "config").glob("*fresh*"))


def test_a_cached_config_does_not_import_tomllib(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    _aged(site, 'default_binds = ["/scratch"]\n')
    probe = ("import sys; from mesobox.config import load_config; "
             f"c = load_config({_cache_env(tmp_path, site)!r}); print(c.default_binds, 'tomllib' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           env={"PYTHONPATH": SRC}).stdout.strip() for _ in range(2)]
    assert runs == ["('/scratch',) True", "('/scratch',) False"]


def test_config_is_frozen() -> None:
    cfg = Config(store=Path("/s"))
    with pytest.raises(AttributeError):
        cfg.store = Path("/t")  # type: ignore[misc]
    assert cfg.replace(debug=True).debug and not cfg.debug
    assert cfg == Config(store=Path("/s"))


def test_bad_config_is_one_line_through_the_cli(mesobox: Mesobox, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("max_image_bytes = [\n")
    res = mesobox("images", env={"MESOBOX_CONFIG": str(bad)})
    assert res.returncode == 2
    lines = res.stderr.decode().splitlines()
    assert lines[0].startswith("mesobox: error: ") and "Traceback" not in res.stderr.decode()


def test_debug_shows_traceback(mesobox: Mesobox) -> None:
    res = mesobox("--debug", "inspect", "docker://127.0.0.1:1/none:here")
    assert res.returncode == 4
    assert "Traceback" in res.stderr.decode()
    res = mesobox("inspect", "docker://127.0.0.1:1/none:here")
    assert "Traceback" not in res.stderr.decode()


def test_python_m_entry_point(mesobox: Mesobox) -> None:
    res = subprocess.run(
        [mesobox.python, "-m", "mesobox", "--version"], env=mesobox.base_env(), capture_output=True, check=False
    )
    assert res.returncode == 0 and res.stdout.startswith(b"mesobox ")


@pytest.mark.parametrize("lock", ['"allowed_bind_sources"', "[[1]]", '["no_such_key"]', "7"])
def test_a_lock_that_locks_nothing_is_an_error(tmp_path: Path, lock: str) -> None:
    """``lock = "key"`` used to be a set of letters: silently, nothing was locked."""
    site = tmp_path / "site.toml"
    site.write_text(f'allowed_bind_sources = ["/home"]\nlock = {lock}\n')
    env = {"MESOBOX_SITE_CONFIG": str(site), "MESOBOX_CONFIG": str(tmp_path / "none.toml"),
           "MESOBOX_RUNTIME_DIR": str(tmp_path / "rt")}
    with pytest.raises(ConfigError, match="'lock'"):
        load_config(env)


@pytest.mark.parametrize("setting", ['runtime_dir = "relative/rt"', 'allowed_bind_sources = ["scratch"]',
                                     'allowed_bind_sources = [1]', "runtime_dir = 5", "default_format = 3"])
def test_settings_of_the_wrong_shape_are_errors(tmp_path: Path, setting: str) -> None:
    user = tmp_path / "user.toml"
    user.write_text(setting + "\n")
    env = {"MESOBOX_SITE_CONFIG": str(tmp_path / "none.toml"), "MESOBOX_CONFIG": str(user),
           "MESOBOX_RUNTIME_DIR": str(tmp_path / "rt")}
    with pytest.raises(ConfigError):
        load_config(env)


def test_a_locked_require_seccomp_holds_against_user_and_environment(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('require_seccomp = true\nlock = ["require_seccomp"]\n')
    env = {"MESOBOX_SITE_CONFIG": str(site), "MESOBOX_CONFIG": str(tmp_path / "none.toml"),
           "MESOBOX_RUNTIME_DIR": str(tmp_path / "rt"), "MESOBOX_REQUIRE_SECCOMP": "0"}
    assert load_config(env).require_seccomp is True
    user = tmp_path / "user.toml"
    user.write_text("require_seccomp = false\n")
    with pytest.raises(ConfigError, match="set by the site"):
        load_config({**env, "MESOBOX_CONFIG": str(user)})


def test_a_relative_runtime_dir_in_the_environment_is_one_line(mesobox: Mesobox) -> None:
    res = mesobox("images", env={"MESOBOX_RUNTIME_DIR": "rel/rt"})
    assert res.returncode == 2
    assert res.stderr.decode().startswith("mesobox: error: MESOBOX_RUNTIME_DIR: runtime_dir must be an absolute")
