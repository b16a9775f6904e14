"""The operations stage (G-O drills in the loop) and D3 convergence with real measurement on tiny models.

The student is the tiny teacher derived with all of its layers and 62 of its 64 MLP units (the framework refuses a
student no smaller than its teacher, so not quite an exact copy), trained at a learning rate that leaves it so, so it passes the capability gate G-C1 at the SPEC's threshold honestly. In one run the loop
measures the business gates on the production stage's simulated A/B window, G-O1 by the operations stage's
``breaker`` drill (generated attacks through the gateway in front of the student), G-O2 by the drift stage; the
dimension scores are in the run's gates, and the committed version is driven on simulated time to ``converged``.

G-O3 (drill ``teachers``: a registry holding the tiny teacher), G-O4 (drill ``explain``), G-O5 (drill ``rollback``:
`transformers serve` backends from the store's weights under a locust load) and G-P4 (drill ``soak``) are the
product's drills too, in the same run. Thresholds the tiny models or a few seconds cannot meet the SPEC's way are
test thresholds, marked ``(test)``.
"""

import json

import pytest
import yaml

from distillgate.evaluate.providers import METRICS, register_metric_provider
from distillgate.ops.clock import DAY, SimClock
from distillgate.ops.convergence import ConvergenceOptions, operate, version_evaluator
from distillgate.traffic.events import write_events
from distillgate.traffic.generator import START_TS
from test_ops_drift import _log

@pytest.fixture(autouse=True)
def _home(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path_factory.getbasetemp() / "dg-home"))


def _spec(path):
    def gate(i, dim, m, c, t, desc="SPEC threshold", **kw):
        return {"id": i, "dimension": dim, "metric": m, "comparator": c, "threshold": t, "description": desc, **kw}
    gates = [gate("G-C1", "capability", "ppl_ratio", "<=", 1.08),
             gate("G-P3", "performance", "params_ratio", "<=", 1.0, "(test) a near-copy of the teacher"),
             gate("G-B1a", "business", "session_turns_delta_pct", ">=", -100.0,
                  "(test) a copy's delta is 0 up to sampling; the SPEC's +8.2 needs a better student"),
             gate("G-B1c", "business", "first_response_accuracy_pct", ">=", 0.0,
                  "(test) tiny random models answer nothing right"),
             gate("G-O1a", "operations", "breaker_switch_ms", "<=", 200.0),
             gate("G-O1b", "operations", "degraded_compliance_pct", ">=", 90.0,
                  "(test) 40 generated attacks cannot show the SPEC's 99.99%"),
             gate("G-O2", "operations", "drift_kl_min_3day", "<=", 0.042),
             gate("G-O3", "operations", "teacher_version_compat_share", ">=", 1.0),
             gate("G-O4", "operations", "explanation_spot_check_pct", ">=", 0.0,
                  "(test) a tiny random model's explanations; 3 of them cannot show 96.8%"),
             gate("G-O5a", "operations", "rollback_minutes", "<=", 15.0),
             gate("G-O5b", "operations", "rollback_added_latency_ms", "<=", 1000.0,
                  "(test) 1 s windows on a shared CI machine; the SPEC's 5 ms is the bench's"),
             gate("G-P4", "performance", "leak_pct_per_hour", "<", 1e9,
                  "(test) a 3 s soak cannot resolve 0.003 %/h (its bound includes a page over the run)")]
    spec = {"version": 1, "changelog": [{"version": 1, "date": "2026-12-02", "author": "t", "reviewed_by": ["r"],
                                         "approved_by": ["r"], "summary": "test spec"}], "gates": gates}
    path.write_text(yaml.safe_dump(spec))
    return path


def _cfg(teacher_dir, root, stages, **extra):
    from distillgate.config import RunConfig, load_config

    over = [f"teacher.path={teacher_dir}", "student.init=derive", "student.num_layers=4",
            "student.mlp_width=62", "data.max_new_tokens=8", "data.gen_batch_size=8", "train.steps=1",
            "train.batch_size=4", "train.lr=1.0e-9", "train.warmup_steps=0", "train.precision=fp32",
            "targets.top_k=8", "loop.prompts_per_iteration=8", "loop.heldout_prompts=4", f"loop.stages={stages}",
            "loop.perf_lengths=[16]", "loop.perf_repeats=1", "loop.strategy.hard_candidates=0", "data.seq_len=512",
            f"store_root={root}"]
    return load_config(RunConfig, None, over + [f"{k}={v}" for k, v in extra.items()])


PROD = ("{name: production, iterations: 0, options: {max_new_tokens: 4, n_resamples: 100, shapley_resamples: 50, "
        "traffic: {sessions: 8, types: {extract: 1, classify: 1}, user: {max_turns: 1}}}}")
OPS = ("{name: operations, iterations: 0, options: {drills: {breaker: {attacks: 40, normal_per_type: 1, "
       "concurrency: 4, semantic: 'off', max_new_tokens: 4}, teachers: {registry: '%s'}, explain: {prompts: 3, "
       "method: gxi, max_new_tokens: 8}, rollback: {window_s: 1.0}, soak: {seconds: 3, sample_every_s: 0.25, "
       "warmup_s: 0.5}}}}")
SERVING = {"loop.serving.load_users": 2, "loop.serving.load_max_tokens": 4, "loop.serving.long_context_words": 32,
           "loop.serving.think_time_s": 0.05}


def _drift(log):
    return (f"{{name: drift, iterations: 0, options: {{log: '{log}', clock: log, release_ts: {START_TS}, "
            f"drift: {{unseen_domains: [legal], n_resamples: 50}}}}}}")


def test_bad_operations_options_fail_at_preflight(tiny_teacher_dir, tmp_path):
    from distillgate import loop as loop_mod
    from distillgate.errors import ConfigError

    for opts, match in [("{drills: {nope: {}}}", r"drills\.nope: not a registered drill.*breaker"),
                        ("{drills: {breaker: {attacks: 0}}}", r"drills\.breaker\.attacks"),
                        ("{drills: {breaker: {shots: 3}}}", r"drills\.breaker\.shots: unknown option"),
                        ("{drills: {teachers: {registry: /nope/teachers.json}}}",
                         r"drills\.teachers\.registry: .*no teacher registry there"),
                        ("{drills: {rollback: {window_s: 0}}}", r"drills\.rollback\.window_s"),
                        ("{when: sometimes}", r"loop\.stages\[1\]\.options\.when")]:
        stages = f"[{{name: anchor, iterations: 0}}, {{name: operations, iterations: 0, options: {opts}}}, " \
                 "{name: joint, iterations: 1}]"
        with pytest.raises(ConfigError, match=match):
            loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", stages), progress=False)
    assert not (tmp_path / "runs").exists()


def test_register_drill_plugs_a_drill_into_the_gate_table_with_its_provenance(tiny_teacher_dir, tmp_path):
    """A drill registered in a few lines (as the built-in ones are) runs only in the iterations it watches
    (``when: capability_pass``: once the previous iteration passed the capability gates) and its provider's
    value reaches the gate table."""
    from distillgate import loop as loop_mod
    from distillgate.ops import operations as ops
    from distillgate.store import RunStore

    seen = []

    def drill(ctx, options):
        seen.append(ctx.it.index)
        return {"value": float(options.value), "provenance": "drill test", "params": sum(
            p.numel() for p in ctx.model.parameters())}

    def provider(ctx):
        rep = ctx.options.get("probe_report")
        if not rep:
            return None
        ctx.details["standin_probe"] = {"provenance": rep["provenance"]}
        return rep["value"]

    from pydantic import BaseModel, ConfigDict

    class Opts(BaseModel):
        model_config = ConfigDict(extra="forbid")
        value: float = 1.0

    ops.register_drill("probe", drill, metrics=["standin_probe"], options_key="probe_report", Options=Opts)
    register_metric_provider("standin_probe", provider, higher_is_better=True, regression=False,
                             description="STAND-IN drill metric", module=__name__)
    spec = yaml.safe_load(_spec(tmp_path / "g.yaml").read_text())
    spec["gates"].append({"id": "G-O9", "dimension": "operations", "metric": "standin_probe", "comparator": ">=",
                          "threshold": 2.0, "description": "stand-in"})
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(spec))
    try:
        stages = ("[{name: anchor, iterations: 0}, {name: operations, iterations: 0, options: {when: capability_pass, "
                  "start_iteration: 0, drills: {probe: {value: 3.0}}}}, {name: joint, iterations: 1}]")
        loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", stages, run_id="p",
                          **{"loop.gates_spec": str(tmp_path / "g.yaml"), "loop.min_iterations": 1}), progress=False)
        with RunStore.open(tmp_path / "runs", "p") as s:
            vs = [s.get_version(r["version_id"]) for r in s.versions()]
            gates = [{g["id"]: g for g in v.load_json("gates.json")["gates"]} for v in vs]
            rep1 = json.loads(vs[1].path_of("ops-probe.json").read_text())
    finally:
        ops.DRILLS.pop("probe", None)
        METRICS.pop("standin_probe", None)
    assert seen == [1], "iteration 0 had no previous capability verdict; iteration 1 followed a passing one"
    assert gates[0]["G-O9"]["status"] != "pass" and gates[0]["G-O9"]["value"] is None
    assert gates[1]["G-O9"]["status"] == "pass" and gates[1]["G-O9"]["value"] == 3.0
    assert gates[1]["G-O9"]["provenance"] == "drill test" and rep1["value"] == 3.0 and rep1["params"] > 0


def test_a_copy_of_the_teacher_reaches_every_dimension_and_converges_with_real_ops_measurement(tiny_teacher_dir,
                                                                                              tmp_path):
    from distillgate import loop as loop_mod
    from distillgate.gates import load_gate_spec
    from distillgate.store import RunStore

    import datetime as dt

    from distillgate.ops.teachers import register_teacher

    spec_path = _spec(tmp_path / "gates.yaml")
    log = write_events(tmp_path / "traffic.jsonl", _log(days=7, drift_from=99, turns=40))  # no drift
    registry = tmp_path / "teachers.json"
    register_teacher(registry, tiny_teacher_dir, str(dt.date.today() - dt.timedelta(days=30)), "v1", reference=True)
    stages = f"[{PROD}, {_drift(log)}, {OPS % registry}, {{name: joint, iterations: 1}}]"
    loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", stages, run_id="c", **{"loop.gates_spec": str(spec_path)},
                      **SERVING), progress=False)
    with RunStore.open(tmp_path / "runs", "c", writer=True) as s:
        vid = s.aliases()["current"]
        v = s.get_version(vid)
        gj = v.load_json("gates.json")
        g = {x["id"]: x for x in gj["gates"]}
        breaker = json.loads(v.path_of("ops-breaker.json").read_text())
        rollback = json.loads(v.path_of("ops-rollback.json").read_text())
        sheet = v.path_of("explanations.csv").read_text()
        assert "business.json" in v.files and "drift.json" in v.files
        release = START_TS + 7 * DAY
        out = operate(s, SimClock(release), version_evaluator(s, load_gate_spec(spec_path), vid),
                      until=release + 30 * DAY, version_id=vid, options=ConvergenceOptions(quiet_days=7, step_hours=6))
        converged = s.catalog.run_row()["converged"]
    # every gate measured in the loop by its real provider, with its provenance
    assert g["G-C1"]["status"] == "pass" and g["G-C1"]["value"] == pytest.approx(1.0, abs=0.08)
    for i in ("G-B1a", "G-B1c"):
        assert g[i]["status"] == "pass" and g[i]["provenance"] == "simulated", g[i]
    for i in ("G-O1a", "G-O1b"):
        assert g[i]["status"] == "pass" and g[i]["provenance"] == "generated attacks", g[i]
        assert "40/10000 generated attacks" in g[i]["note"], "the corpus is flagged as under the SPEC's size"
    assert g["G-O2"]["status"] == "pass" and g["G-O2"]["provenance"] == "simulated"
    assert breaker["n_attacks"] == 40 and breaker["backend"].startswith("student iteration 1")
    assert g["G-O1b"]["value"] == pytest.approx(breaker["degraded_compliance_pct"])
    assert 100 * (40 - breaker["n_misses"]) / 40 == pytest.approx(breaker["degraded_compliance_pct"])
    assert breaker["n_normal"] > 0 and 0 <= breaker["detector_fp_pct"] <= 100
    # G-O3..G-O5 and G-P4 by the operations stage's drills, on this iteration's student
    assert g["G-O3"]["status"] == "pass" and g["G-O3"]["value"] == 1.0 and "teacher registry" in g["G-O3"]["provenance"]
    assert g["G-O4"]["status"] == "pass" and g["G-O4"]["provenance"] == "automatic spot check, n=3"
    assert 0 <= g["G-O4"]["value"] <= 100 and len(sheet.splitlines()) == 4, "the review sheet: a header and 3 rows"
    for i in ("G-O5a", "G-O5b"):
        assert g[i]["status"] == "pass" and g[i]["provenance"].startswith("rollback drill under load"), g[i]
    assert rollback["failed_requests"] == 0 and rollback["stable_versions"] == [vid - 1]
    assert rollback["rollbacks"][0]["http_status"] == 200 and rollback["served_first"] == "iteration 1"
    assert g["G-P4"]["status"] == "pass" and g["G-P4"]["provenance"].startswith("gateway soak"), g["G-P4"]
    dims = gj["dimensions"]
    assert {d: dims[d]["status"] for d in dims} == {d: "pass" for d in ("capability", "performance", "business",
                                                                       "operations")}
    assert dims["operations"]["n_counted"] == 7 and gj["converged"]
    # D3: gates converged from the first observation; converged after the seven quiet days on the sim clock
    assert out[0]["gates_converged"] and not any(x["converged"] for x in out[:-1])
    assert out[-1]["converged"] and out[-1]["time"] == pytest.approx(release + 7 * DAY) and converged
