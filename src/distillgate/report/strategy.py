"""The report's *Strategy* section (issue 16): what the strategy learned about each knob in this run: moves
tried, kept, reverted, verified / failed, the exploration's trials and adopted variants, and the measured effect
of one move up on KL and on the metric the moves answered (mean ± sd, n), with a chart of the KL effects. Read
from the newest version's loop state (``strategy``, :mod:`distillgate.knobs`). Empty (no section) for runs whose
strategy changed nothing."""

from __future__ import annotations

from html import escape


def _e(s) -> str:
    return escape(str(s), quote=True)


def effect_rows(rows: list[dict]) -> list[list[str]]:
    """The table's cells (shared with ``distillgate runs show``)."""
    from ..knobs import fmt_effect

    out = []
    for r in rows:
        other = r["metric"] if r["metric"] != "kl" else None
        out.append([r["knob"], ", ".join(r["rules"]) or "explore", str(r["tried"]), str(r["kept"]), str(r["reverted"]),
                    f"{r['verified']} / {r['failed']}", f"{r['trials']} ({r['adopted']} adopted)",
                    fmt_effect(r.get("effect_kl")),
                    f"{other}: {fmt_effect(r.get(f'effect_{other}'))}" if other else "-"])
    return out


MOVES_HEADER = ("iteration", "rule", "knob", "old -> new", "answers", "expected", "measured (net of trend)",
                "verdict", "kept")


def move_rows(moves: list[dict], last: int = 30) -> list[list[str]]:
    """Each decision with the finding it answered, its expected and its measured effect (newest ``last``)."""
    out = []
    for m in moves[-last:]:
        metric = m.get("metric") or "kl"
        eff = (m.get("measured") or {}).get(metric)
        exp = m.get("expected")
        out.append([str(m["iteration"]), m["rule"], m["knob"], f"{m['old']} -> {m['new']}", m.get("answers") or "-",
                    "-" if exp is None else f"{metric} {100 * exp:+.1f}% ({m.get('expected_source') or '-'})",
                    "-" if eff is None else f"{metric} {100 * eff:+.1f}%", m["status"],
                    m["status_kept"] + (f" (reverted in {m['reverted_in']})" if m.get("reverted_in") is not None
                                        else "")])
    return out


EFFECT_HEADER = ("knob", "rules", "tried", "kept", "reverted", "verified / failed", "exploration trials",
                 "measured effect on KL per move up", "on the answered metric")


def _chart(rows: list[dict]):
    import plotly.graph_objects as go

    from .charts import _style

    pts = [(r["knob"], r["effect_kl"]) for r in rows if (r.get("effect_kl") or {}).get("mean") is not None]
    if not pts:
        return None
    fig = go.Figure(go.Bar(x=[100 * e["mean"] for _, e in pts], y=[k for k, _ in pts], orientation="h",
                           error_x={"type": "data", "array": [100 * (e["sd"] or 0.0) for _, e in pts]},
                           marker_color=["#2f7d4f" if e["mean"] < 0 else "#b83232" for _, e in pts],
                           hovertext=[f"n={e['n']}" for _, e in pts]))
    fig.update_xaxes(title_text="relative change of held-out KL per move up, % (negative: better)")
    return _style(fig, "Measured effect per knob (mean ± sd over moves and exploration trials)",
                  140 + 40 * len(pts))


def strategy_section(d, chart) -> str:
    rows = (d.strategy or {}).get("effects") or []
    if not rows:
        return ""
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in (2, 3, 4) else ""}>{_e(c)}</td>'
                                    for i, c in enumerate(cells)) + "</tr>" for cells in effect_rows(rows))
    head = "".join(f"<th>{_e(h)}</th>" for h in EFFECT_HEADER)
    refused = (d.strategy or {}).get("refused", 0)
    note = ("Effects of rule moves are observational (the metric's change in the iteration the move applied to, "
            "net of the trend), shared by every move that applied to the same iteration (the repair findings name them); "
            "exploration trials are A/B on the selection split from the same weights, one knob apart. "
            f"Changes refused for leaving a knob's allowed range: {refused}.")
    moves = (d.strategy or {}).get("moves") or []
    mbody = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>" for cells in move_rows(moves))
    mhead = "".join(f"<th>{_e(h)}</th>" for h in MOVES_HEADER)
    log = (f'<h3>Decisions and their measured effects</h3><table class="gates"><tr>{mhead}</tr>{mbody}</table>'
           if moves else "")
    return (f'<section id="strategy"><h2>Strategy: what each knob did</h2><p class="muted">{_e(note)}</p>'
            f'<table class="gates"><tr>{head}</tr>{body}</table>{chart(_chart(rows))}{log}</section>')
