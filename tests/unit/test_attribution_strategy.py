import math

import pytest

from distillgate.attribution import (
    MetricMeta, SampleDivergence, attribute, changed_knobs, divergence_heatmap, knob_blame, regressions, slope,
)
from distillgate.strategy import Decision, StrategySpec, next_recipe

META = {"ppl": MetricMeta(higher_is_better=False, drop_threshold=0.02),
        "top1": MetricMeta(higher_is_better=True, drop_threshold=0.02)}


def _recipe(**kw):
    r = {"loss": {"channels": {"kd": 1.0, "ce": 0.0}, "temperature": {"policy": "fixed", "value": 1.0},
                  "domain_weights": {}},
         "train": {"lr": 3e-4, "steps": 20}, "data": {"mix": {"legal": 0.5, "medical": 0.5}},
         "hard_pool": {}, "curriculum": {"tier": "lm"}}
    for k, v in kw.items():
        node = r
        *head, last = k.split("__")
        for h in head:
            node = node[h]
        node[last] = v
    return r


def _samples():
    out = []
    for i in range(8):
        dom = "legal" if i < 4 else "medical"
        kl = 2.0 if dom == "legal" else 0.5
        out.append(SampleDivergence(f"s{i}", dom, kl + 0.01 * i, [kl] * 10))
    return out


def test_regressions_respect_direction_and_threshold():
    assert regressions({"ppl": 10.3, "top1": 0.50}, {"ppl": 10.0, "top1": 0.52}, META) == [
        ("top1", pytest.approx(0.0384615, rel=1e-4)), ("ppl", pytest.approx(0.03))]
    assert regressions({"ppl": 10.1, "top1": 0.53}, {"ppl": 10.0, "top1": 0.52}, META) == []
    assert regressions({"ppl": math.nan}, {"ppl": 10.0}, META)[0][1] == math.inf


def test_heatmap_by_domain_and_position():
    h = divergence_heatmap(_samples(), n_buckets=5)
    assert h["rows"] == ["legal", "medical"]
    assert h["z"][0] == [2.0] * 5 and h["z"][1] == [0.5] * 5


def test_knob_blame_ranks_big_structural_and_lr_changes_first():
    good, cur = _recipe(), _recipe(train__lr=3e-3, loss__channels={"kd": 1.05, "ce": 0.0})
    assert {c["knob"] for c in changed_knobs(cur, good)} == {"train.lr", "loss.channels.kd"}
    blame = knob_blame(cur, good, [("ppl", 0.2)])
    assert blame[0]["knob"] == "train.lr"
    assert blame[0]["score"] == pytest.approx(0.7 * math.log(10) * 1.2, rel=1e-3)


def test_slope_is_relative():
    assert slope([1.0, 1.0, 1.0]) == 0.0
    assert slope([1.0, 2.0, 3.0]) == pytest.approx(0.5)


def test_attribute_emits_regression_weak_domain_stall_and_hard_samples():
    f = attribute(iteration=2, metrics={"ppl": 12.0, "top1": 0.5}, prev={"ppl": 10.0, "top1": 0.5},
                  teacher={"ppl": 9.0}, meta=META, samples=_samples(), hard_candidates=_samples(),
                  recipe=_recipe(train__lr=1e-3), last_good_recipe=_recipe(),
                  channel_history={"kd": [1.0, 1.0, 1.0, 1.0], "ce": [3.0, 2.0, 1.0, 0.5]})
    kinds = [x.kind for x in f]
    assert kinds.count("regression") == 1 and "stall" in kinds and "hard_samples" in kinds
    reg = next(x for x in f if x.kind == "regression")
    assert reg.evidence["knob_blame"][0]["knob"] == "train.lr"
    assert reg.evidence["heatmap_domain_position"]["rows"] == ["legal", "medical"]
    weak = [x for x in f if x.kind == "weak_domain"]
    assert [w.evidence["domain"] for w in weak] == ["legal"]
    stall = next(x for x in f if x.kind == "stall")
    assert stall.evidence["channel"] == "kd"
    hard = next(x for x in f if x.kind == "hard_samples")
    assert hard.evidence["samples"][0]["example_id"] == "s3"


def test_strategy_reverts_after_regression_and_boosts_weak_domain():
    good = _recipe()
    cur = _recipe(train__lr=1e-3)
    findings = attribute(iteration=2, metrics={"ppl": 12.0}, prev={"ppl": 10.0}, teacher={}, meta=META,
                         samples=_samples(), hard_candidates=_samples(), recipe=cur, last_good_recipe=good,
                         channel_history={})
    recent = [Decision(1, "weak_domain", "train.lr", 3e-4, 1e-3, "test")]
    new, decisions = next_recipe(cur, findings, iteration=2, last_good=good, gate_status={},
                                 recent_decisions=recent)
    by_rule = {d.rule: d for d in decisions}
    assert new["train"]["lr"] == 3e-4 and by_rule["revert"].old == 1e-3
    assert new["loss"]["domain_weights"]["legal"] == 1.5
    assert new["data"]["mix"]["legal"] == pytest.approx(0.6)
    assert len(new["hard_pool"]) == 1 and set(new["hard_pool"].values()) == {3.0}
    assert cur["train"]["lr"] == 1e-3  # input untouched


def test_strategy_plateau_and_curriculum():
    cur = _recipe()
    findings = attribute(iteration=4, metrics={}, prev=None, teacher={}, meta=META, samples=[], recipe=cur,
                         last_good_recipe=cur, channel_history={"kd": [2.0, 2.0, 2.0, 2.0]})
    new, decisions = next_recipe(cur, findings, iteration=4, last_good=cur, gate_status={"G-C1": "pass"},
                                 recent_decisions=[], spec=StrategySpec(weight_factor=2.0))
    assert new["loss"]["channels"]["kd"] == 2.0
    assert new["curriculum"]["tier"] == "mid"
    new2, _ = next_recipe(cur, [], iteration=4, last_good=cur, gate_status={"G-C1": "fail"}, recent_decisions=[])
    assert new2["curriculum"]["tier"] == "lm"


def test_reverted_knob_cools_down():
    cur = _recipe()
    f = [attribute(iteration=3, metrics={}, prev=None, teacher={}, meta=META, samples=_samples(), recipe=cur,
                   last_good_recipe=cur, channel_history={})[0]]
    recent = [Decision(2, "revert", "loss.domain_weights.legal", 1.5, None, "r")]
    new, decisions = next_recipe(cur, f, iteration=3, last_good=cur, gate_status={}, recent_decisions=recent)
    assert "legal" not in new["loss"]["domain_weights"]
