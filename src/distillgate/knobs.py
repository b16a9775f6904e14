"""The strategy's knob space and what the run learned about it (SPEC L1.4-L1.5, L2, S2.5).

Every recipe knob the strategy may move is a :class:`Knob` in :data:`KNOB_SPACE`: its allowed range, the size of
one move, and a *prior*: the relative change of each metric one move up is expected to cause, before anything
was measured in this run. A move outside the range is refused (never clamped) with a logged reason.

What the run measured lives in the loop state's ``strategy`` section (:class:`Memory`), saved in every version
and restored by ``--resume``:

* ``moves``: every knob change with the finding it answers, its expected effect (from the prior, or from what
  was measured earlier in this run) and, once the next iteration was validated, its measured effect and verdict
  (``verified`` / ``failed`` / ``unmeasured``), and whether it was kept or reverted;
* ``trials``: the exploration's short-horizon trials (:mod:`distillgate.explore`): a direct A/B measurement of
  one knob value against the incumbent recipe from the same starting weights;
* ``directions``: the direction the ``tune`` rule moves each knob in next (a failed move flips it).

The measured effect of a rule's move (no A/B) is observational: the metric's relative change in the iteration
the move applied to, minus ``trend_decay`` x the relative change of the iteration before (the progress training
on would have made anyway). It needs two trained iterations before the move; otherwise the move is
``unmeasured``. The exploration's trials have no such confound (same weights, same batches, one knob apart).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

QUALITY_METRICS = ("kl", "ppl_ratio", "top1_agreement")  # what the tune rule can repair (lm tier, L3)
LOWER_IS_BETTER = {"kl": True, "ppl_ratio": True, "top1_agreement": False, "student_ppl_heldout": True}


@dataclass(frozen=True)
class Knob:
    """One recipe knob: ``name`` is its dotted recipe key (``*`` matches one key, e.g. a domain)."""

    name: str
    scale: Literal["log", "linear", "int", "bool", "choice"]
    low: float | None
    high: float | None
    step: float                      # one move: a factor (log, int) or a delta (linear)
    prior: dict                      # metric -> relative change of one move *up* (e.g. kl -0.03 = 3% lower)
    description: str
    choices: tuple = ()

    def allowed(self) -> str:
        if self.scale == "choice":
            return f"one of {list(self.choices)}"
        if self.scale == "bool":
            return "true or false"
        return f"[{self.low:g}, {self.high:g}]"

    def contains(self, value) -> bool:
        if value is None:
            return True  # removing an override (back to the config's value)
        if self.scale == "choice":
            return not self.choices or value in self.choices
        if self.scale == "bool":
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return self.low - 1e-12 <= value <= self.high + 1e-12

    def moved(self, value, direction: int):
        """``value`` moved one step in ``direction`` (+1 up, -1 down); may leave the range (then refused)."""
        if self.scale == "bool":
            return direction > 0
        if self.scale == "log":
            return float(f"{value * self.step ** direction:.6g}")
        if self.scale == "int":
            return max(1, int(round(value * self.step ** direction)))
        if self.scale == "linear":
            return round(value + direction * self.step, 6)
        raise ValueError(f"knob {self.name} ({self.scale}) has no numeric move")

    def magnitude(self, old, new) -> float:
        """How many steps ``old -> new`` is (for scaling a prior or a measured effect per move)."""
        if self.scale in ("bool", "choice") or old is None or new is None:
            return 1.0
        if self.scale in ("log", "int"):
            return abs(math.log(new / old)) / math.log(self.step) if old > 0 and new > 0 else 1.0
        return abs(new - old) / self.step


_Q = {"kl": -0.03, "ppl_ratio": -0.03, "top1_agreement": 0.01}
KNOB_SPACE: dict[str, Knob] = {k.name: k for k in [
    Knob("train.lr", "log", 1e-5, 3e-3, 1.5, dict(_Q),
         "peak AdamW learning rate; an under-trained student (G-C1 far off) learns faster with a larger one"),
    Knob("train.steps", "int", 1, 512, 1.5, {"kl": -0.04, "ppl_ratio": -0.04, "top1_agreement": 0.01},
         "optimizer steps per iteration (buys quality with compute: off in the tune rule by default)"),
    Knob("train.warmup_steps", "int", 0, 64, 2.0, {"kl": 0.0}, "linear warmup steps before the cosine decay"),
    Knob("train.min_lr_ratio", "linear", 0.0, 1.0, 0.1, {"kl": -0.005}, "final lr of the schedule / peak lr"),
    Knob("loss.channels.ce", "linear", 0.0, 1.0, 0.1, {"ppl_ratio": -0.02, "kl": 0.005, "top1_agreement": 0.005},
         "weight of cross-entropy on the teacher's tokens (the CE share): sharpens the student toward the "
         "teacher's argmax, which G-C1's perplexity rewards"),
    Knob("loss.channels.kd", "log", 0.05, 10.0, 1.5, {"kl": -0.01}, "weight of the token-level divergence"),
    Knob("loss.channels.*", "log", 0.0, 10.0, 1.5, {"kl": -0.005}, "weight of any other loss channel"),
    Knob("loss.temperature.value", "linear", 0.5, 3.0, 0.1, {"kl": 0.005}, "temperature (policy fixed)"),
    Knob("loss.temperature.min", "linear", 0.5, 3.0, 0.1, {"kl": 0.005}, "lowest temperature of a dynamic "
         "policy"),
    Knob("loss.temperature.max", "linear", 0.5, 3.0, 0.1, {"kl": 0.005}, "highest temperature of a dynamic "
         "policy"),
    Knob("loss.temperature.policy", "choice", None, None, 1.0, {"kl": 0.0}, "temperature policy (S2.1)",
         ("fixed", "complexity", "entropy")),
    Knob("loss.domain_weights.*", "log", 0.25, 4.0, 1.5, {"kl": -0.005}, "loss weight of one business domain "
         "(S2.5.1; the ceiling is loop.strategy.max_weight)"),
    Knob("loss.difficulty_weighting", "bool", None, None, 1.0, {"kl": -0.01, "ppl_ratio": -0.005},
         "down-weight tokens where the teacher is unsure (S2.5.2)"),
    Knob("loss.difficulty_floor", "linear", 0.0, 1.0, 0.1, {"kl": 0.0}, "lowest difficulty weight"),
    Knob("data.mix.*", "linear", 0.0, 1.0, 0.05, {"kl": -0.005}, "share of one domain in the next prompts"),
    Knob("data.mix", "choice", None, None, 1.0, {"kl": -0.005}, "the whole domain mix (a weak domain's boost)"),
    Knob("data.prompts", "int", 0, 1024, 1.5, {"kl": -0.02, "ppl_ratio": -0.02},
         "new teacher prompts per iteration (new-data volume; costs teacher generation: off in the tune rule "
         "by default)"),
    Knob("hard_pool", "choice", None, None, 1.0, {"kl": -0.01}, "the hard pool (S4.3): logged by its size"),
    Knob("curriculum.tier", "choice", None, None, 1.0, {"kl": 0.0}, "capability tier (L3)", ("lm", "mid", "high")),
]}


def knob(name: str) -> Knob | None:
    """The knob a dotted recipe key belongs to (exact name first, then the ``prefix.*`` pattern)."""
    if name in KNOB_SPACE:
        return KNOB_SPACE[name]
    head = name.rsplit(".", 1)[0]
    return KNOB_SPACE.get(head + ".*")


def prior_effect(name: str, metric: str, direction: int = 1) -> float:
    """The prior relative change of ``metric`` for one move of ``name`` in ``direction``."""
    k = knob(name)
    if k is None:
        return 0.0
    base = k.prior.get(metric, k.prior.get("kl", 0.0) if metric == "ppl_ratio" else 0.0)
    return base * (1 if direction > 0 else -1)


class ExplorationSpec(BaseModel):
    """``loop.strategy.exploration``: short variants of the recipe tried each iteration (issue 16)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    budget: float = Field(0.0, ge=0.0, le=4.0, description="extra optimizer steps for exploration, as a share of "
                          "the iteration's main steps (0.3: +30%); 0: no exploration")
    variants: int = Field(2, ge=1, le=8, description="exploratory variants per iteration besides the main recipe "
                          "(fewer when the budget does not give each at least one step)")
    selection_prompts: int = Field(0, ge=0, description="training-pool prompts reserved (never trained on, "
                                   "never in the gates' held-out set) as the selection split the variants are "
                                   "compared on; needed when budget > 0")
    knobs: list[str] = Field(["train.lr", "loss.temperature.max", "loss.difficulty_weighting", "loss.channels.ce"],
                             description="knobs a variant may move (one move per variant, from the recipe's current "
                                         "value), from the numeric and on/off knobs of the knob space; every move "
                                         "is tried once in this order before the sampler chooses")
    move_sizes: dict[str, float] = Field(default_factory=lambda: {"train.lr": 2.0},
                                         description="knob -> size of one exploration move (factor for log knobs, "
                                                     "delta for linear ones; default: the knob space's step)")
    directions: dict[str, Literal["both", "up", "down"]] = Field(
        default_factory=lambda: {"loss.channels.ce": "down"},
        description="knob -> the directions it is explored in (default both); the CE share only down: the "
                    "selection objective is KL, which a larger CE share trades for perplexity")
    noise_z: float = Field(1.0, ge=0.0, description="a variant replaces the main recipe only when its selection-KL "
                           "gain exceeds this many standard errors of the paired per-prompt difference (and margin)")
    ranges: dict[str, list[float]] = Field(default_factory=lambda: {"train.lr": [1e-4, 3e-3]},
                                           description="knob -> [low, high] the proposals are drawn from "
                                                       "(default: the knob's allowed range)")
    stages: list[str] = Field(["joint"], description="stages whose iterations explore (their map trains the "
                              "recipe; a prune cut is not explored)")
    margin: float = Field(0.0, ge=0.0, description="relative selection-KL gain a variant needs over the main "
                          "recipe to replace it (besides noise_z standard errors)")
    startup_trials: int = Field(4, ge=1, description="trials drawn at random before Optuna's TPE sampler models "
                                "the earlier trials")
    seed: int = Field(0, description="proposal sampler seed (with the iteration)")
    hold_screened: bool = Field(True, description="a knob the exploration screened this iteration and kept "
                                "(no variant of it won) is held like an adopted one: no rule moves it for the next "
                                "recipe (the A/B measured no better value; a rule has only a prior or a trend)")
    screen_bounds: bool = Field(False, description="with hold_screened: a knob the screens measured and kept is "
                                "bounded, not frozen: a rule may still move it toward a value the screens measured "
                                "no better than the incumbent, but not to it or past it (the A/B refuted that "
                                "value, not the ones between); an adopted value stays held")
    every: int = Field(1, ge=1, description="iterations from one exploration to the next (1: every iteration); "
                       "the ones between rest")
    rest: int = Field(0, ge=0, description="iterations the exploration stands down, besides every's, after one "
                      "where no variant beat the main recipe")
    screen_after: Annotated[int, Field(ge=0)] | Literal["warmup"] = Field(
        0, description="main-recipe steps trained before the screens branch off (0: the screens start with the "
        "iteration; 'warmup': train.warmup_steps): the variants then continue that checkpoint (its weights, AdamW "
        "moments and data position) at their own value, so a screen measures steps past the warmup of the "
        "iteration's fresh optimizer instead of its first, bias-corrected updates; these steps are the main "
        "recipe's own and not extra. 'warmup' made the lr screens' verdicts agree with longer training more "
        "often but did not lower the final KL in bench/closed_loop.py (README), hence not the default")
    reinvest: bool = Field(True, description="an iteration where the exploration rests trains its budget "
                           "(variants x h steps) as extra main steps, so the run's compute does not depend on how "
                           "often it explored")

    @field_validator("knobs")
    @classmethod
    def _knobs(cls, v):
        ok = ("log", "linear", "int", "bool")
        for name in v:
            k = KNOB_SPACE.get(name)
            if k is None or k.scale not in ok:
                raise ValueError(f"{name!r} is not a numeric or on/off knob; allowed: "
                                 f"{[n for n, k in KNOB_SPACE.items() if k.scale in ok and '*' not in n]}")
        return v

    @field_validator("move_sizes", "directions")
    @classmethod
    def _named(cls, v, info):
        for name, val in v.items():
            k = KNOB_SPACE.get(name)
            if k is None or k.scale not in ("log", "linear", "int"):
                raise ValueError(f"{info.field_name}.{name}: not a numeric knob of the knob space")
            if info.field_name == "move_sizes" and (val <= 0 or (k.scale != "linear" and val <= 1)):
                raise ValueError(f"move_sizes.{name}: {val} must be > 1 (a factor) for a {k.scale} knob, > 0 "
                                 f"(a delta) for a linear one")
        return v

    @model_validator(mode="after")
    def _split(self):
        if self.budget > 0 and self.selection_prompts < 1:
            raise ValueError("selection_prompts: exploration (budget > 0) needs a selection split of at least "
                             "1 prompt (e.g. 16)")
        for name, r in self.ranges.items():
            k = knob(name)
            if k is None or len(r) != 2 or not (k.low <= r[0] < r[1] <= k.high):
                raise ValueError(f"ranges.{name}: {r} must be [low, high] inside the knob's allowed range "
                                 f"{k.allowed() if k else '(unknown knob)'}")
        return self

    def range_of(self, name: str) -> tuple[float, float]:
        k = knob(name)
        lo, hi = self.ranges.get(name, (k.low, k.high))
        return float(lo), float(hi)


# ------------------------------------------------------------------------------------------- memory

class Memory:
    """The loop state's ``strategy`` dict, with the operations the rules, attribution and the report need."""

    def __init__(self, data: dict | None):
        self.data = data if data is not None else {}
        self.data.setdefault("moves", [])
        self.data.setdefault("trials", [])
        self.data.setdefault("directions", {})

    @property
    def moves(self) -> list[dict]:
        return self.data["moves"]

    @property
    def trials(self) -> list[dict]:
        return self.data["trials"]

    def direction(self, name: str) -> int:
        return int(self.data["directions"].get(name, 1))

    def effects(self, name: str, metric: str) -> list[float]:
        """Measured relative changes of ``metric`` per move *up* of knob ``name`` (down moves negated; each
        divided by the move's size in steps), from rule moves and exploration trials."""
        out = []
        k = knob(name)
        for m in self.moves:
            eff = (m.get("measured") or {}).get(metric)
            if m["knob"] == name and eff is not None and m.get("direction"):
                out.append(eff / max(m.get("steps", 1.0), 1e-9) * m["direction"])
        for t in self.trials:
            if t.get("knob") == name and t.get("value") is not None and metric == "kl" and k is not None:
                mag = k.magnitude(t["incumbent"], t["proposed"])
                sign = 1 if t["proposed"] >= t["incumbent"] else -1
                if mag > 1e-6:
                    out.append(t["value"] / mag * sign)
        return out

    def expected(self, name: str, metric: str, direction: int) -> tuple[float, str]:
        """(expected relative change of ``metric`` for one move, where the number comes from)."""
        eff = self.effects(name, metric)
        if eff:
            mean = statistics.fmean(eff) * (1 if direction > 0 else -1)
            return mean, f"measured in this run (n={len(eff)})"
        return prior_effect(name, metric, direction), "prior"

    def add_move(self, d, applies_to: int, metric: str | None, expected: float | None, source: str,
                 answers: str, direction: int = 0) -> None:
        k = knob(d.knob)
        steps = k.magnitude(d.old, d.new) if k and isinstance(d.old, (int, float)) and isinstance(
            d.new, (int, float)) and not isinstance(d.old, bool) else 1.0
        for m in self.moves:  # a change back to a move's old value reverts that move
            if m["knob"] == d.knob and m["status_kept"] == "kept" and m["old"] == d.new and m["new"] == d.old:
                m["status_kept"] = "reverted"
                m["reverted_in"] = d.iteration
                if d.rule in ("revert", "tune"):
                    return
        self.moves.append({"iteration": d.iteration, "applies_to": applies_to, "rule": d.rule, "knob": d.knob,
                           "old": _small(d.old), "new": _small(d.new), "direction": direction, "steps": steps,
                           "metric": metric, "expected": expected, "expected_source": source, "answers": answers,
                           "status": "pending", "status_kept": "kept", "measured": {}})


def direction(old, new) -> int:
    """+1 when ``old -> new`` moves a knob up (or switches it on), -1 down, 0 for a categorical change."""
    if isinstance(new, bool):
        return 1 if new else -1
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return 1 if new >= old else -1
    return 0


def _small(v):
    return f"{len(v)} entries" if isinstance(v, (dict, list)) and len(v) > 4 else v


def rel_change(new, old) -> float | None:
    if new is None or old is None or not math.isfinite(new) or not math.isfinite(old) or old == 0:
        return None
    return (new - old) / abs(old)


def measure_moves(memory: Memory, iteration: int, history: list[dict], metrics: dict, *,
                  trend_decay: float) -> list[dict]:
    """Measure every pending move that applied to ``iteration``; returns ``[(move, verdict, evidence)]`` dicts
    for the repair findings. ``history``: the committed iterations before this one (``LoopState.history``)."""
    out = []
    by_it = {h["iteration"]: h for h in history}
    prev, prev2 = by_it.get(iteration - 1), by_it.get(iteration - 2)
    trained = lambda h: h is not None and bool(h.get("terms"))  # noqa: E731
    for m in memory.moves:
        if m["applies_to"] != iteration or m["status"] != "pending":
            continue
        measured, baseline = {}, {}
        for metric in dict.fromkeys([m["metric"] or "kl", "kl", "ppl_ratio"]):
            now, before = metrics.get(metric), (prev or {}).get("metrics", {}).get(metric)
            r = rel_change(now, before)
            if r is None or not trained(prev) or not trained(prev2):
                continue
            r_prev = rel_change(before, prev2["metrics"].get(metric))
            if r_prev is None:
                continue
            baseline[metric] = trend_decay * r_prev
            measured[metric] = round(r - baseline[metric], 6)
        metric = m["metric"] or "kl"
        m["shared_with"] = sorted({o["knob"] for o in memory.moves if o is not m and o["applies_to"] == iteration
                                   and o["knob"] != m["knob"] and o["rule"] != "explore"})
        if metric not in measured:
            m["status"] = "unmeasured"
            gap = next((j for j in (iteration - 1, iteration - 2) if not trained(by_it.get(j))), None)
            m["note"] = (f"no trend to measure against: iteration {gap} did not train" if gap is not None else
                         f"{metric} was not measured in iterations {iteration - 2}..{iteration}")
            out.append({"move": m, "verdict": "unmeasured"})
            continue
        m["measured"], m["baseline"] = measured, baseline
        # verified: the metric the move answered improved net of the trend (whatever size was expected)
        good = measured[metric] < 0 if LOWER_IS_BETTER.get(metric, True) else measured[metric] > 0
        m["status"] = "verified" if good else "failed"
        out.append({"move": m, "verdict": m["status"]})
    return out


def effect_table(data: dict | None, decisions: list[dict] = ()) -> list[dict]:
    """Per knob: tried, kept, reverted, verified / failed moves, and the measured effect (mean, sd, n) of one
    move up on KL (the primary metric) and on the metric the moves answered; exploration trials included."""
    mem = Memory(dict(data or {}))
    names = list(dict.fromkeys([m["knob"] for m in mem.moves] + [t["knob"] for t in mem.trials if t.get("knob")]))
    rows = []
    for name in names:
        ms = [m for m in mem.moves if m["knob"] == name]
        ts = [t for t in mem.trials if t.get("knob") == name]
        answered = next((m["metric"] for m in ms if m.get("metric")), "kl")
        row = {"knob": name, "tried": len(ms), "kept": sum(m["status_kept"] == "kept" for m in ms),
               "reverted": sum(m["status_kept"] == "reverted" for m in ms),
               "verified": sum(m["status"] == "verified" for m in ms),
               "failed": sum(m["status"] == "failed" for m in ms),
               "trials": len(ts), "adopted": sum(bool(t.get("adopted")) for t in ts),
               "metric": answered, "rules": sorted({m["rule"] for m in ms})}
        for metric in dict.fromkeys(["kl", answered]):
            eff = mem.effects(name, metric)
            row[f"effect_{metric}"] = {"mean": statistics.fmean(eff) if eff else None,
                                       "sd": statistics.stdev(eff) if len(eff) > 1 else None, "n": len(eff)}
        rows.append(row)
    return rows


def fmt_effect(e: dict | None) -> str:
    if not e or e.get("mean") is None:
        return "-"
    sd = f" ± {100 * e['sd']:.1f}" if e.get("sd") is not None else ""
    return f"{100 * e['mean']:+.1f}%{sd} (n={e['n']})"


__all__ = ["Knob", "KNOB_SPACE", "knob", "prior_effect", "direction", "ExplorationSpec", "Memory", "measure_moves",
           "effect_table", "fmt_effect", "QUALITY_METRICS"]

