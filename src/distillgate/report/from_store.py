"""Fill a :class:`ReportData` from a run in the store (read-only: takes no writer lock).

What is read, per iteration (its newest committed version that is not a rollback copy):
- catalog ``iterations``/``phases`` -> phase timings (status ``ok`` -> ``done``), laid out from the
  iteration's start time;
- catalog ``metrics`` of the version (split ``val`` by bare name, other splits as ``<split>:<name>``;
  ``family/name`` names are nested for the curves); split ``teacher`` on any version -> teacher baselines;
- ``gates.json`` in the version (a ``GateReport.to_json()``) for gates and dimension scores, else the
  catalog ``gate_results`` rows (their ``detail`` may carry metric/comparator/status/margin/closeness);
- the stage: version meta ``stage`` (else ``recipe.json``'s ``stage``; else "S2");
- the student weights: the version's ``*.safetensors`` files under its model prefix (default ``student/``),
  compared with the previous iteration's for the W5 heat maps (one tensor in memory at a time; ~10 s for a
  135M-parameter pair on this loaded 2-core machine), unless the version holds a ``param_diff.json``;
- ``benchmark.json`` (the anchor's per-item benchmark diff) of the newest iteration that has one;
and for the run: catalog ``findings``, ``decisions``, ``alerts`` and the ``runs`` row.

The loop calls :func:`render_run_report` after each iteration; ``distillgate report RUN`` does the same.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, InputError
from .convert import SEVERITY_ALIASES, finding_from_record, gate_from_row, gates_from_report, nest_metrics
from .data import (PHASES, RUN_STATUSES, STAGES, Alert, Decision, Iteration, ParamDiff, PhaseRecord, ReportData,
                   RunInfo, WorkOrder)

log = logging.getLogger(__name__)
PHASE_ALIASES = {"train": "map", "training": "map", "eval": "validate", "validation": "validate",
                 "release": "commit", "data": "extract"}
PHASE_STATUS = {"ok": "done", "done": "done", "failed": "failed", "skipped": "skipped", "running": "running"}


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe_model(spec: Any) -> str:
    """'default', a path, or for a student spec e.g. 'init=derive num_layers=15 mlp_width=1024'."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict):
        bits = [str(spec["path"])] if spec.get("path") else []
        bits += [f"init={spec['init']}"] if spec.get("init") else []
        bits += [f"{k}={spec[k]}" for k in ("num_layers", "mlp_width") if spec.get(k)]
        bits += [f"{k}={v}" for k, v in (spec.get("config") or {}).items() if isinstance(v, (int, float, str))][:4]
        return " ".join(bits) or "—"
    return "—"


def _run_status(row: dict) -> str:
    if row.get("converged"):
        return "converged"
    status = str(row.get("status", ""))
    if status in RUN_STATUSES:
        return status
    return "failed" if status.startswith("fail") else "running"


def _version_metrics(store, vid: int) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """(student metrics, teacher metrics) of one version, flat names."""
    student, teacher = {}, {}
    for r in store.catalog.q("SELECT name, split, value FROM metrics WHERE version_id=?", vid):
        if r["split"] == "teacher":
            teacher[r["name"]] = r["value"]
        else:
            student[r["name"] if r["split"] == "val" else f"{r['split']}:{r['name']}"] = r["value"]
    return student, teacher


def _gates(store, version) -> tuple[list, dict]:
    if "gates.json" in version.files:
        return gates_from_report(version.load_json("gates.json"))
    rows = store.catalog.q("SELECT * FROM gate_results WHERE version_id=? ORDER BY gate", version.version_id)
    gates, by_dim = [], {}
    for r in rows:
        detail = json.loads(r["detail"])
        g = gate_from_row(r["gate"], bool(r["passed"]), r["value"], r["threshold"], r["dimension"], detail)
        gates.append(g)
        if g.status != "not_measured" and g.dimension:
            # closeness when the gates module recorded it; else 1 for a pass and 0 for a failure (= pass share)
            by_dim.setdefault(g.dimension, []).append(detail.get("closeness", 1.0 if g.passed else 0.0))
    scores = {d: sum(v) / len(v) for d, v in by_dim.items()}
    return gates, scores


def _stage(version) -> str:
    stage = version.meta.get("stage")
    if stage is None and "recipe.json" in version.files:
        stage = version.load_json("recipe.json").get("stage")
    return stage if stage in STAGES else "S2"


def _model_files(version, prefix: str) -> list[Path]:
    return [version.path_of(n) for n in version.names(prefix) if n.endswith(".safetensors")]


def _strategy(store, findings) -> dict:
    """The knob effect table of the newest version's loop state (what the strategy learned, issue 16)."""
    from ..knobs import effect_table

    try:
        v = store.resolve("current")
    except Exception:  # noqa: BLE001  (a run without versions yet)
        return {}
    if "loop_state.json" not in v.files:
        return {}
    data = v.load_json("loop_state.json").get("strategy") or {}
    return {"effects": effect_table(data), "moves": list(data.get("moves") or []),
            "refused": sum(f.kind == "refused_change" for f in findings)}


def versions_by_iteration(rows: list[dict]) -> dict[int, dict]:
    """The version row that stands for each iteration: the newest non-rollback one, a rollback copy only when
    the iteration has nothing else (``rows``: ``store.versions()``, oldest first)."""
    by_iter: dict[int, dict] = {}
    for r in rows:
        if r["iteration"] is not None and (r["kind"] != "rollback" or r["iteration"] not in by_iter):
            by_iter[r["iteration"]] = r
    return by_iter


def _param_diffs(store, by_iter: dict[int, dict], models: dict[int, list[Path]]) -> list[ParamDiff]:
    """Consecutive iterations with weights: a stored ``param_diff.json`` (a ParamDiff dict the loop may
    commit with iteration k, against k-1) is used as is; otherwise the diff is computed from the weights."""
    from .layer_diff import SafetensorsState, param_diff

    out, ks = [], sorted(models)
    for a, b in zip(ks, ks[1:]):
        v = store.get_version(by_iter[b]["version_id"])
        try:
            if "param_diff.json" in v.files:
                pd = ParamDiff(**v.load_json("param_diff.json"))
                if (pd.from_iteration, pd.to_iteration) == (a, b):
                    out.append(pd)
                    continue
            out.append(param_diff(SafetensorsState(models[a]), SafetensorsState(models[b]), a, b))
        except (ArtifactError, InputError, TypeError) as e:
            log.warning("run %s: parameter diff %s->%s left out: %s", store.run_id, a, b, e)
    return out


def render_run_report(root: str | Path, run_id: str, out: str | Path | None = None, param_diffs: bool = True
                      ) -> Path:
    """Load run ``run_id`` and write its report (default ``<root>/<run_id>/report.html``). Safe to call while
    the loop holds the run's writer lock: the store is opened read-only (SQLite WAL readers don't block)."""
    from .html import render_report

    data = load_report_data(root, run_id, param_diffs=param_diffs)
    return render_report(data, out if out is not None else Path(root) / run_id / "report.html")


def load_report_data(root: str | Path, run_id: str, param_diffs: bool = True, model_prefix: str = "student"
                     ) -> ReportData:
    """Read run ``run_id`` under ``root`` into a :class:`ReportData` (see the module docstring).

    ``param_diffs=False`` skips reading model weights (the W5 section then says why it is empty)."""
    from ..store import RunStore

    with RunStore.open(root, run_id, writer=False) as store:
        cat = store.catalog
        run = cat.run_row()
        cfg = run.get("config") or {}
        rows = [r for r in store.versions() if r["iteration"] is not None]
        by_iter = versions_by_iteration(rows)
        vid_iter = {r["version_id"]: r["iteration"] for r in rows}
        iterations, baseline, models, bench = [], {}, {}, {}
        for it in cat.iterations():
            k = it["iteration"]
            t, phases = it["started"], []
            for name, p in it["phases"].items():
                phase = PHASE_ALIASES.get(name, name)
                if phase not in PHASES:
                    log.warning("run %s iteration %s: phase %r is not one of %s; left out of the report",
                                run_id, k, name, PHASES)
                    continue
                phases.append(PhaseRecord(phase, PHASE_STATUS.get(p["status"], "done"), p["seconds"], _iso(t)))
                t += p["seconds"]
            phases.sort(key=lambda p: PHASES.index(p.phase))
            entry = Iteration(index=k, stage="S2", status=PHASE_STATUS.get(it["status"], "running"),
                              phases=phases, started=_iso(it["started"]))
            row = by_iter.get(k)
            if row is not None:
                v = store.get_version(row["version_id"])
                metrics, teacher = _version_metrics(store, v.version_id)
                baseline.update(teacher)
                entry.metrics = nest_metrics(metrics)
                entry.gates, entry.dimension_scores = _gates(store, v)
                entry.stage, entry.version = _stage(v), str(v.version_id)
                if "consistency.json" in v.files:
                    entry.consistency = v.load_json("consistency.json")
                if "business.json" in v.files:
                    entry.business = v.load_json("business.json")
                if "benchmark.json" in v.files:
                    bench = {**{x: y for x, y in v.load_json("benchmark.json").items() if x != "student"},
                             "iteration": k}
                files = _model_files(v, model_prefix) if param_diffs else []
                if files:
                    models[k] = files
            iterations.append(entry)
        diffs = _param_diffs(store, by_iter, models) if param_diffs else []
        from .structure import snapshots

        structure = snapshots(store, by_iter)
        findings = [finding_from_record(f) for f in cat.findings()]
        decisions = [Decision(d["iteration"], d["knob"], d["old"], d["new"], d["reason"]) for d in cat.decisions()]
        alerts = [Alert(SEVERITY_ALIASES.get(a["level"], a["level"]), a["message"], a["source"],
                        vid_iter.get(a["version_id"]), _iso(a["time"])) for a in cat.alerts()]
        orders = [WorkOrder(w["id"], w["dimension"], w["status"], _iso(w["opened"]), w["location"], w["impact"],
                            w["suggested_fix"], list(w["verification"].get("gates", [])), _iso(w["closed"]),
                            w["closed_by"]) for w in cat.work_orders()]
        info = store.info()
        placed = store.get_version(rows[-1]["version_id"]).meta.get("placement") if rows else None
        strategy = _strategy(store, findings)
    summary = (f"{len(iterations)} iteration(s), {info['versions']} committed version(s); current = version "
               f"{info['current']}, best iteration = {info['best_iteration']}. Catalog status: {run['status']}."
               + placement_text(placed))
    if param_diffs and len(models) < 2:
        summary += f" No parameter differences: fewer than two iterations store weights under {model_prefix}/."
    data = ReportData(
        run=RunInfo(run_id, _describe_model(cfg.get("teacher")), _describe_model(cfg.get("student")),
                    _iso(run["created"]) or "", _run_status(run), summary, cfg),
        iterations=iterations, param_diffs=diffs, findings=findings, decisions=decisions, alerts=alerts,
        work_orders=orders,
        baseline_metrics=nest_metrics(baseline), structure=structure, benchmark=bench, strategy=strategy)
    data.validate()
    return data


def placement_text(placed: dict | None) -> str:
    """' Ran on ...': where the teacher and the student ran (W3) and on how many ranks (W2); '' when unknown."""
    if not placed:
        return ""
    parts = []
    for who in ("teacher", "student"):
        p = placed.get(who)
        if p:
            why = "" if p.get("reason", "as configured") == "as configured" else f", {p['reason']}"
            parts.append(f"{who} on {p['device']} ({p['dtype']}{why})")
    ranks = placed.get("ranks", 1)
    return f" Ran on {ranks} rank(s): {'; '.join(parts)}." if parts else ""
