"""Plotly figure builders for the report. Each takes parts of :class:`ReportData` and returns a figure,
or ``None`` when there is nothing to draw. User strings are HTML-escaped before they reach plotly, which
renders a subset of HTML tags in labels (so ``<b>`` in a domain name shows as text, not bold).
"""

from __future__ import annotations

import html
import math
from datetime import datetime

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .data import DIMENSIONS, PHASES, HeatMap, Iteration, ParamDiff

FONT = "Inter, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"
PHASE_COLORS = {"extract": "#4e79a7", "map": "#59a14f", "validate": "#f28e2b", "attribute": "#b07aa1",
                "compensate": "#76b7b2", "commit": "#9c755f"}
SERIES = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7",
          "#9c755f", "#bab0ac"]
MAX_CURVES = 12  # metric panels in the curves figure; the rest are listed in the page


def esc(s: object) -> str:
    """Escape for plotly text: plotly decodes &lt; &gt; &amp; back to characters but prints &quot; literally,
    and quotes cannot form a tag once angle brackets are escaped."""
    return html.escape(str(s), quote=False)


def label(s: object, n: int = 36) -> str:
    """An escaped axis tick label, cut to ``n`` characters so one long name cannot squeeze the plot."""
    s = str(s)
    return esc(s if len(s) <= n else s[: n - 1] + "…")


def _style(fig: go.Figure, title: str, height: int) -> go.Figure:
    # template "none" keeps each figure's JSON small (the default template adds ~8 KB per chart).
    fig.update_layout(template="none", title={"text": esc(title), "x": 0.01, "font": {"size": 15}},
                      height=height, margin={"l": 60, "r": 30, "t": 50, "b": 50},
                      font={"family": FONT, "size": 12, "color": "#1f2933"},
                      paper_bgcolor="#ffffff", plot_bgcolor="#ffffff", hoverlabel={"font": {"family": FONT}})
    # automargin: long domain / layer names get room instead of being clipped at the fixed margin.
    fig.update_xaxes(gridcolor="#e4e7eb", zerolinecolor="#cbd2d9", linecolor="#cbd2d9", automargin=True)
    fig.update_yaxes(gridcolor="#e4e7eb", zerolinecolor="#cbd2d9", linecolor="#cbd2d9", automargin=True)
    return fig


def radar(iterations: list[Iteration]) -> go.Figure | None:
    """D1: the four dimension scores of the first and the latest iteration. Unmeasured axes read 0 and are
    labelled "(not measured)"."""
    scored = [it for it in iterations if any(v is not None for v in it.dimension_scores.values())]
    if not scored:
        return None
    shown = [scored[0]] if len(scored) == 1 else [scored[0], scored[-1]]
    latest = shown[-1].dimension_scores
    labels = [d if latest.get(d) is not None else f"{d} (not measured)" for d in DIMENSIONS]
    top = max([1.0] + [v for it in shown for v in it.dimension_scores.values() if v is not None])
    fig = go.Figure()
    fig.add_trace(go.Scatterpolar(r=[1.0] * 5, theta=labels + labels[:1], mode="lines", name="all gates pass",
                                  line={"color": "#9aa5b1", "dash": "dot"}, hoverinfo="skip"))
    for it, color in zip(shown, ["#9aa5b1", "#3b6fd8"] if len(shown) == 2 else ["#3b6fd8"]):
        r = [it.dimension_scores.get(d) for d in DIMENSIONS]
        text = ["not measured" if v is None else f"{v:.3f}" for v in r]
        r = [0.0 if v is None else v for v in r]
        fig.add_trace(go.Scatterpolar(
            r=r + r[:1], theta=labels + labels[:1], text=text + text[:1], fill="toself", mode="lines+markers",
            name=f"iteration {it.index}", line={"color": color}, opacity=0.75 if it is shown[-1] else 0.45,
            hovertemplate="%{theta}: %{text}<extra>%{fullData.name}</extra>"))
    fig.update_layout(polar={"radialaxis": {"range": [0, top * 1.05], "gridcolor": "#e4e7eb"},
                             "angularaxis": {"gridcolor": "#e4e7eb"}, "bgcolor": "#fbfcfd"},
                      legend={"orientation": "h", "y": -0.1})
    return _style(fig, "Dimension scores (1.0 = all gates pass)", 420)


def dimension_curves(iterations: list[Iteration]) -> go.Figure | None:
    """The four dimension scores across iterations (gaps where not measured)."""
    if not any(v is not None for it in iterations for v in it.dimension_scores.values()):
        return None
    fig = go.Figure()
    xs = [it.index for it in iterations]
    for d, color in zip(DIMENSIONS, SERIES):
        ys = [it.dimension_scores.get(d) for it in iterations]
        if any(v is not None for v in ys):
            fig.add_trace(go.Scatter(x=xs, y=ys, name=d, mode="lines+markers", line={"color": color}))
    fig.add_hline(y=1.0, line={"color": "#9aa5b1", "dash": "dot"})
    fig.update_xaxes(title="iteration", dtick=1)
    fig.update_layout(legend={"orientation": "h", "y": -0.25})
    return _style(fig, "Dimension scores over iterations", 420)


def flatten_metrics(metrics: dict) -> dict[str, float | None]:
    """``{"kl": 0.3, "kl_by_domain": {"legal": 0.2}}`` -> ``{"kl": 0.3, "kl_by_domain/legal": 0.2}``."""
    out: dict[str, float | None] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            for sk, sv in v.items():
                out[f"{k}/{sk}"] = _num(sv)
        else:
            out[k] = _num(v)
    return out


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def metric_curves(iterations: list[Iteration], baseline: dict) -> tuple[go.Figure | None, list[str]]:
    """Small multiples: one panel per scalar metric, one multi-line panel per metric family (a dict of
    sub-metrics). Teacher baselines are dashed lines. Returns the figure and the panels left out."""
    panels: dict[str, list[str]] = {}  # panel name -> flattened keys
    for it in iterations:
        for k, v in it.metrics.items():
            keys = [f"{k}/{sk}" for sk in v] if isinstance(v, dict) else [k]
            panels.setdefault(k, [])
            panels[k] += [x for x in keys if x not in panels[k]]
    if not panels:
        return None, []
    # the benchmark's per-task families (bench_<task>, S1.1) go after the loop's own metrics, so a long suite
    # cannot push KL, top-1 or the perplexity ratio out of the panels shown
    order = sorted(panels, key=lambda n: n.startswith("bench_"))
    names = order[:MAX_CURVES]
    left_out = order[MAX_CURVES:]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[esc(n) for n in names],
                        horizontal_spacing=0.08, vertical_spacing=min(0.3, 90 / (260 * rows)))
    flat = [flatten_metrics(it.metrics) for it in iterations]
    base = flatten_metrics(baseline)
    xs = [it.index for it in iterations]
    for n, name in enumerate(names):
        r, c = n // cols + 1, n % cols + 1
        for s, key in enumerate(panels[name]):
            color = SERIES[s % len(SERIES)]
            short = key.split("/", 1)[1] if "/" in key else key
            ys = [f.get(key) for f in flat]
            # a family panel names each line at its last point (one legend cannot serve a grid of panels)
            last = max((i for i, y in enumerate(ys) if y is not None), default=None)
            text = [label(short, 18) if i == last and len(panels[name]) > 1 else "" for i in range(len(ys))]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers+text", name=esc(short), text=text,
                                     textposition="middle right", textfont={"size": 10, "color": color},
                                     cliponaxis=False,
                                     legendgroup=esc(key), showlegend=False, line={"color": color, "width": 2},
                                     marker={"size": 6}, hovertemplate=f"{esc(key)}: %{{y:.4g}}<extra>iter %{{x}}</extra>"),
                          row=r, col=c)
            if base.get(key) is not None:
                fig.add_trace(go.Scatter(x=[xs[0], xs[-1]], y=[base[key]] * 2, mode="lines", showlegend=False,
                                         line={"color": color, "dash": "dash", "width": 1},
                                         hovertemplate=f"teacher {esc(key)}: %{{y:.4g}}<extra></extra>"),
                              row=r, col=c)
        pad = 0.9 if len(panels[name]) > 1 else 0.2  # room for the line labels on the right
        fig.update_xaxes(dtick=1, range=[min(xs) - 0.2, max(xs) + pad], row=r, col=c)
    _style(fig, "Metrics over iterations (dashed: teacher)", 260 * rows + 60)
    fig.update_annotations(font={"size": 12})
    return fig, left_out


def param_diff_heatmap(pd: ParamDiff) -> go.Figure:
    """W5: layers x parameter groups, relative Frobenius change from iteration k-1 to k."""
    z = [[None if v is None else v for v in row] for row in pd.values]
    absz = pd.abs_change or [[None] * len(pd.groups) for _ in pd.layers]
    text = [[("-" if a is None else f"{a:.3g}") for a in row] for row in absz]
    fig = go.Figure(go.Heatmap(
        z=z, x=[label(g) for g in pd.groups], y=[label(l) for l in pd.layers], text=text, colorscale="Viridis",
        zmin=0, colorbar={"title": {"text": "rel. change"}, "thickness": 12}, xgap=1, ygap=1,
        hovertemplate="%{y} / %{x}<br>relative %{z:.3g}<br>absolute %{text}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_xaxes(showgrid=False, side="top")
    _style(fig, f"Iteration {pd.from_iteration} → {pd.to_iteration}", max(260, 120 + 22 * len(pd.layers)))
    fig.update_layout(margin={"t": 70})
    return fig


def param_diff_overview(diffs: list[ParamDiff]) -> go.Figure | None:
    """Layers x transitions: the largest relative change over a layer's groups, to spot where training moved."""
    if len(diffs) < 2:
        return None
    rows: list[str] = []
    for pd in diffs:
        rows += [l for l in pd.layers if l not in rows]
    z = []
    for l in rows:
        line = []
        for pd in diffs:
            vals = [v for v in (pd.values[pd.layers.index(l)] if l in pd.layers else []) if v is not None]
            line.append(max(vals) if vals else None)
        z.append(line)
    x = [f"{pd.from_iteration}→{pd.to_iteration}" for pd in diffs]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=[label(r) for r in rows], colorscale="Viridis", zmin=0, xgap=1, ygap=1,
                               colorbar={"title": {"text": "max rel."}, "thickness": 12},
                               hovertemplate="%{y}, %{x}: %{z:.3g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_xaxes(showgrid=False, type="category")
    return _style(fig, "Largest relative change per layer, by transition", max(240, 120 + 22 * len(rows)))


def finding_heatmap(h: HeatMap) -> go.Figure:
    """A finding's evidence grid (domain x layer, domain x position, ...)."""
    fig = go.Figure(go.Heatmap(z=h.z, x=[label(v) for v in h.x], y=[label(v) for v in h.y], colorscale="Reds",
                               xgap=1, ygap=1, colorbar={"title": {"text": esc(h.value_label)}, "thickness": 12},
                               hovertemplate="%{y} / %{x}: %{z:.4g}<extra></extra>"))
    fig.update_xaxes(title=esc(h.x_label), showgrid=False, type="category")
    fig.update_yaxes(title=esc(h.y_label), showgrid=False, autorange="reversed", type="category")
    return _style(fig, h.title, 140 + 24 * max(len(h.y), 4))


def _parse_time(s: str | None) -> float | None:
    if not s:
        return None
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def pipeline_timeline(iterations: list[Iteration]) -> go.Figure | None:
    """W1/W7: a Gantt-like timeline, one row per iteration, one bar per phase (seconds since the run's first
    phase). Phases without a start time are laid end to end after the previous one."""
    bars = []  # (iteration label, phase, start, seconds, status)
    t0 = min((t for it in iterations for p in it.phases if (t := _parse_time(p.started)) is not None),
             default=None)
    cursor = 0.0
    for it in iterations:
        label = f"iter {it.index} · {it.stage}"
        for p in it.phases:
            if p.seconds is None:
                continue
            start = _parse_time(p.started)
            start = start - t0 if start is not None and t0 is not None else cursor
            bars.append((label, p.phase, start, p.seconds, p.status))
            cursor = max(cursor, start + p.seconds)
    if not bars:
        return None
    fig = go.Figure()
    for phase in PHASES:
        mine = [b for b in bars if b[1] == phase]
        if not mine:
            continue
        fig.add_trace(go.Bar(
            y=[b[0] for b in mine], x=[b[3] for b in mine], base=[b[2] for b in mine], orientation="h",
            name=phase, customdata=[[b[4]] for b in mine],
            marker={"color": PHASE_COLORS[phase], "line": {"color": ["#c81e1e" if b[4] == "failed" else "#ffffff"
                                                                        for b in mine], "width": 2},
                    "pattern": {"shape": ["x" if b[4] == "failed" else "/" if b[4] == "running" else ""
                                          for b in mine]}},
            hovertemplate=f"{phase}: %{{x:.1f}} s (%{{customdata[0]}})<br>from %{{base:.1f}} s<extra>%{{y}}</extra>"))
    fig.update_layout(barmode="overlay", bargap=0.35,
                      legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"})
    fig.update_yaxes(autorange="reversed", type="category", showgrid=False)
    fig.update_xaxes(title="seconds since the first phase")
    n_rows = len({b[0] for b in bars})
    return _style(fig, "Phase timeline", 160 + 34 * n_rows)
