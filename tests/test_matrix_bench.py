"""``mesobox matrix`` and ``mesobox bench`` (tools/), run for real by an ordinary user.

The matrix runs over two busybox images that have a marker file (a directory and a
squashfs) and one that lacks it; the bench times ``true``.  Their HTML reports are
rendered by headless Chromium (run as the ordinary user, with its sandbox): the
screenshot must not be one colour and must show the plot's colours, and the DOM must
hold the SVG with one point per run.  Statistics are recomputed here from the samples
the JSON recorded, by a second, independent route.  No test asserts a duration.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import zlib
from math import comb
from pathlib import Path

import pytest

from conftest import Mesobox, User, make_oci_image, need_tool, open_busybox_rootfs
from slurm_support import MpiImage, mpi_image, slurm_cluster

pytestmark = [pytest.mark.userns]
__all__ = ["mpi_image", "slurm_cluster"]  # fixtures used by name below

MARKER = "/etc/mesobox-matrix"
MARK_TEXT = "matrix-marker-41"
CONTAINER_RGB = (0xD9, 0x5F, 0x02)  # tools/report.py COLOURS["container"]
HOST_RGB = (0x1B, 0x76, 0xB3)


@pytest.fixture(scope="module")
def images(shared_tmp: Path) -> tuple[Path, Path, Path]:
    """(directory with the marker, squashfs with it, directory without it), usable by every user."""
    top = shared_tmp / "matrix-images"
    top.mkdir(mode=0o755, exist_ok=True)
    marked = open_busybox_rootfs(top / "marked")
    (marked / MARKER[1:]).write_text(MARK_TEXT + "\n")
    os.chmod(marked / MARKER[1:], 0o644)
    sqfs = top / "marked.sqfs"
    subprocess.run(["mksquashfs", str(marked), str(sqfs), "-quiet", "-noappend", "-all-root"], check=True)
    os.chmod(sqfs, 0o644)
    bare = open_busybox_rootfs(top / "bare")
    return marked, sqfs, bare


def _json(path: Path) -> dict:  # type: ignore[type-arg]
    data: dict = json.loads(path.read_text())  # type: ignore[type-arg]
    return data


def _one_line_error(proc: subprocess.CompletedProcess[bytes], text: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert err.startswith("mesobox: error: ") and text in err.splitlines()[0], err
    assert "Traceback" not in err and len([x for x in err.splitlines() if x.startswith("mesobox: error")]) == 1, err


# --- matrix ---------------------------------------------------------------------------


def test_matrix_over_three_images(images: tuple[Path, Path, Path], mesobox: Mesobox, user: User,
                                  world_tmp: Path) -> None:
    marked, sqfs, bare = images
    out_json, out_html = world_tmp / "m.json", world_tmp / "m.html"
    proc = mesobox("matrix", str(marked), str(sqfs), str(bare), "--json", str(out_json), "--html", str(out_html),
                   "--", "cat", MARKER, as_user=user, cwd=world_tmp)
    assert proc.returncode == 1, proc.stderr.decode()  # one image failed
    table = proc.stdout.decode().splitlines()
    assert table[0].split() == ["IMAGE", "RESULT", "EXIT", "TIME", "OUTPUT"]
    rows = {line.split()[0]: line.split() for line in table[1:4]}
    assert rows[str(marked)][1:3] == ["pass", "0"] and rows[str(marked)][-1] == MARK_TEXT
    assert rows[str(sqfs)][1:3] == ["pass", "0"] and rows[str(sqfs)][-1] == MARK_TEXT
    assert rows[str(bare)][1:3] == ["fail", "1"]
    assert table[-1] == "2 pass, 1 fail (3 images)"
    assert f"--- {bare} (fail, exit 1)" in table  # the failure's first lines follow the table

    data = _json(out_json)
    results = data["results"]
    assert [r["image"] for r in results] == [str(marked), str(sqfs), str(bare)]  # the order given
    assert [r["status"] for r in results] == ["pass", "pass", "fail"]
    assert [r["exit_code"] for r in results] == [0, 0, 1]
    assert results[0]["output"] == [MARK_TEXT] == results[1]["output"]
    assert "/etc/mesobox-matrix" in results[2]["output"][0] and not results[2]["output_truncated"]
    assert all(r["seconds"] > 0 for r in results)
    # The squashfs file's content digest; a directory has none.
    assert results[1]["digest"] == "sha256:" + hashlib.sha256(sqfs.read_bytes()).hexdigest()
    assert results[0]["digest"] is None and results[0]["kind"] == "directory"
    assert data["passed"] == 2 and data["command"] == ["cat", MARKER]

    html = out_html.read_text()
    assert html.startswith("<!DOCTYPE html>") and "mesobox matrix: 2/3 passed" in html
    assert all(str(p) in html for p in images) and html.count('<rect class="bar ') == 3
    _self_contained(html)


def _self_contained(html: str) -> None:
    """No external resource: nothing to fetch, nothing to run."""
    tags = re.findall(r"<[a-zA-Z][^>]*>", html)  # text is escaped: every `<` left opens a tag
    names = {re.match(r"<([a-zA-Z]+)", tag).group(1).lower() for tag in tags}  # type: ignore[union-attr]
    assert not names & {"script", "link", "img", "iframe", "object", "embed", "image", "use", "a"}, names
    for tag in tags:
        assert not re.search(r"\s(src|href|xlink:href|on\w+)=", tag, re.I), tag
    style = "".join(re.findall(r"<style>(.*?)</style>", html, re.S))
    assert style and "url(" not in style and "@import" not in style
    assert html.count("http") == html.count('xmlns="http://www.w3.org/2000/svg"')


def test_matrix_all_pass_json_to_stdout_and_a_timeout(images: tuple[Path, Path, Path], mesobox: Mesobox,
                                                      user: User, world_tmp: Path) -> None:
    marked, sqfs, _ = images
    proc = mesobox("matrix", "-j", "1", "--json", "-", str(marked), str(sqfs), "--", "cat", MARKER,
                   as_user=user, cwd=world_tmp)
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)  # nothing but the JSON on stdout
    assert [r["status"] for r in data["results"]] == ["pass", "pass"] and data["mode"] == "local, 1 at a time"
    # Exec options go to every container: -e sets a variable inside.
    proc = mesobox("matrix", "-e", "GREETING=hello", str(marked), "--", "sh", "-c", "echo $GREETING",
                   as_user=user, cwd=world_tmp)
    assert proc.returncode == 0 and proc.stdout.decode().splitlines()[1].split()[-1] == "hello", proc.stdout
    # A run past --timeout is killed with its whole process group and counts as failed.
    proc = mesobox("matrix", "--timeout", "1s", "--json", "-", str(marked), "--", "sh", "-c",
                   "echo started; sleep 60 & wait", as_user=user, cwd=world_tmp, timeout=60)
    assert proc.returncode == 1, proc.stderr.decode()
    (result,) = json.loads(proc.stdout)["results"]
    assert (result["status"], result["exit_code"], result["signal"]) == ("timeout", 137, "SIGKILL")
    assert result["output"] == ["started"]


def test_matrix_stored_reference_shows_its_digest(images: tuple[Path, Path, Path], mesobox: Mesobox, user: User,
                                                  world_tmp: Path) -> None:
    marked = images[0]
    layout = world_tmp / "layout"

    def layer(root: Path) -> None:
        shutil.copytree(marked, root, symlinks=True, dirs_exist_ok=True)

    make_oci_image(layout, "v1", [layer])
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    ref = f"oci:{layout}:v1"
    pulled = mesobox("pull", "-q", ref, as_user=user, cwd=world_tmp)
    assert pulled.returncode == 0, pulled.stderr.decode()
    digest = pulled.stdout.decode().strip()
    proc = mesobox("matrix", "--json", "-", ref, "--", "cat", MARKER, as_user=user, cwd=world_tmp)
    assert proc.returncode == 0, proc.stderr.decode()
    (result,) = json.loads(proc.stdout)["results"]
    assert (result["status"], result["kind"], result["digest"]) == ("pass", "stored", digest)


def test_matrix_and_bench_bad_input(images: tuple[Path, Path, Path], mesobox: Mesobox, user: User,
                                    world_tmp: Path) -> None:
    marked = str(images[0])
    ran = world_tmp / "ran"
    command = ("--", "sh", "-c", f"touch {ran}")
    _one_line_error(mesobox("matrix", *command, as_user=user, cwd=world_tmp), "no image given")
    _one_line_error(mesobox("matrix", marked, "true", as_user=user, cwd=world_tmp), "no command")
    _one_line_error(mesobox("matrix", marked, "--", as_user=user, cwd=world_tmp), "no command after `--`")
    missing = str(world_tmp / "no-such-image")
    _one_line_error(mesobox("matrix", marked, missing, "nosuch:ref", *command, as_user=user, cwd=world_tmp),
                    f"no such image: {missing}, nosuch:ref")
    _one_line_error(mesobox("matrix", "-j", "0", marked, *command, as_user=user, cwd=world_tmp), "--jobs")
    _one_line_error(mesobox("matrix", "--timeout", "soon", marked, *command, as_user=user, cwd=world_tmp),
                    "bad --timeout value")
    _one_line_error(mesobox("matrix", "--sbatch-arg=-N1", marked, *command, as_user=user, cwd=world_tmp),
                    "--sbatch-arg is for --slurm")
    _one_line_error(mesobox("bench", marked, marked, *command, as_user=user, cwd=world_tmp), "one image")
    _one_line_error(mesobox("bench", missing, *command, as_user=user, cwd=world_tmp), "no such image")
    _one_line_error(mesobox("bench", "--runs", "x", marked, *command, as_user=user, cwd=world_tmp), "--runs")
    _one_line_error(mesobox("bench", marked, "--", "no-such-command-here", as_user=user, cwd=world_tmp),
                    "command not found on the host")
    assert not ran.exists()  # nothing ran: every mistake was caught before the first container
    # A command that fails stops the bench: its timings would compare nothing.
    _one_line_error(mesobox("bench", "-n", "3", marked, "--", "false", as_user=user, cwd=world_tmp),
                    "exited with status 1")


# --- bench ----------------------------------------------------------------------------


def _order_statistics_ci(samples: list[float]) -> tuple[float, float, float]:
    """The 95 % interval of the median from the binomial distribution, written out again."""
    n = len(samples)
    ordered = sorted(samples)
    k = 1
    while k + 1 <= n // 2 and 1 - 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n >= 0.95:
        k += 1
    return ordered[k - 1], ordered[n - k], 1 - 2 * sum(comb(n, i) for i in range(k)) / 2**n


def test_order_statistics_interval_against_known_values() -> None:
    from mesobox.tools import stats

    ten = [float(v) for v in (7, 3, 9, 1, 5, 10, 2, 8, 6, 4)]
    assert stats.median_ci(ten) == (2.0, 9.0, 1 - 2 * 11 / 1024)  # k = 2: P(B <= 1) = 11/1024
    assert stats.median_ci(ten[:5]) == (1.0, 9.0, 1 - 2 / 32)  # too few for 95 %: the range, said so
    assert stats.median([3.0, 1.0, 2.0, 10.0]) == 2.5 and stats.mad([1.0, 2.0, 3.0, 4.0, 100.0]) == 1.0
    for n in range(1, 40):
        values = [float((i * 37) % 101) for i in range(n)]
        assert stats.median_ci(values) == _order_statistics_ci(values)


def test_bench_true(images: tuple[Path, Path, Path], mesobox: Mesobox, user: User, world_tmp: Path) -> None:
    sqfs = images[1]
    out_json, out_html = world_tmp / "b.json", world_tmp / "b.html"
    data_dir = world_tmp / "data"
    data_dir.mkdir()
    proc = mesobox("bench", "-n", "5", "--warmup", "1", "-B", f"{data_dir}:/data:ro", "--json", str(out_json),
                   "--html", str(out_html), str(sqfs), "--", "true", as_user=user, cwd=world_tmp)
    assert proc.returncode == 0, proc.stderr.decode()
    table = proc.stdout.decode()
    assert table.splitlines()[1].split()[:2] == ["container", "5"] and "container / host:" in table
    data = _json(out_json)
    assert (data["runs"], data["warmup"], data["command"], data["unit"]) == (5, 1, ["true"], "seconds")
    # Interleaved, the side that goes first alternating (the warm-up round had the container first).
    assert data["first"] == ["host", "container", "host", "container", "host"]
    for side in ("container", "host"):
        samples = data[side]["samples"]
        summary = data[side]["summary"]
        assert len(samples) == 5 and all(s > 0 for s in samples)
        med = statistics.median(samples)
        assert summary["median"] == pytest.approx(med)
        assert summary["mad"] == pytest.approx(statistics.median([abs(s - med) for s in samples]))
        assert (summary["min"], summary["max"]) == (min(samples), max(samples))
        low, high, level = _order_statistics_ci(samples)
        assert (summary["ci_low"], summary["ci_high"]) == (low, high) == (min(samples), max(samples))
        assert summary["ci_level"] == pytest.approx(level) == pytest.approx(0.9375)
    assert data["ratio_median"] == pytest.approx(data["container"]["summary"]["median"]
                                                 / data["host"]["summary"]["median"])
    env = data["environment"]
    assert env["kernel"].split()[1] == os.uname().release and env["machine"] == os.uname().machine
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 None)
    if model is not None:
        assert env["cpu_model"] == model
    governor = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    assert env["governor"] == (governor.read_text().strip() if governor.exists() else "unknown")
    assert env["image"]["digest"] == "sha256:" + hashlib.sha256(sqfs.read_bytes()).hexdigest()
    assert env["image"]["exec_options"] == ["-B", f"{data_dir}:/data:ro"]
    assert {"source": str(data_dir), "destination": "/data", "read_only": True} in env["binds"]
    assert env["mesobox_version"] == subprocess.run(
        [mesobox.python, "-c", "import mesobox; print(mesobox.__version__)"], env={"PYTHONPATH": str(mesobox.src)},
        capture_output=True, text=True, check=True).stdout.strip()
    html = out_html.read_text()
    _self_contained(html)
    assert html.count('<circle class="run container"') == 5 == html.count('<circle class="run host"')


def test_reports_are_deterministic_and_escaped() -> None:
    from mesobox.tools import report

    result = {"image": "<img src=x>", "index": 0, "host": "n1", "status": "fail", "exit_code": 2, "signal": None,
              "seconds": 0.25, "output": ["</pre><script>alert(1)</script>", "\x1b]0;retitled\x07\x1b[2J"],
              "output_truncated": True,
              "kind": "directory", "digest": None}
    data = {"tool": "mesobox matrix", "command": ["sh", "-c", "x & y"], "exec_options": [], "mode": "local",
            "job": None, "timeout": None, "host": "h", "started": "then", "mesobox_version": "0", "passed": 0,
            "results": [result]}
    first = report.matrix_html(data)
    assert first == report.matrix_html(json.loads(json.dumps(data)))
    assert "<script" not in first and "<img" not in first and "&lt;script&gt;" in first
    _self_contained(first)
    # On the terminal, a test's output cannot send escape sequences.
    table = report.matrix_table([result])
    assert "\x1b" not in table and "\x07" not in table and "?]0;retitled??[2J" in table


# --- the reports in a browser ---------------------------------------------------------


def _chromium(user: User, world_tmp: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Headless Chromium as the ordinary user (its own sandbox: no --no-sandbox), a fresh profile."""
    need_tool("chromium")
    profile = world_tmp / "chromium-home"
    profile.mkdir(exist_ok=True)
    os.chown(profile, user.uid, user.gid)
    return user.run(["chromium", "--headless", "--disable-gpu", "--no-first-run", "--hide-scrollbars", *args],
                    env={"HOME": str(profile)}, timeout=120)


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes): a PNG decoded with zlib and the five filters."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def _colours(path: Path) -> dict[tuple[int, ...], int]:
    width, _, rows = _png_pixels(path)
    bpp = len(rows[0]) // width
    counts: dict[tuple[int, ...], int] = {}
    for row in rows:
        for x in range(0, len(row), bpp):
            pixel = tuple(row[x:x + 3])
            counts[pixel] = counts.get(pixel, 0) + 1
    return counts


def test_png_decoder_sees_a_uniform_image(tmp_path: Path) -> None:
    """The check below can fail: a one-colour PNG decodes to one colour."""
    width, height = 7, 3
    raw = b"".join(b"\x00" + b"\xff\xff\xff" * width for _ in range(height))
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(  # noqa: E731
        ">I", zlib.crc32(kind + body))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    (tmp_path / "white.png").write_bytes(png)
    assert _colours(tmp_path / "white.png") == {(255, 255, 255): width * height}


@pytest.mark.slow
def test_reports_render_in_headless_chromium(images: tuple[Path, Path, Path], mesobox: Mesobox, user: User,
                                             world_tmp: Path) -> None:
    marked, sqfs, bare = images
    bench_html, matrix_html = world_tmp / "bench.html", world_tmp / "matrix.html"
    proc = mesobox("bench", "-n", "6", "--warmup", "0", "--html", str(bench_html), str(marked), "--", "true",
                   as_user=user, cwd=world_tmp)
    assert proc.returncode == 0, proc.stderr.decode()
    proc = mesobox("matrix", "--html", str(matrix_html), str(marked), str(sqfs), str(bare), "--", "cat", MARKER,
                   as_user=user, cwd=world_tmp)
    assert proc.returncode == 1, proc.stderr.decode()

    dom = _chromium(user, world_tmp, "--dump-dom", f"file://{bench_html}")
    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    text = dom.stdout.decode()
    assert '<svg class="plot runs"' in text and '<svg class="plot box"' in text
    assert text.count('class="run container"') == 6 == text.count('class="run host"')
    assert text.count('class="dot container"') == 6

    for page, plot_colours in ((bench_html, (CONTAINER_RGB, HOST_RGB)), (matrix_html, ((0x2E, 0x8B, 0x57),))):
        shot = world_tmp / (page.stem + ".png")
        proc = _chromium(user, world_tmp, f"--screenshot={shot}", "--window-size=800,900", f"file://{page}")
        assert proc.returncode == 0 and shot.exists(), proc.stderr.decode()[-2000:]
        colours = _colours(shot)
        assert len(colours) > 50, f"{shot}: {len(colours)} colours"  # text, tables, a plot: not a blank page
        for rgb in plot_colours:  # the plot's own colours, in solid fills
            assert colours.get(rgb, 0) > 30, (shot, rgb, colours.get(rgb, 0))


# --- Slurm ----------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_matrix_as_a_slurm_job_array(slurm_cluster: Path, mpi_image: MpiImage, images: tuple[Path, Path, Path],
                                     mesobox: Mesobox, user: User, world_tmp: Path) -> None:
    bare = images[2]
    command = ("sh", "-c", "echo task=$SLURM_ARRAY_TASK_ID; cat /etc/mesobox-mpi-image")
    proc = mesobox("matrix", "--slurm", "--sbatch-arg=--time=5", "--json", "-", str(mpi_image.squashfs),
                   str(mpi_image.rootfs), str(bare), "--", *command, as_user=user, cwd=world_tmp, timeout=300)
    assert proc.returncode == 1, proc.stderr.decode()
    assert "submitted job array" in proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert data["mode"] == "slurm job array" and data["job"].isdigit()
    results = data["results"]
    assert [r["status"] for r in results] == ["pass", "pass", "fail"], results
    for index, result in enumerate(results[:2]):
        assert result["output"] == [f"task={index}", mpi_image.marker]
        assert result["host"] in ("n1", "n2") and result["job"] == data["job"]
    assert results[2]["exit_code"] == 1 and results[2]["output"][0] == "task=2"
    # The results directory was the user's, under the working directory, and is gone.
    assert not [p for p in world_tmp.iterdir() if p.name.startswith(".mesobox-matrix-")]
