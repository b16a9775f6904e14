"""The seven operational KPIs (SPEC L4 / G-B1) from turn events (:mod:`distillgate.traffic.events`), per arm.

A session is the unit (events grouped by ``session_id``; its arm, start time and modules from its turns):

=========================  ==================================================================================
KPI                        definition (per arm)
=========================  ==================================================================================
``session_turns``          mean turns per session
``handoff_rate``           share of sessions with an ``escalate`` outcome (hand-off to a human agent)
``first_response_accuracy``share of sessions whose first answer was judged correct (sessions with a judged first
                           turn only)
``click_through``          clicked turns / turns
``review_pass_rate``       passing reviews / reviewed turns (turns sampled for human review)
``latency_volatility``     P99 / P50 of the turns' latencies
``abnormal_termination``   share of sessions ending in ``abandon`` or ``error``
=========================  ==================================================================================

:func:`window` keeps the sessions that started in the last ``days`` days before the newest event ("30 days"
is a window over event timestamps; simulated days in the simulator). :class:`Sessions` holds the per-session
arrays the statistics resample; each KPI is a function of index arrays into them, so a bootstrap resamples
sessions (whole conversations), not turns.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..traffic.events import TurnEvent, provenance_of

KPIS = ("session_turns", "handoff_rate", "first_response_accuracy", "click_through", "review_pass_rate",
        "latency_volatility", "abnormal_termination")
DAY = 86400.0


@dataclass
class Sessions:
    """Per-session arrays of one window (index ``i`` is one session)."""

    ids: list[str]
    arm: np.ndarray           # str
    start: np.ndarray         # float, unix seconds
    domain: np.ndarray        # str (of the first turn)
    modules: list[frozenset]  # union over the session's turns
    turns: np.ndarray         # int
    handoff: np.ndarray       # 0/1
    first_correct: np.ndarray  # 1/0, NaN: first turn not judged
    clicks: np.ndarray        # clicked turns
    reviewed: np.ndarray      # reviewed turns
    review_passed: np.ndarray
    abnormal: np.ndarray      # 0/1
    latencies: list[np.ndarray]  # per turn, ms
    provenance: str

    def __len__(self) -> int:
        return len(self.ids)

    def of_arm(self, arm: str) -> np.ndarray:
        return np.flatnonzero(self.arm == arm)


def sessions(events: list[TurnEvent]) -> Sessions:
    by: dict[str, list[TurnEvent]] = {}
    for e in events:
        by.setdefault(e.session_id, []).append(e)
    if not by:
        raise InputError("no traffic events: nothing to compute KPIs from")
    rows = []
    for sid, evs in by.items():
        evs.sort(key=lambda e: (e.turn, e.ts))
        arms = {e.arm for e in evs}
        if len(arms) > 1:
            raise InputError(f"session {sid}: turns from several arms {sorted(arms)} (assignment must be sticky)")
        first = evs[0]
        rows.append((sid, first.arm, first.ts, first.domain, frozenset(m for e in evs for m in e.modules), len(evs),
                     float(any(e.outcome == "escalate" for e in evs)),
                     np.nan if first.correct is None else float(first.correct), sum(e.clicked for e in evs),
                     sum(e.review_pass is not None for e in evs), sum(bool(e.review_pass) for e in evs),
                     float(evs[-1].outcome in ("abandon", "error")), np.array([e.latency_ms for e in evs], float)))
    c = list(zip(*rows))
    return Sessions(list(c[0]), np.array(c[1]), np.array(c[2], float), np.array(c[3]), list(c[4]),
                    np.array(c[5], float), np.array(c[6]), np.array(c[7], float), np.array(c[8], float),
                    np.array(c[9], float), np.array(c[10], float), np.array(c[11]), list(c[12]),
                    provenance_of(events))


def window(events: list[TurnEvent], days: float | None = 30.0, end: float | None = None) -> list[TurnEvent]:
    """Events of the sessions that started within ``days`` before ``end`` (default: the newest event)."""
    if days is None or not events:
        return list(events)
    end = max(e.ts for e in events) if end is None else end
    start_of: dict[str, float] = {}
    for e in events:
        start_of[e.session_id] = min(start_of.get(e.session_id, e.ts), e.ts)
    keep = {s for s, t in start_of.items() if end - days * DAY <= t <= end}
    return [e for e in events if e.session_id in keep]


# --------------------------------------------------------------------------------------- KPI functions
# Each takes the Sessions and index arrays of shape [..., n] (a bootstrap passes a batch) and returns [...].

def _mean(x, idx):
    return np.nanmean(x[idx], axis=-1) if np.isnan(x).any() else x[idx].mean(axis=-1)


def _ratio(num, den, idx):
    d = den[idx].sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(d > 0, num[idx].sum(axis=-1) / np.where(d > 0, d, 1), np.nan)


def _volatility(s: Sessions, idx):
    idx = np.asarray(idx)
    flat = idx.reshape(-1, idx.shape[-1])
    out = np.empty(flat.shape[0])
    for r, row in enumerate(flat):
        lat = np.concatenate([s.latencies[i] for i in row])
        p50 = np.percentile(lat, 50)
        out[r] = np.percentile(lat, 99) / p50 if p50 > 0 else np.nan
    return out.reshape(idx.shape[:-1])


def kpi(name: str, s: Sessions, idx) -> np.ndarray:
    """KPI ``name`` over the sessions ``idx`` (an index array, or a batch of them)."""
    idx = np.asarray(idx)
    if name == "session_turns":
        return _mean(s.turns, idx)
    if name == "handoff_rate":
        return _mean(s.handoff, idx)
    if name == "first_response_accuracy":
        with warnings.catch_warnings():  # a batch row without a judged first turn is NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(s.first_correct[idx], axis=-1)
    if name == "click_through":
        return _ratio(s.clicks, s.turns, idx)
    if name == "review_pass_rate":
        return _ratio(s.review_passed, s.reviewed, idx)
    if name == "latency_volatility":
        return _volatility(s, idx)
    if name == "abnormal_termination":
        return _mean(s.abnormal, idx)
    raise ValueError(f"unknown KPI {name!r}; allowed: {list(KPIS)}")


def per_arm(s: Sessions) -> dict[str, dict[str, float]]:
    """Every KPI per arm: ``{arm: {kpi: value}}`` (plus ``sessions`` and ``turns`` counts)."""
    out = {}
    for arm in sorted(set(s.arm.tolist())):
        idx = s.of_arm(arm)
        out[arm] = {k: float(kpi(k, s, idx)) for k in KPIS}
        out[arm].update(sessions=int(len(idx)), turns=int(s.turns[idx].sum()))
    return out
