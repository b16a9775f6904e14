"""Generate the README's config reference from the config models (so the README stays true).

    python -m distillgate.docs   # prints the markdown table; tests/unit/test_docs.py checks the README has it
"""

from __future__ import annotations

from .config import RunConfig, config_reference

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def config_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, desc in config_reference(RunConfig):
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| `{key}` | {cell(typ)} | `{cell(default)}` | {cell(desc)} |")
    return "\n".join(lines)



def sync_readme(path: str = "README.md") -> None:
    """Rewrite the README's config reference between its markers."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    p.write_text(f"{head}{BEGIN}\n{config_markdown()}\n{END}{tail}")


if __name__ == "__main__":
    print(config_markdown())
