"""The objective on the real SmolLM2 teacher: self-distillation gives KD ~ 0 and CE equals HF's loss."""

from __future__ import annotations

import pytest
import torch

from distillgate.config import LossSpec
from distillgate.losses import DistillObjective
from distillgate.targets import OnlineTeacher, TopKTargets, prediction_positions


@pytest.mark.slow
def test_self_distillation_on_smollm2_is_zero_kd_and_hf_ce(smollm2_dir):
    from distillgate.models import load_model

    lm = load_model(str(smollm2_dir))
    model, tok = lm.model, lm.tokenizer
    texts = ["The contract terminates on 31 December unless either party gives notice.",
             "Please list the medication dosage and the patient's symptoms in two lines."]
    enc = tok(texts, return_tensors="pt", padding=True)
    loss_mask = enc["attention_mask"].clone()
    loss_mask[:, :4] = 0                                        # "prompt": first 4 tokens
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "loss_mask": loss_mask,
             "domains": ["legal", "medical"], "complexity": torch.tensor([0.2, 0.8]),
             "sample_weight": torch.ones(2)}

    @torch.no_grad()
    def topk(b):
        bi, ti = prediction_positions(b)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[bi, ti]
        v, i = torch.log_softmax(logits.float(), -1).topk(64, -1)
        return TopKTargets(i, v)

    spec = LossSpec(channels={"kd": 1.0, "ce": 1.0}, chunk_size=16,
                    temperature={"policy": "complexity", "min": 0.7, "max": 2.0})
    with torch.no_grad():
        cached = DistillObjective(spec, topk, vocab_size=model.config.vocab_size)(model, batch)
        online = DistillObjective(spec, OnlineTeacher(model))(model, batch)
        bi, ti = prediction_positions(batch)
        ref_logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[bi, ti].float()
        ref_ce = torch.nn.functional.cross_entropy(ref_logits, batch["input_ids"][bi, ti + 1], reduction="none")
    assert cached.n_tokens == online.n_tokens == int(loss_mask[:, 1:].sum())
    # the teacher against itself: KD is zero up to float32 rounding, also for cached top-k at T != 1 (both
    # sides' tails are tempered alike; tempering only the teacher's gave up to 0.69 nats here). Measured max
    # 2.7e-4 cached: the tail r = 1 - sum(p_top) loses relative precision when r is tiny, and T > 1 amplifies it.
    assert float(online.per_token["kd"].abs().max()) < 1e-4
    assert float(cached.per_token["kd"].abs().max()) < 1e-3
    torch.testing.assert_close(online.per_token["ce"], ref_ce, rtol=1e-4, atol=1e-4)
    assert 0.5 < online.terms["ce"] < 8.0
