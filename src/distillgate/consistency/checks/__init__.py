"""The three S4.2 checks on (request, teacher answer, student answer). Each returns a :class:`CheckResult`
per sample: ``passed``, a score, and a reason a reader can act on (the spans or features that failed).

* :mod:`.semantic`: MiniLM two-tower cosine between the answers, threshold calibrated on the labelled set;
* :mod:`.logic`: a rule engine for time contradictions, quantity conflicts and reversed causality;
* :mod:`.quality`: politeness, information density, follow-up question and readability, per feature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

CHECKS = ("semantic", "logic", "quality")


@dataclass
class CheckResult:
    check: str
    passed: bool
    score: float
    reason: str = ""
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)
