"""Generation benchmarks (DROP, GSM8K, BBH) from a local file through lm-eval's own task definitions: one suite
line each, lm-eval's metrics come back with per-item predictions."""

from pathlib import Path

import pytest

from distillgate.errors import InputError
from distillgate.evaluate.formats import load_format
from distillgate.evaluate.suite import load_suite, run_suite

FILES = Path(__file__).resolve().parents[1] / "data" / "formats"


def test_drop_release_file_runs_lm_eval_drop(tiny_model_factory, tiny_tokenizer, one_thread):
    card = run_suite(tiny_model_factory(), tiny_tokenizer, load_suite(f"drop:{FILES / 'drop_dataset_dev.json'}"))
    assert not card.partial, card.errors
    assert {"drop/em", "drop/f1"} <= set(card.metrics) and card.metrics["drop/f1"]["n"] == 3
    items = card.details["drop"]["items"]
    assert [i["gold"] for i in items] == [[["5"]], [["Mia"]], [["May 2020"]]]   # answers, each a list of spans
    assert all(isinstance(i["pred"], str) and 0 <= i["score"] <= 1 for i in items)
    assert card.metrics["drop/em"]["value"] == sum(i["score"] for i in items) / 3


def test_drop_rows_in_every_layout_normalise_alike(tmp_path):
    import json

    rows = load_format("drop", FILES / "drop_dataset_dev.json")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for _, r in rows))      # EleutherAI/drop rows
    assert [r for _, r in load_format("drop", tmp_path / "d.jsonl")] == [r for _, r in rows]
    (tmp_path / "u.jsonl").write_text(json.dumps({"passage": "p", "question": "q?", "answers_spans":
                                                  {"spans": ["x"], "types": ["span"]}}) + "\n")
    assert load_format("drop", tmp_path / "u.jsonl")[0][1]["answer"]["spans"] == ["x"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"passage": "p", "question": "q?"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: no 'answer'"):
        load_format("drop", tmp_path / "bad.jsonl")


def test_gsm8k_and_bbh_files_on_shared_data(tiny_model_factory, tiny_tokenizer, datasets_dir, one_thread):
    model = tiny_model_factory()
    for line, metric in ((f"gsm8k:{datasets_dir}/gsm8k/test.jsonl", "gsm8k/exact_match"),
                         (f"bbh:{datasets_dir}/bbh/sports_understanding.json", "bbh/exact_match")):
        card = run_suite(model, tiny_tokenizer, load_suite(line), limit=2)
        assert not card.partial, card.errors
        assert card.metrics[metric]["n"] == 2 and len(card.details[metric.split("/")[0]]["items"]) == 2
