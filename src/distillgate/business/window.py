"""One A/B window's business evaluation, from turn events to the G-B gate metrics (the one place the production
stage and ``distillgate gates --traffic-log`` both call), and the metric providers that hand its values to the
gates with their provenance.

:func:`evaluate_window` returns a JSON-able dict: per-arm KPIs with CIs and deltas (:func:`.stats.ab_test`),
Shapley attributions of the three G-B1 KPIs (:func:`.shapley.attribute`, in the gate's unit: % of the control
level for turns and hand-offs, points for accuracy), per-domain KPIs, the gate metrics and the window's
provenance (``real logs`` / ``replay`` / ``simulated``); a KPI whose control level is 0 is attributed in points
instead of %. ``kpi_shapley_coverage`` (G-B2) is the smallest, over
the three KPIs, share of sessions whose change is attributed to modules (sessions without module tags, or in a
module stratum one arm never saw, cannot be attributed).
"""

from __future__ import annotations

from ..evaluate.providers import GateContext, register_metric_provider
from ..traffic.events import TurnEvent
from . import kpis as K
from . import shapley, stats

GATE_METRICS = {  # metric -> (higher_is_better, description)
    "session_turns_delta_pct": (True, "G-B1a: A/B change in mean session turns, % of control (window of events)"),
    "handoff_delta_pct": (False, "G-B1b: A/B change in human hand-off rate, % of control"),
    "first_response_accuracy_pct": (True, "G-B1c: candidate's first-response accuracy, %"),
    "kpi_ci95_width_points": (False, "G-B1d: widest 95% CI among the three G-B1 KPIs, points"),
    "kpi_shapley_coverage": (True, "G-B2: share of sessions whose KPI change is attributed to capability modules"),
}
SHAPLEY_FOR = {"session_turns_delta_pct": "session_turns", "handoff_delta_pct": "handoff_rate",
               "first_response_accuracy_pct": "first_response_accuracy"}


def evaluate_window(events: list[TurnEvent], *, window_days: float | None = 30.0, confidence: float = 0.95,
                    n_resamples: int = 2000, shapley_resamples: int = 500, seed: int = 0,
                    target_width: float = 1.5) -> dict:
    evs = K.window(events, window_days)
    s = K.sessions(evs)
    ab = stats.ab_test(s, confidence=confidence, n_resamples=n_resamples, seed=seed, target_width=target_width)
    arms = K.per_arm(s)
    attributions = {}
    for metric, k in SHAPLEY_FOR.items():
        ctrl = arms["control"][k]
        relative = k in stats.RELATIVE and bool(ctrl)  # a zero control level has no relative change: points
        scale = 100.0 / ctrl if relative else 100.0
        attributions[metric] = shapley.attribute(s, k, confidence=confidence, n_resamples=shapley_resamples,
                                                 seed=seed, scale=scale)
        attributions[metric]["unit"] = "%" if relative else "points"
    gate = dict(ab["gate"])
    gate["kpi_shapley_coverage"] = (min(a["coverage"] for a in attributions.values()) if
                                    len(attributions) == len(SHAPLEY_FOR) else None)
    undefined = {}  # why a gate value is None on this window (the gate table shows it)
    for metric, (k, which) in stats.GATE_KPIS.items():
        if gate[metric] is None:
            undefined[metric] = (f"control {k} is 0: a relative change is undefined" if which == "delta" and
                                 not arms["control"][k] else f"{k} has no value on this window")
        elif None in ab["gate_ci"][metric]:
            undefined[metric] = "its CI is undefined (a resample without the KPI)"
    if gate["kpi_ci95_width_points"] is None:
        undefined["kpi_ci95_width_points"] = "no CI for " + ", ".join(m for m in stats.GATE_KPIS if m in undefined)
    if gate["kpi_shapley_coverage"] is None:
        undefined["kpi_shapley_coverage"] = "no Shapley attribution"
    domains = {}
    for d in sorted(set(s.domain.tolist())):
        idx = [i for i in range(len(s)) if s.domain[i] == d]
        sub = {arm: [i for i in idx if s.arm[i] == arm] for arm in ("control", "candidate")}
        domains[d] = {arm: {"sessions": len(ix), **({k: _f(K.kpi(k, s, ix)) for k in
                                                      ("first_response_accuracy", "handoff_rate", "session_turns")}
                                                   if ix else {})} for arm, ix in sub.items()}
    ts = [e.ts for e in evs]
    return {"provenance": s.provenance, "window_days": window_days, "first_ts": min(ts), "last_ts": max(ts),
            "sessions": len(s), "turns": len(evs), "arms": arms, "ab": ab, "shapley": attributions,
            "domains": domains, "gate": gate, "undefined": undefined, "sessions_needed": ab["sessions_needed"]}


def _f(x):
    x = float(x)
    return x if x == x else None


# ------------------------------------------------------------------------------------------------ providers

def _provider(metric: str):
    def fn(ctx: GateContext):
        b = ctx.options.get("business")
        if not b:
            ctx.details[metric] = {"note": "requires production traffic: an A/B window (the production stage) or "
                                           "a traffic event log (--traffic-log)"}
            return None
        v = b["gate"].get(metric)
        ctx.details[metric] = {"provenance": b["provenance"], "sessions": b["sessions"],
                               "ci": b["ab"].get("gate_ci", {}).get(metric),
                               **({} if v is not None else {
                                   "note": f"{b['provenance']} window of {b['sessions']} sessions: "
                                           f"{b.get('undefined', {}).get(metric, 'undefined')}"})}
        return v
    fn.__qualname__ = f"business_metric[{metric}]"
    return fn


for _m, (_hib, _desc) in GATE_METRICS.items():
    register_metric_provider(_m, _provider(_m), higher_is_better=_hib, description=_desc, regression=False,
                             tier="high", module=__name__)
KPI_DELTAS = [f"business/{k}/delta" for k in K.KPIS]


def _delta_provider(kpi_name: str):
    def fn(ctx: GateContext):
        b = ctx.options.get("business")
        if not b:
            ctx.details[f"business/{kpi_name}/delta"] = {"note": "no A/B window"}
            return None
        r = b["ab"]["kpis"][kpi_name]
        ctx.details[f"business/{kpi_name}/delta"] = {"provenance": b["provenance"], "ci": r["delta_ci"]}
        return r["delta"]
    fn.__qualname__ = f"business_delta[{kpi_name}]"
    return fn


for _k in K.KPIS:
    register_metric_provider(f"business/{_k}/delta", _delta_provider(_k),
                             higher_is_better=_k not in ("handoff_rate", "latency_volatility", "abnormal_termination"),
                             description=f"A/B change of {_k} ({stats.delta_unit(_k)}), candidate vs control",
                             regression=False, module=__name__)
