"""The loop's one vocabulary: :class:`Finding`, :class:`Decision`, :class:`GateResult` and the names
:data:`PHASES`, :data:`DIMENSIONS`, :data:`TIERS`, :data:`STAGE_CODES`, each defined here and nowhere else.

Attribution produces findings, the strategy answers them with decisions, the gates produce results; the run
store records all three as they are, and the report reads them back. Everything here is plain data (JSON
round trip through ``to_dict`` / ``from_dict``) and imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

# The five phases of an iteration in causal order (SPEC L1); a committed iteration also records "commit".
PHASES: tuple[str, ...] = ("extract", "map", "validate", "attribute", "compensate")
COMMIT_PHASE = "commit"
RECORDED_PHASES: tuple[str, ...] = PHASES + (COMMIT_PHASE,)
# The four gate dimensions (SPEC section 3).
DIMENSIONS: tuple[str, ...] = ("capability", "performance", "business", "operations")
# Capability tiers, bottom up (SPEC L3).
TIERS: tuple[str, ...] = ("lm", "mid", "high")
# Stage codes of the SPEC's four stages (section 2).
STAGE_CODES: dict[str, str] = {"S1": "knowledge anchoring", "S2": "joint distillation",
                               "S3": "structure-aware pruning", "S4": "behaviour consistency"}
SEVERITIES: tuple[str, ...] = ("info", "warning", "error")


def _from_mapping(cls, data: Mapping[str, Any]):
    """``cls(**data)`` with a clear error naming unknown fields (old names are mapped by the caller)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        from .errors import ConfigError

        raise ConfigError(f"{cls.__name__}.{unknown[0]}", data[unknown[0]], f"fields {sorted(names)}")
    return cls(**data)


@dataclass
class Finding:
    """What attribution (or a stage) found in one iteration.

    ``kind``: regression | stall | weak_domain | hard_samples | gate_fail | nonfinite | data | repair_* | ...;
    ``subject``: what it is about (a metric name, a domain, a knob, a channel); ``evidence``: the data behind it
    (heat maps, knob blame, samples). ``uncertain``: the measurement's confidence interval crosses its threshold,
    so the strategy does not act on it (it is still reported)."""

    kind: str
    severity: str
    subject: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    iteration: int | None = None
    uncertain: bool = False

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            from .errors import ConfigError

            raise ConfigError("Finding.severity", self.severity, f"one of {SEVERITIES}")

    @property
    def metric(self) -> str:  # the subject of a metric finding is the metric's name
        return self.subject

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Finding":
        d = dict(data)
        if "data" in d and "evidence" not in d:  # a catalog row names the evidence column "data"
            d["evidence"] = d.pop("data")
        if "metric" in d and "subject" not in d:
            d["subject"] = d.pop("metric")
        for k in ("id", "version_id", "recorded"):
            d.pop(k, None)
        d.setdefault("evidence", {})
        return _from_mapping(cls, d)


@dataclass
class Decision:
    """One change of one knob of the next recipe, with the rule that made it and why.

    ``answers``: the finding it answers (``kind subject``); ``expected``: ``{metric, change, source}``, the
    relative change of ``metric`` the change is expected to cause (from the knob's prior or from what this run
    measured, :mod:`distillgate.knobs`); the next iteration's ``repair_*`` finding records what it did."""

    iteration: int
    rule: str
    knob: str
    old: Any
    new: Any
    reason: str
    answers: str = ""
    expected: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Decision":
        d = {k: v for k, v in data.items() if k not in ("id", "recorded")}
        d.setdefault("rule", "")
        return _from_mapping(cls, d)


class GateResult(BaseModel):
    """The verdict of one gate (see :mod:`distillgate.gates` for how it is reached)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    dimension: str
    metric: str
    comparator: str
    threshold: float
    unit: str = ""
    value: float | None
    status: Literal["pass", "fail", "missing", "not_measured"]
    passed: bool
    counted: bool = Field(description="enters the dimension score and all_passed")
    margin: float | None = None
    rel_margin: float | None = None
    closeness: float | None = None
    requires: str | None = None
    note: str = ""
    provenance: str | None = Field(None, description="where the value's data came from, for gates on traffic: "
                                   "real logs / replay / simulated (None: measured here)")
    ci95: list[float] | None = Field(None, description="95% confidence interval of the value at the size used "
                                     "(from the provider's ``<metric>/ci_low``/``ci_high``)")
    size: dict | None = Field(None, description="the measurement's size: {used, spec, unit, ci_method} (the SPEC's "
                              "size next to the preset used)")
    uncertain: bool = Field(False, description="the CI crosses the threshold: the pass/fail is not a verdict at "
                            "this size (attribution does not act on it either)")
