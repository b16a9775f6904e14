"""Compensate (SPEC L1.5): a list of rules that turns findings into the next recipe.

A *recipe* is the plain dict of knobs one iteration runs with::

    {"loss": {"channels": {...}, "temperature": {...}, "domain_weights": {...}, ...},
     "train": {"lr": ..., "steps": ...}, "data": {"mix": {domain: share}},
     "hard_pool": {example_id: weight}, "curriculum": {"tier": "lm"},
     "student": {"structure": {...}}}

A rule is a function ``rule(s: StrategyStep) -> None`` that reads ``s.findings`` / ``s.gate_status`` and
proposes changes with ``s.change(rule, knob, value, reason)``; every change becomes a :class:`Decision` with
the rule's name and its reason. The core rules run in this order (``loop.strategy.rules`` picks and orders
them; a stage's ``rules()`` run after them):

1. ``revert``: a change followed by a regression is reverted (to the last good iteration's value), and the
   reverted knob is left alone for ``cooldown`` iterations;
2. ``weak_domain``: a domain whose KL is well above the mean gets more loss weight and more data;
   ``domain_shares`` (S2.5 level 1, only when ``loss.domain_channel_shares`` is configured): that domain's
   share of the token-level channel (kd, which the held-out KL measures) rises against its other channels;
3. ``plateau``: a channel whose loss slope stayed under its threshold for ``plateau_rounds`` iterations gets
   more weight (SPEC S2.5 level 3);
4. ``hard_pool``: the most divergent training samples enter a hard pool trained with ``hard_weight`` (S4.3);
5. ``curriculum``: the capability tier (L3: lm -> mid -> high) advances only when the lower tier's gates hold.

Every number is a field of :class:`StrategySpec` (the config's ``loop.strategy`` section). Findings marked
``uncertain`` (a measurement whose confidence interval crosses its threshold) are never acted on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import reject_unknown
from .schema import TIERS, Decision, Finding

CORE_RULE_NAMES = ("revert", "weak_domain", "domain_shares", "plateau", "hard_pool", "curriculum")


class StrategySpec(BaseModel):
    """``loop.strategy``: which rules run, and every number they and attribution use."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    rules: list[str] = Field(list(CORE_RULE_NAMES), description=f"core rules to run, in order, from "
                             f"{list(CORE_RULE_NAMES)} ([] = a fixed recipe; stages' rules still run)")
    weight_factor: float = Field(1.5, gt=1.0, le=10.0, description="factor a weak domain's or a stalled "
                                 "channel's weight (and a weak domain's data share) is raised by")
    max_weight: float = Field(4.0, gt=0.0, description="ceiling of any loss / domain weight the strategy sets")
    hard_weight: float = Field(3.0, gt=0.0, description="loss weight of hard-pool samples (S4.3: 3x)")
    hard_pool_max: int = Field(256, ge=1, description="most samples in the hard pool (oldest leave first)")
    hard_top_fraction: float = Field(0.1, gt=0.0, le=1.0, description="share of the checked training samples "
                                     "(the most divergent) that enter the hard pool each iteration")
    hard_candidates: int = Field(32, ge=0, description="most recent training samples checked for the hard pool "
                                 "each iteration (0: no hard pool)")
    cooldown: int = Field(2, ge=0, description="iterations a reverted knob is left alone")
    plateau_threshold: float = Field(0.01, ge=0.0, description="relative loss slope under which a channel has "
                                     "stalled (S2.5.3)")
    plateau_rounds: int = Field(3, ge=1, description="iterations a channel must stay under the slope threshold")
    weak_domain_factor: float = Field(1.25, gt=1.0, description="a domain whose KL exceeds the mean by this "
                                      "factor is weak")
    recent_decisions: int = Field(32, ge=1, description="decisions of earlier iterations the rules can see")
    tier_gates: dict[str, list[str]] = Field({"lm": ["G-C1"], "mid": ["G-C2"], "high": ["G-C3", "G-C4"]},
                                             description="gates that must pass before the curriculum leaves a "
                                                         "tier (L3)")

    @field_validator("rules")
    @classmethod
    def _known(cls, v):
        reject_unknown(v, CORE_RULE_NAMES, "rule")
        return v

    @field_validator("tier_gates")
    @classmethod
    def _tiers(cls, v):
        reject_unknown(v, TIERS, "tier")
        return v


def _get(recipe: dict, dotted: str):
    node = recipe
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _set(recipe: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = recipe
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is None:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


def _normalise(mix: dict[str, float]) -> dict[str, float]:
    total = sum(mix.values()) or 1.0
    return {k: round(v / total, 6) for k, v in mix.items()}


@dataclass
class StrategyStep:
    """What one compensate step's rules see and change: ``recipe`` is the next recipe being built."""

    iteration: int
    recipe: dict
    findings: list[Finding]
    last_good: dict | None
    gate_status: dict[str, str]
    recent: list[Decision]
    spec: StrategySpec
    decisions: list[Decision] = field(default_factory=list)
    cooling: set[str] = field(default_factory=set)

    def get(self, knob: str):
        return _get(self.recipe, knob)

    def change(self, rule: str, knob: str, value, reason: str) -> None:
        """Set ``knob`` to ``value`` (skipped when unchanged, or cooling down after a revert unless this is one)."""
        old = _get(self.recipe, knob)
        if old == value or (knob in self.cooling and rule != "revert"):
            return
        _set(self.recipe, knob, value)
        self.decisions.append(Decision(self.iteration, rule, knob, old, value, reason))

    def record(self, rule: str, knob: str, old, new, reason: str, value=None) -> None:
        """A change whose logged old/new differ from the value written (e.g. a pool logged by its size)."""
        _set(self.recipe, knob, new if value is None else value)
        self.decisions.append(Decision(self.iteration, rule, knob, old, new, reason))

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]


Rule = Callable[[StrategyStep], None]


def revert(s: StrategyStep) -> None:
    """Revert what the previous iteration changed when this iteration regressed."""
    regs = s.of_kind("regression")
    if not regs or s.last_good is None:
        return
    changed_last = [d for d in s.recent if d.iteration == s.iteration - 1 and d.rule != "revert"]
    blamed = regs[0].evidence.get("knob_blame", [])
    knobs = [d.knob for d in changed_last] or [b["knob"] for b in blamed[:1] if b["knob"] != "hard_pool"]
    for knob in dict.fromkeys(knobs):
        good = _get(s.last_good, knob)
        s.change("revert", knob, copy.deepcopy(good),
                 f"{regs[0].metric} regressed ({regs[0].message}); reverting {knob} to the last good value")
    s.cooling |= set(knobs)


def weak_domain(s: StrategyStep) -> None:
    """More loss weight and more data for a weak domain."""
    spec = s.spec
    for f in s.of_kind("weak_domain"):
        d = f.evidence["domain"]
        w = float(s.get(f"loss.domain_weights.{d}") or 1.0)
        s.change("weak_domain", f"loss.domain_weights.{d}", round(min(spec.max_weight, w * spec.weight_factor), 4),
                 f.message + f"; loss weight x{spec.weight_factor}")
        mix = s.get("data.mix")
        if isinstance(mix, dict) and d in mix and "data.mix" not in s.cooling:
            boosted = dict(mix)
            boosted[d] = mix[d] * spec.weight_factor
            boosted = _normalise(boosted)
            old_mix = dict(mix)
            s.record("weak_domain", "data.mix", old_mix, boosted,
                     f"{d}: share {old_mix[d]:.3f} -> {boosted[d]:.3f} of next round's prompts")


def domain_shares(s: StrategyStep) -> None:
    """A weak domain's kd share rises (S2.5 level 1): the held-out KL that flags it is the kd channel's own
    measure, so that domain's mix of channels moves toward kd. Acts only on runs that configure
    ``loss.domain_channel_shares`` (a run without per-domain shares keeps one mix for every domain)."""
    shares = s.get("loss.domain_channel_shares")
    channels = s.get("loss.channels") or {}
    if not shares or not channels.get("kd"):
        return
    spec = s.spec
    for f in s.of_kind("weak_domain"):
        d = f.evidence["domain"]
        old = float((shares.get(d) or {}).get("kd", 1.0))
        new = round(min(spec.max_weight, old * spec.weight_factor), 4)
        others = sorted(c for c, w in channels.items() if w and c != "kd")
        s.change("domain_shares", f"loss.domain_channel_shares.{d}.kd", new,
                 f.message + f"; its kd share x{spec.weight_factor} ({old:g} -> {new:g})"
                 + (f" against {', '.join(others)}" if others else ""))


def plateau(s: StrategyStep) -> None:
    """A channel whose loss stalled gets more weight (S2.5.3)."""
    spec = s.spec
    for f in s.of_kind("stall"):
        ch = f.evidence["channel"]
        w = s.get(f"loss.channels.{ch}")
        if w:
            s.change("plateau", f"loss.channels.{ch}", round(min(spec.max_weight, w * spec.weight_factor), 4),
                     f.message + f"; weight x{spec.weight_factor} to break the plateau")


def hard_pool(s: StrategyStep) -> None:
    """The most divergent training samples train at ``hard_weight`` next round (S4.3)."""
    spec = s.spec
    for f in s.of_kind("hard_samples"):
        pool = dict(s.get("hard_pool") or {})
        before = len(pool)
        for smp in f.evidence["samples"]:
            pool[smp["example_id"]] = spec.hard_weight
        pool = dict(list(pool.items())[-spec.hard_pool_max:])
        if len(pool) != before or set(pool) != set(s.get("hard_pool") or {}):
            old = len(s.get("hard_pool") or {})
            s.record("hard_pool", "hard_pool", old, len(pool),
                     f"{len(f.evidence['samples'])} high-KL training samples enter the hard pool "
                     f"with weight {spec.hard_weight} (pool {old} -> {len(pool)})", value=pool)


def curriculum(s: StrategyStep) -> None:
    """Advance one tier when this tier's gates hold (L3)."""
    tier = s.get("curriculum.tier") or TIERS[0]
    gates = s.spec.tier_gates.get(tier, ())
    if tier != TIERS[-1] and gates and all(s.gate_status.get(g) == "pass" for g in gates):
        nxt = TIERS[TIERS.index(tier) + 1]
        s.change("curriculum", "curriculum.tier", nxt,
                 f"tier {tier!r} holds (gates {', '.join(gates)} pass); moving up to {nxt!r}")


CORE_RULES: dict[str, Rule] = {"revert": revert, "weak_domain": weak_domain, "domain_shares": domain_shares,
                               "plateau": plateau,
                               "hard_pool": hard_pool, "curriculum": curriculum}


def rule_list(spec: StrategySpec, extra: list[tuple[str, Rule]] = ()) -> list[tuple[str, Rule]]:
    """The configured core rules in order, then ``extra`` (each stage's ``rules()``)."""
    return [(n, CORE_RULES[n]) for n in spec.rules] + list(extra)


def next_recipe(recipe: dict, findings: list[Finding], *, iteration: int, last_good: dict | None,
                gate_status: dict[str, str], recent_decisions: list[Decision],
                spec: StrategySpec | None = None, rules: list[tuple[str, Rule]] | None = None
                ) -> tuple[dict, list[Decision]]:
    """Return (recipe for iteration+1, decisions). Pure: inputs are not modified."""
    spec = spec or StrategySpec()
    cooling = {d.knob for d in recent_decisions if d.rule == "revert" and iteration - d.iteration < spec.cooldown}
    step = StrategyStep(iteration, copy.deepcopy(recipe), [f for f in findings if not f.uncertain], last_good,
                        gate_status, list(recent_decisions), spec, cooling=cooling)
    for _, rule in (rule_list(spec) if rules is None else rules):
        rule(step)
    return step.recipe, step.decisions


__all__ = ["StrategySpec", "StrategyStep", "Rule", "CORE_RULES", "CORE_RULE_NAMES", "Decision", "next_recipe",
           "rule_list"]
