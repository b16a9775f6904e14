"""The ONE metric registry: what every metric means (direction, regression signal, tier) and who measures it.

``distillgate gates`` and the loop's validate phase both measure through :func:`collect_metrics` /
:func:`measure`, so a metric is computed one way everywhere; attribution reads each metric's direction and
regression threshold from :data:`METRICS`, so a newly registered metric (a FLOPs ratio, a stage's pass rate) is
attributed without a hand-kept list.

* :func:`register_metric`: metadata only (a metric some other code produces, e.g. a stage's pass rate);
* :func:`register_metric_provider`: metadata plus ``fn(ctx) -> value``; modules in :data:`PROVIDER_MODULES`
  register theirs when imported (perf, probes, inheritance, decision path, and the core ones below);
* :class:`GateContext`: what a provider may use: the teacher and student (loaded lazily from specs, or handed
  in already loaded by the loop), options (with :data:`CPU_PRESETS` as the defaults), a per-measurement
  ``cache``, a ``teacher_cache`` that may outlive one measurement (the loop keeps one per run), and
  ``details`` for what was measured how.

This module imports nothing heavy at import time.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

# The CPU-sized measurement presets (one place; the config's and the CLI's defaults read them).
CPU_PRESETS: dict[str, Any] = {
    "inheritance_groups": 48,    # G-C3 paired groups (SPEC: 300)
    "path_instructions": 30,     # G-C4 instructions (SPEC: 5,000)
    "probe_sentences": 200,      # G-C2 NER / dependency sentences each (60/20/20 split; 400: ~2x the time)
    "blimp_pairs": 150,          # G-C2 grammaticality pairs (spread over the BLiMP files)
    "repeats": 5, "warmup": 1,   # G-P1 TTFT repeats / warm-up calls per length and model
    "context_len": 512,          # G-P3 memory breakdown context; longest G-P2 request
    "volatility_requests": 24,   # G-P2 load size
    "probe_layers": 4,           # G-C2 candidate layers searched per model (bounded layer search)
    "probe_max_iter": 60,        # G-C2 L-BFGS iterations per probe fit
    "probe_selection": "fast",   # G-C2 layer search: closed-form ridge / short fits, one full fit per task
    "inheritance_new_tokens": 32,  # G-C3 greedy answer length
    "explain_prompts": 8,        # G-O4 automatic spot check: explained built-in prompts (SPEC names no size)
    "inheritance_batch_size": 48,  # G-C3 answers per left-padded generate call (144 at the preset: 3 calls)
    "path_batch_size": 16,       # G-C4 instructions per generate + forward/backward batch
    "seed": 0,
}

# The sizes the SPEC asks for, next to the presets used (shown as "used / SPEC" with each gate's CI).
SPEC_SIZES: dict[str, tuple[int | None, str]] = {
    "f1_gap_points": (None, "test items"),       # SPEC G-C2 names no size: the full test sets
    "inheritance": (300, "paired groups"),
    "path_consistency": (5000, "instructions"),
    "latency_volatility_ratio": (None, "requests"),  # SPEC G-P2: a 72-hour soak
    "explanation_spot_check_pct": (None, "explanations"),  # SPEC G-O4: "expert spot checks", no size
}


def wilson_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy's ``binomtest``)."""
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def report_size(ctx: "GateContext", metric: str, used: int, ci: tuple[float, float] | None, method: str) -> dict:
    """Put the size used, the SPEC's size and the 95% CI at that size into ``details[metric]['size']`` and
    the CI into ``ctx.extra`` as ``<metric>/ci_low``/``ci_high`` (the gate table marks a verdict whose CI
    crosses the threshold *uncertain*; attribution does not act on it)."""
    spec, unit = SPEC_SIZES.get(metric, (None, ""))
    size = {"used": int(used), "spec": spec, "unit": unit, "ci95": list(ci) if ci else None, "ci_method": method}
    d = ctx.details.setdefault(metric, {})
    if isinstance(d, dict):
        d["size"] = size
    if ci is not None and all(math.isfinite(x) for x in ci):
        ctx.extra[f"{metric}/ci_low"], ctx.extra[f"{metric}/ci_high"] = float(ci[0]), float(ci[1])
    return size

@dataclass
class GateContext:
    """What a metric provider may use: the teacher and student, the options, caches and details.

    Models come from ``student_spec``/``teacher_spec`` (loaded on first use) or are handed in loaded
    (:meth:`with_models`; any object with ``model``, ``tokenizer``, ``fingerprint``). Providers share work
    through ``cache`` (one perf run yields two metrics) and ``teacher_cache`` (teacher-side results that stay
    valid while the teacher and the data do, e.g. across the loop's iterations), and put their measurement
    details (per-length timings, perplexities, sizes used) into ``details[metric]``.
    """
    student_spec: str | None = None
    teacher_spec: str = "default"
    dtype: str = "float32"
    options: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    teacher_cache: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)  # sub-metrics a provider found on the way

    @classmethod
    def with_models(cls, teacher, student, options: dict | None = None,
                    teacher_cache: dict | None = None) -> "GateContext":
        ctx = cls(options=dict(options or {}), teacher_cache={} if teacher_cache is None else teacher_cache)
        ctx.cache["teacher"], ctx.cache["student"] = teacher, student
        return ctx

    def opt(self, key: str, default=None):
        """An option, else its CPU preset, else ``default``."""
        v = self.options.get(key)
        if v is None:
            v = CPU_PRESETS.get(key, default)
        return v

    def _load(self, which: str):
        if which not in self.cache:
            from ..models import load_model

            spec = self.teacher_spec if which == "teacher" else self.student_spec
            if spec is None:
                raise ConfigError(f"--{which}", None, f"a {which} model")
            self.cache[which] = load_model(spec, dtype=self.dtype,
                                           trust_remote_code=bool(self.options.get("trust_remote_code")))
        return self.cache[which]

    def teacher(self):
        return self._load("teacher")

    def student(self):
        return self._load("student")

    def same_tokenizer_pair(self, metric: str, why: str):
        """(teacher, student) for a metric that needs one tokenizer to serve both; InputError otherwise."""
        t, s = self.teacher(), self.student()
        if t.tokenizer is not s.tokenizer and t.tokenizer.get_vocab() != s.tokenizer.get_vocab():
            raise InputError(f"{metric}: teacher and student tokenizers differ; {why}")
        return t, s


@dataclass(frozen=True)
class MetricInfo:
    """A registered metric. ``regression``: whether a move against its direction between iterations is a
    regression signal for attribution (L2), with ``regression_threshold`` (None: the loop's
    ``loop.regression_threshold``); ``tier``: the capability tier it speaks for (L3)."""

    name: str
    higher_is_better: bool
    description: str
    module: str
    fn: Callable[[GateContext], float | None] | None = None
    regression: bool = True
    regression_threshold: float | None = None
    tier: str = "lm"


# Kept under its old name too: the providers are the entries with a measuring function.
MetricProvider = MetricInfo
METRICS: dict[str, MetricInfo] = {}
METRIC_PROVIDERS = METRICS
# Modules that register providers when imported; each is optional (absent while it is being built).
PROVIDER_MODULES = ("distillgate.evaluate.providers", "distillgate.perf", "distillgate.evaluate.probes",
                    "distillgate.evaluate.inheritance", "distillgate.evaluate.decision_path",
                    "distillgate.evaluate.benchmark", "distillgate.business.window", "distillgate.ops.gate",
                    "distillgate.ops.drift", "distillgate.ops.explain_review", "distillgate.ops.recovery",
                    "distillgate.ops.teachers")


def register_metric(name: str, *, higher_is_better: bool, description: str,
                    fn: Callable[[GateContext], float | None] | None = None, regression: bool = True,
                    regression_threshold: float | None = None, tier: str = "lm", module: str | None = None) -> MetricInfo:
    """Register metric ``name`` (once; the same code registering again is a no-op)."""
    mod = module or (fn.__module__ if fn is not None else "?")
    old = METRICS.get(name)
    same = lambda f, g: (f is None and g is None) or (f is not None and g is not None  # noqa: E731
                                                       and f.__qualname__ == g.__qualname__)
    if old is not None and (old.module != mod or not same(old.fn, fn)):
        raise ConfigError("metric provider", name, f"a name not already registered (by {old.module})")
    METRICS[name] = info = MetricInfo(name, bool(higher_is_better), description, mod, fn, regression,
                                      regression_threshold, tier)
    return info


def register_metric_provider(name: str, fn: Callable[[GateContext], float | None], higher_is_better: bool,
                             description: str, **meta) -> MetricInfo:
    """Register ``fn(ctx) -> value`` as the provider of metric ``name`` (one provider per name)."""
    return register_metric(name, higher_is_better=higher_is_better, description=description, fn=fn, **meta)


def load_providers(modules: tuple[str, ...] = PROVIDER_MODULES) -> dict[str, str]:
    """Import the provider modules that exist; returns ``{module: reason}`` for those that could not load."""
    problems = {}
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):  # the module itself is absent (not one of its imports)
                problems[mod] = "not present"
            else:
                problems[mod] = f"import failed: {e}"
        except Exception as e:  # a broken optional module must not take the gate run down
            problems[mod] = f"import failed: {type(e).__name__}: {e}"
    return problems


def measure(ctx: GateContext, names, given: dict[str, float | None] | None = None, skip=frozenset(),
            expect: dict[str, tuple] | None = None) -> tuple[dict[str, float | None], dict[str, str]]:
    """Values of ``names`` (in order): ``given`` first, else the registered provider (unless in ``skip``).

    Returns ``(metrics, notes)``; a metric with no value gets a note saying why (skipped, no provider,
    provider error). ``expect`` maps names to ``(higher_is_better, field, value)`` a caller relies on (a gate's
    comparator): a provider registered with the other direction is a ConfigError naming that field. ConfigError from a provider propagates
    (a usage error); other errors become notes. Sub-metrics a provider found (``ctx.extra``) are added."""
    metrics: dict[str, float | None] = dict(given or {})
    notes: dict[str, str] = {}
    for m in dict.fromkeys(names):
        if metrics.get(m) is not None or m in notes:
            continue
        info = METRICS.get(m)
        if m in skip:
            notes[m] = "skipped (--skip)"
            continue
        if info is None or info.fn is None:
            notes[m] = "no provider registered"
            continue
        if expect and m in expect and info.higher_is_better != expect[m][0]:
            raise ConfigError(expect[m][1], expect[m][2],
                              f"a comparator matching {m}'s higher_is_better={info.higher_is_better}")
        try:
            metrics[m] = info.fn(ctx)
        except ConfigError:
            raise
        except Exception as e:  # one broken metric fails its gate (loudly, in the table), not the run
            log.warning("metric %s failed: %s", m, e, exc_info=log.isEnabledFor(logging.DEBUG))
            notes[m] = f"provider error: {type(e).__name__}: {e}"
            metrics[m] = None
        if metrics.get(m) is None and m not in notes:
            d = ctx.details.get(m)
            notes[m] = d.get("note", "provider returned no value") if isinstance(d, dict) else \
                "provider returned no value"
    for k, v in ctx.extra.items():
        metrics.setdefault(k, v)
    return metrics, notes


def measure_student(teacher, student_model, names, options: dict, teacher_cache: dict | None = None,
                    done: GateContext | None = None):
    """:func:`measure` ``names`` for an in-memory student (sharing the teacher's tokenizer) against a loaded
    ``teacher``, the student in eval mode meanwhile; returns ``(metrics, notes, ctx)``. ``done``: the context of
    an earlier measurement of the same student whose shared passes (the held-out comparison) are reused."""
    from types import SimpleNamespace

    student = SimpleNamespace(model=student_model, tokenizer=teacher.tokenizer, fingerprint=None, path=None)
    ctx = GateContext.with_models(teacher, student, options, teacher_cache)
    if done is not None:
        ctx.cache.update(done.cache)
        ctx.extra.update(done.extra)
        ctx.details.update(done.details)
    was = student_model.training
    student_model.eval()
    try:
        metrics, notes = measure(ctx, names)
    finally:
        student_model.train(was)
    return metrics, notes, ctx


def collect_metrics(spec, ctx: GateContext, given: dict[str, float | None] | None = None,
                    skip: set[str] = frozenset()) -> tuple[dict[str, float | None], dict[str, str]]:
    """Values for every gate metric of ``spec`` (:func:`measure` over the gates' metrics). A gate that
    ``requires`` something not available here and has no value gets no note (its status says why)."""
    from ..gates import higher_is_better

    expect = {g.metric: (higher_is_better(g.comparator), f"gate {g.id}.comparator", g.comparator) for g in spec.gates}
    requires = {g.metric for g in spec.gates if g.requires}
    names = [g.metric for g in spec.gates if not (g.requires and g.metric not in METRICS)]
    metrics, notes = measure(ctx, names, given, skip, expect)
    for m in requires:
        if metrics.get(m) is None and notes.get(m) == "no provider registered":
            notes.pop(m)
    return metrics, notes


# ------------------------------------------------------------------------------------------------ core providers
# Held-out comparison (options['heldout']: the teacher-answered examples the student never trains on). One
# exact pass gives every metric below; the teacher side stays in ``teacher_cache`` between measurements.

HELDOUT_METRICS = {
    "kl": (False, True, "mean KL(teacher || student) per held-out position, exact (full vocabulary)"),
    "reverse_kl": (False, False, "mean KL(student || teacher) per held-out position"),
    "top1_agreement": (True, True, "share of held-out positions where the student's argmax is the teacher's"),
    "student_ppl_heldout": (False, True, "student perplexity of the teacher's held-out answers"),
    "teacher_ppl_heldout": (False, False, "teacher perplexity of its own held-out answers"),
    "ppl_ratio_heldout": (False, False, "student / teacher perplexity on the held-out answers"),
    "heldout_tokens": (True, False, "held-out prediction positions measured"),
}


def heldout_comparison(ctx: GateContext) -> dict | None:
    """The exact held-out comparison (:func:`distillgate.evaluate.teacher.compare_to_teacher`, ``top_k=None``)
    of ``options['heldout']`` (examples with id/domain/response), once per measurement: metrics, per-domain KL
    (``kl/domain/<d>`` in ``ctx.extra``) and per-sample divergences (``cache['heldout_samples']``)."""
    if "heldout" in ctx.cache:
        return ctx.cache["heldout"]
    examples = ctx.options.get("heldout")
    if not examples:
        ctx.cache["heldout"] = None
        for m in HELDOUT_METRICS:
            ctx.details[m] = {"note": "no held-out set (the loop and `distill` provide one)"}
        return None
    t, s = ctx.same_tokenizer_pair("kl", "KL needs one vocabulary")
    pad = t.tokenizer.pad_token_id if t.tokenizer.pad_token_id is not None else t.tokenizer.eos_token_id
    r, samples = divergence_samples(s.model, t.model, examples, pad, batch_size=int(ctx.opt("heldout_batch_size", 8)),
                                    teacher_cache=ctx.teacher_cache.setdefault("heldout_logprobs", {}))
    vals = {"kl": r["kl_forward_mean"], "reverse_kl": r["kl_reverse_mean"], "top1_agreement": r["top1_agreement"],
            "student_ppl_heldout": math.exp(r["student_nll_mean"]),
            "teacher_ppl_heldout": math.exp(r["teacher_nll_mean"]), "heldout_tokens": r["n_tokens"]}
    vals["ppl_ratio_heldout"] = vals["student_ppl_heldout"] / vals["teacher_ppl_heldout"]
    acc: dict[str, list[float]] = {}
    for smp in samples:
        acc.setdefault(smp.domain, []).append(smp.kl_mean)
    for d, v in sorted(acc.items()):
        ctx.extra[f"kl/domain/{d}"] = sum(v) / len(v)
    ctx.cache["heldout"], ctx.cache["heldout_samples"] = vals, samples
    return vals


def divergence_samples(student, teacher_model, examples, pad_id: int, *, batch_size: int = 8, teacher_cache=None):
    """The exact comparison of ``examples`` (teacher-answered :class:`~distillgate.data.dataset.Example`) and
    their per-sample divergences (attribution's :class:`~distillgate.attribution.SampleDivergence`)."""
    from ..attribution import SampleDivergence
    from .teacher import compare_to_teacher

    r = compare_to_teacher(student, teacher_model, examples, batch_size=batch_size, top_k=None, pad_id=pad_id,
                           teacher_cache=teacher_cache, per_position=True)
    by_id = {e.id: e for e in examples}
    samples = []
    for row in r["per_example"]:
        e, k = by_id[row["example_id"]], row["kl_by_position"]
        samples.append(SampleDivergence(e.id, e.domain, sum(k) / max(len(k), 1), k, e.response[:200]))
    return r, samples


def _heldout_metric(name: str):
    def fn(ctx: GateContext):
        vals = heldout_comparison(ctx)
        return None if vals is None else vals[name]
    fn.__qualname__ = f"heldout_metric[{name}]"
    return fn


for _name, (_hib, _reg, _desc) in HELDOUT_METRICS.items():
    register_metric_provider(_name, _heldout_metric(_name), higher_is_better=_hib, description=_desc,
                             regression=_reg, module=__name__)


def _text_head(path: Path, tokenizer, n_tokens: int) -> str:
    """The shortest prefix of the file (read in growing chunks) holding >= n_tokens tokens, or all of it:
    tokenizing a whole corpus (WikiText-2 valid: 1.2 MB) to keep 2,048 tokens is wasted work."""
    if not path.is_file():
        raise InputError(f"{path}: perplexity text file not found")
    chars = 8 * n_tokens
    with open(path, encoding="utf-8") as f:
        text = f.read(chars)
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens and (more := f.read(chars)):
            text += more
            chars *= 2
    return text


def perplexity_ratio(ctx: GateContext) -> float | None:
    """G-C1: student / teacher token perplexity on the same tokens of ``options['ppl_text']``, computed by
    :func:`distillgate.evaluate.lm.perplexity` (rolling windows: window 512, stride 256); the teacher's side is
    kept in ``teacher_cache``. Without a text, on the held-out teacher answers when there is a held-out set."""
    from .lm import perplexity

    text = ctx.options.get("ppl_text")
    if not text:
        vals = heldout_comparison(ctx) if ctx.options.get("heldout") else None
        if vals is not None:
            ctx.details["ppl_ratio"] = {"source": "held-out teacher answers (no eval.text_file)"}
            return vals["ppl_ratio_heldout"]
        ctx.details["ppl_ratio"] = {"note": "no text: pass --ppl-text FILE"}
        return None
    n_tokens = int(ctx.options.get("ppl_tokens", 2048))
    t, s = ctx.same_tokenizer_pair("ppl_ratio", "perplexities are not comparable")
    key = f"ppl_text:{Path(text).resolve()}:{n_tokens}"
    if key not in ctx.teacher_cache:
        head = _text_head(Path(text), t.tokenizer, n_tokens)
        ctx.teacher_cache[key] = (head, perplexity(t.model, t.tokenizer, head, max_tokens=n_tokens))
    head, pt = ctx.teacher_cache[key]
    ps = perplexity(s.model, s.tokenizer, head, max_tokens=n_tokens)
    if pt["n_tokens"] != ps["n_tokens"]:
        raise InputError(f"ppl_ratio: teacher scored {pt['n_tokens']} tokens, student {ps['n_tokens']}")
    ctx.details["ppl_ratio"] = {"teacher": pt, "student": ps, "text": str(text)}
    ctx.extra.update({"student_ppl_text": ps["ppl_token"], "teacher_ppl_text": pt["ppl_token"]})
    return ps["ppl_token"] / pt["ppl_token"]


register_metric_provider("ppl_ratio", perplexity_ratio, higher_is_better=False,
                         description="student / teacher perplexity on a text slice (G-C1)")
