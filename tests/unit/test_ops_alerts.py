"""D2 alerts -> work orders and D3 convergence on a simulated clock (a bare run store, gate reports built by the
real gate evaluation from a small four-dimension spec)."""

import pytest

from distillgate.gates import evaluate_gates, parse_gate_spec
from distillgate.ops.alerts import AlertOptions, AlertWatch
from distillgate.ops.clock import DAY, HOUR, SimClock
from distillgate.ops.convergence import ConvergenceOptions, convergence, operate
from distillgate.store import RunStore
from distillgate.traffic.generator import START_TS

SPEC = parse_gate_spec({
    "version": 1, "changelog": [{"version": 1, "date": "2026-12-01", "author": "a", "reviewed_by": ["b"],
                                 "approved_by": ["b"], "summary": "test spec"}],
    "gates": [{"id": "G-C1", "dimension": "capability", "metric": "kl", "comparator": "<=", "threshold": 1.0,
               "description": "d"},
              {"id": "G-P1", "dimension": "performance", "metric": "params_ratio", "comparator": "<=",
               "threshold": 1.0, "description": "d"},
              {"id": "G-B1", "dimension": "business", "metric": "b_metric", "comparator": ">=", "threshold": 0.5,
               "description": "d"},
              {"id": "G-O1a", "dimension": "operations", "metric": "o_metric", "comparator": "<=", "threshold": 200,
               "description": "d"}]})
GOOD = {"kl": 0.5, "params_ratio": 0.4, "b_metric": 0.9, "o_metric": 50.0}


def _version(store, it, recipe, metrics):
    with store.begin_version(it, kind="iteration") as vw:
        vw.add_json("recipe.json", recipe)
        vid = vw.commit(aliases=("current",), reason=f"iteration {it}")
    store.catalog.record_metrics(vid, metrics, "val")
    return vid


@pytest.fixture
def store(tmp_path):
    with RunStore.create(tmp_path, {}, run_id="r") as s:
        yield s


def test_two_hours_under_threshold_raise_one_work_order_with_root_cause_and_verification_closes_it(store):
    clock = SimClock(START_TS)
    v1 = _version(store, 1, {"train": {"lr": 1e-3}}, GOOD)
    v2 = _version(store, 2, {"train": {"lr": 1e-2}}, {**GOOD, "kl": 1.5})
    watch = AlertWatch(store, clock, AlertOptions(hold_hours=2))
    assert watch.observe(evaluate_gates(SPEC, GOOD), v1) == {"opened": [], "closed": []}
    bad = evaluate_gates(SPEC, {**GOOD, "kl": 1.5})
    for h in (1, 2):  # fails from hour 1; at hour 2 it has been under threshold for 1 h only
        clock.set(START_TS + h * HOUR)
        assert watch.observe(bad, v2)["opened"] == []
    clock.set(START_TS + 3 * HOUR)  # 2 h under threshold
    opened = watch.observe(bad, v2)["opened"]
    assert len(opened) == 1
    clock.set(START_TS + 4 * HOUR)
    assert watch.observe(bad, v2)["opened"] == [], "one work order per episode"
    [wo] = store.catalog.work_orders()
    assert wo["status"] == "open" and wo["dimension"] == "capability" and wo["opened"] == START_TS + 3 * HOUR
    assert "G-C1 kl = 1.5" in wo["location"] and "1 of 1 counted capability gates failing for 2.0 h" in wo["impact"]
    assert wo["root_cause"]["baseline_version"] == v1
    assert wo["root_cause"]["regressions"][0]["metric"] == "kl"
    assert wo["root_cause"]["knobs"][0]["knob"] == "train.lr"
    assert "revert train.lr" in wo["suggested_fix"] and wo["verification"]["gates"] == ["G-C1"]
    [alert] = [a for a in store.catalog.alerts() if a["source"] == "ops:capability"]
    assert alert["level"] == "error" and alert["time"] == START_TS + 3 * HOUR and alert["id"] == wo["alert_id"]
    clock.set(START_TS + 5 * HOUR)
    assert watch.observe(evaluate_gates(SPEC, GOOD), v1)["closed"] == [wo["id"]]
    [wo] = store.catalog.work_orders()
    assert wo["status"] == "closed" and wo["closed"] == START_TS + 5 * HOUR and "G-C1 pass" in wo["closed_by"]


def test_a_dip_shorter_than_the_hold_or_an_unmeasured_dimension_raises_nothing(store):
    clock = SimClock(START_TS)
    watch = AlertWatch(store, clock, AlertOptions(hold_hours=2))
    seq = [GOOD, {**GOOD, "kl": 2.0}, GOOD, {**GOOD, "kl": 2.0}, {k: v for k, v in GOOD.items() if k != "b_metric"}]
    for i, m in enumerate(seq * 3):
        clock.set(START_TS + i * HOUR)
        watch.observe(evaluate_gates(SPEC, m))
    assert store.catalog.work_orders() == [] and store.catalog.alerts() == []


def _schedule(red_from=None, red_hours=3.0):
    """Gate reports over simulated time; from ``red_from`` (seconds from start) operations fails ``red_hours``."""
    def evaluate(now):
        t = now - START_TS
        bad = red_from is not None and red_from <= t < red_from + red_hours * HOUR
        return evaluate_gates(SPEC, {**GOOD, "o_metric": 900.0 if bad else 50.0})
    return evaluate


def test_seven_quiet_days_converge_and_a_red_alert_restarts_the_window(store, tmp_path):
    opts = ConvergenceOptions(quiet_days=7, step_hours=2)
    out = operate(store, SimClock(START_TS), _schedule(), until=START_TS + 30 * DAY, options=opts)
    assert out[-1]["converged"] and out[-1]["time"] == START_TS + 7 * DAY
    assert not any(v["converged"] for v in out[:-1]) and store.catalog.run_row()["converged"]

    with RunStore.create(tmp_path / "b", {}, run_id="r2") as s2:
        out = operate(s2, SimClock(START_TS), _schedule(red_from=3 * DAY), until=START_TS + 30 * DAY, options=opts)
        red = [a["time"] for a in s2.catalog.alerts() if a["level"] == "error"]
        assert red == [START_TS + 3 * DAY + 2 * HOUR], "the red alert comes after two hours under threshold"
        assert out[-1]["converged"] and out[-1]["time"] == red[0] + 7 * DAY, "the quiet window restarted"
        [wo] = s2.catalog.work_orders()
        assert wo["status"] == "closed" and wo["closed"] == START_TS + 3 * DAY + 4 * HOUR
        mid = next(v for v in out if v["time"] == START_TS + 8 * DAY)
        assert not mid["converged"] and "restarted by the red alert" in mid["reason"]


def test_convergence_needs_every_gate_measured(store):
    partial = evaluate_gates(SPEC, {k: v for k, v in GOOD.items() if k != "o_metric"})
    AlertWatch(store, SimClock(START_TS)).observe(partial)
    v = convergence(store.catalog, partial, START_TS + 10 * DAY)
    assert not v["converged"] and "G-O1a" in v["reason"] and v["quiet_days"] == pytest.approx(10)


def test_alerts_command_lists_open_and_closed_work_orders(tmp_path, capsys):
    import json

    from distillgate.cli import main

    with RunStore.create(tmp_path, {}, run_id="r") as s:
        operate(s, SimClock(START_TS), _schedule(red_from=HOUR), until=START_TS + 6 * HOUR,
                options=ConvergenceOptions(step_hours=1))
    assert main(["alerts", "r", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ops:operations" in out and "0 open, 1 closed" in out and "G-O1a" in out
    assert main(["alerts", "r", "--root", str(tmp_path), "--status", "open", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["work_orders"] == [] and data["converged"] is False and len(data["alerts"]) == 1
    assert main(["alerts", "nope", "--root", str(tmp_path)]) != 0


def test_a_schema_1_catalog_migrates_to_the_ops_tables(tmp_path):
    import sqlite3

    from distillgate.errors import ArtifactError

    with RunStore.create(tmp_path, {}, run_id="old") as s:
        s.record_alert("warning", "store", "kept")
        db = s.catalog.path
    con = sqlite3.connect(db)
    con.executescript("DROP TABLE dimension_scores; DROP TABLE work_orders; PRAGMA user_version=1;")
    con.close()
    with pytest.raises(ArtifactError, match="needs migration to 2"):
        RunStore.open(tmp_path, "old")
    with RunStore.open(tmp_path, "old", writer=True) as s:
        assert s.catalog.work_orders() == [] and s.catalog.dimension_scores() == []
        assert [a["message"] for a in s.catalog.alerts()] == ["kept"]
