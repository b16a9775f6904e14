"""Prune quality by importance method (SPEC S3.2): from the same student, remove the same share of attention heads
and MLP units chosen by each importance method, then run the same short re-distillation on the same data.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/prune_quality.py                  # demo student, 30% heads + 30% MLP
    .venv/bin/python bench/prune_quality.py --methods gradient,activation --redistil-steps 12 --threads 1

The student: the demo's (configs/demo.yaml: 15 of the teacher's 30 blocks, MLP 1024; ``--layer-selection``
picks how it is derived), trained ``--pre-steps`` steps on the teacher's answers so the scores are taken on a
student that has started to learn. Each method then: importance on ``--calib-tokens`` calibration tokens of the
teacher's answers (gradient: accumulated |dL/dg| per row; taylor: sum_t |a.dL/da|; obd: the gate's Fisher on the
student's own output, Optimal Brain Damage; taylor2: -dL/dg + 1/2 obd's curvature, the second-order estimate of
the loss change when a unit goes; taylor_trace: taylor accumulated over the first --trace-steps re-distillation
steps; activation: Minitron mean activation magnitude; magnitude: weight
norms; random), the cut (GQA-aware: every KV group keeps the same number
of query heads), plain surgery (no fade, no fold-in: the methods are compared on what they choose), and the same
``--redistil-steps`` of distillation (same data, same order, same seed). Reported per method: held-out KL to the
teacher (exact, on held-out teacher answers) and the WikiText-2 perplexity ratio student/teacher, before and
after re-distillation, FLOPs/token saved (analytic, cross-checked with FlopCounterMode) and seconds.

Held-out and calibration data are the teacher's answers to built-in prompts; WikiText-2 (shared datasets) is used
for perplexity only. The last line is machine-readable: ``kl_ratio_gradient_vs_activation=X
kl_ratio_gradient_vs_magnitude=Y flops_saved_pct=Z`` (after re-distillation; lower is better for gradient), where
"gradient" is ``--gradient-method`` (default ``taylor_trace``, chosen on the ``data.seed=1`` selection setting;
the line ends with ``gradient_method=M``).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "datasets" / "wikitext2" / "valid.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--methods", default="taylor_trace,gradient,obd,activation,taylor,magnitude,random")
    ap.add_argument("--heads-keep", type=float, default=0.7)
    ap.add_argument("--mlp-keep", type=float, default=0.7)
    ap.add_argument("--layer-selection", default=None, help="override student.layer_selection (the config's "
                    "by default)")
    ap.add_argument("--train-prompts", type=int, default=96)
    ap.add_argument("--heldout-prompts", type=int, default=24)
    ap.add_argument("--pre-steps", type=int, default=24)
    ap.add_argument("--redistil-steps", type=int, default=24)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--ppl-text", default=os.environ.get("PRUNE_PPL_TEXT", str(WIKITEXT)))
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--fade", type=float, default=0.0, help="fade the dropped units out over this share of the "
                    "re-distillation steps, frozen, as the prune stage does (0: plain surgery, then re-distil)")
    ap.add_argument("--cut-steps", type=int, default=1, help="reach the cut in this many score-and-cut steps "
                    "(MLP units spread over them, heads in the last), re-scoring the smaller model each time")
    ap.add_argument("--score-after", type=int, default=0, help="score on a copy of the student distilled this many "
                    "more steps (its weights then dropped: the cut is made on the student every method starts "
                    "from); the steps count in 'score s'")
    ap.add_argument("--learned-epochs", type=int, default=4, help="importance 'learned': passes over the "
                    "calibration rows")
    ap.add_argument("--base-cache", default=None, help="folder: save the trained unpruned student there, or load "
                    "it from there when present (for repeated exploration runs on one setting)")
    ap.add_argument("--gradient-method", default="taylor_trace", help="the gradient-based method the last line's "
                    "kl_ratio_gradient_* keys measure (gradient, fisher, taylor, obd, taylor2, learned or "
                    "taylor_trace; "
                    "named there)")
    ap.add_argument("--trace-steps", type=int, default=8, help="method 'taylor_trace': score = taylor "
                    "(sum_t |a.dL/da|) accumulated over the first N re-distillation steps (same objective, data, "
                    "order and seed) of a copy of the student with every unit kept, its weights then dropped "
                    "(Molchanov et al. 2017); the steps count in 'score s'")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. teacher.path=DIR)")
    args = ap.parse_args()
    grad_methods = ("gradient", "fisher", "taylor", "obd", "taylor2", "learned", "taylor_trace")
    if args.gradient_method not in grad_methods:
        ap.error(f"--gradient-method {args.gradient_method!r}: one of {', '.join(grad_methods)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from distillgate import pipeline
    from distillgate.config import RunConfig, load_config
    from distillgate.data.dataset import DistillDataset
    from distillgate.evaluate.providers import measure_student
    from distillgate.loop.state import LoopState
    from distillgate.loop.training_set import TrainingSet, prompt_pool
    from distillgate.models import prune as P
    from distillgate.models.flops import flops_report
    from distillgate.models.importance import TaylorTrace, importance
    from distillgate.train import StopTraining

    over = [f"eval.text_file={args.ppl_text}", f"eval.max_tokens={args.ppl_tokens}"]
    if args.layer_selection:
        over.append(f"student.layer_selection={args.layer_selection}")
    cfg = load_config(RunConfig, args.config, over + list(args.overrides))
    t0 = time.perf_counter()
    teacher = pipeline.load_teacher(cfg)
    pool = prompt_pool(cfg, 8)
    ts = TrainingSet(cfg, teacher, LoopState(), pool, progress=False)
    mix = {d: 1.0 / len(cfg.data.domains) for d in cfg.data.domains}
    held_prompts = ts.take(args.heldout_prompts, mix, "lm", seed=-1)
    ts.state.heldout_prompts = [p.id for p in held_prompts]
    heldout = ts.answers(held_prompts)
    train = ts.add_prompts(1, ts.take(args.train_prompts, mix, "lm", seed=1))
    calib_cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"calib_tokens": args.calib_tokens})})
    calib = pipeline.calibration_ids(calib_cfg, teacher.tokenizer, train)
    print(f"data: {len(train)} training examples, {len(heldout)} held-out, calibration {tuple(calib.shape)}; "
          f"threads {torch.get_num_threads()} ({time.perf_counter() - t0:.0f} s)", flush=True)

    t1 = time.perf_counter()
    cached = args.base_cache and (Path(args.base_cache) / "config.json").exists()
    if cached:
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(args.base_cache, dtype=torch.float32).train()
        print(f"student: loaded from {args.base_cache}", flush=True)
    else:
        base, info = pipeline.build_student(cfg, teacher, pipeline.calibration_ids(cfg, teacher.tokenizer, train))
        print(f"student: {cfg.student.init} ({cfg.student.layer_selection}) -> layers "
              f"{info.get('report', {}).get('kept_layers')} ({time.perf_counter() - t1:.0f} s)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    cache: dict = {}

    def distil(model, steps: int, seed: int, callbacks=()):
        ds = DistillDataset(train, pad_id=pipeline.pad_id(teacher.tokenizer), seq_len=cfg.data.seq_len,
                            heldout_fraction=0.0)
        obj = pipeline.make_objective(cfg, ts.provider(), vocab_size=len(teacher.tokenizer))
        spec = cfg.train.model_copy(update={"steps": steps, "seed": seed, "checkpoint_every": 0})
        out = work / f"train-{time.monotonic_ns()}"
        model.train()
        r = pipeline.map_student(model, obj, ds, spec, out, seed=seed, progress=False, callbacks=callbacks)
        shutil.rmtree(out, ignore_errors=True)
        return r

    def measure(model):
        model.eval()
        v, _, _ = measure_student(teacher, model, ["kl", "ppl_ratio"],
                                  {"heldout": heldout, "ppl_text": cfg.eval.text_file, "ppl_tokens": cfg.eval.max_tokens},
                                  cache)
        model.train()
        return v["kl"], v["ppl_ratio"]

    if args.pre_steps and not cached:
        distil(base, args.pre_steps, seed=cfg.train.seed)
    if args.base_cache and not cached:
        base.save_pretrained(args.base_cache, safe_serialization=True)
    kl0, ppl0 = measure(base)
    D = P.dims(base)
    per = max(1, round(D["heads"] * args.heads_keep / D["kv_heads"]))
    targets = P.Targets(heads=per * D["kv_heads"], mlp=int(round(D["mlp"] * args.mlp_keep)), layers=D["layers"],
                        hidden=D["hidden"], rotary_pairs=D["head_dim"] // 2)
    print(f"unpruned student: KL {kl0:.4g}, WikiText-2 PPL ratio {ppl0:.3f}; cut heads {D['heads']} -> "
          f"{targets.heads} per layer (KV {D['kv_heads']}), MLP {D['mlp']} -> {targets.mlp}", flush=True)
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        s = copy.deepcopy(base)
        ta = time.perf_counter()
        # --cut-steps N: score, cut 1/N of the way (MLP units; heads go in the last step, they come in 33% steps),
        # score the smaller model again, ... (no training in between); the last step is the cut measured below
        for j in range(1, args.cut_steps):
            mid = P.Targets(heads=D["heads"], mlp=int(round(D["mlp"] - j * (D["mlp"] - targets.mlp) / args.cut_steps)),
                            layers=D["layers"], hidden=D["hidden"], rotary_pairs=D["head_dim"] // 2)
            sc = importance(s, calib, kinds=("heads", "mlp"), method=method, teacher=teacher.model,
                              seed=cfg.train.seed + j)
            s = P.apply_keep(s, P.select(s, sc, mid))
        probe = s
        if args.score_after:
            probe = copy.deepcopy(s)
            distil(probe, args.score_after, seed=cfg.train.seed + 2)
        if method == "taylor_trace":  # the first --trace-steps of the re-distillation below, every unit kept
            probe = copy.deepcopy(probe)
            def stop(info):  # the re-distillation's own schedule (same lr at each step), stopped at step N
                if info.step >= args.trace_steps:
                    raise StopTraining
            with TaylorTrace(probe, ("heads", "mlp")) as trace:
                distil(probe, args.redistil_steps, seed=cfg.train.seed + 1, callbacks=[trace.collect, stop])
            scores = trace.scores()
        else:
            scores = importance(probe, calib, kinds=("heads", "mlp"), method=method, teacher=teacher.model,
                                seed=cfg.train.seed, learned_epochs=args.learned_epochs)
        del probe
        score_s = time.perf_counter() - ta
        keep = P.select(s, scores, targets)
        cut = P.apply_keep(s, keep)
        flops = flops_report(base, cut, max(cfg.loop.perf_lengths))
        klb, pplb = measure(cut)
        tb = time.perf_counter()
        if args.fade:  # the stage's procedure: dropped units frozen and faded out while the kept ones train
            fade_steps = max(1, round(args.fade * args.redistil_steps))
            gates = P.Gates(s, ("heads", "mlp"))
            gates.values.update(P.gate_values(s, keep, 1.0))
            with gates, P.frozen(s, keep) as restore:
                def on_step(info, s=s, gates=gates):
                    restore()
                    gates.values.update(P.gate_values(s, keep, max(0.0, 1.0 - info.step / fade_steps)))
                distil(s, args.redistil_steps, seed=cfg.train.seed + 1, callbacks=[on_step])
            cut = P.apply_keep(s, keep)
        else:
            distil(cut, args.redistil_steps, seed=cfg.train.seed + 1)
        train_s = time.perf_counter() - tb
        kla, ppla = measure(cut)
        rows.append((method, klb, pplb, kla, ppla, flops["flops_saved_pct"], score_s, train_s,
                     max(abs(x) for x in flops["counted"]["analytic_vs_counted_pct"])))
        print(f"  {method}: KL {klb:.4g} -> {kla:.4g}, PPL ratio {pplb:.3f} -> {ppla:.3f} "
              f"(scores {score_s:.1f} s, re-distil {train_s:.1f} s)", flush=True)
        del s, cut
    shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'method':<11} {'KL cut':>8} {'KL +redistil':>13} {'PPL ratio cut':>14} {'PPL +redistil':>14} "
          f"{'FLOPs saved':>12} {'score s':>8} {'redistil s':>11} {'|analytic-counted|':>19}")
    for m, klb, pplb, kla, ppla, fs, ss, trs, dev in rows:
        print(f"{m:<11} {klb:>8.4g} {kla:>13.4g} {pplb:>14.3f} {ppla:>14.3f} {fs:>11.1f}% {ss:>8.1f} {trs:>11.1f} "
              f"{dev:>18.3f}%")
    print(f"(unpruned: KL {kl0:.4g}, PPL ratio {ppl0:.3f}; total {time.perf_counter() - t0:.0f} s)")
    by = {r[0]: r for r in rows}
    kv = {}
    gm = args.gradient_method
    if gm in by and "activation" in by:
        kv["kl_ratio_gradient_vs_activation"] = by[gm][3] / by["activation"][3]
    if gm in by and "magnitude" in by:
        kv["kl_ratio_gradient_vs_magnitude"] = by[gm][3] / by["magnitude"][3]
    kv["flops_saved_pct"] = rows[0][5] if rows else float("nan")
    for r in rows:
        kv[f"kl_{r[0]}"] = r[3]
    print(" ".join(f"{k}={v:.4g}" for k, v in kv.items()) + f" gradient_method={gm}")


if __name__ == "__main__":
    main()
