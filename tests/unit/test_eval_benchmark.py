"""The benchmark profile in the loop (S1.1, S1.3, L2): the registry provider, the teacher's cached profile, the
per-item diff file, capability findings and the anchor's options (tiny models, fixture data written here)."""

import json

import pytest

from distillgate.errors import ConfigError
from distillgate.evaluate import benchmark as bench
from distillgate.evaluate import suite as suite_mod
from distillgate.evaluate.diff import item_diff
from distillgate.evaluate.providers import METRICS, GateContext, load_providers, measure

# Invented COPA-format items (the benchmark's published XML layout; not benchmark data).
ITEMS = [("The man got a refund.", "His order arrived damaged.", "The flight departs at 9:40.", 1, "cause"),
         ("The student read chapter three.", "The dog barked.", "She passed the exam on Monday.", 2, "effect"),
         ("It rained all day.", "The mat got wet.", "The laptop has 16 GB of memory.", 1, "effect"),
         ("The glass fell off the table.", "It shattered.", "It sang a song.", 1, "effect"),
         ("The lights went out.", "A storm hit the town.", "She bought new shoes.", 1, "cause"),
         ("He was thirsty.", "He drank some water.", "He painted the fence.", 1, "effect"),
         ("The road was icy.", "The cars slid.", "The birds sang.", 1, "effect"),
         ("The baby cried.", "It was hungry.", "The moon was full.", 1, "cause")]
PAIRS = [("The cats sleep.", "The cats sleeps."), ("She has eaten.", "She has ate."),
         ("Who did you see?", "Who did you see him?"), ("The dogs bark.", "The dogs barks."),
         ("He runs fast.", "He run fast."), ("They were here.", "They was here.")]


def write_data(root):
    items = "".join(f'<item id="{i}" asks-for="{a}" most-plausible-alternative="{g}"><p>{p}</p><a1>{x}</a1>'
                    f'<a2>{y}</a2></item>\n' for i, (p, x, y, g, a) in enumerate(ITEMS, 1))
    (root / "copa.xml").write_text(f'<?xml version="1.0"?><copa-corpus version="1.0">\n{items}</copa-corpus>')
    (root / "agr.jsonl").write_text("".join(json.dumps({"sentence_good": g, "sentence_bad": b, "UID": "agr"}) + "\n"
                                            for g, b in PAIRS))
    (root / "suite.yaml").write_text("tasks:\n  - copa:copa.xml\n  - blimp:agr.jsonl\n")
    return root / "suite.yaml"


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))
    (tmp_path / "data").mkdir()
    return write_data(tmp_path / "data")


def _ctx(teacher_dir, student_dir, suite, out, **kw):
    o = {"suite": str(suite), "data_dir": str(suite.parent), "limit": None, "batch_size": 4, "max_items": 50,
         "out": str(out), **kw}
    return GateContext(student_spec=str(student_dir), teacher_spec=str(teacher_dir), options={"benchmark": o})


def test_provider_diffs_the_student_against_the_cached_teacher_profile(tiny_teacher_dir, tiny_student_dir, data,
                                                                       tmp_path, monkeypatch):
    load_providers()
    calls = []
    real = suite_mod.run_suite
    monkeypatch.setattr(suite_mod, "run_suite", lambda *a, **k: calls.append(k.get("model_name")) or real(*a, **k))
    ctx = _ctx(tiny_teacher_dir, tiny_student_dir, data, tmp_path / "b1.json")
    values, notes = measure(ctx, [bench.PRIMARY])
    assert not notes and calls == [str(tiny_teacher_dir), "student"]

    # the same numbers, computed directly
    t, s = ctx.teacher(), ctx.student()
    tcard = real(t.model, t.tokenizer, data, data_dir=data.parent)
    scard = real(s.model, s.tokenizer, data, data_dir=data.parent)
    diff = item_diff(scard, tcard, max_items=None)
    assert diff["n"] == len(ITEMS) + len(PAIRS)
    assert diff["lost"] > 0        # the 2-layer student loses COPA items the 4-layer teacher gets right
    assert values[bench.PRIMARY] == pytest.approx(diff["lost"] / diff["n"])
    assert values["bench_copa/acc"] == pytest.approx(scard.value("copa/acc"))
    assert values["bench_blimp/accuracy"] == pytest.approx(scard.value("blimp/accuracy"))
    assert values["bench_copa/acc/ci_low"] < values["bench_copa/acc"] < values["bench_copa/acc/ci_high"]
    p, n = values[bench.PRIMARY], diff["n"]
    assert values[f"{bench.PRIMARY}/ci_high"] == pytest.approx(p + 1.96 * (p * (1 - p) / n) ** 0.5)
    assert values["bench_lost/causal_reasoning"] == diff["by_tag"]["causal_reasoning"]["lost"]
    # registered with the scorecard's direction, so attribution treats a drop as a regression
    assert METRICS["bench_copa/acc"].higher_is_better and METRICS["bench_copa/acc"].regression
    assert METRICS[bench.PRIMARY].higher_is_better is False

    doc = json.loads((tmp_path / "b1.json").read_text())
    assert doc["diff"]["by_task"] == item_diff(scard, tcard, max_items=50)["by_task"]
    assert doc["teacher_metrics"]["bench_copa/acc"] == pytest.approx(tcard.value("copa/acc"))
    assert doc["higher_is_better"] == {"bench_copa/acc": True, "bench_copa/acc_norm": True,
                                       "bench_blimp/accuracy": True}
    assert doc["lost_examples"] and doc["regressed"][0]["tag"] == "causal_reasoning"
    for cap, examples in doc["lost_examples"].items():
        for e in examples:
            assert e["doc_id"] in doc["diff"]["by_tag"][cap]["lost_items"]
            assert e["teacher_pred"] == e["gold"] != e["student_pred"]

    # a new measurement (a later run, a resume) reads the teacher's profile from the cache
    calls.clear()
    measure(_ctx(tiny_teacher_dir, tiny_student_dir, data, tmp_path / "b2.json"), [bench.PRIMARY])
    assert calls == ["student"]
    # ... but not for other items
    calls.clear()
    measure(_ctx(tiny_teacher_dir, tiny_student_dir, data, tmp_path / "b3.json", limit=3), [bench.PRIMARY])
    assert calls == [str(tiny_teacher_dir), "student"]


def test_not_configured_is_a_note_not_a_value(tiny_teacher_dir, tiny_student_dir):
    load_providers()
    ctx = GateContext(student_spec=str(tiny_student_dir), teacher_spec=str(tiny_teacher_dir))
    values, notes = measure(ctx, [bench.PRIMARY])
    assert values[bench.PRIMARY] is None and "anchor option `benchmark`" in notes[bench.PRIMARY]


def _doc(lost_copa, lost_sub=2):
    row = lambda lost: {"n": 10, "teacher_correct": 8, "student_correct": 8 - lost, "lost": lost, "gained": 0,  # noqa: E731
                        "lost_items": [f"copa-{i}" for i in range(lost)], "gained_items": []}
    return {"suite": "s", "capabilities": ["causal_reasoning"],
            "diff": {"by_task": {"copa": row(lost_copa)}},
            "regressed": [{"tag": "causal_reasoning", "lost": lost_copa, "gained": 0, "n": 10, "teacher_acc": 0.8,
                           "student_acc": (8 - lost_copa) / 10, "lost_items": [f"copa-{i}" for i in range(lost_copa)]},
                          {"tag": "asks:cause", "lost": lost_sub, "gained": 0, "n": 5, "teacher_acc": 0.8,
                           "student_acc": 0.4, "lost_items": []}],
            "lost_examples": {"causal_reasoning": [{"task": "copa", "doc_id": "copa-0"}]},
            "student": {"details": {"copa": {"capability": "causal_reasoning"}}}}


def test_capability_findings_name_the_capability_with_items_and_escalate_when_worse():
    f, = bench.capability_findings(_doc(3), 2)           # the sub-tag is not a capability of its own
    assert (f.kind, f.severity, f.subject, f.iteration) == ("capability_gap", "warning", "bench_lost/causal_reasoning", 2)
    assert "3 of 10" in f.message and f.evidence["lost_items"] == ["copa-0", "copa-1", "copa-2"]
    assert f.evidence["tasks"]["copa"]["lost"] == 3 and f.evidence["examples"][0]["doc_id"] == "copa-0"
    worse, = bench.capability_findings(_doc(4), 4, {"iteration": 2, "lost": {"causal_reasoning": 3}})
    assert worse.severity == "error" and "3 at iteration 2" in worse.message
    better, = bench.capability_findings(_doc(2), 4, {"iteration": 2, "lost": {"causal_reasoning": 3}})
    assert better.severity == "warning"
    assert bench.capability_findings(_doc(0), 1) == []


def test_anchor_options_are_checked_at_preflight(data, tmp_path):
    from distillgate.config import StageSpec
    from distillgate.stages import validate_options

    def check(**opts):
        return validate_options([StageSpec(name="anchor", iterations=0, options=opts),
                                 StageSpec(name="joint", iterations=1)])

    opts, _ = check(benchmark=str(data), benchmark_data_dir=str(data.parent))
    assert opts.benchmark == str(data) and opts.benchmark_every == 1 and opts.benchmark_limit == 20
    assert check()[0].benchmark is None                           # off by default
    with pytest.raises(ConfigError, match=r"loop\.stages\[0\]\.options\.benchmark.*nope") as e:
        check(benchmark="nope:x")
    assert "hellaswag" in str(e.value)                            # says which formats are allowed
    with pytest.raises(ConfigError, match=r"options\.benchmark.*missing\.xml"):
        check(benchmark="copa:missing.xml", benchmark_data_dir=str(data.parent))
    with pytest.raises(ConfigError, match=r"options\.benchmark_every"):
        check(benchmark=str(data), benchmark_every=0)
    with pytest.raises(ConfigError, match=r"options\.benchmark_suite.*unknown option"):
        check(benchmark_suite="quick")


def test_a_run_measures_the_benchmark_every_n_iterations_and_reports_the_diff(tiny_teacher_dir, data, tmp_path):
    """anchor option benchmark in a real loop: iterations 0 and 2 of 0..2 (every 2), whichever stage owns them."""
    from distillgate import loop as loop_mod
    from distillgate.config import RunConfig, load_config
    from distillgate.report.from_store import load_report_data, render_run_report
    from distillgate.store import RunStore

    anchor = (f'{{name: anchor, iterations: 0, options: {{benchmark: "{data}", benchmark_data_dir: "{data.parent}", '
              f'benchmark_every: 2, benchmark_limit: 6}}}}')
    over = [f"teacher.path={tiny_teacher_dir}", "student.init=config",
            "student.config={num_hidden_layers: 1, intermediate_size: 32}", "data.max_new_tokens=12",
            "data.gen_batch_size=8", "train.steps=2", "train.batch_size=2", "train.warmup_steps=0",
            "train.precision=fp32", "targets.top_k=8", "loop.prompts_per_iteration=8", "loop.heldout_prompts=4",
            f"loop.stages=[{anchor}, {{name: joint, iterations: 2}}]", "loop.perf_lengths=[16]",
            "loop.perf_repeats=1", f"store_root={tmp_path / 'runs'}"]
    summary = loop_mod.run(load_config(RunConfig, None, over), progress=False)
    with RunStore.open(tmp_path / "runs", summary["run_id"]) as s:
        versions = {r["iteration"]: s.get_version(r["version_id"]) for r in s.versions()}
        assert ["benchmark.json" in versions[k].files for k in (0, 1, 2)] == [True, False, True]
        docs = {k: versions[k].load_json("benchmark.json") for k in (0, 2)}
        for k, doc in docs.items():
            assert doc["n"] == 6 + 6 and set(doc["diff"]["by_task"]) == {"copa", "blimp"}
            m = s.catalog.metrics(versions[k].version_id, "val")
            assert m["bench_lost_share"] == pytest.approx(doc["lost"] / doc["n"])
            assert m["bench_copa/acc"] == pytest.approx(doc["student_metrics"]["bench_copa/acc"])
        assert "bench_lost_share" not in s.catalog.metrics(versions[1].version_id, "val")
        # one teacher profile for the run: the same teacher numbers at both benchmark iterations
        assert docs[0]["teacher_metrics"] == docs[2]["teacher_metrics"]
        gaps = [f for f in s.catalog.findings() if f["kind"] == "capability_gap"]
        expect = {(k, r["tag"]) for k, d in docs.items() for r in d["regressed"] if r["tag"] in d["capabilities"]}
        assert expect and {(f["iteration"], f["subject"].split("/", 1)[1]) for f in gaps} == expect
        state = versions[2].load_json("loop_state.json")
        assert state["stages"]["anchor"]["data"]["benchmark_last"]["iteration"] == 2
    data_ = load_report_data(tmp_path / "runs", summary["run_id"], param_diffs=False)
    assert data_.benchmark["iteration"] == 2 and "student" not in data_.benchmark
    assert data_.baseline_metrics["bench_copa"]["acc"] == pytest.approx(docs[0]["teacher_metrics"]["bench_copa/acc"])
    page = render_run_report(tmp_path / "runs", summary["run_id"], param_diffs=False).read_text()
    assert 'id="benchmark"' in page and "By capability" in page and "causal_reasoning" in page
