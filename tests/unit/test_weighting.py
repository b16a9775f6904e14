"""Channel registry, the one combine, token weights (domain / difficulty / sample) and the plateau boost."""

from __future__ import annotations

import math

import pytest
import torch

from distillgate.errors import ConfigError
from distillgate.weighting import (CHANNELS, channel_terms, check_channels, combine, combine_sum,
                                   difficulty_weight, domain_weight, plateau_boost, register_channel,
                                   sample_weight, token_weights)


def test_registry_has_metadata_for_kd_and_ce():
    assert {"kd", "ce"} <= set(CHANNELS)
    for ch in CHANNELS.values():
        assert ch.description and ch.needs and ch.computed_by
    assert CHANNELS["ce"].needs == ("target_ids",)
    with pytest.raises(ValueError, match="already registered"):
        register_channel("kd", "dup", ("x",), "lm_head")


def test_combine_is_the_weighted_sum_and_logs_every_term():
    per = {"kd": torch.tensor([1.0, 2.0, 3.0]), "ce": torch.tensor([4.0, 0.0, 2.0])}
    tw = torch.tensor([1.0, 0.5, 3.0])
    total, terms = combine(per, {"kd": 2.0, "ce": 0.5}, tw)
    # 1*(2+2) + 0.5*(4+0) + 3*(6+1) = 4 + 2 + 21
    assert float(total) == 27.0
    assert terms == {"kd": 2.0, "ce": 2.0}
    assert float(combine_sum(per, {"kd": 1.0}, None)) == 6.0


def test_unknown_channel_fails_loudly_naming_it_and_the_known_ones():
    per = {"kd": torch.ones(2)}
    with pytest.raises(ConfigError) as e:
        combine(per, {"kd": 1.0, "atention": 0.5}, None)
    msg = str(e.value)
    assert "loss.channels.atention" in msg and "'ce'" in msg and "'kd'" in msg
    with pytest.raises(ConfigError, match="finite weight >= 0"):
        check_channels({"kd": -1.0})
    with pytest.raises(ConfigError, match="finite weight"):
        check_channels({"kd": math.nan})


def test_missing_positive_channel_fails_and_zero_weight_nan_does_not_poison():
    with pytest.raises(ConfigError, match="computed: \\['kd'\\]"):
        combine_sum({"kd": torch.ones(2)}, {"kd": 1.0, "ce": 0.5}, None)
    total = combine_sum({"kd": torch.ones(2), "ce": torch.tensor([math.nan, 1.0])}, {"kd": 1.0, "ce": 0.0}, None)
    assert float(total) == 2.0
    with pytest.raises(ConfigError, match="weight > 0"):
        combine_sum({"kd": torch.ones(2)}, {"kd": 0.0}, None)


def test_empty_batch_gives_zero_and_zero_terms():
    x = torch.zeros(0, requires_grad=True)
    total, terms = combine({"kd": x * 2, "ce": x}, {"kd": 1.0, "ce": 1.0}, torch.zeros(0))
    total.backward()
    assert float(total.detach()) == 0.0 and terms == {"kd": 0.0, "ce": 0.0} and x.grad.shape == (0,)


def test_token_weight_levels_multiply():
    dw = domain_weight(["legal", "medical", "travel"], {"medical": 2.0, "travel": 0.5})
    assert dw.tolist() == [1.0, 2.0, 0.5]
    sw = sample_weight(torch.tensor([1.0, 3.0, 1.0]), 3)
    conf = torch.tensor([1.0, 0.0, 0.5, 0.25, 2.0])
    diff = difficulty_weight(conf, 0.2)
    torch.testing.assert_close(diff, torch.tensor([1.0, 0.2, 0.6, 0.4, 1.0]))       # confidence clamped to 1
    b_idx = torch.tensor([0, 1, 1, 2, 2])
    w = token_weights(b_idx, [dw, sw], [diff])
    torch.testing.assert_close(w, torch.tensor([1.0, 1.2, 3.6, 0.2, 0.5]))
    assert sample_weight(None, 2).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="sample_weight"):
        sample_weight(torch.tensor([1.0, -3.0]), 2)
    with pytest.raises(ValueError, match="expected 3"):
        sample_weight([1.0], 3)
    with pytest.raises(ConfigError, match="difficulty_floor"):
        difficulty_weight(conf, 1.5)


def test_plateau_boost():
    assert plateau_boost([5.0, 4.0, 3.99, 3.985, 3.984], threshold=0.01, rounds=3, factor=2.0) == 2.0
    assert plateau_boost([5.0, 4.0, 3.99, 3.985], threshold=0.01, rounds=3, factor=2.0) == 1.0   # one big drop
    assert plateau_boost([4.0, 3.99, 3.985], threshold=0.01, rounds=3) == 1.0                    # too short
    assert plateau_boost([3.0, 3.0, 3.0, 3.0], threshold=0.01) == 1.5
    assert plateau_boost([3.0, 3.0, math.nan, 3.0], threshold=0.01) == 1.0
    assert plateau_boost([3.0, 3.0, 3.0, 3.3], threshold=0.05) == 1.0                            # 10% rise
    with pytest.raises(ValueError):
        plateau_boost([1.0], threshold=0.1, rounds=0)


def test_channel_terms_are_unweighted_means():
    assert channel_terms({"kd": torch.tensor([1.0, 3.0])}) == {"kd": 2.0}
