import math

import pytest
import torch

from distillgate.errors import ArtifactError, InputError
from distillgate.profile import STAT_INFO, build_profile, diff_profiles, load_profile, save_profile


@pytest.fixture
def ids(tiny_tokenizer):
    from distillgate.testing import TINY_CORPUS
    enc = tiny_tokenizer(TINY_CORPUS[:4], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def test_profile_has_twenty_plus_finite_stats(tiny_model_factory, ids):
    model = tiny_model_factory(num_layers=2)
    p = build_profile(model, *ids, batch_size=2)
    assert len(STAT_INFO) >= 20 and set(p.layers) == set(STAT_INFO)
    for k, v in p.layers.items():
        assert len(v) == 2 and all(math.isfinite(x) for x in v), k
    for k in ("attn_entropy", "attn_sink", "mlp_saturation", "mlp_near_zero", "lens_top1", "resid_var_entropy"):
        assert all(0.0 <= x <= 1.0 + 1e-6 for x in p.layers[k]), k
    # the last layer's logit lens is the model's own output
    assert p.layers["lens_top1"][-1] == pytest.approx(1.0)
    assert p.layers["lens_kl"][-1] == pytest.approx(0.0, abs=1e-4)
    assert p.arrays["attn_entropy_per_head"].shape == (2, 4)


def test_identity_block_has_cosine_one(tiny_model_factory, ids):
    model = tiny_model_factory(num_layers=2)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    p = build_profile(model, *ids)
    assert p.layers["block_cos"][1] == pytest.approx(1.0, abs=1e-5)
    assert p.layers["attn_out_ratio"][1] == 0.0 and p.layers["norm_growth"][1] == pytest.approx(1.0, abs=1e-5)


def test_attention_entropy_of_uniform_attention_is_one(tiny_model_factory, ids):
    model = tiny_model_factory(num_layers=2)
    with torch.no_grad():  # zero queries -> uniform attention over visible keys -> normalised entropy 1
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    p = build_profile(model, ids[0][:, :6], batch_size=4)
    # the first query sees one key (entropy 0 by convention of log(max(2, n))); the rest are exactly 1
    T = 6
    expected = (0 + (T - 1) * 1.0) / T
    assert p.layers["attn_entropy"][0] == pytest.approx(expected, abs=1e-4)


def test_save_load_roundtrip_and_tamper(tmp_path, tiny_model_factory, ids):
    p = build_profile(tiny_model_factory(num_layers=2), *ids)
    out = save_profile(p, tmp_path / "prof")
    q = load_profile(out)
    assert q.layers == p.layers and torch.equal(q.arrays["sv_q.0"], p.arrays["sv_q.0"])
    f = out / "arrays.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_profile(out)


def test_diff_through_layer_map(tiny_model_factory, ids):
    t = build_profile(tiny_model_factory(num_layers=4), *ids)
    s = build_profile(tiny_model_factory(num_layers=2, seed=3), *ids)
    d = diff_profiles(t, t)
    assert all(v == 0 for v in d["summary"].values())
    d = diff_profiles(s, t, layer_map=[0, 3])
    assert d["stats"]["resid_norm"]["teacher"] == [t.layers["resid_norm"][0], t.layers["resid_norm"][3]]
    assert diff_profiles(s, t)["layer_map"] == [1, 3]
    with pytest.raises(InputError, match="layer_map"):
        diff_profiles(s, t, layer_map=[0, 7])
