"""The HTML report: W5 parameter differences, ReportData round trip, converters, store loader, rendering."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from distillgate.errors import InputError
from distillgate.report import ReportData, param_diff, render_report
from distillgate.report.convert import finding_from_record, gates_from_report, nest_metrics
from distillgate.report.layer_diff import GROUPS, classify, param_diff_dirs
from distillgate.report.sample import synthetic_report

XSS = "<script>alert(1)</script>"


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cell(pd, row: str, group: str):
    return pd.values[pd.layers.index(row)][pd.groups.index(group)]


# ------------------------------------------------------------------------------------------- param_diff

def test_classify_llama_names():
    assert classify("model.layers.3.self_attn.q_proj.weight") == ("layer 3", "q")
    assert classify("model.layers.0.self_attn.o_proj.weight") == ("layer 0", "o")
    assert classify("model.layers.1.mlp.gate_proj.weight") == ("layer 1", "gate")
    assert classify("model.layers.1.mlp.down_proj.weight") == ("layer 1", "down")
    assert classify("model.layers.12.post_attention_layernorm.weight") == ("layer 12", "norm")
    assert classify("model.layers.2.self_attn.k_norm.weight") == ("layer 2", "norm")
    assert classify("model.layers.2.adapter.gate.weight") == ("layer 2", "other")  # S2.3 adapter
    assert classify("model.embed_tokens.weight") == ("embed", "other")
    assert classify("model.norm.weight") == ("final", "norm")
    assert classify("lm_head.weight") == ("final", "other")
    assert classify("rotary.inv_freq") == ("other", "other")


def test_param_diff_identical_is_zero(tiny_model_factory):
    model = tiny_model_factory(num_layers=2)
    pd = param_diff(model.state_dict(), model.state_dict())  # live state dicts: lm_head shares embed's storage
    assert pd.layers == ["embed", "layer 0", "layer 1", "final"]
    assert pd.groups == list(GROUPS)
    cells = [v for row in pd.values for v in row if v is not None]
    assert len(cells) == 2 * 8 + 1 + 1  # 8 groups per layer, embed, final norm (tied head counted once)
    assert all(v == 0.0 for v in cells)
    assert pd.notes == ["lm_head.weight: tied to model.embed_tokens.weight, counted once"]
    cloned = _state(model)  # clones are separate tensors: the head gets its own cell
    assert _cell(param_diff(cloned, _state(model)), "final", "other") == 0.0


def test_param_diff_one_cell_changed_pinned(tiny_model_factory):
    a = _state(tiny_model_factory(num_layers=2))
    b = {k: v.clone() for k, v in a.items()}
    b["model.layers.1.self_attn.q_proj.weight"] *= 1.5  # ||0.5 W|| / ||W|| = 0.5 exactly
    pd = param_diff(a, b, 3, 4)
    assert (pd.from_iteration, pd.to_iteration) == (3, 4)
    nonzero = [(pd.layers[i], pd.groups[j]) for i, row in enumerate(pd.values) for j, v in enumerate(row) if v]
    assert nonzero == [("layer 1", "q")]
    name = "model.layers.1.self_attn.q_proj.weight"
    wa, wb = a[name].double(), b[name].double()
    assert _cell(pd, "layer 1", "q") == pytest.approx(float((wb - wa).norm() / wa.norm()), rel=1e-6)
    assert _cell(pd, "layer 1", "q") == pytest.approx(0.5, rel=1e-7)  # 1.5 W rounds to float32 per element
    assert pd.abs_change[2][0] == pytest.approx(float((wb - wa).norm()), rel=1e-6)


def test_param_diff_group_aggregates_by_size(tiny_model_factory):
    """Two norms of 32 ones in one cell; only one scaled by 1.1: sqrt(32 * 0.01) / sqrt(64) = 0.1 / sqrt(2)."""
    a = _state(tiny_model_factory(num_layers=2))
    b = {k: v.clone() for k, v in a.items()}
    b["model.layers.0.input_layernorm.weight"] *= 1.1
    pd = param_diff(a, b)
    assert _cell(pd, "layer 0", "norm") == pytest.approx(0.1 / math.sqrt(2), rel=1e-6)  # 1.1 rounds in fp32


def test_param_diff_float64_reference_bf16(tiny_model_factory):
    a = {k: v.to(torch.bfloat16) for k, v in _state(tiny_model_factory(num_layers=2)).items()}
    g = torch.Generator().manual_seed(1)
    b = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in a.items()}
    pd = param_diff(a, b)
    for name, cell in [("model.layers.0.mlp.up_proj.weight", ("layer 0", "up")),
                       ("model.embed_tokens.weight", ("embed", "other"))]:
        ref = (b[name].double() - a[name].double()).norm() / a[name].double().norm()
        assert _cell(pd, *cell) == pytest.approx(float(ref), rel=1e-5)  # float32 reduction
        assert 0 < _cell(pd, *cell) < 0.1


def test_param_diff_pruned_and_missing_are_none(tiny_model_factory):
    a = _state(tiny_model_factory(num_layers=2))
    b = {k: v.clone() for k, v in a.items()}
    b["model.layers.0.mlp.up_proj.weight"] = b["model.layers.0.mlp.up_proj.weight"][:48]  # pruned MLP units
    b["model.layers.1.adapter.weight"] = torch.ones(4)
    pd = param_diff(a, b)
    assert _cell(pd, "layer 0", "up") is None
    assert _cell(pd, "layer 1", "other") is None
    assert _cell(pd, "layer 0", "down") == 0.0
    assert any("(64, 32) -> (48, 32)" in n for n in pd.notes)
    assert any("adapter.weight: only in the current" in n for n in pd.notes)


def test_param_diff_dirs_matches_in_memory(tmp_path, tiny_model_factory):
    from safetensors.torch import save_file

    a = _state(tiny_model_factory(num_layers=2, seed=0))
    a.pop("lm_head.weight")  # save_pretrained drops the tied head too
    b = {k: v + 0.01 for k, v in a.items()}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    save_file(a, str(tmp_path / "a" / "model.safetensors"))
    save_file(b, str(tmp_path / "b" / "model.safetensors"))
    assert param_diff_dirs(tmp_path / "a", tmp_path / "b", 0, 1) == param_diff(a, b, 0, 1)
    with pytest.raises(InputError, match="no \\*.safetensors"):
        param_diff_dirs(tmp_path, tmp_path / "b")


# ------------------------------------------------------------------------------------------- ReportData

def test_report_data_round_trip():
    data = synthetic_report(n_iterations=3)
    data.iterations[0].metrics["nan_metric"] = float("nan")
    d = json.loads(json.dumps(data.to_dict(), allow_nan=False))  # strict JSON: NaN became null
    back = ReportData.from_dict(d)
    assert back.iterations[0].metrics.pop("nan_metric") is None
    data.iterations[0].metrics.pop("nan_metric")
    assert back == data
    assert back.to_dict() == data.to_dict()


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["run"].__setitem__("status", "done"), r"run\.status: got 'done'.*converged"),
    (lambda d: d["iterations"][1]["phases"][0].__setitem__("phase", "train"), r"iterations\[1\]\.phases\[0\]\.phase"),
    (lambda d: d["iterations"][0]["gates"][0].__setitem__("colour", "red"), r"gates\[0\]: unknown field.*colour"),
    (lambda d: d["param_diffs"][0]["values"].pop(), r"param_diffs\[0\]\.values: shape"),
    (lambda d: d["findings"][0]["evidence"]["heatmaps"][0]["z"][0].pop(), r"heatmaps\[0\]\.z: shape"),
    (lambda d: d["run"].pop("teacher"), r"report\.run: missing required field\(s\) \['teacher'\]"),
    (lambda d: d.__setitem__("format_version", 99), r"format_version: got 99"),
    (lambda d: d["iterations"][0].__setitem__("index", "<b>0</b>"), r"iterations\[0\]\.index: got '<b>0</b>'"),
    (lambda d: d["iterations"][2]["gates"][1].__setitem__("value", "1.0"), r"gates\[1\]\.value: got '1.0'"),
    (lambda d: d["decisions"][0].__setitem__("iteration", None), r"decisions\[0\]\.iteration"),
])
def test_report_data_errors_name_the_field(mutate, match):
    d = synthetic_report().to_dict()
    mutate(d)
    with pytest.raises(InputError, match=match):
        ReportData.from_dict(d)


# ------------------------------------------------------------------------------------------- converters

def test_gates_from_real_gate_report():
    from distillgate.gates import evaluate_gates, load_gate_spec

    report = evaluate_gates(load_gate_spec(), {"ppl_ratio": 1.05, "inheritance": 0.5}).to_json()
    rows, scores = gates_from_report(report)
    by_id = {g.id: g for g in rows}
    assert by_id["G-C1"].status == "pass" and by_id["G-C1"].margin == pytest.approx(0.03)
    assert by_id["G-C3"].status == "fail" and not by_id["G-C3"].passed
    assert scores["business"] is None  # every business gate needs production traffic: no score
    assert 0.0 < scores["capability"] < 1.0
    data = synthetic_report()
    data.iterations[-1].gates, data.iterations[-1].dimension_scores = rows, scores
    data.validate()


def test_finding_from_attribution_record():
    from distillgate.attribution import Finding as AFinding, SampleDivergence, divergence_heatmap, top_divergent

    samples = [SampleDivergence(f"s{i}", d, 0.1 * i, [0.1 * i] * 16, "txt") for i, d in
               enumerate(["legal", "medical", "legal"])]
    rec = AFinding("regression", "error", "kl", "kl got worse",
                   {"heatmap_domain_position": divergence_heatmap(samples), "layer_kl": [0.1, 0.2],
                    "top_samples": top_divergent(samples), "knob_blame": [{"knob": "train.lr"}]}).to_dict()
    f = finding_from_record(rec, iteration=2)
    assert (f.iteration, f.severity, f.metric) == (2, "error", "kl")
    assert [h.y for h in f.evidence.heatmaps] == [["legal", "medical"], ["all"]]
    assert f.evidence.heatmaps[0].x_label == "position" and len(f.evidence.heatmaps[0].x) == 8
    assert [s.example_id for s in f.evidence.top_samples] == ["s2", "s1", "s0"]
    assert f.evidence.details == {"knob_blame": [{"knob": "train.lr"}]}
    assert finding_from_record({**rec, "severity": "warn"}, 1).severity == "warning"


def test_nest_metrics():
    assert nest_metrics({"ppl": 14.0, "kl/legal": 0.2, "kl/medical": float("inf"), "kl": 0.3}) == {
        "ppl": 14.0, "kl": {"legal": 0.2, "medical": None, "all": 0.3}}


# ------------------------------------------------------------------------------------------- rendering

def _poisoned():
    data = synthetic_report(n_iterations=3)
    data.findings[0].message = f"regression {XSS} on legal"
    data.findings[0].evidence.heatmaps[0].y[0] = XSS  # a domain name inside a chart
    data.run.summary = XSS
    data.decisions[0].reason = f'"quoted" & {XSS}'
    data.iterations[0].metrics[XSS] = 1.0
    data.benchmark["lost_examples"]["grammar"][0]["doc_id"] = XSS     # an item id from a user's file
    data.benchmark["capabilities"].append(XSS)
    data.benchmark["diff"]["by_tag"][XSS] = dict(data.benchmark["diff"]["by_tag"]["grammar"])
    return data


def test_render_contains_every_section_and_escapes(tmp_path):
    data = _poisoned()
    out = render_report(data, tmp_path / "sub" / "report.html")
    html = out.read_text()
    for sid in ("overview", "pipeline", "gates", "metrics", "params", "benchmark", "findings", "decisions", "alerts",
                "config"):
        assert f'<section id="{sid}">' in html
    assert XSS not in html
    assert "regression &lt;script&gt;alert(1)&lt;/script&gt; on legal" in html
    assert "&quot;quoted&quot; &amp; &lt;script&gt;" in html
    # plotly.js inlined exactly once; every chart is a div + newPlot call; nothing is fetched from a network
    from plotly.offline import get_plotlyjs

    assert html.count(get_plotlyjs()) == 1
    page = html.replace(get_plotlyjs(), "")
    n_charts = page.count('class="plotly-graph-div"')
    # radar, dimension curves, timeline, metric curves, overview + 2 param maps, 2 finding maps
    assert n_charts == 9 == page.count("Plotly.newPlot(")
    assert not re.search(r"""(src|href)=["']?https?:""", page)
    titles = ["Iteration 0 → 1", "Iteration 1 → 2"]  # the W5 heat maps (titles live in the charts' JSON)
    assert all(t in page or json.dumps(t)[1:-1] in page for t in titles)
    assert not list(tmp_path.glob("sub/.*.tmp"))  # atomic write left no temp file


def test_benchmark_section_shows_scores_capabilities_and_lost_items(tmp_path):
    import html as html_mod

    data = synthetic_report(n_iterations=3)
    page = render_report(data, tmp_path / "r.html").read_text()
    sec = page.split('<section id="benchmark">', 1)[1].split("</section>", 1)[0]
    assert "Suite <code>quick</code>" in sec and "loses <b>8</b> of 90 items" in sec
    # scores side by side: teacher, student (with its interval), student - teacher
    assert "<td>ppl_token ↓</td>" in sec
    assert re.search(r"<code>copa</code></td><td>acc ↑</td><td class=\"num\">0\.75</td><td class=\"num\">0\.65 "
                     r"<span class=\"muted\">\[0\.5, 0\.8\]</span></td><td class=\"num\">-0\.1</td>", sec)
    # one row per capability (not per sub-tag), flagged when it lost more than it gained
    rows = re.findall(r"<tr( class=\"g-fail\")?><td><code>([^<]+)</code></td><td class=\"num\">(\d+)</td>", sec)
    assert [(r[1], r[2], bool(r[0])) for r in rows] == [("causal_reasoning", "40", True), ("grammar", "50", True)]
    assert "question:cause</code></td><td class" not in sec
    assert len(re.findall(r'<td><code title="copa-\d">copa-\d</code></td>', sec)) == 3 and "agr.jsonl:7" in sec
    assert html_mod.escape("[-9.8, -8.2]") in sec
    empty = ReportData.from_dict({"run": {"id": "r0", "teacher": "t", "student": "s", "created": "now",
                                          "status": "running"}})
    assert "No benchmark in this run" in render_report(empty, tmp_path / "e.html").read_text()


def test_render_empty_run(tmp_path):
    data = ReportData.from_dict({"run": {"id": "r0", "teacher": "t", "student": "s", "created": "now",
                                         "status": "running"}})
    html = render_report(data, tmp_path / "r.html").read_text()
    assert "No iterations yet." in html and "No gate results yet." in html
    assert html.count('class="plotly-graph-div"') == 0


# ------------------------------------------------------------------------------------------- from the store

def _fill_store(root, tiny_model_factory, stored_diff=None):
    from distillgate.store import RunStore

    cfg = {"teacher": {"path": "default"}, "student": {"init": "derive", "num_layers": 2}}
    base = _state(tiny_model_factory(num_layers=2))
    base.pop("lm_head.weight")
    with RunStore.create(root, cfg, run_id="r1") as store:
        for k in range(2):
            store.begin_iteration(k)
            for p, s in zip(("extract", "map", "validate", "attribute", "compensate"), (1.0, 5.0, 2.0, 0.5, 0.1)):
                store.record_phase(k, p, s)
            weights = {n: (t * 1.5 if k and n.endswith("layers.0.mlp.up_proj.weight") else t) for n, t in base.items()}
            with store.begin_version(k, meta={"stage": "S2" if k == 0 else "S3"}) as vw:
                vw.add_tensors("student/model.safetensors", weights)
                if k and stored_diff is not None:
                    vw.add_json("param_diff.json", stored_diff)
                vid = vw.commit()
            store.record_phase(k, "commit", 0.2)
            store.record_metrics(vid, {"ppl": 20.0 - k, "kl/legal": 0.5 - 0.1 * k})
            store.record_metrics(vid, {"ppl": 12.0}, split="teacher")
            store.record_gates(vid, [{"gate": "G-C1", "passed": bool(k), "value": 1.2 - 0.15 * k, "threshold": 1.08,
                                      "dimension": "capability", "detail": {"metric": "ppl_ratio", "comparator": "<="}}])
            store.record_findings(k, [{"kind": "weak_domain", "subject": "kl/legal", "severity": "warning",
                                       "message": f"legal is weak {XSS}", "data": {"kl": 0.5}}], vid)
            store.record_decisions(k, [{"knob": "loss.temperature", "old": 2.0, "new": 1.5, "reason": "sharper"}])
            store.finish_iteration(k)
        store.record_alert("error", "capability", "under threshold", vid)


def test_load_report_data_from_store(tmp_path, tiny_model_factory):
    from distillgate.report.from_store import load_report_data

    _fill_store(tmp_path, tiny_model_factory)
    data = load_report_data(tmp_path, "r1")
    assert data.run.teacher == "default" and data.run.status == "running"
    assert [it.stage for it in data.iterations] == ["S2", "S3"]
    assert [p.phase for p in data.iterations[0].phases] == list(("extract", "map", "validate", "attribute",
                                                                 "compensate", "commit"))
    assert data.iterations[0].phases[1].status == "done" and data.iterations[0].phases[1].seconds == 5.0
    assert data.iterations[1].metrics == {"ppl": 19.0, "kl": {"legal": pytest.approx(0.4)}}
    assert data.baseline_metrics == {"ppl": 12.0}
    g = data.iterations[0].gates[0]
    assert (g.id, g.metric, g.comparator, g.status, g.passed) == ("G-C1", "ppl_ratio", "<=", "fail", False)
    assert [it.dimension_scores for it in data.iterations] == [{"capability": 0.0}, {"capability": 1.0}]
    (pd,) = data.param_diffs
    assert (pd.from_iteration, pd.to_iteration) == (0, 1)
    nonzero = [(pd.layers[i], pd.groups[j], v) for i, r in enumerate(pd.values) for j, v in enumerate(r) if v]
    assert nonzero == [("layer 0", "up", pytest.approx(0.5))]
    assert len(data.findings) == 2 and data.findings[0].metric == "kl/legal"
    assert data.alerts[0].severity == "error" and data.alerts[0].iteration == 1
    assert len(data.decisions) == 2


def test_load_report_data_uses_stored_param_diff(tmp_path, tiny_model_factory):
    from distillgate.report.data import ParamDiff
    from distillgate.report.from_store import load_report_data

    stored = ParamDiff(0, 1, ["layer 0"], ["q"], [[0.25]], [[1.0]], ["computed by the loop"])
    _fill_store(tmp_path, tiny_model_factory, stored_diff=dataclasses.asdict(stored))
    assert load_report_data(tmp_path, "r1").param_diffs == [stored]
    assert load_report_data(tmp_path, "r1", param_diffs=False).param_diffs == []


def test_report_cli_from_store_and_json(tmp_path, tiny_model_factory, capsys):
    from distillgate.cli import main

    _fill_store(tmp_path / "runs", tiny_model_factory)
    saved = tmp_path / "data.json"
    assert main(["report", "r1", "--root", str(tmp_path / "runs"), "--save-json", str(saved)]) == 0
    html = (tmp_path / "runs" / "r1" / "report.html").read_text()
    assert "legal is weak &lt;script&gt;" in html and XSS not in html
    assert main(["report", "--from-json", str(saved), "--out", str(tmp_path / "x.html")]) == 0
    assert (tmp_path / "x.html").stat().st_size > 1_000_000
    assert main(["report"]) == 2
    assert "exactly one: a run id, or --from-json FILE" in capsys.readouterr().err.replace("\n", " ")
    assert main(["report", "nope", "--root", str(tmp_path / "runs")]) == 2


def test_render_caps_per_transition_maps(tmp_path):
    from plotly.offline import get_plotlyjs

    data = synthetic_report(n_iterations=9)
    page = render_report(data, tmp_path / "r.html").read_text().replace(get_plotlyjs(), "")
    assert len(data.param_diffs) == 8
    assert "2 earlier transition(s) appear in the overview only." in page
    assert json.dumps("Iteration 1 → 2")[1:-1] not in page and json.dumps("Iteration 8 → 9")[1:-1] not in page
    assert json.dumps("Iteration 7 → 8")[1:-1] in page and json.dumps("Iteration 2 → 3")[1:-1] in page


def test_metric_curves_put_benchmark_families_after_the_loops_metrics():
    from distillgate.report import charts
    from distillgate.report.data import Iteration

    its = [Iteration(index=k, stage="S2", metrics={**{f"bench_t{i}": {"acc": 0.5} for i in range(14)},
                                                     "kl": 0.3 - 0.1 * k, "top1_agreement": 0.5})
           for k in range(2)]
    fig, left_out = charts.metric_curves(its, {})
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:2] == ["kl", "top1_agreement"] and len(titles) == charts.MAX_CURVES
    assert left_out == [f"bench_t{i}" for i in range(10, 14)]
