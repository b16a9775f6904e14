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
from .schema import DIMENSIONS, GateResult

log = logging.getLogger(__name__)

REPORT_FORMAT_VERSION = 1
Comparator = Literal["<=", "<", ">=", ">"]
Dimension = Literal["capability", "performance", "business", "operations"]
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
            note = g.note or ("" if g.provenance else (g.requires or ""))
            if g.provenance:  # a measured traffic gate says what traffic, not what it would require
                note = provenance_label(g.provenance) + (f"; {note}" if note else "")
            if g.uncertain:
                status += "?"
            t.add_row(g.id, g.metric, _fmt(g.value), f"{g.comparator} {_fmt(g.threshold)}",
                      f"[{style[g.status]}]{status}[/]", margin, note)
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
        verdict += provenance_note(self.gates)
        return Group(t, d, verdict)


TRAFFIC_PROVENANCE = ("real", "replay", "simulated")


def provenance_label(provenance: str) -> str:
    """"simulated traffic" for a traffic kind (real / replay / simulated, or a mix "a+b"); any other
    provenance (generated attacks, human spot check, n=30) as it is."""
    kinds = provenance.split("+")
    return f"{provenance} traffic" if all(k.split()[0] in TRAFFIC_PROVENANCE for k in kinds if k) else provenance


def provenance_note(gates: list[GateResult]) -> str:
    """"; business gates measured on simulated traffic" (or replay / real logs, or a non-traffic
    provenance such as "automatic spot check, n=8"): a verdict says what its measured gates stand on."""
    by: dict[str, list[str]] = {}
    for g in gates:
        if g.provenance:
            by.setdefault(g.provenance, []).append(g.id)
    return "".join(f"; {', '.join(ids)} measured on {provenance_label(p)}" for p, ids in by.items())


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


def size_note(size: dict | None, ci: list[float] | None) -> str:
    """"48/300 paired groups, CI +-0.07" (the size used / the SPEC's, and the CI's half-width)."""
    parts = []
    if size and size.get("used") is not None:
        parts.append(f"{size['used']}/{size['spec'] if size.get('spec') else 'n.s.'} {size.get('unit', '')}".strip())
    if ci:
        parts.append(f"CI \u00b1{_fmt((ci[1] - ci[0]) / 2)}")
    return ", ".join(parts)


def evaluate_gate(gate: Gate, value: float | None, on_missing: str, closeness_scale: float,
                  note: str = "", provenance: str | None = None, ci: list[float] | None = None,
                  size: dict | None = None) -> GateResult:
    """Verdict of one gate for one value (None: nothing measured); ``provenance``: where a traffic-based
    value's data came from (real logs / replay / simulated), kept with the verdict; ``ci``: the value's 95%
    interval at the ``size`` used: when it contains the threshold the verdict is marked ``uncertain`` and the
    note says so (it still passes or fails on the value, as attribution's uncertain findings do)."""
    base = dict(id=gate.id, dimension=gate.dimension, metric=gate.metric, comparator=gate.comparator,
                threshold=gate.threshold, unit=gate.unit, requires=gate.requires,
                provenance=provenance if value is not None else None)
    if value is not None and (ci is not None or size is not None):
        uncertain = ci is not None and ci[0] <= gate.threshold <= ci[1]
        sn = size_note(size, ci)
        lead = (f"uncertain: CI [{_fmt(ci[0])}, {_fmt(ci[1])}] contains the threshold" if uncertain else "") + (
            f" ({sn})" if uncertain and sn else sn if sn else "")
        note = "; ".join(x for x in (lead, note) if x)
        base.update(ci95=list(ci) if ci is not None else None, size=size, uncertain=uncertain)
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
                   details: dict[str, Any] | None = None, provenance: dict[str, str] | None = None,
                   sizes: dict[str, dict] | None = None) -> GateReport:
    """Compare a flat ``{metric: value}`` dict with every gate of ``spec`` (see module docstring);
    ``provenance``: ``{metric: real logs | replay | simulated}`` for values measured on traffic; ``sizes``:
    ``{metric: {used, spec, unit, ci_method}}`` of sized checks. A metric's CI comes from
    ``<metric>/ci_low`` and ``<metric>/ci_high`` in ``metrics``."""
    notes, provenance, sizes = notes or {}, provenance or {}, sizes or {}

    def ci(m):
        lo, hi = metrics.get(f"{m}/ci_low"), metrics.get(f"{m}/ci_high")
        return None if lo is None or hi is None else [float(lo), float(hi)]
    results = [evaluate_gate(g, _as_float(metrics.get(g.metric)), spec.on_missing, spec.closeness_scale,
                             notes.get(g.metric, ""), provenance.get(g.metric), ci(g.metric), sizes.get(g.metric))
               for g in spec.gates]
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
# The metric registry lives in evaluate/providers.py (the loop and `distillgate gates` both measure through
# it); these names stay importable from here.
from .evaluate.providers import (METRIC_PROVIDERS, PROVIDER_MODULES, GateContext, MetricProvider,  # noqa: E402,F401
                                 collect_metrics, load_providers, register_metric_provider)
