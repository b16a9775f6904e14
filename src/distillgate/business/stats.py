"""A/B statistics for the business gates (SPEC G-B1): deltas with 95% confidence intervals by
:func:`scipy.stats.bootstrap`, the CI-width gate and a sample-size estimate.

The unit of resampling is the *session* (a conversation's turns are not independent); the two arms are
resampled independently (``paired=False``: different users), and one bootstrap gives every KPI's per-arm level
and arm delta, so their CIs come from the same resamples. Percentile intervals: BCa needs a jackknife over every
session and breaks down on the degenerate distributions small windows give (a KPI constant in one arm).

Deltas (the null value of each is 0, which the A/A test checks):

* ``session_turns``, ``handoff_rate``, ``latency_volatility``: relative change, ``100 * (candidate / control - 1)``
  in % (G-B1's "+8.2% turns", "-12.7% hand-offs");
* ``first_response_accuracy``, ``click_through``, ``review_pass_rate``, ``abnormal_termination``: difference in
  percentage points, ``100 * (candidate - control)``.

Gate metrics: ``session_turns_delta_pct``, ``handoff_delta_pct``, ``first_response_accuracy_pct`` (the
candidate's level, in %), and ``kpi_ci95_width_points``, the widest of those three CIs. The sample-size
estimate scales the window's sessions by ``(width / target)^2`` (a CI's width shrinks as 1/sqrt(n)): the
sessions a window needs for every G-B1 CI to be narrower than ``target`` points (1.5), per metric
(``sessions_needed_by``) and the most of the defined ones (``sessions_needed``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from ..errors import InputError
from .kpis import KPIS, Sessions, kpi

RELATIVE = ("session_turns", "handoff_rate", "latency_volatility")
GATE_KPIS = {"session_turns_delta_pct": ("session_turns", "delta"), "handoff_delta_pct": ("handoff_rate", "delta"),
             "first_response_accuracy_pct": ("first_response_accuracy", "candidate")}


def delta(name: str, a, b):
    if name in RELATIVE:
        with np.errstate(invalid="ignore", divide="ignore"):
            return 100.0 * (np.asarray(b) / np.asarray(a) - 1.0)
    return 100.0 * (np.asarray(b) - np.asarray(a))


def delta_unit(name: str) -> str:
    return "%" if name in RELATIVE else "points"


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def ab_test(s: Sessions, *, control: str = "control", candidate: str = "candidate", confidence: float = 0.95,
            n_resamples: int = 2000, seed: int = 0, target_width: float = 1.5) -> dict:
    """Per-arm levels, deltas and their bootstrap CIs for every KPI; the G-B1 gate values; sessions needed."""
    ia, ib = s.of_arm(control), s.of_arm(candidate)
    if len(ia) < 2 or len(ib) < 2:
        raise InputError(f"an A/B test needs >= 2 sessions per arm; {control}: {len(ia)}, {candidate}: {len(ib)} "
                         f"(more sessions, or a split nearer 0.5)")

    def statistic(xa, xb, axis=-1):
        la = [kpi(k, s, xa) for k in KPIS]
        lb = [kpi(k, s, xb) for k in KPIS]
        return np.stack(la + lb + [delta(k, a, b) for k, a, b in zip(KPIS, la, lb)], axis=0)

    point = statistic(ia, ib)
    with warnings.catch_warnings():  # a resample with an undefined KPI (no reviews) gives NaN, reported as such
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.bootstrap((ia, ib), statistic, vectorized=True, paired=False, confidence_level=confidence,
                              n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    lo, hi = res.confidence_interval.low, res.confidence_interval.high
    n = len(KPIS)
    out: dict = {"confidence": confidence, "n_resamples": n_resamples, "method": "scipy.stats.bootstrap percentile",
                 "sessions": {control: int(len(ia)), candidate: int(len(ib))}, "provenance": s.provenance, "kpis": {}}
    for j, k in enumerate(KPIS):
        def row(i):
            return {"value": _finite(point[i]), "ci": [_finite(lo[i]), _finite(hi[i])]}
        out["kpis"][k] = {"control": row(j), "candidate": row(n + j), "delta": row(2 * n + j)["value"],
                          "delta_ci": row(2 * n + j)["ci"], "delta_unit": delta_unit(k)}
    gate, widths = {}, {}
    for metric, (k, which) in GATE_KPIS.items():
        r = out["kpis"][k]
        value, ci = (r["delta"], r["delta_ci"]) if which == "delta" else (
            None if r["candidate"]["value"] is None else 100 * r["candidate"]["value"],
            [None if c is None else 100 * c for c in r["candidate"]["ci"]])
        gate[metric] = value
        widths[metric] = None if None in ci or value is None else ci[1] - ci[0]
        out.setdefault("gate_ci", {})[metric] = ci
    gate["kpi_ci95_width_points"] = None if None in widths.values() else max(widths.values())
    out["gate"], out["ci_width"] = gate, widths
    n = len(ia) + len(ib)
    out["sessions_needed_by"] = {m: sessions_needed({m: w}, n, target_width) for m, w in widths.items()}
    # the most any defined CI needs (an undefined CI, e.g. no control hand-offs, says nothing about its width)
    known = [v for v in out["sessions_needed_by"].values() if v is not None]
    out["sessions_needed"] = max(known) if known else None
    return out


def sessions_needed(widths: dict[str, float | None], n_sessions: int, target: float = 1.5) -> int | None:
    """Sessions (both arms) for every CI in ``widths`` to be narrower than ``target``: ``n * (w / target)^2``
    for the widest (a CI's width shrinks as 1/sqrt(n)). None when a width is undefined."""
    ws = list(widths.values())
    if not ws or any(w is None for w in ws):
        return None
    return int(math.ceil(n_sessions * (max(ws) / target) ** 2))


def contains_zero(ci) -> bool:
    return ci[0] is not None and ci[1] is not None and ci[0] <= 0.0 <= ci[1]
