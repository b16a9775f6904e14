"""A synthetic but realistic ``ReportData`` (for tests, screenshots and ``distillgate report --sample``).

Numbers are drawn from a seeded ``random.Random``; nothing here claims to be a measured result.
"""

from __future__ import annotations

import random

from .data import (PHASES, Alert, Decision, Evidence, Finding, GateResult, HeatMap, Iteration, ParamDiff,
                   PhaseRecord, ReportData, RunInfo, SampleDivergence)

DOMAINS = ["finance_risk", "medical", "legal", "education", "customer_support", "ecommerce", "travel",
           "technical_docs"]
_GATES = [("G-C1", "capability", "ppl_ratio", 1.08, "<="), ("G-C2", "capability", "f1_gap", 1.2, "<="),
          ("G-C3", "capability", "inheritance", 0.897, ">="), ("G-C4", "capability", "decision_path", 0.935, ">="),
          ("G-P1", "performance", "ttft_ratio", 0.65, "<="),
          ("G-P3", "performance", "memory_ratio", 0.52, "<="), ("G-O2", "operations", "drift_kl", 0.042, "<=")]


def _gate(gid, dim, metric, thr, cmp, value) -> GateResult:
    if value is None:
        return GateResult(gid, dim, metric, None, thr, cmp, False, "not_measured", None)
    margin = thr - value if cmp == "<=" else value - thr
    return GateResult(gid, dim, metric, value, thr, cmp, margin >= 0, "pass" if margin >= 0 else "fail", margin)


def _pass_share(gates: list[GateResult]) -> dict[str, float | None]:
    """Passes / measured gates per dimension (None when nothing was measured), like the gates module."""
    out: dict[str, float | None] = {"business": None}
    for dim in ("capability", "performance", "operations"):
        measured = [g for g in gates if g.dimension == dim and g.status != "not_measured"]
        out[dim] = round(sum(g.passed for g in measured) / len(measured), 3) if measured else None
    return out


def synthetic_report(n_iterations: int = 3, n_layers: int = 4, seed: int = 0, run_id: str = "run-demo") -> ReportData:
    """A run of ``n_iterations`` (S2 joint distillation, then S3 pruning, then S4), every section filled."""
    rng = random.Random(seed)
    stages = ["S2"] * max(1, n_iterations - 2) + ["S3", "S4"]
    iterations = []
    for k in range(n_iterations):
        progress = (k + 1) / n_iterations
        phases = [PhaseRecord(p, "done", round(rng.uniform(3, 40) * (4 if p == "map" else 1), 1)) for p in PHASES]
        if k == n_iterations - 1:
            phases[-1] = PhaseRecord("commit", "running", 2.0, note="writing version")
        ppl_ratio = 1.35 - 0.3 * progress + rng.uniform(-0.01, 0.01)
        values = {"G-C1": ppl_ratio, "G-C2": 2.5 - 1.6 * progress, "G-C3": 0.8 + 0.12 * progress,
                  "G-C4": 0.85 + 0.06 * progress,
                  "G-P1": 0.55, "G-P3": 0.6 - 0.1 * progress, "G-O2": 0.05 - 0.01 * k if k else None}
        gates = [_gate(*g, values[g[0]]) for g in _GATES]
        kl = {d: round(0.6 - 0.3 * progress + rng.uniform(0, 0.2), 4) for d in DOMAINS}
        iterations.append(Iteration(
            index=k, stage=stages[min(k, len(stages) - 1)] if n_iterations > 2 else "S2",
            status="running" if k == n_iterations - 1 else "done", phases=phases, gates=gates,
            dimension_scores=_pass_share(gates),
            metrics={"ppl": round(14.0 * ppl_ratio, 3), "kl": round(0.5 - 0.25 * progress, 4),
                     "top1": round(0.55 + 0.2 * progress, 4), "kl_by_domain": kl,
                     "loss": {"kd": round(0.6 - 0.3 * progress, 4), "ce": round(2.4 - 0.5 * progress, 4)}},
            version=f"v{k:04d}", started=f"2026-11-28T0{k}:00:00Z"))
    layers = ["embed"] + [f"layer {i}" for i in range(n_layers)] + ["final"]
    groups = ["q", "k", "v", "o", "gate", "up", "down", "norm", "other"]
    diffs = []
    for k in range(1, n_iterations):
        vals = [[None if (l in ("embed", "final") and g not in ("norm", "other")) or (l.startswith("layer")
                                                                                 and g == "other")
                 else round(rng.uniform(0.001, 0.05) / k, 5) for g in groups] for l in layers]
        diffs.append(ParamDiff(k - 1, k, layers, groups, vals, [[None if v is None else v * 30 for v in r] for r in vals],
                               notes=["layer 3.mlp.up_proj.weight: shape (64, 32) -> (48, 32) (not comparable)"]
                               if stages[min(k, len(stages) - 1)] == "S3" else []))
    heat = HeatMap("KL by domain × layer", x=[str(i) for i in range(n_layers)], y=DOMAINS,
                   z=[[round(rng.uniform(0, 1), 3) for _ in range(n_layers)] for _ in DOMAINS],
                   x_label="layer", y_label="domain", value_label="KL")
    pos = HeatMap("KL by domain × position", x=[f"{b}-{b + 31}" for b in range(0, 256, 32)], y=DOMAINS[:4],
                  z=[[round(rng.uniform(0, 1), 3) for _ in range(8)] for _ in DOMAINS[:4]],
                  x_label="token position", y_label="domain", value_label="KL")
    last = n_iterations - 1
    findings = [
        Finding(last, "regression", "critical", "kl_by_domain/legal",
                "KL on legal rose 0.12 → 0.19 after the pruning step; layer 3 MLP carries most of it.",
                Evidence([heat, pos], [SampleDivergence(f"legal-{i:03d}", round(1.5 - 0.2 * i, 3), "legal",
                                                        "The contract terminates on 31 December unless ...")
                                       for i in range(3)], {"blamed_knobs": ["prune.mlp_keep", "loss.temperature"]})),
        Finding(max(0, last - 1), "stall", "warning", "loss/kd", "kd loss slope under 0.002 for three rounds.",
                Evidence()),
    ]
    decisions = [Decision(k, "loss.temperature.value", 2.0 - 0.25 * (k - 1), 2.0 - 0.25 * k,
                          "entropy of teacher targets fell; sharper targets for the next round")
                 for k in range(1, n_iterations)]
    decisions.append(Decision(last, "data.domain_weights.legal", 1.0, 1.5, "regression on legal (see findings)"))
    pool = {f"legal-{i:04x}deadbeefcafe/s0": 3.0 for i in range(40)}  # a revert logs the whole hard pool
    decisions.append(Decision(last, "hard_pool", pool, dict(list(pool.items())[:30]), "reverting the hard pool"))
    alerts = [Alert("critical", "capability under threshold for 2 h", "capability", last, "2026-11-28T03:10:00Z"),
              Alert("info", "business dimension not measured (no A/B traffic configured)", "business")]
    return ReportData(
        run=RunInfo(run_id, "SmolLM2-135M-Instruct", "15-layer derived student", "2026-11-28T00:00:00Z", "running",
                    summary=f"{n_iterations} iterations; capability gates not met yet.",
                    config={"train": {"steps": 40, "lr": 3e-4}, "loss": {"channels": {"kd": 1.0, "ce": 0.1}}}),
        iterations=iterations, param_diffs=diffs, findings=findings, decisions=decisions, alerts=alerts,
        baseline_metrics={"ppl": 14.0, "top1": 1.0, "kl_by_domain": {d: 0.0 for d in DOMAINS[:2]}},
        benchmark=_benchmark(last), generated="2026-11-28T03:30:00Z")


def _benchmark(iteration: int) -> dict:
    """A benchmark.json as the anchor commits it (two tasks, two capabilities, a few lost items)."""
    def row(n, t, s, lost, gained):
        return {"n": n, "teacher_correct": t, "student_correct": s, "lost": lost, "gained": gained,
                "lost_items": [f"copa-{i}" for i in range(lost)], "gained_items": []}

    by_tag = {"causal_reasoning": row(40, 30, 26, 6, 2), "grammar": row(50, 44, 43, 2, 1),
              "question:cause": row(20, 15, 12, 4, 1)}
    examples = {"causal_reasoning": [{"task": "copa", "doc_id": f"copa-{i}", "gold": 0, "teacher_pred": 0,
                                      "student_pred": 1, "tags": ["question:cause"],
                                      "teacher_loglikelihoods": [-7.1, -9.3], "student_loglikelihoods": [-9.8, -8.2]}
                                     for i in range(3)],
                "grammar": [{"task": "blimp", "doc_id": "agr.jsonl:7", "gold": 0, "teacher_pred": 0, "student_pred": 1,
                             "tags": ["paradigm:agr"], "teacher_loglikelihoods": [-20.5, -23.0],
                             "student_loglikelihoods": [-25.1, -24.7]}]}
    return {"format_version": 1, "suite": "quick", "limit": 50, "iteration": iteration, "n": 90, "lost": 8,
            "gained": 3, "lost_share": 8 / 90, "capabilities": ["causal_reasoning", "grammar"],
            "teacher_metrics": {"bench_copa/acc": 0.75, "bench_blimp/accuracy": 0.88, "bench_wikitext/ppl_token": 14.9},
            "student_metrics": {"bench_copa/acc": 0.65, "bench_copa/acc/ci_low": 0.5, "bench_copa/acc/ci_high": 0.8,
                                "bench_blimp/accuracy": 0.86, "bench_wikitext/ppl_token": 31.2},
            "higher_is_better": {"bench_copa/acc": True, "bench_blimp/accuracy": True, "bench_wikitext/ppl_token": False},
            "diff": {"by_task": {"copa": by_tag["causal_reasoning"], "blimp": by_tag["grammar"]}, "by_tag": by_tag},
            "lost_examples": examples, "errors": {}}
