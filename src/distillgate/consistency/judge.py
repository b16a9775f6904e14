"""Run the three S4.2 checks over challenges and their (teacher, student) answers: one outcome per
challenge, ``{"challenge", "teacher", "student", "answered", "failed": [check names], "checks": {name:
CheckResult json}}``. Shared by the stage and ``bench/consistency.py``."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import logic, quality, semantic


@dataclass
class Judge:
    encoder: object
    threshold: float
    nli: object = None                 # semantic.NLI or None
    logic_tolerance: float = 0.01
    quality_margin: float = 0.15
    quality_floor: float = 0.3

    def __call__(self, challenges: list[dict], teachers: list[str], students: list[str]) -> list[dict]:
        sem = semantic.check_many(self.encoder, teachers, students, self.threshold, self.nli)
        out = []
        for c, t, s, r_sem in zip(challenges, teachers, students, sem):
            r_log = logic.check(c["text"], t, s, tolerance=self.logic_tolerance)
            r_q = quality.check(t, s, margin=self.quality_margin, floor=self.quality_floor)
            checks = {r.check: r for r in (r_sem, r_log, r_q)}
            out.append({"challenge": c, "teacher": t, "student": s, "answered": bool(t.strip() and s.strip()),
                        "failed": [n for n, r in checks.items() if not r.passed],
                        "checks": {n: r.to_json() for n, r in checks.items()}})
        return out


def calibrate_semantic(encoder, rows: list[dict]) -> semantic.Calibration:
    """The semantic threshold calibrated on labelled rows (``expect == "fail"``: known-different)."""
    sims = semantic.cosine(encoder, [r["teacher"] for r in rows], [r["student"] for r in rows])
    return semantic.calibrate(sims, [r["expect"] == "fail" for r in rows])
