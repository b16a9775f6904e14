"""Benchmark file loaders: both published layouts read alike, prompts are lm-eval's, and every bad record is
named by file, line (or record) and field, with what is allowed."""

import json
from pathlib import Path

import pytest

from distillgate.errors import InputError
from distillgate.evaluate.formats import FORMATS, TRUTHFULQA_QA_PROMPT, load_format, read_records

FILES = Path(__file__).resolve().parents[1] / "data" / "formats"


def _docs(fmt, path):
    return FORMATS[fmt].docs(load_format(fmt, path))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_are_lm_eval_stock_prompts():
    hs = _docs("hellaswag", FILES / "hellaswag.jsonl")
    assert hs[0].context == "Baking bread: A man kneads dough on a wooden table. He"
    assert hs[0].choices[1] == "paints the table. blue."                    # ' [title]' -> '. ', brackets gone
    assert hs[1].gold == 0 and hs[1].choices[2] == " climbs into the glass."
    arc = _docs("arc", FILES / "arc_ai2.jsonl")
    assert arc[0].context == "Question: Which object gives off its own light?\nAnswer:" and arc[0].gold == 1
    wg = _docs("winogrande", FILES / "winogrande.jsonl")[0]
    assert wg.contexts == ["The trophy did not fit in the case because the trophy",
                           "The trophy did not fit in the case because the case"]
    assert wg.choices == ["was too big.", "was too big."] and wg.gold == 0
    bq = _docs("boolq", FILES / "boolq_release.jsonl")
    assert bq[0].context.endswith("\nQuestion: is the sun a star?\nAnswer:") and [d.gold for d in bq] == [1, 0]
    sq = _docs("sciq", FILES / "sciq.json")[0]
    assert sq.context.startswith("When we breathe out") and sq.gold == 3 and sq.choices[3] == "carbon dioxide"
    ob = _docs("openbookqa", FILES / "openbookqa_ai2.jsonl")[0]
    assert ob.context == "A magnet will stick to" and ob.gold == 1
    tq = _docs("truthfulqa_mc2", FILES / "mc_task.json")[0]
    assert tq.context == TRUTHFULQA_QA_PROMPT + "\n\nQ: What happens if you swallow a cherry pit?\nA:"
    assert tq.labels == [1, 1, 0, 0] and len(_docs("truthfulqa_mc1", FILES / "mc_task.json")[0].choices) == 3


def test_both_published_layouts_read_alike(tmp_path):
    ai2 = load_format("arc", FILES / "arc_ai2.jsonl")
    hf = _jsonl(tmp_path / "arc_hf.jsonl", [r for _, r in ai2])                   # normalised rows = HF layout
    assert [r for _, r in load_format("arc", hf)] == [r for _, r in ai2]
    piqa_release = [r for _, r in load_format("piqa", FILES / "valid.jsonl")]     # labels from valid-labels.lst
    assert [r["label"] for r in piqa_release] == [0, 0]
    assert [r for _, r in load_format("piqa", _jsonl(tmp_path / "p.jsonl", piqa_release))] == piqa_release
    bq = [r for _, r in load_format("boolq", FILES / "boolq_release.jsonl")]
    assert [r for _, r in load_format("boolq", _jsonl(tmp_path / "b.jsonl", bq))] == bq
    tq = [r for _, r in load_format("truthfulqa_mc1", FILES / "mc_task.json")]
    assert [r for _, r in load_format("truthfulqa_mc1", _jsonl(tmp_path / "t.jsonl", tq))] == tq
    sq = [r for _, r in load_format("sciq", FILES / "sciq.json")]                  # JSON array and JSONL alike
    assert [r for _, r in load_format("sciq", _jsonl(tmp_path / "s.jsonl", sq))] == sq


@pytest.mark.parametrize("fmt,row,match", [
    ("hellaswag", {"ctx_a": "a", "ctx_b": "b", "activity_label": "x", "endings": ["1", "2"], "label": 2},
     r"field 'label' is int '2'; allowed: an index 0..1"),
    ("hellaswag", {"ctx_a": "a", "activity_label": "x", "endings": ["1", "2"], "label": 0},
     r"field 'ctx_b' is missing; allowed: a string"),
    ("arc", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"},
     r"answerKey 'C'; allowed: one of the choice labels \['A', 'B'\]"),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 3}, r"field 'label' is int '3'; allowed: an index 0..1"),
    ("winogrande", {"sentence": "a _ b _", "option1": "x", "option2": "y", "answer": "1"},
     r"'sentence' has 2 '_'; allowed: exactly one"),
    ("winogrande", {"sentence": "a _ b", "option1": "x", "option2": "y", "answer": 3},
     r"field 'answer' is int '3'; allowed: '1' or '2'"),
    ("boolq", {"passage": "p", "question": "q", "answer": "maybe"}, r"field 'label' is str 'maybe'"),
    ("sciq", {"question": "q", "distractor1": "a", "distractor2": "b", "correct_answer": "c"},
     r"field 'distractor3' is missing"),
    ("openbookqa", {"question_stem": "q", "choices": [{"text": "a", "label": "A"}], "answerKey": "A"},
     r"choices.text' is list .*allowed: a list of >= 2 non-empty strings"),
    ("truthfulqa_mc1", {"question": "q", "mc1_targets": {"wrong": 0, "right": 1}, "mc2_targets": {"right": 1, "w": 0}},
     r"mc1_targets labels \[0, 1\]; allowed: exactly one 1, listed first"),
    ("truthfulqa_mc2", {"question": "q", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 0, "b": 0}},
     r"mc2_targets.labels' .*at least one 1"),
    ("blimp", {"sentence_good": "a"}, r"field 'sentence_bad' is missing; allowed: a sentence"),
    ("lambada", {"text": "one"}, r"'text' has one word"),
    ("gsm8k", {"question": "q", "answer": "42"}, r"'answer' has no '####'"),
])
def test_bad_record_is_named_by_file_line_and_field(tmp_path, fmt, row, match):
    good = {"hellaswag": {"ctx_a": "a", "ctx_b": "b", "activity_label": "x", "endings": ["1", "2"], "label": 0}}
    path = _jsonl(tmp_path / f"{fmt}.jsonl", [good.get(fmt, row), row])
    line = 2 if fmt in good else 1
    if fmt not in good:
        path = _jsonl(tmp_path / f"{fmt}.jsonl", [row])
    with pytest.raises(InputError, match=rf"{path.name}:{line}: .*{match}"):
        load_format(fmt, path)


def test_file_level_errors(tmp_path):
    (tmp_path / "a.json").write_text('{"nope": 1}')
    with pytest.raises(InputError, match=r"a.json: a JSON object without a list under 'examples'"):
        read_records(tmp_path / "a.json")
    (tmp_path / "b.jsonl").write_text('{"x": 1}\n{broken\n')
    with pytest.raises(InputError, match=r"b.jsonl:2: invalid JSON"):
        read_records(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('[1, 2]\n')
    with pytest.raises(InputError, match=r"c.jsonl: record 1: a int; allowed: a JSON object"):
        read_records(tmp_path / "c.jsonl")
    with pytest.raises(InputError, match="file not found"):
        load_format("hellaswag", tmp_path / "missing.jsonl")
    (tmp_path / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(InputError, match=r"no valid-labels.lst next to it"):
        load_format("piqa", tmp_path / "valid.jsonl")
    with pytest.raises(InputError, match="unknown benchmark format 'nope'; allowed: arc, bbh"):
        load_format("nope", tmp_path / "valid.jsonl")
