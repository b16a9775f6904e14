"""One self-contained HTML page for a run: summary, D1 radar, W1 pipeline, gates, metric curves, W5
parameter-difference heat maps, the benchmark's teacher-vs-student item diff, findings, decision log, alerts.

plotly.js is inlined once in ``<head>`` (~4.8 MB) and every chart only carries its JSON, so the page
opens offline from a file with no server. Every user string goes through :func:`html.escape`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from html import escape as _escape
from pathlib import Path

from ..io import atomic_write_text
from . import charts
from .business import business_section
from .consistency import consistency_section
from .strategy import strategy_section
from .benchmark import benchmark_section
from .data import DIMENSIONS, PHASES, STAGES, Finding, GateResult, Iteration, ReportData
from .style import CSS


def esc(s: object) -> str:
    return _escape(str(s), quote=True)


MAX_DIFF_MAPS = 6  # per-transition W5 maps drawn (the newest); the overview covers every transition
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}

# Each chart's inline script draws it while the page is still being parsed: the first chart of a grid row is
# sized before its neighbour exists, i.e. at the full row width (1190 px inside a 587 px cell at a 1400 px
# window, so half the radar lay under the next chart), and plotly's "responsive" only follows *window*
# resizes. One ResizeObserver, run after the last chart, redraws every chart whose box differs from its
# drawn size, now and whenever the layout moves later.
FIT_CHARTS_JS = """(function () {
  if (!window.ResizeObserver || !window.Plotly) return;
  const fit = g => { const w = g._fullLayout && g._fullLayout.width;
    if (w !== undefined && Math.abs(w - g.getBoundingClientRect().width) > 1) Plotly.Plots.resize(g); };
  const ro = new ResizeObserver(es => es.forEach(e => fit(e.target)));
  document.querySelectorAll('.chart .plotly-graph-div').forEach(g => ro.observe(g));
})();"""


def _fmt(v: object) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return esc(json.dumps(v, sort_keys=True, default=str))
    return esc(v)


class _Charts:
    """Numbers the chart divs and turns figures into HTML fragments (no plotly.js: it is in <head>)."""

    def __init__(self):
        self.count = 0

    def __call__(self, fig, css_class: str = "chart") -> str:
        if fig is None:
            return ""
        import plotly.io as pio

        self.count += 1
        frag = pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"chart-{self.count}",
                           config=PLOTLY_CONFIG, default_height=f"{fig.layout.height or 400}px")
        return f'<div class="{css_class}">{frag}</div>'


def _score(v: float | None) -> str:
    """A dimension score: closeness underflows to ~1e-300 for a far miss; three decimals say enough."""
    return "—" if v is None else f"{v:.3f}"


def _badge(status: str, kind: str = "status") -> str:
    return f'<span class="badge {kind}-{esc(status)}">{esc(status.replace("_", " "))}</span>'


def _header(d: ReportData, generated: str) -> str:
    r = d.run
    return f"""<header><div class="wrap">
<div class="title"><h1>Run <code>{esc(r.id)}</code></h1>{_badge(r.status)}</div>
<div class="meta"><span><b>teacher</b> {esc(r.teacher)}</span><span><b>student</b> {esc(r.student)}</span>
<span><b>created</b> {esc(r.created)}</span><span><b>report</b> {esc(generated)}</span></div>
{f'<p class="summary">{esc(r.summary)}</p>' if r.summary else ''}
<nav>{''.join(f'<a href="#{a}">{t}</a>' for a, t in _SECTIONS)}</nav></div></header>"""


_SECTIONS = [("overview", "Overview"), ("pipeline", "Pipeline"), ("gates", "Gates"), ("metrics", "Metrics"),
             ("params", "Parameter changes"), ("benchmark", "Benchmark"), ("findings", "Findings"), ("decisions", "Decisions"),
             ("alerts", "Alerts"), ("work-orders", "Work orders")]


def _overview(d: ReportData, chart: _Charts) -> str:
    last = d.iterations[-1] if d.iterations else None
    gates = last.gates if last else []
    passed = sum(g.passed for g in gates)
    secs = sum(p.seconds or 0.0 for it in d.iterations for p in it.phases)
    red = sum(a.severity in ("critical", "error") for a in d.alerts)
    cards = [("iterations", str(len(d.iterations))),
             ("latest stage", f"{esc(last.stage)} · {esc(STAGES.get(last.stage, ''))}" if last else "—"),
             ("gates passed (latest)", f"{passed} / {len(gates)}" if gates else "—"),
             ("phase time", f"{secs / 3600:.2f} h" if secs >= 3600 else f"{secs:.0f} s"),
             ("red alerts", str(red))]
    dims = "".join(f'<div class="dim"><span>{esc(k)}</span><b>{_score(last.dimension_scores.get(k))}</b></div>'
                   for k in DIMENSIONS) if last else ""
    kpis = "".join(f'<div class="card"><span>{k}</span><b>{v}</b></div>' for k, v in cards)
    figs = chart(charts.radar(d.iterations)) + chart(charts.dimension_curves(d.iterations))
    empty = '<p class="muted">No dimension scores yet.</p>'
    return f"""<section id="overview"><h2>Overview</h2><div class="cards">{kpis}</div>
<div class="dims">{dims}</div><div class="grid2">{figs or empty}</div></section>"""


def _pipeline(d: ReportData, chart: _Charts) -> str:
    lanes = []
    for stage in [s for s in STAGES if any(it.stage == s for it in d.iterations)]:
        cards = "".join(_iteration_card(it) for it in d.iterations if it.stage == stage)
        lanes.append(f'<div class="lane"><div class="lane-head"><b>{esc(stage)}</b>'
                     f'<span>{esc(STAGES[stage])}</span></div><div class="lane-body">{cards}</div></div>')
    legend = "".join(f'<span class="chip st-{s}">{s}</span>' for s in ("done", "running", "failed", "pending",
                                                                      "skipped"))
    body = "".join(lanes) or '<p class="muted">No iterations yet.</p>'
    return f"""<section id="pipeline"><h2>Pipeline</h2>
<p class="muted">Stages → iterations → phases ({' → '.join(PHASES)}). Legend: {legend}</p>
<div class="lanes">{body}</div>{chart(charts.pipeline_timeline(d.iterations))}</section>"""


def _iteration_card(it: Iteration) -> str:
    by_phase = {p.phase: p for p in it.phases}
    chips = []
    for ph in PHASES:
        p = by_phase.get(ph)
        status = p.status if p else "pending"
        secs = f"{p.seconds:.1f} s" if p and p.seconds is not None else ""
        title = esc(p.note) if p and p.note else ""
        chips.append(f'<div class="phase st-{esc(status)}" title="{title}"><span>{ph}</span><small>{secs}</small></div>')
    total = sum(p.seconds or 0.0 for p in it.phases)
    version = f" · <code>{esc(it.version)}</code>" if it.version else ""
    return (f'<div class="iter st-border-{esc(it.status)}"><div class="iter-head"><b>iteration {esc(it.index)}</b>'
            f'<span>{total:.1f} s{version}</span></div><div class="phases">{"<i>→</i>".join(chips)}</div></div>')


def _gate_row(g: GateResult) -> str:
    return (f'<tr class="g-{esc(g.status)}"><td><code>{esc(g.id)}</code></td><td>{esc(g.dimension)}</td>'
            f'<td>{esc(g.metric)}</td><td class="num">{_fmt(g.value)}</td>'
            f'<td class="num">{esc(g.comparator)} {_fmt(g.threshold)} {esc(g.unit)}</td>'
            f'<td class="num">{_fmt(g.margin)}</td><td>{_badge(g.status, "gate")}</td><td>{_provenance(g)}{esc(g.note)}</td></tr>')


def _provenance(g: GateResult) -> str:
    """A measured value says what it stands on (simulated / replay / real logs traffic, generated attacks, a
    human or automatic spot check)."""
    if not g.provenance:
        return ""
    from ..gates import provenance_label

    return (f'<span class="badge prov prov-{esc(g.provenance.split("+")[0].split()[0].strip(","))}">'
            f'{esc(provenance_label(g.provenance))}</span> ')


def _gates(d: ReportData) -> str:
    ids: list[str] = []
    for it in d.iterations:
        ids += [g.id for g in it.gates if g.id not in ids]
    if not ids:
        return '<section id="gates"><h2>Gates</h2><p class="muted">No gate results yet.</p></section>'
    head = "".join(f"<th>{esc(it.index)}</th>" for it in d.iterations)
    never = [gid for gid in ids if all(g.status == "not_measured" for it in d.iterations for g in it.gates
                                       if g.id == gid)]
    rows = []
    for gid in [i for i in ids if i not in never]:
        cells = []
        for it in d.iterations:
            g = next((g for g in it.gates if g.id == gid), None)
            cells.append(f'<td class="cell g-{esc(g.status)}" title="{_fmt(g.value)} {esc(g.comparator)} '
                         f'{_fmt(g.threshold)}">{"✓" if g.passed else "✗" if g.status in ("fail", "missing") else "·"}</td>'
                         if g else '<td class="cell"></td>')
        rows.append(f"<tr><th><code>{esc(gid)}</code></th>{''.join(cells)}</tr>")
    matrix = f'<table class="matrix"><tr><th>gate \\ iteration</th>{head}</tr>{"".join(rows)}</table>'
    if never:
        matrix += (f'<p class="muted">Not measured in any iteration ({len(never)}): '
                   f'{", ".join(f"<code>{esc(g)}</code>" for g in never)}</p>')
    tables = []
    for n, it in enumerate(reversed(d.iterations)):
        if not it.gates:
            continue
        passed = sum(g.passed for g in it.gates)
        body = "".join(_gate_row(g) for g in it.gates)
        tables.append(f'<details{" open" if n == 0 else ""}><summary>Iteration {esc(it.index)} ({esc(it.stage)}): '
                      f'{passed} / {len(it.gates)} passed</summary><table class="gates"><tr><th>gate</th>'
                      f'<th>dimension</th><th>metric</th><th>value</th><th>threshold</th><th>margin</th>'
                      f'<th>status</th><th>note</th></tr>{body}</table></details>')
    return f'<section id="gates"><h2>Gates</h2>{matrix}{"".join(tables)}</section>'


def _metrics(d: ReportData, chart: _Charts) -> str:
    fig, left_out = charts.metric_curves(d.iterations, d.baseline_metrics)
    if fig is None:
        return '<section id="metrics"><h2>Metrics</h2><p class="muted">No metrics yet.</p></section>'
    more = (f'<p class="muted">Not drawn (panel limit {charts.MAX_CURVES}): {esc(", ".join(left_out))}</p>'
            if left_out else "")
    last = charts.flatten_metrics(d.iterations[-1].metrics)
    base = charts.flatten_metrics(d.baseline_metrics)
    rows = "".join(f'<tr><td>{esc(k)}</td><td class="num">{_fmt(v)}</td><td class="num">{_fmt(base.get(k))}</td></tr>'
                   for k, v in last.items())
    table = (f'<details><summary>Latest values (iteration {d.iterations[-1].index})</summary><table class="gates">'
             f'<tr><th>metric</th><th>student</th><th>teacher</th></tr>{rows}</table></details>')
    return f'<section id="metrics"><h2>Metrics</h2>{chart(fig)}{more}{table}</section>'


def _structure(d: ReportData, chart: _Charts) -> str:
    from . import structure as S

    if not S.changed(d.structure):
        return ""
    head = "".join(f"<th>{esc(h)}</th>" for h in S.FLOPS_HEADER)
    rows = "".join("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' for c in r) + "</tr>"
                   for r in S.flops_rows(d.structure))
    return (f'<section id="structure"><h2>Structure and compute</h2><p class="muted">What each iteration kept of '
            f'the initial student, block by block (counts are uniform per layer, so a stock config describes the '
            f'model), and its analytic forward FLOPs per token per component at the perf context length '
            f'(cross-checked with torch FlopCounterMode in each cut\'s prune.json).</p>'
            f'{chart(S.structure_chart(d.structure))}<div class="scroll"><table class="gates"><tr>{head}</tr>{rows}'
            f'</table></div>{_cuts(d)}</section>')


def _cuts(d: ReportData) -> str:
    from . import structure as S

    rows = S.cut_rows(d.structure)
    if not rows:
        return ""
    head = "".join(f"<th>{esc(h)}</th>" for h in S.CUT_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return (f'<h3>Prune cuts</h3><p class="muted">Which importance was used on which model, the distribution of '
            f'the scores per kind (a flat distribution means the cut is a guess), and whether the least-squares '
            f'fold-in was kept (KL on a held-out calibration row without -> with it).</p><div class="scroll">'
            f'<table class="gates"><tr>{head}</tr>{body}</table></div>')


def _params(d: ReportData, chart: _Charts) -> str:
    if not d.param_diffs:
        return ('<section id="params"><h2>Parameter changes</h2><p class="muted">No parameter differences '
                '(needs two committed iterations).</p></section>')
    shown = d.param_diffs[-MAX_DIFF_MAPS:]
    maps = "".join(chart(charts.param_diff_heatmap(pd), "chart small") for pd in shown)
    older = len(d.param_diffs) - len(shown)
    older_html = (f'<p class="muted">{older} earlier transition(s) appear in the overview only.</p>'
                  if older else "")
    notes = [f"{pd.from_iteration}→{pd.to_iteration}: {n}" for pd in d.param_diffs for n in pd.notes]
    notes_html = (f'<details><summary>{len(notes)} note(s)</summary><ul>'
                  f'{"".join(f"<li>{esc(n)}</li>" for n in notes)}</ul></details>' if notes else "")
    return f"""<section id="params"><h2>Parameter changes</h2>
<p class="muted">Relative Frobenius change ‖W<sub>k</sub> − W<sub>k−1</sub>‖ / ‖W<sub>k−1</sub>‖ per layer and
parameter group; blank cells: no such parameter or not comparable. Each per-transition map has its own colour
scale (changes shrink by orders of magnitude as training settles); the overview shares one.</p>
{chart(charts.param_diff_overview(d.param_diffs))}<div class="grid3">{maps}</div>{older_html}{notes_html}</section>"""


def _finding(f: Finding, chart: _Charts) -> str:
    ev = f.evidence
    maps = "".join(chart(charts.finding_heatmap(h), "chart small") for h in ev.heatmaps)
    samples = ""
    if ev.top_samples:
        rows = "".join(f'<tr><td><code>{esc(s.example_id)}</code></td><td>{esc(s.domain)}</td>'
                       f'<td class="num">{_fmt(s.score)}</td><td class="text">{esc(s.text)}</td></tr>'
                       for s in ev.top_samples)
        samples = (f'<table class="gates"><tr><th>sample</th><th>domain</th><th>divergence</th><th>text</th></tr>'
                   f'{rows}</table>')
    details = (f'<details><summary>details</summary><pre>{esc(json.dumps(ev.details, indent=2, default=str))}'
               f'</pre></details>' if ev.details else "")
    return (f'<article class="finding f-{esc(f.severity)}"><div class="f-head">{_badge(f.severity, "sev")}'
            f'<b>{esc(f.kind)}</b><span>iteration {esc(f.iteration)}</span><code>{esc(f.metric)}</code></div>'
            f'<p>{esc(f.message)}</p><div class="grid2">{maps}</div>{samples}{details}</article>')


def _findings(d: ReportData, chart: _Charts) -> str:
    body = "".join(_finding(f, chart) for f in sorted(d.findings, key=lambda f: -f.iteration))
    return f'<section id="findings"><h2>Findings</h2>{body or "<p class=muted>No findings.</p>"}</section>'


def _decisions(d: ReportData) -> str:
    if not d.decisions:
        return '<section id="decisions"><h2>Decisions</h2><p class="muted">No recipe changes.</p></section>'
    def value(v) -> str:  # a pool or a mix is a dict of many entries: its size, the whole value on hover
        if isinstance(v, (dict, list)) and len(v) > 3:
            full = esc(json.dumps(v, sort_keys=True, default=str)[:2000])
            return f'<span title="{full}">{len(v)} entries</span>'
        return _fmt(v)

    rows = "".join(f'<tr><td class="num">{esc(x.iteration)}</td><td><code>{esc(x.knob)}</code></td>'
                   f'<td class="num">{value(x.old)}</td><td class="num">{value(x.new)}</td><td>{esc(x.reason)}</td></tr>'
                   for x in d.decisions)
    return (f'<section id="decisions"><h2>Decisions</h2><table class="gates"><tr><th>iteration</th><th>knob</th>'
            f'<th>old</th><th>new</th><th>reason</th></tr>{rows}</table></section>')


def _alerts(d: ReportData) -> str:
    if not d.alerts:
        return '<section id="alerts"><h2>Alerts</h2><p class="muted">No alerts.</p></section>'
    rows = "".join(f'<tr class="sev-row-{esc(a.severity)}"><td>{_badge(a.severity, "sev")}</td>'
                   f'<td>{esc(a.dimension)}</td><td class="num">{_fmt(a.iteration)}</td><td>{esc(a.time or "")}</td>'
                   f'<td>{esc(a.message)}</td></tr>' for a in d.alerts)
    return (f'<section id="alerts"><h2>Alerts</h2><table class="gates"><tr><th>severity</th><th>dimension</th>'
            f'<th>iteration</th><th>time</th><th>message</th></tr>{rows}</table></section>')


def _work_orders(d: ReportData) -> str:
    """D2: the work orders the alerts raised, open first, each with where, impact, fix and how it is verified."""
    head = '<section id="work-orders"><h2>Work orders</h2>'
    if not d.work_orders:
        return head + '<p class="muted">No work orders (no dimension stayed under its threshold long enough).</p></section>'
    n_open = sum(w.status == "open" for w in d.work_orders)
    rows = "".join(
        f'<tr class="sev-row-{"error" if w.status == "open" else "info"}"><td class="num">{w.id}</td>'
        f'<td>{_badge("error" if w.status == "open" else "info", "sev")} {esc(w.status)}</td><td>{esc(w.dimension)}</td>'
        f'<td>{esc(w.opened or "")}</td><td>{esc(w.closed or "")}</td><td>{esc(w.location)}</td><td>{esc(w.impact)}</td>'
        f'<td>{esc(w.suggested_fix)}</td><td>{esc(", ".join(w.verification))} pass'
        f'{esc("; " + w.closed_by) if w.closed_by else ""}</td></tr>'
        for w in sorted(d.work_orders, key=lambda w: (w.status != "open", w.id)))
    return (head + f'<p>{n_open} open, {len(d.work_orders) - n_open} closed.</p><table class="gates"><tr><th>id</th>'
            f'<th>status</th><th>dimension</th><th>opened</th><th>closed</th><th>location</th><th>impact</th>'
            f'<th>suggested fix</th><th>verification</th></tr>{rows}</table></section>')


def render_html(data: ReportData) -> str:
    """The whole page as a string (see :func:`render_report`)."""
    import plotly.offline

    data.validate()
    generated = data.generated or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    chart = _Charts()
    body = "".join([_overview(data, chart), _pipeline(data, chart), _gates(data), _metrics(data, chart),
                    _structure(data, chart), consistency_section(data), business_section(data, chart),
                    _params(data, chart),
                    benchmark_section(data.benchmark), _findings(data, chart), _decisions(data),
                    strategy_section(data, chart), _alerts(data), _work_orders(data)])
    config = (f'<section id="config"><h2>Configuration</h2><details><summary>run config</summary><pre>'
              f'{esc(json.dumps(data.run.config, indent=2, sort_keys=True, default=str))}</pre></details></section>'
              if data.run.config else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>distillgate · {esc(data.run.id)}</title><style>{CSS}</style>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script></head>
<body>{_header(data, generated)}<main class="wrap">{body}{config}</main>
<footer class="wrap">distillgate report · format {data.format_version} · {chart.count} charts</footer>
<script type="text/javascript">{FIT_CHARTS_JS}</script></body></html>
"""


def render_report(data: ReportData, out_path: str | Path) -> Path:
    """Render ``data`` to one self-contained HTML file, written atomically. Returns the path."""
    out = Path(out_path)
    atomic_write_text(out, render_html(data))
    return out
