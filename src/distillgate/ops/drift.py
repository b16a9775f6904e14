"""G-O2 knowledge drift: a daily job on the traffic log; three days in a row over 0.042 start a recalibration.

**The daily drift measure.** For day ``d`` (whole days from the release, day 0 = the release day, on the
:mod:`clock <distillgate.ops.clock>` the log's ``ts`` use) take the turns of the student's arm (``arm``,
default ``candidate``) whose domain is one of ``unseen_domains`` (domains the student was not distilled on;
``None``: every domain). Each answer is split into lower-cased word tokens. The categories are the
``vocab_top_k`` most frequent tokens of the *reference*, plus one ``<other>`` bucket; the reference is the same
selection of turns over the first ``reference_days`` days (the student's outputs at release). With counts
``c`` smoothed by ``alpha`` (additive), ``p_d = (c_d + alpha) / (N_d + alpha K)``, and

    drift(d) = KL(p_d || p_ref) = sum_k p_d[k] * ln(p_d[k] / p_ref[k])      (nats)

The confidence interval is a BCa bootstrap (bias-corrected: the plug-in KL is biased upwards, and a plain
percentile interval can miss its own estimate) over the day's turns (:func:`scipy.stats.bootstrap`,
``n_resamples``, ``confidence``); the reference is held fixed. The plug-in estimate is biased upwards by about
``(K - 1) / (2 N_d)`` (reported per day as ``bias``); with ``vocab_top_k`` 64 that is under 0.01 nats from
~3,200 tokens a day, which is why a day with fewer than ``min_tokens`` tokens is ``insufficient`` rather than
measured. An insufficient day breaks a streak.

**Trigger.** ``consecutive_days`` (3) measured days in a row with drift above ``threshold`` (0.042) trigger on
the last of them, once the day is complete on the clock; the turns of those days become the seed of a
recalibration (:class:`DriftStage`: the next loop iteration trains on the teacher's answers to them).
The G-O2 gate's metric ``drift_kl_min_3day`` is the smallest drift of the last ``consecutive_days`` complete
days (above the threshold means "recalibrate"); None until that many days are measured.

What this measures is the shift of the student's *answers* (their token distribution) on unseen-domain
traffic, from the log alone; the variant over the student's next-token probabilities on the same requests
needs the model at hand and is not built.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError, InputError
from ..evaluate.providers import GateContext, register_metric_provider
from ..schema import Finding
from ..traffic.events import TurnEvent, provenance_of, read_events
from .clock import DAY, Clock, WallClock, day_index

OTHER = "<other>"
_WORD = re.compile(r"\w+", re.UNICODE)


class DriftOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float | None = Field(None, gt=0, description="daily drift (KL, nats) above which a day counts; None: "
                                    "the G-O2 gate's threshold (the drift stage reads the run's gate spec)")
    consecutive_days: int = Field(3, ge=1, description="days in a row above the threshold that start a "
                                                       "recalibration")
    unseen_domains: list[str] | None = Field(None, description="domains the student was not distilled on; "
                                             "None: every domain")
    arm: str = Field("candidate", description="the arm whose answers are the student's")
    reference_days: int = Field(1, ge=1, description="days from the release that make the reference distribution")
    vocab_top_k: int = Field(64, ge=2, description="reference tokens kept as categories (the rest: one bucket)")
    alpha: float = Field(0.5, gt=0, description="additive smoothing of the token counts")
    min_tokens: int = Field(2000, ge=1, description="tokens a day needs to be measured")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="confidence level of the daily interval")
    n_resamples: int = Field(200, ge=50, description="bootstrap resamples of the daily interval")
    seed: int = 0
    max_seed_samples: int = Field(32, ge=1, description="most drifted requests that seed a recalibration")


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _counts(rows: list[list[str]], index: dict[str, int]) -> np.ndarray:
    """(n_turns, K+1) counts: one row per turn, the last column the ``<other>`` bucket."""
    m = np.zeros((len(rows), len(index) + 1))
    for i, toks in enumerate(rows):
        for t in toks:
            m[i, index.get(t, len(index))] += 1
    return m


def _kl(c: np.ndarray, ref_p: np.ndarray, alpha: float) -> float:
    p = (c + alpha) / (c.sum() + alpha * len(c))
    return float(np.sum(p * np.log(p / ref_p)))


def _interval(m: np.ndarray, ref_p: np.ndarray, opts: DriftOptions, day: int):
    """BCa interval of the day's KL over its turns; percentile where BCa is undefined (a degenerate jackknife)."""
    import warnings

    from scipy.stats import bootstrap

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ci = bootstrap((np.arange(len(m)),), lambda i: _kl(m[i.astype(int)].sum(0), ref_p, opts.alpha),
                           vectorized=False, n_resamples=opts.n_resamples, confidence_level=opts.confidence,
                           method=method, random_state=np.random.default_rng(opts.seed + day)).confidence_interval
        if math.isfinite(ci.low) and math.isfinite(ci.high):
            return ci
    return ci


def daily_drift(events: list[TurnEvent], opts: DriftOptions, *, release_ts: float | None = None,
                until: float | None = None, tokenize: Callable[[str], list[str]] = tokens) -> dict:
    """The daily drift of ``events`` (see the module docstring) for every day complete by ``until``.

    Returns ``{release_ts, days: [{day, start_ts, n_turns, n_tokens, kl, ci_low, ci_high, bias, above,
    status}], trigger_day, streak_days, drift_kl_min_3day, seed_prompts, provenance}``; ``trigger_day``: the
    first day that completed ``consecutive_days`` above the threshold (None: none did)."""
    if opts.threshold is None:
        raise ConfigError("drift.threshold", None, "a positive KL in nats (the drift stage takes the G-O2 gate's)")
    sel = [e for e in events if e.arm == opts.arm and e.response
           and (opts.unseen_domains is None or e.domain in opts.unseen_domains)]
    if not sel:
        raise InputError(f"drift: no answered turns of arm {opts.arm!r}"
                         + (f" in domains {opts.unseen_domains}" if opts.unseen_domains else "") + " in the log")
    origin = min(e.ts for e in sel) if release_ts is None else float(release_ts)
    until = max(e.ts for e in sel) if until is None else float(until)
    by_day: dict[int, list[TurnEvent]] = {}
    for e in sel:
        by_day.setdefault(day_index(e.ts, origin), []).append(e)
    ref_rows = [tokenize(e.response) for d in range(opts.reference_days) for e in by_day.get(d, [])]
    freq = Counter(t for toks in ref_rows for t in toks)
    if not freq:
        raise InputError(f"drift: the reference window (days 0..{opts.reference_days - 1} from the release) "
                         "has no answer tokens")
    index = {t: i for i, (t, _) in enumerate(freq.most_common(opts.vocab_top_k))}
    ref_c = _counts(ref_rows, index).sum(0)
    ref_p = (ref_c + opts.alpha) / (ref_c.sum() + opts.alpha * len(ref_c))
    last_complete = day_index(until, origin) - 1  # day d is complete once origin + (d + 1) days have passed
    days, streak, trigger, streak_rows = [], 0, None, []
    for d in range(opts.reference_days, last_complete + 1):
        evs = by_day.get(d, [])
        m = _counts([tokenize(e.response) for e in evs], index)
        n_tok = float(m.sum())
        row = {"day": d, "start_ts": origin + d * DAY, "n_turns": len(evs), "n_tokens": int(n_tok)}
        if n_tok < opts.min_tokens or len(evs) < 2:
            row.update(kl=None, ci_low=None, ci_high=None, bias=None, above=False, status="insufficient")
            streak, streak_rows = 0, []
        else:
            kl = _kl(m.sum(0), ref_p, opts.alpha)
            ci = _interval(m, ref_p, opts, d)
            above = kl > opts.threshold
            row.update(kl=kl, ci_low=float(ci.low), ci_high=float(ci.high), bias=(m.shape[1] - 1) / (2 * n_tok),
                       above=above, status="measured")
            streak = streak + 1 if above else 0
            streak_rows = streak_rows + evs if above else []
            if streak >= opts.consecutive_days and trigger is None:
                trigger = d
                seed = streak_rows
        days.append(row)
    tail = days[-opts.consecutive_days:]
    metric = (min(r["kl"] for r in tail) if len(tail) == opts.consecutive_days
              and all(r["status"] == "measured" for r in tail) else None)
    seeds = []
    if trigger is not None:
        seen = set()
        for e in seed:  # first turns first: they carry the request that opened the session
            if e.request and e.request not in seen and len(seeds) < opts.max_seed_samples:
                seen.add(e.request)
                seeds.append({"text": e.request, "domain": e.domain, "traffic_type": e.traffic_type,
                              "session_id": e.session_id})
    return {"release_ts": origin, "until": until, "threshold": opts.threshold,
            "consecutive_days": opts.consecutive_days, "days": days, "trigger_day": trigger,
            "streak_days": streak, "drift_kl_min_3day": metric, "seed_prompts": seeds,
            "provenance": provenance_of(sel)}


def format_days(report: dict) -> str:
    out = []
    for r in report["days"]:
        if r["status"] != "measured":
            out.append(f"  day {r['day']}: insufficient ({r['n_tokens']} tokens)")
        else:
            out.append(f"  day {r['day']}: KL {r['kl']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
                       + (" > threshold" if r["above"] else ""))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ G-O2 gate

def drift_metric(ctx: GateContext) -> float | None:
    """G-O2: ``drift_kl_min_3day`` of the drift report the drift stage put in ``options['drift']``."""
    rep = ctx.options.get("drift")
    if not rep:
        ctx.details["drift_kl_min_3day"] = {"note": "no drift report (the drift stage makes one from the log)"}
        return None
    ctx.details["drift_kl_min_3day"] = {"provenance": rep["provenance"], "days": len(rep["days"]),
                                        "trigger_day": rep["trigger_day"],
                                        **({} if rep["drift_kl_min_3day"] is not None else
                                           {"note": f"fewer than {rep['consecutive_days']} measured days"})}
    return rep["drift_kl_min_3day"]


register_metric_provider("drift_kl_min_3day", drift_metric, higher_is_better=False, regression=False,
                         description="smallest daily drift KL of the last three days, unseen domains (G-O2)",
                         module=__name__)


# ------------------------------------------------------------------------------------------------ the stage

class DriftStageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    drift: DriftOptions = Field(default_factory=DriftOptions, description="the daily drift measure and trigger")
    log: str | None = Field(None, description="JSONL traffic event log (real, replay or simulated); None: the "
                                              "newest A/B window the production stage wrote this run")
    clock: Literal["wall", "log"] = Field("wall", description="'wall': days complete by this machine's time; "
                                          "'log': by the log's last event (the simulator's clock)")
    release_ts: float | None = Field(None, description="unix time of the release (day 0); None: the first event")


class DriftStage:
    """G-O2 as a loop stage (``iterations: 0``; it watches every iteration): the daily job runs at validate,
    its verdict is the G-O2 gate, and a trigger seeds the next iteration with the drifted requests
    (rule ``drift_recalibration`` writes ``drift.prompts``; the next extract has the teacher answer them and
    they join training)."""

    name, code = "drift", "G-O2"
    Options = DriftStageOptions

    def __init__(self, options: DriftStageOptions | None = None, clock: Clock | None = None):
        self.options = options or DriftStageOptions()
        self.clock = clock

    def _state(self, run) -> dict:
        return run.stage_state(getattr(self, "state_key", self.name))

    def observe(self, phase, it, run) -> None:
        if phase == "extract":
            self._feed(it, run)
        elif phase == "validate":
            self._measure(it, run)
        elif phase == "attribute" and it.measure_options.get("drift"):
            rep = it.measure_options["drift"]
            done = self._state(run).setdefault("triggers", [])
            key = [rep["release_ts"], rep["trigger_day"]]
            if rep["trigger_day"] is not None and key not in done:
                done.append(key)
                it.findings.append(Finding(
                    "drift", "warning", "drift",
                    f"knowledge drift above {rep['threshold']} for {rep['consecutive_days']} days in a row "
                    f"(day {rep['trigger_day']} from the release, {rep['provenance']} traffic): recalibrate on "
                    f"{len(rep['seed_prompts'])} drifted request(s)",
                    {"prompts": rep["seed_prompts"], "trigger_day": rep["trigger_day"],
                     "days": [{k: r[k] for k in ("day", "kl", "ci_low", "ci_high")} for r in rep["days"]]},
                    it.index))

    def _log(self, run) -> Path | None:
        if self.options.log:
            return Path(self.options.log)
        logs = sorted(Path(run.work).glob("traffic-*.jsonl"))
        return logs[-1] if logs else None

    def _measure(self, it, run) -> None:
        path = self._log(run)
        if path is None or not path.is_file():
            run.say(f"  G-O2: no traffic log yet ({path or 'no A/B window written'}); drift not measured")
            return
        events = read_events(path)
        o = self.options
        try:
            if self.clock is not None or o.clock == "wall":
                until = (self.clock or WallClock()).now()
            else:  # the log is complete through its last event's day
                origin = o.release_ts if o.release_ts is not None else min(e.ts for e in events)
                until = origin + (day_index(max(e.ts for e in events), origin) + 1) * DAY
            rep = daily_drift(events, self._drift_options(run), release_ts=o.release_ts, until=until)
        except InputError as e:
            run.say(f"  G-O2 drift not measured: {e}")
            return
        it.measure_options["drift"] = rep
        if "drift_kl_min_3day" not in it.extra_metrics:
            it.extra_metrics.append("drift_kl_min_3day")
        import json

        from ..io import atomic_write_text

        out = Path(run.work) / f"drift-{it.index:03d}.json"
        atomic_write_text(out, json.dumps(rep, indent=1))
        it.files["drift.json"] = out
        run.say(f"  G-O2 drift ({rep['provenance']}, {len(rep['days'])} days):\n" + format_days(rep)
                + (f"\n  recalibration: day {rep['trigger_day']}" if rep["trigger_day"] is not None else ""))

    def _drift_options(self, run) -> DriftOptions:
        """The options with the threshold in one place: the G-O2 gate's (``drift_kl_min_3day``) unless set here."""
        o = self.options.drift
        if o.threshold is not None:
            return o
        from ..gates import load_gate_spec

        gate = next((g for g in load_gate_spec(run.cfg.loop.gates_spec).gates if g.metric == "drift_kl_min_3day"), None)
        if gate is None:
            raise ConfigError(f"loop.stages[{getattr(self, 'state_key', self.name)}].options.drift.threshold", None,
                              "a KL threshold: the gate spec has no drift_kl_min_3day (G-O2) gate to take it from")
        return o.model_copy(update={"threshold": gate.threshold})

    def _feed(self, it, run) -> None:
        """The requests the last ``drift_recalibration`` chose join training with the teacher's answers; every
        group fed so far is re-added after a resume (state ``fed``)."""
        from ..loop.training_set import feed_requests

        for _, n in feed_requests(run, self._state(run), it, "drift", "drift", "drift-"):
            run.say(f"  G-O2 recalibration: {n} drifted request(s) join training")

    def rules(self):
        def drift_recalibration(s) -> None:
            """Three days of drift: next iteration trains on the drifted requests (G-O2 recalibration)."""
            found = s.of_kind("drift")
            old = (s.get("drift") or {}).get("prompts") or []
            new = found[-1].evidence["prompts"] if found else []
            if new != old:
                s.record("drift_recalibration", "drift.prompts", len(old), len(new),
                         found[-1].message if new else "no drift trigger: nothing to recalibrate on",
                         value=new)  # a list, empty when cleared (record writes ``new`` for None)

        return [("drift_recalibration", drift_recalibration)]
