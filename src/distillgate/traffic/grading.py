"""How good an answer is: against the request's :class:`~distillgate.traffic.types.Reference` where it has one,
else by the S4 checks (:mod:`distillgate.consistency.checks`) that need no reference answer.

* reference ``number``: some number in the answer equals the value within 1% (``1,250`` and ``1250.0`` count);
* reference ``text``: the phrase occurs in the answer (case-insensitive, whitespace-normalised);
* reference ``label``: of the allowed labels, the one the answer names first is the right one;
* no reference: the *logic* check (time contradictions, quantity conflicts, a request amount changed, reversed
  causality inside the answer and against the request) and the *quality* check's floors (politeness,
  information density) must pass; with a ``judge`` answer (e.g. the teacher's) the logic check also compares
  against it and the quality check measures the drop under it. An empty answer is never correct.

``score`` in [0, 1] is the quality check's overall score for requests graded by the S4 checks (kept for
inspection; the simulated user reads ``correct``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..consistency.checks import logic, quality
from .types import Reference

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class Grade:
    correct: bool
    score: float | None  # the quality check's overall score (requests without a reference)
    reason: str
    by: str  # "reference" or "s4"


def numbers(text: str) -> list[float]:
    out = []
    for m in _NUM.findall(text):
        try:
            out.append(float(m.replace(",", "")))
        except ValueError:
            continue
    return out


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.lower()).strip()


def matches(ref: Reference, answer: str) -> bool:
    if ref.kind == "number":
        want = float(ref.value)
        return any(abs(x - want) <= 0.01 * max(abs(want), 1.0) for x in numbers(answer))
    a = _norm(answer)
    if ref.kind == "text":
        return any(_norm(v) in a for v in (ref.value, *ref.alternatives))
    if ref.kind == "label":
        pos = {lab: m.start() for lab in ref.alternatives if (m := re.search(rf"\b{re.escape(lab)}\b", a))}
        return bool(pos) and min(pos, key=pos.get) == ref.value
    raise ValueError(f"unknown reference kind {ref.kind!r}; allowed: number, text, label")


def grade(request: str, answer: str, reference: Reference | None, judge: str = "", *, quality_margin: float = 0.15,
          quality_floor: float = 0.3, logic_tolerance: float = 0.01) -> Grade:
    answer = answer or ""
    if not answer.strip():
        return Grade(False, 0.0, "empty answer", "reference" if reference else "s4")
    if reference is not None:
        ok = matches(reference, answer)
        return Grade(ok, None, "" if ok else f"expected {reference.kind} {reference.value!r}", "reference")
    q = quality.check(judge, answer, margin=quality_margin, floor=quality_floor)
    lg = logic.check(request, judge, answer, tolerance=logic_tolerance)
    failed = [r for r in (lg, q) if not r.passed]
    return Grade(not failed, float(q.score), "; ".join(f"{r.check}: {r.reason}" for r in failed), "s4")
