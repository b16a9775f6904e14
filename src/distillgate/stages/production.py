"""The production stage (SPEC L4, G-B): an A/B window per iteration, its KPIs in the business gates, and their
feedback into the next round.

In every iteration it watches (``observe``; from ``start_iteration``, every ``every``-th), after the student was
trained (at the start of validate):

1. **A/B window**: ``traffic.sessions`` simulated sessions (:mod:`distillgate.traffic.generator`) over
   ``traffic.days`` simulated days; users are split sticky between the arms ``control`` (``control: teacher``,
   the production model; or ``last_good``, the last stable version of the student) and ``candidate`` (the
   student as it is now). Both arms answer in this process (:class:`~distillgate.traffic.arms.ModelArm`), with
   their latency and TTFT measured. Events go to ``traffic.jsonl`` (the event-log schema real logs use) and the
   evaluation (:func:`distillgate.business.window.evaluate_window`: KPIs per arm with CIs, deltas, Shapley
   attributions, per-domain KPIs, sessions needed) to ``business.json``, both committed with the version;
2. **gates**: the G-B metrics are measured from that window through the metric registry, carrying its
   provenance (``simulated``) into the gate table, the report and the verdict;
3. **feedback** (at attribute, then this stage's rules in compensate, each decision with its reason):
   ``traffic_feedback``: requests the candidate failed become next round's prompts (the teacher's answers join
   training; the consistency stage takes them as S4 challenge sources); ``kpi_domain``: a domain whose
   first-response accuracy falls short of the candidate's overall by ``domain_shortfall_points`` gets more loss
   weight and data; ``latency_prune``: a latency-volatility ratio (candidate / control P99/P50) over
   ``volatility_budget`` or a TTFT ratio over ``ttft_budget`` raises ``prune.strength`` (S3) by
   ``prune_factor`` (list this stage after ``prune`` in ``loop.stages``: prune's own rule resets the strength
   when it runs later).

Give it ``iterations: 0`` (it owns no iteration of its own; it watches the others).
"""

from __future__ import annotations

import json
import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InputError
from ..io import atomic_write_text
from ..schema import Finding
from ..traffic.generator import TrafficOptions

log = logging.getLogger(__name__)
TRAFFIC_PREFIX = "traffic-"


class ProductionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    traffic: TrafficOptions = Field(default_factory=TrafficOptions,
                                    description="the simulated A/B window (sessions, days, users, types, domains, "
                                                "user behaviour)")
    control: Literal["teacher", "last_good"] = Field("teacher", description="the production arm: the teacher, or "
                                                     "the last stable student version (the teacher until one exists)")
    judge: bool = Field(False, description="the teacher also answers requests without a reference, so the S4 "
                                           "checks grade against its answer (slower: one more generation each)")
    max_new_tokens: int = Field(32, ge=1, description="answer length of both arms")
    through: Literal["process", "gateway"] = Field("process", description="how the arms answer: in this process "
                                                   "(the models in memory), or through the gateway: both versions "
                                                   "behind real backends (loop.serving.backend), sticky A/B "
                                                   "assignment and the request log of `distillgate serve` "
                                                   "(the log is committed next to the events)")
    start_iteration: int = Field(1, ge=0, description="first iteration with an A/B window")
    every: int = Field(1, ge=1, description="an A/B window every this many iterations")
    window_days: float = Field(30.0, gt=0, description="the KPI window over event timestamps (G-B1: 30 days)")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="confidence level of every interval")
    n_resamples: int = Field(2000, ge=100, description="bootstrap resamples of the KPI intervals")
    shapley_resamples: int = Field(300, ge=50, description="bootstrap resamples of the Shapley intervals")
    target_width: float = Field(1.5, gt=0, description="CI width (points) the sample-size estimate aims at")
    feedback_prompts: int = Field(16, ge=0, description="most failed traffic requests fed back per round")
    domain_shortfall_points: float = Field(10.0, gt=0, description="a domain's first-response accuracy this many "
                                           "points under the candidate's overall is a KPI shortfall")
    min_domain_sessions: int = Field(3, ge=1, description="sessions a domain needs before it can fall short")
    volatility_budget: float = Field(1.3, gt=0, description="latency-volatility ratio (candidate / control) over "
                                     "which pruning strength rises (G-P2's 1.3)")
    ttft_budget: float = Field(0.65, gt=0, description="median TTFT ratio (candidate / control) over which "
                               "pruning strength rises (G-P1's 0.65)")
    prune_factor: float = Field(1.25, gt=1.0, le=4.0, description="factor prune.strength rises by")
    max_prune_strength: float = Field(2.0, gt=0, description="ceiling of prune.strength this stage sets")


class ProductionStage:
    name, code = "production", "L4"
    Options = ProductionOptions

    def __init__(self, options: ProductionOptions | None = None):
        self.options = options or ProductionOptions()

    def _state(self, run) -> dict:
        return run.stage_state(getattr(self, "state_key", self.name))

    def _due(self, k: int) -> bool:
        o = self.options
        return k >= o.start_iteration and (k - o.start_iteration) % o.every == 0

    # ------------------------------------------------------------------------------------- phases
    def observe(self, phase, it, run) -> None:
        if phase == "extract":
            self._feed(it, run)
        elif phase == "validate" and self._due(it.index):
            self._window(it, run)
        elif phase == "attribute" and it.measure_options.get("business"):
            it.findings += self._findings(it.measure_options["business"], it.index)

    def _feed(self, it, run) -> None:
        """Failed traffic requests the last rule chose (``recipe.traffic.prompts``) join training with the
        teacher's answers; every group fed so far is re-added after a resume (state ``fed``)."""
        from ..loop.training_set import feed_requests

        for g, n in feed_requests(run, self._state(run), it, "traffic", "traffic", TRAFFIC_PREFIX):
            run.say(f"  L4: {n} failed traffic request(s) of iteration {g['iteration'] - 1} join training")

    def _window(self, it, run) -> None:
        import time

        from ..business.window import evaluate_window
        from ..traffic.arms import ModelArm
        from ..traffic.events import write_events
        from ..traffic.generator import simulate

        o = self.options
        tok = run.teacher.tokenizer
        control_model, control_name = run.teacher.model, "teacher"
        if o.control == "last_good" and run.state.last_good is not None and run.state.last_good.version is not None:
            from ..models import load_model

            v = run.store.get_version(int(run.state.last_good.version))
            folder = v.checkout("student", run.work / "production-control", replace=True)
            control_model, control_name = load_model(str(folder)).model, f"version {v.version_id}"
        arms = {"control": ModelArm("control", control_model, tok, max_new_tokens=o.max_new_tokens,
                                    version=control_name),
                "candidate": ModelArm("candidate", run.student, tok, max_new_tokens=o.max_new_tokens,
                                      version=f"iteration {it.index}")}
        judge = ModelArm("judge", run.teacher.model, tok, max_new_tokens=o.max_new_tokens) if o.judge else None
        traffic = o.traffic.model_copy(update={"seed": o.traffic.seed * 1000 + it.index})
        t0 = time.time()
        run.work.mkdir(parents=True, exist_ok=True)
        if o.through == "gateway":
            events = self._through_gateway(it, run, control_model, control_name, traffic, judge)
        else:
            events = simulate(arms, traffic, judge=judge)
        it.files["traffic.jsonl"] = write_events(run.work / f"traffic-{it.index:03d}.jsonl", events)
        try:
            b = evaluate_window(events, window_days=o.window_days, confidence=o.confidence,
                                n_resamples=o.n_resamples, shapley_resamples=o.shapley_resamples, seed=traffic.seed,
                                target_width=o.target_width)
        except InputError as e:  # too few sessions in an arm: the gates stay not measured, saying why
            it.findings.append(Finding("data", "warning", "production", f"A/B window not evaluated: {e}", {}, it.index))
            run.say(f"  L4 A/B window not evaluated: {e}")
            return
        b.update(iteration=it.index, control=control_name, seconds=round(time.time() - t0, 1),
                 latency=_latency(events), failed=_failed(events, o.feedback_prompts))
        path = run.work / f"business-{it.index:03d}.json"
        atomic_write_text(path, json.dumps(b, indent=1, default=str))
        it.files["business.json"] = path
        it.measure_options["business"] = b
        from ..business.window import GATE_METRICS, KPI_DELTAS

        it.extra_metrics += [m for m in [*GATE_METRICS, *KPI_DELTAS] if m not in it.extra_metrics]
        g, ab = b["gate"], b["ab"]["kpis"]
        run.say(f"  L4 A/B window ({b['provenance']}, control = {control_name}): {b['sessions']} sessions, "
                f"{b['turns']} turns in {b['seconds']:.0f} s; turns {_pm(g['session_turns_delta_pct'], '%')}, "
                f"hand-offs {_pm(g['handoff_delta_pct'], '%')}, first-response accuracy "
                f"{_pm(g['first_response_accuracy_pct'], '%', sign=False)} (control "
                f"{_pm(100 * (ab['first_response_accuracy']['control']['value'] or 0), '%', sign=False)}); widest CI "
                f"{_pm(g['kpi_ci95_width_points'], ' points', sign=False)}, ~{b['sessions_needed'] or '?'} "
                f"sessions for {o.target_width:g}")

    def _through_gateway(self, it, run, control_model, control_name, traffic, judge):
        """The A/B window through the real serving path: both arms saved to folders and started as backends
        (``loop.serving``), the gateway in front of them with sticky assignment (``candidate_weight``), the
        simulated users talking to it over loopback (:class:`~distillgate.traffic.arms.GatewayArm`), every
        request in the gateway's request log (committed as ``requests.sqlite``)."""
        import shutil

        from ..serve import backends
        from ..serve.assign import Assigner
        from ..serve.client import GatewayClient
        from ..serve.gateway import GatewayState, build_app
        from ..serve.log import RequestLog
        from ..serve.server import ThreadedServer
        from ..traffic.arms import GatewayArm
        from ..traffic.generator import simulate

        o, spec = self.options, run.cfg.loop.serving
        work = run.work / f"production-{it.index:03d}"
        shutil.rmtree(work, ignore_errors=True)
        folders = {}
        for arm, model in (("control", control_model), ("candidate", run.student)):
            folders[arm] = work / arm
            model.save_pretrained(folders[arm], safe_serialization=True)
            run.teacher.tokenizer.save_pretrained(folders[arm])
        started = backends.start_many(spec.backend, folders, work / "logs", device=spec.device,
                                      timeout=spec.startup_timeout_s, threads=spec.backend_threads)
        arms = {b.version: b for b in started}
        log = RequestLog(work / "requests.sqlite")
        state = GatewayState(arms=arms, assigner=Assigner(spec.experiment, {
            "control": 1.0 - spec.candidate_weight, "candidate": spec.candidate_weight}),
            request_log=log, max_body_bytes=spec.max_body_bytes, max_tokens_limit=spec.max_tokens_limit,
            stop_replaced=False)
        try:
            with ThreadedServer(build_app(state)) as server, GatewayClient(server.url) as client:
                events = simulate(GatewayArm(client, max_new_tokens=o.max_new_tokens), traffic, judge=judge)
        finally:
            log.close()
            for b in started:
                b.stop()
        it.files["requests.sqlite"] = work / "requests.sqlite"
        return events

    def _findings(self, b: dict, k: int) -> list[Finding]:
        o, out = self.options, []
        if b["failed"]:
            out.append(Finding("traffic_failures", "info", "traffic",
                               f"{len(b['failed'])} request(s) the candidate failed in the A/B window "
                               f"({b['provenance']})", {"prompts": b["failed"], "provenance": b["provenance"]}, k))
        overall = b["arms"].get("candidate", {}).get("first_response_accuracy")
        for d, arms in b["domains"].items():
            c = arms.get("candidate", {})
            acc = c.get("first_response_accuracy")
            if overall is None or acc is None or c.get("sessions", 0) < o.min_domain_sessions:
                continue
            if 100 * (overall - acc) > o.domain_shortfall_points:
                out.append(Finding("kpi_shortfall", "warning", d,
                                   f"{d}: first-response accuracy {100 * acc:.0f}% vs {100 * overall:.0f}% overall "
                                   f"({c['sessions']} sessions, {b['provenance']} traffic)",
                                   {"domain": d, "accuracy": acc, "overall": overall,
                                    "provenance": b["provenance"]}, k))
        lat = b["latency"]
        over = {}
        if lat.get("volatility_ratio") is not None and lat["volatility_ratio"] > o.volatility_budget:
            over["volatility_ratio"] = lat["volatility_ratio"]
        if lat.get("ttft_ratio") is not None and lat["ttft_ratio"] > o.ttft_budget:
            over["ttft_ratio"] = lat["ttft_ratio"]
        if over:
            out.append(Finding("latency_budget", "warning", "latency",
                               "A/B window over the latency budget: " + ", ".join(
                                   f"{n} {v:.2f} > {o.volatility_budget if n == 'volatility_ratio' else o.ttft_budget}"
                                   for n, v in over.items()), {**lat, "over": over}, k))
        return out

    # ------------------------------------------------------------------------------------- strategy
    def rules(self):
        o = self.options

        def traffic_feedback(s) -> None:
            """Failed traffic requests become next round's prompts (extract) and S4 challenge sources."""
            found = s.of_kind("traffic_failures")
            old = (s.get("traffic") or {}).get("prompts") or []
            new = found[-1].evidence["prompts"] if found else []
            if new != old:
                s.record("traffic_feedback", "traffic.prompts", len(old), len(new),
                         (f"{len(new)} request(s) failed in the A/B window ({found[-1].evidence['provenance']} "
                          f"traffic) become next round's prompts and S4 challenge sources") if new else
                         "no failed traffic requests to feed back", value=new or None)

        def kpi_domain(s) -> None:
            """A domain short on first-response accuracy gets more loss weight and a larger data share."""
            spec = s.spec
            for f in s.of_kind("kpi_shortfall"):
                d = f.evidence["domain"]
                w = float(s.get(f"loss.domain_weights.{d}") or 1.0)
                s.change("kpi_domain", f"loss.domain_weights.{d}",
                         round(min(spec.max_weight, w * spec.weight_factor), 4),
                         f.message + f"; loss weight x{spec.weight_factor}")
                mix = s.get("data.mix")
                if isinstance(mix, dict) and d in mix and "data.mix" not in s.cooling:
                    boosted = dict(mix)
                    boosted[d] = mix[d] * spec.weight_factor
                    tot = sum(boosted.values())
                    boosted = {k: round(v / tot, 6) for k, v in boosted.items()}
                    s.record("kpi_domain", "data.mix", dict(mix), boosted,
                             f"{d}: share {mix[d]:.3f} -> {boosted[d]:.3f} of next round's prompts (KPI shortfall)")

        def latency_prune(s) -> None:
            """Latency volatility or TTFT over budget in the A/B window raises the pruning strength (S3)."""
            for f in s.of_kind("latency_budget"):
                old = float(s.get("prune.strength") or 1.0)
                new = round(min(o.max_prune_strength, old * o.prune_factor), 4)
                s.change("latency_prune", "prune.strength", new, f.message + f"; next cut x{new:g}")

        return [("traffic_feedback", traffic_feedback), ("kpi_domain", kpi_domain), ("latency_prune", latency_prune)]


# ------------------------------------------------------------------------------------------ helpers

def traffic_sources(recipe: dict) -> list:
    """The failed traffic requests of ``recipe.traffic.prompts`` as PromptRecords (S4 challenge sources)."""
    from ..loop.training_set import request_record

    return [request_record(p, "traffic", TRAFFIC_PREFIX) for p in ((recipe.get("traffic") or {}).get("prompts") or [])]


def _failed(events, n: int) -> list[dict]:
    """First turns the candidate got wrong (one per session), up to ``n``: the requests to feed back."""
    out = []
    for e in events:
        if e.arm == "candidate" and e.turn == 1 and e.correct is False and len(out) < n:
            out.append({"text": e.request, "domain": e.domain, "traffic_type": e.traffic_type,
                        "session_id": e.session_id})
    return out


def _latency(events) -> dict:
    import numpy as np

    out = {}
    for arm in ("control", "candidate"):
        lat = np.array([e.latency_ms for e in events if e.arm == arm])
        tt = np.array([e.ttft_ms for e in events if e.arm == arm and e.ttft_ms is not None])
        out[arm] = {"p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                    "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
                    "ttft_p50_ms": float(np.median(tt)) if len(tt) else None}
    c, s = out["control"], out["candidate"]
    vol = lambda a: a["p99_ms"] / a["p50_ms"] if a["p50_ms"] else None  # noqa: E731
    out["volatility_ratio"] = (vol(s) / vol(c)) if vol(s) and vol(c) else None
    out["ttft_ratio"] = (s["ttft_p50_ms"] / c["ttft_p50_ms"]) if s["ttft_p50_ms"] and c["ttft_p50_ms"] else None
    return out


def _pm(v, unit: str, sign: bool = True) -> str:
    if v is None:
        return "-"
    return f"{v:+.1f}{unit}" if sign else f"{v:.1f}{unit}"
