"""Exploration within a budget (issue 16): population-based training's exploit/explore, once per iteration.

Before an exploring stage's map (``loop.strategy.exploration.stages``), from the iteration's starting weights:

1. **Explore.** Optuna proposes ``variants`` one-knob *moves* of the iteration's recipe, each a step from the
   current value (priors centred on the recipe): the learning rate x or / ``steps['train.lr']`` (2), a
   temperature bound +- 0.1, difficulty weighting switched, the CE share one step *down* only (``directions``:
   when the selection objective is KL, raising the CE share trades KL for perplexity). A move that would leave
   the knob's range is not proposed. Each move is tried once at its knob's current value (a trial measured at
   another value is stale), in ``knobs`` order, before Optuna's TPE sampler
   (rebuilt every iteration from this run's stored trials) chooses among them by their measured gains.
2. **Screen.** The main recipe trains its first ``p`` steps (``screen_after``; default 0), then it
   and each variant continue that checkpoint (the same weights, AdamW moments and data position) for ``h`` steps
   of the iteration's own schedule (warmup and cosine over all ``train.steps``), on the same batches in the same
   order, where ``h = min(steps, floor(budget x steps / variants))``: only the variants' steps are extra. A
   screen that starts with the iteration (``screen_after: 0``) measures the first updates of a fresh AdamW,
   which are bias-corrected to about ``lr x sign(gradient)`` whatever the gradient's scale, at a warming lr:
   with two-step screens that told little about the steps that follow (``bench/closed_loop.py``, README).
3. **Select.** Each is scored by the exact KL(teacher || student) on the **selection split**: training-pool
   prompts reserved at the run's start (``selection_prompts``), never trained on and disjoint from the held-out
   set the gates use, so picking on it does not bias the verdict. The noise of a difference is measured: the
   paired per-prompt differences' standard error (``selection_se``) and the KL's sd across prompts. A variant
   replaces the main recipe only when it beats it by more than ``max(margin, noise_z x its standard error)``.
4. **Exploit.** The winner's *checkpoint* continues (its weights, AdamW state, schedule and data position:
   :attr:`Iteration.continue_from`), so the iteration's main training runs only the remaining ``steps - p - h``
   steps and the winner's screen steps are not thrown away; its knob value stays in the recipe (a decision of
   rule ``explore`` with the measured gain as its expected effect). When no variant wins, the main recipe's
   screen continues the same way. The extra compute is the losers' ``variants x h`` steps.

5. **Hold.** A knob the screens measured and kept (no variant of it won; ``hold_screened``) is held for the
   iteration's compensate like an adopted one (``Iteration.screened``): no rule moves it on a prior or a trend
   against the A/B just measured. With ``screen_bounds`` it is bounded instead of frozen: the A/B refuted the
   values it tried, not the ones between, so a rule may move the knob toward a refuted value but not to it or
   past it (the lr 4.5e-4 kept against 9e-4 may still go to 6.75e-4, never to 1.01e-3).
6. **Rest.** The exploration runs every ``every``-th iteration (and ``rest`` more after one where no variant
   won); an iteration where it rests trains the budget's ``n x h`` steps as main steps (``reinvest``), and the
   knobs the last screens measured stay held until the next screen.

The trials (knob, move, incumbent and proposed value, relative selection KL and its standard error) are the
strategy's clean measurements: :class:`distillgate.knobs.Memory` uses them for expected effects and knob blame.
The exploration's extra steps and seconds are in the iteration's metrics (``explore/steps``,
``explore/seconds``) and inside its map phase time. Everything is deterministic from the loop state (the sampler
is rebuilt from the stored trials with a seed of the iteration; every screen restarts clean), so a run killed
mid-exploration resumes to the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import statistics
import time

from .knobs import KNOB_SPACE, Memory, direction, knob
from .schema import Decision, Finding

log = logging.getLogger(__name__)


def horizon(budget: float, main_steps: int, variants: int) -> tuple[int, int]:
    """(variants, screen steps each) that fit ``budget x main_steps`` extra steps: the main recipe's screen is
    the start of its own training, so only the variants' screens are extra (at most ``main_steps`` each)."""
    n = variants
    while n > 0:
        h = min(main_steps, int(math.floor(budget * main_steps / n + 1e-9)))
        if h >= 1:
            return n, h
        n -= 1
    return 0, 0


def prefix_steps(spec, warmup_steps: int, main_steps: int, h: int) -> int:
    """Main-recipe steps before the screens branch (``screen_after``), so that the ``h`` screen steps still fit
    in the iteration's ``main_steps``."""
    want = int(warmup_steps) if spec.screen_after == "warmup" else int(spec.screen_after)
    return max(0, min(want, main_steps - h))


def _relevant(name: str, recipe: dict) -> bool:
    policy = (recipe.get("loss", {}).get("temperature") or {}).get("policy", "fixed")
    if name in ("loss.temperature.min", "loss.temperature.max"):
        return policy != "fixed"
    if name == "loss.temperature.value":
        return policy == "fixed"
    return True


def _get(recipe: dict, dotted: str, defaults: dict):
    node = recipe
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return defaults.get(dotted)
        node = node[key]
    return node


def _set(recipe: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = recipe
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def move_labels(spec) -> list[str]:
    """Every move the exploration may propose: ``knob+`` / ``knob-`` (a bool knob: ``knob~``, switched)."""
    out = []
    for name in spec.knobs:
        if KNOB_SPACE[name].scale == "bool":
            out.append(f"{name}~")
            continue
        way = spec.directions.get(name, "both")
        out += [f"{name}{s}" for s, w in (("+", "up"), ("-", "down")) if way in ("both", w)]
    return out


def moved_value(spec, label: str, incumbent):
    """The value ``label`` moves ``incumbent`` to, or None when the move leaves the knob's exploration range."""
    name, sign = label[:-1], label[-1]
    k = KNOB_SPACE[name]
    if k.scale == "bool":
        return not bool(incumbent)
    if incumbent is None:
        return None
    step = spec.move_sizes.get(name, k.step)
    d = 1 if sign == "+" else -1
    if k.scale == "log":
        value = float(f"{incumbent * step ** d:.6g}")
    elif k.scale == "int":
        value = max(1, int(round(incumbent * step ** d)))
    else:
        value = round(incumbent + d * step, 6)
    lo, hi = spec.range_of(name)
    return value if lo - 1e-12 <= value <= hi + 1e-12 and value != incumbent else None


def _study(spec, trials: list[dict], labels: list[str], seed: int):
    """An Optuna study over the moves, holding this run's earlier trials (rebuilt every iteration:
    deterministic, resumable)."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    dist = CategoricalDistribution(tuple(labels))
    for t in trials:
        if t.get("move") in labels and t.get("value") is not None:
            study.add_trial(optuna.trial.create_trial(params={"move": t["move"]}, distributions={"move": dist},
                                                      value=t["value"]))
    return study, dist


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def propose(spec, memory: Memory, recipe: dict, defaults: dict, n: int, seed: int) -> list[tuple[str, str, object]]:
    """Up to ``n`` distinct ``(move, knob, value)`` proposals for ``recipe``: every move not tried yet at its
    knob's current value first (in ``knobs`` order), then Optuna's TPE sampler over the moves by their measured
    gains."""
    import optuna

    labels = [m for m in move_labels(spec) if _relevant(m[:-1], recipe)]
    avail = {m: v for m in labels if (v := moved_value(spec, m, _get(recipe, m[:-1], defaults))) is not None}
    if not avail:
        return []
    # a trial's gain was measured at its incumbent value: once the knob has moved (adopted, or a rule's step) the
    # move is untried again at the new value (its old gain is stale), so a moved knob is screened around it first
    tried = {t.get("move") for t in memory.trials
             if _same(t.get("incumbent"), _get(recipe, str(t.get("move"))[:-1], defaults))}
    chosen = [m for m in labels if m in avail and m not in tried][:n]
    if len(chosen) < n:
        study, dist = _study(spec, memory.trials, labels, seed)
        for _ in range(8 * len(labels)):
            if len(chosen) >= min(n, len(avail)):
                break
            trial = study.ask({"move": dist})
            m = trial.params["move"]
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # asked only for its proposal
            if m in avail and m not in chosen:
                chosen.append(m)
        chosen += [m for m in labels if m in avail and m not in chosen][:max(0, min(n, len(avail)) - len(chosen))]
    return [(m, m[:-1], avail[m]) for m in chosen]


def _valid(proposals, it, run, apply_recipe) -> list:
    """The proposals whose recipe is a valid config; one that is not (a knob inside its own range that breaks a
    joint constraint, e.g. ``temperature.max`` under ``temperature.min``) is refused with a logged reason and a
    ``refused_change`` finding, before any step is spent on it. Proposals are ``(..., knob, value)`` tuples."""
    out = []
    for prop in proposals:
        name, value = prop[-2], prop[-1]
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
        out.append(prop)
    return out


def selection_scores(run) -> tuple[float, list[tuple[float, int]]]:
    """(exact KL(teacher || student) on the selection split, per prompt ``(KL sum, tokens)``)."""
    from . import pipeline
    from .evaluate.teacher import compare_to_teacher

    r = compare_to_teacher(run.student, run.teacher.model, run.selection, batch_size=8, top_k=None,
                           pad_id=pipeline.pad_id(run.teacher.tokenizer), teacher_cache=run.teacher_cache)
    rows = [(float(e["kl_forward"]) * int(e["n_tokens"]), int(e["n_tokens"])) for e in r["per_example"]]
    return float(r["kl_forward_mean"]), rows


def selection_kl(run) -> float:
    return selection_scores(run)[0]


def paired(base: list[tuple[float, int]], other: list[tuple[float, int]]) -> tuple[float, float]:
    """(relative KL change of ``other`` against ``base``, its standard error): the per-prompt paired
    differences of KL sums over the same tokens, prompts as the sampling unit."""
    tokens = sum(n for _, n in base)
    kl0 = sum(s for s, _ in base) / tokens
    d = [so - sb for (sb, _), (so, _) in zip(base, other)]
    rel = sum(d) / tokens / kl0
    se = math.sqrt(len(d)) * statistics.stdev(d) / tokens / kl0 if len(d) > 1 else float("inf")
    return rel, se


def _scratch(it, **changes):
    """A copy of ``it`` for one of the exploration's short trainings: its own metrics, findings and loss terms, and
    no checkpoint to continue (``changes``: e.g. a variant's recipe and config)."""
    return dataclasses.replace(it, metrics={}, findings=[], train_terms={}, continue_from=None, **changes)


def _rests(it, spec, memory: Memory, main_steps: int, n: int, h: int, defaults: dict) -> bool:
    """Whether the exploration stands down this iteration: fewer than ``every`` iterations (``every + rest``
    after one where no variant won) have passed since the last exploring iteration. With ``reinvest`` the
    budget's ``n x h`` steps train the main recipe instead (``it.extra_steps``, this iteration only: the recipe,
    and so the next iteration, keep their steps)."""
    last = max((int(t["iteration"]) for t in memory.trials if int(t["iteration"]) < it.index), default=None)
    if last is None:
        return False
    paid = any(t.get("adopted") for t in memory.trials if int(t["iteration"]) == last)
    gap = spec.every + (0 if paid else spec.rest)
    if it.index - last >= gap:
        return False
    if spec.hold_screened:  # the last screens' verdict stands until the next exploration measures again
        screened = [t for t in memory.trials if int(t["iteration"]) == last and t.get("knob")]
        for name in dict.fromkeys(t["knob"] for t in screened):
            mine = [t for t in screened if t["knob"] == name]
            if spec.screen_bounds and not any(t.get("adopted") for t in mine):
                tried = ", ".join(f"{t['proposed']:g}" for t in mine)
                it.screened[name] = {"why": f"explore screened {name} in iteration {last} and rests until "
                                            f"iteration {last + gap}: {tried} measured no better than "
                                            f"{mine[0]['incumbent']:g}", "refuted":
                                     [[t["incumbent"], t["proposed"]] for t in mine]}
            else:
                it.screened.setdefault(name, f"explore screened {name} in iteration {last} and rests until "
                                       f"iteration {last + gap}: its value {_get(it.recipe, name, defaults)} "
                                       f"stands until the next screen")
    extra = n * h if spec.reinvest else 0
    it.extra_steps = extra  # the iteration's main training adds them to its schedule (run.distil)
    it.metrics.update({"explore/steps": 0, "explore/reinvested": extra, "explore/variants": 0})
    why = "a variant was adopted" if paid else "no variant beat the main recipe"
    spent = (f"; its budget of {n} x {h} screen steps trains the main recipe instead ({main_steps} + {extra} steps)"
             if extra else "")
    it.findings.append(Finding("exploration", "info", "exploration",
                               f"the exploration rests (iteration {it.index - last} of {gap} after iteration "
                               f"{last}, where {why}){spent}",
                               {"rests": True, "last_explored": last, "reinvested": extra}))
    return True


def explore(it, run, stages: list) -> None:
    """Run the iteration's exploration (see the module docstring) before the map of ``stages`` (the iteration's
    stage objects); a no-op when it is off or does not apply."""
    from .loop.run import apply_recipe
    from .strategy import knob_defaults

    spec = run.cfg.loop.strategy.exploration
    exploring = [st for st in stages if getattr(st, "name", "") in spec.stages]
    if spec.budget <= 0 or it.index < 1 or not exploring or not run.selection:
        return
    # the exploring stage's own steps when it sets them (the joint stage's options.steps), else the recipe's
    stage_steps = next((s for st in exploring if (s := getattr(getattr(st, "options", None), "steps", None))), None)
    main_steps = int(stage_steps or it.recipe["train"]["steps"])
    n, h = horizon(spec.budget, main_steps, spec.variants)
    if n == 0:
        it.findings.append(Finding("exploration", "info", "exploration",
                                   f"no exploration: a budget of {spec.budget:.0%} of {main_steps} steps gives no "
                                   f"variant a step", {"budget": spec.budget, "steps": main_steps}))
        return
    defaults = knob_defaults(it.cfg)
    memory = Memory(run.state.strategy)
    if _rests(it, spec, memory, main_steps, n, h, defaults):
        return
    proposals = propose(spec, memory, it.recipe, defaults, n, seed=spec.seed * 100_003 + it.index)
    proposals = _valid(proposals, it, run, apply_recipe)
    if not proposals:
        return
    t0 = time.time()
    n = len(proposals)
    p = prefix_steps(spec, it.cfg.train.warmup_steps, main_steps, h)
    root = run.work / f"explore-{it.index:03d}"
    shutil.rmtree(root, ignore_errors=True)  # a killed attempt restarts every screen clean
    start = {k: v.detach().clone() for k, v in run.student.state_dict().items()}
    scores, kls = [], []
    best_j = 0
    window = (f"{h} of {main_steps} steps" if not p else f"step {p + 1} of {main_steps}" if h == 1
              else f"steps {p + 1}-{p + h} of {main_steps}")
    try:
        branch = None
        if p:  # the main recipe's own first steps (its warmup), shared by every screen: not extra compute
            run.say(f"  explore: main recipe, its first {p} of {main_steps} steps, then the screens branch")
            run.distil(_scratch(it), steps=stage_steps, stop_at=p, out_dir=root / "prefix")
            branch = root / "prefix"
        for j, prop in enumerate([None] + proposals):
            recipe = copy.deepcopy(it.recipe)
            if prop is not None:
                _set(recipe, prop[1], prop[2])
            short = _scratch(it, recipe=recipe, cfg=apply_recipe(run.cfg, recipe))
            run.say(f"  explore {j}/{n}: {'main recipe' if prop is None else f'{prop[1]} = {prop[2]:g}'}, "
                    f"{window}")
            run.distil(short, steps=stage_steps, stop_at=p + h, out_dir=root / f"screen-{j}", branch_from=branch)
            kl, rows = selection_scores(run)
            kls.append(kl)
            scores.append(rows)
            run.student.load_state_dict(start)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    finally:
        run.student.load_state_dict(start)
    base = kls[0]
    per_prompt = [s / max(c, 1) for s, c in scores[0]]
    sd = statistics.stdev(per_prompt) if len(per_prompt) > 1 else 0.0
    rows = [{"variant": 0, "move": None, "knob": None, "value": None, "selection_kl": base, "relative": 0.0,
             "se": 0.0}]
    for j, ((move, name, value), kl) in enumerate(zip(proposals, kls[1:]), 1):
        rel, se = paired(scores[0], scores[j])
        incumbent = _get(it.recipe, name, defaults)
        memory.trials.append({"iteration": it.index, "move": move, "knob": name, "incumbent": incumbent,
                              "proposed": value, "value": round(rel, 8), "se": round(se, 8), "steps": h,
                              "after": p, "adopted": False})
        rows.append({"variant": j, "move": move, "knob": name, "value": value, "incumbent": incumbent,
                     "selection_kl": kl, "relative": rel, "se": se})
    best = min(rows[1:], key=lambda r: r["relative"])
    need = max(spec.margin, spec.noise_z * best["se"])
    adopted = bool(best["relative"] < -need)  # a plain bool: rel may be a numpy float (np.bool_ is not JSON)
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
            best_j = best["variant"]
            _set(it.recipe, name, value)
            it.cfg = apply_recipe(run.cfg, it.recipe)
            memory.trials[-(n - best_j + 1)]["adopted"] = True
            expected = {"metric": "kl", "change": round(best["relative"], 6),
                        "source": f"explore: selection split, {window}"}
            reason = (f"variant {best_j} of {n} ({name} {old} -> {value}) beat the main recipe on the selection "
                      f"split by {-100 * best['relative']:.2f}% KL (standard error {100 * best['se']:.2f}%, "
                      f"needed {100 * need:.2f}%) after {window} ({best['selection_kl']:.4f} vs "
                      f"{base:.4f}); its weights and optimizer state continue and it stays in the recipe; "
                      f"expected kl {100 * best['relative']:+.1f}% (explore)")
            d = Decision(it.index, "explore", name, old, value, reason, "exploration (selection split)", expected)
            it.decisions.append(d)
            memory.add_move(d, it.index, "kl", expected["change"], expected["source"], d.answers,
                            direction(old, value))
    if spec.hold_screened:  # what the screens measured stands over a rule's prior or trend for the next recipe
        for name in dict.fromkeys(r["knob"] for r in rows[1:]):
            if adopted and name == best["knob"]:
                continue  # held through its decision
            tried = ", ".join(f"{r['value']:g}: {100 * r['relative']:+.1f}% (se {100 * r['se']:.1f}%)"
                              for r in rows[1:] if r["knob"] == name)
            why = (f"explore screened {name} around {_get(it.recipe, name, defaults)} ({tried} selection KL "
                   f"after {window}) and kept its value")
            it.screened[name] = why if not spec.screen_bounds else {
                "why": why, "refuted": [[r["incumbent"], r["value"]] for r in rows[1:] if r["knob"] == name]}
    for j in range(n + 1):  # the losers' screens are the exploration's cost; the winner's continues
        if j != best_j:
            shutil.rmtree(root / f"screen-{j}", ignore_errors=True)
    shutil.rmtree(root / "prefix", ignore_errors=True)
    it.continue_from = str(root / f"screen-{best_j}")
    seconds = time.time() - t0
    it.metrics.update({"explore/steps": n * h, "explore/variants": n, "explore/horizon": h, "explore/after": p,
                       "explore/seconds": round(seconds, 3), "explore/best_relative_kl": best["relative"],
                       "explore/best_se": best["se"], "explore/adopted": int(adopted),
                       "explore/selection_kl_main": base, "explore/selection_kl_sd": sd})
    out = run.work / f"exploration-{it.index:03d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from .io import atomic_write_json

    atomic_write_json(out, {"iteration": it.index, "horizon": h, "after": p, "variants": rows, "adopted": adopted,
                            "winner": best_j, "needed": need, "selection_kl_sd": sd, "budget": spec.budget,
                            "main_steps": main_steps, "seconds": seconds})
    it.files["exploration.json"] = str(out)
    it.findings.append(Finding("exploration", "info", "exploration",
                               f"{n} variants x {window} (+{n * h} steps, {seconds:.0f} s): "
                               + ", ".join(f"{r['knob']}={r['value']:g}: {100 * r['relative']:+.2f}% "
                                           f"(se {100 * r['se']:.2f}%)" for r in rows[1:])
                               + (f"; adopted {best['knob']} = {best['value']:g}, its screen continues" if adopted
                                  else f"; none beat the main recipe by more than {100 * need:.2f}%: the main "
                                       f"recipe's screen continues"),
                               {"variants": rows, "horizon": h, "after": p, "adopted": adopted, "needed": need}))
    log.info("exploration iteration %d: %s", it.index, json.dumps(rows, default=str))
