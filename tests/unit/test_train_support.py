"""Helpers for the trainer tests (tiny model, deterministic batches, a CE loss), and a subprocess entry
point: ``python test_train_support.py OUT STEPS STOP_AT RESUME(0/1) PRECISION`` for the bitwise-resume test."""

from __future__ import annotations

import random
import sys
from types import SimpleNamespace
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

VOCAB = 96


@dataclass
class LossOut:
    """Minimal LossOutput-compatible result (see docs/architecture.md)."""

    total_sum: torch.Tensor
    n_tokens: int
    terms: dict = field(default_factory=dict)
    per_token: dict = field(default_factory=dict)


def tiny_model(seed: int = 0, layers: int = 2, hidden: int = 32):
    from distillgate.testing import make_tiny_model

    return make_tiny_model(VOCAB, num_layers=layers, hidden=hidden, intermediate=2 * hidden, seed=seed)


class TinyLM(torch.nn.Module):
    """Token-wise MLP LM with tied embeddings and dropout: no transformers import, so a subprocess that
    builds it starts in ~2 s; dropout makes the resume test depend on the restored torch RNG state."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 32, seed: int = 0, dropout: float = 0.1):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, 2 * hidden), torch.nn.GELU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(2 * hidden, hidden))
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, like SmolLM2

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = h + self.mlp(h)
        return SimpleNamespace(logits=self.head(h))


def make_sequences(n: int, T: int = 12, seed: int = 0) -> list[dict]:
    """n sequences (1-row tensors) with unequal lengths and prompt lengths -> unequal loss-token counts."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        length = int(torch.randint(5, T + 1, (1,), generator=g))
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        ids = torch.full((1, T), 3, dtype=torch.long)
        ids[0, :length] = torch.randint(4, VOCAB, (length,), generator=g)
        am = torch.zeros(1, T, dtype=torch.long)
        am[0, :length] = 1
        lm = torch.zeros(1, T, dtype=torch.long)
        lm[0, prompt:length] = 1
        seqs.append({"input_ids": ids, "attention_mask": am, "loss_mask": lm})
    return seqs


def collate(seqs: list[dict]) -> dict:
    b = {k: torch.cat([s[k] for s in seqs]) for k in ("input_ids", "attention_mask", "loss_mask")}
    b["example_ids"] = [str(i) for i in range(len(seqs))]
    return b


class EpochBatches:
    """A BatchSource: ``n_batches`` micro-batches of ``batch_size`` rows, reshuffled per epoch by seed."""

    def __init__(self, n_batches: int = 5, batch_size: int = 2, seed: int = 0):
        self.seqs = make_sequences(n_batches * batch_size, seed=seed)
        self.n, self.bs = n_batches, batch_size

    def batches(self, epoch: int) -> list[dict]:
        order = torch.randperm(len(self.seqs), generator=torch.Generator().manual_seed(1000 + epoch)).tolist()
        return [collate([self.seqs[j] for j in order[i * self.bs:(i + 1) * self.bs]]) for i in range(self.n)]


def ce_loss(model, batch, noisy: bool = False) -> LossOut:
    """Cross-entropy on the prediction positions (loss_mask[:, 1:]); terms 'ce' and 'entropy'.

    ``noisy``: weight tokens by torch/python/numpy randomness so RNG restoration matters for resume.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sel = batch["loss_mask"][:, 1:].bool()
    lg = logits[:, :-1][sel].float()  # [N, V]
    tgt = batch["input_ids"][:, 1:][sel]
    per = F.cross_entropy(lg, tgt, reduction="none")  # [N]
    ent = -(lg.log_softmax(-1).exp() * lg.log_softmax(-1)).sum(-1)
    weighted = per
    if noisy:
        w = 1.0 + 0.1 * torch.rand(per.shape) + 0.01 * random.random() + 0.01 * float(np.random.rand())
        weighted = per * w
    n = per.numel()
    terms = {"ce": float(per.detach().mean()) if n else 0.0, "entropy": float(ent.detach().mean()) if n else 0.0}
    return LossOut(weighted.sum(), n, terms, {"ce": per.detach()})


def noisy_ce(model, batch):
    return ce_loss(model, batch, noisy=True)


def spec(**kw):
    from distillgate.config import TrainSpec

    base = dict(steps=6, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=2, precision="fp32", threads=1,
                log_every=1, checkpoint_every=0)
    base.update(kw)
    return TrainSpec(**base)


def _main(out: str, steps: int) -> None:
    """Resume ``out`` in this fresh process and train to ``steps`` (TinyLM, fp32, noisy CE)."""
    from distillgate.train import train

    train(TinyLM(seed=99), noisy_ce, EpochBatches(), spec(steps=steps), out, resume_from=out, progress=False,
          tensorboard=False)


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]))
