import pytest
import torch

from distillgate.evaluate.inheritance import (TASK_KINDS, build_groups, capability_inheritance, paws_groups,
                                              score_inheritance, template_groups)


def test_template_groups_balanced_deterministic_and_three_phrasings():
    g = template_groups(80, seed=1)
    assert g == template_groups(80, seed=1) and g != template_groups(80, seed=2)
    assert len(g) == 80 and len({x.id for x in g}) == 80
    kinds = [x.kind for x in g]
    assert set(kinds) == set(TASK_KINDS) and all(kinds.count(k) == 10 for k in TASK_KINDS)
    assert all(len(x.phrasings) >= 3 and len(set(x.phrasings)) == len(x.phrasings) for x in g)


def test_paws_groups_use_label_1_pairs(datasets_dir):
    g = paws_groups(f"{datasets_dir}/paws_wiki/test.tsv", 5)
    assert len(g) == 5 and all(x.kind == "rewriting" and x.source == "paws" for x in g)
    assert len(build_groups(8, paws_tsv=f"{datasets_dir}/paws_wiki/test.tsv", paws_share=0.5)) == 8


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_clustering_rule_on_known_embeddings():
    # two groups of the same kind, teacher clusters around e1 and e2
    t = [_unit([1, 0.1, 0], [1, -0.1, 0], [1, 0, 0.1]), _unit([0, 1, 0.1], [0.1, 1, 0], [0, 1, -0.1])]
    same = [_unit([1, 0.05, 0], [1, 0, 0.05], [1, 0, 0]), _unit([0, 1, 0], [0.05, 1, 0], [0, 1, 0.05])]
    r = score_inheritance(t, same, ["logic", "logic"])
    assert r["inheritance"] == 1.0 and r["per_kind"] == {"logic": 1.0}
    # the student answers group 0 like group 1 (right for another question): not inherited
    swapped = [same[1], same[1]]
    r = score_inheritance(t, swapped, ["logic", "logic"])
    assert [p["inherited"] for p in r["per_group"]] == [False, True] and r["inheritance"] == 0.5
    # off-cluster answers (orthogonal) fail the radius test
    off = [_unit([0, 0, 1], [0, 0, 1], [0, 0, 1])] * 2
    assert score_inheritance(t, off, ["logic", "logic"])["inheritance"] == 0.0


class _FakeEncoder:
    """Bag-of-characters embedding: deterministic, no model needed."""

    def encode(self, texts, **kw):
        import numpy as np

        out = np.zeros((len(texts), 64), dtype="float32")
        for i, t in enumerate(texts):
            for ch in t.lower():
                out[i, ord(ch) % 64] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_a_model_inherits_from_itself(tiny_model_factory, tiny_tokenizer):
    m = tiny_model_factory(num_layers=2)
    r = capability_inheritance(m, m, tiny_tokenizer, n_groups=8, max_new_tokens=6, batch_size=8,
                               encoder=_FakeEncoder())
    assert r["inheritance"] == 1.0 and r["n_groups"] == 8
    assert r["per_group"][0]["teacher_answers"] == r["per_group"][0]["student_answers"]


@pytest.mark.slow
def test_minilm_encoder_loads_offline():
    from distillgate.evaluate.inheritance import default_encoder

    enc = default_encoder()
    e = enc.encode(["The cat sat on the mat.", "A cat was sitting on the mat.", "Stock prices fell sharply."],
                   normalize_embeddings=True)
    assert e.shape == (3, 384) and e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_teacher_answers_and_embeddings_memo(tiny_model_factory, tiny_tokenizer, monkeypatch, tmp_path):
    """With the memo (the run's teacher_cache) a later call generates and embeds only the student's answers."""
    import distillgate.evaluate.inheritance as inh

    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path))
    t, s = tiny_model_factory(num_layers=2), tiny_model_factory(num_layers=2, seed=3)
    answered = []
    real = inh.answer_all
    monkeypatch.setattr(inh, "answer_all", lambda m, *a, **k: answered.append(m) or real(m, *a, **k))
    memo, kw = {}, dict(n_groups=8, max_new_tokens=4, batch_size=8, encoder=_FakeEncoder(), teacher_fingerprint="fp")
    r1 = inh.capability_inheritance(s, t, tiny_tokenizer, memo=memo, **kw)
    assert answered == [t, s]
    answered.clear()
    r2 = inh.capability_inheritance(s, t, tiny_tokenizer, memo=memo, **kw)
    assert answered == [s] and r2["inheritance"] == r1["inheritance"]


def test_batched_answers_equal_one_at_a_time(tiny_model_factory, tiny_tokenizer):
    """G-C3's answers come from left-padded batches (``inheritance_batch_size``): the same greedy text as
    answering each phrasing alone (token-level batch independence: test_data_generate.py; the tiny vocabulary
    decodes to little text, so this checks the grouping and ordering of the answers)."""
    from distillgate.evaluate.inheritance import answer_all, build_groups

    m = tiny_model_factory(num_layers=2, seed=4)
    groups = build_groups(8, seed=1)
    one = answer_all(m, tiny_tokenizer, groups, max_new_tokens=6, batch_size=1)
    batched = answer_all(m, tiny_tokenizer, groups, max_new_tokens=6, batch_size=24)
    assert batched == one and [len(r) for r in batched] == [len(g.phrasings) for g in groups]
