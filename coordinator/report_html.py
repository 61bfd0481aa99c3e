"""``report.html``: one self-contained page per run (inline CSS and SVG, no script, no network).

Reads ``summary.json`` from the run directory: a table of every step, and for the
``layers`` step the per-layer error curves (forward and backward, log scale, tolerance
line, first divergence marked), the replay verdict with the usual causes, the layer rows
and the unmapped modules.
"""

from __future__ import annotations

import html
import re
import json
import math
from pathlib import Path
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#1d2330;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.meta{color:#5b6577;font-size:13px}
table{border-collapse:collapse;width:100%;font-size:13px;margin:6px 0}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceff4;vertical-align:top}
th{background:#f5f7fa;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.pass{color:#137333;font-weight:600} .fail{color:#c5221f;font-weight:600} .other{color:#8a6d00;font-weight:600}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.badge.pass{background:#e6f4ea} .badge.fail{background:#fce8e6} .badge.other{background:#fef7e0}
.box{border:1px solid #f3b7b2;background:#fffafa;border-radius:6px;padding:10px 14px;margin:10px 0}
.box.ok{border-color:#b7dfc1;background:#f7fcf8}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f3f4f7;padding:1px 4px;border-radius:3px}
svg{background:#fff;border:1px solid #e3e7ee;border-radius:6px}
details{margin:6px 0} summary{cursor:pointer;color:#1a56b0}
tr.bad td{background:#fff3f2}
"""

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 1100, 300, 62, 16, 18, 40


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _e(x: Any) -> str:
    """Escaped for HTML, without terminal colour codes or control bytes (worker logs carry them)."""
    return html.escape(_ANSI.sub("", "" if x is None else str(x)))


def _mod(name: Any) -> Any:
    """A module name as the terminal shows it: the model itself (name "") is ``<model>``."""
    from .layerdiff import ROOT_NAME
    return ROOT_NAME if name == "" else name


def _num(x: Any, fmt: str = ".3e") -> str:
    if x is None:
        return "-"
    try:
        return format(float(x), fmt)
    except (TypeError, ValueError):
        return _e(x)


def _status_class(status: str) -> str:
    return {"passed": "pass", "aligned": "pass", "failed": "fail", "diverged": "fail", "error": "fail"}.get(
        status, "other")


def curve_svg(rows: list[dict[str, Any]], threshold: float | None, title: str,
              first_key: str | None = None) -> str:
    """Error per compared tensor in execution order, log10 y axis, tolerance as a dashed line."""
    pts = [(i, r) for i, r in enumerate(rows)]
    if not pts:
        return "<p class='meta'>no rows</p>"
    floor = 1e-12
    vals = [max(floor, r["norm_err"]) if r.get("norm_err") is not None else None for _, r in pts]
    finite = [v for v in vals if v is not None]
    lo = math.floor(math.log10(min(finite + ([threshold] if threshold else [])))) if finite else -12
    hi = math.ceil(math.log10(max(finite + ([threshold] if threshold else [])))) if finite else 0
    if hi <= lo:
        hi = lo + 1
    hi = max(hi, (math.log10(threshold) + 1) if threshold else hi)
    n = len(pts)
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def x(i: int) -> float:
        return PAD_L + (pw * (i + 0.5) / n)

    def y(v: float | None) -> float:
        if v is None:                     # non-finite (NaN, shape mismatch): pinned to the top
            return PAD_T
        return PAD_T + ph * (1 - (math.log10(v) - lo) / (hi - lo))

    out = [f"<svg viewBox='0 0 {W} {H}' width='100%' role='img' aria-label='{_e(title)}' "
           f"xmlns='http://www.w3.org/2000/svg'>"]
    for k in range(int(lo), int(hi) + 1):
        yy = y(10.0 ** k)
        out.append(f"<line x1='{PAD_L}' x2='{W - PAD_R}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='#eef1f5'/>")
        out.append(f"<text x='{PAD_L - 6}' y='{yy + 4:.1f}' font-size='11' text-anchor='end' fill='#5b6577'>"
                   f"1e{k}</text>")
    out.append(f"<line x1='{PAD_L}' x2='{PAD_L}' y1='{PAD_T}' y2='{H - PAD_B}' stroke='#9aa3b2'/>")
    out.append(f"<line x1='{PAD_L}' x2='{W - PAD_R}' y1='{H - PAD_B}' y2='{H - PAD_B}' stroke='#9aa3b2'/>")
    out.append(f"<text x='14' y='{PAD_T + ph / 2:.0f}' font-size='11' fill='#5b6577' "
               f"transform='rotate(-90 14 {PAD_T + ph / 2:.0f})' text-anchor='middle'>max|diff| / max|torch|</text>")
    out.append(f"<text x='{PAD_L + pw / 2:.0f}' y='{H - 8}' font-size='11' fill='#5b6577' text-anchor='middle'>"
               f"layer tensors in execution order ({n}); bit-identical tensors sit on the bottom line</text>")
    if threshold:
        ty = y(threshold)
        out.append(f"<line x1='{PAD_L}' x2='{W - PAD_R}' y1='{ty:.1f}' y2='{ty:.1f}' stroke='#c5221f' "
                   f"stroke-dasharray='6 4' stroke-width='1.2'/>")
        out.append(f"<text x='{W - PAD_R - 4}' y='{ty - 5:.1f}' font-size='11' text-anchor='end' fill='#c5221f' "
                   f"paint-order='stroke' stroke='#fff' stroke-width='4'>"
                   f"tolerance {threshold:g}</text>")
    path = " ".join(f"{'M' if j == 0 else 'L'}{x(i):.1f},{y(v):.1f}" for j, ((i, _), v) in enumerate(zip(pts, vals)))
    out.append(f"<path d='{path}' fill='none' stroke='#7a8aa6' stroke-width='1.2'/>")
    for (i, r), v in zip(pts, vals):
        bad = not r.get("passed", True)
        color = "#c5221f" if bad else "#1a73e8"
        label = f"{_mod(r.get('torch'))}{' <' + r['what'] + '>' if r.get('what') in ('input', 'grad') else ''}"
        tip = f"{label} [{r.get('torch_type', '')}] max {_num(r.get('max_abs'))} rel {_num(r.get('norm_err'), '.2e')}"
        out.append(f"<circle cx='{x(i):.1f}' cy='{y(v):.1f}' r='{3.2 if bad else 2.4}' fill='{color}'>"
                   f"<title>{_e(tip)}</title></circle>")
        if first_key is not None and r.get("key") == first_key:
            fx, fy = x(i), y(v)
            out.append(f"<circle cx='{fx:.1f}' cy='{fy:.1f}' r='9' fill='none' stroke='#c5221f' stroke-width='2'/>")
            anchor = "end" if fx > W * 0.6 else "start"
            dx = -12 if anchor == "end" else 12
            out.append(f"<text x='{fx + dx:.1f}' y='{min(fy + 22, H - PAD_B - 6):.1f}' font-size='12' "
                       f"font-weight='600' fill='#c5221f' text-anchor='{anchor}' paint-order='stroke' stroke='#fff' "
                       f"stroke-width='4'>first divergence: {_e(label)}</text>")
    out.append("</svg>")
    return "".join(out)


def worst_label(step: dict[str, Any]) -> str:
    """A step's 'worst' figure with what it is: perf's throughput ratio, data's count of differing
    tensors, layers' relative error with its phase (forward and backward have their own tolerance)."""
    worst = step.get("worst")
    if worst is None:
        return "-"
    name = step.get("name")
    if name == "perf":
        return f"ratio {worst:.2f}"
    if name == "data":
        return f"{int(worst)} differ"
    if name == "layers":
        of = (step.get("details") or {}).get("worst_of") or {}
        phase = {"forward": "fwd", "backward": "bwd"}.get(of.get("phase"), "")
        return f"{phase} rel {worst:.3e}".strip()
    return f"{worst:.3e}"


def _steps_table(data: dict[str, Any]) -> str:
    rows = ["<table><tr><th>step</th><th>verdict</th><th class='num'>worst</th><th>tolerance</th>"
            "<th class='num'>seconds</th><th>message</th></tr>"]
    for s in data.get("steps", []):
        st = s.get("status", "")
        rows.append(f"<tr><td><a href='#step-{_e(s['name'])}'>{_e(s['name'])}</a></td>"
                    f"<td><span class='badge {_status_class(st)}'>{_e(st.upper())}</span></td>"
                    f"<td class='num'>{_e(worst_label(s))}</td><td>{_e(s.get('tolerance'))}</td>"
                    f"<td class='num'>{_num(s.get('seconds'), '.1f')}</td><td>{_e(s.get('message'))}</td></tr>")
    for name, why in (data.get("steps_skipped") or {}).items():   # --steps all on a model they do not fit
        rows.append(f"<tr><td>{_e(name)}</td><td><span class='badge'>SKIPPED</span></td><td class='num'>-</td>"
                    f"<td></td><td class='num'></td><td>{_e(why)}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _diffs_table(step: dict[str, Any]) -> str:
    diffs = step.get("diffs") or []
    if not diffs:
        return ""
    shown = diffs[:200]
    out = [f"<details{' open' if len(diffs) <= 12 else ''}><summary>{len(diffs)} compared tensors</summary><table>"
           "<tr><th>tensor</th><th>shape</th><th class='num'>max abs</th><th class='num'>mean abs</th>"
           "<th>verdict</th><th>reason</th></tr>"]
    for d in shown:
        ok = d.get("passed")
        out.append(f"<tr class='{'' if ok else 'bad'}'><td><code>{_e(d.get('name'))}</code></td>"
                   f"<td>{_e(d.get('shape'))}</td><td class='num'>{_num(d.get('max_abs'))}</td>"
                   f"<td class='num'>{_num(d.get('mean_abs'))}</td>"
                   f"<td class='{'pass' if ok else 'fail'}'>{'pass' if ok else 'FAIL'}</td><td>{_e(d.get('reason'))}</td></tr>")
    if len(diffs) > len(shown):
        out.append(f"<tr><td colspan='6' class='meta'>... {len(diffs) - len(shown)} more in summary.json</td></tr>")
    out.append("</table></details>")
    return "".join(out)


def _first_box(first: dict[str, Any] | None, phase: str) -> str:
    if not first:
        return f"<div class='box ok'><b>{phase}</b>: no divergent layer.</div>"
    iso = first.get("isolation") or {}
    verdict = {"own": "OWN ERROR: the layer itself computes differently",
               "inherited": "inherited: its input (or gradient) was already off",
               "unknown": "not isolated"}.get(iso.get("verdict"), "not isolated")
    parts = [f"<div class='box'><b>{phase}: first divergent layer</b> <code>{_e(_mod(first.get('torch')))}</code>"
             f"{' &lt;' + _e(first.get('what')) + '&gt;' if first.get('what') in ('input', 'grad') else ''}"
             f" [{_e(first.get('torch_type'))}] &harr; <code>{_e(_mod(first.get('paddle')))}</code> "
             f"[{_e(first.get('paddle_type'))}]<br>{_e(first.get('reason'))}"
             f"<br><b>isolated</b>: <span class='{'fail' if iso.get('verdict') == 'own' else 'other'}'>"
             f"{_e(verdict)}</span> &mdash; {_e(iso.get('why'))}"]
    settings = iso.get("settings") or {}
    if settings:   # the two layers' own settings (an epsilon, a flag): often the bug itself
        parts.append("<br><b>settings</b><ul>" + "".join(f"<li>{_e(side)}: <code>{_e(shown)}</code></li>"
                                                         for side, shown in settings.items()) + "</ul>")
    causes = (iso.get("advice") or {}).get("causes") or []
    if causes:
        parts.append("<br><b>usual causes</b><ul>" + "".join(f"<li>{_e(c)}</li>" for c in causes) + "</ul>")
    top = first.get("top") or []
    if top:
        parts.append("<div style='margin-top:8px'><b>largest differences</b></div><table><tr><th>index</th><th class='num'>torch</th>"
                     "<th class='num'>paddle</th><th class='num'>|diff|</th></tr>")
        for t in top:
            parts.append(f"<tr><td>{_e(t.get('index'))}</td><td class='num'>{_num(t.get('ref'), '.6g')}</td>"
                         f"<td class='num'>{_num(t.get('got'), '.6g')}</td><td class='num'>{_num(t.get('abs_diff'))}</td></tr>")
        parts.append("</table>")
    parts.append("</div>")
    return "".join(parts)


def _rows_table(rows: list[dict[str, Any]], phase: str) -> str:
    bad = sum(1 for r in rows if not r.get("passed"))
    out = [f"<details><summary>{len(rows)} {phase} rows ({bad} over tolerance)</summary><table>"
           "<tr><th class='num'>#</th><th>torch</th><th>paddle</th><th>type</th><th>shape</th>"
           "<th class='num'>max abs</th><th class='num'>max|diff|/max|torch|</th><th>verdict</th></tr>"]
    for i, r in enumerate(rows, 1):
        ok = r.get("passed")
        tag = f" &lt;{_e(r['what'])}&gt;" if r.get("what") in ("input", "grad") else ""
        out.append(f"<tr class='{'' if ok else 'bad'}'><td class='num'>{i}</td><td><code>{_e(_mod(r.get('torch')))}</code>{tag}"
                   f"</td><td><code>{_e(_mod(r.get('paddle')))}</code></td><td>{_e(r.get('torch_type'))}</td>"
                   f"<td>{_e(r.get('shape'))}</td><td class='num'>{_num(r.get('max_abs'))}</td>"
                   f"<td class='num'>{_num(r.get('norm_err'), '.2e')}</td>"
                   f"<td class='{'pass' if ok else 'fail'}'>{'pass' if ok else 'FAIL ' + _e(r.get('reason'))}</td></tr>")
    out.append("</table></details>")
    return "".join(out)


def _threshold(desc: str | None) -> float | None:
    try:
        return float(str(desc).rsplit("<=", 1)[1])
    except (IndexError, ValueError):
        return None


def _session_list(step: dict[str, Any]) -> str:
    """The commands of a `coordinator debug` session, with the verdict of each replay."""
    log = (step.get("details") or {}).get("session") or []
    if not log:
        return "<h3>session</h3><p class='meta'>no commands were given</p>"
    items = []
    for e in log:
        rep = e.get("replay") or {}
        extra = f" &rarr; {_e(rep.get('verdict'))}: {_e(rep.get('why'))}" if rep else ""
        items.append(f"<li><code>{_e(e.get('command'))}</code> at <code>{_e(_mod(e.get('row')))}</code>{extra}</li>")
    return f"<h3>session: {len(log)} command(s)</h3><ol>{''.join(items)}</ol>"


def _layers_section(step: dict[str, Any]) -> str:
    d = step.get("details") or {}
    tol = d.get("tolerance") or {}
    out = []
    for phase in ("forward", "backward"):
        ph = d.get(phase) or {}
        if ph.get("skipped"):
            out.append(f"<h3>{phase}</h3><p class='meta'>skipped: {_e(ph['skipped'])}</p>")
            continue
        rows = ph.get("rows") or []
        if not rows and not ph:
            continue
        first = ph.get("first")
        stats = ph.get("stats") or {}
        out.append(f"<h3>{phase}: {len(rows)} tensors compared, {ph.get('failed', 0)} over tolerance "
                   f"({_e(tol.get(phase))})</h3>")
        out.append(curve_svg(rows, _threshold(tol.get(phase)), f"{phase} layer error",
                             first.get("key") if first else None))
        out.append(_first_box(first, phase))
        if "own_errors" in ph:   # layers_isolate=all: every later divergent row was replayed
            errs = ph["own_errors"]
            items = "".join(f"<li><code>{_e(_mod(e.get('label')))}</code> [{_e((e.get('row') or {}).get('torch_type'))}]"
                            f" &mdash; {_e((e.get('isolation') or {}).get('why'))}</li>" for e in errs)
            out.append(f"<div class='box'><b>{phase}: own errors after the first</b> (every divergent row "
                       f"replayed): {len(errs) or 'none'}" + (f"<ul>{items}</ul>" if errs else "") + "</div>")
        ws, hs = stats.get("worker_seconds") or {}, stats.get("hook_seconds") or {}
        if ws:
            out.append(f"<p class='meta'>worker time torch {_num(ws.get('torch'), '.2f')} s (hooks "
                       f"{_num(hs.get('torch'), '.2f')} s), paddle {_num(ws.get('paddle'), '.2f')} s (hooks "
                       f"{_num(hs.get('paddle'), '.2f')} s); coordinator held at most "
                       f"{(stats.get('held_peak_bytes') or 0) / 2**20:.1f} MiB, spilled "
                       f"{(stats.get('spilled_bytes') or 0) / 2**20:.1f} MiB</p>")
        out.append(_rows_table(rows, phase))
    m = d.get("map") or {}
    un = m.get("unmapped") or []
    out.append(f"<h3>layer map: {m.get('n_pairs', 0)} pairs, unmapped torch {(m.get('n_unmapped') or {}).get('torch', 0)}"
               f", paddle {(m.get('n_unmapped') or {}).get('paddle', 0)}</h3>")
    if un:
        out.append("<details><summary>unmapped modules (not compared)</summary><table><tr><th>side</th><th>module</th>"
                   "<th>type</th><th class='num'>count</th><th>why</th></tr>")
        for u in un:
            out.append(f"<tr><td>{_e(u.get('side'))}</td><td><code>{_e(u.get('name'))}</code></td>"
                       f"<td>{_e(u.get('type'))}</td><td class='num'>{_e(u.get('count'))}</td><td>{_e(u.get('reason'))}</td></tr>")
        out.append("</table></details>")
    pairs = m.get("pairs") or []
    if pairs:
        out.append("<details><summary>layer pairs</summary><table><tr><th>torch</th><th>paddle</th><th>how</th></tr>")
        for p in pairs:
            out.append(f"<tr><td><code>{_e(p.get('torch'))}</code></td><td><code>{_e(p.get('paddle'))}</code></td>"
                       f"<td>{_e(p.get('how'))}</td></tr>")
        out.append("</table></details>")
    return "".join(out)


def render(data: dict[str, Any]) -> str:
    st = data.get("status", "?")
    opts = data.get("options") or {}
    workers = data.get("workers") or {}
    wtxt = "; ".join(f"{_e(n)}: {_e(w.get('framework'))} {_e(w.get('framework_version'))} on {_e(w.get('device'))}"
                     for n, w in workers.items())
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>lockstep report: {_e(st)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>lockstep report <span class='badge {_status_class(st)}'>{_e(st.upper())}</span></h1>",
             f"<div class='meta'>started {_e(data.get('started'))}, finished {_e(data.get('finished'))}; "
             f"exit {_e(data.get('exit_code'))}; {wtxt}</div>",
             f"<div class='meta'>run directory {_e(opts.get('out'))}; steps {_e(', '.join(data.get('steps_requested') or []))}"
             f"; schedule {_e((data.get('schedule') or {}).get('mode'))}</div>"]
    if data.get("error"):
        parts.append(f"<div class='box'><b>error</b>: {_e(data['error'])}</div>")
    parts.append("<h2>steps</h2>" + _steps_table(data))
    for s in data.get("steps", []):
        parts.append(f"<h2 id='step-{_e(s['name'])}'>{_e(s['name'])} "
                     f"<span class='badge {_status_class(s.get('status', ''))}'>{_e(s.get('status', '').upper())}</span></h2>"
                     f"<p>{_e(s.get('message'))}</p>")
        if s["name"] == "layers":
            parts.append(_layers_section(s))
        elif s["name"] == "debug" and (s.get("details") or {}).get("forward"):
            parts.append(_layers_section(s) + _session_list(s))
        else:
            parts.append(_diffs_table(s))
    parts.append("<p class='meta'>generated by lockstep from summary.json; self-contained, no network.</p></body></html>")
    return "".join(parts)


def write_report(run_dir: Path) -> Path:
    """Render ``<run_dir>/summary.json`` into ``<run_dir>/report.html`` (atomic rename)."""
    run_dir = Path(run_dir)
    data = json.loads((run_dir / "summary.json").read_text())
    tmp = run_dir / "report.html.tmp"
    tmp.write_text(render(data), encoding="utf-8")
    tmp.replace(run_dir / "report.html")
    return run_dir / "report.html"
