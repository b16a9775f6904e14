"""Attribute (SPEC L1.4, L2): turn one iteration's measurements into findings.

Inputs are plain data so this module is pure and testable without models:

* ``metrics``: ``{name: value}`` for this iteration, ``prev``: the previous iteration's, ``teacher``: the
  teacher profile's values for the same names (where they exist);
* ``meta``: ``{name: MetricMeta}`` (higher_is_better, drop threshold, capability tier);
* ``samples``: per held-out sample divergence (``SampleDivergence``): domain, mean KL, KL by position;
* ``hard_candidates``: the same for a slice of *training* samples (the hard pool is drawn from these);
* ``layer_kl``: optional student-vs-teacher divergence by layer (logit-lens KL through the layer map);
* ``recipes``: the recipe (knob values) of every earlier iteration and which iterations were "good".

Outputs are :class:`Finding` records. A *regression* (a metric moved against its direction by more than its
threshold since the previous iteration) carries the divergence heat maps (domain x position bucket, by layer)
and the top divergent samples, plus a **knob blame**: the knobs that changed since the last good iteration,
ranked by suspected impact (see :func:`knob_blame`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from .schema import Finding  # noqa: F401  (the one Finding; attribution makes them)

# Prior sensitivity of the student's held-out divergence to each knob, per unit of |log change| (or per
# change for categorical knobs). Ordered by what we have seen move KL most on SmolLM2-sized students:
# structure changes first (a cut removes capacity outright), then the learning rate and the temperature
# (both reshape the optimisation target), then loss-mix and data-mix knobs. These are priors for ranking
# suspects, not measured effects; the evidence field says how each score was formed.
KNOB_PRIOR = {
    "student.structure": 1.0, "prune.strength": 0.9, "train.lr": 0.7, "loss.temperature": 0.6,
    "loss.divergence": 0.6, "loss.channels": 0.5, "data.mix": 0.4, "loss.domain_weights": 0.35,
    "loss.domain_channel_shares": 0.35,
    "hard_pool": 0.3, "train.steps": 0.2, "curriculum.tier": 0.5,
}


@dataclass
class MetricMeta:
    higher_is_better: bool
    drop_threshold: float = 0.02  # relative change against the metric's direction that counts as regression
    tier: str = "lm"  # capability tier (SPEC L3): lm | mid | high


def registry_meta(metrics, default_threshold: float) -> dict[str, MetricMeta]:
    """:class:`MetricMeta` for every name in ``metrics`` that the metric registry
    (:data:`distillgate.evaluate.providers.METRICS`) marks as a regression signal; the registry gives its
    direction, tier and threshold (None there: ``default_threshold``)."""
    from .evaluate.providers import METRICS

    out = {}
    for name in metrics:
        info = METRICS.get(name)
        if info is not None and info.regression:
            thr = default_threshold if info.regression_threshold is None else info.regression_threshold
            out[name] = MetricMeta(info.higher_is_better, thr, info.tier)
    return out


@dataclass
class SampleDivergence:
    example_id: str
    domain: str
    kl_mean: float
    kl_by_position: list[float] = field(default_factory=list)
    text: str = ""


def _bad_direction_change(value: float, prev: float, higher_is_better: bool) -> float:
    """Relative change against the metric's direction (> 0 means worse)."""
    if prev == 0 or not math.isfinite(prev) or not math.isfinite(value):
        return math.inf if not math.isfinite(value) else 0.0
    rel = (value - prev) / abs(prev)
    return -rel if higher_is_better else rel


def regressions(metrics: dict[str, float], prev: dict[str, float], meta: dict[str, MetricMeta]) -> list[tuple[str, float]]:
    """Metrics that got worse by more than their threshold: [(name, relative worsening)], worst first."""
    out = []
    for name, m in meta.items():
        if name in metrics and name in prev and metrics[name] is not None and prev[name] is not None:
            worse = _bad_direction_change(float(metrics[name]), float(prev[name]), m.higher_is_better)
            if worse > m.drop_threshold:
                out.append((name, worse))
    return sorted(out, key=lambda x: -x[1])


def divergence_heatmap(samples: list[SampleDivergence], n_buckets: int = 8) -> dict:
    """Mean KL by domain x relative response position (decile-like buckets of each answer's length)."""
    domains = sorted({s.domain for s in samples})
    sums = {d: [0.0] * n_buckets for d in domains}
    counts = {d: [0] * n_buckets for d in domains}
    for s in samples:
        n = len(s.kl_by_position)
        for i, kl in enumerate(s.kl_by_position):
            b = min(n_buckets - 1, (i * n_buckets) // max(n, 1))
            sums[s.domain][b] += kl
            counts[s.domain][b] += 1
    z = [[(sums[d][b] / counts[d][b]) if counts[d][b] else None for b in range(n_buckets)] for d in domains]
    return {"rows": domains, "cols": [f"{100 * b // n_buckets}-{100 * (b + 1) // n_buckets}%" for b in range(n_buckets)],
            "z": z, "title": "mean KL(teacher||student) by domain x answer position"}


def domain_kl(samples: list[SampleDivergence]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for s in samples:
        acc.setdefault(s.domain, []).append(s.kl_mean)
    return {d: sum(v) / len(v) for d, v in sorted(acc.items())}


def top_divergent(samples: list[SampleDivergence], n: int = 10) -> list[dict]:
    ranked = sorted(samples, key=lambda s: -s.kl_mean)[:n]
    return [{"example_id": s.example_id, "domain": s.domain, "kl": round(s.kl_mean, 5), "text": s.text[:200]}
            for s in ranked]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, (int, float)) for x in v.values()) and k in (
                "channels", "domain_weights", "mix"):
            for kk, vv in v.items():
                out[f"{key}.{kk}"] = vv
        elif isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _knob_family(key: str) -> str:
    for fam in sorted(KNOB_PRIOR, key=len, reverse=True):
        if key == fam or key.startswith(fam + ".") or key.startswith(fam):
            return fam
    return key.split(".")[0]


def changed_knobs(recipe: dict, reference: dict) -> list[dict]:
    """Knob-level differences between two recipes (flattened dotted keys)."""
    a, b = _flatten(reference), _flatten(recipe)
    out = []
    for k in sorted(set(a) | set(b)):
        if k == "hard_pool":
            continue
        if a.get(k) != b.get(k):
            out.append({"knob": k, "old": a.get(k), "new": b.get(k)})
    ha, hb = len(reference.get("hard_pool", {}) or {}), len(recipe.get("hard_pool", {}) or {})
    if ha != hb:
        out.append({"knob": "hard_pool", "old": ha, "new": hb})
    return out


def _magnitude(old, new) -> float:
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        if old > 0 and new > 0:
            return abs(math.log(new / old))
        return 1.0 if old != new else 0.0
    return 1.0  # categorical change (policy name, divergence type, layer list, ...)


# A measured worsening of 10% per move counts like the strongest prior (1.0) in the blame weight.
MEASURED_SCALE = 10.0


def knob_blame(recipe: dict, last_good: dict, regressed: list[tuple[str, float]],
               knob_effects: dict | None = None, lower_is_better: dict | None = None) -> list[dict]:
    """Rank the knobs changed since the last good iteration by suspected impact on the regression.

    score = weight x magnitude of the change (|log ratio| for positive numbers, 1 for categorical) x (1 + worst
    relative regression). weight = the knob family's prior, or, where this run measured the knob's effect on the
    worst regressed metric (``knob_effects[knob][metric]``: relative changes per move up, from earlier moves and
    exploration trials, :mod:`distillgate.knobs`), the prior shrunk toward the measured worsening this change
    predicts: ``(prior + n * clip(MEASURED_SCALE * predicted worsening, 0, 2)) / (1 + n)``. A knob measured to
    help is blamed less; one measured to hurt more. Each entry carries its terms so a reader can check it.
    """
    worst = max((w for _, w in regressed), default=0.0)
    worst_metric = max(regressed, key=lambda x: x[1])[0] if regressed else None
    lower = (lower_is_better or {}).get(worst_metric, True)
    blamed = []
    for ch in changed_knobs(recipe, last_good):
        fam = _knob_family(ch["knob"])
        prior = KNOB_PRIOR.get(fam, 0.25)
        mag = _magnitude(ch["old"], ch["new"])
        weight, extra = prior, {}
        eff = ((knob_effects or {}).get(ch["knob"]) or {}).get(worst_metric) if worst_metric else None
        if eff:
            n = len(eff)
            mean = sum(eff) / n
            up = _is_up(ch["old"], ch["new"])
            predicted = mean * (1 if up else -1) * (1 if lower else -1)  # > 0: this change worsens the metric
            weight = (prior + n * min(2.0, max(0.0, MEASURED_SCALE * predicted))) / (1 + n)
            extra = {"measured": {"metric": worst_metric, "mean_per_move": round(mean, 6), "n": n,
                                  "predicted_worsening": round(predicted, 6)}, "source": "measured"}
        blamed.append({**ch, "family": fam, "prior": prior, "weight": round(weight, 4), "magnitude": round(mag, 4),
                       "score": round(weight * mag * (1.0 + min(worst, 10.0)), 4), **extra})
    return sorted(blamed, key=lambda x: -x["score"])


def _is_up(old, new) -> bool:
    if isinstance(new, bool):
        return bool(new)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return new >= old
    return True


def slope(values: list[float]) -> float:
    """Least-squares slope of a series per step, relative to its mean magnitude (0 for < 2 points)."""
    n = len(values)
    if n < 2:
        return 0.0
    xs = range(n)
    mx, my = (n - 1) / 2, sum(values) / n
    num = sum((x - mx) * (y - my) for x, y in zip(xs, values))
    den = sum((x - mx) ** 2 for x in xs)
    return (num / den) / (abs(my) or 1.0)


def attribute(*, iteration: int, metrics: dict[str, float], prev: dict[str, float] | None,
              teacher: dict[str, float], meta: dict[str, MetricMeta], samples: list[SampleDivergence],
              recipe: dict, last_good_recipe: dict | None, channel_history: dict[str, list[float]],
              hard_candidates: list[SampleDivergence] = (), layer_kl: list[float] | None = None,
              gate_failures: Iterable[dict] = (),
              plateau_threshold: float = 0.01, plateau_rounds: int = 3, weak_domain_factor: float = 1.25,
              hard_top_fraction: float = 0.1, knob_effects: dict | None = None) -> list[Finding]:
    """All findings for one iteration (see module docstring); each carries ``iteration``. ``knob_effects``:
    ``{knob: {metric: [relative change per move up]}}`` this run measured (used by :func:`knob_blame`)."""
    findings = _attribute(iteration, metrics, prev, teacher, meta, samples, recipe, last_good_recipe,
                          channel_history, hard_candidates, layer_kl, gate_failures, plateau_threshold,
                          plateau_rounds, weak_domain_factor, hard_top_fraction, knob_effects)
    for f in findings:
        f.iteration = iteration
        f.uncertain = _uncertain(f, metrics, prev)
    return findings


def _uncertain(f: Finding, metrics: dict, prev: dict | None) -> bool:
    """A finding on a metric measured with a confidence interval (``<m>/ci_low``, ``<m>/ci_high`` in the
    metrics) is uncertain when the CI crosses what the finding compares with: the gate's threshold for a gate
    failure, the previous value for a regression. The strategy does not act on uncertain findings."""
    lo, hi = metrics.get(f"{f.subject}/ci_low"), metrics.get(f"{f.subject}/ci_high")
    if lo is None or hi is None:
        return False
    if f.kind == "gate_fail":
        ref = (f.evidence.get("gate") or {}).get("threshold")
    elif f.kind == "regression":
        ref = (prev or {}).get(f.subject)
    else:
        return False
    return ref is not None and lo <= ref <= hi


def _attribute(iteration, metrics, prev, teacher, meta, samples, recipe, last_good_recipe, channel_history,
               hard_candidates, layer_kl, gate_failures, plateau_threshold, plateau_rounds, weak_domain_factor,
               hard_top_fraction, knob_effects=None) -> list[Finding]:
    findings: list[Finding] = []
    heat = divergence_heatmap(samples) if samples else None
    dkl = domain_kl(samples)
    for g in gate_failures:
        findings.append(Finding("gate_fail", "warning", g.get("metric"),
                                f"gate {g.get('id')} fails: {g.get('metric')}={g.get('value')} "
                                f"(needs {g.get('comparator')} {g.get('threshold')})", {"gate": g}))
    if prev:
        reg = regressions(metrics, prev, meta)
        if reg:
            blame = knob_blame(recipe, last_good_recipe or recipe, reg, knob_effects,
                               {n: not m.higher_is_better for n, m in meta.items()})
            for name, worse in reg:
                findings.append(Finding(
                    "regression", "error", name,
                    f"{name} got worse by {100 * worse:.1f}% since iteration {iteration - 1} "
                    f"({prev[name]:.4g} -> {metrics[name]:.4g}); top suspect: "
                    f"{blame[0]['knob'] + ' ' + str(blame[0]['old']) + '->' + str(blame[0]['new']) if blame else 'none changed (data noise?)'}",
                    {"relative_worsening": worse, "knob_blame": blame, "heatmap_domain_position": heat,
                     "domain_kl": dkl, "layer_kl": layer_kl, "top_samples": top_divergent(samples),
                     "teacher_value": teacher.get(name)}))
    if dkl:
        mean = sum(dkl.values()) / len(dkl)
        weak = {d: v for d, v in dkl.items() if v > weak_domain_factor * mean}
        for d, v in sorted(weak.items(), key=lambda x: -x[1]):
            findings.append(Finding("weak_domain", "warning", f"kl/domain/{d}",
                                    f"domain {d}: KL {v:.4f} is {v / mean:.2f}x the mean {mean:.4f}",
                                    {"domain": d, "kl": v, "mean_kl": mean, "domain_kl": dkl,
                                     "heatmap_domain_position": heat}))
    for ch, hist in channel_history.items():
        tail = hist[-(plateau_rounds + 1):]
        if len(tail) >= plateau_rounds + 1:
            recent = [abs(slope(tail[i:i + 2])) for i in range(plateau_rounds)]
            if all(s < plateau_threshold for s in recent):
                findings.append(Finding("stall", "info", f"loss/{ch}",
                                        f"channel {ch}: loss slope under {plateau_threshold} for {plateau_rounds} "
                                        f"iterations ({', '.join(f'{s:.4f}' for s in recent)})",
                                        {"channel": ch, "history": hist, "slopes": recent}))
    if hard_candidates:
        # Hard samples come from the *training* split (never held-out: training on it would leak).
        k = max(1, int(round(hard_top_fraction * len(hard_candidates))))
        hard = top_divergent(list(hard_candidates), k)
        findings.append(Finding("hard_samples", "info", "kl",
                                f"{len(hard)} training samples with the highest KL (>= {hard[-1]['kl']:.4f})",
                                {"samples": hard}))
    return findings
