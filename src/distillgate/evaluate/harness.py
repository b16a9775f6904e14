"""lm-evaluation-harness as a library, on an in-memory model and on local task files.

``run_lm_eval(model, tokenizer, ["copa", "mmlu:anatomy", "bbh", "gsm8k"], data_dir=...)`` wraps the model in
``lm_eval.models.huggingface.HFLM`` and calls ``lm_eval.simple_evaluate``. Task names (checked by
:func:`check_task` before any model loads):

* local families rendered from the templates in ``distillgate/tasks/`` into a temporary ``include_path``
  folder, after converting the source files to JSONL: ``copa[:FILE]``; ``mmlu`` (every subject with dev+test
  CSVs) or ``mmlu:<subject>``; ``bbh`` (every task file), ``bbh:<task>`` or ``bbh:FILE``; ``gsm8k[:FILE]``;
  ``mc:FILE`` (a user's multiple-choice JSONL, :func:`distillgate.evaluate.choice.load_jsonl_mc`);
* ``FORMAT:FILE`` for a format of :mod:`.formats` with a stock task (hellaswag, arc, piqa, winogrande, boolq,
  sciq, openbookqa, truthfulqa_mc1/mc2, lambada, drop): the file is normalised to the HF dataset's rows and
  lm-eval's own stock task YAML is ``include``d with ``dataset_path: json``, so the prompt, filters and
  metrics are lm-eval's;
* a path to a user's own lm-eval task YAML (``*.yaml``; its folder and ``include_path`` are searched for what
  it includes); its task, or every subtask of its group, comes back;
* any other name is a stock lm-eval task, which reads the hub (or a warm datasets cache).

Relative FILE paths resolve against ``data_dir`` when one is given, else the current folder (one rule for
every task type; see :func:`resolve_path`). Nothing is downloaded for local tasks (``HF_DATASETS_OFFLINE=1``).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import tempfile
from importlib import resources
from pathlib import Path

import yaml

from ..errors import ConfigError, InputError
from .choice import _read_mmlu_csv, load_copa, load_jsonl_mc, mmlu_subjects
from .formats import FORMATS, load_format

LOCAL_FAMILIES = ("copa", "mmlu", "bbh", "gsm8k", "mc")
STOCK_FORMATS = tuple(sorted(n for n, f in FORMATS.items() if f.stock_yaml))   # FORMAT:FILE via the stock YAML


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


def resolve_path(p: str | os.PathLike, data_dir: Path | None, task: str, must_exist: bool = True) -> Path:
    """The one path rule of every task: absolute paths as given; relative ones against ``data_dir``
    (``--data-dir`` / $DISTILLGATE_DATA) when set, else against the current folder."""
    path = Path(p).expanduser()
    relative = not path.is_absolute()
    if relative:
        path = (data_dir if data_dir is not None else Path.cwd()) / path
    if must_exist and not glob.has_magic(str(path)) and not path.exists():
        if not relative:
            raise InputError(f"{path}: needed by task {task!r} but not found")
        if data_dir is None:
            raise ConfigError("--data-dir", None, f"a folder holding {p} (task {task!r}: not in the current folder "
                                                  f"{Path.cwd()}; relative paths resolve against --data-dir or "
                                                  "$DISTILLGATE_DATA when set)")
        raise InputError(f"{path}: needed by task {task!r} but not found (relative paths resolve against the "
                         f"data dir {data_dir})")
    return path


def _need(data_dir: Path | None, rel: str, task: str) -> Path:
    return resolve_path(rel, data_dir, task)


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
    task name, or None when ``name`` is not a local task (a user's YAML or a stock lm-eval task)."""
    family, _, arg = name.partition(":")
    if family in STOCK_FORMATS and arg:       # bare 'hellaswag' is the stock task (hub)
        src = resolve_path(arg, data_dir, name)
        rows = [r for _, r in load_format(family, src)]
        task = f"dg_{family}_{_slug(src.stem)}"
        import lm_eval.tasks

        stock = Path(lm_eval.tasks.__file__).parent / FORMATS[family].stock_yaml
        cfg = {"include": str(stock), "task": task, "tag": None, "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": {"test": _write_jsonl(workdir / f"{task}.jsonl", rows)},
                                  "cache_dir": str(workdir / "hf_datasets")},
               "training_split": None, "validation_split": None, "test_split": "test", "fewshot_split": None}
        (workdir / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        return task
    if family not in LOCAL_FAMILIES:
        return None
    if family == "copa":
        src = resolve_path(arg, data_dir, name) if arg else _need(data_dir, "copa/copa-dev.xml", name)
        rows = [{"context": d.context, "choices": d.choices, "label": d.gold} for d in load_copa(src)]
        cfg = _template("copa.yaml")
        cfg["dataset_kwargs"]["data_files"]["validation"] = _write_jsonl(workdir / "copa.jsonl", rows)
    elif family == "mc":
        if not arg:
            raise ConfigError("task", name, "mc:<path to a multiple-choice JSONL file>")
        src = resolve_path(arg, data_dir, name)
        docs = load_jsonl_mc(src)
        delims = {d.target_delimiter for d in docs}
        if len(delims) != 1:
            raise InputError(f"{src}: lm-eval needs one target_delimiter per task, file has {sorted(delims)}")
        rows = [{"context": d.context, "choices": d.choices, "label": d.gold} for d in docs]
        cfg = _template("mc_jsonl.yaml")
        cfg["target_delimiter"] = delims.pop()
        cfg["task"] = "dg_mc_" + _slug(src.stem)
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
        src = (resolve_path(arg, data_dir, name) if arg.endswith(".json") else _need(data_dir, f"bbh/{arg}.json", name))
        load_format("bbh", src)                      # checked here: lm-eval would fail on it mid-run
        cfg = _template("bbh.yaml")
        cfg["task"] = f"dg_bbh_{_slug(src.stem)}"
        cfg["dataset_kwargs"]["data_files"]["test"] = str(src)
    else:  # gsm8k
        src = resolve_path(arg, data_dir, name) if arg else _need(data_dir, "gsm8k/test.jsonl", name)
        load_format("gsm8k", src)
        cfg = _template("gsm8k.yaml")
        cfg["dataset_kwargs"]["data_files"]["test"] = str(src)
    # datasets' cache of these JSON files lives and dies with the temporary folder, not in ~/.cache
    cfg["dataset_kwargs"]["cache_dir"] = str(workdir / "hf_datasets")
    (workdir / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return cfg["task"]


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)


class _TagTolerantLoader(yaml.SafeLoader):
    """Reads lm-eval task YAML (``!function module.fn`` tags) just to learn its task/group name."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def user_task_yaml(path: Path) -> str:
    """The task (or group) name a user's lm-eval task YAML defines; InputError naming the file otherwise."""
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TagTolerantLoader)
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"{path}: not a readable lm-eval task YAML ({e})") from e
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: an lm-eval task YAML is a mapping; this file holds {type(cfg).__name__}")
    name = cfg.get("task") if isinstance(cfg.get("task"), str) else cfg.get("group")
    if not isinstance(name, str):
        raise InputError(f"{path}: no 'task: <name>' (or 'group: <name>') key; allowed: an lm-eval 0.4 task YAML")
    return name


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def check_task(name: str, data_dir: Path | None, include_path: list[Path] | None = None) -> list[str]:
    """Everything about a harness task that can be checked without a model: files exist and parse, a YAML
    names its task, a stock name is known to lm-eval. Returns the expanded task names."""
    fam, sep, _ = name.partition(":")
    if sep and fam in FORMATS and fam not in LOCAL_FAMILIES + STOCK_FORMATS:
        raise InputError(f"task {name!r}: format {fam!r} runs natively, not through lm-eval; use the suite line "
                         f"{name!r} (or a task of type {FORMATS[fam].kind})")
    names = expand_task(name, data_dir)
    with tempfile.TemporaryDirectory(prefix="distillgate-check-") as tmp:
        stock = []
        for n in names:
            if _is_yaml(n):
                user_task_yaml(resolve_path(n, data_dir, name))
            elif render_task(n, data_dir, Path(tmp)) is None:
                stock.append(n)
    if stock:
        _check_stock(stock, include_path or [])
    return names


@functools.lru_cache(maxsize=1)
def _stock_index() -> dict[str, Path]:
    """``{task/group/tag name: YAML file}`` of lm-eval's stock tasks by a text scan (0.7 s for 13,986 files,
    against ~15 s for TaskManager's full index, which is only built when the scan does not find a name)."""
    import lm_eval.tasks

    pat = re.compile(r"^(?:task|group|tag):\s*['\"]?([A-Za-z0-9_.\-]+)['\"]?\s*$", re.M)
    idx: dict[str, Path] = {}
    for p in Path(lm_eval.tasks.__file__).parent.rglob("*.yaml"):
        try:
            for name in pat.findall(p.read_text(encoding="utf-8", errors="replace")):
                idx.setdefault(name, p)
        except OSError:
            continue
    return idx


def _check_stock(names: list[str], include_path: list[Path]) -> None:
    """A name must be a task of the user's include path or a stock lm-eval task; offline, a stock task whose
    dataset is in neither the datasets cache nor the hub cache is refused here, before any model loads."""
    idx = _stock_index()
    user = set()
    if include_path and any(n not in idx for n in names):
        from lm_eval.tasks import TaskManager

        user = set(TaskManager(include_path=[str(p) for p in include_path], include_defaults=False).all_tasks)
    missing = [n for n in names if n not in idx and n not in user]
    if missing:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager(include_path=[str(p) for p in include_path] or None).all_tasks)
        missing = [n for n in missing if n not in known]
    if missing:
        raise InputError(f"task {missing[0]!r}: not a local format ({', '.join(LOCAL_FAMILIES + STOCK_FORMATS)} "
                         "with ':FILE'), not a task YAML file or a task in include_path, and not a stock lm-eval "
                         "task name")
    if not _offline():
        return
    for n in names:
        if n in user or n not in idx:
            continue
        m = re.search(r"^dataset_path:\s*['\"]?([^'\"\s]+)", idx[n].read_text(errors="replace"), re.M)
        if m and not _in_hf_cache(m.group(1)):
            fam = next((f for f in STOCK_FORMATS if n == f or n.startswith(f)), None)
            local = f"--suite {fam}:FILE" if fam else "a local task YAML (dataset_path: json)"
            raise InputError(f"task {n!r}: lm-eval's stock task reads {m.group(1)!r} from the Hugging Face hub, this "
                             "run is offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and the dataset is not in the "
                             f"local caches; give the benchmark as a local file instead: {local}")


def _in_hf_cache(dataset_path: str) -> bool:
    try:
        from datasets import config as ds_config
        from huggingface_hub import constants as hub_constants
    except ImportError:
        return False
    return any(p.exists() for p in (Path(ds_config.HF_DATASETS_CACHE) / dataset_path.replace("/", "___"),
                                    Path(hub_constants.HF_HUB_CACHE) / f"datasets--{dataset_path.replace('/', '--')}"))


def _offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def run_lm_eval(model, tokenizer, tasks: list[str], *, data_dir: str | os.PathLike | None = None,
                limit: int | None = None, batch_size: int = 8, log_samples: bool = False,
                include_path: list[str | os.PathLike] | None = None) -> dict:
    """Evaluate ``model`` with lm-eval on ``tasks``; returns ``{our_task_name: {metric: value, ...}}``.

    Metric keys are lm-eval's without the filter suffix (``acc``, ``acc_stderr``, ``exact_match``, ...),
    plus ``n`` (documents scored), ``lm_eval_task`` (the task name lm-eval ran) and ``higher_is_better``
    (lm-eval's per-metric flags). A group (a user's group YAML, or a stock group) comes back as one entry per
    subtask, keyed ``<asked>:<subtask>``. ``log_samples=True`` adds ``items``: per document ``{doc_id, gold,
    pred, loglikelihoods (multiple choice), correct, score}``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ddir = default_data_dir(data_dir)
    names = [t for name in tasks for t in expand_task(name, ddir)]
    with tempfile.TemporaryDirectory(prefix="distillgate-tasks-") as tmp:
        mapping, stock = {}, []
        dirs = [tmp] + [str(resolve_path(p, ddir, "include_path")) for p in include_path or []]
        for name in names:
            if _is_yaml(name):
                path = resolve_path(name, ddir, name)
                mapping[name] = user_task_yaml(path)
                dirs.append(str(path.parent))
            else:
                mapping[name] = render_task(name, ddir, Path(tmp)) or name
                if mapping[name] == name:
                    stock.append(name)
        # The stock index costs ~15 s (14,683 tasks): only built when a name is found neither locally nor in the
        # include path. A user's YAML therefore `include`s other YAML by path (relative to itself).
        dirs = list(dict.fromkeys(dirs))
        tm = TaskManager(include_path=dirs, include_defaults=False)
        stock = [n for n in stock if n not in tm.all_tasks]
        if stock:
            tm = TaskManager(include_path=dirs, include_defaults=True)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=list(mapping.values()), limit=limit, task_manager=tm,
                                          log_samples=log_samples, bootstrap_iters=100, verbosity="WARNING")
        except Exception as e:
            if stock and _offline():
                raise InputError(f"stock lm-eval task(s) {stock} need their dataset from the Hugging Face hub, and "
                                 f"this run is offline ({type(e).__name__}: {str(e)[:200]}); give the benchmark as "
                                 "a local file instead: --suite FORMAT:FILE (see `distillgate eval --help`)") from e
            raise
    results = {}
    for ours, theirs in mapping.items():
        subs = [t for t in _leaves(out, theirs) if t in out["results"]]
        if not subs:
            raise InputError(f"lm-eval returned no result for task {theirs!r} (asked as {ours!r}); it returned "
                             f"{sorted(out['results'])}")
        for sub in subs:
            key = ours if sub == theirs else f"{ours}:{sub}"
            results[key] = _metrics(out, sub)
            if log_samples:
                results[key]["items"] = [_item(sub, s) for s in out.get("samples", {}).get(sub, [])]
    return results


def _leaves(out: dict, name: str) -> list[str]:
    """A task, or a group's aggregate (when lm-eval computed one) followed by its subtasks, depth first."""
    kids = out.get("group_subtasks", {}).get(name)
    if not kids:
        return [name]
    own = out["results"].get(name, {})
    agg = [name] if any(isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len"
                        for k, v in own.items()) else []
    return agg + [leaf for k in kids for leaf in _leaves(out, k)]


def _metrics(out: dict, task: str) -> dict:
    metrics = {}
    for key, value in out["results"][task].items():
        if key in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, _, _filter = key.partition(",")
        metrics.setdefault(metric, float(value))       # first filter wins (lm-eval lists the task's first)
    metrics["n"] = int(out.get("n-samples", {}).get(task, {}).get("effective", 0))
    metrics["lm_eval_task"] = task
    metrics["higher_is_better"] = dict(out.get("higher_is_better", {}).get(task, {}))
    return metrics


def _item(task: str, s: dict) -> dict:
    """One logged lm-eval sample as a per-item record; its score is the sample's acc / exact_match / em (else
    its first metric), ``correct`` = score >= 0.5."""
    names = s.get("metrics") or [None]
    metric = next((m for m in ("acc", "exact_match", "em") if m in names), names[0])
    score = s.get(metric)
    score = float(score) if isinstance(score, (int, float)) else None
    resp = s.get("filtered_resps")
    doc = s.get("doc") if isinstance(s.get("doc"), dict) else {}
    # DROP's logged target is a join of the answer dict's keys (lm-eval quirk); its gold answers are 'answers'
    gold = [list(a) for a in doc["answers"]] if isinstance(doc.get("answers"), list) else s.get("target")
    item = {"doc_id": f"{task}:{s.get('doc_id')}", "gold": gold, "score": score,
            "correct": bool(score is not None and score >= 0.5)}
    if isinstance(resp, list) and resp and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in resp):
        lls = [float(r[0]) for r in resp]
        item["loglikelihoods"] = lls
        item["pred"] = max(range(len(lls)), key=lambda j: (lls[j], -j))
    else:
        item["pred"] = resp[0] if isinstance(resp, list) and len(resp) == 1 else resp
    return item
