"""Perplexity windows, minimal pairs and teacher comparison on tiny random models (float64 references)."""

import json
import math

import pytest
import torch

from distillgate.errors import InputError
from distillgate.evaluate.lm import count_words, minimal_pairs, perplexity, tokenize_text, window_plan
from distillgate.testing import TINY_CORPUS

TEXT = " ".join(TINY_CORPUS[:6])


def _direct_nll(model, ids):
    """Per-token NLL of ids[1:] given all previous tokens, float64, one unbatched forward."""
    with torch.no_grad():
        lp = torch.log_softmax(model.double()(torch.tensor([ids])).logits[0].double(), -1)
    model.float()
    return [-lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


@pytest.mark.parametrize("n,window,stride", [(10, 16, 8), (50, 16, 5), (51, 8, 1), (17, 16, 15), (40, 16, 15)])
def test_window_plan_scores_every_token_once(n, window, stride):
    scored = []
    for begin, end, k in window_plan(n, window, stride):
        assert end - begin <= window and k >= 1
        scored += list(range(end - k, end))
    assert sorted(scored) == list(range(1, n)) and len(set(scored)) == len(scored)


def test_window_plan_stride_equal_window_skips_window_starts():
    # HF recipe semantics: with stride == window no window gives the first token of the next one a context.
    scored = [t for b, e, k in window_plan(50, 16, 16) for t in range(e - k, e)]
    assert scored == [t for t in range(1, 50) if t % 16]


def test_window_plan_rejects_bad_stride():
    with pytest.raises(InputError, match="stride"):
        window_plan(10, 8, 9)


def test_ppl_shorter_than_window_equals_direct(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory()
    ids, _ = tokenize_text(tiny_tokenizer, TEXT, 40)
    ref = _direct_nll(model, ids)
    r = perplexity(model, tiny_tokenizer, TEXT, max_tokens=40, window=64, stride=32)
    assert r["n_tokens"] == 39
    assert r["nll_sum"] == pytest.approx(sum(ref), rel=1e-5)
    assert r["ppl_token"] == pytest.approx(math.exp(sum(ref) / 39), rel=1e-5)


def test_ppl_strided_windows_match_per_window_reference(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory()
    ids, covered = tokenize_text(tiny_tokenizer, TEXT, 120)
    window, stride = 32, 12
    ref = 0.0
    for begin, end, k in window_plan(len(ids), window, stride):     # each window run alone, float64
        ref += sum(_direct_nll(model, ids[begin:end])[-k:])
    for bs in (1, 3):
        r = perplexity(model, tiny_tokenizer, TEXT, max_tokens=120, window=window, stride=stride, batch_size=bs)
        assert r["n_tokens"] == 119
        assert r["nll_sum"] == pytest.approx(ref, rel=1e-5)
    # with context the strided score differs from non-overlapping windows (the stride matters)
    r_block = perplexity(model, tiny_tokenizer, TEXT, max_tokens=120, window=window, stride=window)
    assert r_block["nll_sum"] != pytest.approx(ref, rel=1e-7)
    assert r["n_words"] == count_words(covered) and 0 < r["n_words"] < 120
    assert r["ppl_word"] == pytest.approx(math.exp(ref / r["n_words"]), rel=1e-5)


def test_ppl_reads_a_file(tmp_path, tiny_model_factory, tiny_tokenizer):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    model = tiny_model_factory()
    assert perplexity(model, tiny_tokenizer, f, max_tokens=30)["nll_sum"] == pytest.approx(
        perplexity(model, tiny_tokenizer, TEXT, max_tokens=30)["nll_sum"], rel=1e-6)


def test_count_words():
    assert count_words(" The cat\n sat  on\tthe mat . ") == 7


def test_minimal_pairs_on_constructed_file(tmp_path, tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory()
    pairs = [("The cat sat on the mat.", "The cat sat the on mat."),
             ("Students should read chapter three.", "Students should reads chapter three."),
             ("My order arrived damaged.", "My order arrive damaged."),
             ("The flight departs at 9:40.", "The flight depart at at 9:40.")]

    def total_lp(s):  # log P(sentence | BOS) in float64, by hand
        ids = [tiny_tokenizer.bos_token_id] + tiny_tokenizer.encode(s, add_special_tokens=False)
        return -sum(_direct_nll(model, ids))

    expected = [int(total_lp(g) > total_lp(b)) for g, b in pairs]
    f = tmp_path / "para.jsonl"
    f.write_text("".join(json.dumps({"sentence_good": g, "sentence_bad": b, "UID": "para"}) + "\n" for g, b in pairs))
    f2 = tmp_path / "swapped.jsonl"
    f2.write_text("".join(json.dumps({"sentence_good": b, "sentence_bad": g}) + "\n" for g, b in pairs))
    r = minimal_pairs(model, tiny_tokenizer, [f, f2], batch_size=3)
    assert r["n"] == 8
    assert r["per_paradigm"]["para"] == sum(expected) / 4
    assert r["per_paradigm"]["swapped"] == 1 - sum(expected) / 4       # swapping good/bad flips every pair
    assert r["accuracy"] == 0.5
    assert minimal_pairs(model, tiny_tokenizer, [f], limit=2)["n"] == 2


def test_minimal_pairs_names_bad_row(tmp_path, tiny_model_factory, tiny_tokenizer):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"good": "x"}) + "\n")
    with pytest.raises(InputError, match="bad.jsonl:1"):
        minimal_pairs(tiny_model_factory(), tiny_tokenizer, [f])


def test_metrics_run_in_eval_mode_and_restore_training_flag(tiny_model_factory, tiny_tokenizer):
    m = tiny_model_factory()
    m.config.attention_dropout = 0.5
    for layer in m.model.layers:
        layer.self_attn.attention_dropout = 0.5
    m.train()
    a = perplexity(m, tiny_tokenizer, TEXT, max_tokens=30)["nll_sum"]
    assert m.training                                         # flag restored
    b = perplexity(m, tiny_tokenizer, TEXT, max_tokens=30)["nll_sum"]
    assert a == b                                             # no dropout while measuring
