"""G-O2 and D3 end to end on tiny models: the drift stage in a real loop run seeds a recalibration, and a
run's committed version driven on simulated time to `converged` (and a red alert restarting the quiet window).

The operations gates other than G-O2 are measured here by *test doubles* registered in this test under their own
metric names (``double_*``, never the product names): each reads a value from a schedule over the ops clock, so the
test controls when operations degrades, which no real drill can do on demand. D3 with every real operations
provider measured in the loop is tests/unit/test_ops_operations.py.
"""

import json

import pytest
import yaml

from distillgate.evaluate.providers import METRICS, register_metric_provider
from distillgate.ops.clock import DAY, HOUR, SimClock
from distillgate.ops.convergence import ConvergenceOptions, operate, version_evaluator
from distillgate.traffic.events import write_events
from distillgate.testing import tiny_loop_config
from distillgate.traffic.generator import START_TS
from test_ops_drift import _log

DOUBLES = {"double_breaker_switch_ms": ("G-O1a", "<=", 200.0, False), "double_teacher_compat": ("G-O3", ">=", 1.0, True),
           "double_explanation_pct": ("G-O4", ">=", 96.8, True), "double_rollback_minutes": ("G-O5a", "<=", 15.0, False)}
GOOD = {"double_breaker_switch_ms": 40.0, "double_teacher_compat": 1.0, "double_explanation_pct": 98.0,
        "double_rollback_minutes": 3.0}
BAD_FROM: dict = {}  # metric -> (start, end, value) on the ops clock: a degradation the test injects


def _double(name):
    def fn(ctx):
        now = ctx.options["now"]
        start, end, value = BAD_FROM.get(name, (None, None, None))
        return value if start is not None and start <= now < end else GOOD[name]
    fn.__qualname__ = f"test_double[{name}]"
    return fn


@pytest.fixture(autouse=True)
def _doubles(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path_factory.getbasetemp() / "dg-home"))
    for name, (_, cmp, _, hib) in DOUBLES.items():
        if name not in METRICS:
            register_metric_provider(name, _double(name), higher_is_better=hib, regression=False,
                                     description=f"TEST DOUBLE of an unbuilt ops measurement ({name})",
                                     module=__name__)
    BAD_FROM.clear()
    yield
    for name in DOUBLES:
        METRICS.pop(name, None)


def _spec(path):
    gate = lambda i, dim, m, c, t, **kw: {"id": i, "dimension": dim, "metric": m, "comparator": c,  # noqa: E731
                                           "threshold": t, "description": "test", **kw}
    gates = [gate("G-C1", "capability", "kl", "<=", 1000.0),  # a tiny random student: a loose test threshold
             gate("G-P3", "performance", "params_ratio", "<=", 1.0),
             gate("G-O2", "operations", "drift_kl_min_3day", "<=", 0.042, requires="production traffic")]
    gates += [gate(i, "operations", m, c, t, requires="production traffic") for m, (i, c, t, _) in DOUBLES.items()]
    gates.append(gate("G-B1c", "business", "double_business_pct", ">=", 0.0, requires="production traffic"))
    spec = {"version": 1, "changelog": [{"version": 1, "date": "2026-12-01", "author": "t", "reviewed_by": ["r"],
                                         "approved_by": ["r"], "summary": "test spec"}], "gates": gates}
    path.write_text(yaml.safe_dump(spec))
    return path


_cfg = tiny_loop_config  # the tests' loop config (distillgate.testing)


def _drift_stage(log):
    return (f"{{name: drift, iterations: 0, options: {{log: '{log}', clock: log, release_ts: {START_TS}, "
            f"drift: {{unseen_domains: [legal], n_resamples: 50}}}}}}")


def test_drift_in_the_loop_gates_G_O2_and_seeds_the_next_iteration(tiny_teacher_dir, tmp_path):
    from distillgate import loop as loop_mod
    from distillgate.store import RunStore

    log = write_events(tmp_path / "traffic.jsonl", _log(days=7, drift_from=3, turns=40))
    stages = f"[{{name: anchor, iterations: 0}}, {_drift_stage(log)}, {{name: joint, iterations: 2}}]"
    loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", stages, run_id="d", **{"loop.min_iterations": 2}),
                 progress=False)
    with RunStore.open(tmp_path / "runs", "d") as s:
        vs = [s.get_version(r["version_id"]) for r in s.versions()]
        g1 = {g["id"]: g for g in vs[1].load_json("gates.json")["gates"]}
        drift1 = json.loads(vs[1].path_of("drift.json").read_text())
        findings = [v.load_json("findings.json") for v in vs]
        decisions = [v.load_json("decisions.json") for v in vs]
        states = [v.load_json("loop_state.json") for v in vs]
    assert drift1["trigger_day"] == 5
    o2 = g1["G-O2"]
    assert o2["status"] == "fail" and o2["provenance"] == "simulated"
    assert o2["value"] == pytest.approx(min(r["kl"] for r in drift1["days"][-3:]))
    # the setup iteration's daily job already sees the streak: one recalibration, not one per iteration
    k = next(i for i, fs in enumerate(findings) if any(f["kind"] == "drift" for f in fs))
    assert sum(f["kind"] == "drift" for fs in findings for f in fs) == 1
    [f] = [f for f in findings[k] if f["kind"] == "drift"]
    [d] = [d for d in decisions[k] if d["rule"] == "drift_recalibration"]
    assert d["knob"] == "drift.prompts" and d["new"] == len(f["evidence"]["prompts"]) > 0
    fed = states[k + 1]["stages"]["drift"]["data"]["fed"]
    assert fed == [{"iteration": k + 1, "prompts": f["evidence"]["prompts"]}], "the next iteration trained on them"


def test_a_run_on_tiny_models_converges_on_simulated_time_and_a_red_alert_restarts_the_window(tiny_teacher_dir,
                                                                                             tmp_path):
    from distillgate import loop as loop_mod
    from distillgate.gates import load_gate_spec
    from distillgate.report.from_store import render_run_report
    from distillgate.store import RunStore

    METRICS.pop("double_business_pct", None)
    register_metric_provider("double_business_pct", lambda ctx: 95.0, higher_is_better=True, regression=False,
                             description="TEST DOUBLE of a business KPI (the real one needs an A/B window)",
                             module=__name__)
    spec_path = _spec(tmp_path / "gates.yaml")
    log = write_events(tmp_path / "traffic.jsonl", _log(days=7, drift_from=99, turns=40))  # no drift
    stages = f"[{{name: anchor, iterations: 0}}, {_drift_stage(log)}, {{name: joint, iterations: 1}}]"
    loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", stages, run_id="c",
                      **{"loop.gates_spec": str(spec_path)}), progress=False)
    spec = load_gate_spec(spec_path)
    release = START_TS + 7 * DAY
    opts = ConvergenceOptions(quiet_days=7, step_hours=2)
    with RunStore.open(tmp_path / "runs", "c", writer=True) as s:
        vid = s.aliases()["current"]
        g = {x["id"]: x for x in s.get_version(vid).load_json("gates.json")["gates"]}
        assert g["G-O2"]["status"] == "pass" and g["G-C1"]["status"] == "pass"
        loop_rows = [r for r in s.catalog.dimension_scores() if r["version_id"] == vid]
        assert {r["dimension"] for r in loop_rows} == {"capability", "performance", "business", "operations"}, \
            "every commit records the dimension scores (wall clock)"
        BAD_FROM["double_breaker_switch_ms"] = (release + 3 * DAY, release + 3 * DAY + 5 * HOUR, 900.0)
        out = operate(s, SimClock(release), version_evaluator(s, spec, vid), until=release + 30 * DAY,
                      version_id=vid, options=opts)
        red = [a["time"] for a in s.catalog.alerts() if a["source"] == "ops:operations"]
        [wo] = s.catalog.work_orders()
        converged = s.catalog.run_row()["converged"]
    assert red == [release + 3 * DAY + 2 * HOUR]
    assert not any(v["converged"] for v in out[:-1]) and converged
    assert out[-1]["time"] == red[0] + 7 * DAY, "the red alert restarted the seven-day window"
    assert "G-O1a double_breaker_switch_ms = 900" in wo["location"] and wo["status"] == "closed"
    assert wo["closed"] == release + 3 * DAY + 6 * HOUR
    html = render_run_report(tmp_path / "runs", "c").read_text()
    sec = html[html.index('<section id="work-orders">'):]
    assert "0 open, 1 closed" in sec[:sec.index("</section>")]
