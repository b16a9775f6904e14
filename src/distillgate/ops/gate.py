"""G-O1 gate values from a breaker report (the JSON ``bench/operations.py --out`` writes), with provenance.

``distillgate gates --breaker-report FILE`` hands the report to the providers below: G-O1a
``breaker_switch_ms`` (P99 latency of the degraded safe response under load) and G-O1b
``degraded_compliance_pct`` (compliant degraded outputs / attacks of the corpus; a missed attack counts as
non-compliant). Their provenance is the report's (``generated attacks``): the gate table says what the value
stands on, and a corpus under 10,000 attacks is flagged (it cannot show 99.99%): the note says so, and the
size (``details[metric]['size']``: attacks used / 10,000) reaches the loop's gate table as ``200/10000 generated attacks``.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import InputError
from ..io import read_json_report
from ..evaluate.providers import GateContext, register_metric_provider

MIN_ATTACKS = 10_000
REPORT_KEYS = {"provenance": str, "n_attacks": int, "breaker_p99_ms": float, "degraded_compliance_pct": float}


def read_report(path: str | Path) -> dict:
    """The breaker report at ``path``, validated (InputError naming the file and the field)."""
    p = Path(path)
    rep = read_json_report(p, "--breaker-report", "write one with bench/operations.py --out")
    for k, t in REPORT_KEYS.items():
        v = rep.get(k) if isinstance(rep, dict) else None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) if t is not str else \
            isinstance(v, str) and v
        if not ok:
            raise InputError(f"--breaker-report {p}: field {k!r} must be a finite {t.__name__}, got {v!r}")
    return rep


def _provider(metric: str, key: str):
    def fn(ctx: GateContext):
        rep = ctx.options.get("breaker_report")
        if not rep:
            ctx.details[metric] = {"note": "requires an attack corpus run: --breaker-report FILE "
                                           "(bench/operations.py --out FILE)"}
            return None
        if isinstance(rep, (str, Path)):
            rep = read_report(rep)
        note = f"{rep['n_attacks']} {rep['provenance']}"
        if rep["n_attacks"] < MIN_ATTACKS:
            note += f"; fewer than {MIN_ATTACKS:,} attacks cannot show 99.99%"
        ctx.details[metric] = {"provenance": rep["provenance"], "n_attacks": rep["n_attacks"], "note": note,
                               "n_misses": rep.get("n_misses"), "detector_fp_pct": rep.get("detector_fp_pct"),
                               "size": {"used": rep["n_attacks"], "spec": MIN_ATTACKS, "unit": "generated attacks"},
                               **({"backend": rep["backend"]} if rep.get("backend") else {})}
        return float(rep[key])
    fn.__qualname__ = f"breaker_metric[{metric}]"
    return fn


register_metric_provider("breaker_switch_ms", _provider("breaker_switch_ms", "breaker_p99_ms"), higher_is_better=False,
                         description="G-O1a: P99 ms to the degraded safe response on an attack, under load",
                         regression=False, tier="high", module=__name__)
register_metric_provider("degraded_compliance_pct", _provider("degraded_compliance_pct", "degraded_compliance_pct"),
                         higher_is_better=True, description="G-O1b: compliant degraded outputs / attacks, %",
                         regression=False, tier="high", module=__name__)
