"""Fused chunked lm-head + KD loss vs the unfused path: forward+backward time and peak memory.

Default shape is the SmolLM2 student's head on one micro-batch: N = 1024 prediction positions (4 x 256),
H = 576, V = 49,152, bf16 autocast, cached top-64 targets, forward KL + 0.1 CE, T = 1.5. ``--autograd`` adds
the fused path with per-chunk autograd (what the closed-form top-k gradient replaced).

Each variant runs in its own subprocess so peak memory is not polluted by the allocator's cache of an earlier
variant. Peak memory on CPU is the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) above the
RSS after inputs are built, with glibc's mmap threshold pinned at 1 MiB (MALLOC_MMAP_THRESHOLD_) so freed
tensors go back to the OS instead of piling up in the heap (without it a 24 MiB chunk tensor stays in the
heap and chunk=128 measured a higher peak than chunk=256); on CUDA it is torch.cuda.max_memory_allocated.

    python bench/fused_loss.py [--n 1024 --hidden 576 --vocab 49152 --k 64 --repeats 3 --chunks 1024,256,128]

Last line: machine-readable ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_variant(args) -> dict:
    """One variant in this process: median seconds of forward+backward and peak extra memory (MiB)."""
    import gc

    import torch

    import distillgate.losses.fused as fused_mod
    from distillgate.losses.fused import fused_distill_loss, unfused_distill_loss
    from distillgate.targets import TopKTargets

    torch.manual_seed(0)
    dev = torch.device(args.device)
    n, h, v, k = args.n, args.hidden, args.vocab, args.k
    hs = (torch.randn(n, h, device=dev) * 1.0).requires_grad_(True)
    w = (torch.randn(v, h, device=dev) * 0.05).requires_grad_(True)
    with torch.no_grad():                                     # a peaked teacher, like real text (top-64 ~0.9)
        t_lp = torch.log_softmax(torch.randn(n, h, device=dev) @ (torch.randn(v, h, device=dev) * 0.15).T, -1)
        top = t_lp.topk(k, dim=-1)
        teacher = TopKTargets(top.indices, top.values.float())
        del t_lp, top
    tgt = torch.randint(0, v, (n,), device=dev)
    tw, temp = torch.ones(n, device=dev), torch.full((n,), 1.5, device=dev)
    channels = {"kd": 1.0, "ce": 0.1}
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def step():
        w.grad = hs.grad = None
        with torch.autocast(dev.type, dtype=dtype, enabled=args.dtype == "bf16"):
            if args.variant == "unfused":
                loss, _ = unfused_distill_loss(hs, w, teacher, tgt, tw, temp, channels, "forward_kl", 0.5)
            else:                              # chunk=N: closed-form top-k gradient; autograd=N: autograd per chunk
                fused_mod.CLOSED_FORM = not args.variant.startswith("autograd=")
                loss, _ = fused_distill_loss(hs, w, teacher, tgt, tw, temp, channels, "forward_kl", 0.5,
                                             int(args.variant.split("=")[1]))
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kib("VmRSS") * 1024
        if not _reset_peak():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); run on Linux")
    loss = step()                                              # warm-up, counted in the peak
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_kib("VmHWM") * 1024) - base
    gnorm = float(w.grad.float().norm())
    return {"variant": args.variant, "seconds": statistics.median(times), "peak_mib": peak / 2**20,
            "loss": loss, "w_grad_norm": gnorm}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunks", default="1024,256,128", help="chunk sizes of the fused variants")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--autograd", action="store_true",
                   help="also time the first chunk size with per-chunk autograd instead of the closed-form "
                        "top-k gradient")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)      # internal: run one variant
    args = p.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0

    variants = ["unfused"] + [f"chunk={c}" for c in args.chunks.split(",")] + \
        [f"autograd={c}" for c in args.chunks.split(",")[:1] if args.autograd]
    rows = []
    for var in variants:
        cmd = [sys.executable, __file__, "--variant", var] + [a for a in (argv or sys.argv[1:])]
        env = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), **os.environ}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"N={args.n} H={args.hidden} V={args.vocab} k={args.k} {args.dtype} device={args.device} "
          f"repeats={args.repeats} (median fwd+bwd)")
    print(f"{'variant':<12} {'seconds':>8} {'x unfused':>10} {'peak MiB':>9} {'x unfused':>10} {'loss':>12} "
          f"{'|grad W|':>10}")
    for r in rows:
        print(f"{r['variant']:<12} {r['seconds']:8.3f} {r['seconds'] / base['seconds']:10.2f} "
              f"{r['peak_mib']:9.0f} {r['peak_mib'] / base['peak_mib']:10.2f} {r['loss']:12.4f} "
              f"{r['w_grad_norm']:10.4f}")
    kv = [f"unfused_s={base['seconds']:.3f}", f"unfused_peak_mib={base['peak_mib']:.0f}"]
    for r in rows[1:]:
        c = r["variant"].split("=")[1]
        if r["variant"].startswith("autograd="):
            kv += [f"autograd{c}_s={r['seconds']:.3f}", f"autograd{c}_peak_mib={r['peak_mib']:.0f}"]
            continue
        kv += [f"chunk{c}_s={r['seconds']:.3f}", f"chunk{c}_peak_mib={r['peak_mib']:.0f}",
               f"chunk{c}_mem_ratio={r['peak_mib'] / base['peak_mib']:.3f}",
               f"chunk{c}_time_ratio={r['seconds'] / base['seconds']:.3f}"]
    print(" ".join(kv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
