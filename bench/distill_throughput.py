"""Distillation throughput: distillgate (cached top-k targets, online teacher) vs TRL's GKDTrainer and a
plain HF-Trainer KD loop, on the same teacher, student, data, batch order (4 x 256 tokens), lr and precision.

    .venv/bin/python bench/distill_throughput.py [--steps 10] [--warmup 3] [--rounds 2] [--precision bf16|fp32]
                                                 [--device cpu|cuda]

Each method trains in its own subprocess (so peak RSS is its own), methods interleaved round by round (so
machine drift hits all alike). Reported per method: loss tokens/s (median of steps after warm-up, then
median over rounds), peak RSS of training (recorded before the held-out evaluation loads anything), MFU (the
time the matmul FLOPs would take at the matmul peaks measured first / the measured time), and the held-out
KL(teacher||student) after the same tokens in the same order (exact, dense, fp32; same held-out rows; the HF
Trainer's shuffling is replaced by sequential order, which alone moved this KL by ~2% after 10 steps).
Precision: bf16 (default, as issue 2 prescribes) or fp32 for every method. Allocator: by default every method
runs with the glibc settings distillgate's trainer applies to itself (``hardware.tune_malloc``: it speeds TRL up
too, +30% in fp32), so the comparison is between the tools, not their allocator settings (``--malloc``).
On a CPU without native bf16
(AVX512-BF16/AMX) distillgate runs its fused lm-head in fp32 inside bf16 autocast (see losses.fused).
Teacher data: the teacher's own answers to built-in prompts, packed into 256-token rows (benchmark data are
never the shared evaluation sets). Cached targets (top-64 + 16 tail samples by default, as the config's
defaults) are computed once before timing (their one-time cost is printed). The last line is machine-readable.
``--device cuda``: every method trains and evaluates on the GPU (the data and cached targets are prepared on the
CPU first); step times are taken after a CUDA synchronize, and the peak GPU memory (torch's max allocated) is
reported next to the RSS. The MFU peak is then the GPU's measured bf16 (or fp32) matmul rate.
``--methods ...,distillgate_cached_compiled``: the cached method with ``train.compile: on`` (compiled decoder
layers); its compile cache starts empty in the work folder (round 0 cold, later rounds warm) and the compile
seconds per round are a column of their own (the tokens/s exclude them: they fall in the warm-up steps).
``--methods ...,distillgate_online_compiled``: the online teacher with ``train.compile: on``: the student's
decoder layers (training graph) and the online teacher's (inference graph, under no_grad) compiled; the compile
seconds (both models) are reported the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SEQ, BATCH, LR = 256, 4, 3e-4
METHODS = ("distillgate_cached", "distillgate_online", "trl_gkd", "hf_trainer_kd")
OPTIONAL = ("distillgate_cached_compiled", "distillgate_online_compiled")  # --methods only: train.compile: on
CACHED = ("distillgate_cached", "distillgate_cached_compiled")  # no teacher at training time


# ------------------------------------------------------------------------------------------ prep
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak_gflops(dtype=torch.bfloat16, n=2048, repeats=5, device: str = "cpu") -> float:
    if device.startswith("cuda"):
        n, repeats = 8192, 20
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    _sync(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _sync(device)
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def prepare(work: Path, student_layers: int, n_train_rows: int, n_held_rows: int, topk: int, tail: int,
            teacher_spec: str = "default") -> dict:
    from distillgate.config import DataSpec
    from distillgate.data.dataset import get_or_generate_dataset
    from distillgate.data.generate import Example
    from distillgate.data.prompts import builtin_prompts
    from distillgate.models import load_model, save_model
    from distillgate.models.derive import derive_student
    from distillgate.targets import get_or_compute_targets

    teacher = load_model(teacher_spec)
    spec = DataSpec(num_prompts=112, max_new_tokens=96, gen_batch_size=16, heldout_fraction=0.0)
    ds = get_or_generate_dataset(teacher, builtin_prompts(112, spec.domains, 0), spec)
    stream = [t for e in ds.examples("all") for t in e.input_ids]
    need = (n_train_rows + n_held_rows) * SEQ
    if len(stream) < need:
        raise SystemExit(f"only {len(stream)} teacher tokens, need {need}")
    rows = [stream[i * SEQ:(i + 1) * SEQ] for i in range(n_train_rows + n_held_rows)]
    ex = [Example(id=f"row{i}", prompt_id=f"row{i}", sample_idx=0, domain="mixed", complexity=0.5, input_ids=r,
                  loss_mask=[0] + [1] * (SEQ - 1), response="") for i, r in enumerate(rows)]
    train, held = ex[:n_train_rows], ex[n_train_rows:]
    calib = torch.tensor([t for e in train[:8] for t in e.input_ids]).reshape(8, SEQ)
    student, rep = derive_student(teacher.model, teacher.tokenizer, calib, num_layers=student_layers, mlp_width=None,
                                  layer_selection="block_influence")
    sdir = work / "student"
    if not sdir.exists():
        save_model(student, teacher.tokenizer, sdir)
    t0 = time.perf_counter()
    pad = teacher.tokenizer.pad_token_id
    cache = get_or_compute_targets(teacher, train, k=topk, batch_size=8, pad_id=pad, root=work / "targets",
                                   progress=False, tail_samples=tail)
    (work / "rows.json").write_text(json.dumps({"train": [e.to_json() for e in train],
                                                "held": [e.to_json() for e in held], "pad": pad,
                                                "targets": str(cache.path), "teacher": teacher_spec}))
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.model.parameters())
    emb = teacher.model.get_input_embeddings().weight.numel()
    return {"targets_seconds": time.perf_counter() - t0, "student_params": n_s, "teacher_params": n_t,
            "embedding_params": emb, "student_layers": student_layers, "kept_layers": rep.to_dict().get("kept_layers")}


# ------------------------------------------------------------------------------------------ workers
def _rows(work: Path):
    from distillgate.data.dataset import collate
    from distillgate.data.generate import Example

    d = json.loads((work / "rows.json").read_text())
    return ([Example(**r) for r in d["train"]], [Example(**r) for r in d["held"]], d["pad"], d["targets"], collate,
            d.get("teacher", "default"))


@torch.inference_mode()
def heldout_kl(student, teacher, held, pad, collate) -> float:
    student.eval()
    device = next(student.parameters()).device
    teacher.to(device)
    tot, n = 0.0, 0
    for i in range(0, len(held), 4):
        ids = collate(held[i:i + 4], pad)["input_ids"].to(device)
        s = torch.log_softmax(student(input_ids=ids).logits[:, :-1].float(), -1)
        t = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
        kl = (t.exp() * (t - s)).sum(-1)
        tot += float(kl.double().sum())
        n += kl.numel()
    return tot / n


def worker(method: str, work: Path, steps: int, out: Path, precision: str, device: str = "cpu") -> None:
    from distillgate.models import load_model

    torch.manual_seed(0)
    train, held, pad, tdir, collate, teacher_spec = _rows(work)
    # With cached targets the teacher is not needed while training: load it only for the held-out KL.
    teacher = None if method in CACHED else load_model(teacher_spec)
    if teacher is not None:
        teacher.model.to(device)
    student = load_model(str(work / "student")).model.to(device)
    student.train()
    batches = [collate(train[i:i + BATCH], pad) for i in range(0, len(train), BATCH)]
    if device != "cpu":  # distillgate's own batches go to the student's device here (the HF ones: by the Trainer)
        batches_dev = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    else:
        batches_dev = batches
    step_times: list[float] = []
    loss_tokens = BATCH * (SEQ - 1)
    if method.startswith("distillgate"):
        from distillgate.config import LossSpec, TrainSpec
        from distillgate.losses.objective import DistillObjective
        from distillgate.targets import OnlineTeacher, TargetCache
        from distillgate.train import train as dg_train

        provider = TargetCache.open(tdir) if method in CACHED else OnlineTeacher(teacher.model)
        obj = DistillObjective(LossSpec(divergence="forward_kl", channels={"kd": 1.0}), provider,
                               vocab_size=student.config.vocab_size)
        spec = TrainSpec(steps=steps, batch_size=BATCH, lr=LR, warmup_steps=0, min_lr_ratio=1.0, precision=precision,
                         max_grad_norm=1.0, compile="on" if method.endswith("_compiled") else "off")
        last = [time.perf_counter()]

        def cb(info):
            _sync(device)
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now

        with tempfile.TemporaryDirectory() as d:
            res = dg_train(student, obj, lambda epoch: batches_dev, spec, d, callbacks=[cb], progress=False,
                           tensorboard=False)
        compile_s = res.compile_seconds if res.compiled else None
    else:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        rows = [{"input_ids": b["input_ids"][j].tolist()} for b in batches for j in range(len(b["input_ids"]))]

        def collator(feats):
            ids = torch.tensor([f["input_ids"] for f in feats])
            labels = ids.clone()
            labels[:, 0] = -100
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                _sync(device)
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync(device)
                step_times.append(time.perf_counter() - self.t)

        common = dict(output_dir=str(out.parent / f"{method}-tmp"), per_device_train_batch_size=BATCH, max_steps=steps,
                      learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, bf16=precision == "bf16",
                      use_cpu=device == "cpu",
                      report_to=[], save_strategy="no", logging_steps=1000, dataloader_num_workers=0, seed=0,
                      gradient_checkpointing=False, max_grad_norm=1.0, remove_unused_columns=False)
        def sequential(cls):
            """The same batches in the same order as distillgate's runs (HF Trainer shuffles by default): after
            10 steps the order alone moves the held-out KL by ~2%, as much as the gap being measured."""
            class Sequential(cls):
                def _get_train_sampler(self, *a, **kw):
                    return torch.utils.data.SequentialSampler(self.train_dataset)
            return Sequential

        if method == "trl_gkd":
            from datasets import Dataset
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = GKDConfig(**common, lmbda=0.0, beta=0.0, max_length=SEQ, temperature=1.0)
            trainer = sequential(GKDTrainer)(model=student, teacher_model=teacher.model, args=args, data_collator=collator,
                                 train_dataset=Dataset.from_list(rows), processing_class=teacher.tokenizer,
                                 callbacks=[Timer()])
        else:
            from datasets import Dataset

            tmodel = teacher.model

            class KDTrainer(Trainer):
                """The plain HF-Trainer KD loop: full teacher logits every step, forward KL over all positions."""

                def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                    s = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
                    with torch.no_grad():
                        t = tmodel(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
                    ls, lt = torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
                    loss = (lt.exp() * (lt - ls)).sum(-1).mean()
                    return (loss, s) if return_outputs else loss

            trainer = sequential(KDTrainer)(model=student, args=TrainingArguments(**common), data_collator=collator,
                                train_dataset=Dataset.from_list(rows), callbacks=[Timer()])
        trainer.train()
        compile_s = None
    # Peak RSS of training (recorded before the held-out KL below loads the teacher into the cached run).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    gpu = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
    if teacher is None:
        import gc

        gc.collect()
        teacher = load_model(teacher_spec)
    kl = heldout_kl(student, teacher.model, held, pad, collate)
    out.write_text(json.dumps({"method": method, "step_seconds": step_times, "loss_tokens_per_step": loss_tokens,
                               "peak_rss_gib": rss, "peak_gpu_gib": gpu, "heldout_kl": kl,
                               "compile_seconds": compile_s}))


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--student-layers", type=int, default=15)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, of {', '.join(METHODS + OPTIONAL)} (distillgate_cached_compiled / "
                         f"distillgate_online_compiled: train.compile: on, the online one compiles the teacher's "
                         f"layers too; the compile cache starts empty in --work, so round 0 compiles cold "
                         f"and later rounds reuse the cache, as later runs and iterations do)")
    ap.add_argument("--topk", type=int, default=64, help="cached targets per token (default 64)")
    ap.add_argument("--tail-samples", type=int, default=16,
                    help="cached tail samples per token (default 16, as targets.tail_samples; 0: one-bucket tail)")
    ap.add_argument("--malloc", choices=("tuned", "glibc", "as-shipped"), default="tuned",
                    help="tuned (default): every method runs with the glibc settings distillgate's trainer applies "
                         "(hardware.tune_malloc), so no tool gets an edge from the allocator; glibc: every method "
                         "with glibc's defaults; as-shipped: distillgate tunes itself, the others run as users "
                         "run them")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="every method's precision (default bf16, as the issue prescribes; fp32 is faster on a CPU "
                         "without native bf16)")
    ap.add_argument("--teacher", default="default", help="teacher model (default: the embedded SmolLM2-135M; "
                                                         "bench/gpu.sh --dry-run passes a tiny random one)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N: where every method trains")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every process (default: torch's)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not (a.device == "cpu" or a.device.startswith("cuda")):
        ap.error(f"--device {a.device!r}: cpu, cuda or cuda:N")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: torch {torch.__version__} sees no CUDA device (a CPU build of torch?)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        worker(a.worker, Path(a.work), a.steps, Path(a.out), a.precision, a.device)
        return
    from distillgate.hardware import MALLOC_MMAP_BYTES, MALLOC_TRIM_BYTES

    if a.malloc == "tuned":
        os.environ.update(MALLOC_MMAP_THRESHOLD_=str(MALLOC_MMAP_BYTES), MALLOC_TRIM_THRESHOLD_=str(MALLOC_TRIM_BYTES))
    else:
        for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            os.environ.pop(k, None)
        if a.malloc == "glibc":
            os.environ["DISTILLGATE_MALLOC_TUNING"] = "0"
    work = Path(a.work or tempfile.mkdtemp(prefix="dg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bad = [m for m in a.methods.split(",") if m not in METHODS + OPTIONAL]
    if bad:
        ap.error(f"--methods: unknown {bad}; allowed: {', '.join(METHODS + OPTIONAL)}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "compile-cache")  # the workers inherit it
    peak32 = matmul_peak_gflops(torch.float32, device=a.device)
    peak = matmul_peak_gflops(torch.bfloat16, device=a.device) if a.precision == "bf16" else peak32
    info = prepare(work, a.student_layers, n_train_rows=a.steps * BATCH, n_held_rows=8, topk=a.topk,
                   tail=a.tail_samples, teacher_spec=a.teacher)
    methods = a.methods.split(",")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(a.rounds):
        for m in methods:
            out = work / f"{m}-{r}.json"
            cmd = [sys.executable, __file__, "--worker", m, "--work", str(work), "--steps", str(a.steps),
                   "--out", str(out), "--precision", a.precision, "--device", a.device] + \
                (["--threads", str(a.threads)] if a.threads else [])
            t0 = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(p.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{m} failed (round {r})")
            results[m].append(json.loads(out.read_text()))
            print(f"round {r} {m}: {time.time() - t0:.0f} s", file=sys.stderr)
    # Matmul FLOPs per loss token: student forward+backward 6*N_s (lm head included), teacher forward 2*N_t when
    # the teacher runs during training (online, TRL, HF); cached targets need none at training time. MFU = the
    # time those FLOPs take at the measured peak of the dtype each part runs in / the measured time. In bf16 on
    # a CPU without native bf16, distillgate's fused lm-head (6*V*H student, 2*V*H online teacher) runs in fp32.
    from distillgate.hardware import native_bf16

    ns, nt, emb = info["student_params"], info["teacher_params"], info["embedding_params"]
    head32 = a.precision == "bf16" and not native_bf16("cuda" if a.device.startswith("cuda") else "cpu")
    rows = {}
    for m, rs in results.items():
        tps = statistics.median(statistics.median(r["loss_tokens_per_step"] / s for s in r["step_seconds"][a.warmup:])
                                for r in rs)
        teacher_runs = m not in CACHED
        if m.startswith("distillgate") and head32:
            head, body = 6 * emb + (2 * emb if teacher_runs else 0), 6 * (ns - emb) + (2 * (nt - emb) if teacher_runs else 0)
            ideal = head / (peak32 * 1e9) + body / (peak * 1e9)
        else:
            ideal = (6 * ns + (2 * nt if teacher_runs else 0)) / (peak * 1e9)
        gpus = [r["peak_gpu_gib"] for r in rs if r.get("peak_gpu_gib") is not None]
        rows[m] = {"tokens_per_s": tps, "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in rs),
                   "peak_gpu_gib": statistics.median(gpus) if gpus else None,
                   "mfu": ideal * tps, "heldout_kl": statistics.median(r["heldout_kl"] for r in rs),
                   "compile_s": [r.get("compile_seconds") for r in rs]}
    where = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else \
        f"CPU, {torch.get_num_threads()} torch thread(s)"
    print(f"\n{where}; {a.precision} matmul peak {peak:.0f} GFLOP/s (fp32 {peak32:.0f})"
          f"{'; distillgate lm-head in fp32 (no native bf16)' if head32 else ''}; malloc {a.malloc}; student {ns / 1e6:.1f}M params ({info['student_layers']} layers), "
          f"teacher {nt / 1e6:.1f}M; batch {BATCH}x{SEQ}; {a.steps} steps ({a.warmup} warm-up), {a.rounds} rounds; "
          f"cached top-{a.topk} targets + {a.tail_samples} tail samples precomputed in {info['targets_seconds']:.1f} s (one-time)")
    gpu_col = a.device.startswith("cuda")
    print(f"{'method':22s} {'tokens/s':>9s} {'peak RSS GiB':>13s}" + (f" {'peak GPU GiB':>13s}" if gpu_col else "")
          + f" {'MFU':>6s} {'held-out KL':>12s}  compile s per round (not in tokens/s)")
    for m, r in rows.items():
        print(f"{m:22s} {r['tokens_per_s']:9.1f} {r['peak_rss_gib']:13.2f}"
              + (f" {r['peak_gpu_gib']:13.2f}" if gpu_col else "")
              + f" {100 * r['mfu']:5.1f}% {r['heldout_kl']:12.4f}  "
              + (" / ".join(f"{c:.1f}" for c in r["compile_s"]) if r["compile_s"][0] is not None else "-"))
    kv = [f"device={a.device.split(':')[0]}", f"precision={a.precision}"]
    if "trl_gkd" in rows and "distillgate_cached" in rows:
        o, t = rows["distillgate_cached"], rows["trl_gkd"]
        kv += [f"tokens_per_s_ratio_vs_trl_gkd={o['tokens_per_s'] / t['tokens_per_s']:.3f}",
               f"peak_rss_ratio_vs_trl_gkd={o['peak_rss_gib'] / t['peak_rss_gib']:.3f}",
               f"kl_ratio_vs_trl_gkd={o['heldout_kl'] / t['heldout_kl']:.3f}"]
    if "trl_gkd" in rows and "distillgate_online" in rows:    # the online teacher (closed-form gradient too)
        o, t = rows["distillgate_online"], rows["trl_gkd"]
        kv += [f"online_tokens_per_s_ratio_vs_trl_gkd={o['tokens_per_s'] / t['tokens_per_s']:.3f}",
               f"online_kl_ratio_vs_trl_gkd={o['heldout_kl'] / t['heldout_kl']:.3f}"]
    for pre, base in (("", "distillgate_cached"), ("online_", "distillgate_online")):
        if f"{base}_compiled" not in rows:
            continue
        c = rows[f"{base}_compiled"]
        cs = c["compile_s"]
        kv += [f"{pre}compiled_mfu={c['mfu']:.3f}", f"{pre}compile_seconds_cold={cs[0]:.1f}"]
        if len(cs) > 1:
            kv.append(f"{pre}compile_seconds_warm={statistics.median(cs[1:]):.1f}")
        if base in rows:
            kv.append(f"{pre}compiled_vs_eager_tokens_per_s={c['tokens_per_s'] / rows[base]['tokens_per_s']:.3f}")
        if "trl_gkd" in rows:
            t = rows["trl_gkd"]
            kv += [f"{pre}compiled_tokens_per_s_ratio_vs_trl_gkd={c['tokens_per_s'] / t['tokens_per_s']:.3f}",
                   f"{pre}compiled_kl_ratio_vs_trl_gkd={c['heldout_kl'] / t['heldout_kl']:.3f}"]
    kv.append(f"fp32_peak_gflops={peak32:.1f}")
    print(" ".join(kv))


if __name__ == "__main__":
    main()
