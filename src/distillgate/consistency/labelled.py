"""The labelled set the three checks are calibrated and measured on (``data/labelled.jsonl``; built by hand
for this purpose, not evaluation data): known-equivalent and known-different answer pairs (semantic), student
answers with injected time / quantity / causality contradictions and clean ones (logic), and rude, looping or
empty answers against good ones (quality). Each row: ``id, check, request, teacher, student, expect (pass |
fail), note, split (calib | test)``.

Precision and recall count a *failure* as the positive class: precision = flagged failures that are real,
recall = real failures flagged."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PATH = Path(__file__).parent / "data" / "labelled.jsonl"


@lru_cache(maxsize=4)
def _rows(path: str) -> tuple[dict, ...]:
    return tuple(json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())


def load(check: str | None = None, split: str | None = None, path: Path | str = PATH) -> list[dict]:
    return [dict(r) for r in _rows(str(path)) if (check is None or r["check"] == check)
            and (split is None or r["split"] == split)]


def scores(expected_fail: list[bool], flagged: list[bool]) -> dict:
    tp = sum(e and f for e, f in zip(expected_fail, flagged))
    fp = sum(f and not e for e, f in zip(expected_fail, flagged))
    fn = sum(e and not f for e, f in zip(expected_fail, flagged))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"n": len(flagged), "tp": tp, "fp": fp, "fn": fn, "precision": round(p, 4), "recall": round(r, 4),
            "f1": round(f1, 4)}
