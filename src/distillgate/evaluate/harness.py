"""lm-evaluation-harness as a library, on an in-memory model and on local task files.

``run_lm_eval(model, tokenizer, ["copa", "mmlu:anatomy", "bbh", "gsm8k"], data_dir=...)`` wraps the model in
``lm_eval.models.huggingface.HFLM`` and calls ``lm_eval.simple_evaluate``. Local task names are rendered from
the templates shipped in ``distillgate/tasks/`` into a temporary ``include_path`` folder, after converting
the source files (COPA XML, MMLU CSV, BBH JSON, GSM8K JSONL) to JSONL; nothing is downloaded
(``HF_DATASETS_OFFLINE=1``). Any other name (e.g. ``hellaswag``) is passed through as a stock lm-eval task,
which needs the hub or a warm datasets cache.

Local names: ``copa``; ``mmlu`` (every subject with dev+test CSVs) or ``mmlu:<subject>``; ``bbh`` (every
task file) or ``bbh:<task>``; ``gsm8k``; ``mc:<path.jsonl>`` (a user's multiple-choice file, see
:func:`distillgate.evaluate.choice.load_jsonl_mc`). A user points a task at their own file with
``copa:/path/to/copa.xml`` or ``gsm8k:/path/to/test.jsonl`` (same formats as the shared datasets).
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path

import yaml

from ..errors import ConfigError, InputError
from .choice import _read_mmlu_csv, load_copa, load_jsonl_mc, mmlu_subjects

LOCAL_FAMILIES = ("copa", "mmlu", "bbh", "gsm8k", "mc")


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """``data_dir`` if given, else $DISTILLGATE_DATA, else None (the product never assumes a path)."""
    d = data_dir or os.environ.get("DISTILLGATE_DATA")
    return Path(d) if d else None


def _template(name: str) -> dict:
    # package data (pyproject: tasks/**/*); tasks/ is a data folder, not a Python package
    return yaml.safe_load(resources.files("distillgate").joinpath("tasks", name).read_text())


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _need(data_dir: Path | None, rel: str, task: str) -> Path:
    if data_dir is None:
        raise ConfigError("--data-dir", None, f"a folder holding {rel} (task {task!r}; or set DISTILLGATE_DATA)")
    p = data_dir / rel
    if not p.exists():
        raise InputError(f"{p}: needed by task {task!r} but not found under data dir {data_dir}")
    return p


def expand_task(name: str, data_dir: Path | None) -> list[str]:
    """Expand family names (``mmlu``, ``bbh``) into their members; other names are returned unchanged."""
    if name == "mmlu":
        subjects = mmlu_subjects(_need(data_dir, "mmlu", name).parent)
        return [f"mmlu:{s}" for s in subjects]
    if name == "bbh":
        return [f"bbh:{p.stem}" for p in sorted(_need(data_dir, "bbh", name).glob("*.json"))]
    return [name]


def render_task(name: str, data_dir: Path | None, workdir: Path) -> str | None:
    """Write the lm-eval YAML (and its JSONL data) for a local task into ``workdir``; return the lm-eval
    task name, or None when ``name`` is not a local task (then it is a stock lm-eval task)."""
    family, _, arg = name.partition(":")
    if family not in LOCAL_FAMILIES:
        return None
    if family == "copa":
        src = Path(arg) if arg else _need(data_dir, "copa/copa-dev.xml", name)
        rows = [{"context": d.context, "choices": d.choices, "label": d.gold} for d in load_copa(src)]
        cfg = _template("copa.yaml")
        cfg["dataset_kwargs"]["data_files"]["validation"] = _write_jsonl(workdir / "copa.jsonl", rows)
    elif family == "mc":
        if not arg:
            raise ConfigError("task", name, "mc:<path to a multiple-choice JSONL file>")
        docs = load_jsonl_mc(arg)
        delims = {d.target_delimiter for d in docs}
        if len(delims) != 1:
            raise InputError(f"{arg}: lm-eval needs one target_delimiter per task, file has {sorted(delims)}")
        rows = [{"context": d.context, "choices": d.choices, "label": d.gold} for d in docs]
        cfg = _template("mc_jsonl.yaml")
        cfg["target_delimiter"] = delims.pop()
        cfg["task"] = "dg_mc_" + _slug(Path(arg).stem)
        cfg["dataset_kwargs"]["data_files"]["validation"] = _write_jsonl(workdir / f"{cfg['task']}.jsonl", rows)
    elif family == "mmlu":
        if not arg:
            raise ConfigError("task", name, "mmlu or mmlu:<subject>")
        files = {}
        for split in ("test", "dev"):
            rows = [{"question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5])}
                    for r in _read_mmlu_csv(_need(data_dir, f"mmlu/{split}/{arg}_{split}.csv", name))]
            files[split] = _write_jsonl(workdir / f"mmlu_{arg}_{split}.jsonl", rows)
        cfg = _template("mmlu.yaml")
        cfg["task"] = f"dg_mmlu_{arg}"
        cfg["description"] = f"The following are multiple choice questions (with answers) about {arg.replace('_', ' ')}.\n\n"
        cfg["dataset_kwargs"]["data_files"] = files
    elif family == "bbh":
        src = _need(data_dir, f"bbh/{arg}.json", name)
        cfg = _template("bbh.yaml")
        cfg["task"] = f"dg_bbh_{arg}"
        cfg["dataset_kwargs"]["data_files"]["test"] = str(src)
    else:  # gsm8k
        src = Path(arg) if arg else _need(data_dir, "gsm8k/test.jsonl", name)
        cfg = _template("gsm8k.yaml")
        cfg["dataset_kwargs"]["data_files"]["test"] = str(src)
    (workdir / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return cfg["task"]


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)


def run_lm_eval(model, tokenizer, tasks: list[str], *, data_dir: str | os.PathLike | None = None,
                limit: int | None = None, batch_size: int = 8, log_samples: bool = False) -> dict:
    """Evaluate ``model`` with lm-eval on ``tasks``; returns ``{our_task_name: {metric: value, ...}}``.

    Metric keys are lm-eval's without the filter suffix (``acc``, ``acc_stderr``, ``exact_match``, ...),
    plus ``n`` (documents scored) and ``lm_eval_task`` (the task name lm-eval ran).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ddir = default_data_dir(data_dir)
    names = [t for name in tasks for t in expand_task(name, ddir)]
    with tempfile.TemporaryDirectory(prefix="distillgate-tasks-") as tmp:
        mapping = {}
        for name in names:
            mapping[name] = render_task(name, ddir, Path(tmp)) or name
        tm = TaskManager(include_path=tmp)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(mapping.values()), limit=limit, task_manager=tm,
                                      log_samples=log_samples, bootstrap_iters=100, verbosity="WARNING")
    results = {}
    for ours, theirs in mapping.items():
        raw = out["results"].get(theirs)
        if raw is None:
            raise InputError(f"lm-eval returned no result for task {theirs!r} (asked as {ours!r})")
        metrics = {}
        for key, value in raw.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            metric, _, _filter = key.partition(",")
            metrics[metric] = float(value)
        metrics["n"] = int(out.get("n-samples", {}).get(theirs, {}).get("effective", 0))
        metrics["lm_eval_task"] = theirs
        results[ours] = metrics
    return results
