"""The README stays true: its config reference is the one the code generates; shipped configs load."""

from pathlib import Path

import pytest

from distillgate.config import RunConfig, load_config
from distillgate.docs import BEGIN, END, EVAL_BEGIN, EVAL_END, config_markdown, eval_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_readme_config_reference_is_current():
    text = (ROOT / "README.md").read_text()
    assert BEGIN in text and END in text
    inside = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert inside == config_markdown().strip(), "run: python - <<< 'from distillgate.docs import sync_readme; sync_readme()'"


def test_readme_stage_reference_is_current():
    from distillgate.docs import STAGE_BEGIN, STAGE_END, stage_markdown

    text = (ROOT / "README.md").read_text()
    inside = text.split(STAGE_BEGIN, 1)[1].split(STAGE_END, 1)[0].strip()
    assert inside == stage_markdown().strip(), "run: python - <<< 'from distillgate.docs import sync_readme; sync_readme()'"
    for name in ("anchor", "joint", "prune"):
        assert f"| `{name}` (" in inside


def test_readme_eval_reference_is_current_and_complete():
    from distillgate.evaluate.formats import FORMATS
    from distillgate.evaluate.metrics import metric_reference
    from distillgate.evaluate.suite import TASK_TYPES

    text = (ROOT / "README.md").read_text()
    inside = text.split(EVAL_BEGIN, 1)[1].split(EVAL_END, 1)[0].strip()
    assert inside == eval_markdown().strip(), "run: python - <<< 'from distillgate.docs import sync_readme; sync_readme()'"
    for name, f in FORMATS.items():                      # every format, its input and metrics are documented
        assert f"| `{name}` | {f.kind} |" in inside and f.input_format.split("`")[0][:20] in inside
    for name, *_ in metric_reference():
        assert f"| `{name}` |" in inside
    for cls in TASK_TYPES:
        assert f"| `{cls.model_fields['type'].annotation.__args__[0]}` |" in inside
    for want in ("hellaswag", "truthfulqa_mc2", "drop", "lambada", "winogrande", "boolq", "sciq", "openbookqa", "arc",
                 "piqa", "copa", "mmlu", "bbh", "gsm8k", "blimp", "wikitext"):
        assert want in FORMATS


def test_eval_help_lists_every_format(capsys):
    from distillgate.cli import main
    from distillgate.evaluate.formats import FORMATS

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "FORMAT:FILE" in out and "partial" in out
    for name in FORMATS:
        assert f"\n  {name} " in out


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_say_how_to_run(path):
    head = path.read_text().splitlines()[:12]
    assert any(line.startswith("# Run:") for line in head) and any(line.startswith("# Needs:") for line in head)
    load_config(RunConfig, path)
