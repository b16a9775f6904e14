"""D2 alerts -> work orders: dimension scores on the ops clock, the two-hour rule, root cause, verification.

Each :meth:`AlertWatch.observe` records the four dimension scores of a :class:`~distillgate.gates.GateReport`
at the clock's ``now()`` (catalog table ``dimension_scores``), then per dimension:

* **under threshold** means status ``fail`` (a counted gate of the dimension failed); ``no_score`` (nothing
  measured) is not under threshold, it is unknown, and neither starts nor ends an episode;
* an **episode** starts at the first ``fail`` after the dimension's last ``pass``; once it has lasted
  ``hold_hours`` (2) on the clock and no work order was opened in it, a red alert (catalog ``alerts``, level
  ``error``, source ``ops:<dimension>``) is raised and a **work order** written (catalog ``work_orders``):
  *location* (the failing gates and, where measured, the most divergent domain), *impact* (share of the
  dimension's gates failing, worst shortfall, how long), *suggested fix* (from the root cause) and a
  *verification plan* (the gates that must pass in an evaluation after the order opened);
* **root cause** reuses :mod:`distillgate.attribution`: the metrics that regressed since the last version in
  which the dimension passed (:func:`~distillgate.attribution.regressions` with the registry's directions and
  thresholds) and the knobs that changed since then, ranked (:func:`~distillgate.attribution.knob_blame`);
* an open work order **closes** when every gate of its verification plan passes in a later observation.

The rule's state lives in the catalog only, so a watch restarted later (another process, ``--resume``) picks
up where the last one stopped.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..attribution import domain_kl, knob_blame, registry_meta, regressions
from .clock import HOUR, Clock

RED = "error"  # the catalog's highest level; the report counts it as a red alert


class AlertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hold_hours: float = Field(2.0, gt=0, description="hours a dimension stays under its threshold before an alert")
    regression_threshold: float = Field(0.02, ge=0, description="relative worsening that counts as a regression "
                                        "in the root cause, for metrics the registry gives no threshold")
    top_knobs: int = Field(3, ge=1, description="changed knobs listed in a work order's root cause")


class AlertWatch:
    """The D2 rule over one run store (see the module docstring)."""

    def __init__(self, store, clock: Clock, options: AlertOptions | None = None):
        self.store, self.clock, self.options = store, clock, options or AlertOptions()

    @property
    def cat(self):
        return self.store.catalog

    def observe(self, report, version_id: int | None = None, *, samples: list | None = None) -> dict:
        """Record ``report``'s dimension scores now; raise due alerts, close verified work orders.
        Returns ``{"opened": [work order ids], "closed": [ids]}``."""
        now = self.clock.now()
        scores = [{"dimension": d.dimension, "status": d.status, "pass_share": d.pass_share, "closeness": d.closeness,
                   "failing": [g.id for g in report.gates if g.dimension == d.dimension and g.counted and not g.passed]}
                  for d in report.dimensions.values()]
        self.cat.record_dimension_scores(now, version_id, scores)
        passed = {g.id for g in report.gates if g.status == "pass"}
        out = {"opened": [], "closed": []}
        for wo in self.cat.work_orders("open"):
            gates = wo["verification"]["gates"]
            if now > wo["opened"] and all(g in passed for g in gates):
                self.cat.close_work_order(wo["id"], now, f"version {version_id}: {', '.join(gates)} pass "
                                                         f"(verification at {now:.0f})")
                out["closed"].append(wo["id"])
        for s in scores:
            start = self._episode_start(s["dimension"], now)
            if start is None or now - start < self.options.hold_hours * HOUR:
                continue
            if any(w["dimension"] == s["dimension"] and w["opened"] >= start for w in self.cat.work_orders()):
                continue
            out["opened"].append(self._raise(report, s, start, now, version_id, samples))
        return out

    def _episode_start(self, dim: str, now: float) -> float | None:
        """Time of the first ``fail`` after the last ``pass`` of ``dim``, if its latest status by ``now`` is fail
        (rows stamped later, by another clock, are not counted yet)."""
        start = None
        for r in self.cat.dimension_scores(dim):
            if r["time"] > now:
                break
            if r["status"] == "pass":
                start = None
            elif r["status"] == "fail" and start is None:
                start = r["time"]
        return start

    def _last_passing_version(self, dim: str) -> int | None:
        vids = [r["version_id"] for r in self.cat.dimension_scores(dim) if r["status"] == "pass"
                and r["version_id"] is not None]
        return vids[-1] if vids else None

    def _recipe(self, vid: int | None) -> dict | None:
        if vid is None:
            return None
        v = self.store.get_version(vid)
        return v.load_json("recipe.json") if "recipe.json" in v.files else None

    def _raise(self, report, score: dict, start: float, now: float, vid: int | None, samples) -> int:
        dim, o = score["dimension"], self.options
        failing = [g for g in report.gates if g.id in score["failing"]]
        rc = root_cause(self.cat, dim, vid, self._last_passing_version(dim), self._recipe(vid),
                        self._recipe(self._last_passing_version(dim)), samples, o)
        hours = (now - start) / HOUR
        worst = min(failing, key=lambda g: g.rel_margin if g.rel_margin is not None else -math.inf, default=None)
        location = f"{dim}: " + "; ".join(f"{g.id} {g.metric} = {_v(g.value)} (needs {g.comparator} {g.threshold:g})"
                                          for g in failing)
        if rc["domains"]:
            d, kl = max(rc["domains"].items(), key=lambda x: x[1])
            location += f"; most divergent domain {d} (KL {kl:.3g})"
        impact = (f"{len(failing)} of {report.dimensions[dim].n_counted} counted {dim} gates failing for "
                  f"{hours:.1f} h (since {start:.0f})" + (
                      f"; worst: {worst.id} short by {100 * -worst.rel_margin:.3g}% of its threshold"
                      if worst is not None and worst.rel_margin is not None else ""))
        fix = suggested_fix(rc, failing)
        alert_id = self.cat.record_alert(RED, f"ops:{dim}", f"{dim} under threshold for {hours:.1f} h: "
                                         + ", ".join(g.id for g in failing), vid, at=now)
        verification = {"gates": [g.id for g in failing],
                        "rule": "every listed gate passes in an evaluation after the work order opened",
                        "how": "distillgate gates (or the next loop iteration's validate), observed by the watch"}
        return self.cat.record_work_order({"alert_id": alert_id, "dimension": dim, "opened": now, "version_id": vid,
                                           "location": location, "impact": impact, "suggested_fix": fix,
                                           "verification": verification, "root_cause": rc})


def root_cause(cat, dim: str, vid: int | None, good_vid: int | None, recipe: dict | None, good_recipe: dict | None,
               samples: list | None, options: AlertOptions) -> dict:
    """What attribution says about a dimension's failure: regressions since the last version where it passed,
    the changed knobs ranked by suspected impact, the per-domain divergence of ``samples``."""
    metrics = cat.metrics(vid, "val") if vid is not None else {}
    prev = cat.metrics(good_vid, "val") if good_vid is not None and good_vid != vid else {}
    regressed = regressions(metrics, prev, registry_meta(metrics, options.regression_threshold)) if prev else []
    blame = knob_blame(recipe, good_recipe, regressed)[:options.top_knobs] if recipe and good_recipe else []
    return {"dimension": dim, "version_id": vid, "baseline_version": good_vid,
            "regressions": [{"metric": m, "relative_worsening": round(w, 4)} for m, w in regressed],
            "knobs": blame, "domains": domain_kl(samples) if samples else {}}


def suggested_fix(rc: dict, failing) -> str:
    if rc["knobs"]:
        k = rc["knobs"][0]
        return (f"revert {k['knob']} from {k['new']!r} to {k['old']!r} (version {rc['baseline_version']}, where "
                f"{rc['dimension']} passed), then re-run the loop; it is the most suspect change "
                f"(score {k['score']})")
    if rc["regressions"]:
        m = rc["regressions"][0]["metric"]
        return f"{m} regressed since version {rc['baseline_version']}: restore that version (distillgate rollback) " \
               f"and re-run the loop with more iterations on {m}"
    metrics = ", ".join(g.metric for g in failing)
    return (f"no regression or changed knob explains it (no earlier passing version to compare with): train further "
            f"on what {metrics} measures and re-check")


def _v(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}"


__all__ = ["AlertOptions", "AlertWatch", "root_cause", "suggested_fix"]
