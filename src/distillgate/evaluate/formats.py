"""Benchmark file formats: read a local file in a benchmark's published format, check every record, and turn
it into what the scorers take. One registry (:data:`FORMATS`) serves the suite (``loader:``), the
``--suite FORMAT:FILE`` shorthand, the lm-eval path (``lm_eval`` tasks ``FORMAT:FILE``) and the generated docs.

Each format first *normalises* the file into the rows of the benchmark's Hugging Face dataset (the schema
lm-eval's stock task reads), accepting the original release's layout too where it differs (ARC/OpenBookQA
``question.stem``, TruthfulQA ``mc_task.json``, BoolQ ``answer: bool``, PIQA ``labels.lst``, SciQ JSON arrays).
Native scoring builds prompts from those rows exactly like lm-eval 0.4.13's stock task; the lm-eval path writes
the same rows as JSONL and ``include``s the stock task YAML (``Format.stock_yaml``) with ``dataset_path: json``,
so both paths read one set of rows and the parity tests compare like with like.

Every error names the file, the line (JSONL) or record number (JSON), the field and what is allowed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .choice import MCDoc, load_copa, load_jsonl_mc

# lm-eval truthfulqa_mc1/mc2 doc_to_text: a fixed 6-shot QA preamble, then the question.
TRUTHFULQA_QA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")


@dataclass(frozen=True)
class Format:
    """One benchmark file format. ``kind``: choice | pairs | loglikelihood | perplexity | generate."""
    name: str
    kind: str
    input_format: str            # what the file looks like (docs)
    lm_eval_task: str            # the stock lm-eval task whose prompt and metric it reproduces
    metrics: tuple[str, ...]     # metrics it reports (bare names, see metrics.py)
    capability: str              # default capability tag of its items
    rows: Callable | None = None   # (path) -> [(where, row)] normalised rows (HF dataset schema)
    docs: Callable | None = None   # (rows) -> [MCDoc] for kind=choice
    stock_yaml: str | None = None  # lm-eval task YAML (relative to lm_eval/tasks) its rows feed


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise InputError(f"unknown benchmark format {name!r}; allowed: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


# ------------------------------------------------------------------------------------------ reading files

def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """``[(where, record)]`` from a JSONL file (one object per line) or a JSON file (an array of objects, or an
    object holding one under ``examples``/``data``/``rows``). ``where`` is ``file:line`` or ``file: record N``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from e
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); allowed: a JSON array of objects, "
                             "or one JSON object per line (JSONL)") from e
        if isinstance(data, dict):
            key = next((k for k in ("examples", "data", "rows") if isinstance(data.get(k), list)), None)
            if key is None:
                raise InputError(f"{path}: a JSON object without a list under 'examples', 'data' or 'rows'; "
                                 "allowed: a JSON array of records, or one of those keys holding one")
            data = data[key]
        if not isinstance(data, list):
            raise InputError(f"{path}: top level is {type(data).__name__}; allowed: a JSON array of records")
        out = [(f"{path}: record {i + 1}", r) for i, r in enumerate(data)]
    else:
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: invalid JSON ({e.msg}); allowed: one JSON object per line") from e
    for where, r in out:
        if not isinstance(r, dict):
            raise InputError(f"{where}: a {type(r).__name__}; allowed: a JSON object (record)")
    if not out:
        raise InputError(f"{path}: no records")
    return out


def _get(where: str, row: dict, key: str, typ, allowed: str):
    v = row.get(key)
    if isinstance(v, bool) and typ is not bool:
        v = None
    if not isinstance(v, typ):
        raise InputError(f"{where}: field {key!r} is {_show(v)}; allowed: {allowed}")
    return v


def _show(v) -> str:
    return "missing" if v is None else f"{type(v).__name__} {str(v)[:40]!r}"


def _strs(where: str, v, key: str, min_n: int = 2) -> list[str]:
    if not isinstance(v, list) or len(v) < min_n or not all(isinstance(x, str) and x for x in v):
        raise InputError(f"{where}: field {key!r} is {_show(v)}; allowed: a list of >= {min_n} non-empty strings")
    return v


def _index(where: str, v, n: int, key: str) -> int:
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
        raise InputError(f"{where}: field {key!r} is {_show(v)}; allowed: an index 0..{n - 1}")
    return v


# ------------------------------------------------------------------------------------ per-format rows/docs

def _hellaswag_rows(path):
    out = []
    for where, r in read_records(path):
        for k in ("ctx_a", "ctx_b", "activity_label"):
            _get(where, r, k, str, "a string")
        ends = _strs(where, r.get("endings"), "endings")
        _index(where, r.get("label"), len(ends), "label")
        out.append((where, {k: r[k] for k in ("ctx_a", "ctx_b", "activity_label", "endings", "label")}))
    return out


def hellaswag_preprocess(text: str) -> str:
    """lm-eval hellaswag ``preprocess`` (WikiHow bracket artefacts removed)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_docs(rows):
    return [MCDoc(context=hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
                  choices=[hellaswag_preprocess(e) for e in r["endings"]], gold=int(r["label"]), doc_id=w,
                  meta={"activity": r["activity_label"]}) for w, r in rows]


def _choices_obj(where: str, r: dict) -> tuple[list[str], list[str]]:
    """ARC/OpenBookQA choices: HF ``{"text": [...], "label": [...]}`` or AI2 ``[{"text", "label"}, ...]``."""
    c = r.get("choices")
    if isinstance(c, list) and all(isinstance(x, dict) for x in c):
        c = {"text": [x.get("text") for x in c], "label": [x.get("label") for x in c]}
    if not isinstance(c, dict):
        raise InputError(f"{where}: field 'choices' is {_show(c)}; allowed: {{\"text\": [...], \"label\": [...]}} "
                         "or a list of {\"text\", \"label\"} objects")
    text, label = _strs(where, c.get("text"), "choices.text"), _strs(where, c.get("label"), "choices.label")
    if len(text) != len(label):
        raise InputError(f"{where}: {len(text)} choice texts but {len(label)} labels; allowed: one label per choice")
    return text, label


def _qa_rows(stem_key: str):
    def rows(path):
        out = []
        for where, r in read_records(path):
            q = r.get(stem_key)
            if isinstance(r.get("question"), dict):           # AI2 release: question: {stem, choices}
                q = r["question"].get("stem")
                r = {**r, "choices": r["question"].get("choices")}
            if not isinstance(q, str):
                raise InputError(f"{where}: field {stem_key!r} is {_show(q)}; allowed: the question text "
                                 f"('{stem_key}', or 'question': {{'stem': ...}} as in the AI2 release)")
            text, label = _choices_obj(where, r)
            key = _get(where, r, "answerKey", str, f"one of the choice labels {label}")
            if key.lstrip() not in label:
                raise InputError(f"{where}: answerKey {key!r}; allowed: one of the choice labels {label}")
            out.append((where, {"id": str(r.get("id", where)), stem_key: q,
                                "choices": {"text": text, "label": label}, "answerKey": key}))
        return out
    return rows


def _arc_docs(rows):
    return [MCDoc(context=f"Question: {r['question']}\nAnswer:", choices=r["choices"]["text"],
                  gold=r["choices"]["label"].index(r["answerKey"]), doc_id=r["id"]) for _, r in rows]


def _obqa_docs(rows):
    return [MCDoc(context=r["question_stem"], choices=r["choices"]["text"],
                  gold=r["choices"]["label"].index(r["answerKey"].lstrip()), doc_id=r["id"]) for _, r in rows]


def _piqa_rows(path):
    path = Path(path)
    recs = read_records(path)
    labels = None
    if any("label" not in r for _, r in recs):      # original release: labels in <stem>-labels.lst
        lst = path.with_name(f"{path.stem}-labels.lst")
        if not lst.is_file():
            raise InputError(f"{path}: records without 'label' and no {lst.name} next to it; allowed: a 'label' "
                             "field (0|1) per record, or PIQA's labels file")
        labels = [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]
        if len(labels) != len(recs):
            raise InputError(f"{lst}: {len(labels)} labels for {len(recs)} records; allowed: one label per record")
    out = []
    for i, (where, r) in enumerate(recs):
        for k in ("goal", "sol1", "sol2"):
            _get(where, r, k, str, "a string")
        lab = _index(where, labels[i] if labels else r.get("label"), 2, "label")
        out.append((where, {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": lab}))
    return out


def _piqa_docs(rows):
    return [MCDoc(context=f"Question: {r['goal']}\nAnswer:", choices=[r["sol1"], r["sol2"]], gold=r["label"],
                  doc_id=w) for w, r in rows]


def _winogrande_rows(path):
    out = []
    for where, r in read_records(path):
        s = _get(where, r, "sentence", str, "a sentence with one '_' where an option goes")
        if s.count("_") != 1:
            raise InputError(f"{where}: 'sentence' has {s.count('_')} '_'; allowed: exactly one blank '_'")
        for k in ("option1", "option2"):
            _get(where, r, k, str, "a string")
        ans = r.get("answer")
        if str(ans) not in ("1", "2"):
            raise InputError(f"{where}: field 'answer' is {_show(ans)}; allowed: '1' or '2'")
        out.append((where, {"sentence": s, "option1": r["option1"], "option2": r["option2"], "answer": str(ans)}))
    return out


def _winogrande_docs(rows):
    """lm-eval winogrande (partial scoring): the options go into the *contexts*, the continuation is the rest
    of the sentence after the blank, scored after each context."""
    docs = []
    for w, r in rows:
        i = r["sentence"].index("_")
        rest = r["sentence"][i + 1:].strip()
        ctxs = [r["sentence"][:i] + r[k] for k in ("option1", "option2")]
        docs.append(MCDoc(context="", choices=[rest, rest], gold=int(r["answer"]) - 1, doc_id=w, contexts=ctxs))
    return docs


def _boolq_rows(path):
    out = []
    for where, r in read_records(path):
        for k in ("passage", "question"):
            _get(where, r, k, str, "a string")
        lab = r.get("label", r.get("answer"))
        if isinstance(lab, bool):                      # original release: "answer": true|false
            lab = int(lab)
        lab = _index(where, lab, 2, "label")
        out.append((where, {"passage": r["passage"], "question": r["question"], "label": lab}))
    return out


def _boolq_docs(rows):
    return [MCDoc(context=f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", choices=["no", "yes"],
                  gold=r["label"], doc_id=w) for w, r in rows]


def _sciq_rows(path):
    out = []
    for where, r in read_records(path):
        for k in ("question", "distractor1", "distractor2", "distractor3", "correct_answer"):
            _get(where, r, k, str, "a string")
        sup = r.get("support", "")
        if not isinstance(sup, str):
            raise InputError(f"{where}: field 'support' is {_show(sup)}; allowed: a string (may be empty)")
        out.append((where, {k: r[k] for k in ("question", "distractor1", "distractor2", "distractor3",
                                              "correct_answer")} | {"support": sup}))
    return out


def _sciq_docs(rows):
    return [MCDoc(context=f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
                  choices=[r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], gold=3,
                  doc_id=w) for w, r in rows]


def _targets(where: str, v, key: str) -> dict:
    """TruthfulQA targets: HF ``{"choices": [...], "labels": [1, 0, ...]}`` or mc_task.json ``{answer: 1|0}``."""
    if isinstance(v, dict) and "choices" not in v and all(x in (0, 1) for x in v.values()):
        v = {"choices": list(v), "labels": [int(x) for x in v.values()]}
    if not isinstance(v, dict):
        raise InputError(f"{where}: field {key!r} is {_show(v)}; allowed: {{\"choices\": [...], \"labels\": "
                         "[1, 0, ...]} or {\"answer\": 1|0, ...} as in mc_task.json")
    ch, lab = _strs(where, v.get("choices"), f"{key}.choices"), v.get("labels")
    if not isinstance(lab, list) or len(lab) != len(ch) or any(x not in (0, 1) for x in lab) or 1 not in lab:
        raise InputError(f"{where}: field '{key}.labels' is {_show(lab)}; allowed: one 0|1 per choice, at least one 1")
    return {"choices": ch, "labels": [int(x) for x in lab]}


def _truthfulqa_rows(path):
    out = []
    for where, r in read_records(path):
        q = _get(where, r, "question", str, "the question text")
        mc1 = _targets(where, r.get("mc1_targets"), "mc1_targets")
        mc2 = _targets(where, r.get("mc2_targets"), "mc2_targets")
        if mc1["labels"][0] != 1 or sum(mc1["labels"]) != 1:
            raise InputError(f"{where}: mc1_targets labels {mc1['labels']}; allowed: exactly one 1, listed first "
                             "(TruthfulQA's layout, which lm-eval's truthfulqa_mc1 relies on)")
        out.append((where, {"question": q, "mc1_targets": mc1, "mc2_targets": mc2}))
    return out


def _truthfulqa_docs(which: str):
    def docs(rows):
        key = f"{which}_targets"
        return [MCDoc(context=TRUTHFULQA_QA_PROMPT + "\n\nQ: " + r["question"] + "\nA:", choices=r[key]["choices"],
                      gold=r[key]["labels"].index(1), doc_id=w,
                      labels=r[key]["labels"] if which == "mc2" else None) for w, r in rows]
    return docs


def _copa_rows(path):
    return [(d.doc_id, {"context": d.context, "choices": d.choices, "label": d.gold, "question": d.meta["question"]})
            for d in load_copa(path)]


def _jsonl_rows(path):
    return [(d.doc_id, {"context": d.context, "choices": d.choices, "label": d.gold,
                        "target_delimiter": d.target_delimiter}) for d in load_jsonl_mc(path)]


def _plain_docs(rows):
    return [MCDoc(context=r["context"], choices=r["choices"], gold=r["label"], doc_id=w,
                  target_delimiter=r.get("target_delimiter", " "),
                  meta={"question": r["question"]} if "question" in r else {})
            for w, r in rows]


def _blimp_rows(path):
    out = []
    for where, r in read_records(path):
        for k in ("sentence_good", "sentence_bad"):
            _get(where, r, k, str, "a sentence")
        out.append((where, {"sentence_good": r["sentence_good"], "sentence_bad": r["sentence_bad"],
                            "UID": r.get("UID") or Path(path).stem}))
    return out


def _lambada_rows(path):
    out = []
    for where, r in read_records(path):
        t = _get(where, r, "text", str, "a passage whose last word is the target")
        if len(t.split(" ")) < 2:
            raise InputError(f"{where}: 'text' has one word; allowed: a passage of >= 2 space-separated words")
        out.append((where, {"text": t}))
    return out


def _gsm8k_rows(path):
    out = []
    for where, r in read_records(path):
        _get(where, r, "question", str, "a string")
        a = _get(where, r, "answer", str, "the worked answer ending in '#### <number>'")
        if "####" not in a:
            raise InputError(f"{where}: 'answer' has no '####'; allowed: the worked answer ending in '#### <number>'")
        out.append((where, {"question": r["question"], "answer": a}))
    return out


def _bbh_rows(path):
    out = []
    for where, r in read_records(path):
        _get(where, r, "input", str, "a string")
        _get(where, r, "target", str, "a string")
        out.append((where, {"input": r["input"], "target": r["target"]}))
    return out


_NO_DATE = {"day": "", "month": "", "year": ""}


def _drop_answer(where: str, a, key: str) -> dict:
    """One DROP answer ``{number, date: {day, month, year}, spans}`` (the release's layout), checked."""
    if not isinstance(a, dict) or not isinstance(a.get("spans", []), list):
        raise InputError(f"{where}: field {key!r} is {_show(a)}; allowed: {{\"number\": str, \"date\": {{\"day\", "
                         "\"month\", \"year\"}, \"spans\": [str, ...]}")
    date = a.get("date") if isinstance(a.get("date"), dict) else {}
    out = {"number": str(a.get("number") or ""), "date": {k: str(date.get(k) or "") for k in _NO_DATE},
           "spans": [str(x) for x in a.get("spans", [])]}
    if not (out["number"] or out["spans"] or any(out["date"].values())):
        raise InputError(f"{where}: {key!r} is empty; allowed: a number, a date or >= 1 span")
    return out


def _drop_rows(path):
    """DROP -> EleutherAI/drop rows (what lm-eval's drop task reads): the release's ``drop_dataset_dev.json``
    (``{passage_id: {passage, qa_pairs: [{question, query_id, answer, validated_answers}]}}``), those rows as
    JSONL, or HF ``ucinlp/drop`` rows (``answers_spans: {spans, types}``)."""
    path = Path(path)
    recs = None
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: not a readable DROP JSON file ({e})") from e
        if isinstance(data, dict) and data and all(isinstance(v, dict) and "qa_pairs" in v for v in data.values()):
            recs = [(f"{path}: passage {pid} question {i + 1}", {"section_id": pid, "passage": v.get("passage"), **qa})
                    for pid, v in data.items() for i, qa in enumerate(v["qa_pairs"])]
    recs = recs if recs is not None else read_records(path)
    out = []
    for where, r in recs:
        for k in ("passage", "question"):
            _get(where, r, k, str, "a string")
        if "answer" in r:
            ans = _drop_answer(where, r["answer"], "answer")
            va = r.get("validated_answers") or []
            if isinstance(va, dict):                       # EleutherAI/drop: a dict of lists
                va = [{"number": n, "date": d, "spans": s} for n, d, s in
                      zip(va.get("number", []), va.get("date", []), va.get("spans", []))]
            va = [_drop_answer(where, v, "validated_answers") for v in va]
        elif isinstance(r.get("answers_spans"), dict) and r["answers_spans"].get("spans"):
            ans, va = _drop_answer(where, {"spans": r["answers_spans"]["spans"]}, "answers_spans"), []
        else:
            raise InputError(f"{where}: no 'answer' (DROP release / EleutherAI/drop) or 'answers_spans' (ucinlp/drop)"
                             "; allowed: one of them")
        out.append((where, {"section_id": str(r.get("section_id", "")), "query_id": str(r.get("query_id", where)),
                            "passage": r["passage"], "question": r["question"], "answer": ans,
                            "validated_answers": {"number": [v["number"] for v in va],
                                                  "date": [v["date"] for v in va],
                                                  "spans": [v["spans"] for v in va]}}))
    if not out:
        raise InputError(f"{path}: no questions")
    return out


def _text_rows(path):
    """WikiText: JSONL/JSON rows with ``page`` (HF ``wikitext_document_level``), or a plain text file split into
    its articles at the top-level `` = Title = `` headings."""
    from .lm import split_documents

    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return [(w, {"page": _get(w, r, "page", str, "the document's text")}) for w, r in read_records(path)]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read text ({e})") from e
    pages = split_documents(text)
    if not pages:
        raise InputError(f"{path}: no text")
    return [(f"{path}: document {i + 1}", {"page": p}) for i, p in enumerate(pages)]


for _f in [
    Format("copa", "choice", "COPA XML (`copa-dev.xml`): `<item asks-for=cause|effect most-plausible-alternative=1|2>"
           "<p>premise</p><a1>..</a1><a2>..</a2></item>`", "super_glue copa", ("acc", "acc_norm"), "causal_reasoning",
           _copa_rows, _plain_docs),
    Format("mmlu", "choice", "MMLU CSVs without header `question,A,B,C,D,answer` in `mmlu/test/<subject>_test.csv` and "
           "`mmlu/dev/<subject>_dev.csv` (5 shots); the task names a `subject`", "mmlu_<subject> (5-shot)",
           ("acc", "acc_norm"), "knowledge"),
    Format("jsonl", "choice", "your own multiple choice: JSONL `{\"context\"|\"question\", \"choices\": [..], "
           "\"label\": index or choice text, \"target_delimiter\"?}`", "(generic multiple_choice)",
           ("acc", "acc_norm"), "custom", _jsonl_rows, _plain_docs),
    Format("hellaswag", "choice", "HellaSwag JSONL (`hellaswag_val.jsonl` or the HF dataset): `ctx_a`, `ctx_b`, "
           "`activity_label`, `endings` (4), `label`", "hellaswag", ("acc", "acc_norm"), "commonsense",
           _hellaswag_rows, _hellaswag_docs, "hellaswag/hellaswag.yaml"),
    Format("arc", "choice", "ARC JSONL, AI2 release (`question: {stem, choices: [{text, label}]}`, `answerKey`) or HF "
           "(`question`, `choices: {text, label}`, `answerKey`); Easy and Challenge alike", "arc_easy / arc_challenge",
           ("acc", "acc_norm"), "science", _qa_rows("question"), _arc_docs, "arc/arc_easy.yaml"),
    Format("piqa", "choice", "PIQA JSONL `goal`, `sol1`, `sol2`, `label` (0|1), or the release's `valid.jsonl` with "
           "`valid-labels.lst` next to it", "piqa", ("acc", "acc_norm"), "physical_commonsense",
           _piqa_rows, _piqa_docs, "piqa/piqa.yaml"),
    Format("winogrande", "choice", "WinoGrande JSONL `sentence` (one `_`), `option1`, `option2`, `answer` ('1'|'2')",
           "winogrande (partial scoring)", ("acc",), "coreference", _winogrande_rows, _winogrande_docs,
           "winogrande/default.yaml"),
    Format("boolq", "choice", "BoolQ JSONL `passage`, `question`, and `answer` (true|false, the release) or `label` "
           "(0|1, super_glue)", "boolq", ("acc",), "reading_comprehension", _boolq_rows, _boolq_docs,
           "super_glue/boolq/default.yaml"),
    Format("sciq", "choice", "SciQ JSON array (the release) or JSONL: `question`, `distractor1..3`, "
           "`correct_answer`, `support`", "sciq", ("acc", "acc_norm"), "science", _sciq_rows, _sciq_docs,
           "sciq/sciq.yaml"),
    Format("openbookqa", "choice", "OpenBookQA JSONL, AI2 release (`question: {stem, choices}`, `answerKey`) or HF "
           "(`question_stem`, `choices: {text, label}`, `answerKey`)", "openbookqa", ("acc", "acc_norm"), "science",
           _qa_rows("question_stem"), _obqa_docs, "openbookqa/openbookqa.yaml"),
    Format("truthfulqa_mc1", "choice", "TruthfulQA `mc_task.json` (array of `{question, mc1_targets: {answer: 1|0}, "
           "mc2_targets}`) or the HF `multiple_choice` rows (`mc1_targets: {choices, labels}`)", "truthfulqa_mc1",
           ("acc",), "truthfulness", _truthfulqa_rows, _truthfulqa_docs("mc1"), "truthfulqa/truthfulqa_mc1.yaml"),
    Format("truthfulqa_mc2", "choice", "same file as truthfulqa_mc1; scores `mc2_targets` (several true answers)",
           "truthfulqa_mc2", ("mc2",), "truthfulness", _truthfulqa_rows, _truthfulqa_docs("mc2"),
           "truthfulqa/truthfulqa_mc2.yaml"),
    Format("blimp", "pairs", "BLiMP JSONL (one paradigm per file): `sentence_good`, `sentence_bad`, `UID`?",
           "blimp_<paradigm>", ("accuracy",), "grammar", _blimp_rows),
    Format("lambada", "loglikelihood", "LAMBADA JSONL `{\"text\": passage}`; the last space-separated word is the "
           "target", "lambada_openai", ("acc", "perplexity"), "long_range_context", _lambada_rows,
           stock_yaml="lambada/lambada_openai.yaml"),
    Format("wikitext", "perplexity", "plain text (e.g. WikiText-2 `valid.txt`); `mode: documents` also reads JSONL "
           "`{\"page\": article}` (HF `wikitext_document_level`) and splits a text file at ` = Title = ` headings",
           "`mode: windows`: the HF strided-window recipe; `mode: documents`: wikitext (rolling, per document)",
           ("ppl_token", "ppl_word", "word_perplexity", "byte_perplexity", "bits_per_byte"), "language_modelling",
           _text_rows, stock_yaml="wikitext/wikitext.yaml"),
    Format("gsm8k", "generate", "GSM8K JSONL `question`, `answer` (worked answer ending `#### <number>`)",
           "gsm8k prompt, zero-shot", ("exact_match",), "arithmetic", _gsm8k_rows),
    Format("bbh", "generate", "BIG-Bench Hard task JSON `{\"examples\": [{\"input\", \"target\"}]}`",
           "bbh_zeroshot_<task>", ("exact_match",), "reasoning", _bbh_rows),
    Format("drop", "generate", "DROP: the release's `drop_dataset_dev.json` (`{passage_id: {passage, qa_pairs: "
           "[{question, query_id, answer: {number, date, spans}, validated_answers}]}}`), those rows as JSONL "
           "(`EleutherAI/drop`), or `ucinlp/drop` rows (`answers_spans: {spans}`)", "drop (3 versions: stops at '.')",
           ("em", "f1"), "reading_comprehension", _drop_rows,
           stock_yaml="drop/default.yaml"),
]:
    register_format(_f)


def load_format(name: str, path: str | Path, limit: int | None = None) -> list[tuple[str, dict]]:
    """Normalised, checked rows of ``path`` in format ``name`` (first ``limit``)."""
    fmt = get_format(name)
    if fmt.rows is None:
        raise InputError(f"format {name!r} is not read from one file (see its input format: {fmt.input_format})")
    if not Path(path).is_file():
        raise InputError(f"{path}: file not found (format {name})")
    rows = fmt.rows(path)
    return rows[:limit] if limit is not None else rows
