"""`mesobox build`'s pure parts: the Dockerfile parser and its words, .dockerignore,
paths resolved inside a rootfs, and changesets written as reproducible layers."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from mesobox.errors import UsageError
from mesobox.image.build import changes
from mesobox.image.build.context import Context, Ignore, resolve
from mesobox.image.build.dockerfile import DockerfileError, key_values, parse, substitute, words


def test_stages_continuations_comments_and_forms() -> None:
    df = parse(
        "ARG BASE=busybox\n"
        "FROM $BASE AS build\n"
        "# a comment\n"
        "RUN echo a \\\n"
        "  # a comment inside the continuation is dropped\n"
        "\n"
        "    && echo b\n"
        'CMD ["/bin/echo", "x"]\n'
        "copy --from=build --chown=1:2 a b /c/\n"
        "FROM scratch\n"
        "ENTRYPOINT echo hi\n")
    assert [a.args for a in df.global_args] == ["BASE=busybox"]
    first, second = df.stages
    assert (first.base, first.name, first.line) == ("$BASE", "build", 2)
    run, cmd, copy = first.instructions
    assert run.args == "echo a     && echo b" and run.line == 4 and run.exec_form is None
    assert cmd.exec_form == ("/bin/echo", "x")
    assert copy.keyword == "COPY" and copy.flag("from") == "build" and copy.flag("chown") == "1:2"
    assert copy.args == "a b /c/" and copy.line == 9
    assert second.base == "scratch" and second.instructions[0].exec_form is None


def test_escape_directive_backtick() -> None:
    df = parse("# escape=`\nFROM scratch\nRUN dir c:\\ `\n  && echo done\n")
    assert df.escape == "`"
    assert df.stages[0].instructions[0].args == "dir c:\\   && echo done"


def test_directive_after_a_comment_is_a_comment() -> None:
    df = parse("# hello\n# escape=`\nFROM scratch\nRUN a \\\n b\n")
    assert df.escape == "\\"
    assert df.stages[0].instructions[0].args == "a  b"


@pytest.mark.parametrize(("text", "line", "words_in_message"), [
    ("FROM scratch\nFROBNICATE x\n", 2, "unknown instruction 'FROBNICATE'"),
    ("RUN true\nFROM scratch\n", 1, "RUN before the first FROM"),
    ("FROM scratch\n\nSHELL /bin/bash -c\n", 3, "SHELL needs a JSON array"),
    ("FROM scratch\nRUN --network=none true\n", 2, "RUN --network is not supported"),
    ("FROM a AS x\nFROM b AS x\n", 2, "stage name 'x' is used twice"),
    ("FROM a AS 1bad\n", 1, "invalid stage name"),
    ("FROM a b c d\n", 1, "FROM takes one image"),
    ("FROM scratch\nCOPY --chown 1 a b\n", 2, "--chown needs a value"),
    ("# escape=x\nFROM scratch\n", 1, "invalid escape character"),
])
def test_bad_dockerfiles_name_the_line(text: str, line: int, words_in_message: str) -> None:
    with pytest.raises(DockerfileError) as caught:
        parse(text, "ctx/Dockerfile")
    assert caught.value.message.startswith(f"ctx/Dockerfile:{line}: "), caught.value.message
    assert words_in_message in caught.value.message
    assert "\n" not in caught.value.message


def test_no_from_at_all() -> None:
    with pytest.raises(DockerfileError, match="no FROM"):
        parse("# just a comment\nARG X=1\n")


def test_words_and_substitution() -> None:
    env = {"A": "one", "EMPTY": "", "SP": "a b"}
    assert words("$A ${A}x '$A' \"$A two\" \\$A", env) == ["one", "onex", "$A", "one two", "$A"]
    assert words("${MISSING:-dflt} ${EMPTY:-e} ${EMPTY-e} ${A:+alt} ${MISSING:+alt}x", env) == \
        ["dflt", "e", "alt", "x"]  # ${EMPTY-e}: set, so empty, so no word
    assert words("${MISSING:-${A}}/bin", env) == ["one/bin"]
    assert words("$SP", env) == ["a", "b"]  # unquoted: split, as Docker does
    assert words('"$SP"', env) == ["a b"]
    assert substitute("echo ${A:-x} $$ \\$A", env) == "echo one $$ $A"
    with pytest.raises(UsageError, match="unterminated"):
        words("'open", env)
    with pytest.raises(UsageError, match="bad substitution"):
        words("${1x}", env)
    with pytest.raises(UsageError, match="MISSING: needed"):
        words("${MISSING:?needed}", env)


def test_env_and_label_forms() -> None:
    df = parse('FROM scratch\nENV A=1 B="two words" C=$A\nENV OLD spaced value\nLABEL "x y"=z\nARG N M=3\n')
    env_new, env_old, label, arg = df.stages[0].instructions
    assert key_values(env_new, {"A": "0"}, "\\", "") == [("A", "1"), ("B", "two words"), ("C", "0")]
    assert key_values(env_old, {}, "\\", "") == [("OLD", "spaced value")]
    assert key_values(label, {}, "\\", "") == [("x y", "z")]
    assert key_values(arg, {}, "\\", "") == [("N", "\0"), ("M", "3")]
    bad = parse("FROM scratch\nENV 1A=x\n").stages[0].instructions[0]
    with pytest.raises(UsageError, match="invalid variable name"):
        key_values(bad, {}, "\\", "")


def test_dockerignore_rules() -> None:
    ignore = Ignore("# comment\n\n*.log\n!keep.log\nbuild/\n/secret\n**/cache\ndocs/*.md\n")
    assert ignore.excluded("a.log") and not ignore.excluded("keep.log")
    assert not ignore.excluded("sub/a.log")  # * never crosses /
    assert ignore.excluded("build") and ignore.excluded("build/x/y")  # a directory takes its content
    assert ignore.excluded("secret") and not ignore.excluded("sub/secret")
    assert ignore.excluded("cache") and ignore.excluded("a/b/cache/c")
    assert ignore.excluded("docs/x.md") and not ignore.excluded("docs/x.txt")
    assert not ignore.excluded("src/main.c")


def test_context_sources(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "skip.txt").write_text("s")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "c.txt").write_text("c")
    (tmp_path / "link").symlink_to("/etc")
    (tmp_path / ".dockerignore").write_text("skip.txt\n")
    ctx = Context(str(tmp_path))
    assert ctx.sources("*.txt") == ["a.txt", "b.txt"]
    assert ctx.sources("./dir/../a.txt") == ["a.txt"]
    with pytest.raises(UsageError, match="not in the build context"):
        ctx.sources("link")  # followed inside the context only: its /etc, which it lacks
    with pytest.raises(UsageError, match="excluded"):
        ctx.sources("skip.txt")
    with pytest.raises(UsageError, match="outside the build context"):
        ctx.sources("../x")
    with pytest.raises(UsageError, match="not in the build context"):
        ctx.sources("nope")
    before = ctx.digest(["a.txt", "dir"])
    (tmp_path / "dir" / "c.txt").write_text("changed")
    assert Context(str(tmp_path)).digest(["a.txt", "dir"]) != before
    (tmp_path / "skip.txt").write_text("excluded files do not count")
    assert Context(str(tmp_path)).digest([""]) == Context(str(tmp_path)).digest([""])


def test_resolve_never_leaves_the_root(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "lib").symlink_to("usr/lib")
    (tmp_path / "evil").symlink_to("/home")
    (tmp_path / "up").symlink_to("../../../..")
    (tmp_path / "loop").symlink_to("loop")
    assert resolve(str(tmp_path), "lib/x.so") == "usr/lib/x.so"
    assert resolve(str(tmp_path), "evil/user") == "home/user"  # /home of the rootfs, not the host's
    assert resolve(str(tmp_path), "up/etc") == "etc"
    assert resolve(str(tmp_path), "../../etc/passwd") == "etc/passwd"
    assert resolve(str(tmp_path), "lib", follow_last=False) == "lib"
    with pytest.raises(UsageError, match="too many levels"):
        resolve(str(tmp_path), "loop/x")


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


@pytest.mark.root
def test_changeset_becomes_a_reproducible_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whiteouts (char 0/0) and opaque directories (overlayfs's xattr) become OCI
    whiteouts; owners are kept; entries sorted; the same tree gives the same bytes."""
    if os.getuid() != 0:
        pytest.skip("mknod of a whiteout needs root")
    top = tmp_path / "changes"
    (top / "etc").mkdir(parents=True)
    os.mknod(top / "etc" / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (top / "b").write_text("bee")
    (top / "a").write_text("ay")
    os.link(top / "a", top / "a2")
    os.chown(top / "b", 100, 101)
    (top / "opq").mkdir()
    os.setxattr(top / "opq", "trusted.overlay.opaque", b"y")
    (top / "opq" / "new").write_text("n")
    os.symlink("a", top / "ln")
    out1, out2 = tmp_path / "l1.tar.gz", tmp_path / "l2.tar.gz"
    info = changes.write_layer(str(top), str(out1), 1_700_000_000)
    os.utime(top / "b", (2_000_000_000, 2_000_000_000))  # later than the epoch: clamped anyway
    again = changes.write_layer(str(top), str(out2), 1_700_000_000)
    assert info == again and out1.read_bytes() == out2.read_bytes()
    members = {m.name: m for m in _members(out1)}
    assert list(members) == ["a", "a2", "b", "etc", "etc/.wh.gone", "ln", "opq", "opq/.wh..wh..opq", "opq/new"]
    assert members["a2"].islnk() and members["a2"].linkname == "a"
    assert (members["b"].uid, members["b"].gid, members["b"].uname) == (100, 101, "")
    assert members["ln"].issym() and members["ln"].linkname == "a"
    assert all(m.mtime <= 1_700_000_000 for m in members.values())
    raw = gzip.decompress(out1.read_bytes())
    import hashlib

    assert info["diff_id"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert info["digest"] == "sha256:" + hashlib.sha256(out1.read_bytes()).hexdigest()
    assert out1.read_bytes()[4:8] == b"\0\0\0\0"  # gzip header without a time
    with tarfile.open(fileobj=io.BytesIO(raw)) as plain:
        assert plain.getnames()  # a valid plain tar inside


@pytest.mark.root
def test_changeset_applies_to_the_rootfs(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("mknod of a whiteout needs root")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "gone").write_text("x")
    (root / "opq").mkdir()
    (root / "opq" / "old").write_text("o")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "lnk").symlink_to(outside)  # replaced by a directory, never written through
    top = tmp_path / "changes"
    (top / "etc").mkdir(parents=True)
    os.mknod(top / "etc" / "gone", stat.S_IFCHR, os.makedev(0, 0))
    (top / "etc" / ".wh.absent").write_text("")
    (top / "opq").mkdir()
    os.setxattr(top / "opq", "trusted.overlay.opaque", b"y")
    (top / "opq" / "new").write_text("n")
    (top / "lnk").mkdir()
    (top / "lnk" / "f").write_text("f")
    changes.apply(str(top), str(root))
    assert not (root / "etc" / "gone").exists()
    assert sorted(os.listdir(root / "opq")) == ["new"]
    assert not (root / "lnk").is_symlink() and (root / "lnk" / "f").read_text() == "f"
    assert os.listdir(outside) == []
