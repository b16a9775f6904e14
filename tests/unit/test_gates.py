"""Gate spec validation, verdicts (comparators, margins, NaN/missing/not-measured), scores, registry, CLI."""

import copy
import json
import math

import pytest
import yaml

from distillgate.cli import main
from distillgate.errors import ConfigError
from distillgate.gates import (GateContext, GateReport, collect_metrics, default_spec_path, evaluate_gates,
                               load_gate_spec, parse_gate_spec, register_metric_provider, METRIC_PROVIDERS)

CHANGELOG = [{"version": 1, "date": "2026-11-20", "author": "a", "reviewed_by": ["b"], "approved_by": ["c"],
              "summary": "first"}]


def mini_spec(**over):
    data = {"version": 1, "changelog": copy.deepcopy(CHANGELOG), "gates": [
        {"id": "G-C1", "dimension": "capability", "metric": "ppl_ratio", "comparator": "<=", "threshold": 1.08,
         "description": "ppl"},
        {"id": "G-C3", "dimension": "capability", "metric": "inheritance", "comparator": ">=",
         "threshold": 0.897, "description": "inh"},
        {"id": "G-P1", "dimension": "performance", "metric": "ttft_ratio", "comparator": "<", "threshold": 0.65,
         "description": "ttft"},
        {"id": "G-B1c", "dimension": "business", "metric": "first_response_accuracy_pct", "comparator": ">=",
         "threshold": 91.4, "description": "acc", "requires": "production traffic"},
    ]}
    data.update(over)
    return data


def test_shipped_spec_has_spec_defaults():
    spec = load_gate_spec(None)
    assert spec.version == 2 and spec.changelog[-1].version == 2 and spec.on_missing == "fail"
    got = {g.id: (g.metric, g.comparator, g.threshold) for g in spec.gates}
    assert got["G-C1"] == ("ppl_ratio", "<=", 1.08)
    assert got["G-C2"] == ("f1_gap_points", "<=", 1.2)
    assert got["G-C3"] == ("inheritance", ">=", 0.897)
    assert got["G-C4"] == ("path_consistency", ">=", 0.935)
    assert got["G-P1"] == ("ttft_ratio", "<", 0.65)
    assert got["G-P3"] == ("peak_memory_ratio", "<=", 0.52)
    assert all(g.requires for g in spec.gates if g.dimension in ("business", "operations"))
    assert {g.dimension for g in spec.gates} == {"capability", "performance", "business", "operations"}
    assert default_spec_path().is_file()


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("version"), "version"),
    (lambda d: d.pop("changelog"), "changelog"),
    (lambda d: d["gates"][0].update(foo=1), "gates.0.foo"),
    (lambda d: d.update(owner="x"), "owner"),
    (lambda d: d["gates"][1].update(comparator="=<"), "gates.1.comparator"),
    (lambda d: d["gates"][0].update(dimension="speed"), "gates.0.dimension"),
    (lambda d: d["gates"][0].update(threshold=float("nan")), "gates.0.threshold"),
    (lambda d: d["changelog"][0].update(approved_by=[]), "changelog.0.approved_by"),
    (lambda d: d["changelog"][0].pop("reviewed_by"), "changelog.0.reviewed_by"),
    (lambda d: d["changelog"][0].update(approved_by=["a"]), "changelog.0"),  # self-approval
    (lambda d: d.update(version=2), "spec.yaml"),  # latest changelog entry must carry the version
    (lambda d: d.update(on_missing="ignore"), "on_missing"),
])
def test_spec_validation_names_field(mutate, field):
    data = mini_spec()
    mutate(data)
    with pytest.raises(ConfigError) as e:
        parse_gate_spec(data, source="spec.yaml")
    assert e.value.field.startswith("spec.yaml") and e.value.field.endswith(field), e.value.field


def test_duplicate_ids_and_missing_file(tmp_path):
    data = mini_spec()
    data["gates"][1]["id"] = "G-C1"
    with pytest.raises(ConfigError, match="duplicate gate ids"):
        parse_gate_spec(data)
    with pytest.raises(ConfigError) as e:
        load_gate_spec(tmp_path / "nope.yaml")
    assert e.value.field == "--spec"
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump(mini_spec()))
    assert load_gate_spec(p).gates[0].id == "G-C1"


@pytest.mark.parametrize("comparator, threshold, value, passed, margin", [
    ("<=", 1.08, 1.08, True, 0.0),     # boundary passes a non-strict comparator
    ("<", 0.65, 0.65, False, 0.0),     # ... and fails a strict one
    ("<=", 1.08, 1.35, False, -0.27),
    ("<", 0.65, 0.52, True, 0.13),
    (">=", 0.897, 0.9, True, 0.003),
    (">", 0.935, 0.935, False, 0.0),
    (">=", 0.897, 0.8, False, -0.097),
    ("<=", -12.7, -15.0, True, 2.3),   # negative threshold: relative margin uses |threshold|
])
def test_comparator_margin_table(comparator, threshold, value, passed, margin):
    data = mini_spec(gates=[{"id": "G-C1", "dimension": "capability", "metric": "m", "comparator": comparator,
                             "threshold": threshold, "description": "d"}])
    r = evaluate_gates(parse_gate_spec(data), {"m": value}).gates[0]
    assert r.passed is passed and r.status == ("pass" if passed else "fail") and r.counted
    assert r.margin == pytest.approx(margin, abs=1e-12)
    assert r.rel_margin == pytest.approx(margin / abs(threshold), abs=1e-12)
    assert r.closeness == pytest.approx(1.0 if passed else math.exp(margin / abs(threshold) / 0.25))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_fails(bad):
    rep = evaluate_gates(parse_gate_spec(mini_spec()), {"ppl_ratio": bad, "inheritance": 0.95, "ttft_ratio": 0.5})
    g = rep.gates[0]
    assert g.status == "fail" and not g.passed and g.counted and g.value is None and "non-finite" in g.note
    assert not rep.all_passed and rep.dimensions["capability"].status == "fail"


def test_missing_fails_by_default_and_skip_policy():
    spec = parse_gate_spec(mini_spec())
    rep = evaluate_gates(spec, {"ppl_ratio": 1.0, "inheritance": 0.95})  # ttft_ratio missing
    g = rep.gates[2]
    assert (g.status, g.passed, g.counted, g.closeness) == ("missing", False, True, 0.0)
    assert not rep.all_passed and [f.id for f in rep.failed] == ["G-P1"]
    assert rep.dimensions["performance"].pass_share == 0.0
    skip = evaluate_gates(parse_gate_spec(mini_spec(on_missing="skip")), {"ppl_ratio": 1.0, "inheritance": 0.95})
    g = skip.gates[2]
    assert (g.status, g.counted) == ("missing", False)
    assert skip.all_passed and not skip.converged  # skipped gates never make a run converge
    assert skip.dimensions["performance"].status == "no_score" and skip.dimensions["performance"].pass_share is None


def test_not_measured_policy():
    spec = parse_gate_spec(mini_spec())
    rep = evaluate_gates(spec, {"ppl_ratio": 1.0, "inheritance": 0.95, "ttft_ratio": 0.5})
    b = rep.gates[3]
    assert (b.status, b.passed, b.counted) == ("not_measured", False, False)
    assert rep.all_passed and not rep.converged
    assert rep.dimensions["business"].status == "no_score" and rep.dimensions["business"].closeness is None
    assert rep.dimensions["operations"].n_gates == 0 and rep.dimensions["operations"].status == "no_score"
    # a value supplied for a `requires` gate (e.g. from production) is evaluated like any other
    rep2 = evaluate_gates(spec, {"ppl_ratio": 1.0, "inheritance": 0.95, "ttft_ratio": 0.5,
                                 "first_response_accuracy_pct": 92.0})
    assert rep2.gates[3].status == "pass" and rep2.converged
    # nothing measured at all is never a pass
    only_prod = mini_spec()
    only_prod["gates"] = only_prod["gates"][3:]
    rep3 = evaluate_gates(parse_gate_spec(only_prod), {})
    assert not rep3.all_passed and not rep3.converged


def test_dimension_scores():
    spec = parse_gate_spec(mini_spec())
    rep = evaluate_gates(spec, {"ppl_ratio": 1.35, "inheritance": 0.95, "ttft_ratio": 0.5})
    cap = rep.dimensions["capability"]
    assert (cap.n_gates, cap.n_counted, cap.n_passed, cap.status) == (2, 2, 1, "fail")
    assert cap.pass_share == 0.5
    rel = (1.08 - 1.35) / 1.08
    assert cap.closeness == pytest.approx((math.exp(rel / 0.25) + 1.0) / 2)  # (0.368.. + 1) / 2
    assert rep.dimensions["performance"].closeness == 1.0 and rep.dimensions["performance"].status == "pass"


def test_json_round_trip_and_table():
    spec = parse_gate_spec(mini_spec())
    rep = evaluate_gates(spec, {"ppl_ratio": float("nan"), "inheritance": 0.9, "extra_thing": 3},
                         notes={"ttft_ratio": "no provider registered"}, details={"perf": {"x": 1}})
    data = json.loads(json.dumps(rep.to_json(), allow_nan=False))  # strict JSON
    back = GateReport.from_json(data)
    assert back == rep
    odd = rep.model_copy(update={"details": {"perf": {32: float("inf")}}})
    assert json.loads(json.dumps(odd.to_json(), allow_nan=False))["details"] == {"perf": {"32": None}}
    assert back.extra_metrics == {"extra_thing": 3.0} and back.spec_sha256 == spec.sha256()
    assert data["gates"][2]["note"] == "no provider registered"
    from rich.console import Console

    con = Console(record=True, width=160)
    con.print(rep.format_table())
    text = con.export_text()
    assert "G-C1" in text and "FAILED" in text and "G-C1, G-P1" in text


def test_registry_and_collect_metrics():
    spec = parse_gate_spec(mini_spec())
    calls = []

    def ttft(ctx):
        calls.append(ctx.options["x"])
        return 0.4

    def inh(ctx):
        raise RuntimeError("encoder missing")

    saved = dict(METRIC_PROVIDERS)
    try:
        METRIC_PROVIDERS.pop("ttft_ratio", None)
        METRIC_PROVIDERS.pop("inheritance", None)  # registered by evaluate.inheritance when another test imported it
        register_metric_provider("ttft_ratio", ttft, higher_is_better=False, description="t")
        register_metric_provider("ttft_ratio", ttft, higher_is_better=False, description="t")  # idempotent
        with pytest.raises(ConfigError):
            register_metric_provider("ttft_ratio", inh, higher_is_better=False, description="other")
        register_metric_provider("inheritance", inh, higher_is_better=True, description="i")
        ctx = GateContext(student_spec="s", options={"x": 7})
        metrics, notes = collect_metrics(spec, ctx, {"ppl_ratio": 1.01}, skip=set())
        assert metrics["ttft_ratio"] == 0.4 and calls == [7] and metrics["ppl_ratio"] == 1.01
        assert metrics["inheritance"] is None and "encoder missing" in notes["inheritance"]
        # requires production traffic: not_measured, with no note, or (once distillgate.business.window registered
        # its provider) a note saying what it needs
        assert notes.get("first_response_accuracy_pct", "requires production traffic").startswith(
            "requires production traffic")
        metrics, notes = collect_metrics(spec, ctx, {}, skip={"ttft_ratio", "ppl_ratio"})
        assert notes["ttft_ratio"].startswith("skipped") and calls == [7]
        METRIC_PROVIDERS.pop("inheritance")
        register_metric_provider("inheritance", ttft, higher_is_better=False, description="wrong direction")
        with pytest.raises(ConfigError, match="G-C3"):
            collect_metrics(spec, ctx, {}, skip={"ttft_ratio", "ppl_ratio"})
    finally:
        METRIC_PROVIDERS.clear()
        METRIC_PROVIDERS.update(saved)


ALL_PASS = {"ppl_ratio": 1.05, "f1_gap_points": 0.8, "inheritance": 0.91, "path_consistency": 0.95,
            "ttft_ratio": 0.5, "peak_memory_ratio": 0.5, "latency_volatility_ratio": 1.1}


def _cli(tmp_path, metrics, *extra, student=None, teacher=None):
    m = tmp_path / "m.json"
    m.write_text(json.dumps(metrics))
    out = tmp_path / "report.json"
    rc = main(["gates", "--student", str(student), "--teacher", str(teacher), "--metrics", str(m),
               "--json", str(out), *extra])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture
def model_dirs(tmp_path):
    """Folders that resolve as model specs; nothing loads them when --metrics covers every measurable gate."""
    dirs = []
    for name in ("student", "teacher"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        dirs.append(d)
    return dict(zip(("student", "teacher"), dirs))


def test_cli_exit_codes(tmp_path, model_dirs):
    kw = model_dirs
    rc, rep = _cli(tmp_path, ALL_PASS, **kw)
    assert rc == 0 and rep["all_passed"] and not rep["converged"]
    assert rep["details"]["sources"]["ppl_ratio"] == "--metrics"
    assert {g["id"]: g["status"] for g in rep["gates"]}["G-O5b"] == "not_measured"
    rc, _ = _cli(tmp_path, ALL_PASS, "--require-converged", **kw)
    assert rc == 1
    # a Scorecard-shaped file with one failing gate
    card = {"metrics": {k: {"value": v, "higher_is_better": False} for k, v in ALL_PASS.items()}}
    card["metrics"]["ppl_ratio"]["value"] = 1.31
    rc, rep = _cli(tmp_path, card, **kw)
    g = {g["id"]: g for g in rep["gates"]}["G-C1"]
    assert rc == 1 and g["status"] == "fail" and g["margin"] == pytest.approx(-0.23)
    # a missing metric fails (perf skipped, no value given) ...
    partial = {k: v for k, v in ALL_PASS.items() if k != "ttft_ratio"}
    rc, rep = _cli(tmp_path, partial, "--skip-perf", **kw)
    assert rc == 1 and {g["id"]: g["status"] for g in rep["gates"]}["G-P1"] == "missing"
    # ... unless the policy says skip
    rc, rep = _cli(tmp_path, partial, "--skip-perf", "--on-missing", "skip", **kw)
    assert rc == 0 and not rep["converged"]


@pytest.mark.parametrize("extra, metrics", [
    (["--lengths", "32,x"], ALL_PASS),
    (["--repeats", "0"], ALL_PASS),
    (["--skip", "not_a_metric"], ALL_PASS),
    ([], {**ALL_PASS, "ppl_ratio": "low"}),
])
def test_cli_usage_errors_exit_2(tmp_path, model_dirs, extra, metrics):
    rc, rep = _cli(tmp_path, metrics, *extra, **model_dirs)
    assert rc == 2 and rep is None


def test_teacher_profile_resolves_to_its_model(tmp_path, model_dirs):
    from distillgate.commands.gates import resolve_teacher
    from distillgate.errors import InputError
    from distillgate.io import atomic_dir
    from distillgate.models.load import fingerprint_folder

    tiny_teacher_dir = model_dirs["teacher"]
    assert resolve_teacher(str(tiny_teacher_dir)) == str(tiny_teacher_dir)
    good = {"path": str(tiny_teacher_dir), "fingerprint": fingerprint_folder(tiny_teacher_dir)}
    with atomic_dir(tmp_path / "prof", kind="profile", format_version=1, meta=good) as d:
        (d / "profile.json").write_text("{}")
    assert resolve_teacher(str(tmp_path / "prof")) == str(tiny_teacher_dir)
    with atomic_dir(tmp_path / "stale", kind="profile", format_version=1, meta={**good, "fingerprint": "0" * 64}) as d:
        (d / "profile.json").write_text("{}")
    with pytest.raises(InputError, match="changed"):
        resolve_teacher(str(tmp_path / "stale"))


def test_ci_crossing_the_threshold_marks_the_verdict_uncertain():
    """A sized check's CI (``<m>/ci_low``/``ci_high``) and size go next to the verdict; a CI containing the
    threshold marks it uncertain (status unchanged: it still passes or fails on the value)."""
    spec = load_gate_spec(None)
    size = {"used": 48, "spec": 300, "unit": "paired groups", "ci_method": "Wilson"}
    r = evaluate_gates(spec, {"inheritance": 0.85, "inheritance/ci_low": 0.72, "inheritance/ci_high": 0.93,
                              "path_consistency": 0.5, "path_consistency/ci_low": 0.33,
                              "path_consistency/ci_high": 0.67}, sizes={"inheritance": size})
    g = {x.metric: x for x in r.gates}
    inh, path = g["inheritance"], g["path_consistency"]
    assert inh.status == "fail" and inh.uncertain and inh.ci95 == [0.72, 0.93] and inh.size == size
    assert inh.note.startswith("uncertain: CI [0.72, 0.93] contains the threshold")
    assert "48/300 paired groups, CI \u00b10.105" in inh.note
    assert path.status == "fail" and not path.uncertain and path.note == "CI \u00b10.17"   # 0.935 is above the CI
    assert not g["ppl_ratio"].uncertain and g["ppl_ratio"].ci95 is None
    assert GateReport.from_json(json.loads(json.dumps(r.to_json(), allow_nan=False))).gates == r.gates
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(r.format_table())
    assert "fail?" in console.export_text()
