"""Evaluation suites: named (``quick``, ``standard``) or a YAML file, run into a :class:`Scorecard`.

A suite is a list of task specs. Relative file paths resolve against ``data_dir`` (``--data-dir`` or
$DISTILLGATE_DATA). Suite YAML::

    name: my-suite
    tasks:
      - {type: perplexity, name: wikitext, file: wikitext2/valid.txt, max_tokens: 2048}
      - {type: minimal_pairs, name: blimp, files: "blimp/*.jsonl", limit: 50}
      - {type: choice, name: copa, loader: copa, file: copa/copa-dev.xml, limit: 40}
      - {type: choice, name: mine, loader: jsonl, file: /data/my_mc.jsonl, domain: finance_risk}
      - {type: choice, name: mmlu_marketing, loader: mmlu, subject: marketing, limit: 20}
      - {type: lm_eval, name: bbh, task: bbh, limit: 10}          # any lm-eval / local harness task
      - {type: teacher_kl, name: teacher_kl, file: wikitext2/valid.txt, max_tokens: 1024}

``teacher_kl`` runs only when a teacher is given. ``run_suite(..., limit=N)`` caps every task's limit.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..config import load_yaml, parse_config
from ..errors import ConfigError, InputError
from .metrics import Scorecard


class _Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="task name; metrics are '<name>/<metric>'")
    domain: str | None = Field(None, description="business domain the task stands for (optional)")
    limit: int | None = Field(None, ge=1, description="documents (per file / subject) to evaluate")


class PerplexityTask(_Task):
    type: Literal["perplexity"]
    file: str
    max_tokens: int = Field(2048, ge=16)
    window: int = Field(512, ge=2)
    stride: int = Field(256, ge=1)


class MinimalPairsTask(_Task):
    type: Literal["minimal_pairs"]
    files: str | list[str] = Field(description="JSONL file(s) or a glob")


class ChoiceTask(_Task):
    type: Literal["choice"]
    loader: Literal["copa", "mmlu", "jsonl"]
    file: str | None = None
    subject: str | None = Field(None, description="MMLU subject (loader=mmlu)")


class LmEvalTask(_Task):
    type: Literal["lm_eval"]
    task: str = Field(description="harness task: copa, mmlu[:subject], bbh[:task], gsm8k, mc:<file>, or a stock name")


class TeacherKLTask(_Task):
    type: Literal["teacher_kl"]
    file: str
    max_tokens: int = Field(1024, ge=16)
    seq_len: int = Field(256, ge=2)
    top_k: int | None = Field(256, ge=1)


TaskSpec = Annotated[Union[PerplexityTask, MinimalPairsTask, ChoiceTask, LmEvalTask, TeacherKLTask],
                     Field(discriminator="type")]


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


def load_suite(suite: str | os.PathLike | SuiteSpec) -> SuiteSpec:
    """A named suite, a suite YAML path, or a SuiteSpec -> validated SuiteSpec (ConfigError on bad fields)."""
    if isinstance(suite, SuiteSpec):
        return suite
    if str(suite) in SUITES:
        return parse_config(SuiteSpec, {"name": str(suite), "tasks": SUITES[str(suite)]})
    if not Path(suite).is_file():
        raise ConfigError("--suite", str(suite), f"one of {sorted(SUITES)} or a suite YAML file")
    data = load_yaml(suite)
    data.setdefault("name", Path(suite).stem)
    return parse_config(SuiteSpec, data)


def _path(p: str, data_dir: Path | None, task: str) -> Path:
    path = Path(p).expanduser()
    if not path.is_absolute():
        if data_dir is None:
            raise ConfigError("--data-dir", None, f"a folder holding {p} (task {task!r}; or set DISTILLGATE_DATA)")
        path = data_dir / path
    return path


def _cap(limit: int | None, cap: int | None) -> int | None:
    return cap if limit is None else (limit if cap is None else min(limit, cap))


def run_suite(model, tokenizer, suite: str | os.PathLike | SuiteSpec, *, teacher=None,
              data_dir: str | os.PathLike | None = None, limit: int | None = None, batch_size: int = 8,
              model_name: str = "") -> Scorecard:
    """Run every task of ``suite`` on ``model`` and return its Scorecard (``details`` keeps per-task extras
    and ``details[<task>]['seconds']``). ``teacher`` (a model on the same tokenizer) enables teacher_kl."""
    from .choice import evaluate_mc, load_copa, load_jsonl_mc, load_mmlu
    from .harness import default_data_dir, run_lm_eval
    from .lm import compare_to_teacher, minimal_pairs, perplexity, text_examples, _read_text

    spec = load_suite(suite)
    ddir = default_data_dir(data_dir)
    card = Scorecard(model=model_name, suite=spec.name)
    was_training = model.training
    model.eval()
    try:
        for t in spec.tasks:
            start = time.perf_counter()
            lim = _cap(t.limit, limit)
            if isinstance(t, PerplexityTask):
                r = perplexity(model, tokenizer, _path(t.file, ddir, t.name), max_tokens=t.max_tokens,
                               window=t.window, stride=t.stride)
                card.add(t.name, "ppl_token", r["ppl_token"], n=r["n_tokens"], domain=t.domain)
                card.add(t.name, "ppl_word", r["ppl_word"], n=r["n_words"], domain=t.domain)
                card.details[t.name] = {k: r[k] for k in ("nll_sum", "n_tokens", "n_words")}
            elif isinstance(t, MinimalPairsTask):
                pats = [t.files] if isinstance(t.files, str) else t.files
                files = sorted(f for p in pats for f in glob.glob(str(_path(p, ddir, t.name))))
                if not files:
                    raise InputError(f"task {t.name}: no files match {pats} under {ddir}")
                r = minimal_pairs(model, tokenizer, files, lim, batch_size=2 * batch_size)
                card.add(t.name, "accuracy", r["accuracy"], n=r["n"], domain=t.domain)
                card.details[t.name] = {"per_paradigm": r["per_paradigm"], "per_paradigm_n": r["per_paradigm_n"]}
            elif isinstance(t, ChoiceTask):
                if t.loader == "mmlu":
                    if not t.subject:
                        raise ConfigError(f"{t.name}.subject", None, "an MMLU subject (loader=mmlu)")
                    docs = load_mmlu(_path("", ddir, t.name), t.subject, lim)
                else:
                    if not t.file:
                        raise ConfigError(f"{t.name}.file", None, f"a file for loader={t.loader}")
                    docs = (load_copa if t.loader == "copa" else load_jsonl_mc)(_path(t.file, ddir, t.name), lim)
                r = evaluate_mc(model, tokenizer, docs, batch_size=batch_size)
                card.add(t.name, "acc", r["acc"], n=r["n"], stderr=r["acc_stderr"], domain=t.domain)
                card.add(t.name, "acc_norm", r["acc_norm"], n=r["n"], stderr=r["acc_norm_stderr"], domain=t.domain)
            elif isinstance(t, LmEvalTask):
                res = run_lm_eval(model, tokenizer, [t.task], data_dir=ddir, limit=lim, batch_size=batch_size)
                for sub, metrics in res.items():
                    name = t.name if len(res) == 1 else f"{t.name}_{sub.partition(':')[2] or sub}"
                    for m in ("acc", "acc_norm", "exact_match"):
                        if m in metrics:
                            card.add(name, m, metrics[m], n=metrics["n"], stderr=metrics.get(f"{m}_stderr"),
                                     domain=t.domain)
            elif isinstance(t, TeacherKLTask):
                if teacher is None:
                    continue
                text = _read_text(_path(t.file, ddir, t.name))
                exs = text_examples(tokenizer, text, t.seq_len, t.max_tokens)
                r = compare_to_teacher(model, teacher, exs, batch_size=batch_size, top_k=t.top_k,
                                       pad_id=tokenizer.pad_token_id or 0)
                for m in ("kl_forward_mean", "kl_reverse_mean", "top1_agreement"):
                    card.add(t.name, m, r[m], n=r["n_tokens"], domain=t.domain)
                card.details[t.name] = {"top_k": t.top_k, "exact": r["exact"]}
            card.details.setdefault(t.name, {})["seconds"] = round(time.perf_counter() - start, 2)
    finally:
        model.train(was_training)
    return card
