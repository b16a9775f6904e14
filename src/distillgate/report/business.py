"""The report's L4 / G-B section: per A/B window (one per iteration of the ``production`` stage) the seven
KPIs per arm with their 95% CIs as curves over iterations, the newest window's deltas with CIs and the sessions a
window needs for the G-B1 CI width, and the Shapley bars (value and simultaneous CI per capability module) of
the three G-B1 KPIs. Every window says its provenance (real logs / replay / simulated); a section built on
simulated traffic says so at its top. Empty (no section) for runs without the stage."""

from __future__ import annotations

from html import escape

from ..business.kpis import KPIS
from ..business.stats import delta_unit

PERCENT = {"handoff_rate", "first_response_accuracy", "click_through", "review_pass_rate", "abnormal_termination"}
ARM_COLOURS = {"control": "#4e79a7", "candidate": "#e15759"}


def _e(s) -> str:
    return escape(str(s), quote=True)


def _n(v, unit: str = "") -> str:
    return "—" if v is None else f"{v:.3g}{unit}"


def kpi_curves(its):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .charts import _style

    fig = make_subplots(rows=2, cols=4, subplot_titles=[k.replace("_", " ") for k in KPIS], horizontal_spacing=0.07,
                        vertical_spacing=0.18)
    for j, k in enumerate(KPIS):
        row, col = j // 4 + 1, j % 4 + 1
        f = 100.0 if k in PERCENT else 1.0
        for arm, colour in ARM_COLOURS.items():
            xs, ys, up, down = [], [], [], []
            for it in its:
                r = it.business["ab"]["kpis"][k][arm]
                if r["value"] is None:
                    continue
                xs.append(it.index)
                ys.append(f * r["value"])
                lo, hi = r["ci"]
                up.append(None if hi is None else f * hi - f * r["value"])
                down.append(None if lo is None else f * r["value"] - f * lo)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=arm, legendgroup=arm,
                                     showlegend=j == 0, line={"color": colour},
                                     error_y={"type": "data", "array": up, "arrayminus": down, "visible": True}),
                          row=row, col=col)
    fig.update_xaxes(title_text="iteration", dtick=1)
    return _style(fig, "KPIs per arm over iterations (95% CI; %: rates)", 520)


def shapley_bars(b: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .charts import _style

    atts = b.get("shapley") or {}
    if not atts:
        return None
    fig = make_subplots(rows=1, cols=len(atts), subplot_titles=[f'{m.replace("_", " ")} ({a.get("unit", "")})'
                                                                for m, a in atts.items()],
                        horizontal_spacing=0.12)
    for j, (metric, a) in enumerate(atts.items()):
        mods = list(a["modules"])
        vals = [a["modules"][m]["value"] for m in mods]
        lo = [a["modules"][m]["value"] - a["modules"][m]["ci"][0] for m in mods]
        hi = [a["modules"][m]["ci"][1] - a["modules"][m]["value"] for m in mods]
        colours = ["#e15759" if a["modules"][m]["significant"] else "#bab0ac" for m in mods]
        fig.add_trace(go.Bar(x=vals, y=mods, orientation="h", marker={"color": colours}, showlegend=False,
                             error_x={"type": "data", "array": hi, "arrayminus": lo, "visible": True}),
                      row=1, col=j + 1)
    return _style(fig, f"Shapley attribution, iteration {b['iteration']} (grey: CI contains 0, not told from "
                       f"chance)", 360)


def _delta_table(b: dict) -> str:
    rows = []
    for k in KPIS:
        r = b["ab"]["kpis"][k]
        f = 100.0 if k in PERCENT else 1.0
        unit = "%" if k in PERCENT else ""
        lvl = lambda arm: (f"{_n(None if r[arm]['value'] is None else f * r[arm]['value'], unit)} "  # noqa: E731
                           f"[{_n(None if r[arm]['ci'][0] is None else f * r[arm]['ci'][0])}, "
                           f"{_n(None if r[arm]['ci'][1] is None else f * r[arm]['ci'][1])}]")
        du = " %" if delta_unit(k) == "%" else " pts"
        rows.append(f'<tr><td>{_e(k)}</td><td class="num">{lvl("control")}</td><td class="num">{lvl("candidate")}'
                    f'</td><td class="num">{_n(r["delta"], du)} [{_n(r["delta_ci"][0])}, {_n(r["delta_ci"][1])}]'
                    f'</td></tr>')
    return ('<table class="gates"><tr><th>KPI</th><th>control [95% CI]</th><th>candidate [95% CI]</th>'
            f'<th>delta [95% CI]</th></tr>{"".join(rows)}</table>')


def business_section(d, chart) -> str:
    its = [it for it in d.iterations if it.business]
    if not its:
        return ""
    last = its[-1].business
    provs = sorted({it.business["provenance"] for it in its})
    banner = ""
    if any("simulated" in p for p in provs):
        banner = ('<p><span class="badge prov prov-simulated">simulated traffic</span> These A/B windows are '
                  'simulated users answered by the models in this process: every business verdict below and in '
                  'the gate table stands on simulated traffic, not on production logs.</p>')
    lat = last.get("latency") or {}
    need = last.get("sessions_needed")
    undefined = [m for m, v in (last["ab"].get("sessions_needed_by") or {}).items() if v is None]
    if need is not None and undefined:
        need = f"{need} (no estimate for {', '.join(undefined)}: its CI is undefined)"
    facts = (f'<p class="muted">Iteration {last["iteration"]}: {last["sessions"]} sessions, {last["turns"]} turns '
             f'over {_n(last.get("window_days"))} days (provenance: {_e(last["provenance"])}; control = '
             f'{_e(last.get("control", "?"))}); sessions needed for every G-B1 CI under 1.5 points: '
             f'{_e(need if need is not None else "—")}; latency volatility ratio {_n(lat.get("volatility_ratio"))}, '
             f'TTFT ratio {_n(lat.get("ttft_ratio"))}; {len(last.get("failed") or [])} failed request(s) fed '
             f'back.</p>')
    return (f'<section id="business"><h2>Business A/B (L4, G-B)</h2>{banner}{facts}'
            f'{chart(kpi_curves(its))}<h3>Deltas, iteration {last["iteration"]}</h3>{_delta_table(last)}'
            f'<h3>Shapley attribution</h3>{chart(shapley_bars(last))}</section>')
