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
4. ``tune``: a failing language-modelling gate (G-C1 and the other quality metrics of
   :data:`~distillgate.knobs.QUALITY_METRICS`) moves one knob of ``tune_knobs`` one step: the one with the best
   expected effect, from what this run measured of earlier moves (and exploration trials) or else the knob's
   prior; a move whose measured effect failed is reverted the next iteration and its direction flipped; when
   that knob is held (the exploration moved it this iteration) the rule stands down for the iteration rather than
   move a knob it expects less of;
5. ``hard_pool``: the most divergent training samples enter a hard pool trained with ``hard_weight`` (S4.3);
6. ``curriculum``: the capability tier (L3: lm -> mid -> high) advances only when the lower tier's gates hold.

Every change names the finding it answers and its expected effect (:class:`Decision`), and goes through the knob
space (:mod:`distillgate.knobs`): a value outside a knob's allowed range is refused, with the reason logged and
returned, never clamped. A knob the exploration moved (adopted) in the same iteration is *held*: no rule moves
it again for the next recipe (the exploration's measured choice wins over a rule's prior or trend; stacking a
rule's step on the adopted one moves the knob twice on one measurement). The skip is logged and returned with
the reason (``skipped_change`` findings). Every number is a field of :class:`StrategySpec` (the config's
``loop.strategy`` section). Findings marked ``uncertain`` (a measurement whose confidence interval crosses its
threshold) are never acted on.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import reject_unknown
from .knobs import KNOB_SPACE, QUALITY_METRICS, ExplorationSpec, Memory, direction, knob
from .schema import TIERS, Decision, Finding

log = logging.getLogger(__name__)

CORE_RULE_NAMES = ("revert", "weak_domain", "domain_shares", "plateau", "tune", "hard_pool", "curriculum")


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
    tune_knobs: list[str] = Field(["train.lr", "loss.channels.ce", "loss.difficulty_weighting"],
                                  description="knobs the tune rule may move to repair a failing language-"
                                              "modelling gate, one per iteration (train.steps and data.prompts "
                                              "are in the knob space too, but buy quality with compute)")
    knob_steps: dict[str, float] = Field(default_factory=dict, description="knob -> size of one tune move "
                                         "(factor for log knobs, delta for linear ones; default: the knob "
                                         "space's)")
    ranges: dict[str, list[float]] = Field(default_factory=dict, description="knob -> [low, high] allowed "
                                           "range, narrower than the knob space's; a change outside is refused")
    trend_decay: float = Field(0.5, ge=0.0, le=1.0, description="share of the previous iteration's relative "
                               "change a metric is expected to repeat without any change: a rule move's measured "
                               "effect is its iteration's change minus this times the one before")
    exploration: ExplorationSpec = Field(default_factory=ExplorationSpec,
                                         description="short exploratory variants per iteration (off by default)")

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

    @field_validator("tune_knobs")
    @classmethod
    def _tune_knobs(cls, v):
        movable = [n for n, k in KNOB_SPACE.items() if k.scale in ("log", "linear", "int", "bool") and "*" not in n]
        reject_unknown(v, movable, "tune knob")
        return v

    @field_validator("knob_steps", "ranges")
    @classmethod
    def _knob_names(cls, v, info):
        reject_unknown(v, [n for n in KNOB_SPACE if "*" not in n], "knob")
        for name, val in v.items():
            k = KNOB_SPACE[name]
            if info.field_name == "ranges" and (len(val) != 2 or k.low is None
                                                or not (k.low <= val[0] <= val[1] <= k.high)):
                raise ValueError(f"ranges.{name}: {val} must be [low, high] inside {k.allowed()}")
            if info.field_name == "knob_steps" and (val <= (1.0 if k.scale in ("log", "int") else 0.0)):
                raise ValueError(f"knob_steps.{name}: {val} must be > {1 if k.scale in ('log', 'int') else 0}")
        return v

    def knob_range(self, name: str) -> tuple[float | None, float | None]:
        """The allowed range of a recipe key (the knob space's, narrowed by ``ranges`` and ``max_weight``)."""
        k = knob(name)
        if k is None:
            return None, None
        lo, hi = self.ranges.get(k.name, (k.low, k.high))
        if k.name in ("loss.domain_weights.*", "loss.channels.kd", "loss.channels.*") and hi is not None:
            hi = min(hi, self.max_weight)
        return lo, hi


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


def _with_expected(reason: str, expected: dict | None) -> str:
    if not expected or expected.get("change") is None:
        return reason
    return f"{reason}; expected {expected['metric']} {100 * expected['change']:+.1f}% ({expected['source']})"


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
    memory: Memory = field(default_factory=lambda: Memory(None))
    defaults: dict = field(default_factory=dict)    # the config's value of a knob the recipe does not hold
    refused: list[dict] = field(default_factory=list)
    # knob -> why it is held: moved earlier in this iteration (the exploration's adopted variant); no rule moves
    # it (nor a knob inside it / containing it) for the next recipe
    held: dict[str, str] = field(default_factory=dict)
    # knob -> {"why": str, "refuted": [[incumbent, value], ...]}: the exploration screened it, kept its value and
    # bounds it (``screen_bounds``): a rule may move it toward a refuted value, not to it or past it
    bounds: dict[str, dict] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)

    def get(self, knob: str):
        v = _get(self.recipe, knob)
        return self.defaults.get(knob) if v is None else v

    def allowed(self, rule: str, name: str, value, reason: str) -> bool:
        """Whether ``value`` is inside ``name``'s allowed range; a refusal is logged and kept in ``refused``."""
        k = knob(name)
        if k is None or value is None:
            return True
        lo, hi = self.spec.knob_range(name)
        bounded = k if lo is None else dataclasses.replace(k, low=lo, high=hi)
        if bounded.contains(value):
            return True
        why = (f"{rule}: {name} -> {value!r} refused: outside its allowed range {bounded.allowed()} "
               f"(wanted for: {reason})")
        log.warning(why)
        self.refused.append({"iteration": self.iteration, "rule": rule, "knob": name, "value": value,
                             "allowed": bounded.allowed(), "reason": why})
        return False

    def holder(self, name: str) -> str | None:
        """The held knob that ``name`` is, lies inside (``loss.channels.ce`` in ``loss.channels``) or contains."""
        for h in self.held:
            if name == h or name.startswith(h + ".") or h.startswith(name + "."):
                return h
        return None

    def free(self, rule: str, name: str, value, reason: str) -> bool:
        """Whether ``name`` may move; a held knob's change is skipped, logged and kept in ``skipped``."""
        h = self.holder(name)
        if h is not None:
            by = self.held[h]
            why = (f"{rule}: {name} -> {value!r} skipped: {by} in this iteration, and its measured choice "
                   f"stands (wanted for: {reason})")
        elif name in self.bounds and reaches_refuted(self.bounds[name]["refuted"], value):
            h, by = name, self.bounds[name]["why"]
            why = (f"{rule}: {name} -> {value!r} skipped: {by}; {value!r} is at or past a value the screens "
                   f"measured no better (wanted for: {reason})")
        else:
            return True
        log.info(why)
        self.skipped.append({"iteration": self.iteration, "rule": rule, "knob": name, "value": value,
                             "held": h, "held_by": by, "reason": why})
        return False

    def change(self, rule: str, knob: str, value, reason: str, *, answers: str = "",
               expected: dict | None = None) -> bool:
        """Set ``knob`` to ``value`` (skipped when unchanged, or cooling down after a revert unless this is one;
        refused outside the knob's range; skipped when held). ``expected``: ``{metric, change, source}``
        (default: the knob's expected effect on KL, measured in this run or from its prior). Returns whether it
        changed."""
        old = self.get(knob)
        if old == value or (knob in self.cooling and rule != "revert"):
            return False
        if not self.free(rule, knob, value, reason) or not self.allowed(rule, knob, value, reason):
            return False
        if expected is None and rule != "revert":
            expected = self.expect(knob, "kl", old, value)
        _set(self.recipe, knob, value)
        self.decisions.append(Decision(self.iteration, rule, knob, old, value, _with_expected(reason, expected),
                                       answers, expected))
        return True

    def record(self, rule: str, knob: str, old, new, reason: str, value=None, *, answers: str = "",
               expected: dict | None = None) -> bool:
        """A change whose logged old/new differ from the value written (e.g. a pool logged by its size); skipped
        (False) when ``knob`` is held."""
        if not self.free(rule, knob, new if value is None else value, reason):
            return False
        if expected is None:
            expected = self.expect(knob, "kl", None, None)
        _set(self.recipe, knob, new if value is None else value)
        self.decisions.append(Decision(self.iteration, rule, knob, old, new, _with_expected(reason, expected),
                                       answers, expected))
        return True

    def expect(self, name: str, metric: str, old, new) -> dict:
        """The expected relative change of ``metric`` for ``name``: ``old -> new``, per move, with its source."""
        change, source = self.memory.expected(name, metric, direction(old, new) or 1)
        k = knob(name)
        if k is not None and isinstance(old, (int, float)) and isinstance(new, (int, float)) \
                and not isinstance(old, bool):
            change *= k.magnitude(old, new)
        return {"metric": metric, "change": round(change, 6), "source": source}

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
    for name in dict.fromkeys(knobs):
        good = _get(s.last_good, name)
        s.change("revert", name, copy.deepcopy(good),
                 f"{regs[0].metric} regressed ({regs[0].message}); reverting {name} to the last good value",
                 answers=f"regression {regs[0].subject}",
                 expected={"metric": regs[0].subject, "change": round(-float(regs[0].evidence.get(
                     "relative_worsening", 0.0)) if regs[0].evidence.get("relative_worsening") != float("inf")
                     else -1.0, 6), "source": "undo the measured regression"})
    s.cooling |= set(knobs)


def weak_domain(s: StrategyStep) -> None:
    """More loss weight and more data for a weak domain."""
    spec = s.spec
    for f in s.of_kind("weak_domain"):
        d = f.evidence["domain"]
        w = float(s.get(f"loss.domain_weights.{d}") or 1.0)
        new_w = round(min(spec.max_weight, w * spec.weight_factor), 4)
        s.change("weak_domain", f"loss.domain_weights.{d}", new_w, f.message + f"; loss weight x{spec.weight_factor}",
                 answers=f"weak_domain {d}", expected=s.expect(f"loss.domain_weights.{d}", f"kl/domain/{d}", w, new_w)
                 if s.memory.effects(f"loss.domain_weights.{d}", f"kl/domain/{d}") else
                 {"metric": f"kl/domain/{d}", "change": -0.05, "source": "prior"})
        mix = s.get("data.mix")
        if isinstance(mix, dict) and d in mix and "data.mix" not in s.cooling:
            boosted = dict(mix)
            boosted[d] = mix[d] * spec.weight_factor
            boosted = _normalise(boosted)
            old_mix = dict(mix)
            s.record("weak_domain", "data.mix", old_mix, boosted,
                     f"{d}: share {old_mix[d]:.3f} -> {boosted[d]:.3f} of next round's prompts",
                     answers=f"weak_domain {d}", expected={"metric": f"kl/domain/{d}", "change": -0.02,
                                                          "source": "prior"})


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
            new_w = round(min(spec.max_weight, w * spec.weight_factor), 4)
            s.change("plateau", f"loss.channels.{ch}", new_w, f.message + f"; weight x{spec.weight_factor} to "
                     f"break the plateau", answers=f"stall {f.subject}",
                     expected=s.expect(f"loss.channels.{ch}", f"loss/{ch}", w, new_w))


def _tune_step(s: StrategyStep, name: str) -> float:
    return float(s.spec.knob_steps.get(name, KNOB_SPACE[name].step))


def tune(s: StrategyStep) -> None:
    """A failing language-modelling gate moves one knob one step (the best expected effect); a tune move whose
    measured effect failed is reverted first (then its knob moves the other way next time)."""
    fails = [f for f in s.of_kind("gate_fail") if f.subject in QUALITY_METRICS]
    if not fails:
        return
    f = fails[0]
    metric, answers = f.subject, f"gate_fail {(f.evidence.get('gate') or {}).get('id', '')} {f.subject}".strip()
    mem = s.memory
    for m in mem.moves:  # the last tune move, measured this iteration, failed: undo it (one change per round)
        if m["rule"] == "tune" and m["applies_to"] == s.iteration and m["status"] == "failed" \
                and m["status_kept"] == "kept" and not isinstance(m["old"], str):
            eff = m["measured"].get(m["metric"] or "kl")
            mem.data["directions"][m["knob"]] = -m["direction"]
            s.change("tune", m["knob"], m["old"],
                     f"repair failed: {m['knob']} {m['old']} -> {m['new']} changed {m['metric']} by "
                     f"{100 * eff:+.1f}% net of the trend (expected {100 * (m['expected'] or 0):+.1f}%); reverting, "
                     f"the next move of {m['knob']} goes the other way", answers=answers,
                     expected={"metric": m["metric"], "change": round(-eff, 6), "source": "undo the measured effect"})
            return
    candidates = []
    for order, name in enumerate(s.spec.tune_knobs):
        if name in s.cooling or any(d.knob == name for d in s.decisions):
            continue
        k, cur = KNOB_SPACE[name], s.get(name)
        if cur is None:
            continue
        sign = mem.direction(name)
        if k.scale == "bool":
            new = not bool(cur)
            sign = 1 if new else -1
        else:
            new = dataclasses.replace(k, step=_tune_step(s, name)).moved(cur, sign)
        change, source = mem.expected(name, metric, sign)
        if k.scale not in ("bool",) and not isinstance(cur, bool):
            change *= k.magnitude(cur, new) if new != cur else 0.0
        good = change < 0 if metric != "top1_agreement" else change > 0
        if good:
            candidates.append((-abs(change), order, name, cur, new, change, source, sign))
    for _, _, name, cur, new, change, source, sign in sorted(candidates):
        why = (f"{f.message}: {name} {cur} -> {new} (one step {'up' if sign > 0 else 'down'}), the knob "
               f"with the best expected effect on {metric}")
        if not s.free("tune", name, new, why):
            return  # the exploration moved this knob this iteration: that measured move stands, no substitute
        if s.change("tune", name, new, why, answers=answers,
                    expected={"metric": metric, "change": round(change, 6), "source": source}):
            return  # one tune move per iteration, so its measured effect is its own


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
                     f"with weight {spec.hard_weight} (pool {old} -> {len(pool)})", value=pool,
                     answers=f"hard_samples {f.subject}")


def curriculum(s: StrategyStep) -> None:
    """Advance one tier when this tier's gates hold (L3)."""
    tier = s.get("curriculum.tier") or TIERS[0]
    gates = s.spec.tier_gates.get(tier, ())
    if tier != TIERS[-1] and gates and all(s.gate_status.get(g) == "pass" for g in gates):
        nxt = TIERS[TIERS.index(tier) + 1]
        s.change("curriculum", "curriculum.tier", nxt,
                 f"tier {tier!r} holds (gates {', '.join(gates)} pass); moving up to {nxt!r}",
                 answers=f"gates {', '.join(gates)} pass", expected={"metric": "kl", "change": 0.0,
                                                                   "source": "prior: harder prompts next"})


CORE_RULES: dict[str, Rule] = {"revert": revert, "weak_domain": weak_domain, "domain_shares": domain_shares,
                               "plateau": plateau, "tune": tune,
                               "hard_pool": hard_pool, "curriculum": curriculum}


def rule_list(spec: StrategySpec, extra: list[tuple[str, Rule]] = ()) -> list[tuple[str, Rule]]:
    """The configured core rules in order, then ``extra`` (each stage's ``rules()``)."""
    return [(n, CORE_RULES[n]) for n in spec.rules] + list(extra)


def reaches_refuted(refuted, value) -> bool:
    """Whether ``value`` is at or past a refuted value, seen from the incumbent it was screened against
    (``refuted``: ``[[incumbent, value], ...]``); for a non-numeric or on/off knob: whether it is that value."""
    for inc, r in refuted:
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in (inc, r, value)):
            if value == r:
                return True
            continue
        tol = 1e-9 * max(abs(r), abs(inc))
        if (r > inc and value >= r - tol) or (r < inc and value <= r + tol):
            return True
    return False


def _held_reason(d: Decision) -> str:
    exp = d.expected or {}
    measured = (f", measured {exp.get('metric', 'kl')} {100 * exp['change']:+.1f}% ({exp.get('source', '')})"
                if isinstance(exp.get("change"), (int, float)) else "")
    return f"{d.rule or 'an earlier change'} moved {d.knob} {d.old} -> {d.new}{measured}"


def next_recipe(recipe: dict, findings: list[Finding], *, iteration: int, last_good: dict | None,
                gate_status: dict[str, str], recent_decisions: list[Decision],
                spec: StrategySpec | None = None, rules: list[tuple[str, Rule]] | None = None,
                memory: dict | None = None, defaults: dict | None = None, refused: list | None = None,
                held: list[Decision] = (), screened: dict | None = None,
                skipped: list | None = None) -> tuple[dict, list[Decision]]:
    """Return (recipe for iteration+1, decisions). Pure: inputs are not modified.

    ``memory``: the loop state's ``strategy`` dict (what this run measured; the tune rule updates its
    ``directions`` in place); ``defaults``: the
    config's value of knobs the recipe does not hold; ``refused``: a list refused changes are appended to;
    ``held``: the changes already made to this iteration's recipe (the exploration's adopted variant): no rule
    moves their knobs again, and each skipped change is appended to ``skipped``; ``screened``: knob -> reason,
    knobs the exploration screened this iteration and kept (its A/B measured no better value), held the same
    way; a value that is a dict ``{"why", "refuted"}`` (``screen_bounds``) bounds the knob instead: a rule may
    move it toward a refuted value, not to it or past it."""
    spec = spec or StrategySpec()
    cooling = {d.knob for d in recent_decisions if d.rule == "revert" and iteration - d.iteration < spec.cooldown}
    step = StrategyStep(iteration, copy.deepcopy(recipe), [f for f in findings if not f.uncertain], last_good,
                        gate_status, list(recent_decisions), spec, cooling=cooling,
                        memory=Memory(memory if memory is not None else None), defaults=dict(defaults or {}),
                        held={**{k: v for k, v in (screened or {}).items() if isinstance(v, str)},
                              **{d.knob: _held_reason(d) for d in held}},
                        bounds={k: v for k, v in (screened or {}).items() if isinstance(v, dict)})
    for _, rule in (rule_list(spec) if rules is None else rules):
        rule(step)
    if refused is not None:
        refused += step.refused
    if skipped is not None:
        skipped += step.skipped
    return step.recipe, step.decisions


def knob_defaults(cfg) -> dict:
    """The run config's value of every tune-able knob (what a recipe without the key runs with)."""
    return {"train.lr": cfg.train.lr, "train.steps": cfg.train.steps, "train.warmup_steps": cfg.train.warmup_steps,
            "train.min_lr_ratio": cfg.train.min_lr_ratio, "loss.channels.ce": float(cfg.loss.channels.get("ce", 0.0)),
            "loss.channels.kd": float(cfg.loss.channels.get("kd", 0.0)),
            "loss.temperature.value": cfg.loss.temperature.value, "loss.temperature.min": cfg.loss.temperature.min,
            "loss.temperature.max": cfg.loss.temperature.max, "loss.temperature.policy": cfg.loss.temperature.policy,
            "loss.difficulty_weighting": cfg.loss.difficulty_weighting,
            "loss.difficulty_floor": cfg.loss.difficulty_floor, "data.prompts": cfg.loop.prompts_per_iteration}


__all__ = ["StrategySpec", "StrategyStep", "Rule", "CORE_RULES", "CORE_RULE_NAMES", "Decision", "next_recipe",
           "rule_list", "knob_defaults"]
