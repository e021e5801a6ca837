"""The one option table (src/mesobox/cli/table.py) and what is generated from it:
every verb's --help, its parser, srun's split, bash and zsh completion, man pages;
and the console's one warn() and the CLI's one JSON style."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SRC, Mesobox
from mesobox import console
from mesobox.cli import DISPATCH, main, print_json, table
from mesobox.cli.completion import bash, zsh
from mesobox.cli.slurm import split_args
from mesobox.cli.usage import help_text, manpage
from mesobox.errors import UsageError
from mesobox.launch.specbuild import RunOptions
from mesobox.slurm.options import slurm_option_width

PATHS = [v.path for v in table.verbs()] + [s.path for v in table.verbs() for s in v.subverbs]
LAUNCH = ("run", "exec", "shell")


@pytest.fixture()
def quiet_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No site or user configuration, a private store and runtime dir."""
    for key in [k for k in os.environ if k.startswith("MESOBOX_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MESOBOX_SITE_CONFIG", "/nonexistent")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MESOBOX_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MESOBOX_RUNTIME_DIR", str(tmp_path / "rt"))


def test_the_table_and_the_dispatcher_name_the_same_verbs() -> None:
    assert [v.name for v in table.verbs()] == list(DISPATCH)
    assert len(set(PATHS)) == len(PATHS) > 30


@pytest.mark.parametrize("path", [p for p in PATHS if p not in LAUNCH])
def test_every_verb_answers_help(path: str, quiet_config: None, capsys: pytest.CaptureFixture[str]) -> None:
    expected = help_text(path)
    assert expected.startswith(f"usage: mesobox {path}")
    verb = table.find(path)
    assert verb is not None
    for opt in verb.options:
        assert all(name in expected for name in opt.names), (path, opt.names)
    for asked in (["--help"], ["-h"]):
        assert main([*path.split(), *asked]) == 0
        out = capsys.readouterr()
        assert (out.out, out.err) == (expected, "")
    assert main(["help", *path.split()]) == 0
    assert capsys.readouterr().out == expected


def test_launch_verbs_answer_help(mesobox: Mesobox) -> None:
    for verb in LAUNCH:
        for asked in ("--help", "-h"):
            proc = mesobox(verb, "-B", "/tmp", asked)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.decode() == help_text(verb)
    assert "--bind SRC[:DST[:ro|rw]]" in help_text("run")


def test_help_without_a_verb_and_unknown_ones(quiet_config: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["instance"]) == 2  # no subverb: the usage, and a failure
    assert capsys.readouterr().out == help_text("instance")
    assert main(["help"]) == 0
    assert "verbs:" in capsys.readouterr().out
    assert main(["help", "frobnicate"]) == 2
    assert "unknown verb 'frobnicate'" in capsys.readouterr().err
    assert main(["overlay", "frobnicate"]) == 2
    assert "unknown overlay verb 'frobnicate'" in capsys.readouterr().err
    assert main(["--debug", "--frob"]) == 2
    assert capsys.readouterr().err.startswith("mesobox: error: unknown option --frob\n")


def test_run_options_are_runoptions_fields() -> None:
    """Each run option fills a RunOptions field (mpi and debug are taken out before),
    and each field a user sets has an option."""
    fields = {opt.field for opt in table.RUN_OPTIONS}
    settable = set(RunOptions.__slots__) - {"mode", "image", "args"}
    assert fields - {"mpi", "debug"} == settable


def test_one_grammar_for_every_verb() -> None:
    pull = table.find("pull")
    assert pull is not None
    values, args = table.parse(pull, ["--quiet", "ref", "--platform=linux/arm64", "--format", "dir"])
    assert (values, args) == ({"quiet": True, "platform": "linux/arm64", "format": "dir"}, ["ref"])
    for bad in (["ref", "--format", "zip"], ["ref", "--quiet=1"], ["ref", "--platform"], [], ["a", "b"],
                ["--plat", "x", "ref"]):
        with pytest.raises(UsageError):
            table.parse(pull, bad)
    assert table.parse(pull, ["--help", "--frob"]) == ({"help": True}, [])
    kill = table.find("oci kill")
    assert kill is not None and table.parse(kill, ["c1", "-9"]) == ({}, ["c1", "-9"])
    export = table.find("export")
    assert export is not None
    with pytest.raises(UsageError, match="needs --output"):
        table.parse(export, ["--format", "oci", "ref"])
    # Options stop at the first argument of `instance exec`; `--` ends them anywhere.
    iexec = table.find("instance exec")
    assert iexec is not None and table.parse(iexec, ["web", "sh", "-c", "x"]) == ({}, ["web", "sh", "-c", "x"])
    stop = table.find("instance stop")
    assert stop is not None and table.parse(stop, ["a", "-t", "3", "--", "-b"]) == ({"grace": "3"}, ["a", "-b"])


def test_inherited_options_are_handed_on_as_typed() -> None:
    start = table.find("instance start")
    assert start is not None
    values, args = table.parse(start, ["-B/a", "--restart", "always", "--bind", "/b", "--pid", "-e", "X=1",
                                       "--writable-tmpfs=8m", "img", "name", "--pid"])
    assert values == {"restart": "always",
                      table.INHERITED: ("-B/a", "--bind", "/b", "--pid", "-e", "X=1", "--writable-tmpfs=8m")}
    assert args == ["img", "name", "--pid"]
    for bad in (["--frob", "img", "n"], ["--pid=1", "img", "n"], ["--bind"]):
        with pytest.raises(UsageError):
            table.parse(start, bad)


@pytest.mark.parametrize("opt", [o for o in table.RUN_OPTIONS if o.field != "mpi"], ids=lambda o: o.names[-1])
def test_srun_hands_every_long_run_option_to_mesobox(opt: table.Option) -> None:
    """cli/slurm.py's split reads the table: no run option goes to srun by mistake,
    while the short letters stay srun's."""
    for name in (n for n in opt.names if n.startswith("--")):
        mine = [name, "X"] if opt.takes_value else [name]
        split = split_args([*mine, "-N2", "--", "app"])
        assert (split.run_args, split.slurm_args, split.command) == (tuple(mine), ("-N2",), ("app",))
    for name in (n for n in opt.names if not n.startswith("--")):
        split = split_args([name, "X", "--", "app"])
        want = (name, "X") if slurm_option_width(name) == 2 else (name,)  # srun's -v and -u are flags
        assert (split.run_args, split.slurm_args) == ((), want)


def test_sbatch_wrap_is_taken_out() -> None:
    split = split_args(["--wrap", "hostname -s", "-N2", "--bind", "/d"], verb="sbatch")
    assert (split.wrap, split.slurm_args, split.command) == ("hostname -s", ("-N2",), ())
    assert split.run_args == ("--bind", "/d")
    with pytest.raises(UsageError):
        split_args(["-N2"], verb="sbatch")
    assert split_args(["--wrap=x", "-N2", "app"]).slurm_args == ("--wrap=x", "-N2")  # srun has no --wrap


BASH_CASES = [
    (["mesobox", "run", "--bi"], ["--bind"]),
    (["mesobox", "ins"], ["inspect", "instance"]),
    (["mesobox", "instance", "st"], ["start", "stop", "stats"]),
    (["mesobox", "instance", "start", "--bi"], ["--bind"]),  # inherited from run
    (["mesobox", "instance", "start", "--res"], ["--restart"]),
    (["mesobox", "instance", "ls", "--a"], ["--all"]),  # an alias
    (["mesobox", "run", "--net", ""], ["host", "none", "slirp"]),
    (["mesobox", "run", "--net", "=", "s"], ["slirp"]),
    (["mesobox", "export", "--format", ""], ["dir", "squashfs", "oci"]),
    (["mesobox", "--de"], ["--debug"]),
    (["mesobox", "run", "-B", "/etc", "IMG", "--bi"], []),  # after IMAGE: the command's words
    (["mesobox", "srun", "--ima"], ["--image"]),
]


def test_bash_completion_completes(tmp_path: Path) -> None:
    script = tmp_path / "mesobox.bash"
    script.write_text(bash())
    probe = ['source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _mesobox; '
             'printf "%s\\n" "${COMPREPLY[@]}"']
    for words, expected in BASH_CASES:
        proc = subprocess.run(["bash", "--norc", "-c", *probe, "bash", str(script), *words],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert [line for line in proc.stdout.splitlines() if line] == expected, words
    proc = subprocess.run(["bash", "--norc", "-c", *probe, "bash", str(script), "mesobox", "run", "-B", "/et"],
                          capture_output=True, text=True, check=False)
    assert "/etc" in proc.stdout.split()  # a path option completes file names


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_parses(tmp_path: Path) -> None:
    script = tmp_path / "_mesobox"
    script.write_text(zsh())
    proc = subprocess.run(["zsh", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "'*--bind=[" in script.read_text() and "_mesobox_instance_start()" in script.read_text()


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed (groff-base)")
@pytest.mark.parametrize("path", ["", *(v.name for v in table.verbs())])
def test_man_pages_render_without_warnings(path: str, tmp_path: Path) -> None:
    page = tmp_path / "page.1"
    page.write_text(manpage(path))
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    if shutil.which("man") is not None:
        shown = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, check=False,
                               env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"})
        assert shown.returncode == 0 and shown.stderr == "", shown.stderr
        assert "NAME" in shown.stdout and "SYNOPSIS" in shown.stdout
        verb = table.find(path)
        assert verb is not None
        for opt in verb.options:
            assert opt.names[-1] in shown.stdout.replace("\u2010", "-").replace("\u2212", "-")


def test_manpage_list_and_completion_verbs(quiet_config: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manpage", "--list"]) == 0
    assert capsys.readouterr().out.split() == [v.name for v in table.verbs()]
    assert main(["completion", "bash"]) == 0
    assert capsys.readouterr().out == bash()
    assert main(["completion", "fish"]) == 2
    assert "no completion for 'fish'" in capsys.readouterr().err


def test_warn_clears_a_live_progress_line(capsys: pytest.CaptureFixture[str]) -> None:
    console.end_progress()
    capsys.readouterr()
    console.warn("plain")
    assert capsys.readouterr().err == "mesobox: warning: plain\n"
    console.progress("fetching [###   ]")
    console.warn("mid-pull")
    console.progress("fetching [######]")
    console.end_progress()
    console.end_progress()  # once only
    err = capsys.readouterr().err
    assert err == ("\rfetching [###   ]" + "\r\x1b[K" + "mesobox: warning: mid-pull\n" + "\rfetching [###   ]"
                   + "\rfetching [######]" + "\n")


def test_one_json_style(capsys: pytest.CaptureFixture[str]) -> None:
    print_json({"b": [1], "a": "é"})
    assert capsys.readouterr().out == '{\n  "b": [\n    1\n  ],\n  "a": "\\u00e9"\n}\n'
    # Every JSON the CLI prints goes through print_json: no other json.dumps in cli/.
    for path in (SRC / "mesobox" / "cli").glob("*.py"):
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "dumps"]
        assert len(calls) == (1 if path.name == "__init__.py" else 0), path


def test_instance_list_json(quiet_config: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["instance", "list", "--all", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == [] and out == "[]\n"


def test_the_table_imports_nothing() -> None:
    """The launch path reads the table: importing it loads no other module, and the
    run verb's parser does not load the help generator."""
    code = ("import sys; before = set(sys.modules); import mesobox.cli.table; "
            "print(sorted(set(sys.modules) - before)); import mesobox.cli.run; "
            "print([m for m in ('mesobox.cli.usage', 'textwrap', 'argparse') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(SRC)!r}); {code}"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert set(ast.literal_eval(out[0])) <= {"mesobox", "mesobox.cli", "mesobox.cli.table", "__future__"}
    assert out[1] == "[]"


def test_bundled_flags_are_taken_apart_as_getopt_does() -> None:
    run = table.find("run")
    assert run is not None
    values, args = table.parse(run, ["-it", "--rm", "img", "-it"])
    assert values["interactive"] is True and values["tty"] is True and args == ["img", "-it"]
    with pytest.raises(UsageError):
        table.parse(run, ["-iB/x", "img"])  # -B takes a value: not a bundle of flags

