"""`riprap demo --report out.html`: the demo's story as one self-contained page.

Inline SVG plots (no JavaScript, no network, nothing fetched from a CDN): checkout success
rate and p99 latency per second, with and without riprap, the chaos steps marked.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

from sidecar.demo.chaos import Step
from sidecar.demo.stats import Call, Mechanisms, fmt_ms, fmt_pct, per_second
from sidecar.demo.summary import explain

COLOURS = {"riprap": "#1f77b4", "baseline": "#d62728"}
LABELS = {"riprap": "with riprap", "baseline": "without riprap"}
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 860, 260, 56, 16, 34, 34


def _plot(title: str, unit: str, series: dict[str, list[tuple[float, float | None]]],
          duration: float, steps: Sequence[Step], y_max: float, y_min: float = 0.0) -> str:
    iw, ih = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def x(t: float) -> float:
        return PAD_L + iw * min(max(t / duration, 0.0), 1.0)

    def y(v: float) -> float:
        v = min(max(v, y_min), y_max)
        return PAD_T + ih * (1 - (v - y_min) / (y_max - y_min or 1))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{PAD_L}" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>',
           f'<rect x="{PAD_L}" y="{PAD_T}" width="{iw}" height="{ih}" fill="none" stroke="#999"/>']
    for i in range(5):
        v = y_min + (y_max - y_min) * i / 4
        out.append(f'<line x1="{PAD_L}" x2="{PAD_L + iw}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                   'stroke="#eee"/>')
        out.append(f'<text x="{PAD_L - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end">'
                   f'{v:.0f}{unit}</text>')
    for t in range(0, int(duration) + 1, max(1, int(duration // 10) or 1)):
        out.append(f'<text x="{x(t):.1f}" y="{H - 16}" font-size="11" text-anchor="middle">'
                   f'{t}s</text>')
    for i, s in enumerate(steps):
        out.append(f'<line x1="{x(s.at):.1f}" x2="{x(s.at):.1f}" y1="{PAD_T}" '
                   f'y2="{PAD_T + ih}" stroke="#8a2be2" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{x(s.at) + 3:.1f}" y="{PAD_T + 12}" font-size="11" fill="#8a2be2">'
                   f'{i + 1}</text>')
    for target, pts in series.items():
        path, pen = [], "M"
        for at, val in pts:
            if val is None:
                pen = "M"
                continue
            path.append(f"{pen}{x(at + 0.5):.1f},{y(val):.1f}")
            pen = "L"
        out.append(f'<path d="{" ".join(path)}" fill="none" stroke="{COLOURS[target]}" '
                   'stroke-width="2"/>')
    lx = PAD_L + iw - 250
    for i, target in enumerate(series):
        out.append(f'<rect x="{lx + i * 130}" y="8" width="12" height="4" '
                   f'fill="{COLOURS[target]}"/>')
        out.append(f'<text x="{lx + i * 130 + 16}" y="14" font-size="11">{LABELS[target]}</text>')
    out.append("</svg>")
    return "\n".join(out)


def write(path: str, calls: Sequence[Call], steps: Sequence[Step], duration: float,
          doc: dict[str, Any]) -> None:
    succ = {t: [(s, v) for s, v, _ in per_second(calls, t, duration)] for t in COLOURS}
    p99 = {t: [(s, v) for s, _, v in per_second(calls, t, duration)] for t in COLOURS}
    top = max([v for pts in p99.values() for _, v in pts if v is not None] or [100.0])
    rp, bl = doc["targets"]["riprap"], doc["targets"]["baseline"]
    rows = "".join(
        f"<tr><td>{html.escape(r['phase'])}</td><td>{fmt_pct(r['riprap']['success'])}</td>"
        f"<td>{fmt_ms(r['riprap']['p99_ms'])}</td><td>{fmt_pct(r['baseline']['success'])}</td>"
        f"<td>{fmt_ms(r['baseline']['p99_ms'])}</td></tr>" for r in doc["phases"])
    steps_list = "".join(f"<li>at {s.at:.1f} s: <b>{html.escape(s.title)}</b> — "
                         f"{html.escape(s.saves)}</li>" for s in steps)
    words = "".join(f"<li>{html.escape(line.strip())}</li>"
                    for line in explain(Mechanisms(**doc["mechanisms"]), doc, [])
                    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>riprap demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 900px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
</style></head><body>
<h1>riprap demo: the checkout under fire</h1>
<p>{duration:.0f} s of steady checkout traffic, the same orders sent to a checkout that calls its
dependencies through riprap and to one that calls the replicas directly, while the chaos
schedule breaks things.</p>
<p>The live view of the same run is the sidecar's dashboard, <a href="{html.escape(str(doc.get('dashboard', '')))}">{html.escape(str(doc.get('dashboard', '')))}</a>,
up while the demo runs (and after it, with <code>riprap demo --dashboard</code>, until Ctrl-C).</p>
<table><tr><th></th><th>with riprap</th><th>without riprap</th></tr>
<tr><td>checkout success</td><td>{fmt_pct(rp['success'])}</td><td>{fmt_pct(bl['success'])}</td></tr>
<tr><td>calls ok / sent</td><td>{rp['ok']} / {rp['calls']}</td><td>{bl['ok']} / {bl['calls']}</td></tr>
<tr><td>p50</td><td>{fmt_ms(rp['p50_ms'])}</td><td>{fmt_ms(bl['p50_ms'])}</td></tr>
<tr><td>p99</td><td>{fmt_ms(rp['p99_ms'])}</td><td>{fmt_ms(bl['p99_ms'])}</td></tr></table>
{_plot("checkout success rate per second", "%", succ, duration, steps, 100.0)}
{_plot("checkout p99 latency per second", "ms", p99, duration, steps, max(50.0, top * 1.1))}
<h2>Chaos steps</h2><ol>{steps_list}</ol>
<h2>Per step</h2>
<table><tr><th>step</th><th>with riprap</th><th>p99</th><th>without riprap</th><th>p99</th></tr>
{rows}</table>
<h2>What saved the calls</h2><ul>{words}</ul>
</body></html>
"""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
