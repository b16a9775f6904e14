"""The benchmark profile inside ``distillgate run`` (SPEC S1.1, S1.3, L2), measured through the metric registry.

* **The teacher's profile** (S1.1): a suite (:mod:`.suite`: ``quick``, a suite YAML, ``FORMAT:FILE``) run once
  on the teacher, cached under ``$DISTILLGATE_HOME/eval_cache/benchmark-<key>.json`` with ``key`` = the teacher's
  weight and tokenizer fingerprints, the suite, the digest of every task's prepared items and the limit, so a
  second run (or a resume) on the same teacher and data reuses it. Within a run it also stays in the run's
  ``teacher_cache``. lm-eval tasks are keyed by their task name, not their files.
* **Every student against it** (S1.3): metric :data:`PRIMARY` (``bench_lost_share``, lower is better) is the
  share of the suite's items the teacher gets right and the student wrong; on the way the provider reports every
  scorecard metric as ``bench_<task>/<metric>`` (registered here with the scorecard's direction, so attribution
  flags a drop like any other metric), a 95 % interval ``.../ci_low``, ``.../ci_high`` for per-item means and
  for :data:`PRIMARY` (a regression inside it is *uncertain* and the strategy does not act on it), and
  ``bench_lost/<capability>``.
* **The per-item diff** (L2): with ``options['benchmark']['out']`` the provider writes one JSON file (the
  student's scorecard, the diff by task and capability, the regressed capabilities and example lost items with
  both models' predictions); :func:`capability_findings` turns it into findings. The anchor stage
  (:mod:`distillgate.stages.anchor`) asks for all of this in the iterations it is due and commits the file.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ..io import atomic_write_json, distillgate_home, sha256_file, sha256_json
from ..schema import Finding
from .providers import GateContext, register_metric, register_metric_provider

log = logging.getLogger(__name__)

BENCH_VERSION = 1
PRIMARY = "bench_lost_share"
EXAMPLES_PER_CAPABILITY = 5


def data_digest(prepared) -> str:
    """sha256 of a prepared suite: each task's spec and items (a text task: its file's sha256)."""
    parts = []
    for p in prepared:
        data = sha256_file(p.data) if isinstance(p.data, Path) else sha256_json(repr(p.data))
        parts.append([p.spec.model_dump(), p.capability, data])
    return sha256_json(parts)


def teacher_card(teacher, prepared, *, suite: str, data_dir, limit, batch_size: int = 8,
                 teacher_cache: dict | None = None):
    """The teacher's :class:`~.metrics.Scorecard` on ``prepared`` (its benchmark profile), computed once per
    teacher fingerprint, suite, items and limit (run memo, then the on-disk cache). Returns ``(card, key)``."""
    from ..models import fingerprint_tokenizer
    from .metrics import Scorecard
    from .suite import run_suite

    fp = getattr(teacher, "fingerprint", None)
    key = sha256_json([BENCH_VERSION, fp, fingerprint_tokenizer(teacher.tokenizer), suite, data_digest(prepared),
                       limit])
    memo = teacher_cache if teacher_cache is not None else {}
    if f"benchmark:{key}" in memo:
        return memo[f"benchmark:{key}"], key
    path = distillgate_home() / "eval_cache" / f"benchmark-{key[:16]}.json"
    card = None
    if fp is not None and path.is_file():
        try:
            hit = json.loads(path.read_text())
            if hit.get("key") == key:
                card = Scorecard.from_dict(hit["card"])
        except (OSError, ValueError, KeyError) as e:
            log.warning("benchmark cache %s unreadable (%s); measuring the teacher again", path, e)
    if card is None:
        card = run_suite(teacher.model, teacher.tokenizer, prepared, data_dir=data_dir, limit=limit,
                         batch_size=batch_size, model_name=str(getattr(teacher, "path", "") or "teacher"))
        if fp is not None and not card.partial:   # a partial profile is not worth keeping
            atomic_write_json(path, {"key": key, "card": card.to_dict()})
    memo[f"benchmark:{key}"] = card
    return card, key


def _metric_name(name: str) -> str:
    task, _, metric = name.rpartition("/")
    return f"bench_{task}/{metric}"


def _register(name: str, higher_is_better: bool, tier: str) -> None:
    register_metric(name, higher_is_better=higher_is_better, regression=True, tier=tier, module=__name__,
                    description="benchmark metric of the anchor's suite (S1.1), student side")


def card_metrics(card, *, register: bool = False) -> dict[str, float]:
    """``bench_<task>/<metric>`` values of a scorecard, with a 95 % interval for per-item means."""
    out: dict[str, float] = {}
    for name, m in sorted(card.metrics.items()):
        key = _metric_name(name)
        out[key] = m["value"]
        if register:
            _register(key, m["higher_is_better"], m["capability_tier"])
        se = m.get("stderr")
        if se is None and 0.0 <= m["value"] <= 1.0 and (card.details.get(m["task"]) or {}).get("items"):
            se = math.sqrt(m["value"] * (1 - m["value"]) / max(m["n"], 1))   # binomial (accuracies over items)
        if se is not None:
            out[f"{key}/ci_low"], out[f"{key}/ci_high"] = m["value"] - 1.96 * se, m["value"] + 1.96 * se
    return out


def lost_examples(student, teacher, diff: dict, per_capability: int = EXAMPLES_PER_CAPABILITY) -> dict:
    """Per capability, up to ``per_capability`` items the teacher gets right and the student wrong, with both
    predictions and log-likelihoods: ``{capability: [{task, doc_id, gold, teacher_pred, student_pred, ...}]}``."""
    out: dict[str, list] = {}
    for task, row in diff["by_task"].items():
        t_items = {i["doc_id"]: i for i in teacher.details[task]["items"]}
        s_items = {i["doc_id"]: i for i in student.details[task]["items"]}
        cap = student.details[task].get("capability", task)
        for doc_id in row["lost_items"]:
            if len(out.setdefault(cap, [])) >= per_capability:
                break
            s, t = s_items[doc_id], t_items[doc_id]
            out[cap].append({"task": task, "doc_id": doc_id, "gold": s.get("gold"), "teacher_pred": t.get("pred"),
                             "student_pred": s.get("pred"), "tags": s.get("tags", [])[1:],
                             "teacher_loglikelihoods": t.get("loglikelihoods"),
                             "student_loglikelihoods": s.get("loglikelihoods")})
    return {k: v for k, v in out.items() if v}


def capabilities(card) -> list[str]:
    return sorted({d["capability"] for d in card.details.values() if d.get("items") and d.get("capability")})


def benchmark_provider(ctx: GateContext) -> float | None:
    """Metric :data:`PRIMARY` (module docstring) from ``options['benchmark']``: ``{suite, data_dir, limit,
    batch_size, max_items, out}``."""
    from .diff import item_diff, regressed_capabilities
    from .suite import prepare_suite, run_suite

    o = ctx.options.get("benchmark")
    if not o:
        ctx.details[PRIMARY] = {"note": "no benchmark suite configured (anchor option `benchmark`)"}
        return None
    t, s = ctx.teacher(), ctx.student()
    suite, ddir, limit, bs = str(o["suite"]), o.get("data_dir"), o.get("limit"), int(o.get("batch_size", 8))
    pkey = f"benchmark_prepared:{sha256_json([suite, str(ddir), limit])}"
    if pkey not in ctx.teacher_cache:
        ctx.teacher_cache[pkey] = prepare_suite(suite, ddir, limit)
    prepared = ctx.teacher_cache[pkey]
    tcard, key = teacher_card(t, prepared, suite=suite, data_dir=ddir, limit=limit, batch_size=bs,
                              teacher_cache=ctx.teacher_cache)
    scard = run_suite(s.model, s.tokenizer, prepared, teacher=t.model, data_dir=ddir, limit=limit, batch_size=bs,
                      model_name="student")
    diff = item_diff(scard, tcard, max_items=o.get("max_items", 20))
    ctx.extra.update(card_metrics(scard, register=True))
    for cap in capabilities(scard):
        ctx.extra[f"bench_lost/{cap}"] = float(diff["by_tag"].get(cap, {}).get("lost", 0))
    value = diff["lost"] / diff["n"] if diff["n"] else None
    if value is not None:     # binomial 95 % interval over the suite's items: a move inside it is noise
        se = math.sqrt(value * (1 - value) / diff["n"])
        ctx.extra[f"{PRIMARY}/ci_low"], ctx.extra[f"{PRIMARY}/ci_high"] = value - 1.96 * se, value + 1.96 * se
    doc = {"format_version": BENCH_VERSION, "suite": suite, "limit": limit, "teacher_key": key,
           "lost_share": value, "n": diff["n"], "lost": diff["lost"], "gained": diff["gained"],
           "capabilities": capabilities(scard), "teacher_metrics": card_metrics(tcard),
           "student_metrics": card_metrics(scard),
           "higher_is_better": {_metric_name(n): m["higher_is_better"] for n, m in scard.metrics.items()},
           "diff": diff, "regressed": regressed_capabilities(diff),
           "lost_examples": lost_examples(scard, tcard, diff), "errors": {**tcard.errors, **scard.errors},
           "student": scard.to_dict()}
    if o.get("out"):
        atomic_write_json(o["out"], doc)
    ctx.details[PRIMARY] = {k: doc[k] for k in ("suite", "limit", "n", "lost", "gained", "errors")}
    if value is None:
        ctx.details[PRIMARY]["note"] = "the suite has no per-item tasks (perplexity only): nothing to diff"
    return value


register_metric_provider(PRIMARY, benchmark_provider, higher_is_better=False, regression=True, tier="high",
                         description="share of the benchmark suite's items the teacher gets right and the "
                                     "student wrong (S1.3, anchor option `benchmark`)")


def capability_findings(doc: dict, iteration: int, previous: dict | None = None) -> list[Finding]:
    """Findings from one benchmark diff (the provider's file): one ``capability_gap`` per capability the
    student loses items of (severity ``warning``; ``error`` when it loses more of them than at the
    ``previous`` benchmark iteration: ``{"iteration": j, "lost": {capability: n}}``), worst first, with the
    tasks, the example items and both accuracies as evidence."""
    prev_lost = (previous or {}).get("lost") or {}
    caps = set(doc.get("capabilities") or [])
    out = []
    for r in doc.get("regressed") or []:
        cap = r["tag"]
        if cap not in caps or r["lost"] < 1:   # a sub-tag (subject:..., paradigm:...) is reported under its capability
            continue
        before = prev_lost.get(cap)
        worse = before is not None and r["lost"] > before
        since = (f"; {before} at iteration {previous['iteration']}" if before is not None else "")
        tasks = {t: {k: row[k] for k in ("n", "lost", "gained", "teacher_correct", "student_correct")}
                 for t, row in doc["diff"]["by_task"].items() if cap in _task_caps(doc, t)}
        out.append(Finding(
            "capability_gap", "error" if worse else "warning", f"bench_lost/{cap}",
            f"capability {cap}: the student gets {r['lost']} of {r['n']} items wrong that the teacher gets right "
            f"(and {r['gained']} right that the teacher gets wrong; accuracy {r['student_acc']:.3f} vs the teacher's "
            f"{r['teacher_acc']:.3f}){since}",
            {"capability": cap, "lost": r["lost"], "gained": r["gained"], "n": r["n"],
             "teacher_acc": r["teacher_acc"], "student_acc": r["student_acc"], "lost_items": r["lost_items"],
             "examples": (doc.get("lost_examples") or {}).get(cap, []), "tasks": tasks,
             "previous": {"iteration": previous["iteration"], "lost": before} if before is not None else None,
             "suite": doc.get("suite")}, iteration=iteration))
    return out


def _task_caps(doc: dict, task: str) -> set[str]:
    det = (doc.get("student") or {}).get("details", {}).get(task, {})
    return {det.get("capability")} if det.get("capability") else set()
