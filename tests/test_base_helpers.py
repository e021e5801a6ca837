"""The small helpers every room shares (sizes, files, procs): one rule each."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mesobox.errors import UsageError
from mesobox.files import is_squashfs, under, write_atomic
from mesobox.paths import racy
from mesobox.procs import alive, same_process, start_time
from mesobox.sizes import parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("512m", 512 << 20), ("1.5g", 3 << 29), ("1.5G", 3 << 29), ("10mb", 10 << 20),
    ("2GiB", 2 << 30), ("1t", 1 << 40), (" 64k ", 64 << 10), ("123456789012345678901", 123456789012345678901),
])
def test_one_size_grammar(text: str, expected: int) -> None:
    assert parse_size(text, "--memory") == expected


@pytest.mark.parametrize("text", ["", "0", "-1m", "lots", "1.5x", "nan", "inf", "m", "0.0g", "1e400"])
def test_sizes_that_are_not(text: str) -> None:
    with pytest.raises(UsageError, match="--writable-tmpfs"):
        parse_size(text, "--writable-tmpfs")


def test_writable_tmpfs_takes_the_size_memory_takes() -> None:
    """The same text means the same bytes for every option that takes a size."""
    from mesobox.cli.run import parse

    values = parse("exec", ["--writable-tmpfs=1.5g", "--memory", "1.5g", "img", "true"])
    assert parse_size(values["writable_tmpfs"], "--writable-tmpfs") == parse_size(values["memory"], "--memory")


def test_under_is_component_wise_and_root_holds_everything() -> None:
    assert under("/a/b", "/a") and under("/a", "/a") and under("/a", "/a/")
    assert not under("/ab", "/a") and not under("/", "/a")
    assert under("/anything", "/") and under("/", "/")
    assert under("dev/pts", "dev") and not under("devices", "dev")


def test_write_atomic_replaces_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    write_atomic(target, b"new", mode=0o640, durable=True)
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert target.stat().st_mode & 0o777 == 0o640 & ~_umask()


def test_write_atomic_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    """A symlink where the final name is gets replaced, not followed; the file it
    pointed to is untouched."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "out").symlink_to(victim)
    write_atomic(tmp_path / "out", b"data")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out").read_text() == "data"


def test_write_atomic_relative_to_a_directory_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_atomic("cached", b"x" * 100_000, dir_fd=fd, durable=True)
    finally:
        os.close(fd)
    assert (tmp_path / "cached").read_bytes() == b"x" * 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["cached"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "dir-in-the-way"
    target.mkdir()  # rename(2) of a file onto a directory fails
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.is_dir() and list(tmp_path.iterdir()) == [target]


def test_racy_is_the_two_second_rule() -> None:
    import time

    now = time.time_ns()
    assert racy(now) and racy(now - 1_000_000_000) and not racy(now - 3_000_000_000)


def test_squashfs_magic(tmp_path: Path) -> None:
    (tmp_path / "yes").write_bytes(b"hsqs" + bytes(92))
    (tmp_path / "no").write_bytes(b"\x7fELF")
    assert is_squashfs(tmp_path / "yes") and not is_squashfs(tmp_path / "no")
    assert not is_squashfs(tmp_path / "missing")


def test_a_pid_with_its_start_time_is_an_identity() -> None:
    me = os.getpid()
    started = start_time(me)
    assert started is not None and alive(me) and same_process(me, started)
    assert not same_process(me, started + 1) and not same_process(None, started) and not same_process(me, None)
    child = subprocess.Popen(["true"])
    deadline = 600
    while start_time(child.pid) is not None and deadline:  # exits, then stays a zombie until waited for
        import time

        time.sleep(0.05)
        deadline -= 1
    assert not alive(child.pid), "a zombie counts as gone"
    child.wait()
    assert start_time(0) is None and start_time(-5) is None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
