"""Shapley attribution of KPI changes to the student's capability modules (SPEC G-B2).

**What an A/B log can tell.** The two arms differ as whole models: no log shows a candidate that is better at
arithmetic only. What a log does show is each session's module tags (the capabilities its requests exercise,
:data:`distillgate.traffic.types.MODULES`) and its outcome, per arm. So the game is played over *strata*:
sessions grouped by their exact module set ``T``.

**Value function.** With ``p_T`` the share of sessions (both arms pooled) in stratum ``T`` and ``Δ_T`` the KPI's
arm difference inside it (candidate mean minus control mean),

    v(S) = Σ_{T ⊆ S, T ≠ ∅}  p_T · Δ_T

is the change the KPI would show if only the requests that need nothing but the modules in ``S`` changed. Then
``v(∅) = 0`` and ``v(all modules)`` is the post-stratified estimate of the total change (it equals the raw
difference of the arm means when both arms see the same mix; the gap between the two is the mix imbalance,
reported as ``imbalance``). Shapley values are computed exactly, by enumerating every coalition
(``2^m`` for ``m`` modules, at most :data:`MAX_EXACT`); for this game they equal ``Σ_{T ∋ i} p_T Δ_T / |T|``,
the closed form the bootstrap uses.

**Properties** (tested): efficiency, ``Σ φ_i = v(all)``; a module in no stratum whose arms differ gets 0 (null
player); on A/A traffic every value's CI contains 0.

**Assumptions, honestly.** (1) Modules that always appear together cannot be told apart by any log: a
stratum's change is split equally among its modules (symmetry), so a gain from arithmetic in requests tagged
``{time_reasoning, arithmetic}`` is half credited to time reasoning unless strata with one but not the other
exist. (2) Strata seen in only one arm carry no Δ and are left out (``unattributed_share``). (3) Tags are the
traffic type's, not measured per answer. CIs: percentile bootstrap over sessions within each arm
(:func:`scipy.stats.bootstrap`, like the KPIs), Bonferroni-adjusted over the modules so they hold together; a
module whose CI contains 0 is reported as not distinguishable from chance.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
from scipy import stats

from .kpis import Sessions

MAX_EXACT = 12
SHAPLEY_KPIS = {"session_turns": "turns", "handoff_rate": "handoff", "first_response_accuracy": "first_correct"}


def _values(s: Sessions, kpi_name: str) -> np.ndarray:
    return getattr(s, SHAPLEY_KPIS[kpi_name]).astype(float)


def _codes(s: Sessions) -> tuple[np.ndarray, list[frozenset]]:
    sets = sorted(set(s.modules), key=lambda t: sorted(t))
    pos = {t: i for i, t in enumerate(sets)}
    return np.array([pos[t] for t in s.modules], dtype=np.int64), sets


def strata(s: Sessions, y: np.ndarray, ia, ib, codes=None) -> tuple[dict[frozenset, float], float]:
    """``({T: p_T * Δ_T}, unattributed share)`` over the sessions ``ia`` (control) and ``ib`` (candidate)."""
    code, sets = codes or _codes(s)
    k = len(sets)
    cnt, tot = [], []
    for idx in (np.asarray(ia), np.asarray(ib)):
        ok = idx[~np.isnan(y[idx])]
        cnt.append(np.bincount(code[ok], minlength=k).astype(float))
        tot.append(np.bincount(code[ok], weights=y[ok], minlength=k))
    n = cnt[0].sum() + cnt[1].sum()
    out: dict[frozenset, float] = {}
    left_out = 0.0
    for j, t in enumerate(sets):
        na, nb = cnt[0][j], cnt[1][j]
        if na + nb == 0:
            continue
        if not t or na == 0 or nb == 0:
            left_out += na + nb
            continue
        out[t] = (na + nb) / n * (tot[1][j] / nb - tot[0][j] / na)
    return out, (left_out / n if n else 1.0)


def value(dividends: dict[frozenset, float], coalition: frozenset) -> float:
    return float(sum(d for t, d in dividends.items() if t <= coalition))


def exact_shapley(players: list[str], v) -> dict[str, float]:
    """Exact Shapley values of game ``v(frozenset) -> float`` over ``players`` by enumerating coalitions."""
    m = len(players)
    if m > MAX_EXACT:
        raise ValueError(f"{m} modules: exact Shapley enumerates 2^{m} coalitions; at most {MAX_EXACT}")
    cache: dict[frozenset, float] = {}

    def val(c):
        if c not in cache:
            cache[c] = v(c)
        return cache[c]

    out = {}
    for p in players:
        rest = [q for q in players if q != p]
        tot = 0.0
        for r in range(len(rest) + 1):
            w = math.factorial(r) * math.factorial(m - r - 1) / math.factorial(m)
            for c in itertools.combinations(rest, r):
                c = frozenset(c)
                tot += w * (val(c | {p}) - val(c))
        out[p] = tot
    return out


def _closed_form(players, dividends) -> np.ndarray:
    return np.array([sum(d / len(t) for t, d in dividends.items() if p in t) for p in players], dtype=float)


def attribute(s: Sessions, kpi_name: str, *, modules: list[str] | None = None, control: str = "control",
              candidate: str = "candidate", confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0,
              scale: float = 1.0, simultaneous: bool = True) -> dict:
    """Shapley values of ``kpi_name``'s arm change over ``modules`` (default: every tag seen), each with a
    bootstrap CI. ``scale`` multiplies every value (e.g. 100 for points, 100 / control mean for %).
    ``simultaneous``: Bonferroni-adjusted intervals (level ``1 - (1 - confidence) / m`` each), so that all
    ``m`` modules' intervals hold together at ``confidence``: with eight modules, eight 95% intervals would
    show a "significant" module on a third of A/A windows."""
    y = _values(s, kpi_name)
    ia, ib = s.of_arm(control), s.of_arm(candidate)
    players = sorted(modules if modules is not None else {m for ms in s.modules for m in ms})
    codes = _codes(s)
    div, unattributed = strata(s, y, ia, ib, codes)
    phi = exact_shapley(players, lambda c: value(div, c))
    total = value(div, frozenset(players))
    raw = float(np.nanmean(y[ib]) - np.nanmean(y[ia])) if len(ia) and len(ib) else float("nan")

    def statistic(xa, xb, axis=-1):
        xa, xb = np.atleast_2d(xa), np.atleast_2d(xb)
        return np.stack([_closed_form(players, strata(s, y, a, b, codes)[0]) for a, b in zip(xa, xb)], axis=1)

    level = 1.0 - (1.0 - confidence) / max(len(players), 1) if simultaneous else confidence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.bootstrap((ia, ib), statistic, vectorized=True, paired=False, confidence_level=level,
                              n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    rows = {}
    for j, p in enumerate(players):
        ci = [float(lo[j]) * scale, float(hi[j]) * scale]
        rows[p] = {"value": phi[p] * scale, "ci": ci, "significant": not (ci[0] <= 0.0 <= ci[1])}
    abs_total = sum(abs(d) for d in div.values())
    return {"kpi": kpi_name, "modules": rows, "ci_level": level, "total": total * scale, "raw_delta": raw * scale,
            "imbalance": (raw - total) * scale, "unattributed_share": unattributed,
            "coverage": 1.0 - unattributed, "strata": {"+".join(sorted(t)): d * scale for t, d in div.items()},
            "efficiency_gap": abs(sum(phi.values()) - total) * scale, "abs_change": abs_total * scale}
