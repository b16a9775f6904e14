"""The trainer on the real SmolLM2-135M teacher: 2 bf16 steps, checkpoint, reload (tied embeddings kept)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F


@pytest.mark.slow
def test_smollm2_two_steps_checkpoint_and_reload(smollm2_dir, tmp_path):
    from distillgate.config import TrainSpec
    from distillgate.models import load_model
    from distillgate.train import load_checkpoint, train

    lm = load_model(str(smollm2_dir))
    tok = lm.tokenizer
    texts = ["The contract terminates on 31 December unless either party gives notice in writing.",
             "Please summarise the patient's symptoms and list the medication dosage for each day."]
    enc = tok(texts, return_tensors="pt", padding="max_length", max_length=32, truncation=True)
    loss_mask = enc["attention_mask"].clone()
    loss_mask[:, :8] = 0
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "loss_mask": loss_mask}

    class Out:
        def __init__(self, s, n, terms):
            self.total_sum, self.n_tokens, self.terms = s, n, terms

    def ce(model, b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        sel = b["loss_mask"][:, 1:].bool()
        per = F.cross_entropy(logits[:, :-1][sel].float(), b["input_ids"][:, 1:][sel], reduction="none")
        return Out(per.sum(), per.numel(), {"ce": float(per.detach().mean())})

    # Train only the last decoder layer: the full model still runs forward, is checkpointed (538 MB fp32)
    # and reloaded, but the optimizer state stays small and backward stops early (keeps the test short).
    for name, p in lm.model.named_parameters():
        p.requires_grad_(name.startswith(f"model.layers.{lm.model.config.num_hidden_layers - 1}."))
    spec = TrainSpec(steps=2, batch_size=2, lr=1e-5, warmup_steps=0, precision="bf16", log_every=1)
    r = train(lm.model, ce, lambda epoch: [batch], spec, tmp_path, progress=False, tensorboard=False,
              keep_checkpoints=1)
    assert r.steps == 2 and r.skipped_steps == 0 and math.isfinite(r.final_loss) and r.final_loss < 10
    fresh = load_model(str(smollm2_dir)).model
    load_checkpoint(r.last_checkpoint, fresh)
    for (k, a), b in zip(lm.model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()  # still tied
