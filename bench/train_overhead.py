"""Overhead of distillgate's training loop vs a bare ``loss.backward(); opt.step()`` loop.

Same model (Llama, hidden 256, 4 layers, vocab 4096, ~6.5M params), same batches, same CE loss on the
prediction positions, same AdamW and autocast. The trainer adds: token counting, the token-normalised
accumulation, clipping, finite checks, the lr schedule, metrics.jsonl + TensorBoard every step, and the
final checkpoint (timed separately). Per-step time = interval between consecutive step ends (a callback for
the trainer), so logging and bookkeeping are inside it. Runs alternate (bare, trainer) ``--repeats`` times;
the table shows medians over steps after 2 warm-up steps.

    .venv/bin/python bench/train_overhead.py [--steps 12] [--repeats 3] [--threads 2] [--precision bf16]
Last line: key=value pairs (machine readable).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

VOCAB, HIDDEN, LAYERS, B, T = 4096, 256, 4, 4, 128


def make_batches(n: int, seed: int = 0) -> list[dict]:
    """n batches [B,T]: random tokens, right padding, prompt lengths varying -> ~55% loss tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, VOCAB, (B, T), generator=g)
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
        prompts = torch.randint(8, T // 3, (B,), generator=g)
        pos = torch.arange(T)[None]
        am = (pos < lengths[:, None]).long()
        lm = ((pos >= prompts[:, None]) & (pos < lengths[:, None])).long()
        out.append({"input_ids": ids.masked_fill(am == 0, 3), "attention_mask": am, "loss_mask": lm})
    return out


class Out:
    def __init__(self, total_sum, n_tokens, terms):
        self.total_sum, self.n_tokens, self.terms = total_sum, n_tokens, terms


def ce_loss(model, batch) -> Out:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sel = batch["loss_mask"][:, 1:].bool()
    per = F.cross_entropy(logits[:, :-1][sel].float(), batch["input_ids"][:, 1:][sel], reduction="none")
    return Out(per.sum(), per.numel(), {"ce": float(per.detach().mean())})


def model():
    from distillgate.testing import make_tiny_model

    return make_tiny_model(VOCAB, num_layers=LAYERS, hidden=HIDDEN, intermediate=4 * HIDDEN, heads=4, kv_heads=2)


def bare(batches, steps, precision) -> tuple[list[float], int]:
    m = model().train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4, fused=False, foreach=False)
    times, t_prev, ntok = [], time.perf_counter(), 0
    for i in range(steps):
        b = batches[i % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = ce_loss(m, b)
        loss = out.total_sum / out.n_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ntok += out.n_tokens
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
    return times, ntok


def trainer(batches, steps, precision, threads) -> tuple[list[float], int, float]:
    from distillgate.config import TrainSpec
    from distillgate.train import train

    ends = []
    sp = TrainSpec(steps=steps, batch_size=B, grad_accum=1, lr=3e-4, warmup_steps=2, precision=precision,
                   threads=threads, log_every=1, checkpoint_every=0)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        r = train(model(), ce_loss, lambda epoch: batches, sp, d, callbacks=[lambda info: ends.append(
            time.perf_counter())], progress=False, tensorboard=True)
        total = time.perf_counter() - t0
    times = [b - a for a, b in zip([t0] + ends[:-1], ends)]
    return times, r.tokens, total - sum(times)  # the remainder: setup + final checkpoint + summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    batches = make_batches(a.steps)
    tok_per_step = sum(int(b["loss_mask"][:, 1:].sum()) for b in batches) / len(batches)
    bare_t, tr_t, tails = [], [], []
    for _ in range(a.repeats):
        t, _n = bare(batches, a.steps, a.precision)
        bare_t += t[2:]
        t, _n, tail = trainer(batches, a.steps, a.precision, a.threads)
        tr_t += t[2:]
        tails.append(tail)
    mb, mt = statistics.median(bare_t), statistics.median(tr_t)
    print(f"model: Llama hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}; batch {B}x{T}; "
          f"{tok_per_step:.0f} loss tokens/step; {a.precision}; {a.threads} threads; "
          f"{a.repeats}x{a.steps} steps (2 warm-up dropped each)")
    print(f"{'loop':<22}{'median s/step':>15}{'loss tok/s':>12}{'min s/step':>12}{'max s/step':>12}")
    for name, ts in (("bare backward+step", bare_t), ("distillgate.train", tr_t)):
        med = statistics.median(ts)
        print(f"{name:<22}{med:>15.4f}{tok_per_step / med:>12.1f}{min(ts):>12.4f}{max(ts):>12.4f}")
    print(f"trainer setup + final checkpoint + summary: median {statistics.median(tails):.3f} s per run")
    overhead = (mt / mb - 1.0) * 100
    print(f"step overhead: {overhead:+.1f}%")
    print(f"bare_tok_s={tok_per_step / mb:.1f} train_tok_s={tok_per_step / mt:.1f} overhead_pct={overhead:.2f} "
          f"tail_s={statistics.median(tails):.3f} precision={a.precision} threads={a.threads}")


if __name__ == "__main__":
    main()
