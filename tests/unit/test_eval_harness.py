"""lm-eval task rendering from the shipped templates (no model, no TaskManager)."""

import json

import pytest
import yaml

from distillgate.errors import ConfigError, InputError
from distillgate.evaluate.harness import expand_task, render_task

COPA = ('<copa-corpus><item id="1" asks-for="effect" most-plausible-alternative="2"><p>It rained.</p>'
        '<a1>The sun shone.</a1><a2>The grass got wet.</a2></item></copa-corpus>')


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    (d / "copa").mkdir(parents=True)
    (d / "copa" / "copa-dev.xml").write_text(COPA)
    for split in ("dev", "test"):
        (d / "mmlu" / split).mkdir(parents=True)
        (d / "mmlu" / split / f"astro_{split}.csv").write_text("Q?,a,b,c,d,B\n")
    (d / "mmlu" / "dev" / "only_dev_dev.csv").write_text("Q?,a,b,c,d,B\n")
    (d / "bbh").mkdir()
    (d / "bbh" / "sports.json").write_text(json.dumps({"examples": [{"input": "x", "target": "yes"}]}))
    return d


def test_render_copa_and_mmlu(data_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    assert render_task("copa", data_dir, work) == "dg_copa"
    cfg = yaml.safe_load((work / "dg_copa.yaml").read_text())
    assert cfg["dataset_path"] == "json" and cfg["doc_to_choice"] == "choices"
    row = json.loads(open(cfg["dataset_kwargs"]["data_files"]["validation"]).readline())
    assert row == {"context": "It rained therefore", "choices": [" the sun shone.", " the grass got wet."], "label": 1}
    assert expand_task("mmlu", data_dir) == ["mmlu:astro"]           # only subjects with dev + test
    assert render_task("mmlu:astro", data_dir, work) == "dg_mmlu_astro"
    cfg = yaml.safe_load((work / "dg_mmlu_astro.yaml").read_text())
    assert cfg["description"].startswith("The following are multiple choice questions (with answers) about astro.")
    assert set(cfg["dataset_kwargs"]["data_files"]) == {"test", "dev"} and cfg["num_fewshot"] == 5
    assert expand_task("bbh", data_dir) == ["bbh:sports"]
    assert render_task("bbh:sports", data_dir, work) == "dg_bbh_sports"
    assert render_task("hellaswag", data_dir, work) is None          # stock lm-eval task: passed through


def test_render_errors(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="--data-dir"):
        render_task("copa", None, tmp_path)
    with pytest.raises(InputError, match="gsm8k/test.jsonl"):
        render_task("gsm8k", data_dir, tmp_path)
    with pytest.raises(ConfigError, match="mc:<path"):
        render_task("mc", data_dir, tmp_path)
