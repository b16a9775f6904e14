"""Student-vs-teacher KL / top-1 agreement, the top-k tail-bucket approximation, and the teacher cache."""

import pytest
import torch

from distillgate.errors import InputError
from distillgate.evaluate.lm import compare_to_teacher, text_examples
from distillgate.evaluate.teacher import bucket_kl, normalize_examples
from distillgate.io import verify_manifest
from distillgate.testing import TINY_CORPUS


@pytest.fixture
def examples(tiny_tokenizer):
    return text_examples(tiny_tokenizer, " ".join(TINY_CORPUS[:5]), seq_len=24, max_tokens=90)


def test_model_against_itself(tmp_path, tiny_model_factory, examples):
    m = tiny_model_factory()
    for top_k in (None, 8):
        r = compare_to_teacher(m, m, examples, batch_size=2, top_k=top_k, cache_dir=tmp_path)
        assert r["kl_forward_mean"] == pytest.approx(0.0, abs=1e-6)
        assert r["kl_reverse_mean"] == pytest.approx(0.0, abs=1e-6)
        assert r["top1_agreement"] == 1.0
        assert r["n_tokens"] == sum(len(e) - 1 for e in examples)


def test_exact_kl_matches_float64_reference(tmp_path, tiny_model_factory, examples):
    s, t = tiny_model_factory(seed=1), tiny_model_factory(num_layers=4, seed=0)
    fwd, rev, agree = [], [], []
    with torch.no_grad():
        for ids in examples:                               # one example at a time, float64, full vocabulary
            x = torch.tensor([ids])
            ls = torch.log_softmax(s.double()(x).logits[0, :-1].double(), -1)
            lt = torch.log_softmax(t.double()(x).logits[0, :-1].double(), -1)
            fwd += (lt.exp() * (lt - ls)).sum(-1).tolist()
            rev += (ls.exp() * (ls - lt)).sum(-1).tolist()
            agree += (ls.argmax(-1) == lt.argmax(-1)).double().tolist()
    s.float(), t.float()
    r = compare_to_teacher(s, t, examples, batch_size=3, top_k=None)
    assert r["kl_forward_mean"] == pytest.approx(sum(fwd) / len(fwd), rel=1e-4)
    assert r["kl_reverse_mean"] == pytest.approx(sum(rev) / len(rev), rel=1e-4)
    assert r["top1_agreement"] == pytest.approx(sum(agree) / len(agree))
    assert r["kl_forward_mean"] > 0.05      # two different random models really differ
    # top-k + tail bucket: a lower bound of the exact KL; equal when k covers the vocabulary
    approx = compare_to_teacher(s, t, examples, batch_size=3, top_k=16, cache_dir=tmp_path)
    assert 0 < approx["kl_forward_mean"] <= r["kl_forward_mean"] + 1e-6
    assert approx["top1_agreement"] == r["top1_agreement"]
    full = compare_to_teacher(s, t, examples, batch_size=3, top_k=10_000, cache_dir=tmp_path)
    assert full["kl_forward_mean"] == pytest.approx(r["kl_forward_mean"], rel=1e-4)
    assert full["kl_reverse_mean"] == pytest.approx(r["kl_reverse_mean"], rel=1e-4)


def test_bucket_kl_by_hand():
    # teacher p = [0.5, 0.3, 0.2], student q = [0.2, 0.2, 0.6]; k=1 keeps token 0 and a tail bucket.
    p = torch.tensor([[0.5, 0.3, 0.2]])
    q = torch.tensor([[0.2, 0.2, 0.6]]).log()
    fwd, rev = bucket_kl(torch.tensor([[0]]), p[:, :1].log(), q)
    import math
    assert fwd.item() == pytest.approx(0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8), rel=1e-5)
    assert rev.item() == pytest.approx(0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5), rel=1e-5)


def test_teacher_cache_hit_skips_teacher_forward(tmp_path, tiny_model_factory, examples):
    s1, s2, t = tiny_model_factory(seed=1), tiny_model_factory(seed=2), tiny_model_factory(num_layers=4)
    calls = []
    t.register_forward_hook(lambda *a: calls.append(1))
    r1 = compare_to_teacher(s1, t, examples, batch_size=2, top_k=8, cache_dir=tmp_path)
    n_first = len(calls)
    assert len(examples) == 4 and n_first == 2             # 4 examples in batches of 2
    folder, = tmp_path.glob("teacher-*")
    assert verify_manifest(folder)["meta"]["n_positions"] == r1["n_tokens"]
    r2 = compare_to_teacher(s2, t, examples, batch_size=4, top_k=8, cache_dir=tmp_path)
    assert len(calls) == n_first                            # second student: no teacher forward
    assert r2["kl_forward_mean"] != pytest.approx(r1["kl_forward_mean"])
    r1b = compare_to_teacher(s1, t, examples, batch_size=2, top_k=8, cache_dir=tmp_path)
    assert r1b["kl_forward_mean"] == pytest.approx(r1["kl_forward_mean"], rel=1e-6)
    compare_to_teacher(s1, t, examples[:3], batch_size=2, top_k=8, cache_dir=tmp_path)   # other data: miss
    assert len(calls) == n_first + 2


def test_batch_dicts_and_loss_mask(tiny_model_factory, examples):
    m, t = tiny_model_factory(seed=1), tiny_model_factory(seed=2)
    ids = torch.tensor([examples[0], examples[1]])
    lm = torch.zeros_like(ids)
    lm[:, 10:] = 1                                          # only the "response" tokens are targets
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": lm, "example_ids": ["a", "b"]}
    r = compare_to_teacher(m, t, [batch], top_k=None)
    assert r["n_tokens"] == 2 * (ids.shape[1] - 10)
    assert [e["example_id"] for e in r["per_example"]] == ["a", "b"]
    rows = [{"input_ids": examples[0], "loss_mask": lm[0].tolist(), "example_id": "a"},
            {"input_ids": examples[1], "loss_mask": lm[1].tolist(), "example_id": "b"}]
    assert compare_to_teacher(m, t, rows, top_k=None)["kl_forward_mean"] == pytest.approx(r["kl_forward_mean"], rel=1e-5)


def test_normalize_examples_errors():
    with pytest.raises(InputError, match="lengths differ"):
        normalize_examples([{"input_ids": [1, 2, 3], "loss_mask": [0, 1]}])
    with pytest.raises(InputError, match="no examples"):
        normalize_examples([])
