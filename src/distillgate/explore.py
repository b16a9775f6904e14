"""Exploration within a budget (issue 16): per iteration, a few short variants of the recipe, one knob each.

Before an exploring stage's map (``loop.strategy.exploration.stages``), from the iteration's starting weights:

1. Optuna proposes ``variants`` one-knob changes of the iteration's recipe (``TPESampler`` over the earlier
   trials of this run, kept in the loop state; the first ``startup_trials`` are random). Each picks a knob from
   ``exploration.knobs`` (each knob once, in order, before the sampler chooses) and a value in its range;
2. the main recipe and each variant train ``h`` steps from the same weights, on the same batches in the same
   order, at a constant learning rate (no warmup or decay: a short horizon compares rates of progress), where
   ``h = floor(budget x main steps / (variants + 1))`` (fewer variants when that is under one step);
3. each is scored by the exact KL(teacher || student) on the **selection split**: training-pool prompts
   reserved at the run's start (``selection_prompts``), never trained on and disjoint from the held-out set
   the gates use, so picking on it does not bias the verdict;
4. the weights go back to the starting point; if the best variant beats the main recipe by more than
   ``margin`` (relative selection KL), its knob value replaces the recipe's for this iteration's main
   training (a decision of rule ``explore``, with the measured gain as its expected effect) and stays in the
   recipe after it (exploit); else the main recipe continues unchanged.

The trials (knob, incumbent and proposed value, relative selection KL) are the strategy's clean measurements:
:class:`distillgate.knobs.Memory` uses them for expected effects and knob blame. The exploration's steps and
seconds are in the iteration's metrics (``explore/steps``, ``explore/seconds``) and inside its map phase time.
Everything is deterministic from the loop state (the sampler is rebuilt from the stored trials with a seed of
the iteration), so a run killed mid-exploration resumes to the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time

from .knobs import KNOB_SPACE, Memory, direction, knob
from .schema import Decision, Finding

log = logging.getLogger(__name__)


def horizon(budget: float, main_steps: int, variants: int) -> tuple[int, int]:
    """(variants, steps each) that fit ``budget x main_steps`` extra steps (the main recipe's short run counts)."""
    n = variants
    while n > 0:
        h = int(math.floor(budget * main_steps / (n + 1) + 1e-9))
        if h >= 1:
            return n, h
        n -= 1
    return 0, 0


def _relevant(name: str, recipe: dict) -> bool:
    policy = (recipe.get("loss", {}).get("temperature") or {}).get("policy", "fixed")
    if name in ("loss.temperature.min", "loss.temperature.max"):
        return policy != "fixed"
    if name == "loss.temperature.value":
        return policy == "fixed"
    return True


def _distribution(spec, name: str):
    from optuna.distributions import FloatDistribution, IntDistribution

    k = KNOB_SPACE[name]
    lo, hi = spec.range_of(name)
    if k.scale == "int":
        return IntDistribution(int(lo), int(hi), log=lo > 0)
    return FloatDistribution(lo, hi, log=k.scale == "log" and lo > 0)


def _study(spec, trials: list[dict], names: list[str], seed: int):
    """An Optuna study holding this run's earlier trials (rebuilt every iteration: deterministic, resumable)."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    choice = CategoricalDistribution(tuple(names))
    for t in trials:
        if t.get("knob") not in names or t.get("value") is None:
            continue
        dist = _distribution(spec, t["knob"])
        if not dist.low <= t["proposed"] <= dist.high:  # a range changed since (a resumed run's edited config)
            continue
        study.add_trial(optuna.trial.create_trial(params={"knob": t["knob"], t["knob"]: t["proposed"]},
                                                  distributions={"knob": choice, t["knob"]: dist},
                                                  value=t["value"]))
    return study, choice


def _propose(spec, study, choice) -> tuple[str, float]:
    trial = study.ask()
    name = trial.suggest_categorical("knob", list(choice.choices))
    dist = _distribution(spec, name)
    if dist.__class__.__name__ == "IntDistribution":
        value = trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    else:
        value = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    k = KNOB_SPACE[name]
    value = int(value) if k.scale == "int" else float(f"{value:.4g}")
    return name, value


def _set(recipe: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = recipe
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def _valid(proposals, it, run, apply_recipe) -> list[tuple[str, object]]:
    """The proposals whose recipe is a valid config; one that is not (a knob inside its own range that breaks a
    joint constraint, e.g. ``temperature.max`` under ``temperature.min``) is refused with a logged reason and a
    ``refused_change`` finding, before any step is spent on it."""
    out = []
    for name, value in proposals:
        recipe = copy.deepcopy(it.recipe)
        _set(recipe, name, value)
        try:
            apply_recipe(run.cfg, recipe)
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            detail = str(e).splitlines()
            detail = detail[2].strip() if len(detail) > 2 else str(e)
            why = f"explore: {name} -> {value!r} refused: the recipe it makes is not a valid config ({detail})"
            log.warning(why)
            it.findings.append(Finding("refused_change", "warning", name, why, {"knob": name, "value": value}))
            continue
        out.append((name, value))
    return out


def selection_kl(run) -> float:
    from . import pipeline
    from .evaluate.providers import divergence_samples

    r, _ = divergence_samples(run.student, run.teacher.model, run.selection, pipeline.pad_id(run.teacher.tokenizer),
                              teacher_cache=run.teacher_cache)
    return float(r["kl_forward_mean"])


def explore(it, run, stage_names: list[str]) -> None:
    """Run the iteration's exploration (see the module docstring); a no-op when it is off or does not apply."""
    from .loop.run import apply_recipe
    from .strategy import knob_defaults

    spec = run.cfg.loop.strategy.exploration
    if spec.budget <= 0 or it.index < 1 or not any(n in spec.stages for n in stage_names) or not run.selection:
        return
    main_steps = int(it.recipe["train"]["steps"])
    n, h = horizon(spec.budget, main_steps, spec.variants)
    if n == 0:
        it.findings.append(Finding("exploration", "info", "exploration",
                                   f"no exploration: a budget of {spec.budget:.0%} of {main_steps} steps gives no "
                                   f"variant a step", {"budget": spec.budget, "steps": main_steps}))
        return
    defaults = knob_defaults(it.cfg)
    names = [k for k in spec.knobs if _relevant(k, it.recipe)]
    if not names:
        return
    t0 = time.time()
    memory = Memory(run.state.strategy)
    study, choice = _study(spec, memory.trials, names, seed=spec.seed * 100_003 + it.index)
    proposals = []
    for j in range(n):
        tried = len([t for t in memory.trials if t.get("knob") in names]) + j
        if tried < len(names):  # every knob once first (its value from the sampler), then TPE chooses the knob
            study.enqueue_trial({"knob": names[tried]}, skip_if_exists=False)
        name, value = _propose(spec, study, choice)
        proposals.append((name, value))
    proposals = _valid(proposals, it, run, apply_recipe)
    if not proposals:
        return
    n = len(proposals)
    start = {k: v.detach().clone() for k, v in run.student.state_dict().items()}
    results = []
    try:
        for j, prop in enumerate([None] + proposals):
            recipe = copy.deepcopy(it.recipe)
            if prop is not None:
                _set(recipe, prop[0], prop[1])
            cfg = apply_recipe(run.cfg, recipe)
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"warmup_steps": 0,
                                                                               "min_lr_ratio": 1.0})})
            short = dataclasses.replace(it, recipe=recipe, cfg=cfg, metrics={}, findings=[], train_terms={})
            run.say(f"  explore {j}/{n}: {'main recipe' if prop is None else f'{prop[0]} = {prop[1]:g}'}, "
                    f"{h} steps")
            run.distil(short, steps=h)
            results.append(selection_kl(run))
            run.student.load_state_dict(start)
    finally:
        run.student.load_state_dict(start)
    base = results[0]
    rows = [{"variant": 0, "knob": None, "value": None, "selection_kl": base, "relative": 0.0}]
    for j, ((name, value), kl) in enumerate(zip(proposals, results[1:]), 1):
        rel = kl / base - 1.0 if base > 0 else 0.0
        incumbent = _get(it.recipe, name, defaults)
        memory.trials.append({"iteration": it.index, "knob": name, "incumbent": incumbent, "proposed": value,
                              "value": round(rel, 8), "steps": h, "adopted": False})
        rows.append({"variant": j, "knob": name, "value": value, "incumbent": incumbent, "selection_kl": kl,
                     "relative": rel})
    best = min(rows[1:], key=lambda r: r["relative"])
    adopted = best["relative"] < -spec.margin
    if adopted:
        name, value = best["knob"], best["value"]
        old = _get(it.recipe, name, defaults)
        lo, hi = run.cfg.loop.strategy.knob_range(name)
        k = knob(name)
        bounded = k if lo is None else dataclasses.replace(k, low=lo, high=hi)
        if not bounded.contains(value):
            why = f"explore: {name} -> {value!r} refused: outside its allowed range {bounded.allowed()}"
            log.warning(why)
            it.findings.append(Finding("refused_change", "warning", name, why, {"knob": name, "value": value}))
            adopted = False
        else:
            _set(it.recipe, name, value)
            it.cfg = apply_recipe(run.cfg, it.recipe)
            memory.trials[-(n - best["variant"] + 1)]["adopted"] = True
            expected = {"metric": "kl", "change": round(best["relative"], 6),
                        "source": f"explore: selection split, {h} steps"}
            reason = (f"variant {best['variant']} of {n} ({name} {old} -> {value}) beat the main recipe on the "
                      f"selection split by {-100 * best['relative']:.2f}% KL after {h} steps "
                      f"({best['selection_kl']:.4f} vs {base:.4f}); it trains this iteration and stays; "
                      f"expected kl {100 * best['relative']:+.1f}% (explore)")
            d = Decision(it.index, "explore", name, old, value, reason, "exploration (selection split)", expected)
            it.decisions.append(d)
            memory.add_move(d, it.index, "kl", expected["change"], expected["source"], d.answers,
                            direction(old, value))
    seconds = time.time() - t0
    it.metrics.update({"explore/steps": (n + 1) * h, "explore/variants": n, "explore/horizon": h,
                       "explore/seconds": round(seconds, 3), "explore/best_relative_kl": best["relative"],
                       "explore/adopted": int(adopted), "explore/selection_kl_main": base})
    out = run.work / f"exploration-{it.index:03d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from .io import atomic_write_json

    atomic_write_json(out, {"iteration": it.index, "horizon": h, "variants": rows, "adopted": adopted,
                            "budget": spec.budget, "main_steps": main_steps, "seconds": seconds})
    it.files["exploration.json"] = str(out)
    it.findings.append(Finding("exploration", "info", "exploration",
                               f"{n} variants x {h} steps (+{(n + 1) * h} steps, {seconds:.0f} s): "
                               + ", ".join(f"{r['knob']}={r['value']:g}: {100 * r['relative']:+.2f}%"
                                           for r in rows[1:])
                               + (f"; adopted {best['knob']} = {best['value']:g}" if adopted else
                                  "; the main recipe continues"),
                               {"variants": rows, "horizon": h, "adopted": adopted}))
    log.info("exploration iteration %d: %s", it.index, json.dumps(rows, default=str))


def _get(recipe: dict, dotted: str, defaults: dict):
    node = recipe
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return defaults.get(dotted)
        node = node[key]
    return node
