"""Evaluation suites: named (``quick``, ``standard``), a suite YAML file, or one ``FORMAT:FILE`` line, run
into a :class:`Scorecard` with per-item results.

A suite is a list of task specs (the fields are in the README's evaluation reference, generated from these
models). Every path follows one rule (:func:`~distillgate.evaluate.harness.resolve_path`): relative to
``data_dir`` (``--data-dir`` or $DISTILLGATE_DATA) when one is set, else to the current folder. Suite YAML::

    name: my-suite
    tasks:
      - {type: perplexity, name: wikitext, file: wikitext2/valid.txt, max_tokens: 2048}
      - {type: minimal_pairs, name: blimp, files: "blimp/*.jsonl", limit: 50}
      - {type: choice, name: copa, loader: copa, file: copa/copa-dev.xml, limit: 40}
      - {type: choice, name: hs, loader: hellaswag, file: /data/hellaswag_val.jsonl, capability: commonsense}
      - {type: choice, name: mmlu_marketing, loader: mmlu, subject: marketing, limit: 20}
      - {type: loglikelihood, name: lambada, loader: lambada, file: lambada_test.jsonl}
      - {type: lm_eval, name: bbh, task: bbh, limit: 10}          # any harness task, see harness.py
      - {type: lm_eval, name: mine, task: my_tasks/my_task.yaml, include_path: my_tasks/common}
      - {type: teacher_kl, name: teacher_kl, file: wikitext2/valid.txt, max_tokens: 1024}
      - truthfulqa_mc2:/data/mc_task.json                          # the one-line FORMAT:FILE form

``--suite FORMAT:FILE`` (``mmlu:SUBJECT``, ``lm_eval:TASK``) is a one-task suite. ``teacher_kl`` runs only
when a teacher is given. ``run_suite(..., limit=N)`` caps every task's limit.

Order of work: :func:`prepare_suite` reads and checks every task's data (all errors reported at once, each
naming the task, file, line and what is allowed) before any model is touched; then each task runs, and a task
that fails is recorded in ``card.errors`` (the card is marked ``partial``) while the others still run.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import parse_config
from ..errors import ConfigError, DistillgateError, InputError
from .formats import FORMATS
from .metrics import Scorecard, ensure_metric

log = logging.getLogger(__name__)

CHOICE_LOADERS = tuple(sorted(n for n, f in FORMATS.items() if f.kind == "choice"))
LL_LOADERS = tuple(sorted(n for n, f in FORMATS.items() if f.kind == "loglikelihood"))


class _Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="task name; metrics are '<name>/<metric>'")
    domain: str | None = Field(None, description="business domain the task stands for (optional)")
    capability: str | None = Field(None, description="capability tag of the task's items, used by the "
                                                     "teacher-vs-student diff (default: the format's)")
    limit: int | None = Field(None, ge=1, description="documents (per file / subject) to evaluate")


class PerplexityTask(_Task):
    type: Literal["perplexity"] = Field(description="perplexity of a text file")
    file: str = Field(description="plain text file (mode documents: also JSONL of {\"page\": ...})")
    mode: Literal["windows", "documents"] = Field(
        "windows", description="windows: the first max_tokens in strided windows (ppl_token, ppl_word); "
                               "documents: lm-eval's wikitext, each document rolled over the model's window "
                               "(word_perplexity, byte_perplexity, bits_per_byte; limit = documents)")
    max_tokens: int = Field(2048, ge=16, description="tokens of the file evaluated (mode windows)")
    window: int = Field(512, ge=2, description="tokens per window (mode windows)")
    stride: int = Field(256, ge=1, description="tokens between window starts (mode windows)")
    detokenize: bool = Field(True, description="mode documents: apply lm-eval's WikiText detokenizer first")


class MinimalPairsTask(_Task):
    type: Literal["minimal_pairs"] = Field(description="BLiMP minimal pairs: P(good) >= P(bad)")
    files: str | list[str] = Field(description="BLiMP JSONL file(s) or a glob; limit is per file")


class ChoiceTask(_Task):
    type: Literal["choice"] = Field(description="native multiple choice (acc/acc_norm like lm-eval)")
    loader: str = Field(description=f"file format: {', '.join(CHOICE_LOADERS)}")
    file: str | None = Field(None, description="the benchmark file (every loader but mmlu)")
    subject: str | None = Field(None, description="MMLU subject (loader=mmlu; reads <data>/mmlu/{dev,test})")

    @field_validator("loader")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in CHOICE_LOADERS:
            raise ValueError(f"one of {', '.join(CHOICE_LOADERS)}")
        return v


class LoglikelihoodTask(_Task):
    type: Literal["loglikelihood"] = Field(description="target log-likelihood + greedy match (LAMBADA)")
    loader: Literal[LL_LOADERS] = Field(description="file format")  # type: ignore[valid-type]
    file: str = Field(description="the benchmark file")


class LmEvalTask(_Task):
    type: Literal["lm_eval"] = Field(description="run through lm-evaluation-harness")
    task: str = Field(description="copa[:FILE], mmlu[:subject], bbh[:task|FILE], gsm8k[:FILE], mc:FILE, "
                                  "FORMAT:FILE (a format with a stock task), a task YAML path, or a stock name")
    include_path: str | list[str] | None = Field(None, description="extra folder(s) of lm-eval task YAML")


class TeacherKLTask(_Task):
    type: Literal["teacher_kl"] = Field(description="held-out KL and top-1 agreement against the teacher")
    file: str = Field(description="plain text file")
    max_tokens: int = Field(1024, ge=16, description="tokens of the file evaluated")
    seq_len: int = Field(256, ge=2, description="tokens per example")
    top_k: int | None = Field(256, ge=1, description="teacher top-k kept (None: exact KL)")


TASK_TYPES = (PerplexityTask, MinimalPairsTask, ChoiceTask, LoglikelihoodTask, LmEvalTask, TeacherKLTask)
TaskSpec = Annotated[Union[PerplexityTask, MinimalPairsTask, ChoiceTask, LoglikelihoodTask, LmEvalTask,
                           TeacherKLTask], Field(discriminator="type")]


class SuiteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    tasks: list[TaskSpec] = Field(min_length=1)


_QUICK = [
    {"type": "perplexity", "name": "wikitext", "file": "wikitext2/valid.txt", "max_tokens": 2048},
    {"type": "minimal_pairs", "name": "blimp", "files": "blimp/*.jsonl", "limit": 50},
    {"type": "choice", "name": "copa", "loader": "copa", "file": "copa/copa-dev.xml", "limit": 40},
    {"type": "teacher_kl", "name": "teacher_kl", "file": "wikitext2/valid.txt", "max_tokens": 1024},
]
SUITES = {
    "quick": _QUICK,
    "standard": _QUICK + [
        {"type": "lm_eval", "name": "mmlu", "task": "mmlu", "limit": 20},
        {"type": "lm_eval", "name": "bbh", "task": "bbh", "limit": 10},
        {"type": "lm_eval", "name": "gsm8k", "task": "gsm8k", "limit": 10},
    ],
}


def task_from_line(line: str) -> dict:
    """``FORMAT:FILE`` (``mmlu:SUBJECT``, ``lm_eval:TASK``; ``mc:FILE`` = ``jsonl:FILE``) -> one task spec dict
    (not yet validated)."""
    fmt, sep, arg = line.partition(":")
    if not sep or not arg:
        raise ConfigError("--suite", line, f"quick, standard, a suite YAML file, or FORMAT:FILE with FORMAT one of "
                                           f"{', '.join(sorted(FORMATS))} (or lm_eval:TASK)")
    if fmt == "mc":                     # the harness's name for the generic multiple-choice JSONL
        fmt = "jsonl"
    if fmt == "lm_eval":
        return {"type": "lm_eval", "name": Path(arg).stem if arg.endswith((".yaml", ".yml")) else arg.split(":")[0],
                "task": arg}
    if fmt not in FORMATS:
        raise ConfigError("--suite", line, f"FORMAT:FILE with FORMAT one of {', '.join(sorted(FORMATS))} "
                                           "(or lm_eval:TASK)")
    kind = FORMATS[fmt].kind
    if kind == "choice":
        return {"type": "choice", "name": fmt, "loader": fmt, **({"subject": arg} if fmt == "mmlu" else {"file": arg})}
    if kind == "pairs":
        return {"type": "minimal_pairs", "name": fmt, "files": arg}
    if kind == "loglikelihood":
        return {"type": "loglikelihood", "name": fmt, "loader": fmt, "file": arg}
    if kind == "perplexity":
        return {"type": "perplexity", "name": fmt, "file": arg}
    return {"type": "lm_eval", "name": fmt, "task": f"{fmt}:{arg}"}


def load_suite(suite: str | os.PathLike | SuiteSpec) -> SuiteSpec:
    """A named suite, a suite YAML path, a ``FORMAT:FILE`` line, or a SuiteSpec -> validated SuiteSpec
    (ConfigError naming the suite file and field on a bad one)."""
    import yaml

    if isinstance(suite, SuiteSpec):
        return suite
    if str(suite) in SUITES:
        return parse_config(SuiteSpec, {"name": str(suite), "tasks": SUITES[str(suite)]})
    p = Path(suite)
    if not p.is_file():
        if ":" in str(suite):
            return _parse(str(suite), {"name": str(suite).partition(":")[0], "tasks": [task_from_line(str(suite))]})
        raise ConfigError("--suite", str(suite), f"one of {sorted(SUITES)}, a suite YAML file, or FORMAT:FILE")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError("--suite", str(suite), f"a readable YAML file ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError("--suite", str(suite), f"a suite YAML mapping with a 'tasks:' list (this file holds "
                                                 f"{type(data).__name__})")
    data.setdefault("name", p.stem)
    if isinstance(data.get("tasks"), list):
        data["tasks"] = [task_from_line(t) if isinstance(t, str) else t for t in data["tasks"]]
    return _parse(str(suite), data)


def _parse(where: str, data: dict) -> SuiteSpec:
    try:
        return parse_config(SuiteSpec, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e.field}", e.value, e.allowed) from None


def _cap(limit: int | None, cap: int | None) -> int | None:
    return cap if limit is None else (limit if cap is None else min(limit, cap))


# ------------------------------------------------------------------------------------------ prepare / run

@dataclass
class PreparedTask:
    spec: Any
    capability: str
    data: Any = None          # what the task's scorer takes (docs, rows, paths, task names)
    extra: dict = field(default_factory=dict)


def prepare_suite(suite: str | os.PathLike | SuiteSpec, data_dir: str | os.PathLike | None = None,
                  limit: int | None = None) -> list[PreparedTask]:
    """Read and check every task's data; raise one InputError listing every task that is wrong (each message
    names the task, file, line and what is allowed). No model is needed."""
    from .harness import default_data_dir

    spec = load_suite(suite)
    ddir = default_data_dir(data_dir)
    out, errors = [], []
    for t in spec.tasks:
        try:
            out.append(_prepare(t, ddir, _cap(t.limit, limit)))
        except DistillgateError as e:
            errors.append(f"task {t.name!r} ({t.type}): {e}")
    if errors:
        raise InputError(f"suite {spec.name!r}: {len(errors)} of {len(spec.tasks)} task(s) have unusable data, "
                         "nothing was run:\n  - " + "\n  - ".join(errors))
    return out


def _default_cap(t) -> str:
    if isinstance(t, (ChoiceTask, LoglikelihoodTask)):
        return FORMATS[t.loader].capability
    if isinstance(t, LmEvalTask):
        fam = t.task.partition(":")[0]
        return FORMATS[fam].capability if fam in FORMATS else t.name
    return {PerplexityTask: "language_modelling", MinimalPairsTask: "grammar", TeacherKLTask: "teacher_match"}[type(t)]


def _prepare(t, ddir: Path | None, lim: int | None) -> PreparedTask:
    from .choice import load_mmlu
    from .formats import load_format
    from .harness import check_task, resolve_path
    from .lm import _read_text

    cap = t.capability or _default_cap(t)
    if isinstance(t, PerplexityTask) and t.mode == "documents":
        return PreparedTask(t, cap, [r["page"] for _, r in load_format("wikitext", resolve_path(t.file, ddir, t.name),
                                                                       lim)])
    if isinstance(t, (PerplexityTask, TeacherKLTask)):
        path = resolve_path(t.file, ddir, t.name)
        text = _read_text(path)
        if not text.strip():
            raise InputError(f"{path}: empty text file; allowed: plain text to score")
        return PreparedTask(t, cap, path)
    if isinstance(t, MinimalPairsTask):
        pats = [t.files] if isinstance(t.files, str) else t.files
        files = sorted(f for p in pats for f in glob.glob(str(resolve_path(p, ddir, t.name))))
        if not files:
            raise InputError(f"no files match {pats} (relative to {ddir or Path.cwd()})")
        return PreparedTask(t, cap, [r for f in files for r in load_format("blimp", f, lim)])
    if isinstance(t, ChoiceTask):
        if t.loader == "mmlu":
            if not t.subject:
                raise ConfigError(f"{t.name}.subject", None, "an MMLU subject (loader=mmlu)")
            return PreparedTask(t, cap, load_mmlu(resolve_path("", ddir, t.name), t.subject, lim))
        if not t.file:
            raise ConfigError(f"{t.name}.file", None, f"a file for loader={t.loader}")
        fmt = FORMATS[t.loader]
        return PreparedTask(t, cap, fmt.docs(load_format(t.loader, resolve_path(t.file, ddir, t.name), lim)))
    if isinstance(t, LoglikelihoodTask):
        return PreparedTask(t, cap, load_format(t.loader, resolve_path(t.file, ddir, t.name), lim))
    if isinstance(t, LmEvalTask):
        inc = [t.include_path] if isinstance(t.include_path, str) else (t.include_path or [])
        inc = [resolve_path(p, ddir, t.name) for p in inc]
        check_task(t.task, ddir, inc)
        return PreparedTask(t, cap, t.task, {"include_path": inc})
    raise ConfigError("type", type(t).__name__, "a known task type")


def run_suite(model, tokenizer, suite: str | os.PathLike | SuiteSpec | list[PreparedTask], *, teacher=None,
              data_dir: str | os.PathLike | None = None, limit: int | None = None, batch_size: int = 8,
              model_name: str = "", card: Scorecard | None = None) -> Scorecard:
    """Run every task of ``suite`` (or of an already :func:`prepare_suite`-d list) on ``model``.

    Returns the Scorecard: metrics, and per task ``details[<task>]`` with ``seconds``, ``capability`` and
    ``items`` (per item ``{doc_id, correct, pred, gold, loglikelihoods, tags}``; the teacher-vs-student diff
    reads them). A task that raises is recorded in ``card.errors[<task>]`` and ``card.partial`` is set; the
    other tasks still run. Pass ``card`` to have it filled in place (so a caller interrupted mid-suite keeps
    what finished). ``teacher`` (a model on the same tokenizer) enables teacher_kl.
    """
    from .harness import default_data_dir

    ddir = default_data_dir(data_dir)
    if isinstance(suite, list):
        prepared, name = suite, "custom"
    else:
        spec = load_suite(suite)
        prepared, name = prepare_suite(spec, ddir, limit), spec.name
    card = card if card is not None else Scorecard()
    card.model, card.suite = card.model or model_name, card.suite or name
    was_training = model.training
    model.eval()
    try:
        for p in prepared:
            t = p.spec
            if isinstance(t, TeacherKLTask) and teacher is None:
                continue
            start = time.perf_counter()
            try:
                items = _run_task(card, p, model, tokenizer, teacher, ddir, _cap(t.limit, limit), batch_size)
            except Exception as e:   # noqa: BLE001  a failing task must not lose the others' results
                log.debug("task %s failed", t.name, exc_info=True)
                card.errors[t.name] = f"{type(e).__name__}: {e}"
                card.partial = True
                continue
            d = card.details.setdefault(t.name, {})
            d.update(seconds=round(time.perf_counter() - start, 2), capability=p.capability)
            if items is not None:
                d["items"] = [_item(x, p.capability) for x in items]
    finally:
        model.train(was_training)
    return card


def _item(x: dict, capability: str) -> dict:
    """A per-item record with the keys every scorer shares; ``tags`` starts with the capability."""
    tags = [capability] + [t for t in x.get("tags", []) if t != capability]
    out = {"doc_id": str(x["doc_id"]), "correct": bool(x["correct"]), "pred": x.get("pred"), "gold": x.get("gold"),
           "tags": tags}
    for k in ("loglikelihoods", "score", "mc2"):
        if k in x:
            out[k] = x[k]
    return out


def _run_task(card: Scorecard, p: PreparedTask, model, tokenizer, teacher, ddir, lim, batch_size):
    """Score one prepared task into ``card``; returns its per-item records (None for corpus-level tasks)."""
    from .choice import evaluate_mc
    from .harness import run_lm_eval
    from .lm import (_read_text, compare_to_teacher, document_perplexity, perplexity, score_last_word,
                     score_minimal_pairs, text_examples)

    t = p.spec
    if isinstance(t, PerplexityTask) and t.mode == "documents":
        r = document_perplexity(model, tokenizer, p.data, detokenize=t.detokenize, batch_size=batch_size)
        for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            card.add(t.name, m, r[m], n=len(p.data), domain=t.domain)
        card.details[t.name] = {k: r[k] for k in ("nll_sum", "n_words", "n_bytes", "n_tokens")}
        card.details[t.name]["per_document"] = r["per_doc"]
        return None
    if isinstance(t, PerplexityTask):
        r = perplexity(model, tokenizer, p.data, max_tokens=t.max_tokens, window=t.window, stride=t.stride)
        card.add(t.name, "ppl_token", r["ppl_token"], n=r["n_tokens"], domain=t.domain)
        card.add(t.name, "ppl_word", r["ppl_word"], n=r["n_words"], domain=t.domain)
        card.details[t.name] = {k: r[k] for k in ("nll_sum", "n_tokens", "n_words")}
        return None
    if isinstance(t, MinimalPairsTask):
        r = score_minimal_pairs(model, tokenizer, p.data, batch_size=2 * batch_size)
        card.add(t.name, "accuracy", r["accuracy"], n=r["n"], domain=t.domain)
        card.details[t.name] = {"per_paradigm": r["per_paradigm"], "per_paradigm_n": r["per_paradigm_n"]}
        return r["per_doc"]
    if isinstance(t, ChoiceTask):
        r = evaluate_mc(model, tokenizer, p.data, batch_size=batch_size)
        for m in FORMATS[t.loader].metrics:
            card.add(t.name, m, r[m], n=r["n"], stderr=r.get(f"{m}_stderr"), domain=t.domain)
        for d, item in zip(p.data, r["per_doc"]):
            item["tags"] = [f"{k}:{v}" for k, v in d.meta.items()]
        return r["per_doc"]
    if isinstance(t, LoglikelihoodTask):
        r = score_last_word(model, tokenizer, p.data, batch_size=batch_size)
        card.add(t.name, "acc", r["acc"], n=r["n"], stderr=r["acc_stderr"], domain=t.domain)
        card.add(t.name, "perplexity", r["perplexity"], n=r["n"], domain=t.domain)
        return r["per_doc"]
    if isinstance(t, LmEvalTask):
        res = run_lm_eval(model, tokenizer, [t.task], data_dir=ddir, limit=lim, batch_size=batch_size,
                          log_samples=True, include_path=p.extra["include_path"])
        items = []
        for sub, metrics in res.items():
            name = t.name if len(res) == 1 else f"{t.name}_{_slug_sub(sub)}"
            hib = metrics.get("higher_is_better", {})
            for m, v in metrics.items():
                if m in ("n", "lm_eval_task", "higher_is_better", "items") or m.endswith("_stderr"):
                    continue
                ensure_metric(m, hib.get(m, True))
                card.add(name, m, v, n=metrics["n"], stderr=metrics.get(f"{m}_stderr"), domain=t.domain)
            for it in metrics.get("items", []):
                it["tags"] = [f"task:{name}"]
                items.append(it)
        return items
    if isinstance(t, TeacherKLTask):
        exs = text_examples(tokenizer, _read_text(p.data), t.seq_len, t.max_tokens)
        r = compare_to_teacher(model, teacher, exs, batch_size=batch_size, top_k=t.top_k,
                               pad_id=tokenizer.pad_token_id or 0)
        for m in ("kl_forward_mean", "kl_reverse_mean", "top1_agreement"):
            card.add(t.name, m, r[m], n=r["n_tokens"], domain=t.domain)
        card.details[t.name] = {"top_k": t.top_k, "exact": r["exact"]}
        return None
    raise ConfigError("type", type(t).__name__, "a known task type")


def _slug_sub(sub: str) -> str:
    """``mmlu:marketing`` -> ``marketing``; ``my.yaml:dg_x`` -> ``dg_x``; plain names unchanged."""
    return sub.rpartition(":")[2] or sub
