"""``ReportData``: everything the HTML report shows, as plain JSON-able dataclasses.

The loop (or :mod:`distillgate.report.from_store`) fills one ``ReportData`` from the run store; the
renderer (:func:`distillgate.report.render_report`) only reads it. ``to_dict``/``from_dict`` give a
lossless JSON round trip (``distillgate report --from-json data.json`` renders a saved one).

Conventions
- Iterations are numbered from 0 (the first trained student); ``Iteration.index`` is that number.
- ``Iteration.stage`` is one of :data:`STAGES` ("S1".."S4"); phases are :data:`PHASES` in causal order.
- Dimension scores (D1 radar) are :class:`distillgate.gates.DimensionScore` ``closeness`` values: in [0, 1],
  1 = every counted gate of the dimension passes, lower = how far the failing ones are; ``None`` = no score
  (nothing measured in that dimension in that iteration).
- Gate results mirror :class:`distillgate.gates.GateResult` (status pass / fail / missing / not_measured).
- ``Iteration.metrics`` maps a metric name to a float, ``None`` (not measured) or one level of
  sub-metrics (``{"kl_by_domain": {"legal": 0.31, ...}}``); curves flatten it to ``"kl_by_domain/legal"``.
- ``ParamDiff.values[i][j]`` is ``||W_k - W_{k-1}||_F / ||W_{k-1}||_F`` of layer ``layers[i]``, parameter
  group ``groups[j]`` (see :func:`distillgate.report.layer_diff.param_diff`); ``None`` = no such parameter,
  or not comparable (shape changed by pruning, zero reference norm), explained in ``notes``.
- Times are ISO-8601 strings (UTC); durations are seconds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Union

from ..errors import InputError
from ..schema import DIMENSIONS, RECORDED_PHASES, STAGE_CODES
from .structure import StructureSnapshot

FORMAT_VERSION = 1
PHASES = RECORDED_PHASES  # the five phases + commit, as recorded per iteration
STAGES = STAGE_CODES
RUN_STATUSES = ("converged", "budget_exhausted", "iterations_exhausted", "running", "interrupted", "failed")
PHASE_STATUSES = ("pending", "running", "done", "failed", "skipped")
GATE_STATUSES = ("pass", "fail", "missing", "not_measured", "error")
SEVERITIES = ("info", "warning", "error", "critical")  # the store's three plus "critical" (a red alert, D3)
COMPARATORS = ("<=", "<", ">=", ">", "==", "")  # "": not recorded (a bare store row)

MetricValue = Union[float, None, dict]


@dataclass
class RunInfo:
    id: str
    teacher: str
    student: str
    created: str
    status: str
    summary: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the run config, shown folded


@dataclass
class PhaseRecord:
    phase: str
    status: str = "done"
    seconds: float | None = None
    started: str | None = None  # ISO time; the timeline lays phases end to end when missing
    note: str = ""


@dataclass
class GateResult:
    id: str
    dimension: str
    metric: str
    value: float | None
    threshold: float | None
    comparator: str
    passed: bool
    status: str
    margin: float | None = None  # signed distance to the threshold, positive = on the passing side
    unit: str = ""
    note: str = ""
    provenance: str | None = None  # traffic-based gates: real logs / replay / simulated


@dataclass
class Iteration:
    index: int
    stage: str
    status: str = "done"  # phase status of the iteration as a whole
    phases: list[PhaseRecord] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)
    dimension_scores: dict[str, float | None] = field(default_factory=dict)
    metrics: dict[str, MetricValue] = field(default_factory=dict)
    version: str | None = None  # committed artifact version id
    started: str | None = None
    consistency: dict | None = None  # the S4 stage's consistency.json (per-kind table, pool rates, examples)
    business: dict | None = None  # the production stage's business.json (A/B window: KPIs, CIs, Shapley, provenance)


@dataclass
class HeatMap:
    """A 2-D diagnostic grid, e.g. domain x layer or domain x position. ``z`` is [len(y)][len(x)]."""

    title: str
    x: list[str]
    y: list[str]
    z: list[list[float | None]]
    x_label: str = ""
    y_label: str = ""
    value_label: str = ""


@dataclass
class SampleDivergence:
    example_id: str
    score: float
    domain: str = ""
    text: str = ""


@dataclass
class Evidence:
    heatmaps: list[HeatMap] = field(default_factory=list)
    top_samples: list[SampleDivergence] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Finding:
    iteration: int
    kind: str  # e.g. regression, stall, weak_domain, hard_samples, knob_blame
    severity: str
    metric: str
    message: str
    evidence: Evidence = field(default_factory=Evidence)


@dataclass
class Decision:
    iteration: int
    knob: str
    old: Any
    new: Any
    reason: str


@dataclass
class Alert:
    severity: str
    message: str
    dimension: str = ""
    iteration: int | None = None
    time: str | None = None


@dataclass
class WorkOrder:
    """A D2 work order (catalog ``work_orders``): raised by a dimension's red alert, closed by its verification."""
    id: int
    dimension: str
    status: str  # open | closed
    opened: str | None
    location: str
    impact: str
    suggested_fix: str
    verification: list[str] = field(default_factory=list)  # gates that must pass
    closed: str | None = None
    closed_by: str | None = None


@dataclass
class ParamDiff:
    from_iteration: int
    to_iteration: int
    layers: list[str]
    groups: list[str]
    values: list[list[float | None]]  # [len(layers)][len(groups)] relative Frobenius change
    abs_change: list[list[float | None]] = field(default_factory=list)  # ||W_k - W_{k-1}||_F, same shape
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportData:
    run: RunInfo
    iterations: list[Iteration] = field(default_factory=list)
    param_diffs: list[ParamDiff] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    work_orders: list[WorkOrder] = field(default_factory=list)
    baseline_metrics: dict[str, MetricValue] = field(default_factory=dict)  # teacher reference (S1.3)
    structure: list[StructureSnapshot] = field(default_factory=list)  # per iteration (S3.3)
    benchmark: dict[str, Any] = field(default_factory=dict)  # latest benchmark.json + "iteration" (S1.1, L2)
    strategy: dict[str, Any] = field(default_factory=dict)  # {effects: knobs.effect_table rows, refused: n}
    generated: str | None = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (non-finite floats become ``None``, as JSON has no NaN)."""
        return _finite(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReportData":
        """Build and validate; raises :class:`InputError` naming the field path, value and what is allowed."""
        if not isinstance(d, dict):
            raise InputError(f"report data: expected a JSON object, got {type(d).__name__}")
        fv = d.get("format_version", FORMAT_VERSION)
        if fv != FORMAT_VERSION:
            raise InputError(f"report data.format_version: got {fv!r}; this distillgate reads {FORMAT_VERSION}")
        data = _build(cls, d, "report")
        data.validate()
        return data

    def validate(self) -> None:
        """Check enumerated fields, number types and shapes; raises :class:`InputError` on the first bad one."""
        _check(self.run.status, RUN_STATUSES, "run.status")
        for i, it in enumerate(self.iterations):
            p = f"iterations[{i}]"
            _int(it.index, f"{p}.index")
            for j, ph in enumerate(it.phases):
                _num(ph.seconds, f"{p}.phases[{j}].seconds")
            for j, g in enumerate(it.gates):
                for name in ("value", "threshold", "margin"):
                    _num(getattr(g, name), f"{p}.gates[{j}].{name}")
            for k, v in it.dimension_scores.items():
                _num(v, f"{p}.dimension_scores[{k!r}]")
            _check(it.stage, tuple(STAGES), f"{p}.stage")
            _check(it.status, PHASE_STATUSES, f"{p}.status")
            for j, ph in enumerate(it.phases):
                _check(ph.phase, PHASES, f"{p}.phases[{j}].phase")
                _check(ph.status, PHASE_STATUSES, f"{p}.phases[{j}].status")
            for j, g in enumerate(it.gates):
                _check(g.dimension, DIMENSIONS, f"{p}.gates[{j}].dimension")
                _check(g.comparator, COMPARATORS, f"{p}.gates[{j}].comparator")
                _check(g.status, GATE_STATUSES, f"{p}.gates[{j}].status")
            for k in it.dimension_scores:
                _check(k, DIMENSIONS, f"{p}.dimension_scores key")
        for i, f in enumerate(self.findings):
            _int(f.iteration, f"findings[{i}].iteration")
            _check(f.severity, SEVERITIES, f"findings[{i}].severity")
            for j, h in enumerate(f.evidence.heatmaps):
                _check_grid(h.z, len(h.y), len(h.x), f"findings[{i}].evidence.heatmaps[{j}].z")
        for i, x in enumerate(self.decisions):
            _int(x.iteration, f"decisions[{i}].iteration")
        for i, a in enumerate(self.alerts):
            _check(a.severity, SEVERITIES, f"alerts[{i}].severity")
            if a.iteration is not None:
                _int(a.iteration, f"alerts[{i}].iteration")
        for i, pd in enumerate(self.param_diffs):
            _int(pd.from_iteration, f"param_diffs[{i}].from_iteration")
            _int(pd.to_iteration, f"param_diffs[{i}].to_iteration")
            _check_grid(pd.values, len(pd.layers), len(pd.groups), f"param_diffs[{i}].values")
            if pd.abs_change:
                _check_grid(pd.abs_change, len(pd.layers), len(pd.groups), f"param_diffs[{i}].abs_change")


def _check(value: Any, allowed: tuple, where: str) -> None:
    if value not in allowed:
        raise InputError(f"report {where}: got {value!r}; allowed: {list(allowed)}")


def _int(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"report {where}: got {value!r}; allowed: an integer")


def _num(value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise InputError(f"report {where}: got {value!r}; allowed: a number or null")


def _check_grid(z: list, rows: int, cols: int, where: str) -> None:
    if len(z) != rows or any(len(r) != cols for r in z):
        shape = f"{len(z)}x{[len(r) for r in z]}"
        raise InputError(f"report {where}: shape {shape} does not match {rows} rows x {cols} columns")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# Nested dataclass fields, by (class, field name) -> element class, for from_dict.
_LISTS = {
    (ReportData, "iterations"): Iteration, (ReportData, "param_diffs"): ParamDiff,
    (ReportData, "findings"): Finding, (ReportData, "decisions"): Decision, (ReportData, "alerts"): Alert,
    (ReportData, "work_orders"): WorkOrder,
    (ReportData, "structure"): StructureSnapshot,
    (Iteration, "phases"): PhaseRecord, (Iteration, "gates"): GateResult,
    (Evidence, "heatmaps"): HeatMap, (Evidence, "top_samples"): SampleDivergence,
}
_OBJECTS = {(ReportData, "run"): RunInfo, (Finding, "evidence"): Evidence}


def _build(cls: type, d: Any, path: str):
    if not isinstance(d, dict):
        raise InputError(f"report {path}: expected an object for {cls.__name__}, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise InputError(f"report {path}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InputError(f"report {path}: missing required field(s) {missing} of {cls.__name__}")
    kw = {}
    for name, value in d.items():
        if (cls, name) in _LISTS:
            if not isinstance(value, list):
                raise InputError(f"report {path}.{name}: expected a list, got {type(value).__name__}")
            kw[name] = [_build(_LISTS[cls, name], v, f"{path}.{name}[{i}]") for i, v in enumerate(value)]
        elif (cls, name) in _OBJECTS:
            kw[name] = _build(_OBJECTS[cls, name], value, f"{path}.{name}")
        else:
            kw[name] = value
    return cls(**kw)

