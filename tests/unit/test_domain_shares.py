"""S2.5 level 1: per-domain channel shares (loss.domain_channel_shares) in the loss, the strategy and
attribution."""

from __future__ import annotations

import pytest
import torch

from distillgate.attribution import knob_blame
from distillgate.config import LossSpec
from distillgate.errors import ConfigError
from distillgate.losses import DistillObjective, fused_distill_loss, unfused_distill_loss
from distillgate.schema import Finding
from distillgate.strategy import StrategySpec, next_recipe
from distillgate.targets import TeacherHidden, TopKTargets, prediction_positions
from distillgate.weighting import domain_channel_weights


def _inputs(n=23, h=10, v=30, seed=2):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    th, tw_ = torch.randn(n, 8, generator=g), torch.randn(v, 8, generator=g)
    lp, idx = torch.log_softmax(th @ tw_.T, -1).topk(6, -1)
    return hs, w, {"topk": TopKTargets(idx, lp), "hidden": TeacherHidden(th, tw_)}, \
        torch.randint(0, v, (n,), generator=g), torch.rand(n, generator=g)


@pytest.mark.parametrize("teacher_kind", ["topk", "hidden"])
def test_channel_shares_scale_each_channel_per_token_like_a_float64_sum(teacher_kind):
    hs, w, teachers, tgt, tw = _inputs()
    t = teachers[teacher_kind]
    ch = {"kd": 1.0, "ce": 0.5}
    s_kd, s_ce = torch.rand(hs.shape[0]) * 2, torch.rand(hs.shape[0])
    s_kd[:5] = 0.0                                                       # masked for kd only
    _, per = unfused_distill_loss(hs, w, t, tgt, None, None, ch, "forward_kl", 0.0)
    ref = (tw.double() * (per["kd"].double() * s_kd.double() + 0.5 * per["ce"].double() * s_ce.double())).sum()
    ref_u, _ = unfused_distill_loss(hs, w, t, tgt, tw, None, ch, "forward_kl", 0.0,
                                    channel_token_weight={"kd": s_kd, "ce": s_ce})
    gh_u, gw_u = torch.autograd.grad(ref_u, [hs, w])
    for chunk in (1, 7, 64):
        tot, _ = fused_distill_loss(hs, w, t, tgt, tw, None, ch, "forward_kl", 0.0, chunk,
                                    channel_token_weight={"kd": s_kd, "ce": s_ce})
        gh, gw = torch.autograd.grad(tot, [hs, w])
        assert float(tot.detach()) == pytest.approx(float(ref), rel=1e-5)
        torch.testing.assert_close(gh, gh_u, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gw, gw_u, rtol=1e-4, atol=1e-6)
    zero, _ = fused_distill_loss(hs, w, t, tgt, tw, None, ch, "forward_kl", 0.0, 8,
                                 channel_token_weight={"kd": torch.zeros(hs.shape[0]), "ce": torch.zeros(hs.shape[0])})
    assert float(zero.detach()) == 0.0


def test_domain_channel_weights_default_to_one():
    w = domain_channel_weights(["legal", "medical", "travel"], {"legal": {"kd": 2.0}, "medical": {"ce": 0.0}},
                               ["kd", "ce", "attn"])
    assert w["kd"].tolist() == [2.0, 1.0, 1.0] and w["ce"].tolist() == [1.0, 0.0, 1.0] and "attn" not in w


def test_objective_applies_the_batch_domains_shares(tiny_model_factory):
    student = tiny_model_factory(num_layers=2, seed=1)
    teacher = tiny_model_factory(num_layers=2, seed=0)
    ids = torch.randint(4, student.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(6))
    lm = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": lm,
             "domains": ["legal", "medical"]}

    def online(b):
        bi, ti = prediction_positions(b)
        with torch.no_grad():
            h = teacher.model(input_ids=b["input_ids"]).last_hidden_state[bi, ti]
        return TeacherHidden(h, teacher.lm_head.weight.detach())

    plain = DistillObjective(LossSpec(channels={"kd": 1.0, "ce": 0.5}, chunk_size=16), online)(student, batch)
    spec = LossSpec(channels={"kd": 1.0, "ce": 0.5}, chunk_size=16,
                    domain_channel_shares={"legal": {"kd": 0.0, "ce": 2.0}, "medical": {"kd": 3.0}})
    out = DistillObjective(spec, online)(student, batch)
    legal = torch.arange(out.n_tokens) < 6
    kd, ce = plain.per_token["kd"], plain.per_token["ce"]
    want = (torch.where(legal, 0.0, 3.0) * kd + 0.5 * torch.where(legal, 2.0, 1.0) * ce).sum()
    assert float(out.total_sum.detach()) == pytest.approx(float(want), rel=1e-5)


def test_bad_shares_fail_naming_the_field():
    with pytest.raises(Exception, match="domain"):
        LossSpec(domain_channel_shares={"astrology": {"kd": 1.0}})
    with pytest.raises(Exception, match="finite number >= 0"):
        LossSpec(domain_channel_shares={"legal": {"kd": -1.0}})
    spec = LossSpec(domain_channel_shares={"legal": {"kdd": 1.0}})
    with pytest.raises(ConfigError, match=r"loss\.domain_channel_shares\.legal\.kdd"):
        DistillObjective(spec, lambda b: None)


def _weak(d="legal"):
    return Finding("weak_domain", "warning", f"kl/domain/{d}", f"domain {d}: KL high", {"domain": d})


def test_strategy_moves_a_weak_domains_kd_share_with_its_reason_and_attribution_blames_it():
    recipe = {"loss": {"channels": {"kd": 1.0, "ce": 0.2}, "domain_weights": {},
                       "domain_channel_shares": {"legal": {"ce": 0.5}}},
              "data": {"mix": {"legal": 0.5, "medical": 0.5}}, "hard_pool": {}, "curriculum": {"tier": "lm"}}
    spec = StrategySpec(rules=["weak_domain", "domain_shares"])
    new, decisions = next_recipe(recipe, [_weak()], iteration=1, last_good=None, gate_status={},
                                 recent_decisions=[], spec=spec)
    d = [x for x in decisions if x.rule == "domain_shares"]
    assert len(d) == 1 and d[0].knob == "loss.domain_channel_shares.legal.kd" and d[0].new == 1.5
    assert "kd share x1.5" in d[0].reason and "against ce" in d[0].reason
    assert new["loss"]["domain_channel_shares"]["legal"] == {"ce": 0.5, "kd": 1.5}
    blame = knob_blame(new, recipe, [("kl", 0.1)])
    assert any(b["knob"] == "loss.domain_channel_shares.legal.kd" and b["family"] == "loss.domain_channel_shares"
               for b in blame)
    # without configured shares the rule leaves the recipe alone (the domain weight does the work)
    recipe["loss"]["domain_channel_shares"] = {}
    _, decisions = next_recipe(recipe, [_weak()], iteration=1, last_good=None, gate_status={},
                               recent_decisions=[], spec=spec)
    assert not [x for x in decisions if x.rule == "domain_shares"]
