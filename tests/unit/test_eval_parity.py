"""Native scoring equals a direct lm-evaluation-harness run on the same tiny model and the same items: the same
answer per item and the score within 0.1 point, for every multiple-choice / likelihood format.

lm-eval runs its *own* stock task YAML (``include``d, with ``dataset_path: json`` on the rows our loader
normalised), so the prompt, choices and metric are lm-eval's, not a copy of ours. Files: ``tests/data/formats``
(invented items in each benchmark's published layout) and ``../shared/datasets`` read in place.
"""

import json
import os
from pathlib import Path

import lm_eval.tasks
import pytest
import yaml

from distillgate.evaluate.choice import evaluate_mc, load_copa, load_mmlu
from distillgate.evaluate.formats import FORMATS, load_format
from distillgate.evaluate.harness import run_lm_eval
from distillgate.evaluate.lm import score_last_word, score_minimal_pairs
from distillgate.testing import make_tiny_model

FILES = Path(__file__).resolve().parents[1] / "data" / "formats"
STOCK = Path(lm_eval.tasks.__file__).parent


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer), seed=3)


def _by_doc(items):
    return [it for _, it in sorted((int(it["doc_id"].rsplit(":", 1)[1]), it) for it in items)]


def _same_items(native_per_doc, ref_items, key="pred"):
    ref = _by_doc(ref_items)
    assert len(ref) == len(native_per_doc)
    for ours, theirs in zip(native_per_doc, ref):
        assert ours["loglikelihoods"] == pytest.approx(theirs["loglikelihoods"], abs=2e-3)
        assert ours[key] == theirs["pred"]


@pytest.mark.parametrize("fmt,file", [
    ("hellaswag", "hellaswag.jsonl"), ("arc", "arc_ai2.jsonl"), ("arc", "arc_hf.jsonl"), ("piqa", "piqa_hf.jsonl"),
    ("piqa", "valid.jsonl"), ("winogrande", "winogrande.jsonl"), ("boolq", "boolq_release.jsonl"),
    ("sciq", "sciq.json"), ("openbookqa", "openbookqa_ai2.jsonl"), ("truthfulqa_mc1", "mc_task.json"),
    ("truthfulqa_mc2", "mc_task.json")])
def test_choice_format_equals_lm_eval_stock_task(fmt, file, model, tiny_tokenizer, one_thread):
    path = FILES / file
    native = evaluate_mc(model, tiny_tokenizer, FORMATS[fmt].docs(load_format(fmt, path)), batch_size=4)
    (ref,) = run_lm_eval(model, tiny_tokenizer, [f"{fmt}:{path}"], log_samples=True, batch_size=4).values()
    assert ref["n"] == native["n"]
    _same_items(native["per_doc"], ref["items"])
    for m in FORMATS[fmt].metrics:
        theirs = ref["acc"] if m == "mc2" else ref[m]        # lm-eval calls truthfulqa_mc2's metric 'acc'
        assert native[m] == pytest.approx(theirs, abs=1e-3), m
    if fmt == "truthfulqa_mc2":
        for ours, theirs in zip(native["per_doc"], _by_doc(ref["items"])):
            assert ours["mc2"] == pytest.approx(theirs["score"], abs=1e-4)


def test_lambada_equals_lm_eval(model, tiny_tokenizer, one_thread):
    path = FILES / "lambada.jsonl"
    native = score_last_word(model, tiny_tokenizer, load_format("lambada", path))
    (ref,) = run_lm_eval(model, tiny_tokenizer, [f"lambada:{path}"], log_samples=True).values()
    assert native["acc"] == pytest.approx(ref["acc"], abs=1e-3)
    assert native["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4)
    for ours, theirs in zip(native["per_doc"], _by_doc(ref["items"])):
        assert ours["loglikelihoods"][0] == pytest.approx(theirs["loglikelihoods"][0], abs=2e-3)


def _blimp_yaml(tmp: Path, rows: list[dict]) -> Path:
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"include": str(STOCK / "blimp" / "_template_yaml"), "task": "dg_blimp_parity", "dataset_path": "json",
           "dataset_name": None, "dataset_kwargs": {"data_files": {"train": str(data)}, "cache_dir": str(tmp / "c")}}
    (tmp / "dg_blimp_parity.yaml").write_text(yaml.safe_dump(cfg))
    return tmp / "dg_blimp_parity.yaml"


def test_blimp_equals_lm_eval_blimp_task_including_ties(model, tiny_tokenizer, tmp_path, datasets_dir, one_thread):
    """lm-eval's blimp: ' ' + sentence after the prefix token, and a tie counts as right (argmax -> gold 0)."""
    rows = []
    for f in sorted(Path(datasets_dir, "blimp").glob("*.jsonl"))[:3]:
        rows += [json.loads(ln) for ln in f.read_text().splitlines()[:12]]
    rows.append({"sentence_good": "The cat sat.", "sentence_bad": "The cat sat.", "UID": "tie"})   # an exact tie
    yml = _blimp_yaml(tmp_path, rows)
    native = score_minimal_pairs(model, tiny_tokenizer, load_format("blimp", tmp_path / "pairs.jsonl"))
    (ref,) = run_lm_eval(model, tiny_tokenizer, [str(yml)], log_samples=True).values()
    assert ref["n"] == native["n"] == len(rows)
    _same_items(native["per_doc"], ref["items"])
    assert native["accuracy"] == pytest.approx(ref["acc"], abs=1e-9)
    assert native["per_doc"][-1]["correct"] and native["per_doc"][-1]["loglikelihoods"][0] == \
        native["per_doc"][-1]["loglikelihoods"][1]


def test_copa_and_mmlu_on_shared_data_equal_lm_eval(model, tiny_tokenizer, datasets_dir, one_thread):
    copa = evaluate_mc(model, tiny_tokenizer, load_copa(f"{datasets_dir}/copa/copa-dev.xml", 30))
    (ref,) = run_lm_eval(model, tiny_tokenizer, ["copa"], data_dir=datasets_dir, limit=30, log_samples=True).values()
    _same_items(copa["per_doc"], ref["items"])
    assert copa["acc"] == pytest.approx(ref["acc"], abs=1e-3) and copa["acc_norm"] == pytest.approx(ref["acc_norm"], abs=1e-3)
    # 5-shot MMLU prompts are 1,165-1,384 tiny-BPE tokens: past the tiny model's 512 positions, so this also
    # checks that contexts are left-truncated exactly like lm-eval's HFLM
    mmlu = evaluate_mc(model, tiny_tokenizer, load_mmlu(datasets_dir, "marketing", 8, num_fewshot=5))
    (ref,) = run_lm_eval(model, tiny_tokenizer, ["mmlu:marketing"], data_dir=datasets_dir, limit=8,
                         log_samples=True).values()
    _same_items(mmlu["per_doc"], ref["items"])
    assert mmlu["acc"] == pytest.approx(ref["acc"], abs=1e-3)


def test_wikitext_documents_equal_lm_eval_wikitext(model, tiny_tokenizer, tmp_path, datasets_dir, one_thread):
    """lm-eval's wikitext (rolling windows over the model's 512 positions, per document, detokenized): the
    same log-likelihood per document and word/byte perplexity. Two WikiText-2 articles, read in place."""
    from distillgate.evaluate.lm import document_perplexity

    text = Path(datasets_dir, "wikitext2", "valid.txt").read_text(encoding="utf-8")
    path = tmp_path / "two_articles.txt"                  # a temporary slice, never committed
    path.write_text("".join(text.splitlines(keepends=True)[:56]), encoding="utf-8")
    pages = [r["page"] for _, r in load_format("wikitext", path)]
    assert len(pages) >= 2 and max(len(tiny_tokenizer.encode(p)) for p in pages) > 2 * 512
    native = document_perplexity(model, tiny_tokenizer, pages, batch_size=4)
    (ref,) = run_lm_eval(model, tiny_tokenizer, [f"wikitext:{path}"], log_samples=True).values()
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert native[m] == pytest.approx(ref[m], rel=1e-5), m
    for ours, theirs in zip(native["per_doc"], _by_doc(ref["items"])):
        assert ours["loglikelihood"] == pytest.approx(theirs["pred"], rel=1e-5)   # lm-eval's rolling ll
