"""Convergence acceptance gates (SPEC section 3, G-*; versioned criteria, D4).

A gate spec (``specs/gates.yaml``, :class:`GateSpec`) lists gates ``metric comparator threshold`` in four
dimensions. :func:`evaluate_gates` turns a flat dict of measured metrics into a :class:`GateReport`:

* status ``pass``/``fail`` for a finite value; NaN/Inf is ``fail`` (never pass);
* ``missing``: measurable here but no value came in. Counted as a failure under ``on_missing: fail``
  (default); left out of the scores under ``on_missing: skip`` (still listed, and blocks ``converged``);
* ``not_measured``: the gate names ``requires`` (production traffic, a soak) and no value was supplied.
  Never a pass: left out of the dimension score; a dimension whose gates are all not measured has no score.
* margin: signed distance *in the direction of passing* (``threshold - value`` for ``<``/``<=``, ``value -
  threshold`` for ``>``/``>=``); ``rel_margin = margin / |threshold|``. A strict comparator fails at margin 0.
* dimension ``pass_share`` = passes / counted gates; ``closeness`` = mean over counted gates of
  ``min(1, exp(rel_margin / closeness_scale))`` (0 for missing/non-finite): a continuous radar value (D1).
* ``all_passed``: at least one measured pass and no counted failure (the CLI's exit status 0).
  ``converged``: all_passed and every gate measured and passing (SPEC D3, minus its 7-day alert window).

Metric values come from ``--metrics`` files or from providers in :data:`METRIC_PROVIDERS`, registered by the
modules that measure them (``register_metric_provider``); :func:`collect_metrics` calls them for the gates
that still lack a value.
"""

from __future__ import annotations

import importlib
import logging
import math
import operator
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, InputError
from .io import sha256_json

log = logging.getLogger(__name__)

REPORT_FORMAT_VERSION = 1
Comparator = Literal["<=", "<", ">=", ">"]
Dimension = Literal["capability", "performance", "business", "operations"]
DIMENSIONS: tuple[str, ...] = ("capability", "performance", "business", "operations")
_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


def higher_is_better(comparator: str) -> bool:
    return comparator in (">=", ">")


# ------------------------------------------------------------------------------------------------ spec

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChangelogEntry(_Strict):
    version: int = Field(ge=1, description="spec version this revision produced")
    date: date
    author: str = Field(min_length=1)
    reviewed_by: list[str] = Field(min_length=1, description="reviewers of this revision (D4)")
    approved_by: list[str] = Field(min_length=1, description="approvers; must not include the author")
    summary: str = Field(min_length=1)

    @model_validator(mode="after")
    def _no_self_approval(self):
        if self.author in self.approved_by:
            raise ValueError(f"author {self.author!r} cannot approve their own revision")
        return self


class Gate(_Strict):
    id: str = Field(pattern=r"^G-[CPBO]\d+[a-z]?$", description="e.g. G-C1, G-B1a")
    dimension: Dimension
    metric: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="key in the metrics dict")
    comparator: Comparator
    threshold: float
    unit: str = ""
    description: str = Field(min_length=1)
    requires: str | None = Field(None, description="prerequisite not available here (e.g. production traffic): "
                                                   "the gate reports not_measured unless a value is supplied")

    @field_validator("threshold")
    @classmethod
    def _finite(cls, v):
        if not math.isfinite(v):
            raise ValueError("threshold must be finite")
        return v


class GateSpec(_Strict):
    version: int = Field(ge=1)
    changelog: list[ChangelogEntry] = Field(min_length=1)
    on_missing: Literal["fail", "skip"] = "fail"
    closeness_scale: float = Field(0.25, gt=0, description="relative shortfall at which closeness is e^-1")
    gates: list[Gate] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self):
        versions = [c.version for c in self.changelog]
        if versions != sorted(set(versions)):
            raise ValueError(f"changelog versions must strictly increase, got {versions}")
        if versions[-1] != self.version:
            raise ValueError(f"latest changelog entry is version {versions[-1]}, spec says version {self.version}")
        ids = [g.id for g in self.gates]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate gate ids {dup}")
        return self

    def sha256(self) -> str:
        return sha256_json(self.model_dump(mode="json"))


def default_spec_path() -> Path:
    return Path(str(resources.files("distillgate") / "specs" / "gates.yaml"))


def parse_gate_spec(data: Any, source: str = "<gate spec>") -> GateSpec:
    """Validate a gate spec mapping; errors name ``source: field``, the value and what is allowed."""
    if not isinstance(data, dict):
        raise ConfigError(source, type(data).__name__, "a YAML mapping with version, changelog, gates")
    try:
        return GateSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        fld = f"{source}: {loc}" if loc else source
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] == "missing":
            msg = "a required field"
        extra = f"  [+{len(e.errors()) - 1} more]" if len(e.errors()) > 1 else ""
        raise ConfigError(fld, err.get("input") if err["type"] != "missing" else None, msg + extra) from None


def load_gate_spec(path: str | Path | None = None) -> GateSpec:
    """Load and validate a gate spec YAML (``None``: the shipped ``specs/gates.yaml``)."""
    p = Path(path) if path is not None else default_spec_path()
    if not p.is_file():
        raise ConfigError("--spec", str(p), "an existing gate spec YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("--spec", str(p), f"valid YAML ({e})") from None
    return parse_gate_spec(data, source=str(p))


# ------------------------------------------------------------------------------------------------ verdicts

class GateResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    dimension: str
    metric: str
    comparator: str
    threshold: float
    unit: str
    value: float | None
    status: Literal["pass", "fail", "missing", "not_measured"]
    passed: bool
    counted: bool = Field(description="enters the dimension score and all_passed")
    margin: float | None = None
    rel_margin: float | None = None
    closeness: float | None = None
    requires: str | None = None
    note: str = ""


class DimensionScore(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dimension: str
    n_gates: int
    n_counted: int
    n_passed: int
    n_not_measured: int
    pass_share: float | None = Field(description="passes / counted gates; None: no score (nothing measured)")
    closeness: float | None = Field(description="mean capped closeness of counted gates, in [0, 1]")
    status: Literal["pass", "fail", "no_score"]


class GateReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = REPORT_FORMAT_VERSION
    spec_version: int
    spec_sha256: str
    on_missing: str
    gates: list[GateResult]
    dimensions: dict[str, DimensionScore]
    all_passed: bool
    converged: bool
    extra_metrics: dict[str, float | None] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if g.counted and not g.passed]

    def to_json(self) -> dict:
        """Strict-JSON-able dict: NaN/Inf anywhere (a gate's value: with the reason in ``note``) become None."""
        return json_safe(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, data: dict) -> "GateReport":
        return cls.model_validate(data)

    def format_table(self):
        """A rich renderable: the gate table (value, threshold, status, margin) and the dimension scores."""
        from rich.console import Group
        from rich.table import Table

        style = {"pass": "green", "fail": "red", "missing": "red", "not_measured": "yellow"}
        t = Table(title=f"acceptance gates (spec v{self.spec_version}, on_missing={self.on_missing})")
        for col in ("gate", "metric", "value", "threshold", "status", "margin", "note"):
            t.add_column(col, justify="right" if col in ("value", "threshold", "margin") else "left",
                         no_wrap=col != "note", min_width=16 if col == "metric" else len(col),
                         overflow="fold", ratio=1 if col == "note" else None)
        for g in self.gates:
            status = g.status if g.counted or g.status != "missing" else "missing (skipped)"
            margin = "" if g.margin is None else _fmt(g.margin) + (
                "" if g.rel_margin is None else f" ({100 * g.rel_margin:+.3g}%)")
            t.add_row(g.id, g.metric, _fmt(g.value), f"{g.comparator} {_fmt(g.threshold)}",
                      f"[{style[g.status]}]{status}[/]", margin, g.note or (g.requires or ""))
        d = Table(title="dimension scores")
        for col in ("dimension", "status", "passed/counted", "pass_share", "closeness", "not measured"):
            d.add_column(col)
        for s in self.dimensions.values():
            d.add_row(s.dimension, s.status, f"{s.n_passed}/{s.n_counted}", _fmt(s.pass_share),
                      _fmt(s.closeness), str(s.n_not_measured))
        verdict = ("[green]ALL PASSED[/]" if self.all_passed else
                   f"[red]FAILED[/] ({', '.join(g.id for g in self.failed) or 'nothing measured'})")
        unscored = [d.dimension for d in self.dimensions.values() if d.status == "no_score"]
        not_meas = sum(g.status == "not_measured" or not g.counted for g in self.gates)
        verdict += "; converged" if self.converged else (
            f"; not converged: {not_meas} gates not measured or skipped"
            + (f" ({', '.join(unscored)} without a score)" if unscored else ""))
        return Group(t, d, verdict)


def json_safe(obj: Any) -> Any:
    """Replace NaN/Inf (not valid JSON) by None and non-str keys by str, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}"


def _as_float(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"metric value {v!r} is not a number")
    return float(v)


def evaluate_gate(gate: Gate, value: float | None, on_missing: str, closeness_scale: float,
                  note: str = "") -> GateResult:
    """Verdict of one gate for one value (None: nothing measured)."""
    base = dict(id=gate.id, dimension=gate.dimension, metric=gate.metric, comparator=gate.comparator,
                threshold=gate.threshold, unit=gate.unit, requires=gate.requires)
    if value is None:
        if gate.requires:
            return GateResult(**base, value=None, status="not_measured", passed=False, counted=False,
                              note=note or f"requires {gate.requires}")
        return GateResult(**base, value=None, status="missing", passed=False, counted=on_missing == "fail",
                          closeness=0.0, note=note or "no value measured or supplied")
    if not math.isfinite(value):
        return GateResult(**base, value=None, status="fail", passed=False, counted=True, closeness=0.0,
                          note=f"non-finite value ({value})" + (f"; {note}" if note else ""))
    passed = bool(_OPS[gate.comparator](value, gate.threshold))
    margin = (value - gate.threshold) if higher_is_better(gate.comparator) else (gate.threshold - value)
    rel = margin / abs(gate.threshold) if gate.threshold != 0 else None
    closeness = 1.0 if passed else math.exp((rel if rel is not None else margin) / closeness_scale)
    return GateResult(**base, value=value, status="pass" if passed else "fail", passed=passed, counted=True,
                      margin=margin, rel_margin=rel, closeness=min(1.0, closeness), note=note)


def evaluate_gates(spec: GateSpec, metrics: dict[str, float | None], notes: dict[str, str] | None = None,
                   details: dict[str, Any] | None = None) -> GateReport:
    """Compare a flat ``{metric: value}`` dict with every gate of ``spec`` (see module docstring)."""
    notes = notes or {}
    results = [evaluate_gate(g, _as_float(metrics.get(g.metric)), spec.on_missing, spec.closeness_scale,
                             notes.get(g.metric, "")) for g in spec.gates]
    dims = {}
    for dim in DIMENSIONS:
        rs = [r for r in results if r.dimension == dim]
        counted = [r for r in rs if r.counted]
        n_pass = sum(r.passed for r in counted)
        measured_pass = any(r.passed for r in counted)
        share = n_pass / len(counted) if counted else None
        close = sum(r.closeness or 0.0 for r in counted) / len(counted) if counted else None
        status = "no_score" if not counted else ("pass" if measured_pass and n_pass == len(counted) else "fail")
        dims[dim] = DimensionScore(dimension=dim, n_gates=len(rs), n_counted=len(counted), n_passed=n_pass,
                                   n_not_measured=sum(r.status == "not_measured" for r in rs),
                                   pass_share=share, closeness=close, status=status)
    counted = [r for r in results if r.counted]
    all_passed = bool(counted) and all(r.passed for r in counted)
    converged = all_passed and all(r.status == "pass" for r in results)
    known = {g.metric for g in spec.gates}
    extra = {k: _as_float(v) for k, v in metrics.items() if k not in known}
    return GateReport(spec_version=spec.version, spec_sha256=spec.sha256(), on_missing=spec.on_missing,
                      gates=results, dimensions=dims, all_passed=all_passed, converged=converged,
                      extra_metrics=extra, details=details or {})


# ------------------------------------------------------------------------------------------------ providers

@dataclass
class GateContext:
    """What a metric provider may use: lazily loaded teacher/student and the command's options.

    Providers share expensive work through ``cache`` (e.g. one perf run yields two metrics) and put their
    measurement details (per-length timings, memory breakdowns, perplexities) into ``details[metric]``.
    """
    student_spec: str
    teacher_spec: str = "default"
    dtype: str = "float32"
    options: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def _load(self, which: str):
        if which not in self.cache:
            from .models import load_model

            spec = self.teacher_spec if which == "teacher" else self.student_spec
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
        if t.tokenizer.get_vocab() != s.tokenizer.get_vocab():
            raise InputError(f"{metric}: teacher and student tokenizers differ; {why}")
        return t, s


@dataclass(frozen=True)
class MetricProvider:
    name: str
    fn: Callable[[GateContext], float | None]
    higher_is_better: bool
    description: str
    module: str


METRIC_PROVIDERS: dict[str, MetricProvider] = {}
# Modules that register providers when imported; each is optional (absent while it is being built).
PROVIDER_MODULES = ("distillgate.perf", "distillgate.evaluate.probes", "distillgate.evaluate.inheritance",
                    "distillgate.evaluate.decision_path")


def register_metric_provider(name: str, fn: Callable[[GateContext], float | None], higher_is_better: bool,
                             description: str) -> MetricProvider:
    """Register ``fn(ctx) -> value`` as the provider of gate metric ``name`` (one provider per name)."""
    old = METRIC_PROVIDERS.get(name)
    if old is not None and (old.module, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
        raise ConfigError("metric provider", name, f"a name not already registered (by {old.module})")
    p = MetricProvider(name, fn, bool(higher_is_better), description, fn.__module__)
    METRIC_PROVIDERS[name] = p
    return p


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


def collect_metrics(spec: GateSpec, ctx: GateContext, given: dict[str, float | None] | None = None,
                    skip: set[str] = frozenset()) -> tuple[dict[str, float | None], dict[str, str]]:
    """Values for every gate metric: ``given`` first, else its registered provider (unless in ``skip``).

    Returns ``(metrics, notes)``; a metric with no value gets a note saying why (skipped, no provider,
    provider error). ConfigError from a provider propagates (a usage error); other errors become notes.
    """
    metrics: dict[str, float | None] = dict(given or {})
    notes: dict[str, str] = {}
    for g in spec.gates:
        m = g.metric
        if metrics.get(m) is not None or m in notes:
            continue
        prov = METRIC_PROVIDERS.get(m)
        if m in skip:
            notes[m] = "skipped (--skip)"
        elif prov is None:
            if not g.requires:
                notes[m] = "no provider registered"
        else:
            if prov.higher_is_better != higher_is_better(g.comparator):
                raise ConfigError(f"gate {g.id}.comparator", g.comparator,
                                  f"a comparator matching {m}'s higher_is_better={prov.higher_is_better}")
            try:
                metrics[m] = prov.fn(ctx)
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
    return metrics, notes


# ------------------------------------------------------------------------------------------------ G-C1

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
    :func:`distillgate.evaluate.lm.perplexity` (rolling windows: window 512, stride 256)."""
    from .evaluate.lm import perplexity

    text = ctx.options.get("ppl_text")
    if not text:
        ctx.details["ppl_ratio"] = {"note": "no text: pass --ppl-text FILE"}
        return None
    n_tokens = int(ctx.options.get("ppl_tokens", 2048))
    t, s = ctx.same_tokenizer_pair("ppl_ratio", "perplexities are not comparable")
    head = _text_head(Path(text), t.tokenizer, n_tokens)
    pt = perplexity(t.model, t.tokenizer, head, max_tokens=n_tokens)
    ps = perplexity(s.model, s.tokenizer, head, max_tokens=n_tokens)
    if pt["n_tokens"] != ps["n_tokens"]:
        raise InputError(f"ppl_ratio: teacher scored {pt['n_tokens']} tokens, student {ps['n_tokens']}")
    ctx.details["ppl_ratio"] = {"teacher": pt, "student": ps, "text": str(text)}
    return ps["ppl_token"] / pt["ppl_token"]


register_metric_provider("ppl_ratio", perplexity_ratio, higher_is_better=False,
                         description="student / teacher perplexity on a text slice (G-C1)")
