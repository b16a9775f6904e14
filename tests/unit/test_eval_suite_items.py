"""Suites a new user writes: one-line FORMAT:FILE suites, data checked before any model, partial results kept,
one path rule, user lm-eval YAML (+ include path), stock names offline, per-item results and the diff."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from distillgate.errors import ConfigError, InputError
from distillgate.evaluate.diff import item_diff, regressed_capabilities
from distillgate.evaluate.metrics import Scorecard
from distillgate.evaluate.suite import ChoiceTask, LmEvalTask, load_suite, prepare_suite, run_suite

FILES = Path(__file__).resolve().parents[1] / "data" / "formats"
COPA_XML = """<?xml version="1.0"?><copa-corpus version="1.0">
<item id="1" asks-for="cause" most-plausible-alternative="1"><p>The man got a refund.</p>
<a1>His order arrived damaged.</a1><a2>The flight departs at 9:40.</a2></item>
<item id="2" asks-for="effect" most-plausible-alternative="2"><p>The student read chapter three.</p>
<a1>The dog barked.</a1><a2>She passed the exam on Monday.</a2></item>
</copa-corpus>"""


class NoModel:
    """Fails the test if anything touches the model: data must be checked first."""

    def __getattr__(self, name):
        raise AssertionError(f"model.{name} used before the data was checked")


@pytest.fixture
def data(tmp_path):
    (tmp_path / "copa.xml").write_text(COPA_XML)
    shutil.copy(FILES / "hellaswag.jsonl", tmp_path / "hs.jsonl")
    return tmp_path


def test_one_line_suites():
    assert isinstance(load_suite("copa:x.xml").tasks[0], ChoiceTask)
    assert load_suite("mmlu:marketing").tasks[0].subject == "marketing"
    assert load_suite("truthfulqa_mc2:mc_task.json").tasks[0].loader == "truthfulqa_mc2"
    assert load_suite("blimp:blimp/*.jsonl").tasks[0].type == "minimal_pairs"
    assert load_suite("lambada:l.jsonl").tasks[0].type == "loglikelihood"
    assert load_suite("wikitext:valid.txt").tasks[0].type == "perplexity"
    t = load_suite("drop:d.jsonl").tasks[0]
    assert isinstance(t, LmEvalTask) and t.task == "drop:d.jsonl"
    assert load_suite("lm_eval:my/task.yaml").tasks[0].task == "my/task.yaml"
    assert load_suite("mc:mine.jsonl").tasks[0].loader == "jsonl"
    with pytest.raises(ConfigError, match="hellaswag"):       # the error lists the formats
        load_suite("nope:x")


def test_suite_file_errors_blame_the_suite_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("- {type: choice, name: c, loader: copa, file: a.xml}\n")
    with pytest.raises(ConfigError, match=r"--suite.*mapping") as e:
        load_suite(f)
    assert "--config" not in str(e.value)
    f.write_text("tasks:\n  - {type: choice, name: c, loader: xml, file: a.xml}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: tasks\.0.*loader.*hellaswag"):
        load_suite(f)
    f.write_text("tasks:\n  - copa:a.xml\n  - {type: choice, name: hs, loader: hellaswag, file: h.jsonl}\n")
    assert [t.name for t in load_suite(f).tasks] == ["copa", "hs"]


def test_every_task_checked_before_any_model(data, tiny_tokenizer):
    lines = (FILES / "hellaswag.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["label"] = 7
    (data / "hs.jsonl").write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    (data / "wino.jsonl").write_text(json.dumps({"sentence": "no blank here", "option1": "a", "option2": "b",
                                                 "answer": "1"}) + "\n")
    suite = {"name": "s", "tasks": [
        {"type": "choice", "name": "copa", "loader": "copa", "file": "copa.xml"},
        {"type": "choice", "name": "hs", "loader": "hellaswag", "file": "hs.jsonl"},
        {"type": "choice", "name": "wg", "loader": "winogrande", "file": "wino.jsonl"},
        {"type": "choice", "name": "gone", "loader": "piqa", "file": "missing.jsonl"}]}
    (data / "s.yaml").write_text(yaml.safe_dump(suite))
    with pytest.raises(InputError) as e:
        run_suite(NoModel(), tiny_tokenizer, data / "s.yaml", data_dir=data)
    msg = str(e.value)
    assert "3 of 4 task(s)" in msg
    assert f"{data / 'hs.jsonl'}:2: field 'label'" in msg and "allowed: an index 0..3" in msg
    assert f"{data / 'wino.jsonl'}:1: 'sentence' has 0 '_'" in msg and "'wg'" in msg
    assert "missing.jsonl" in msg and "'gone'" in msg


def test_a_failing_task_keeps_the_others_and_marks_partial(data, tiny_model_factory, tiny_tokenizer):
    (data / "one.txt").write_text("a")                  # valid text, but one token: perplexity fails at run time
    suite = {"name": "s", "tasks": [{"type": "perplexity", "name": "ppl", "file": "one.txt"},
                                    {"type": "choice", "name": "copa", "loader": "copa", "file": "copa.xml"}]}
    card = run_suite(tiny_model_factory(), tiny_tokenizer, load_suite_dict(suite), data_dir=data)
    assert card.partial and "needs >= 2 tokens" in card.errors["ppl"]
    assert card.metrics["copa/acc"]["n"] == 2
    back = Scorecard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert back.partial and back.errors == card.errors


def load_suite_dict(d):
    from distillgate.config import parse_config
    from distillgate.evaluate.suite import SuiteSpec

    return parse_config(SuiteSpec, d)


def test_one_path_rule_for_every_task_type(data, monkeypatch, tiny_tokenizer):
    monkeypatch.delenv("DISTILLGATE_DATA", raising=False)
    for line in ("copa:copa.xml", "hellaswag:hs.jsonl"):
        for spec in (line, {"name": "s", "tasks": [{"type": "lm_eval", "name": "x", "task": line}]}):
            s = load_suite(spec) if isinstance(spec, str) else load_suite_dict(spec)
            assert prepare_suite(s, data_dir=data)                    # relative to --data-dir
            monkeypatch.chdir(data)
            assert prepare_suite(s)                                   # no data dir: relative to the current folder
            monkeypatch.chdir(data.parent)
            with pytest.raises(InputError, match="--data-dir"):
                prepare_suite(s)


def test_per_item_results_and_the_teacher_diff(data, tiny_model_factory, tiny_tokenizer):
    suite = load_suite_dict({"name": "s", "tasks": [
        {"type": "choice", "name": "copa", "loader": "copa", "file": "copa.xml"},
        {"type": "choice", "name": "hs", "loader": "hellaswag", "file": "hs.jsonl", "capability": "commonsense"}]})
    prepared = prepare_suite(suite, data_dir=data)
    s = run_suite(tiny_model_factory(seed=1), tiny_tokenizer, prepared, data_dir=data)
    t = run_suite(tiny_model_factory(num_layers=4, seed=0), tiny_tokenizer, prepared, data_dir=data)
    items = s.details["copa"]["items"]
    assert [i["doc_id"] for i in items] == ["copa-1", "copa-2"] and s.details["copa"]["capability"] == "causal_reasoning"
    assert items[0]["tags"][0] == "causal_reasoning" and "question:cause" in items[0]["tags"]
    assert all(len(i["loglikelihoods"]) == 2 and i["correct"] == (i["pred"] == i["gold"]) for i in items)
    assert s.details["hs"]["items"][0]["tags"][0] == "commonsense"
    assert s.metrics["copa/acc"]["value"] == sum(i["correct"] for i in items) / 2
    d = item_diff(s, t)
    for task in ("copa", "hs"):
        row = d["by_task"][task]
        si = {i["doc_id"]: i["correct"] for i in s.details[task]["items"]}
        ti = {i["doc_id"]: i["correct"] for i in t.details[task]["items"]}
        assert row["lost_items"] == [k for k in si if ti[k] and not si[k]]
        assert row["gained_items"] == [k for k in si if si[k] and not ti[k]]
        assert row["teacher_correct"] == sum(ti.values()) and row["n"] == len(si)
    assert d["by_tag"]["commonsense"]["lost"] == d["by_task"]["hs"]["lost"]
    assert d["lost"] == d["by_task"]["copa"]["lost"] + d["by_task"]["hs"]["lost"]
    reg = regressed_capabilities(d)
    assert all(r["lost"] >= 1 for r in reg)
    t.details["copa"]["items"] = t.details["copa"]["items"][:1]
    with pytest.raises(InputError, match="different items"):
        item_diff(s, t)


def test_item_diff_by_hand():
    def card(correct):
        return {"details": {"t": {"items": [{"doc_id": str(i), "correct": c, "tags": ["cap", f"sub:{i % 2}"]}
                                            for i, c in enumerate(correct)]}}}
    d = item_diff(card([0, 0, 1, 1]), card([1, 0, 1, 0]))
    assert d["by_task"]["t"]["lost_items"] == ["0"] and d["by_task"]["t"]["gained_items"] == ["3"]
    assert d["by_tag"]["sub:0"]["lost"] == 1 and d["by_tag"]["sub:1"]["gained"] == 1
    assert [r["tag"] for r in regressed_capabilities(d)] == ["sub:0", "cap"]


def test_user_lm_eval_yaml_and_include_path(tmp_path, tiny_model_factory, tiny_tokenizer):
    rows = [{"q": "Is ice cold?", "choices": ["yes", "no"], "gold": 0},
            {"q": "Is fire wet?", "choices": ["yes", "no"], "gold": 1}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mytasks").mkdir()
    (tmp_path / "mytasks" / "my_yesno.yaml").write_text(yaml.safe_dump({
        "task": "my_yesno", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "d.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question: {{q}}\nAnswer:",
        "doc_to_choice": "choices", "doc_to_target": "gold",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    model = tiny_model_factory()
    by_path = run_suite(model, tiny_tokenizer, load_suite_dict({"name": "s", "tasks": [
        {"type": "lm_eval", "name": "mine", "task": "mytasks/my_yesno.yaml"}]}), data_dir=tmp_path)
    by_name = run_suite(model, tiny_tokenizer, load_suite_dict({"name": "s", "tasks": [
        {"type": "lm_eval", "name": "mine", "task": "my_yesno", "include_path": "mytasks"}]}), data_dir=tmp_path)
    for card in (by_path, by_name):
        assert not card.partial, card.errors
        assert card.metrics["mine/acc"]["n"] == 2
        assert [i["doc_id"] for i in card.details["mine"]["items"]] == ["my_yesno:0", "my_yesno:1"]
    assert by_path.metrics["mine/acc"]["value"] == by_name.metrics["mine/acc"]["value"]


def test_stock_task_offline_is_refused_before_the_model(monkeypatch, tmp_path, tiny_tokenizer):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty"))
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    suite = load_suite_dict({"name": "s", "tasks": [{"type": "lm_eval", "name": "hs", "task": "hellaswag"}]})
    with pytest.raises(InputError, match=r"Rowan/hellaswag.*offline.*--suite hellaswag:FILE"):
        run_suite(NoModel(), tiny_tokenizer, suite)
    suite.tasks[0].task = "no_such_task_anywhere_xyz"
    with pytest.raises(InputError, match="not a stock lm-eval task"):
        prepare_suite(suite)


def test_student_vs_teacher_hook(data, tiny_model_factory, tiny_tokenizer):
    from distillgate.evaluate.diff import student_vs_teacher

    suite = load_suite("copa:copa.xml")
    teacher_card = run_suite(tiny_model_factory(num_layers=4, seed=0), tiny_tokenizer, suite, data_dir=data)
    card, diff = student_vs_teacher(tiny_model_factory(seed=1), tiny_tokenizer, teacher_card, suite, data_dir=data)
    assert diff == item_diff(card, teacher_card) and diff["by_task"]["copa"]["n"] == 2


def test_native_only_format_under_lm_eval_says_so():
    suite = load_suite_dict({"name": "s", "tasks": [{"type": "lm_eval", "name": "b", "task": "blimp:x.jsonl"}]})
    with pytest.raises(InputError, match="format 'blimp' runs natively"):
        prepare_suite(suite)


def test_missing_absolute_path_is_not_blamed_on_data_dir(tmp_path):
    with pytest.raises(InputError, match=r"nowhere.jsonl: needed by task 'hellaswag' but not found$"):
        prepare_suite(load_suite(f"hellaswag:{tmp_path / 'nowhere.jsonl'}"))


def test_user_group_yaml_returns_every_subtask(tmp_path, tiny_model_factory, tiny_tokenizer):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"q": q, "choices": ["yes", "no"], "gold": g}) + "\n"
                                              for q, g in (("Is ice cold?", 0), ("Is fire wet?", 1))))
    base = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "d.jsonl")}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    for name, prompt in (("yn_plain", "{{q}}"), ("yn_qa", "Question: {{q}}\nAnswer:")):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, "doc_to_text": prompt, **base}))
    (tmp_path / "yn.yaml").write_text(yaml.safe_dump({"group": "yn", "task": ["yn_plain", "yn_qa"]}))
    card = run_suite(tiny_model_factory(), tiny_tokenizer, load_suite(f"lm_eval:{tmp_path / 'yn.yaml'}"))
    assert not card.partial, card.errors
    assert {"yn_yn_plain/acc", "yn_yn_qa/acc"} <= set(card.metrics)
    assert card.metrics["yn_yn_qa/acc"]["n"] == 2
