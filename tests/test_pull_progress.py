"""Pull progress (image/pull.py ``Progress``, console.py) and ``mesobox pull --json``.

The progress line shows bytes, the transfer rate and the time left (computed from a
clock the test drives: no timing assertion); it is drawn only on a terminal (a real
pseudo-terminal here); a warning written while it is up erases it first, and the line
is drawn again below the warning."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import Mesobox, make_busybox_rootfs, make_oci_image
from mesobox import console
from mesobox.image import pull as pull_module
from run_support import mesobox_argv


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_line_shows_bytes_rate_and_eta(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    clock = Clock()
    monkeypatch.setattr(pull_module.time, "monotonic", clock)
    progress = pull_module.Progress(10_000_000, enabled=True)
    progress.have(1_000_000)  # already in the store: done, but no transfer
    assert "MB/s" not in progress.line() and " 1.0/10.0 MB" in progress.line()
    progress.add(1_000_000)  # one sample: no rate yet
    assert progress.rate() is None and "ETA" not in progress.line()
    clock.now += 1
    progress.add(1_000_000)
    clock.now += 1
    progress.add(1_000_000)  # 2 MB in the last 2 s, 6 MB to go
    assert progress.rate() == 1_000_000
    assert progress.line().endswith(" 4.0/10.0 MB    1.0 MB/s  ETA 0:06")
    console.end_progress()
    assert capsys.readouterr().err.endswith("ETA 0:06\n")  # drawn, then ended
    clock.now += 100  # a stall, then 0.5 MB/s: the stall falls out of the window
    progress.add(500_000)
    assert progress.rate() is not None and progress.rate() < 10_000
    for _ in range(6):
        clock.now += 1
        progress.add(500_000)
    assert progress.rate() == 500_000 and progress.line().endswith(" 7.5/10.0 MB  500.0 kB/s  ETA 0:05")
    progress.note("flattening")  # no rate while flattening
    assert "ETA" not in progress.line()
    console.end_progress()


@pytest.fixture(scope="module")
def layout(shared_tmp: Path) -> Path:
    path = make_oci_image(shared_tmp / "progress-oci", "v1", [make_busybox_rootfs])
    subprocess.run(["chmod", "-R", "a+rX", str(path)], check=True)
    return path


def on_a_terminal(mesobox: Mesobox, args: list[str]) -> tuple[int, bytes, str]:
    """Run mesobox as root with a pseudo-terminal as stderr: (status, stdout, the terminal's bytes)."""
    argv, env = mesobox_argv(mesobox, None, args)
    master, slave = os.openpty()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer of the terminal is gone
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out = proc.stdout.read() if proc.stdout else b""
    return proc.wait(timeout=120), out, seen.decode("utf-8", "replace")


def test_a_warning_clears_the_progress_line(mesobox: Mesobox, layout: Path) -> None:
    ref = f"oci:{layout}:v1"
    status, out, tty = on_a_terminal(mesobox, ["pull", ref])
    assert status == 0, tty
    assert "fetching" in tty and "flattening" in tty and "MB" in tty
    stored = json.loads(mesobox("inspect", ref).stdout)
    Path(stored["Squashfs"]).write_bytes(b"hsqs damaged")  # the next pull warns while flattening
    status, out, tty = on_a_terminal(mesobox, ["pull", ref])
    assert status == 0, tty
    assert out.decode().strip() == stored["Digest"]
    warned = tty.index("mesobox: warning: the squashfs of")
    # the line was erased first (the terminal turns "\n" into "\r\n"), then drawn again below
    assert tty[:warned].endswith("\r\x1b[K"), repr(tty[warned - 80:warned + 80])
    assert "flattening" in tty[warned:].split("\n", 1)[1]


def test_no_progress_line_without_a_terminal(mesobox: Mesobox, layout: Path) -> None:
    res = mesobox("pull", f"oci:{layout}:v1")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stderr == b""  # no progress line, no escape sequence, into a pipe or a log


def test_pull_json(mesobox: Mesobox, layout: Path) -> None:
    ref = f"oci:{layout}:v1"
    res = mesobox("pull", "--json", "--format", "dir", ref)
    assert res.returncode == 0, res.stderr.decode()
    doc = json.loads(res.stdout)
    stored = json.loads(mesobox("inspect", ref).stdout)
    assert doc["digest"] == stored["Digest"] and doc["reference"] == stored["Reference"]
    assert doc["format"] == "dir" and doc["path"] == stored["Rootfs"] and Path(doc["path"]).is_dir()
    assert doc["size"] == stored["Size"] and doc["fetched"] >= 1
    assert isinstance(doc["seconds"], float) and doc["seconds"] >= 0
    again = json.loads(mesobox("pull", "--json", ref).stdout)  # squashfs from the blobs already there
    assert again["format"] == "squashfs" and again["fetched"] == 0
    assert again["path"] == json.loads(mesobox("inspect", ref).stdout)["Squashfs"]
