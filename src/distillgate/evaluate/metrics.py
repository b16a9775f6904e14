"""Metric metadata registry and the :class:`Scorecard` every evaluation returns.

A metric name is ``<task>/<metric>`` (``wikitext/ppl_token``, ``copa/acc``, ``teacher_kl/kl_forward_mean``).
Its metadata (direction, capability tier) comes from the registry, looked up by the full name first, then by
the bare metric (``acc``), lm-eval ``register_metric`` style; an unknown metric fails loudly.

Scorecard JSON (consumed by gates, loop, report)::

    {"model": "...", "suite": "quick", "format_version": 1, "partial": false, "errors": {},
     "metrics": {"copa/acc": {"value": 0.75, "higher_is_better": true, "n": 40, "stderr": 0.069,
                              "task": "copa", "capability_tier": "high", "domain": null}, ...},
     "details": {"copa": {"seconds": 1.2, "capability": "causal_reasoning",
                          "items": [{"doc_id": "copa-1", "correct": true, "pred": 0, "gold": 0,
                                     "loglikelihoods": [-7.1, -9.3], "tags": ["causal_reasoning", ...]}]},
                 ...other per-task extras (per-paradigm, ...)}}

``partial`` is true when a task failed (its message is in ``errors[<task>]``) or the run was interrupted:
the metrics present are finished tasks' results, the missing ones were not measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError, InputError
from ..io import atomic_write_json
from ..schema import TIERS

SCORECARD_VERSION = 1


@dataclass(frozen=True)
class MetricInfo:
    higher_is_better: bool
    capability_tier: str       # 'lm' base language modelling | 'mid' syntax/semantics | 'high' tasks (SPEC L3)
    description: str = ""


_REGISTRY: dict[str, MetricInfo] = {}


def register_metric(name: str, higher_is_better: bool, capability_tier: str, description: str = "") -> None:
    """Register metadata for a bare metric (``acc``) or a task-qualified one (``copa/acc``)."""
    if capability_tier not in TIERS:
        raise ConfigError("capability_tier", capability_tier, f"one of {TIERS}")
    _REGISTRY[name] = MetricInfo(higher_is_better, capability_tier, description)


def metric_info(name: str) -> MetricInfo:
    """Metadata for ``task/metric``: exact entry, else the bare metric's entry; unknown names raise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    bare = name.rsplit("/", 1)[-1]
    if bare in _REGISTRY:
        return _REGISTRY[bare]
    raise ConfigError("metric", name, f"a registered metric ({', '.join(sorted(_REGISTRY))})")


_RUNTIME = "reported by an lm-eval task"


def ensure_metric(name: str, higher_is_better: bool) -> None:
    """Register a metric an lm-eval task reports that the registry does not know yet (a user's task YAML
    may define its own), as a 'high' tier task metric with lm-eval's direction; known names are kept."""
    try:
        metric_info(name)
    except ConfigError:
        register_metric(name, bool(higher_is_better), "high", _RUNTIME)


def metric_reference() -> list[tuple[str, str, str, str]]:
    """(name, direction, tier, meaning) of every metric registered in code (not those :func:`ensure_metric`
    added at run time), for the generated docs."""
    return [(k, "higher" if v.higher_is_better else "lower", v.capability_tier, v.description)
            for k, v in sorted(_REGISTRY.items()) if v.description != _RUNTIME]


for _n, _hib, _tier, _d in [
    ("ppl_token", False, "lm", "perplexity per token (rolling windows)"),
    ("ppl_word", False, "lm", "perplexity per whitespace word"),
    ("kl_forward_mean", False, "lm", "mean KL(teacher || student) per held-out token"),
    ("kl_reverse_mean", False, "lm", "mean KL(student || teacher) per held-out token"),
    ("top1_agreement", True, "lm", "share of tokens where student and teacher argmax agree"),
    ("blimp/accuracy", True, "mid", "BLiMP minimal pairs: P(good) > P(bad)"),
    ("accuracy", True, "mid", "accuracy"),
    ("acc", True, "high", "multiple-choice accuracy (argmax log-likelihood)"),
    ("acc_norm", True, "high", "multiple-choice accuracy, log-likelihood / choice length in characters"),
    ("exact_match", True, "high", "exact match of the extracted answer"),
    ("mc2", True, "high", "TruthfulQA MC2: normalised probability mass on the true answers (lm-eval's "
                          "truthfulqa_mc2 'acc')"),
    ("perplexity", False, "lm", "exp(-mean log-likelihood) of the targets (LAMBADA)"),
    ("em", True, "high", "DROP exact match (max over gold answers, lm-eval's drop)"),
    ("f1", True, "high", "DROP bag-of-words F1 (max over gold answers, lm-eval's drop)"),
    ("word_perplexity", False, "lm", "lm-eval rolling perplexity per word"),
    ("byte_perplexity", False, "lm", "lm-eval rolling perplexity per UTF-8 byte"),
    ("bits_per_byte", False, "lm", "lm-eval rolling log2-loss per UTF-8 byte"),
]:
    register_metric(_n, _hib, _tier, _d)


@dataclass
class Scorecard:
    """Named metric values with their metadata; JSON-able (``to_dict``/``from_dict``/``save``/``load``)."""

    model: str = ""
    suite: str = ""
    metrics: dict[str, dict] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)
    format_version: int = SCORECARD_VERSION
    partial: bool = False
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, task: str, metric: str, value: float, *, n: int, stderr: float | None = None,
            domain: str | None = None) -> None:
        name = f"{task}/{metric}"
        info = metric_info(name)
        entry = {"value": float(value), "higher_is_better": info.higher_is_better, "n": int(n), "task": task,
                 "capability_tier": info.capability_tier, "domain": domain}
        if stderr is not None and math.isfinite(stderr):
            entry["stderr"] = float(stderr)
        self.metrics[name] = entry

    def value(self, name: str) -> float:
        if name not in self.metrics:
            raise InputError(f"scorecard has no metric {name!r} (has: {sorted(self.metrics)})")
        return self.metrics[name]["value"]

    def by_tier(self, tier: str) -> dict[str, dict]:
        return {k: v for k, v in self.metrics.items() if v["capability_tier"] == tier}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scorecard":
        if d.get("format_version") != SCORECARD_VERSION:
            raise InputError(f"scorecard format_version {d.get('format_version')!r}; this reads {SCORECARD_VERSION}")
        return cls(model=d.get("model", ""), suite=d.get("suite", ""), metrics=dict(d.get("metrics", {})),
                   details=dict(d.get("details", {})), partial=bool(d.get("partial", False)),
                   errors=dict(d.get("errors", {})))

    def save(self, path: str | Path) -> None:
        bad = [k for k, v in self.metrics.items() if not math.isfinite(v["value"])]
        if bad:
            raise InputError(f"refusing to write a scorecard with non-finite metrics: {bad}")
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Scorecard":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: not a readable scorecard ({e})") from e
