"""Pure converters from what other modules record to the report's types (no I/O).

* :func:`gates_from_report`: a :class:`distillgate.gates.GateReport` JSON -> gate rows + radar scores;
* :func:`finding_from_record`: an attribution finding (``distillgate.attribution.Finding.to_dict()`` or a
  store ``findings`` row) -> :class:`Finding` with heat maps and top samples pulled out of its evidence;
* :func:`nest_metrics`: flat ``"family/name"`` metric names -> one level of nesting for the curves.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import InputError
from .data import COMPARATORS, Evidence, Finding, GateResult, HeatMap, SampleDivergence

SEVERITY_ALIASES = {"warn": "warning", "err": "error", "fatal": "critical", "red": "critical"}


def gates_from_report(report: dict[str, Any]) -> tuple[list[GateResult], dict[str, float | None]]:
    """Gate rows and dimension scores of one iteration from ``GateReport.to_json()``: rows keep value,
    threshold, comparator, margin and status; a dimension's radar score is its ``closeness`` (``None`` when
    the dimension has no score)."""
    try:
        rows = [GateResult(id=g["id"], dimension=g["dimension"], metric=g["metric"], value=g.get("value"),
                           threshold=g["threshold"], comparator=g["comparator"], passed=bool(g["passed"]),
                           status=g["status"], margin=g.get("margin"), unit=g.get("unit", "") or "",
                           note=g.get("note", "") or (g.get("requires") or ""), provenance=g.get("provenance"))
                for g in report["gates"]]
        scores = {d: (s.get("closeness") if s.get("status") != "no_score" else None)
                  for d, s in report.get("dimensions", {}).items()}
    except (KeyError, TypeError) as e:
        raise InputError(f"gate report: missing or malformed field {e} (expected GateReport.to_json())") from e
    return rows, scores


def gate_from_row(gate: str, passed: bool, value: float | None, threshold: float | None, dimension: str,
                  detail: dict) -> GateResult:
    """A store ``gate_results`` row; ``detail`` may carry the gates module's fields (metric, comparator,
    status, margin, unit, note). Missing ones are left blank rather than guessed."""
    comparator = detail.get("comparator", "")
    status = detail.get("status") or ("pass" if passed else ("not_measured" if value is None else "fail"))
    return GateResult(id=gate, dimension=dimension, metric=detail.get("metric", gate), value=_finite(value),
                      threshold=_finite(threshold),
                      comparator=comparator if comparator in COMPARATORS else "", passed=bool(passed),
                      status=status, margin=_finite(detail.get("margin")), unit=detail.get("unit", "") or "",
                      note=detail.get("note", "") or "", provenance=detail.get("provenance"))


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _heatmap(name: str, h: dict) -> HeatMap:
    """``{"rows", "cols", "z", "title"}`` (attribution's layout) or HeatMap's own field names."""
    y = [str(v) for v in h.get("rows", h.get("y", []))]
    x = [str(v) for v in h.get("cols", h.get("x", []))]
    z = [[_finite(v) for v in row] for row in h["z"]]
    parts = name.removeprefix("heatmap_").split("_")  # heatmap_domain_position -> domain, position
    return HeatMap(title=str(h.get("title", name)), x=x, y=y, z=z,
                   x_label=h.get("x_label", parts[-1] if len(parts) > 1 else ""),
                   y_label=h.get("y_label", parts[0] if len(parts) > 1 else ""),
                   value_label=h.get("value_label", "KL"))


def evidence_from_dict(evidence: dict[str, Any]) -> Evidence:
    """Split attribution evidence: ``heatmap_*`` grids and ``layer_kl`` (a per-layer list, drawn as a
    one-row heat map) become heat maps; ``top_samples``/``samples`` become sample rows; the rest is details."""
    heatmaps, samples, details = [], [], {}
    for key, value in (evidence or {}).items():
        if key.startswith("heatmap") and isinstance(value, dict) and "z" in value:
            heatmaps.append(_heatmap(key, value))
        elif key == "layer_kl" and isinstance(value, list) and value:
            heatmaps.append(HeatMap("KL(teacher‖student) by student layer", x=[str(i) for i in range(len(value))],
                                    y=["all"], z=[[_finite(v) for v in value]], x_label="layer", y_label="",
                                    value_label="KL"))
        elif key in ("top_samples", "samples") and isinstance(value, list):
            for s in value:
                score = s.get("kl", s.get("score", s.get("kl_mean")))
                samples.append(SampleDivergence(str(s.get("example_id", "")), _finite(score) or 0.0,
                                                str(s.get("domain", "")), str(s.get("text", ""))))
        elif value is not None:
            details[key] = value
    return Evidence(heatmaps, samples, details)


def finding_from_record(rec: dict[str, Any], iteration: int | None = None) -> Finding:
    """A :class:`distillgate.schema.Finding` dict ({kind, severity, subject, message, evidence}) or a store row
    ({iteration, kind, subject, severity, message, data}) as a report :class:`Finding`."""
    sev = str(rec.get("severity", "info"))
    it = rec.get("iteration")
    it = iteration if it is None else it
    if it is None:
        raise InputError(f"finding {rec.get('kind')!r}: no iteration given")
    return Finding(iteration=int(it), kind=str(rec.get("kind", "")), severity=SEVERITY_ALIASES.get(sev, sev),
                   metric=str(rec.get("metric", rec.get("subject")) or ""), message=str(rec.get("message", "")),
                   evidence=evidence_from_dict(rec.get("evidence", rec.get("data")) or {}))


def nest_metrics(flat: dict[str, float | None]) -> dict[str, Any]:
    """``{"kl_by_domain/legal": 0.2, "ppl": 14}`` -> ``{"kl_by_domain": {"legal": 0.2}, "ppl": 14}``; a name
    that is both a scalar and a family keeps the scalar under ``"<name>/"``'s family as ``"all"``."""
    out: dict[str, Any] = {}
    for name, value in sorted(flat.items()):
        v = _finite(value)
        if "/" in name:
            fam, sub = name.split("/", 1)
            if fam in out and not isinstance(out[fam], dict):
                out[fam] = {"all": out[fam]}
            out.setdefault(fam, {})[sub] = v
        elif isinstance(out.get(name), dict):
            out[name]["all"] = v
        else:
            out[name] = v
    return out
