"""Reports of ``mesobox matrix`` and ``mesobox bench``: terminal tables and one HTML page.

An HTML report is one self-contained file: inline CSS, inline SVG drawn here by hand
(no script, no font, no image, nothing fetched), so it can be mailed, attached to a
ticket or opened on a node without a network.  Every text that came from outside
(image names, commands, a test's output) goes through ``html.escape``.  The same data
always gives the same bytes: numbers are written with fixed precision, nothing reads
the clock, and the strip plot's jitter is a fixed sequence, not a random one.
"""

from __future__ import annotations

from html import escape

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

COLOURS = {"container": "#d95f02", "host": "#1b76b3", "pass": "#2e8b57", "fail": "#c0392b",
           "timeout": "#b9770e", "error": "#7f8c8d"}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:2em auto;max-width:1000px;
color:#222;background:#fff;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}th,td{padding:.3em .7em;border-bottom:1px solid #e4e4e4;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:.9em}
pre{background:#f7f7f7;padding:.5em;margin:.3em 0;overflow-x:auto;white-space:pre-wrap}
.badge{display:inline-block;padding:.1em .6em;border-radius:.8em;color:#fff;font-weight:600;font-size:.9em}
.summary{font-size:1.1em;margin:.4em 0 1em}.muted{color:#666}
svg{display:block;margin:.6em 0;max-width:100%;height:auto}svg text{font-size:12px;fill:#333}
"""


def seconds_text(value: float | None) -> str:
    """A duration as people read it: ms below a second."""
    if value is None:
        return "-"
    return f"{value * 1000:.2f} ms" if value < 1 else f"{value:.3f} s"


def _page(title: str, body: list[str]) -> str:
    head = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f'<meta name="generator" content="mesobox">\n<style>{CSS}</style>\n</head>\n<body>\n')
    return head + "\n".join(body) + "\n</body>\n</html>\n"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are HTML already (escaped by the caller)."""
    out = ["<table>"]
    if any(headers):
        out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>")
    for row in rows:
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _badge(status: str) -> str:
    colour = COLOURS.get(status, COLOURS["error"])
    return f'<span class="badge" style="background:{colour}">{escape(status)}</span>'


def _num(value: float) -> str:
    """SVG coordinates: two decimals, always the same text for the same value."""
    return f"{value:.2f}"


def _ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``top``."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    power = 10.0 ** _floor_log10(raw)
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    ticks, value = [], 0.0
    while value < top + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < top:
        ticks.append(round(value, 12))
    return ticks


def _floor_log10(value: float) -> int:
    exponent = 0
    while value >= 10:
        value /= 10
        exponent += 1
    while value < 1:
        value *= 10
        exponent -= 1
    return exponent


def _tick_text(value: float, top: float) -> str:
    """Tick labels in ms below a second, in s above."""
    if top < 1:
        ms = value * 1000
        return f"{ms:.0f}" if top >= 0.05 else f"{ms:.1f}" if top >= 0.005 else f"{ms:.2f}"
    return f"{value:.1f}" if top < 10 else f"{value:.0f}"


# --- mesobox matrix -------------------------------------------------------------------


def _printable(text: str) -> str:
    """A test's output on the user's terminal: control characters (escape sequences that
    would move the cursor or retitle the window) shown as ``?``."""
    return "".join(c if c.isprintable() or c == "\t" else "?" for c in text)


def matrix_table(results: Sequence[dict[str, Any]], width: int = 100) -> str:
    """The terminal table: one row per image, then the first lines of each failure."""
    name_w = min(max([len(r["image"]) for r in results] + [5]), 64)
    lines = [f"{'IMAGE':<{name_w}}  {'RESULT':<7}  {'EXIT':>4}  {'TIME':>10}  OUTPUT"]
    for r in results:
        image = r["image"] if len(r["image"]) <= name_w else "…" + r["image"][-(name_w - 1):]
        code = "-" if r["exit_code"] is None else str(r["exit_code"])
        first = r["output"][0] if r["output"] else ""
        row = f"{image:<{name_w}}  {r['status']:<7}  {code:>4}  {seconds_text(r['seconds']):>10}  "
        lines.append((row + _printable(first))[:max(width, len(row) + 20)].rstrip())
    for r in results:
        if r["status"] != "pass" and r["output"]:
            lines.append("")
            lines.append(f"--- {r['image']} ({r['status']}"
                         + (f", exit {r['exit_code']}" if r["exit_code"] is not None else "") + ")")
            lines += [f"    {_printable(line)}" for line in r["output"]]
            if r["output_truncated"]:
                lines.append("    …")
    counts = {s: sum(1 for r in results if r["status"] == s) for s in ("pass", "fail", "timeout", "error")}
    lines += ["", ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" ({len(results)} images)"]
    return "\n".join(lines) + "\n"


def _matrix_svg(results: Sequence[dict[str, Any]]) -> str:
    """Wall time per image, a bar each, coloured by result."""
    left, right, row_h, top_pad = 230, 30, 26, 10
    width = 760
    plot_w = width - left - right
    height = top_pad + row_h * len(results) + 40
    top = max([r["seconds"] for r in results] + [1e-3])
    ticks = _ticks(top)
    scale = plot_w / ticks[-1]
    out = [f'<svg class="plot matrix-times" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="wall time per image">']
    base_y = top_pad + row_h * len(results)
    for t in ticks:
        x = left + t * scale
        out.append(f'<line x1="{_num(x)}" y1="{top_pad}" x2="{_num(x)}" y2="{base_y}" stroke="#e2e2e2"/>')
        out.append(f'<text x="{_num(x)}" y="{base_y + 16}" text-anchor="middle">{_tick_text(t, ticks[-1])}</text>')
    unit = "ms" if ticks[-1] < 1 else "s"
    out.append(f'<text x="{left + plot_w / 2:.2f}" y="{base_y + 34}" text-anchor="middle">wall time ({unit})</text>')
    for i, r in enumerate(results):
        y = top_pad + i * row_h
        label = r["image"] if len(r["image"]) <= 34 else "…" + r["image"][-33:]
        out.append(f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">{escape(label)}</text>')
        colour = COLOURS.get(r["status"], COLOURS["error"])
        w = max(r["seconds"] * scale, 1.0)
        out.append(f'<rect class="bar {escape(r["status"])}" x="{left}" y="{y + 4}" width="{_num(w)}" '
                   f'height="{row_h - 8}" fill="{colour}" data-seconds="{r["seconds"]:.6f}">'
                   f'<title>{escape(r["image"])}: {r["status"]}, {seconds_text(r["seconds"])}</title></rect>')
    out.append(f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{base_y}" stroke="#555"/>')
    out.append("</svg>")
    return "\n".join(out)


def matrix_html(data: dict[str, Any]) -> str:
    results = data["results"]
    passed = sum(1 for r in results if r["status"] == "pass")
    title = f"mesobox matrix: {passed}/{len(results)} passed"
    body = [f"<h1>{escape(title)}</h1>",
            f'<p class="summary">Command: <code>{escape(_command_text(data["command"]))}</code></p>',
            _table(["", ""], [
                ["where", escape(data["mode"] + (f", job {data['job']}" if data.get("job") else ""))],
                ["submitted from", escape(data["host"])],
                ["started", escape(data["started"])],
                ["exec options", f"<code>{escape(_command_text(data['exec_options']))}</code>"
                 if data["exec_options"] else "none"],
                ["timeout", seconds_text(data["timeout"]) if data["timeout"] else "none"],
                ["mesobox", escape(data["mesobox_version"])],
            ]),
            "<h2>Results</h2>"]
    rows = []
    for r in results:
        digest = r.get("digest")
        code = "-" if r["exit_code"] is None else str(r["exit_code"]) + (f" ({r['signal']})" if r.get("signal") else "")
        rows.append([f"<code>{escape(r['image'])}</code>", _badge(r["status"]), escape(code),
                     seconds_text(r["seconds"]),
                     f'<code title="{escape(digest)}">{escape(digest[:19])}</code>' if digest else "-",
                     escape(r.get("host") or "-")])
    body.append(_table(["image", "result", "exit", "time", "digest", "ran on"], rows, numeric=(3,)))
    body += ["<h2>Wall time</h2>", _matrix_svg(results), "<h2>Output (first lines)</h2>"]
    for r in results:
        text = "\n".join(r["output"]) + ("\n…" if r["output_truncated"] else "")
        body.append(f"<details{' open' if r['status'] != 'pass' else ''}><summary><code>{escape(r['image'])}</code> "
                    f"{_badge(r['status'])}</summary><pre>{escape(text) or '(no output)'}</pre></details>")
    return _page(title, body)


def _command_text(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(argv)


# --- mesobox bench --------------------------------------------------------------------

SIDES = ("container", "host")


def bench_table(data: dict[str, Any]) -> str:
    """The terminal comparison: one row per side, then the ratio."""
    level = data["container"]["summary"]["ci_level"]
    ci_head = f"{level * 100:.1f}% CI of median"
    lines = [f"{'':<10} {'runs':>4} {'min':>10} {'median':>10} {'MAD':>10}  {ci_head:<23} {'max':>10}"]
    for side in SIDES:
        s = data[side]["summary"]
        ci = f"{seconds_text(s['ci_low'])} - {seconds_text(s['ci_high'])}"
        lines.append(f"{side:<10} {s['n']:>4} {seconds_text(s['min']):>10} {seconds_text(s['median']):>10} "
                     f"{seconds_text(s['mad']):>10}  {ci:<23} {seconds_text(s['max']):>10}")
    lines.append("")
    lines.append(f"container / host: {_ratio(data['ratio_median'])} (medians), {_ratio(data['ratio_min'])} (minimums)")
    env = data["environment"]
    lines.append(f"{env['cpu_model']}, {env['cpus']} CPUs, governor {env['governor']}; {env['kernel'].split()[1]}")
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _runs_svg(data: dict[str, Any]) -> str:
    """Per-run wall time of both sides, run by run (the order they were measured in)."""
    width, height, left, right, top_pad, bottom = 760, 300, 64, 120, 14, 46
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    n = max(len(data[side]["samples"]) for side in SIDES)
    top = max(max(data[side]["samples"]) for side in SIDES)
    ticks = _ticks(top)

    def y_of(value: float) -> float:
        return top_pad + plot_h - value / ticks[-1] * plot_h

    def x_of(index: int) -> float:
        return left + (plot_w / 2 if n == 1 else index * plot_w / (n - 1))

    out = [f'<svg class="plot runs" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="wall time of each run">']
    for t in ticks:
        y = y_of(t)
        out.append(f'<line x1="{left}" y1="{_num(y)}" x2="{left + plot_w}" y2="{_num(y)}" stroke="#e2e2e2"/>')
        out.append(f'<text x="{left - 6}" y="{_num(y + 4)}" text-anchor="end">{_tick_text(t, ticks[-1])}</text>')
    unit = "ms" if ticks[-1] < 1 else "s"
    out.append(f'<text x="16" y="{top_pad + plot_h / 2:.2f}" text-anchor="middle" '
               f'transform="rotate(-90 16 {top_pad + plot_h / 2:.2f})">wall time ({unit})</text>')
    step = max(1, n // 10)
    for i in range(0, n, step):
        out.append(f'<text x="{_num(x_of(i))}" y="{top_pad + plot_h + 16}" text-anchor="middle">{i + 1}</text>')
    out.append(f'<text x="{left + plot_w / 2:.2f}" y="{height - 8}" text-anchor="middle">run</text>')
    for k, side in enumerate(SIDES):
        colour = COLOURS[side]
        samples = data[side]["samples"]
        points = " ".join(f"{_num(x_of(i))},{_num(y_of(v))}" for i, v in enumerate(samples))
        out.append(f'<polyline class="series {side}" fill="none" stroke="{colour}" stroke-width="1.5" '
                   f'stroke-opacity="0.6" points="{points}"/>')
        for i, v in enumerate(samples):
            out.append(f'<circle class="run {side}" cx="{_num(x_of(i))}" cy="{_num(y_of(v))}" r="3.5" '
                       f'fill="{colour}" data-run="{i + 1}" data-seconds="{v:.9f}">'
                       f'<title>{side}, run {i + 1}: {seconds_text(v)}</title></circle>')
        ly = top_pad + 10 + 20 * k
        out.append(f'<circle cx="{left + plot_w + 18}" cy="{ly}" r="5" fill="{colour}"/>')
        out.append(f'<text x="{left + plot_w + 28}" y="{ly + 4}">{side}</text>')
    out.append(f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" stroke="#555"/>')
    out.append(f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" '
               'stroke="#555"/>')
    out.append("</svg>")
    return "\n".join(out)


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """Q1 and Q3 by linear interpolation between order statistics (Hyndman-Fan 7)."""
    ordered = sorted(values)

    def at(p: float) -> float:
        pos = p * (len(ordered) - 1)
        low = int(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return at(0.25), at(0.75)


def _box_svg(data: dict[str, Any]) -> str:
    """Box and strip plot, one row per side: the box spans the quartiles, the thick
    line is the median, the band its confidence interval, whiskers min to max, and
    every run a dot (spread vertically by a fixed sequence, not at random)."""
    width, left, right, row_h, top_pad = 760, 90, 30, 70, 10
    plot_w = width - left - right
    height = top_pad + row_h * 2 + 44
    top = max(max(data[side]["samples"]) for side in SIDES)
    ticks = _ticks(top)

    def x_of(value: float) -> float:
        return left + value / ticks[-1] * plot_w

    base_y = top_pad + row_h * 2
    out = [f'<svg class="plot box" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="distribution of run times">']
    for t in ticks:
        x = x_of(t)
        out.append(f'<line x1="{_num(x)}" y1="{top_pad}" x2="{_num(x)}" y2="{base_y}" stroke="#e2e2e2"/>')
        out.append(f'<text x="{_num(x)}" y="{base_y + 16}" text-anchor="middle">{_tick_text(t, ticks[-1])}</text>')
    unit = "ms" if ticks[-1] < 1 else "s"
    out.append(f'<text x="{left + plot_w / 2:.2f}" y="{base_y + 36}" text-anchor="middle">wall time ({unit})</text>')
    for k, side in enumerate(SIDES):
        colour = COLOURS[side]
        samples = data[side]["samples"]
        s = data[side]["summary"]
        mid = top_pad + row_h * k + row_h / 2
        q1, q3 = quartiles(samples)
        out.append(f'<text x="{left - 8}" y="{_num(mid + 4)}" text-anchor="end">{side}</text>')
        out.append(f'<line x1="{_num(x_of(s["min"]))}" y1="{_num(mid)}" x2="{_num(x_of(s["max"]))}" '
                   f'y2="{_num(mid)}" stroke="{colour}"/>')
        out.append(f'<rect class="ci {side}" x="{_num(x_of(s["ci_low"]))}" y="{_num(mid - 20)}" '
                   f'width="{_num(max(x_of(s["ci_high"]) - x_of(s["ci_low"]), 1))}" height="40" fill="{colour}" '
                   f'fill-opacity="0.15"/>')
        out.append(f'<rect class="quartiles {side}" x="{_num(x_of(q1))}" y="{_num(mid - 14)}" '
                   f'width="{_num(max(x_of(q3) - x_of(q1), 1))}" height="28" fill="none" stroke="{colour}" '
                   f'stroke-width="1.5"/>')
        out.append(f'<line class="median {side}" x1="{_num(x_of(s["median"]))}" y1="{_num(mid - 18)}" '
                   f'x2="{_num(x_of(s["median"]))}" y2="{_num(mid + 18)}" stroke="{colour}" stroke-width="3"/>')
        for i, v in enumerate(samples):
            jitter = ((i * 0.618033988749895) % 1 - 0.5) * 22
            out.append(f'<circle class="dot {side}" cx="{_num(x_of(v))}" cy="{_num(mid + jitter)}" r="2.5" '
                       f'fill="{colour}" fill-opacity="0.7" data-seconds="{v:.9f}"/>')
    out.append(f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{base_y}" stroke="#555"/>')
    out.append("</svg>")
    return "\n".join(out)


def bench_html(data: dict[str, Any]) -> str:
    env = data["environment"]
    ratio = _ratio(data["ratio_median"])
    rounds = f"{data['warmup']} warm-up round" + ("" if data["warmup"] == 1 else "s")
    title = f"mesobox bench: container / host = {ratio}"
    image = env["image"]
    level = data["container"]["summary"]["ci_level"]
    stats_rows = []
    for side in SIDES:
        s = data[side]["summary"]
        stats_rows.append([f'<span style="color:{COLOURS[side]};font-weight:600">{side}</span>', str(s["n"]),
                           seconds_text(s["min"]), seconds_text(s["median"]), seconds_text(s["mad"]),
                           f"{seconds_text(s['ci_low'])} to {seconds_text(s['ci_high'])}", seconds_text(s["max"])])
    binds = "<br>".join(f"<code>{escape(b['source'])}</code> → <code>{escape(b['destination'])}</code>"
                        + (" (ro)" if b.get("read_only") else "") for b in env["binds"]) or "none"
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="summary">Command: <code>{escape(_command_text(data["command"]))}</code> — '
        f'{data["runs"]} runs per side after {rounds}, interleaved, the side that runs '
        f"first alternating.  Ratio of the medians <b>{ratio}</b>, of the minimums {_ratio(data['ratio_min'])}.</p>",
        "<h2>Statistics</h2>",
        _table(["", "runs", "min", "median", "MAD", f"{level * 100:.1f}% CI of the median", "max"], stats_rows,
               numeric=(1, 2, 3, 4, 6)),
        '<p class="muted">MAD: median absolute deviation, unscaled.  Confidence interval: order statistics of the '
        "median (binomial, distribution-free); its level is the exact coverage for this number of runs.  The "
        "container's time includes mesobox's start-up.</p>",
        "<h2>Every run</h2>", _runs_svg(data),
        "<h2>Distribution</h2>", _box_svg(data),
        '<p class="muted">Box: quartiles; thick line: median; shaded band: its confidence interval; whiskers: '
        "minimum to maximum; dots: the runs.</p>",
        "<h2>Environment</h2>",
        _table(["", ""], [
            ["image", f"<code>{escape(image['name'])}</code> ({escape(image['kind'])})"],
            ["digest", f"<code>{escape(image['digest'])}</code>" if image.get("digest") else "-"],
            ["binds", binds],
            ["exec options", f"<code>{escape(_command_text(image['exec_options']))}</code>"
             if image.get("exec_options") else "none"],
            ["host", escape(env["host"])],
            ["kernel", escape(env["kernel"])],
            ["CPU", f"{escape(env['cpu_model'])} ({env['cpus']} CPUs, {escape(env['machine'])})"],
            ["governor", escape(env["governor"])],
            ["mesobox", escape(env["mesobox_version"]) + f", Python {escape(env['python'])}"],
        ]),
    ]
    return _page(title, body)
