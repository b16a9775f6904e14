"""Commit one iteration as one version of the run store (W4): student weights, recipe, scorecard, gates,
findings, decisions, loop state; move the aliases; then the catalog rows."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

from .state import LastGood


def commit(run, it) -> int:
    from ..train import distributed as dist

    st, store = run.state, run.store
    regressed = any(f.kind == "regression" for f in it.findings)
    nonfinite = any(f.kind == "nonfinite" for f in it.findings)
    gate_pass = bool(it.gates and it.gates.converged)  # D3: every gate measured and passing
    st.history.append({"iteration": it.index, "metrics": {k: v for k, v in it.metrics.items()
                                                          if isinstance(v, (int, float))},
                       "terms": it.train_terms, "recipe": it.recipe, "gates_passed": gate_pass})
    st.decisions += [d.to_dict() for d in it.decisions]
    st.pass_streak = st.pass_streak + 1 if gate_pass else 0
    good = not regressed and not nonfinite
    if good:
        st.last_good = LastGood(iteration=it.index, recipe=it.recipe)  # version: this one (set below)
    kl = it.metrics.get("kl", math.inf)
    best = st.best is None or kl < st.best["kl"]
    if best:
        st.best = {"iteration": it.index, "kl": kl}
    st.recipe = it.next_recipe or it.recipe
    aliases = ["current"] + (["best"] if best else []) + (["stable"] if good else [])
    metrics_json = {"student": it.metrics, "teacher": it.teacher_metrics}
    gates_json = it.gates.to_json() if it.gates is not None else None
    findings = [f.to_dict() for f in it.findings]
    decisions = [d.to_dict() for d in it.decisions]
    stage = it.stage
    code, name = getattr(stage, "code", "S1"), getattr(stage, "name", "setup")
    vid = _write_version(run, it, code, name, aliases, metrics_json, gates_json, findings, decisions) \
        if dist.is_main() else None
    vid = dist.broadcast_object(vid)  # under torchrun only rank 0 writes; every rank learns the version id
    run.lineage_note = None
    if good:
        st.last_good.version = vid
    if best:
        st.best["version"] = vid
    record_catalog(store, vid, it.index, metrics_json, gates_json, findings, decisions)
    if it.gates is not None and dist.is_main():  # D2 on wall time: the dimension scores, due alerts, verifications
        from ..ops.alerts import AlertWatch
        from ..ops.clock import WallClock

        ch = AlertWatch(store, WallClock(), run.cfg.loop.alerts).observe(it.gates, vid, samples=it.samples)
        for kind, ids in ch.items():
            if ids:
                run.say(f"  D2: work order(s) {ids} {kind} (distillgate alerts {store.run_id})")
    pol = run.cfg.store.retention
    if pol.auto_gc and dist.is_main():  # after the rows: the gate verdicts of this version count as references
        pruned = store.prune(pol.keep_last, pol.keep_aliases, pol.keep_referenced)
        if pruned:
            run.say(f"  retention: pruned versions {pruned} (keep_last={pol.keep_last})")
    return vid


def _write_version(run, it, code, name, aliases, metrics_json, gates_json, findings, decisions) -> int:
    from ..models import save_model

    st, store = run.state, run.store
    tmp = Path(tempfile.mkdtemp(dir=store.dir, prefix=".student-"))
    try:
        run.student.eval()
        sdir = save_model(run.student, run.teacher.tokenizer, tmp / "student",
                          meta={"iteration": it.index, "layer_map": st.layer_map, "teacher": run.cfg.teacher.path,
                                "teacher_fingerprint": run.teacher.fingerprint})
        run.student.train()
        meta = {"stage": code, "stage_name": name, "placement": run.placement, **(run.lineage_note or {})}
        with store.begin_version(it.index, kind="iteration", meta=meta) as vw:
            # move: the folder was saved on the run's file system for this commit alone, so its files are renamed
            # into the blob store (hashed in place) instead of copied: one write of the weights per iteration, and
            # weights identical to a stored blob cost no new bytes (the renamed file is dropped)
            vw.add_dir("student", sdir, move=True)
            for fname, path in it.files.items():
                p = Path(path)
                (vw.add_dir(fname, p) if p.is_dir() else vw.add_file(fname, p))
            vw.add_json("recipe.json", {**it.recipe, "stage": code})
            vw.add_json("next_recipe.json", st.recipe)
            vw.add_json("metrics.json", metrics_json)
            if gates_json is not None:
                vw.add_json("gates.json", gates_json)
            vw.add_json("findings.json", findings)
            vw.add_json("decisions.json", decisions)
            vw.add_json("divergence.json", [s.__dict__ for s in it.samples])
            vw.add_json("loop_state.json", st.to_json())
            vid = vw.commit(aliases=tuple(aliases), reason=f"iteration {it.index}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return vid


def record_catalog(store, vid: int, iteration: int, metrics_json: dict | None, gates_json: dict | None,
                   findings: list[dict] | None, decisions: list[dict] | None) -> None:
    """The catalog rows of a committed version (metrics, gates, findings, decisions), from its own JSON files;
    a ``None`` part is skipped.

    The version is committed first and these rows follow, so a crash in between leaves a version without
    rows; ``run --resume`` restores the missing ones for the version it continues from (:func:`repair_catalog`)."""
    num = lambda d: {k: v for k, v in (d or {}).items() if isinstance(v, (int, float))}  # noqa: E731
    if metrics_json is not None:
        store.record_metrics(vid, num(metrics_json.get("student")), "val")
        if metrics_json.get("teacher"):
            store.record_metrics(vid, num(metrics_json["teacher"]), "teacher")
    if gates_json is not None:
        from ..schema import GateResult

        store.record_gates(vid, [GateResult.model_validate(g) for g in gates_json["gates"]])
    if findings:
        store.record_findings(iteration, findings, vid)
    if decisions:
        store.record_decisions(iteration, decisions)


def repair_catalog(store, version) -> list[str]:
    """Re-record whichever catalog rows of ``version`` a crash after its commit lost; returns what was rebuilt."""
    if version.kind == "rollback":
        return []
    cat, vid, it = store.catalog, version.version_id, version.iteration
    load = lambda n, default=None: version.load_json(n) if n in version.files else default  # noqa: E731
    parts = {"metrics": not cat.metrics(vid), "gates": not cat.gate_results(vid),
             "findings": not [f for f in cat.findings(it) if f.get("version_id") == vid],
             "decisions": not cat.decisions(it)}
    record_catalog(store, vid, it, load("metrics.json") if parts["metrics"] else None,
                   load("gates.json") if parts["gates"] else None,
                   load("findings.json", []) if parts["findings"] else None,
                   load("decisions.json", []) if parts["decisions"] else None)
    rebuilt = [k for k, missing in parts.items() if missing]
    if rebuilt:
        store.record_alert("warning", "loop", f"version {vid}: catalog rows rebuilt from its artifacts "
                                              f"({', '.join(rebuilt)}): the previous process stopped between "
                                              f"commit and catalog write", vid)
    return rebuilt
