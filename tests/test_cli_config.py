"""The CLI boundary and configuration precedence (pure unit tier, plus one subprocess check)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox
from mesobox.cli import main
from mesobox.config import Config, load_config
from mesobox.errors import ConfigError


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
    env = {"MESOBOX_SITE_CONFIG": str(site), "MESOBOX_CONFIG": str(user), "HOME": str(tmp_path)}
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
