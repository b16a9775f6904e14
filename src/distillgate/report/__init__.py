"""The HTML report (SPEC D1 radar, W1 pipeline view, W5 parameter-difference heat maps).

``ReportData`` (data.py) is the plain, JSON-able input; ``render_report`` (html.py) writes one self-contained
page; ``param_diff`` (layer_diff.py) computes the per-layer change between two iterations' weights.
Import cost is light: plotly is imported when a page is rendered, torch when a diff is computed.
"""

from __future__ import annotations

from .data import (DIMENSIONS, FORMAT_VERSION, PHASES, STAGES, Alert, Decision, Evidence, Finding, GateResult,
                   HeatMap, Iteration, ParamDiff, PhaseRecord, ReportData, RunInfo, SampleDivergence)

__all__ = ["DIMENSIONS", "FORMAT_VERSION", "PHASES", "STAGES", "Alert", "Decision", "Evidence", "Finding",
           "GateResult", "HeatMap", "Iteration", "ParamDiff", "PhaseRecord", "ReportData", "RunInfo",
           "SampleDivergence", "render_report", "param_diff", "param_diff_dirs"]


def __getattr__(name: str):
    # Lazy (PEP 562): rendering imports plotly, diffs import torch; neither is needed to build ReportData.
    if name == "render_report":
        from .html import render_report

        return render_report
    if name in ("param_diff", "param_diff_dirs"):
        from . import layer_diff

        return getattr(layer_diff, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
