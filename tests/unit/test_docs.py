"""The README stays true: its config reference is the one the code generates; shipped configs load."""

from pathlib import Path

import pytest

from distillgate.config import RunConfig, load_config
from distillgate.docs import BEGIN, END, config_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_readme_config_reference_is_current():
    text = (ROOT / "README.md").read_text()
    assert BEGIN in text and END in text
    inside = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert inside == config_markdown().strip(), "run: python - <<< 'from distillgate.docs import sync_readme; sync_readme()'"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_say_how_to_run(path):
    head = path.read_text().splitlines()[:12]
    assert any(line.startswith("# Run:") for line in head) and any(line.startswith("# Needs:") for line in head)
    load_config(RunConfig, path)
