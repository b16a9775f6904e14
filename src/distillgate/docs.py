"""Generate the README's config, stage-options and evaluation references from the code (so the README stays true).

    python -m distillgate.docs        # prints both; tests/unit/test_docs.py checks the README has them
    python -c 'from distillgate.docs import sync_readme; sync_readme()'   # rewrites them in README.md
"""

from __future__ import annotations

import sys

from .config import RunConfig, config_reference

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
EVAL_BEGIN, EVAL_END = "<!-- eval-reference:begin -->", "<!-- eval-reference:end -->"
STAGE_BEGIN, STAGE_END = "<!-- stage-reference:begin -->", "<!-- stage-reference:end -->"


def _default(d: str) -> str:
    return "required" if d == "PydanticUndefined" else f"`{_cell(d)}`"


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def config_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    for key, typ, default, desc in config_reference(RunConfig):
        lines.append(f"| `{key}` | {cell(typ)} | `{cell(default)}` | {cell(desc)} |")
    return "\n".join(lines)


def eval_markdown() -> str:
    """Suite task types and their fields, every benchmark format (input, lm-eval task, metrics), every metric."""
    from .evaluate.formats import FORMATS
    from .evaluate.metrics import metric_reference
    from .evaluate.suite import TASK_TYPES

    out = ["**Suite tasks.** A suite YAML is `{name: ..., tasks: [...]}`; each task is a mapping with a `type`, or one "
           "`FORMAT:FILE` string (also accepted as `--suite FORMAT:FILE`). Relative paths resolve against "
           "`--data-dir` (`$DISTILLGATE_DATA`) when set, else the current folder.", "",
           "| type | field | type | default | meaning |", "|---|---|---|---|---|"]
    common = set.intersection(*(set(c.model_fields) for c in TASK_TYPES))
    common.discard("type")
    rows = lambda cls, keep: [r for r in config_reference(cls) if keep(r[0])]  # noqa: E731
    for key, typ, default, desc in rows(TASK_TYPES[0], lambda k: k in common):
        out.append(f"| every task | `{key}` | {_cell(typ)} | {_default(default)} | {_cell(desc)} |")
    for cls in TASK_TYPES:
        tname = cls.model_fields["type"].annotation.__args__[0]
        out.append(f"| `{tname}` | | | | {_cell(cls.model_fields['type'].description or '')} |")
        for key, typ, default, desc in rows(cls, lambda k: k not in common and k != "type"):
            out.append(f"| | `{key}` | {_cell(typ)} | {_default(default)} | {_cell(desc)} |")
    out += ["", "**Benchmark formats** (`loader:` of a `choice`/`loglikelihood` task, `FORMAT:FILE` of a suite line or "
            "an `lm_eval` task). Each reproduces the prompt and metric of the lm-eval task named; `FORMAT:FILE` "
            "under `type: lm_eval` runs that lm-eval task itself on the file.", "",
            "| format | kind | input file | lm-eval task | metrics | capability tag |", "|---|---|---|---|---|---|"]
    for f in FORMATS.values():
        out.append(f"| `{f.name}` | {f.kind} | {_cell(f.input_format)} | {_cell(f.lm_eval_task)} | "
                   f"{', '.join(f.metrics)} | `{f.capability}` |")
    out += ["", "**Metrics** (`<task>/<metric>` in the scorecard; tier: `lm` language modelling, `mid` "
            "syntax/semantics, `high` tasks).", "", "| metric | better | tier | meaning |", "|---|---|---|---|"]
    for name, better, tier, desc in metric_reference():
        out.append(f"| `{name}` | {better} | {tier} | {_cell(desc)} |")
    return "\n".join(out)


def stage_markdown() -> str:
    """Every built-in stage (``loop.stages[i].name``) and its options (``loop.stages[i].options.<key>``)."""
    from .stages import STAGES, options_model

    out = ["| stage | option | type | default | meaning |", "|---|---|---|---|---|"]
    for name, factory in STAGES.items():
        if not getattr(factory, "__module__", "").startswith("distillgate."):
            continue
        doc = (sys.modules[factory.__module__].__doc__ or "").strip().split("\n\n")[0]
        out.append(f"| `{name}` ({getattr(factory, 'code', '')}) | | | | {_cell(doc)} |")
        for key, typ, default, desc in config_reference(options_model(factory)):
            out.append(f"| | `{key}` | {_cell(typ)} | {_default(default)} | {_cell(desc)} |")
        if name == "operations":  # each built-in drill's options: drills.<drill>.<key>
            from .ops.operations import available_drills

            for dname, d in available_drills().items():
                if not d.fn.__module__.startswith("distillgate."):
                    continue
                out.append(f"| | `drills.{dname}` | drill | | {_cell(d.description)}; gate metrics "
                           f"{', '.join(f'`{m}`' for m in d.metrics)} |")
                for key, typ, default, desc in config_reference(d.Options):
                    out.append(f"| | `drills.{dname}.{key}` | {_cell(typ)} | {_default(default)} | {_cell(desc)} |")
    return "\n".join(out)


def _replace(text: str, begin: str, end: str, body: str) -> str:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def sync_readme(path: str = "README.md") -> None:
    """Rewrite the README's config and evaluation references between their markers."""
    from pathlib import Path

    p = Path(path)
    text = _replace(p.read_text(), BEGIN, END, config_markdown())
    text = _replace(text, STAGE_BEGIN, STAGE_END, stage_markdown())
    p.write_text(_replace(text, EVAL_BEGIN, EVAL_END, eval_markdown()))


if __name__ == "__main__":
    print(config_markdown())
    print()
    print(stage_markdown())
    print()
    print(eval_markdown())
