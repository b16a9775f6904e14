import pytest
import torch

from distillgate.evaluate.decision_path import (_encode, compare_paths, decision_path_consistency, evidence_path,
                                                generate_instructions)


def test_instructions_have_known_structure_and_answers():
    insts = generate_instructions(30, seed=3)
    assert insts == generate_instructions(30, seed=3)
    assert {i.meta["kind"] for i in insts} == {"invoice", "booking", "loan"}
    for i in insts:
        assert len(i.pieces) == 6 and 2 <= len(i.relevant) <= 4
        for r in i.relevant:  # every referenced piece number appears in the question
            assert f"[{r + 1}]" in i.question
        assert i.answer.isupper()
    inv = [i for i in insts if i.meta["kind"] == "invoice"]
    assert {i.answer for i in inv} <= {"APPROVE", "ESCALATE", "REJECT"}


def test_piece_spans_cover_the_piece_text(tiny_tokenizer):
    inst = generate_instructions(1)[0]
    ids, spans = _encode(tiny_tokenizer, inst)
    for i, (a, b) in enumerate(spans):
        text = tiny_tokenizer.decode(ids[0, a:b])
        assert inst.pieces[i][:20] in text


def test_compare_paths_rules():
    t = {"answer": "APPROVE", "ranking": [2, 0, 1, 3]}
    assert compare_paths(t, {"answer": "APPROVE", "ranking": [2, 0, 3, 1]}, m=2)["consistent"]
    r = compare_paths(t, {"answer": "APPROVE", "ranking": [0, 2, 1, 3]}, m=2)
    assert not r["consistent"] and r["consistent_lenient"]
    assert not compare_paths(t, {"answer": "REJECT", "ranking": [2, 0, 1, 3]}, m=2)["consistent"]


def test_gradient_attribution_matches_a_finite_difference(tiny_model_factory, tiny_tokenizer):
    m = tiny_model_factory(num_layers=2).double()
    inst = generate_instructions(1)[0]
    p = evidence_path(m, tiny_tokenizer, inst)
    assert len(p["scores"]) == len(inst.pieces) and sorted(p["ranking"]) == list(range(len(inst.pieces)))
    # grad x input of one piece == directional derivative along its embeddings (finite difference)
    ids, spans = _encode(tiny_tokenizer, inst)
    emb = m.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        first = int(m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                               pad_token_id=tiny_tokenizer.pad_token_id)[0, -1])
    a, b = spans[0]
    f = lambda e: torch.log_softmax(m(inputs_embeds=e).logits[0, -1], -1)[first]  # noqa: E731
    e1 = emb.clone().requires_grad_(True)
    f(e1).backward()
    gx = (e1.grad[0, a:b] * emb[0, a:b]).sum(-1)
    eps = 1e-6
    for t in range(a, min(b, a + 2)):
        d = torch.zeros_like(emb)
        d[0, t] = emb[0, t] * eps
        with torch.no_grad():
            fd = (f(emb + d) - f(emb - d)) / (2 * eps)
        assert float(fd) == pytest.approx(float(gx[t - a]), rel=1e-4, abs=1e-8)


def test_a_model_is_consistent_with_itself(tiny_model_factory, tiny_tokenizer):
    m = tiny_model_factory(num_layers=2)
    r = decision_path_consistency(m, m, tiny_tokenizer, n=4)
    assert r["path_consistency"] == 1.0 and r["answer_agreement"] == 1.0 and r["n"] == 4
    other = tiny_model_factory(num_layers=2, seed=7)
    r2 = decision_path_consistency(other, m, tiny_tokenizer, n=4)
    assert r2["path_consistency"] <= r2["path_consistency_lenient"] <= 1.0


def test_teacher_paths_memo_and_weights_untouched(tiny_model_factory, tiny_tokenizer, monkeypatch, tmp_path):
    """A later call with the memo (the run's teacher_cache) traces only the student; the weights keep
    requires_grad and get no gradient (only the input embeddings need one)."""
    import distillgate.evaluate.decision_path as dp

    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path))
    t, s = tiny_model_factory(num_layers=2), tiny_model_factory(num_layers=2, seed=7)
    memo, traced = {}, []
    real = dp.evidence_paths
    monkeypatch.setattr(dp, "evidence_paths", lambda m, tok, insts, **k: traced.extend([m] * len(insts))
                        or real(m, tok, insts, **k))
    r1 = dp.decision_path_consistency(s, t, tiny_tokenizer, n=3, teacher_fingerprint="fp", memo=memo)
    assert traced.count(t) == 3 and len(memo) == 1
    traced.clear()
    r2 = dp.decision_path_consistency(s, t, tiny_tokenizer, n=3, teacher_fingerprint="fp", memo=memo)
    assert traced == [s, s, s] and r2["rows"] == r1["rows"]
    assert all(p.requires_grad and p.grad is None for p in s.parameters())


def test_batched_paths_equal_one_at_a_time(tiny_model_factory, tiny_tokenizer):
    """Left-padded batches (one generate, one forward/backward per batch) give each instruction the answer
    and the evidence scores it gets alone (float64: rounding far below the scores' gaps)."""
    from distillgate.evaluate.decision_path import evidence_paths

    m = tiny_model_factory(num_layers=2, seed=3).double()
    insts = generate_instructions(7, seed=5)
    assert len({_encode(tiny_tokenizer, i)[0].shape[1] for i in insts}) > 1   # the batches need padding
    one = [evidence_path(m, tiny_tokenizer, i) for i in insts]
    batched = evidence_paths(m, tiny_tokenizer, insts, batch_size=4)
    for a, b in zip(one, batched):
        assert a["answer"] == b["answer"] and a["ranking"] == b["ranking"]
        assert b["scores"] == pytest.approx(a["scores"], rel=1e-6, abs=1e-12)
    assert all(p.requires_grad and p.grad is None for p in m.parameters())
