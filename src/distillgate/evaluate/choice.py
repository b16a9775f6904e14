"""Native multiple-choice evaluation (acc, acc_norm like lm-eval) and loaders for local task files.

A task is a list of :class:`MCDoc`. A document is scored by the log-likelihood of each
``target_delimiter + choice`` after its ``context`` (:mod:`.scoring` does the batched, shared-prefix
work); ``acc`` takes the argmax of the sums, ``acc_norm`` of the sums divided by the choice's character
length (lm-eval's definition, where the length excludes the delimiter).

Prompt formats reproduce lm-eval 0.4.13 so numbers are comparable with published runs:

* COPA = ``super_glue/copa``: context ``premise[:-1] + " because"|" therefore"``, choices
  ``" " + lowercase-first(alternative)``, delimiter ``" "``. (lm-eval's default delimiter plus the leading
  space of its choices gives two spaces before each alternative; we keep that quirk on purpose: changing it
  changes scores.)
* MMLU = ``mmlu`` (default, 5-shot, ``first_n`` sampler over the dev split): description
  ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``, each shot
  ``"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}"``, shots joined by blank lines.
* JSONL: one object per line with ``context`` (or ``question``), ``choices`` (list) and ``label``
  (int index or the text of the right choice); optional ``target_delimiter``.
"""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .scoring import encode_pair, score_requests


@dataclass
class MCDoc:
    context: str
    choices: list[str]
    gold: int
    doc_id: str = ""
    target_delimiter: str = " "
    meta: dict = field(default_factory=dict)
    contexts: list[str] | None = None   # one context per choice (WinoGrande's partial scoring); then every
                                        # ``choices[j]`` is the same continuation, scored after ``contexts[j]``
    labels: list[int] | None = None     # several true answers (TruthfulQA MC2): the item scores the
                                        # normalised probability mass of the true ones


# ----------------------------------------------------------------------------------------------- loaders

def load_copa(path: str | Path, limit: int | None = None) -> list[MCDoc]:
    """COPA XML (``copa-dev.xml``) -> documents in file order, formatted like lm-eval's ``copa`` task."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise InputError(f"{path}: not a readable COPA XML file ({e})") from e
    docs = []
    for item in root.iter("item"):
        if limit is not None and len(docs) >= limit:
            break
        asks, gold = item.get("asks-for"), item.get("most-plausible-alternative")
        if asks not in ("cause", "effect") or gold not in ("1", "2"):
            raise InputError(f"{path}: item {item.get('id')}: asks-for={asks!r}, most-plausible-alternative="
                             f"{gold!r}; allowed: cause|effect and 1|2")
        premise, a1, a2 = (item.findtext(t, "").strip() for t in ("p", "a1", "a2"))
        docs.append(MCDoc(context=copa_context(premise, asks), choices=[copa_choice(a1), copa_choice(a2)],
                          gold=int(gold) - 1, doc_id=f"copa-{item.get('id')}", meta={"question": asks}))
    if not docs:
        raise InputError(f"{path}: no <item> elements found")
    return docs


def copa_context(premise: str, question: str) -> str:
    """lm-eval super_glue copa ``doc_to_text``: drop the premise's period, add the connector."""
    return premise.strip()[:-1] + {"cause": " because", "effect": " therefore"}[question]


def copa_choice(alternative: str) -> str:
    """lm-eval super_glue copa ``doc_to_choice`` element: leading space, first letter lower-cased."""
    return " " + alternative[0].lower() + alternative[1:]


def _read_mmlu_csv(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
    except OSError as e:
        raise InputError(f"{path}: cannot read MMLU CSV ({e})") from e
    for i, r in enumerate(rows):
        if len(r) != 6 or r[5] not in "ABCD" or len(r[5]) != 1:
            raise InputError(f"{path}: row {i + 1} has {len(r)} fields / answer {r[-1]!r}; allowed: "
                             "question,A,B,C,D,answer with answer in A-D")
    return rows


def mmlu_question(row: list[str]) -> str:
    """lm-eval mmlu ``doc_to_text`` for one CSV row."""
    q, a, b, c, d = row[:5]
    return f"{q.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def mmlu_subjects(data_dir: str | Path) -> list[str]:
    """Subjects with both a dev (few-shot) and a test file under ``<data_dir>/mmlu``."""
    root = Path(data_dir) / "mmlu"
    dev = {p.name[:-8] for p in (root / "dev").glob("*_dev.csv")}
    return sorted(p.name[:-9] for p in (root / "test").glob("*_test.csv") if p.name[:-9] in dev)


def load_mmlu(data_dir: str | Path, subject: str, limit: int | None = None, num_fewshot: int = 5) -> list[MCDoc]:
    """MMLU test questions of one subject with lm-eval's 5-shot prompt built from the dev exemplars."""
    root = Path(data_dir) / "mmlu"
    test_p, dev_p = root / "test" / f"{subject}_test.csv", root / "dev" / f"{subject}_dev.csv"
    for p in (test_p, dev_p):
        if not p.is_file():
            raise InputError(f"{p}: MMLU file not found (subjects here: {mmlu_subjects(data_dir)})")
    shots = _read_mmlu_csv(dev_p)[:num_fewshot]
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    header += "".join(f"{mmlu_question(r)} {r[5]}\n\n" for r in shots)
    rows = _read_mmlu_csv(test_p)[: limit if limit is not None else None]
    return [MCDoc(context=header + mmlu_question(r), choices=list("ABCD"), gold="ABCD".index(r[5]),
                  doc_id=f"mmlu-{subject}-{i}", meta={"subject": subject}) for i, r in enumerate(rows)]


def load_jsonl_mc(path: str | Path, limit: int | None = None) -> list[MCDoc]:
    """Generic multiple-choice JSONL: ``{"context"|"question", "choices": [...], "label": int|str}``."""
    path = Path(path)
    docs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if limit is not None and len(docs) >= limit:
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: invalid JSON ({e})") from e
        ctx = row.get("context", row.get("question"))
        choices, label = row.get("choices"), row.get("label")
        if not isinstance(ctx, str) or not isinstance(choices, list) or len(choices) < 2:
            raise InputError(f"{path}:{n}: needs 'context' (or 'question') text and 'choices' (list of >= 2)")
        if isinstance(label, str) and label in choices:
            label = choices.index(label)
        if not isinstance(label, int) or not 0 <= label < len(choices):
            raise InputError(f"{path}:{n}: label {label!r}; allowed: an index 0..{len(choices) - 1} or a choice")
        docs.append(MCDoc(context=ctx, choices=[str(c) for c in choices], gold=label,
                          doc_id=str(row.get("id", f"{path.stem}-{n}")),
                          target_delimiter=row.get("target_delimiter", " ")))
    if not docs:
        raise InputError(f"{path}: no documents")
    return docs


# ------------------------------------------------------------------------------------------------ scoring

def evaluate_mc(model, tokenizer, docs: list[MCDoc], *, batch_size: int = 8) -> dict:
    """Score documents; returns ``{acc, acc_stderr, acc_norm, acc_norm_stderr, n, per_doc}`` plus ``mc2`` and
    ``mc2_stderr`` when the documents carry ``labels``.

    ``per_doc[i] = {doc_id, gold, pred, pred_norm, loglikelihoods, correct[, mc2]}``. stderr is the sample
    standard error of the mean (lm-eval's ``mean_stderr``). Ties go to the first choice (``np.argmax``).
    """
    if not docs:
        raise InputError("evaluate_mc: no documents to score")
    reqs, owner = [], []
    for i, d in enumerate(docs):
        if d.contexts is not None:               # one request per choice: contexts differ
            for ctx, c in zip(d.contexts, d.choices):
                cenc, cont = encode_pair(tokenizer, ctx, d.target_delimiter + c)
                reqs.append((cenc, [cont]))
                owner.append(i)
            continue
        pairs = [encode_pair(tokenizer, d.context, d.target_delimiter + c) for c in d.choices]
        ctx = pairs[0][0]
        if any(p[0] != ctx for p in pairs):     # context tokenisation never depends on the choice, but check
            raise InputError(f"{d.doc_id}: context tokenises differently per choice")
        reqs.append((ctx, [p[1] for p in pairs]))
        owner.append(i)
    flat: list[list] = [[] for _ in docs]
    for i, sc in zip(owner, score_requests(model, reqs, batch_size=batch_size)):
        flat[i] += sc
    per_doc, acc, acc_norm, mc2 = [], [], [], []
    for d, sc in zip(docs, flat):
        lls = [s.logprob for s in sc]
        pred = max(range(len(lls)), key=lambda j: (lls[j], -j))              # first max, like np.argmax
        normed = [ll / len(c) for ll, c in zip(lls, d.choices)]
        pred_norm = max(range(len(normed)), key=lambda j: (normed[j], -j))
        acc.append(float(pred == d.gold))
        acc_norm.append(float(pred_norm == d.gold))
        item = {"doc_id": d.doc_id, "gold": d.gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls,
                "correct": pred == d.gold}
        if d.labels is not None:                 # lm-eval process_results_mc2, in float64
            top = max(lls)
            probs = [math.exp(ll - top) for ll in lls]
            item["mc2"] = sum(p for p, lab in zip(probs, d.labels) if lab == 1) / sum(probs)
            item["correct"] = item["mc2"] >= 0.5      # same rule as an lm-eval item's score
            mc2.append(item["mc2"])
        per_doc.append(item)
    out = {"acc": _mean(acc), "acc_stderr": _stderr(acc), "acc_norm": _mean(acc_norm),
           "acc_norm_stderr": _stderr(acc_norm), "n": len(docs), "per_doc": per_doc}
    if mc2:
        out.update(mc2=_mean(mc2), mc2_stderr=_stderr(mc2))
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _stderr(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
