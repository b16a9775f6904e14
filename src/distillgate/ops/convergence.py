"""D3 convergence: every gate of the four dimensions measured and passing, and ``quiet_days`` (7) on the ops
clock without a red alert.

:func:`convergence` is the verdict at one instant: ``gates`` is the latest
:class:`~distillgate.gates.GateReport`'s ``converged`` (every gate measured, none missing or not measured,
all passing: :func:`distillgate.gates.evaluate_gates`); the *quiet window* starts at the later of the first
dimension-score observation and the last red alert (catalog level ``error``: the D2 alerts and the store's own,
e.g. a version that failed verification) at or before ``now``, and must have lasted ``quiet_days``. A red alert
restarts the window; alerts stamped after ``now`` (wall-time rows while a simulated clock runs behind) are
not counted yet.

:func:`operate` is the job that keeps a released version under watch: every ``step_hours`` on the clock it
re-evaluates the gates (``evaluate(now) -> GateReport``: in production ``collect_metrics`` + ``evaluate_gates``
over the live providers), lets :class:`~distillgate.ops.alerts.AlertWatch` raise or close work orders, and
records the verdict in the run's catalog row (``runs.converged``) when it changes.
"""

from __future__ import annotations

import time
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from .alerts import RED, AlertOptions, AlertWatch
from .clock import DAY, HOUR, Clock


class ConvergenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quiet_days: float = Field(7.0, gt=0, description="days on the ops clock with no red alert (D3)")
    step_hours: float = Field(1.0, gt=0, description="hours between two evaluations of the watch")
    alerts: AlertOptions = Field(default_factory=AlertOptions, description="the D2 alert rule")


def convergence(cat, report, now: float, options: ConvergenceOptions | None = None) -> dict:
    """``{converged, gates_converged, quiet_since, quiet_days, needed_days, last_red, open_work_orders, reason}``."""
    o = options or ConvergenceOptions()
    obs = [r for r in cat.dimension_scores() if r["time"] <= now]
    reds = [a["time"] for a in cat.alerts() if a["level"] == RED and a["time"] <= now]
    start = obs[0]["time"] if obs else None
    last_red = max(reds) if reds else None
    quiet_since = None if start is None else max(start, last_red or start)
    quiet = 0.0 if quiet_since is None else (now - quiet_since) / DAY
    gates_ok = bool(report is not None and report.converged)
    ok = gates_ok and quiet >= o.quiet_days
    if ok:
        reason = f"every gate measured and passing; {quiet:.2f} days without a red alert"
    elif not gates_ok:
        bad = [] if report is None else [g.id for g in report.gates if g.status != "pass"]
        reason = "gates not all measured and passing: " + (", ".join(bad) or "no gate report")
    else:
        reason = f"quiet window {quiet:.2f} of {o.quiet_days:g} days" + (
            f" (restarted by the red alert at {last_red:.0f})" if last_red is not None and start is not None and last_red >= start else "")
    return {"converged": ok, "gates_converged": gates_ok, "quiet_since": quiet_since, "quiet_days": quiet,
            "needed_days": o.quiet_days, "last_red": last_red,
            "open_work_orders": len(cat.work_orders("open")), "reason": reason}


def operate(store, clock: Clock, evaluate: Callable[[float], object], *, until: float, version_id: int | None = None,
            options: ConvergenceOptions | None = None, stop_when_converged: bool = True,
            on_tick: Callable[[dict], None] | None = None) -> list[dict]:
    """Watch ``version_id`` from the clock's now to ``until`` (see the module docstring); returns one verdict
    per evaluation (with ``time`` and the work orders it ``opened``/``closed``). A clock without ``advance``
    (wall time) is waited on."""
    o = options or ConvergenceOptions()
    watch = AlertWatch(store, clock, o.alerts)
    out, was = [], None
    while True:
        now = clock.now()
        report = evaluate(now)
        changes = watch.observe(report, version_id)
        v = {"time": now, **convergence(store.catalog, report, now, o), **changes}
        out.append(v)
        if on_tick is not None:
            on_tick(v)
        if v["converged"] != was:
            store.catalog.set_converged(v["converged"])
            was = v["converged"]
        if (v["converged"] and stop_when_converged) or now + o.step_hours * HOUR > until:
            return out
        if hasattr(clock, "advance"):
            clock.advance(o.step_hours * HOUR)
        else:
            time.sleep(max(0.0, now + o.step_hours * HOUR - clock.now()))



def version_evaluator(store, spec, version_id: int, options: dict | None = None) -> Callable[[float], object]:
    """``evaluate(now) -> GateReport`` for a committed version: its recorded metrics (what the loop measured),
    and every other gate metric measured now through the metric registry (:func:`collect_metrics`; providers
    get ``options`` plus ``now``, the ops clock's time, for measurements that depend on it)."""
    from ..evaluate.providers import GateContext, collect_metrics
    from ..gates import evaluate_gates

    committed = {k: v for k, v in store.catalog.metrics(version_id, "val").items() if v == v}  # NaN: not measured

    def evaluate(now: float):
        ctx = GateContext(options={**(options or {}), "now": now})
        metrics, notes = collect_metrics(spec, ctx, given=committed)
        prov = {k: d["provenance"] for k, d in ctx.details.items() if isinstance(d, dict) and d.get("provenance")}
        return evaluate_gates(spec, metrics, notes, provenance=prov)

    return evaluate
