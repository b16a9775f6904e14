"""The loop core: one iteration's phases in causal order (SPEC L1) and the shared work of each.

For each phase the iteration's stages' hooks run first, then the core's part:

* map: the core makes sure a student exists (built once, before the first map);
* validate: every metric the run measures, through the one registry (held-out comparison, G-C1 perplexity,
  perf when the structure changed, the configured capability checks, what stages asked for), then the gates,
  and the training samples the hard pool is drawn from;
* attribute: the measured effect of the changes this iteration's recipe made (``repair_verified`` /
  ``repair_failed`` findings, :mod:`distillgate.knobs`), then findings from every registered metric (L2), gate
  failures, weak domains, stalls, hard samples; the knob blame of a regression uses the measured effects;
* compensate: the strategy's rules (core + every stage's) write the next recipe; each change is remembered
  with its expected effect (the loop state's ``strategy``), refused changes become ``refused_change`` findings;
  a knob the exploration moved in this iteration is held (its measured choice stands): a rule's change of it is
  skipped, as a ``skipped_change`` finding that says which rule wanted what and why.

Before the stages' map, the exploration (:mod:`distillgate.explore`, when ``loop.strategy.exploration.budget``
> 0) may replace one knob of the iteration's recipe by the best of a few short variants.

The core knows no stage by name.
"""

from __future__ import annotations

import copy
import dataclasses
import time

from ..attribution import attribute, registry_meta
from ..knobs import Memory, direction, fmt_effect, measure_moves
from ..schema import PHASES, Decision, Finding
from ..signals import raise_if_terminated
from ..strategy import knob_defaults, next_recipe, rule_list
from .contract import Iteration
from .run import apply_recipe

CHECK_METRICS = {"probes": ["f1_gap_points"], "inheritance": ["inheritance"], "decision_path": ["path_consistency"],
                 "volatility": ["latency_volatility_ratio"]}
PERF_CHECKS = ("volatility",)  # timing checks: measured with perf (when the structure changed), kept meanwhile
TEACHER_SIDE = ("teacher_ppl_heldout", "teacher_ppl_text")
PERF_METRICS = ("ttft_ratio", "peak_memory_ratio")
STRUCTURE_METRICS = ("flops_ratio", "params_ratio")  # analytic, cheap: every iteration (S3.3)


def schedule(specs) -> list[tuple[int, list[int]]]:
    """``[(iteration, [stage entry indices])]``: iteration 0 (setup) belongs to every entry with
    ``iterations: 0``; then each entry runs its iterations in order."""
    out = [(0, [i for i, s in enumerate(specs) if s.iterations == 0])]
    k = 1
    for i, s in enumerate(specs):
        for _ in range(s.iterations):
            out.append((k, [i]))
            k += 1
    return out


def run_iteration(run, k: int, stages: list, all_stages: list) -> Iteration:
    """Run iteration ``k`` with ``stages`` (their hooks), commit it, return it."""
    from .commit import commit

    recipe = copy.deepcopy(run.state.recipe)
    it = Iteration(k, stages[0] if stages else None, recipe, apply_recipe(run.cfg, recipe))
    run.current = it
    run.store.begin_iteration(k)
    for phase in PHASES:
        t0 = time.time()
        try:
            raise_if_terminated()  # a SIGTERM a library finalizer swallowed stops the run here
            if phase == "map":
                run.ensure_student(it)
                from ..explore import explore

                explore(it, run, stages)
            for st in all_stages:     # every stage of the run may watch every iteration (contract: observe)
                watch = getattr(st, "observe", None)
                if watch is not None:
                    watch(phase, it, run)
            for st in stages:
                hook = getattr(st, phase, None)
                if hook is not None:
                    hook(it, run)
            if phase == "validate":
                validate(it, run)
            elif phase == "attribute":
                attribute_phase(it, run)
            elif phase == "compensate":
                compensate(it, run, all_stages)
        except BaseException:
            run.store.record_phase(k, phase, time.time() - t0, "failed")
            run.store.finish_iteration(k, "failed")
            raise
        run.store.record_phase(k, phase, time.time() - t0, "ok")
    t0 = time.time()
    try:
        vid = commit(run, it)
    except BaseException:
        import contextlib

        from ..errors import DistillgateError

        with contextlib.suppress(DistillgateError):  # the disk may be what failed
            run.store.record_phase(k, "commit", time.time() - t0, "failed")
            run.store.finish_iteration(k, "failed")
        raise
    run.store.record_phase(k, "commit", time.time() - t0, "ok")
    run.store.finish_iteration(k, "ok", converged=converged(run))
    it.metrics["version"] = vid
    return it


def converged(run) -> bool:
    return run.state.pass_streak >= run.cfg.loop.converge_after


def validate(it: Iteration, run) -> None:
    from ..evaluate.providers import HELDOUT_METRICS
    from ..gates import evaluate_gates, load_gate_spec
    from ..models.info import structure

    cfg = run.cfg
    names = list(HELDOUT_METRICS) + ["ppl_ratio"] + list(STRUCTURE_METRICS)
    desc = structure(run.student)
    perf_due = run.state.perf_structure != desc or not cfg.loop.perf_every_structure_change
    perf = list(PERF_METRICS) + [m for c in cfg.loop.capability_checks if c in PERF_CHECKS for m in CHECK_METRICS[c]]
    if perf_due:
        names += perf
    for check in cfg.loop.capability_checks:
        names += [] if check in PERF_CHECKS else CHECK_METRICS[check]
    names += [m for m in it.extra_metrics if m not in names]
    m = run.measure(names, **it.measure_options)
    values = {k: v for k, v in m.values.items() if v is not None}
    for k in TEACHER_SIDE:
        if k in values:
            it.teacher_metrics[k] = values.pop(k)
    if perf_due:
        run.state.perf = {k: v for k, v in values.items() if k in perf or k.split("/")[0] in perf}
        run.state.perf_structure = desc
    else:
        values.update({k: v for k, v in (run.state.perf or {}).items() if v is not None})
    it.metrics.update(values)
    it.samples = m.samples
    n = cfg.loop.strategy.hard_candidates
    recent = run.training.prompt_examples[-n:] if n else []  # the newest answers to new prompts
    if recent and it.index > 0:
        from .. import pipeline
        from ..evaluate.providers import divergence_samples

        _, it.hard_candidates = divergence_samples(run.student, run.teacher.model, recent,
                                                   pipeline.pad_id(run.teacher.tokenizer))
    spec = load_gate_spec(cfg.loop.gates_spec)
    provenance = {k: d["provenance"] for k, d in m.details.items() if isinstance(d, dict) and d.get("provenance")}
    sizes = {k: d["size"] for k, d in m.details.items() if isinstance(d, dict) and d.get("size")}
    it.gates = evaluate_gates(spec, {k: v for k, v in it.metrics.items() if isinstance(v, (int, float))},
                              {k: v for k, v in m.notes.items() if k not in it.metrics}, provenance=provenance,
                              sizes=sizes)


def attribute_phase(it: Iteration, run) -> None:
    cfg, st = run.cfg, run.state
    prev = st.history[-1]["metrics"] if st.history else None
    if it.baseline_iteration is not None:  # a restored student is compared with the version it came from
        prev = next((h["metrics"] for h in reversed(st.history) if h["iteration"] == it.baseline_iteration), prev)
    meta = registry_meta(it.metrics, cfg.loop.regression_threshold)
    for name, tol in it.tolerances.items():  # what a stage's change is expected to cost (e.g. a prune cut)
        if name in meta and tol > meta[name].drop_threshold:
            meta[name] = dataclasses.replace(meta[name], drop_threshold=float(tol))
    channels: dict[str, list[float]] = {}
    for h in st.history + [{"terms": it.train_terms}]:
        for ch, v in (h.get("terms") or {}).items():
            channels.setdefault(ch, []).append(v)
    failures = [g.model_dump() for g in it.gates.gates if g.status == "fail"] if it.gates else []
    spec = cfg.loop.strategy
    memory = Memory(st.strategy)
    repairs = measure_moves(memory, it.index, st.history, it.metrics, trend_decay=spec.trend_decay)
    effects = {m["knob"]: {} for m in memory.moves} | {t["knob"]: {} for t in memory.trials if t.get("knob")}
    for name, per in effects.items():
        for metric in ("kl", "ppl_ratio", "top1_agreement"):
            if memory.effects(name, metric):
                per[metric] = memory.effects(name, metric)
    it.findings += [_repair_finding(r) for r in repairs]
    it.findings += attribute(iteration=it.index, metrics=it.metrics, prev=prev, teacher=it.teacher_metrics,
                             meta=meta, samples=it.samples, hard_candidates=it.hard_candidates, recipe=it.recipe,
                             last_good_recipe=st.last_good.recipe if st.last_good else None,
                             channel_history=channels, gate_failures=failures,
                             plateau_threshold=spec.plateau_threshold, plateau_rounds=spec.plateau_rounds,
                             weak_domain_factor=spec.weak_domain_factor, hard_top_fraction=spec.hard_top_fraction,
                             knob_effects=effects)
    for f in it.findings:
        if f.iteration is None:
            f.iteration = it.index
        if f.kind == "regression":
            if it.baseline_iteration is not None:
                f.message = f.message.replace(f"since iteration {it.index - 1}",
                                              f"since iteration {it.baseline_iteration} (the restored version)")
                f.evidence["baseline_iteration"] = it.baseline_iteration
            if it.tolerances:
                f.evidence.setdefault("tolerance", {"allowed": it.tolerances.get(f.subject),
                                                    "reason": it.tolerance_reason})
            for key, value in it.regression_evidence.items():
                f.evidence.setdefault(key, value)


def compensate(it: Iteration, run, all_stages: list) -> None:
    st, spec = run.state, run.cfg.loop.strategy
    status = {g.id: g.status for g in it.gates.gates} if it.gates else {}
    recent = [Decision.from_dict(d) for d in st.decisions[-spec.recent_decisions:]]
    extra = [r for stage in all_stages for r in (stage.rules() if hasattr(stage, "rules") else [])]
    refused: list = []
    skipped: list = []
    memory = Memory(st.strategy)
    it.next_recipe, decisions = next_recipe(
        it.recipe, it.findings, iteration=it.index, last_good=st.last_good.recipe if st.last_good else None,
        gate_status=status, recent_decisions=recent, spec=spec, rules=rule_list(spec, extra),
        memory=memory.data, defaults=knob_defaults(it.cfg), refused=refused,
        held=[d for d in it.decisions if d.iteration == it.index],  # the exploration's adopted move stands
        screened=it.screened, skipped=skipped)
    for d in decisions:
        exp = d.expected or {}
        memory.add_move(d, it.index + 1, exp.get("metric"), exp.get("change"), exp.get("source", ""), d.answers,
                        direction(d.old, d.new))
    it.decisions += decisions   # after the exploration's (this iteration's recipe), if any
    for r in refused:
        it.findings.append(Finding("refused_change", "warning", r["knob"], r["reason"], r, iteration=it.index))
    for r in skipped:
        it.findings.append(Finding("skipped_change", "info", r["knob"], r["reason"], r, iteration=it.index))


def _repair_finding(r: dict) -> Finding:
    """``repair_verified`` / ``repair_failed`` / ``repair_unmeasured`` for one move (L2)."""
    m, verdict = r["move"], r["verdict"]
    metric = m["metric"] or "kl"
    head = f"{m['rule']}: {m['knob']} {m['old']} -> {m['new']} (iteration {m['iteration']}, answering {m['answers'] or '-'})"
    if verdict == "unmeasured":
        return Finding("repair_unmeasured", "info", m["knob"], f"{head}: not measured ({m.get('note', '')})",
                       {"move": m})
    eff = m["measured"][metric]
    exp = "-" if m.get("expected") is None else f"{100 * m['expected']:+.1f}%"
    msg = (f"{head}: {metric} changed {100 * eff:+.1f}% net of the trend ({100 * m['baseline'][metric]:+.1f}% "
           f"expected from training on), expected {exp} ({m.get('expected_source') or '-'})"
           + (f"; shared with {', '.join(m['shared_with'])} (changed for the same iteration)"
              if m.get("shared_with") else ""))
    ok = verdict == "verified"
    return Finding("repair_verified" if ok else "repair_failed", "info" if ok else "warning", m["knob"],
                   ("repair verified: " if ok else "repair failed: ") + msg,
                   {"move": m, "measured": m["measured"], "baseline": m["baseline"], "expected": m.get("expected"),
                    "effect_text": fmt_effect({"mean": eff, "n": 1})})
