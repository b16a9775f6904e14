import pytest
import torch

from distillgate.data.dataset import DistillDataset, collate
from distillgate.data.generate import Example
from distillgate.errors import CacheMismatchError
from distillgate.models.load import LoadedModel, fingerprint_model
from distillgate.targets import (
    OnlineTeacher,
    TargetCache,
    TopKTargets,
    _decode_indices,
    _encode_indices,
    compute_targets,
    get_or_compute_targets,
    prediction_positions,
    targets_key,
)
from distillgate.testing import make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 3




def _examples(n=6, seed=0, vocab=384):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        n_prompt = int(torch.randint(3, 9, (1,), generator=g))
        n_resp = int(torch.randint(2, 12, (1,), generator=g))
        ids = torch.randint(4, vocab, (n_prompt + n_resp,), generator=g).tolist()
        out.append(Example(id=f"p{i}/s0", prompt_id=f"p{i}", sample_idx=0, domain="legal", complexity=0.3,
                           input_ids=ids, loss_mask=[0] * n_prompt + [1] * n_resp, response=""))
    return out


@pytest.fixture
def teacher(tiny_tokenizer, tiny_model_factory):
    m = tiny_model_factory(num_layers=2, seed=0)
    return LoadedModel(m, tiny_tokenizer, "", fingerprint_model(m))


def test_prediction_positions_row_major():
    lm = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 1, 1]])
    b, t = prediction_positions({"loss_mask": lm})
    assert b.tolist() == [0, 0, 1, 1, 1] and t.tolist() == [1, 2, 0, 2, 3]
    # a target at t=0 has no predecessor and is never a prediction position
    b, t = prediction_positions({"loss_mask": torch.tensor([[1, 0, 1]])})
    assert b.tolist() == [0] and t.tolist() == [1]


def test_uint16_indices_round_trip_exactly():
    idx = torch.arange(65536).reshape(-1, 16)
    enc = _encode_indices(idx, 65536)
    assert enc.dtype == torch.int16 and torch.equal(_decode_indices(enc), idx)
    big = torch.tensor([[0, 65536, 151_935]])
    enc32 = _encode_indices(big, 151_936)
    assert enc32.dtype == torch.int32 and torch.equal(_decode_indices(enc32), big)


def _reference(model, batch, k):
    """float64 top-k of the full logits at the prediction positions."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    b, t = prediction_positions(batch)
    return torch.log_softmax(logits, -1)[b, t].topk(k)


@pytest.mark.parametrize("lp_dtype,rel", [("float32", 1e-6), ("float16", 2.0 ** -11)])
def test_cache_matches_float64_reference_in_prediction_order(tmp_path, teacher, lp_dtype, rel):
    ex = _examples()
    cache = compute_targets(teacher, ex, k=8, batch_size=4, out_dir=tmp_path / "c", pad_id=PAD,
                            logprob_dtype=lp_dtype, shard_rows=20)  # forces several shards
    assert len(list((tmp_path / "c").glob("shard_*.safetensors"))) > 1
    assert cache.meta["index_dtype"] == "uint16-as-int16" and cache.bytes_per_position == 8 * (2 + (2 if lp_dtype == "float16" else 4))
    batch = collate([ex[4], ex[1], ex[2]], PAD)  # any order, any padding
    tk = cache.topk_for(batch)
    ref = _reference(teacher.model, batch, 8)
    assert tk.indices.dtype == torch.long and tk.logprobs.dtype == torch.float32
    assert tk.indices.shape == (int(batch["loss_mask"][:, 1:].sum()), 8)
    assert torch.equal(tk.indices, ref.indices)
    # float16 keeps 11 significant bits: |error| <= |logprob| * 2^-11 (plus float32 rounding)
    assert ((tk.logprobs.double() - ref.values).abs() <= ref.values.abs() * rel + 2e-5).all()
    assert torch.equal(cache(batch).indices, tk.indices)  # TeacherProvider protocol


def test_full_vocab_captures_all_mass(tmp_path, teacher):
    V = teacher.model.get_output_embeddings().weight.shape[0]
    cache = compute_targets(teacher, _examples(3), k=V, batch_size=2, out_dir=tmp_path / "c", pad_id=PAD,
                            logprob_dtype="float32")
    tk = cache.topk_for(collate(_examples(3), PAD))
    torch.testing.assert_close(tk.logprobs.exp().sum(-1), torch.ones(tk.indices.shape[0]), atol=1e-5, rtol=0)
    assert tk.tail_mass().max() < 1e-5
    assert sorted(tk.indices[0].tolist()) == list(range(V))
    partial = TopKTargets(tk.indices[:, :4], tk.logprobs[:, :4])
    assert (partial.tail_mass() > 0).all()


def test_cache_refuses_mismatched_inputs_naming_the_part(tmp_path, teacher, tiny_tokenizer, tiny_model_factory):
    ex = _examples()
    cache = compute_targets(teacher, ex, k=4, batch_size=8, out_dir=tmp_path / "c", pad_id=PAD)
    assert TargetCache.open(tmp_path / "c", targets_key(teacher, ex, 4)).k == 4
    other_model = tiny_model_factory(num_layers=2, seed=1)
    other = LoadedModel(other_model, tiny_tokenizer, "", fingerprint_model(other_model))
    with pytest.raises(CacheMismatchError, match=r"different teacher \(teacher: cached"):
        TargetCache.open(tmp_path / "c", targets_key(other, ex, 4))
    other_tok = make_tiny_tokenizer(vocab_size=380)
    with pytest.raises(CacheMismatchError, match=r"different tokenizer \("):
        TargetCache.open(tmp_path / "c", targets_key(LoadedModel(teacher.model, other_tok, "", teacher.fingerprint), ex, 4))
    with pytest.raises(CacheMismatchError, match=r"different k \("):
        TargetCache.open(tmp_path / "c", targets_key(teacher, ex, 8))
    with pytest.raises(CacheMismatchError, match=r"different data \("):
        TargetCache.open(tmp_path / "c", targets_key(teacher, ex[:-1], 4))
    # a batch truncated differently from the cached data is refused, not silently misaligned
    short = DistillDataset(ex, pad_id=PAD, seq_len=10, heldout_fraction=0.0).examples("all")
    cut = next(e for e in short if len(e.input_ids) == 10 and e.n_targets > 0)
    with pytest.raises(CacheMismatchError, match="target tokens in the batch"):
        cache.topk_for(collate([cut], PAD))
    with pytest.raises(CacheMismatchError, match="no targets for example"):
        cache.topk_for(collate([Example(**{**ex[0].to_json(), "id": "zz"})], PAD))


def test_get_or_compute_reuses(tmp_path, teacher, monkeypatch):
    import distillgate.targets as tg

    ex = _examples(4)
    a = get_or_compute_targets(teacher, ex, k=4, batch_size=2, pad_id=PAD, root=tmp_path, progress=False)
    monkeypatch.setattr(tg, "compute_targets", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    b = get_or_compute_targets(teacher, ex, k=4, batch_size=2, pad_id=PAD, root=tmp_path, progress=False)
    assert a.path == b.path and len(b) == 4


def test_online_teacher_hidden_forms_the_logits(teacher):
    batch = collate(_examples(3), PAD)
    th = OnlineTeacher(teacher)(batch)
    b, t = prediction_positions(batch)
    assert th.hidden.shape == (len(b), 32) and th.weight.shape == (len(teacher.tokenizer), 32)
    with torch.no_grad():
        logits = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[b, t]
    torch.testing.assert_close((th.hidden.double() @ th.weight.double().T).float(), logits, atol=1e-4, rtol=1e-4)
    assert not th.hidden.requires_grad


# ------------------------------------------------------------------------------------------ tail samples

def test_tail_samples_come_from_the_teacher_tail_distribution():
    """Draws never hit the top k, carry the teacher's exact log-probs, and follow p restricted to the tail."""
    from distillgate.targets import topk_from_hidden

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 6, generator=g), torch.randn(40, 6, generator=g) * 0.7
    rows = hidden.repeat(4000, 1)                                              # 4,000 draws x 2 positions
    tk = topk_from_hidden(rows, weight, 5, tail_samples=1, generator=torch.Generator().manual_seed(1))
    assert tk.tail_indices.shape == (8000, 1) and tk.tail_logprobs.shape == (8000, 1)
    lp = torch.log_softmax(hidden @ weight.T, -1)
    for r in range(2):
        top = set(tk.indices[r].tolist())
        draws = tk.tail_indices[r::2, 0]
        assert not (set(draws.tolist()) & top)
        torch.testing.assert_close(tk.tail_logprobs[r::2, 0], lp[r, draws], rtol=0, atol=1e-5)
        p_tail = lp[r].exp().clone()
        p_tail[list(top)] = 0
        p_tail /= p_tail.sum()
        freq = torch.bincount(draws, minlength=40).double() / draws.numel()
        assert float((freq - p_tail.double()).abs().max()) < 0.03                # 4,000 draws: sd <= 0.008
    assert topk_from_hidden(hidden, weight, 40, tail_samples=8).tail_indices is None   # k = V: no tail


def test_cache_stores_tail_samples_and_keys_on_their_number(tmp_path, teacher):
    ex = _examples()
    a = compute_targets(teacher, ex, k=4, batch_size=3, out_dir=tmp_path / "a", pad_id=PAD, tail_samples=6,
                        shard_rows=20)
    b = compute_targets(teacher, ex, k=4, batch_size=3, out_dir=tmp_path / "b", pad_id=PAD, tail_samples=6)
    assert a.meta["tail_samples"] == 6 and a.bytes_per_position == (4 + 6) * 4
    batch = collate([ex[3], ex[0]], PAD)
    ta, tb = a.topk_for(batch), b.topk_for(batch)
    n = int(batch["loss_mask"][:, 1:].sum())
    assert ta.tail_indices.shape == (n, 6) and ta.tail_indices.dtype == torch.long
    assert torch.equal(ta.tail_indices, tb.tail_indices)                       # seeded by the cache key
    assert not (ta.tail_indices.unsqueeze(2) == ta.indices.unsqueeze(1)).any()
    plain = compute_targets(teacher, ex, k=4, batch_size=3, out_dir=tmp_path / "c", pad_id=PAD)
    assert plain.topk_for(batch).tail_indices is None
    with pytest.raises(CacheMismatchError, match=r"different tail_samples \("):
        TargetCache.open(tmp_path / "a", targets_key(teacher, ex, 4, 0))


def test_topk_targets_select_and_cat_keep_optional_fields_only_when_all_parts_agree():
    a = TopKTargets(torch.arange(6).reshape(3, 2), torch.zeros(3, 2), torch.ones(3, 4, dtype=torch.long),
                    torch.zeros(3, 4))
    sub = a.select(torch.tensor([2, 0]))
    assert sub.indices.tolist() == [[4, 5], [0, 1]] and sub.tail_indices.shape == (2, 4) and sub.log_tail is None
    both = TopKTargets.cat([a, a.select(slice(0, 1))], 2)
    assert both.indices.shape == (4, 2) and both.tail_indices.shape == (4, 4)
    plain = TopKTargets(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2))
    mixed = TopKTargets.cat([a, plain], 2)                       # one part has no tail samples: bucket tail
    assert mixed.indices.shape == (5, 2) and mixed.tail_indices is None and mixed.tail_logprobs is None
    assert TopKTargets.cat([], 3).indices.shape == (0, 3)


def test_tail_samples_do_not_enter_the_key_when_k_covers_the_vocabulary(teacher):
    V = teacher.model.get_output_embeddings().weight.shape[0]
    ex = _examples(2)
    assert targets_key(teacher, ex, V, 16) == targets_key(teacher, ex, V, 0)
    assert targets_key(teacher, ex, 4, 16) != targets_key(teacher, ex, 4, 0)
