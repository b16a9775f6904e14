"""Compensate (SPEC L1.5): a rule-based strategy engine that turns findings into the next recipe.

A *recipe* is the plain dict of knobs one iteration runs with::

    {"loss": {"channels": {...}, "temperature": {...}, "domain_weights": {...}, ...},
     "train": {"lr": ..., "steps": ...}, "data": {"mix": {domain: share}},
     "hard_pool": {example_id: weight}, "curriculum": {"tier": "lm"}}

Every change is a :class:`Decision` with the rule that made it and its reason; rules run in a fixed order:

1. ``revert``: a change followed by a regression is reverted (to the last good iteration's value), and the
   reverted knob is left alone for ``cooldown`` iterations;
2. ``weak_domain``: a domain whose KL is well above the mean gets more loss weight and more data;
3. ``plateau``: a channel whose loss slope stayed under its threshold for 3 iterations gets more weight
   (SPEC S2.5 level 3);
4. ``hard_pool``: the most divergent training samples enter a hard pool trained with 3x weight (S4.3);
5. ``curriculum``: the capability tier (L3: lm -> mid -> high) advances only when the lower tier's gates hold.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

from .attribution import Finding

TIERS = ("lm", "mid", "high")
# Which gates must hold before the curriculum leaves a tier (SPEC L3).
TIER_GATES = {"lm": ("G-C1",), "mid": ("G-C2",), "high": ("G-C3", "G-C4")}


@dataclass
class StrategySpec:
    weight_factor: float = 1.5
    max_weight: float = 4.0
    hard_weight: float = 3.0
    hard_pool_max: int = 256
    cooldown: int = 2


@dataclass
class Decision:
    iteration: int
    rule: str
    knob: str
    old: Any
    new: Any
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


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


def next_recipe(recipe: dict, findings: list[Finding], *, iteration: int, last_good: dict | None,
                gate_status: dict[str, str], recent_decisions: list[Decision],
                spec: StrategySpec | None = None) -> tuple[dict, list[Decision]]:
    """Return (recipe for iteration+1, decisions). Pure: inputs are not modified."""
    spec = spec or StrategySpec()
    new = copy.deepcopy(recipe)
    decisions: list[Decision] = []
    cooling = {d.knob for d in recent_decisions
               if d.rule == "revert" and iteration - d.iteration < spec.cooldown}

    def change(rule: str, knob: str, value, reason: str) -> None:
        old = _get(new, knob)
        if old == value or (knob in cooling and rule != "revert"):
            return
        _set(new, knob, value)
        decisions.append(Decision(iteration, rule, knob, old, value, reason))

    # 1. revert what the previous iteration changed when this iteration regressed.
    regs = [f for f in findings if f.kind == "regression"]
    if regs and last_good is not None:
        changed_last = [d for d in recent_decisions if d.iteration == iteration - 1 and d.rule != "revert"]
        blamed = regs[0].evidence.get("knob_blame", [])
        knobs = [d.knob for d in changed_last] or [b["knob"] for b in blamed[:1] if b["knob"] != "hard_pool"]
        for knob in dict.fromkeys(knobs):
            good = _get(last_good, knob)
            change("revert", knob, copy.deepcopy(good),
                   f"{regs[0].metric} regressed ({regs[0].message}); reverting {knob} to the last good value")
        cooling |= set(knobs)

    # 2. weak domains: more loss weight and more data.
    for f in findings:
        if f.kind != "weak_domain":
            continue
        d = f.evidence["domain"]
        w = float(_get(new, f"loss.domain_weights.{d}") or 1.0)
        change("weak_domain", f"loss.domain_weights.{d}", round(min(spec.max_weight, w * spec.weight_factor), 4),
               f.message + f"; loss weight x{spec.weight_factor}")
        mix = _get(new, "data.mix")
        if isinstance(mix, dict) and d in mix and "data.mix" not in cooling:
            boosted = dict(mix)
            boosted[d] = mix[d] * spec.weight_factor
            boosted = _normalise(boosted)
            old_mix = dict(mix)
            _set(new, "data.mix", boosted)
            decisions.append(Decision(iteration, "weak_domain", "data.mix", old_mix, boosted,
                                      f"{d}: share {old_mix[d]:.3f} -> {boosted[d]:.3f} of next round's prompts"))

    # 3. plateaued channels get more weight (S2.5.3).
    for f in findings:
        if f.kind != "stall":
            continue
        ch = f.evidence["channel"]
        w = _get(new, f"loss.channels.{ch}")
        if w:
            change("plateau", f"loss.channels.{ch}", round(min(spec.max_weight, w * spec.weight_factor), 4),
                   f.message + f"; weight x{spec.weight_factor} to break the plateau")

    # 4. hard pool: the most divergent training samples, 3x weight next round.
    for f in findings:
        if f.kind != "hard_samples":
            continue
        pool = dict(_get(new, "hard_pool") or {})
        before = len(pool)
        for s in f.evidence["samples"]:
            pool[s["example_id"]] = spec.hard_weight
        pool = dict(list(pool.items())[-spec.hard_pool_max:])
        if len(pool) != before or set(pool) != set(_get(new, "hard_pool") or {}):
            old = len(_get(new, "hard_pool") or {})
            _set(new, "hard_pool", pool)
            decisions.append(Decision(iteration, "hard_pool", "hard_pool", old, len(pool),
                                      f"{len(f.evidence['samples'])} high-KL training samples enter the hard pool "
                                      f"with weight {spec.hard_weight} (pool {old} -> {len(pool)})"))

    # 5. curriculum: advance one tier when this tier's gates hold.
    tier = _get(new, "curriculum.tier") or TIERS[0]
    gates = TIER_GATES.get(tier, ())
    if tier != TIERS[-1] and gates and all(gate_status.get(g) == "pass" for g in gates):
        nxt = TIERS[TIERS.index(tier) + 1]
        change("curriculum", "curriculum.tier", nxt,
               f"tier {tier!r} holds (gates {', '.join(gates)} pass); moving up to {nxt!r}")
    return new, decisions
