"""The loop in 1 process vs 2 torchrun processes on this machine (SPEC W2): throughput and loss-curve agreement.

    python bench/distributed.py [--repeats N] [--steps N] [--hidden H] [--teacher PATH] [--root DIR]

Both sides run the same `distillgate run` (anchor + 3 joint iterations) at the same global batch: 1 process with
``train.grad_accum=2`` (in a subprocess, like the other side) vs ``torchrun --standalone --nproc-per-node 2``
with ``train.grad_accum=1`` (each rank takes one micro-batch, gradients all-reduced over gloo). Every run gets a
fresh DISTILLGATE_HOME, so teacher answers and targets are computed in each (sharded over the 2 ranks on the
second side). The teacher is a random tiny Llama (``--hidden``, 4 layers) unless ``--teacher`` names a model.

Per side, medians over ``--repeats``: wall time, the phase times from the catalog (extract, map, validate), and
training loss tokens/s (``train/tokens_per_s``, global tokens over both ranks; median over iterations). The loss
curve difference is the largest relative difference, over iterations, of the training loss and the held-out KL
between the two sides (first repeat; the runs are deterministic).

Last line: ``tokens_per_s_1proc=A tokens_per_s_2proc=B train_speedup=B/A wall_s_1proc=C wall_s_2proc=D
max_loss_rel_diff=E max_kl_rel_diff=F``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _overrides(teacher: str, root: Path, grad_accum: int, steps: int) -> list[str]:
    return [f"teacher.path={teacher}", "student.init=config", "student.config={num_hidden_layers: 2}",
            "data.max_new_tokens=32", "data.gen_batch_size=4", "targets.batch_size=4", "targets.top_k=32",
            f"train.steps={steps}", "train.batch_size=4", f"train.grad_accum={grad_accum}", "train.warmup_steps=0",
            "train.precision=fp32", "train.threads=1", "loop.prompts_per_iteration=16", "loop.heldout_prompts=8",
            "loop.stages=[{name: anchor, iterations: 0}, {name: joint, iterations: 3}]", "loop.perf_lengths=[16]",
            "loop.perf_repeats=1", f"store_root={root}", "run_id=bench"]


def _one(teacher: str, base: Path, procs: int, steps: int) -> dict:
    root, home = base / "runs", base / "home"
    env = dict(os.environ, OMP_NUM_THREADS="1", DISTILLGATE_HOME=str(home))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
              "--max-restarts", "0"] if procs > 1 else [sys.executable]
    cmd = launch + ["-m", "distillgate", "run", "--no-report", "--no-progress",
                    *_overrides(teacher, root, 2 // procs, steps)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd[:8])} ... failed:\n{(out.stdout + out.stderr)[-3000:]}")
    from distillgate.store import RunStore

    with RunStore.open(root, "bench") as s:
        hist = s.resolve("current").load_json("loop_state.json")["history"]
        phases: dict[str, float] = {}
        for it in s.catalog.iterations():
            for name, p in it["phases"].items():
                phases[name] = phases.get(name, 0.0) + p["seconds"]
    trained = [h["metrics"] for h in hist if "train/loss" in h["metrics"]]
    return {"wall": wall, "phases": phases, "tps": statistics.median(m["train/tokens_per_s"] for m in trained),
            "loss": [m["train/loss"] for m in trained], "kl": [m["kl"] for m in trained]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per iteration")
    ap.add_argument("--hidden", type=int, default=128, help="hidden size of the random tiny teacher")
    ap.add_argument("--teacher", help="a model folder instead of the random tiny teacher")
    ap.add_argument("--root", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    scratch = Path(args.root or tempfile.mkdtemp(prefix="dg-bench-dist-"))
    teacher = args.teacher
    if teacher is None:
        from distillgate.testing import save_tiny_model

        teacher = str(save_tiny_model(scratch / "teacher", num_layers=4, hidden=args.hidden,
                                      intermediate=args.hidden * 2, seed=0))
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(args.repeats):
        for procs in (1, 2):  # interleaved: a change in the machine's load hits both sides
            runs[procs].append(_one(teacher, scratch / f"p{procs}-r{r}", procs, args.steps))
    med = lambda procs, f: statistics.median(f(x) for x in runs[procs])  # noqa: E731
    print(f"teacher {teacher}, {args.steps} steps x 3 iterations, global batch 2 x 4 sequences, "
          f"{args.repeats} repeat(s), OMP_NUM_THREADS=1 per process, {os.cpu_count()} CPU(s)")
    print(f"{'processes':<10}{'wall s':>8}{'extract s':>11}{'map s':>8}{'validate s':>12}{'train tok/s':>13}")
    for procs in (1, 2):
        print(f"{procs:<10}{med(procs, lambda x: x['wall']):>8.1f}"
              f"{med(procs, lambda x: x['phases'].get('extract', 0.0)):>11.1f}"
              f"{med(procs, lambda x: x['phases'].get('map', 0.0)):>8.1f}"
              f"{med(procs, lambda x: x['phases'].get('validate', 0.0)):>12.1f}{med(procs, lambda x: x['tps']):>13.0f}")
    a, b = runs[1][0], runs[2][0]
    rel = lambda xs, ys: max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(xs, ys))  # noqa: E731
    print("iteration  train loss (1 proc / 2 procs)   KL (1 proc / 2 procs)")
    for i, (la, lb, ka, kb) in enumerate(zip(a["loss"], b["loss"], a["kl"], b["kl"]), start=1):
        print(f"{i:<11}{la:.6f} / {lb:.6f}          {ka:.6f} / {kb:.6f}")
    t1, t2 = med(1, lambda x: x["tps"]), med(2, lambda x: x["tps"])
    print(f"tokens_per_s_1proc={t1:.1f} tokens_per_s_2proc={t2:.1f} train_speedup={t2 / t1:.3f} "
          f"wall_s_1proc={med(1, lambda x: x['wall']):.1f} wall_s_2proc={med(2, lambda x: x['wall']):.1f} "
          f"max_loss_rel_diff={rel(a['loss'], b['loss']):.2e} max_kl_rel_diff={rel(a['kl'], b['kl']):.2e}")


if __name__ == "__main__":
    main()
