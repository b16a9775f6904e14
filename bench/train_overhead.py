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


def _clock() -> tuple[float, float]:
    """(wall, process CPU) seconds: CPU time is the fairer measure on a shared, oversubscribed machine."""
    return time.perf_counter(), time.process_time()


def _intervals(t0: tuple[float, float], ends: list[tuple[float, float]]) -> list[tuple[float, float]]:
    marks = [t0] + ends
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks[:-1], marks[1:])]


def bare(batches, steps, precision) -> list[tuple[float, float]]:
    m = model().train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4, fused=False, foreach=False)
    ends, t0 = [], _clock()
    for i in range(steps):
        b = batches[i % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = ce_loss(m, b)
        loss = out.total_sum / out.n_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(_clock())
    return _intervals(t0, ends)


def trainer(batches, steps, precision, threads) -> tuple[list[tuple[float, float]], float]:
    from distillgate.config import TrainSpec
    from distillgate.train import train

    ends = []
    sp = TrainSpec(steps=steps, batch_size=B, grad_accum=1, lr=3e-4, warmup_steps=2, precision=precision,
                   threads=threads, log_every=1, checkpoint_every=0)
    m = model()
    with tempfile.TemporaryDirectory() as d:
        t0 = _clock()
        train(m, ce_loss, lambda epoch: batches, sp, d, callbacks=[lambda info: ends.append(_clock())],
              progress=False, tensorboard=True)
        tail = time.perf_counter() - ends[-1][0]  # final checkpoint + closing the logs
    return _intervals(t0, ends), tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    batches = make_batches(a.steps)
    tok_per_step = sum(int(b["loss_mask"][:, 1:].sum()) for b in batches) / len(batches)
    runs: dict[str, list[tuple[float, float]]] = {"bare backward+step": [], "distillgate.train": []}
    tails = []
    for _ in range(a.repeats):  # alternate so drifting machine load hits both alike
        runs["bare backward+step"] += bare(batches, a.steps, a.precision)[2:]
        t, tail = trainer(batches, a.steps, a.precision, a.threads)
        runs["distillgate.train"] += t[2:]
        tails.append(tail)
    print(f"model: Llama hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}; batch {B}x{T}; "
          f"{tok_per_step:.0f} loss tokens/step; {a.precision}; {a.threads} thread(s); "
          f"{a.repeats}x{a.steps} steps (2 warm-up steps dropped per run)")
    print(f"{'loop':<20}{'CPU s/step':>12}{'tok/CPU-s':>11}{'wall s/step':>13}{'tok/s wall':>12}")
    med = {}
    for name, ts in runs.items():
        cpu, wall = statistics.median(c for _, c in ts), statistics.median(w for w, _ in ts)
        med[name] = (cpu, wall)
        print(f"{name:<20}{cpu:>12.4f}{tok_per_step / cpu:>11.1f}{wall:>13.4f}{tok_per_step / wall:>12.1f}")
    (bc, bw), (tc, tw) = med["bare backward+step"], med["distillgate.train"]
    ocpu, owall = (tc / bc - 1) * 100, (tw / bw - 1) * 100
    print(f"per-step overhead of the trainer: {ocpu:+.1f}% CPU, {owall:+.1f}% wall (median); "
          f"final checkpoint + log close: {statistics.median(tails):.3f} s per run")
    print(f"bare_tok_per_cpu_s={tok_per_step / bc:.1f} train_tok_per_cpu_s={tok_per_step / tc:.1f} "
          f"overhead_cpu_pct={ocpu:.2f} overhead_wall_pct={owall:.2f} tail_s={statistics.median(tails):.3f} "
          f"precision={a.precision} threads={a.threads}")


if __name__ == "__main__":
    main()
