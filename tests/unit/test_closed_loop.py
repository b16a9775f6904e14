"""Compensation that earns its keep (issue 16): the knob space, expected and measured effects, the tune rule,
refusals, knob blame from measured effects, and the exploration (selection split, store round trip, resume)."""

import math

import pytest

from distillgate import loop as loop_mod
from distillgate.attribution import knob_blame
from distillgate.config import RunConfig, load_config
from distillgate.errors import ConfigError
from distillgate.knobs import Memory, effect_table
from distillgate.loop import core
from distillgate.loop.contract import Iteration
from distillgate.loop.run import apply_recipe, initial_recipe
from distillgate.loop.state import LoopState
from distillgate.schema import Decision, Finding
from distillgate.store import RunStore
from distillgate.strategy import StrategySpec, next_recipe


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path_factory.getbasetemp() / "dg-home"))


# ----------------------------------------------------------------------------------- a synthetic loop

BEST_LR = 1.5e-3


def _progress(lr: float) -> float:
    """Share of the remaining gap one iteration closes: best at BEST_LR, falling off on a log scale."""
    return 0.3 * math.exp(-0.5 * (math.log(lr / BEST_LR) / 0.8) ** 2)


class _FakeRun:
    def __init__(self, cfg):
        self.cfg, self.state = cfg, LoopState(recipe=initial_recipe(cfg))


def _synthetic(iterations: int, rules=None, **strategy):
    """The real attribute and compensate phases of the loop core on a simulated student: each iteration its
    KL (and PPL ratio, 10x KL) closes ``_progress(lr)`` of the gap to 0.5; only the learning rate matters."""
    over = ["train.lr=3e-4", "loss.channels={kd: 1.0, ce: 0.0}"] + [f"loop.strategy.{k}={v}" for k, v in
                                                                    strategy.items()]
    if rules is not None:
        over.append(f"loop.strategy.rules={rules}")
    cfg = load_config(RunConfig, None, over)
    run = _FakeRun(cfg)
    from distillgate.gates import evaluate_gates, load_gate_spec

    spec = load_gate_spec(None)
    kl = 4.0
    for k in range(iterations + 1):
        recipe = run.state.recipe
        lr = recipe["train"]["lr"]
        if k:
            kl = 0.5 + (kl - 0.5) * (1 - _progress(lr))
        it = Iteration(k, None, recipe, apply_recipe(cfg, recipe))
        it.metrics = {"kl": kl, "ppl_ratio": 10 * kl, "top1_agreement": 0.5}
        it.train_terms = {"kd": kl} if k else {}
        it.gates = evaluate_gates(spec, it.metrics, {})
        core.attribute_phase(it, run)
        core.compensate(it, run, [])
        st = run.state
        st.history.append({"iteration": k, "metrics": dict(it.metrics), "terms": it.train_terms, "recipe": recipe,
                           "gates_passed": False})
        st.decisions += [d.to_dict() for d in it.decisions]
        st.recipe = it.next_recipe
    return run.state, kl


def test_the_strategy_finds_the_better_learning_rate_within_k_iterations():
    fixed_state, fixed_kl = _synthetic(8, rules="[]")
    state, kl = _synthetic(8, trend_decay=1.0)   # the simulated progress does not slow down by itself
    lrs = [h["recipe"]["train"]["lr"] for h in state.history]
    assert lrs[0] == 3e-4 and max(lrs) > 1e-3
    kept = [m for m in state.strategy["moves"] if m["knob"] == "train.lr" and m["status_kept"] == "kept"]
    assert abs(math.log(lrs[-1] / BEST_LR)) < math.log(1.6), lrs  # within one step of the best setting
    assert kl < 0.95 * fixed_kl, (kl, fixed_kl)
    assert not fixed_state.decisions
    # the overshoot past BEST_LR was measured as a failure and reverted, its direction flipped
    verdicts = [m["status"] for m in state.strategy["moves"] if m["knob"] == "train.lr"]
    assert "verified" in verdicts and "failed" in verdicts
    assert any(m["status_kept"] == "reverted" for m in state.strategy["moves"])
    assert kept
    table = {r["knob"]: r for r in effect_table(state.strategy)}
    assert table["train.lr"]["tried"] >= 4 and table["train.lr"]["reverted"] >= 1
    assert table["train.lr"]["effect_ppl_ratio"]["n"] >= 3 and table["train.lr"]["effect_ppl_ratio"]["sd"] is not None


def test_every_decision_states_the_finding_and_expected_effect():
    state, _ = _synthetic(3)
    ds = [Decision.from_dict(d) for d in state.decisions]
    assert ds and all(d.answers for d in ds)
    assert all(d.expected and {"metric", "change", "source"} <= set(d.expected) for d in ds)
    tune = [d for d in ds if d.rule == "tune"]
    assert tune and tune[0].answers.startswith("gate_fail G-C1") and tune[0].expected["source"] == "prior"
    assert "expected ppl_ratio" in tune[0].reason
    assert any(d.expected["source"].startswith("measured") for d in tune[1:])  # later: from this run


def test_out_of_range_changes_are_refused_and_uncertain_findings_ignored():
    recipe = initial_recipe(load_config(RunConfig, None, []))
    gate = Finding("gate_fail", "warning", "ppl_ratio", "gate G-C1 fails", {"gate": {"id": "G-C1"}})

    def too_far(step):
        step.change("wild", "train.lr", 0.5, "a stage wants a huge lr")
        step.change("wild", "loss.domain_weights.legal", 9.0, "and a huge weight")

    refused = []
    new, ds = next_recipe(recipe, [gate], iteration=1, last_good=None, gate_status={}, recent_decisions=[],
                          rules=[("wild", too_far)], refused=refused)
    assert new["train"]["lr"] == recipe["train"]["lr"] and not ds
    assert [r["knob"] for r in refused] == ["train.lr", "loss.domain_weights.legal"]
    assert "outside its allowed range [1e-05, 0.003]" in refused[0]["reason"]
    # a narrower configured range refuses the tune rule's next step; it moves another knob instead
    refused = []
    spec = StrategySpec(ranges={"train.lr": [1e-4, 3e-4]})
    new, ds = next_recipe(recipe, [gate], iteration=1, last_good=None, gate_status={}, recent_decisions=[],
                          spec=spec, refused=refused)
    assert refused and refused[0]["knob"] == "train.lr" and ds[0].knob == "loss.channels.ce"
    gate.uncertain = True
    _, ds = next_recipe(recipe, [gate], iteration=1, last_good=None, gate_status={}, recent_decisions=[])
    assert not ds
    with pytest.raises(ConfigError, match=r"loop\.strategy\.exploration"):
        load_config(RunConfig, None, ["loop.strategy.exploration.budget=0.3"])  # no selection split
    with pytest.raises(ConfigError, match=r"loop\.strategy\.tune_knobs"):
        load_config(RunConfig, None, ["loop.strategy.tune_knobs=[train.nope]"])


def test_knob_blame_uses_measured_effects():
    good = {"train": {"lr": 3e-4}, "loss": {"channels": {"kd": 1.0, "ce": 0.1}}, "hard_pool": {}}
    cur = {"train": {"lr": 6e-4}, "loss": {"channels": {"kd": 1.0, "ce": 0.15}}, "hard_pool": {}}
    prior_only = knob_blame(cur, good, [("kl", 0.05)])
    assert prior_only[0]["knob"] == "train.lr"  # lr's prior (0.7) beats the loss channels' (0.5)
    measured = {"train.lr": {"kl": [-0.04, -0.03]}, "loss.channels.ce": {"kl": [0.08, 0.12]}}
    blame = knob_blame(cur, good, [("kl", 0.05)], measured, {"kl": True})
    assert blame[0]["knob"] == "loss.channels.ce" and blame[0]["source"] == "measured"
    assert blame[1]["weight"] < blame[1]["prior"]  # measured to help: blamed less than its prior


# ----------------------------------------------------------------------------------- the real loop, tiny

def _cfg(teacher_dir, root, **extra):
    over = [f"teacher.path={teacher_dir}", "student.init=config",
            "student.config={num_hidden_layers: 1, intermediate_size: 32}",
            "data.max_new_tokens=12", "data.gen_batch_size=8", "train.steps=4", "train.batch_size=2",
            "train.warmup_steps=0", "train.precision=fp32", "train.lr=1e-4", "targets.top_k=8",
            "loop.prompts_per_iteration=8", "loop.heldout_prompts=4",
            "loop.stages=[{name: anchor, iterations: 0}, {name: joint, iterations: 2}]",
            "loop.perf_lengths=[16]", "loop.perf_repeats=1", f"store_root={root}",
            "loop.strategy.exploration.budget=0.5", "loop.strategy.exploration.selection_prompts=4",
            "loop.strategy.exploration.knobs=[train.lr]", "loop.strategy.exploration.move_sizes={train.lr: 4.0}",
            "loop.strategy.rules=[revert, hard_pool]",
            "loop.strategy.exploration.ranges={train.lr: [1e-5, 3e-3]}"]
    return load_config(RunConfig, None, over + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture(scope="module")
def explored(tiny_teacher_dir, tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("explore")
    old = os.environ.get("DISTILLGATE_HOME")
    os.environ["DISTILLGATE_HOME"] = str(tmp_path_factory.getbasetemp() / "dg-home")
    try:
        summary = loop_mod.run(_cfg(tiny_teacher_dir, root / "runs", run_id="ex"), progress=False)
    finally:
        if old is None:
            os.environ.pop("DISTILLGATE_HOME")
        else:
            os.environ["DISTILLGATE_HOME"] = old
    return root / "runs", summary


def test_exploration_picks_on_a_selection_split_apart_from_the_gates_heldout(explored):
    root, summary = explored
    with RunStore.open(root, "ex") as s:
        v = s.resolve("current")
        state = v.load_json("loop_state.json")
        sel, held = set(state["selection_prompts"]), set(state["heldout_prompts"])
        used = {p for ids in state["used_prompts"].values() for p in ids}
        assert len(sel) == 4 and not sel & held and not sel & used
        one = s.get_version(s.versions()[1]["version_id"])
        ex = one.load_json("exploration.json")
        assert ex["horizon"] == 1 and len(ex["variants"]) == 3  # main recipe + 2 variants, 0.5 x 4 / 2 steps
        m = one.load_json("metrics.json")["student"]
        assert m["explore/steps"] == 2 and m["explore/seconds"] > 0  # only the variants' screens are extra
        assert m["explore/selection_kl_sd"] > 0 and m["explore/best_se"] > 0
    trials = state["strategy"]["trials"]
    assert [t["move"] for t in trials[:2]] == ["train.lr+", "train.lr-"]  # each move once first, in order
    assert len(trials) == 4 and all(t["knob"] == "train.lr" and t["se"] > 0 for t in trials)
    assert [(t["incumbent"], t["proposed"]) for t in trials[:2]] == [(1e-4, 4e-4), (1e-4, 2.5e-5)]
    # at lr 1e-4, 4x more learns faster, beyond the noise: exploration adopts it in the first iteration
    hist = state["history"]
    assert hist[1]["recipe"]["train"]["lr"] == 4e-4 and trials[0]["adopted"] and not trials[1]["adopted"]
    assert any(d["rule"] == "explore" and d["iteration"] == 1 for d in state["decisions"])
    # PBT exploit: the winner's screen continued, so the iteration trained its recipe's 4 steps, not 4 + 1
    assert hist[1]["recipe"]["train"]["steps"] == 4
    assert not list((root.parent / "runs").glob("**/explore-*/screen-*"))  # the screens' checkpoints are gone


@pytest.mark.parametrize("every, rest, margin, stage_steps", [(1, 1, 10.0, None), (2, 0, 0.0, None),
                                                             (2, 0, 0.0, 6)])
def test_the_exploration_rests_and_its_budget_trains_the_main_recipe(tiny_teacher_dir, tmp_path, every, rest,
                                                                     margin, stage_steps):
    """``rest: 1`` with a margin no variant can beat (10 = 1000% KL): iteration 1 explores for nothing, so
    iteration 2 rests; ``every: 2``: iteration 2 rests whatever iteration 1 found. A resting iteration trains the
    budget's 2 x 1 screen steps as main steps (4 + 2; the recipe keeps 4), so every iteration spends the same
    compute, and the knob the last screens measured stays held: the tune rule does not move the learning rate
    while the exploration rests. A joint stage with its own ``steps`` (6) is screened and reinvested on those."""
    opts = f", options: {{steps: {stage_steps}}}" if stage_steps else ""
    cfg = _cfg(tiny_teacher_dir, tmp_path / "runs", run_id="rest", **{
        "loop.stages": f"[{{name: anchor, iterations: 0}}, {{name: joint, iterations: 3{opts}}}]",
        "loop.strategy.rules": "[revert, tune, hard_pool]", "loop.strategy.tune_knobs": "[train.lr]",
        "loop.strategy.exploration.margin": margin, "loop.strategy.exploration.rest": rest,
        "loop.strategy.exploration.every": every})
    loop_mod.run(cfg, progress=False)
    with RunStore.open(tmp_path / "runs", "rest") as s:
        state = s.resolve("current").load_json("loop_state.json")
        findings = s.catalog.findings(2)
    hist = {h["iteration"]: h for h in state["history"]}
    assert sorted({t["iteration"] for t in state["strategy"]["trials"]}) == [1, 3]
    if margin:
        assert not any(t["adopted"] for t in state["strategy"]["trials"])
    main = stage_steps or 4
    extra = 2 * (main // 4)  # 2 variants x floor(0.5 x main / 2) steps
    spent = {i: hist[i]["metrics"]["train/steps"] + hist[i]["metrics"]["explore/steps"] for i in (1, 2, 3)}
    assert spent == {i: main + extra for i in (1, 2, 3)}  # a continued screen's steps count in train/steps
    assert all(hist[i]["recipe"]["train"]["steps"] == 4 for i in (1, 2, 3))
    assert hist[2]["metrics"]["train/steps"] == main + extra and hist[2]["metrics"]["explore/reinvested"] == extra
    assert hist[1]["metrics"]["explore/steps"] == hist[3]["metrics"]["explore/steps"] == extra
    assert hist[1]["metrics"]["explore/horizon"] == main // 4
    (f,) = [f for f in findings if f["kind"] == "exploration"]
    assert f["data"]["rests"] and f["data"]["last_explored"] == 1 and f"{main} + {extra} steps" in f["message"]
    assert not [d for d in state["decisions"] if d["iteration"] == 2 and d["rule"] == "tune"]
    (sk,) = [f for f in findings if f["kind"] == "skipped_change" and f["subject"] == "train.lr"]
    assert "rests until iteration 3" in sk["data"]["held_by"]


def test_with_screen_bounds_a_resting_exploration_bounds_the_tune_rule_instead_of_freezing_it(tiny_teacher_dir,
                                                                                                  tmp_path):
    """The real loop, tiny, ``screen_bounds``: the tune rule moves lr 1e-4 -> 1.5e-4 after iteration 0; iteration 1
    screens x2 (3e-4) and / 2 (7.5e-5) around it and keeps 1.5e-4 (a margin no variant beats); iterations 2 and 3
    rest (``every: 3``). The tune rule's next x1.5 goes to 2.25e-4 (between the refuted values: not frozen, as
    without screen_bounds), and its x1.5 after that (3.375e-4, past the refuted 3e-4) is skipped with the
    screens' reason, in both resting iterations."""
    cfg = _cfg(tiny_teacher_dir, tmp_path / "runs", run_id="bound", **{
        "loop.stages": "[{name: anchor, iterations: 0}, {name: joint, iterations: 3}]",
        "loop.strategy.rules": "[revert, tune, hard_pool]", "loop.strategy.tune_knobs": "[train.lr]",
        "loop.strategy.exploration.margin": 10.0, "loop.strategy.exploration.every": 3,
        "loop.strategy.exploration.move_sizes": "{train.lr: 2.0}", "loop.strategy.exploration.screen_bounds": True})
    loop_mod.run(cfg, progress=False)
    with RunStore.open(tmp_path / "runs", "bound") as s:
        state = s.resolve("current").load_json("loop_state.json")
        findings = s.catalog.findings()
    assert [h["recipe"]["train"]["lr"] for h in state["history"]] == pytest.approx([1e-4, 1.5e-4, 2.25e-4, 2.25e-4])
    assert [(t["iteration"], t["proposed"], t["adopted"]) for t in state["strategy"]["trials"]] == [
        (1, pytest.approx(3e-4), False), (1, pytest.approx(7.5e-5), False)]
    tunes = [(d["iteration"], d["new"]) for d in state["decisions"] if d["rule"] == "tune"]
    assert tunes == [(0, pytest.approx(1.5e-4)), (1, pytest.approx(2.25e-4))]
    skips = [f for f in findings if f["kind"] == "skipped_change" and f["subject"] == "train.lr"]
    assert [(f["iteration"], f["data"]["value"]) for f in skips] == [(2, pytest.approx(3.375e-4)),
                                                                     (3, pytest.approx(3.375e-4))]
    assert all("at or past a value the screens measured no better" in f["message"]
               and "0.0003, 7.5e-05 measured no better than 0.00015" in f["data"]["held_by"] for f in skips)


def test_decisions_with_expected_and_measured_effects_round_trip_through_the_store(explored, capsys):
    from distillgate.cli import main

    root, _ = explored
    with RunStore.open(root, "ex") as s:
        rows = s.versions()
        for r in rows[1:]:
            v = s.get_version(r["version_id"])
            for d in v.load_json("decisions.json"):
                back = Decision.from_dict(d)
                assert back.to_dict() == d and back.expected and back.answers
        cat = s.catalog.decisions()
        assert any("expected kl" in d["reason"] for d in cat)
        repairs = [f for f in s.catalog.findings() if f["kind"].startswith("repair_")]
        assert repairs and all("move" in f["data"] for f in repairs)
        state = s.resolve("current").load_json("loop_state.json")
    assert Memory(state["strategy"]).moves
    assert main(["runs", "show", "ex", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "what the strategy learned" in out and "train.lr" in out
    from distillgate.report.from_store import load_report_data
    from distillgate.report.html import render_html

    data = load_report_data(str(root), "ex", param_diffs=False)
    assert type(data).from_dict(data.to_dict()).strategy == data.strategy  # the JSON round trip keeps it
    html = render_html(data)
    assert 'id="strategy"' in html and "train.lr" in html


def test_the_screens_branch_after_the_main_recipes_warmup(tiny_teacher_dir, tmp_path):
    """``screen_after: warmup``: the main recipe trains its warmup step once, then every screen
    continues that checkpoint for its h = 1 step (the 2nd of 4); the shared step is the main recipe's own, so the
    iteration still trains 4 steps plus the variants' 2, and the trials say where they were measured."""
    cfg = _cfg(tiny_teacher_dir, tmp_path / "runs", run_id="after", **{
        "train.warmup_steps": 1, "loop.strategy.exploration.screen_after": "warmup"})
    loop_mod.run(cfg, progress=False)
    with RunStore.open(tmp_path / "runs", "after") as s:
        state = s.resolve("current").load_json("loop_state.json")
        one = s.get_version(s.versions()[1]["version_id"])
        ex = one.load_json("exploration.json")
        m = one.load_json("metrics.json")["student"]
        findings = s.catalog.findings(1)
    assert ex["after"] == 1 and ex["horizon"] == 1 and len(ex["variants"]) == 3
    assert m["explore/after"] == 1 and m["explore/steps"] == 2 and m["train/steps"] == 4
    assert all(t["after"] == 1 for t in state["strategy"]["trials"])
    (f,) = [f for f in findings if f["kind"] == "exploration"]
    assert "2 variants x step 2 of 4 (+2 steps" in f["message"]
    assert not list((tmp_path / "runs").glob("**/explore-*/*"))  # prefix and screens' checkpoints are gone
    # screen_after 0 (the default): the screens start with the iteration
    cfg0 = _cfg(tiny_teacher_dir, tmp_path / "runs0", run_id="at0", **{"train.warmup_steps": 1})
    loop_mod.run(cfg0, progress=False)
    with RunStore.open(tmp_path / "runs0", "at0") as s:
        ex0 = s.get_version(s.versions()[1]["version_id"]).load_json("exploration.json")
    assert ex0["after"] == 0
    assert [r["selection_kl"] for r in ex0["variants"]] != [r["selection_kl"] for r in ex["variants"]]


@pytest.mark.parametrize("value", [-1, "warm", 1.5])
def test_screen_after_refuses_what_is_not_a_step_count_or_warmup(value):
    with pytest.raises(ConfigError, match="screen_after"):
        load_config(RunConfig, None, ["loop.strategy.exploration.budget=0.3",
                                      "loop.strategy.exploration.selection_prompts=4",
                                      f"loop.strategy.exploration.screen_after={value}"])


@pytest.mark.parametrize("after", [0, "warmup"])
def test_resume_mid_exploration_gives_the_uninterrupted_weights(tiny_teacher_dir, tmp_path, after):
    from distillgate.testing.resume import assert_same_weights, committed, killed_and_resumed

    # killed in iteration 2's first training call: the exploration's short run of the main recipe (with a warmup:
    # the shared prefix the screens branch from)
    run_id = killed_and_resumed(lambda root: _cfg(tiny_teacher_dir, root, run_id="mid", **{
        "train.warmup_steps": 1, "loop.strategy.exploration.screen_after": after}),
                                (tmp_path / "a", tmp_path / "b"), kill_at=2)
    (_, wa), (_, wb) = committed(tmp_path / "a", run_id), committed(tmp_path / "b", run_id)
    assert_same_weights(wa, wb)
    states = []
    for root in (tmp_path / "a", tmp_path / "b"):
        with RunStore.open(root, run_id) as s:
            states.append(s.resolve("current").load_json("loop_state.json")["strategy"])
    assert states[0] == states[1] and len(states[0]["trials"]) == 4


def test_a_proposal_that_breaks_a_joint_constraint_is_refused_before_training():
    """A knob inside its own range can still make an invalid config (temperature.max under temperature.min):
    exploration refuses it with a logged reason instead of crashing the run (found in the demo)."""
    from types import SimpleNamespace

    from distillgate.explore import _valid

    cfg = load_config(RunConfig, None, ["loss.temperature={policy: complexity, min: 0.9, max: 1.2}"])
    it = SimpleNamespace(recipe=initial_recipe(cfg), findings=[])
    kept = _valid([("loss.temperature.max", 0.6223), ("train.lr", 4.0e-4)], it, SimpleNamespace(cfg=cfg),
                  apply_recipe)
    assert kept == [("train.lr", 4.0e-4)]
    (f,) = it.findings
    assert f.kind == "refused_change" and "loss.temperature.max -> 0.6223 refused" in f.message
    assert "must be <=" in f.message


def test_exploration_moves_are_centred_on_the_recipe_and_the_ce_share_only_goes_down():
    from distillgate.explore import move_labels, propose
    from distillgate.knobs import ExplorationSpec
    from distillgate.strategy import knob_defaults

    cfg = load_config(RunConfig, None, ["train.lr=3e-4", "loss.channels={kd: 1.0, ce: 0.0}",
                                        "loss.temperature={policy: complexity, min: 0.9, max: 1.2}"])
    spec = ExplorationSpec(budget=0.5, selection_prompts=4, ranges={"train.lr": [1e-4, 3e-3]})
    assert move_labels(spec) == ["train.lr+", "train.lr-", "loss.temperature.max+", "loss.temperature.max-",
                                 "loss.difficulty_weighting~", "loss.channels.ce-"]
    recipe, defaults = initial_recipe(cfg), knob_defaults(cfg)
    props = propose(spec, Memory({}), recipe, defaults, 8, seed=0)
    # every available move once, in order; the CE share at 0 has no move down (and is never raised)
    assert props == [("train.lr+", "train.lr", 6e-4), ("train.lr-", "train.lr", 1.5e-4),
                     ("loss.temperature.max+", "loss.temperature.max", 1.3),
                     ("loss.temperature.max-", "loss.temperature.max", 1.1),
                     ("loss.difficulty_weighting~", "loss.difficulty_weighting", True)]
    recipe["train"]["lr"], recipe["loss"]["channels"]["ce"] = 1.5e-4, 0.3
    props = dict((m, v) for m, _, v in propose(spec, Memory({}), recipe, defaults, 8, seed=0))
    assert "train.lr-" not in props and props["loss.channels.ce-"] == 0.2  # 7.5e-5 leaves [1e-4, 3e-3]
    # once every move was tried, the sampler picks distinct available moves by their measured gains
    mem = Memory({"trials": [{"iteration": 1, "move": m, "knob": m[:-1], "incumbent": 0, "proposed": 0,
                              "value": v, "adopted": m == "train.lr+"} for m, v in
                             [("train.lr+", -0.05), ("train.lr-", 0.04), ("loss.temperature.max+", 0.01),
                              ("loss.temperature.max-", -0.01), ("loss.difficulty_weighting~", 0.0),
                              ("loss.channels.ce-", -0.002)]]})
    props = propose(spec, mem, initial_recipe(cfg), defaults, 2, seed=3)
    assert len({p[0] for p in props}) == 2 and all(p[0] in move_labels(spec) for p in props)


def test_the_selection_noise_is_the_paired_standard_error():
    import random

    from scipy import stats

    from distillgate.explore import paired

    rng = random.Random(0)
    base = [(rng.uniform(20, 60), rng.randint(10, 30)) for _ in range(24)]
    other = [(s * rng.uniform(0.85, 1.05), n) for s, n in base]
    rel, se = paired(base, other)
    tokens, kl0 = sum(n for _, n in base), sum(s for s, _ in base) / sum(n for _, n in base)
    d = [o - b for (b, _), (o, _) in zip(base, other)]
    assert rel == pytest.approx((sum(s for s, _ in other) / tokens) / kl0 - 1, rel=1e-12)
    assert se == pytest.approx(stats.sem(d) * len(d) / tokens / kl0, rel=1e-12)
    assert paired(base, base) == (0.0, 0.0)


# ------------------------------------------------------- the exploration's adopted move is not stacked on

def _explored_lr(iteration: int = 1, old: float = 4.5e-4, new: float = 9e-4) -> Decision:
    return Decision(iteration, "explore", "train.lr", old, new, "variant 1 beat the main recipe",
                    "exploration (selection split)",
                    {"metric": "kl", "change": -0.079, "source": "explore: selection split, 4 of 8 steps"})


def test_no_rule_moves_a_knob_the_exploration_moved_in_the_same_iteration():
    """The tune rule's best knob is the learning rate; the exploration adopted lr x2 in this iteration, so the
    rule's x1.5 on top is skipped with its reason, and the rule stands down (no substitute knob it expects less
    of; a knob refused for its range does fall through, see above); any rule, any knob:
    a stage rule writing a held knob (or a knob inside a held one) through ``change`` or ``record`` is skipped."""
    cfg = load_config(RunConfig, None, ["train.lr=3e-4", "loss.channels={kd: 1.0, ce: 0.0}"])
    recipe = initial_recipe(cfg)
    recipe["train"]["lr"] = 9e-4  # this iteration's recipe, after the exploration adopted its variant
    gate = Finding("gate_fail", "warning", "ppl_ratio", "gate G-C1 fails", {"gate": {"id": "G-C1"}})
    defaults = {"train.lr": 3e-4, "loss.channels.ce": 0.0, "loss.difficulty_weighting": False}
    free, ds = next_recipe(recipe, [gate], iteration=1, last_good=None, gate_status={}, recent_decisions=[],
                           defaults=defaults)
    assert [(d.rule, d.knob, d.new) for d in ds] == [("tune", "train.lr", 1.35e-3)]  # what stacked before
    skipped = []
    new, ds = next_recipe(recipe, [gate], iteration=1, last_good=None, gate_status={}, recent_decisions=[],
                          defaults=defaults, held=[_explored_lr()], skipped=skipped)
    assert new["train"]["lr"] == 9e-4  # the exploration's measured choice stands
    assert ds == [] and new["loss"]["channels"]["ce"] == 0.0
    (sk,) = skipped
    assert (sk["rule"], sk["knob"], sk["value"], sk["held"]) == ("tune", "train.lr", 1.35e-3, "train.lr")
    assert "skipped: explore moved train.lr 0.00045 -> 0.0009, measured kl -7.9%" in sk["reason"]
    assert "G-C1" in sk["reason"]  # what the rule wanted it for

    def stage_rule(step):
        step.change("stage", "train.lr", 2e-4, "a stage's own lr")
        step.change("stage", "loss.channels.ce", 0.3, "a CE share inside the held channels")
        step.record("stage", "loss.channels", {"kd": 1.0, "ce": 0.0}, {"kd": 2.0, "ce": 0.0}, "all channels")
        step.change("stage", "train.warmup_steps", 4, "a free knob")

    skipped = []
    held = [_explored_lr(), Decision(1, "explore", "loss.channels", None, {"kd": 1.0, "ce": 0.0}, "r")]
    new, ds = next_recipe(recipe, [], iteration=1, last_good=None, gate_status={}, recent_decisions=[],
                          rules=[("stage", stage_rule)], held=held, skipped=skipped)
    assert [d.knob for d in ds] == ["train.warmup_steps"] and new["train"]["warmup_steps"] == 4
    assert new["train"]["lr"] == 9e-4 and new["loss"]["channels"] == {"kd": 1.0, "ce": 0.0}
    assert [(s["knob"], s["held"]) for s in skipped] == [("train.lr", "train.lr"),
                                                          ("loss.channels.ce", "loss.channels"),
                                                          ("loss.channels", "loss.channels")]
    # a move of an earlier iteration does not hold the knob: only this iteration's recipe changes do
    _, ds = next_recipe(recipe, [gate], iteration=1, last_good=None, gate_status={}, recent_decisions=[],
                        defaults=defaults, held=[])
    assert ds[0].knob == "train.lr"


def test_a_knob_the_exploration_screened_and_kept_is_held_too():
    """The screens measured lr x2 and lr / 2 against the current lr and neither won: the tune rule's lr x1.5 (a
    prior or a trend) does not overrule that A/B for the next recipe; it is skipped with the screens' numbers."""
    cfg = load_config(RunConfig, None, ["train.lr=3e-4", "loss.channels={kd: 1.0, ce: 0.0}"])
    recipe = initial_recipe(cfg)
    gate = Finding("gate_fail", "warning", "ppl_ratio", "gate G-C1 fails", {"gate": {"id": "G-C1"}})
    defaults = {"train.lr": 3e-4, "loss.channels.ce": 0.0, "loss.difficulty_weighting": False}
    why = "explore screened train.lr around 0.0003 (0.0006: +1.2% (se 0.4%), 0.00015: +5.0% (se 0.6%)) and kept it"
    skipped = []
    nxt, ds = next_recipe(recipe, [gate], iteration=1, last_good=None, gate_status={}, recent_decisions=[],
                          defaults=defaults, screened={"train.lr": why}, skipped=skipped)
    assert not [d for d in ds if d.knob == "train.lr"] and nxt["train"]["lr"] == 3e-4
    (sk,) = [s for s in skipped if s["knob"] == "train.lr"]
    assert sk["rule"] == "tune" and sk["held_by"] == why and "+1.2% (se 0.4%)" in sk["reason"]


def test_a_bounded_knob_moves_toward_what_the_screens_refuted_but_not_to_it_or_past_it():
    """``screen_bounds``: the screens kept lr 4.5e-4 against 9e-4. The tune rule's x1.5 may go to 6.75e-4 (between
    the two: not refuted), and from there its next x1.5 (1.0125e-3, past 9e-4) is skipped with the screens'
    reason; a move the other way (lr / 1.5 after a failed raise) is free. On/off knobs: the refuted value only."""
    from distillgate.strategy import reaches_refuted

    cfg = load_config(RunConfig, None, ["train.lr=3e-4", "loss.channels={kd: 1.0, ce: 0.0}"])
    gate = Finding("gate_fail", "warning", "ppl_ratio", "gate G-C1 fails", {"gate": {"id": "G-C1"}})
    defaults = {"train.lr": 3e-4, "loss.channels.ce": 0.0, "loss.difficulty_weighting": False}
    spec = StrategySpec(tune_knobs=["train.lr"])
    bound = {"why": "explore screened train.lr around 0.00045 (0.0009: +1.4% (se 0.7%)) and kept its value",
             "refuted": [[4.5e-4, 9e-4]]}
    recipe = initial_recipe(cfg)
    recipe["train"]["lr"] = 4.5e-4
    nxt, ds = next_recipe(recipe, [gate], iteration=1, last_good=None, gate_status={}, recent_decisions=[],
                          defaults=defaults, spec=spec, screened={"train.lr": bound})
    assert [(d.rule, d.knob, d.new) for d in ds] == [("tune", "train.lr", pytest.approx(6.75e-4))]
    recipe["train"]["lr"] = nxt["train"]["lr"]
    skipped = []
    nxt, ds = next_recipe(recipe, [gate], iteration=2, last_good=None, gate_status={}, recent_decisions=[],
                          defaults=defaults, spec=spec, screened={"train.lr": bound}, skipped=skipped)
    assert ds == [] and nxt["train"]["lr"] == pytest.approx(6.75e-4)
    (sk,) = skipped
    assert sk["held_by"] == bound["why"] and "at or past a value the screens measured no better" in sk["reason"]
    assert reaches_refuted([[4.5e-4, 9e-4]], 9e-4 * (1 - 1e-12)) and not reaches_refuted([[4.5e-4, 9e-4]], 3e-4)
    assert reaches_refuted([[4.5e-4, 2.25e-4]], 1e-4) and not reaches_refuted([[4.5e-4, 2.25e-4]], 3e-4)
    assert reaches_refuted([[False, True]], True) and not reaches_refuted([[False, True]], False)


def test_the_loop_keeps_the_tune_rule_off_the_learning_rate_the_exploration_adopted(tiny_teacher_dir, tmp_path):
    """The real loop, tiny: iteration 1's exploration adopts a learning rate, G-C1 fails (the tune rule's only
    knob is the learning rate), and the next recipe keeps the adopted value; the skip is a finding."""
    cfg = _cfg(tiny_teacher_dir, tmp_path / "runs", run_id="held", **{
        "loop.strategy.rules": "[revert, tune, hard_pool]", "loop.strategy.tune_knobs": "[train.lr]",
        "loop.stages": "[{name: anchor, iterations: 0}, {name: joint, iterations: 1}]"})
    loop_mod.run(cfg, progress=False)
    with RunStore.open(tmp_path / "runs", "held") as s:
        state = s.resolve("current").load_json("loop_state.json")
        nxt = s.resolve("current").load_json("next_recipe.json")
        findings = s.catalog.findings(1)
    (ex,) = [d for d in state["decisions"] if d["rule"] == "explore"]  # lr x4 wins at a small lr
    assert ex["iteration"] == 1 and ex["knob"] == "train.lr" and ex["new"] > ex["old"]
    assert any(d["rule"] == "tune" and d["iteration"] == 0 for d in state["decisions"])  # tune does act
    assert not [d for d in state["decisions"] if d["iteration"] == 1 and d["rule"] == "tune"]
    assert nxt["train"]["lr"] == ex["new"]  # not the tune rule's x1.5 stacked on the adopted value
    (sk,) = [f for f in findings if f["kind"] == "skipped_change"]
    assert sk["subject"] == "train.lr" and sk["data"]["rule"] == "tune"
    assert sk["data"]["value"] == pytest.approx(ex["new"] * 1.5)
    assert f"explore moved train.lr {ex['old']} -> {ex['new']}" in sk["message"]


def test_a_trial_measured_at_another_value_of_its_knob_is_stale():
    """A move's gain is conditional on the value it moved from: once the learning rate moved (the exploration
    adopted lr x2, or a rule stepped it), the next exploration screens lr around the new value before the moves
    never tried; trials at the current value still count as tried."""
    from distillgate.explore import propose
    from distillgate.knobs import ExplorationSpec
    from distillgate.strategy import knob_defaults

    cfg = load_config(RunConfig, None, ["train.lr=3e-4", "loss.channels={kd: 1.0, ce: 0.0}",
                                        "loss.temperature={policy: complexity, min: 0.9, max: 1.2}"])
    spec = ExplorationSpec(budget=0.5, selection_prompts=4)
    recipe, defaults = initial_recipe(cfg), knob_defaults(cfg)
    trials = [{"iteration": 1, "move": "train.lr+", "knob": "train.lr", "incumbent": 4.5e-4, "proposed": 9e-4,
               "value": -0.05, "adopted": True},
              {"iteration": 1, "move": "train.lr-", "knob": "train.lr", "incumbent": 4.5e-4, "proposed": 2.25e-4,
               "value": 0.09, "adopted": False}]
    recipe["train"]["lr"] = 9e-4  # adopted: both lr trials were measured at 4.5e-4
    props = propose(spec, Memory({"trials": trials}), recipe, defaults, 2, seed=0)
    assert props == [("train.lr+", "train.lr", 1.8e-3), ("train.lr-", "train.lr", 4.5e-4)]
    recipe["train"]["lr"] = 4.5e-4  # at the value they were measured at, they are tried: the untried moves next
    props = propose(spec, Memory({"trials": trials}), recipe, defaults, 2, seed=0)
    assert [p[0] for p in props] == ["loss.temperature.max+", "loss.temperature.max-"]
