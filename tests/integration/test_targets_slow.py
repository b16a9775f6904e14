"""Teacher answers and the top-k target cache on the real SmolLM2 teacher."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_answers_and_targets_round_trip(smollm2_dir, tmp_path):
    from distillgate.data.dataset import DistillDataset
    from distillgate.data.generate import end_of_turn_id, generate_responses
    from distillgate.data.prompts import builtin_prompts
    from distillgate.models import load_model
    from distillgate.targets import TargetCache, compute_targets, prediction_positions, prediction_targets, targets_key

    teacher = load_model(str(smollm2_dir))
    tok = teacher.tokenizer
    prompts = builtin_prompts(4, seed=0)
    ex = generate_responses(teacher.model, tok, prompts, max_new_tokens=24, batch_size=4, progress=False)
    assert len(ex) == 4 and all(e.response.strip() for e in ex)
    eot = end_of_turn_id(tok)
    ds = DistillDataset(ex, pad_id=tok.pad_token_id, seq_len=256, heldout_fraction=0.0)
    batch = ds.batches("all", batch_size=4, shuffle=False)[0]
    for r, e in enumerate(batch["example_ids"]):
        e = next(x for x in ex if x.id == e)
        answer = [t for t, m in zip(e.input_ids, e.loss_mask) if m]
        assert tok.decode([t for t in answer if t != eot]) == tok.decode(tok(e.response, add_special_tokens=False)["input_ids"])
        assert (answer[-1] == eot) == e.finished
    # a greedy teacher's answer token is its own top-1 at every prediction position
    cache = compute_targets(teacher, ds.examples("all"), k=64, batch_size=4, out_dir=tmp_path / "t",
                            pad_id=tok.pad_token_id, logprob_dtype="float16")
    reopened = TargetCache.open(tmp_path / "t", targets_key(teacher, ds.examples("all"), 64))
    tk = reopened.topk_for(batch)
    b, t = prediction_positions(batch)
    assert tk.indices.shape == (len(b), 64) and reopened.meta["index_dtype"] == "uint16-as-int16"
    assert (tk.indices[:, 0] == prediction_targets(batch)).float().mean() > 0.95  # ties aside
    with torch.no_grad():
        logits = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[b, t]
    ref = torch.log_softmax(logits.double(), -1).topk(64)
    assert (tk.indices == ref.indices).float().mean() > 0.99  # float32 vs float64 near-ties only
    assert ((tk.logprobs.double() - ref.values).abs() <= ref.values.abs() * 2.0 ** -11 + 1e-4).all()
    mass = tk.logprobs.exp().sum(-1)
    assert 0.6 < mass.mean() <= 1.0 + 1e-3
