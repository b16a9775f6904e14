"""Scorecard, metric registry, suite files and the `distillgate eval` command on a tiny model."""

import json

import pytest

from distillgate.errors import ConfigError, InputError
from distillgate.evaluate.metrics import Scorecard, metric_info, register_metric
from distillgate.evaluate.suite import load_suite, run_suite
from distillgate.testing import TINY_CORPUS

COPA_XML = """<?xml version="1.0"?><copa-corpus version="1.0">
<item id="1" asks-for="cause" most-plausible-alternative="1"><p>The man got a refund.</p>
<a1>His order arrived damaged.</a1><a2>The flight departs at 9:40.</a2></item>
<item id="2" asks-for="effect" most-plausible-alternative="2"><p>The student read chapter three.</p>
<a1>The dog barked.</a1><a2>She passed the exam on Monday.</a2></item>
<item id="3" asks-for="effect" most-plausible-alternative="1"><p>It rained all day.</p>
<a1>The mat got wet.</a1><a2>The laptop has 16 GB of memory.</a2></item>
</copa-corpus>"""


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))     # teacher cache stays in the test folder
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "valid.txt").write_text("\n".join(TINY_CORPUS[:10]))
    (tmp_path / "blimp").mkdir()
    (tmp_path / "blimp" / "agr.jsonl").write_text(
        json.dumps({"sentence_good": "The cat sat on the mat.", "sentence_bad": "The cat sit on the mat.",
                    "UID": "agr"}) + "\n"
        + json.dumps({"sentence_good": "It rained all day.", "sentence_bad": "It rain all day.", "UID": "agr"}) + "\n")
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "copa-dev.xml").write_text(COPA_XML)
    return tmp_path


def test_registry_metadata_and_unknown_metric():
    assert metric_info("wikitext/ppl_token").higher_is_better is False
    assert metric_info("copa/acc").capability_tier == "high"
    assert metric_info("blimp/accuracy").capability_tier == "mid"
    with pytest.raises(ConfigError, match="metric"):
        metric_info("copa/bleurt")
    with pytest.raises(ConfigError, match="capability_tier"):
        register_metric("x", True, "top")


def test_scorecard_round_trip(tmp_path):
    card = Scorecard(model="m", suite="s")
    card.add("copa", "acc", 0.75, n=40, stderr=0.07, domain="commonsense")
    card.add("wikitext", "ppl_token", 14.2, n=1023)
    path = tmp_path / "card.json"
    card.save(path)
    back = Scorecard.load(path)
    assert back == card
    assert back.metrics["copa/acc"] == {"value": 0.75, "higher_is_better": True, "n": 40, "stderr": 0.07,
                                        "task": "copa", "capability_tier": "high", "domain": "commonsense"}
    assert set(back.by_tier("lm")) == {"wikitext/ppl_token"}
    card.add("wikitext", "ppl_word", float("nan"), n=1)
    with pytest.raises(InputError, match="non-finite"):
        card.save(tmp_path / "bad.json")


def test_suite_yaml_validation(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("tasks:\n  - {type: choice, name: c, loader: xml, file: a.xml}\n")
    with pytest.raises(ConfigError, match="loader"):
        load_suite(f)
    with pytest.raises(ConfigError, match="--suite"):
        load_suite("nope")
    assert [t.name for t in load_suite("quick").tasks] == ["wikitext", "blimp", "copa", "teacher_kl"]


def test_run_quick_suite_on_tiny_models(data_dir, tiny_model_factory, tiny_tokenizer):
    student, teacher = tiny_model_factory(seed=1), tiny_model_factory(num_layers=4, seed=0)
    card = run_suite(student, tiny_tokenizer, "quick", teacher=teacher, data_dir=data_dir, model_name="s")
    m = card.metrics
    assert set(m) == {"wikitext/ppl_token", "wikitext/ppl_word", "blimp/accuracy", "copa/acc", "copa/acc_norm",
                      "teacher_kl/kl_forward_mean", "teacher_kl/kl_reverse_mean", "teacher_kl/top1_agreement"}
    assert m["wikitext/ppl_token"]["value"] > 1 and m["wikitext/ppl_token"]["higher_is_better"] is False
    assert m["copa/acc"]["n"] == 3 and m["blimp/accuracy"]["n"] == 2
    assert m["teacher_kl/kl_forward_mean"]["value"] > 0
    assert card.details["blimp"]["per_paradigm_n"] == {"agr": 2}
    assert len(list((data_dir / "home" / "eval_cache").glob("teacher-*"))) == 1
    json.dumps(card.to_dict())
    no_teacher = run_suite(student, tiny_tokenizer, "quick", data_dir=data_dir, limit=2)
    assert "teacher_kl/top1_agreement" not in no_teacher.metrics and no_teacher.metrics["copa/acc"]["n"] == 2


def test_suite_needs_data_dir(tiny_model_factory, tiny_tokenizer, monkeypatch, tmp_path):
    monkeypatch.delenv("DISTILLGATE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)                  # relative paths resolve against the current folder then
    with pytest.raises(InputError, match="4 of 4 task") as e:
        run_suite(tiny_model_factory(), tiny_tokenizer, "quick")
    assert "--data-dir" in str(e.value) and "'blimp'" in str(e.value) and "'teacher_kl'" in str(e.value)


def test_eval_command(data_dir, tiny_student_dir, tiny_teacher_dir, tmp_path, capsys):
    from distillgate.cli import main

    out = tmp_path / "card.json"
    rc = main(["eval", "--model", str(tiny_student_dir), "--teacher", str(tiny_teacher_dir), "--suite", "quick",
               "--data-dir", str(data_dir), "--limit", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "copa/acc" in printed and "delta" in printed
    card = Scorecard.load(out)
    assert card.metrics["copa/acc"]["n"] == 2
    assert json.loads(out.read_text())["teacher"]["metrics"]["copa/acc"]["n"] == 2
    assert main(["eval", "--model", str(tiny_student_dir), "--suite", "nope"]) == 2


def test_eval_command_per_item_diff_partial_and_store(data_dir, tiny_student_dir, tiny_teacher_dir, tmp_path, capsys):
    from distillgate.cli import main
    from distillgate.store import RunStore

    RunStore.create(tmp_path / "runs", {"purpose": "test"}, run_id="r1").close()
    out = tmp_path / "card.json"
    rc = main(["eval", "--model", str(tiny_student_dir), "--teacher", str(tiny_teacher_dir), "--suite",
               "copa:copa/copa-dev.xml", "--data-dir", str(data_dir), "--json", str(out),
               "--store", str(tmp_path / "runs"), "--run", "r1", "--label", "copa"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "items the teacher gets right and the student wrong, by task" in printed and "by capability tag" in printed
    res = json.loads(out.read_text())
    s_items, t_items = res["details"]["copa"]["items"], res["teacher"]["details"]["copa"]["items"]
    assert len(s_items) == len(t_items) == 3 and res["partial"] is False
    lost = [s["doc_id"] for s, t in zip(s_items, t_items) if t["correct"] and not s["correct"]]
    assert res["diff"]["by_task"]["copa"]["lost_items"] == lost
    assert res["diff"]["by_tag"]["causal_reasoning"]["n"] == 3
    stored = tmp_path / "runs" / "r1" / "work" / "eval" / "copa.json"
    assert json.loads(stored.read_text())["diff"] == res["diff"]

    tjson, sjson = tmp_path / "teacher.json", tmp_path / "student.json"      # the teacher's card as the baseline
    assert main(["eval", "--model", str(tiny_teacher_dir), "--suite", "copa:copa/copa-dev.xml", "--data-dir",
                 str(data_dir), "--json", str(tjson)]) == 0
    assert main(["eval", "--model", str(tiny_student_dir), "--baseline", str(tjson), "--suite", "copa:copa/copa-dev.xml",
                 "--data-dir", str(data_dir), "--json", str(sjson)]) == 0
    assert json.loads(sjson.read_text())["diff"] == res["diff"]
    assert main(["eval", "--model", str(tiny_student_dir), "--baseline", str(tjson), "--suite", "quick",
                 "--data-dir", str(data_dir)]) == 2                          # a baseline of another suite

    (data_dir / "one.txt").write_text("a")                 # checks pass; perplexity fails at run time
    suite = tmp_path / "s.yaml"
    suite.write_text("tasks:\n  - {type: perplexity, name: ppl, file: one.txt}\n  - copa:copa/copa-dev.xml\n")
    rc = main(["eval", "--model", str(tiny_student_dir), "--suite", str(suite), "--data-dir", str(data_dir),
               "--json", str(out)])
    assert rc == 1
    res = json.loads(out.read_text())
    assert res["partial"] is True and "ppl" in res["errors"] and res["metrics"]["copa/acc"]["n"] == 3
