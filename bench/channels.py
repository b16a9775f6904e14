"""What each S2 loss channel buys (issue 9): kd only, kd+attn, kd+feature, kd+clone and all four, from one
setup: the same student, data, order and number of tokens for every row of :data:`ROWS`, trained with that
row's channels; each row measured the same way.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/channels.py                 # every row
    .venv/bin/python bench/channels.py --rows kd,kd+clone --steps 12 --threads 1
    .venv/bin/python bench/channels.py --mode online                                       # teacher online

Setup (once, in this process): the demo config's teacher (SmolLM2-135M-Instruct) answers ``--train-prompts`` /
``--heldout-prompts`` built-in prompts ``--samples`` times at ``--temperature`` (cached). Every row trains on all
of those sampled answers, so kd-only sees exactly the tokens kd+clone sees (the clone channel, S2.4, needs several
sampled answers per prompt; ``--samples 1 --temperature 0`` gives greedy single answers and no clone rows). One
student is derived from the teacher (``--layer-selection``, default block_influence: the cheap one; every row
starts from the same weights) and saved.

Each row then runs in its own process (so its peak RSS is its own): the student trains ``--steps`` optimizer steps
(same batches, same order, same seed) with the row's ``loss.channels`` (the side channels' teacher data, and the
clone channel's diversity masks / coherence weights, built or reused from their caches first, not timed), and is
measured: held-out KL to the teacher and top-1 agreement (exact, on the held-out teacher answers), WikiText-2
perplexity ratio student/teacher (G-C1's measure), a small G-C3 capability-inheritance check (``--groups`` paired
groups), median seconds per optimizer step and the peak RSS of training. The kd row and the rows with ``clone``
also get the style metrics of ``evaluate/style.py`` on the held-out prompts (length ratio, MiniLM similarity to
the teacher's answer set, hedging student/teacher; ``--style 0`` skips them).

Rows are a dict of named channel weights: add one line to :data:`ROWS` for a new channel. ``--reuse WORK`` reuses
an earlier run's setup (student and data); ``--keep`` also keeps the rows already measured there (refused when
they were measured with other flags), so rows can run in separate commands and the last one prints the table of
all of them.
The last line is machine-readable: ``kl_ratio_<row>_vs_kd=X ...`` (lower is better: the row's held-out KL over the
kd-only row's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "datasets" / "wikitext2" / "valid.txt"

KD = {"kd": 1.0, "ce": 0.1}           # the demo's token-level channels: every row has them
CLONE = 0.3                           # clone's weight (its NLL is on the sampled answers, like ce, but masked)
ROWS: dict[str, dict[str, float]] = {
    "kd": dict(KD),
    "kd+attn": {**KD, "attn": 1.0},
    "kd+feature": {**KD, "feature": 1.0},
    "kd+clone": {**KD, "clone": CLONE},
    "all": {**KD, "attn": 1.0, "feature": 1.0, "clone": CLONE},
}


def _config(args):
    from distillgate.config import RunConfig, load_config

    over = [f"eval.text_file={args.ppl_text}", f"eval.max_tokens={args.ppl_tokens}",
            f"student.layer_selection={args.layer_selection}", f"targets.mode={args.mode}",
            f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.checkpoint_every=0",
            f"data.seq_len={args.seq_len}", f"data.samples_per_prompt={args.samples}",
            f"data.gen_temperature={args.temperature}", f"data.max_new_tokens={args.max_new_tokens}"]
    return load_config(RunConfig, args.config, over + list(args.overrides))


def _data(cfg, args, teacher):
    from distillgate.loop.state import LoopState
    from distillgate.loop.training_set import TrainingSet, prompt_pool

    ts = TrainingSet(cfg, teacher, LoopState(), prompt_pool(cfg, 8), progress=False)
    mix = {d: 1.0 / len(cfg.data.domains) for d in cfg.data.domains}
    held = ts.take(args.heldout_prompts, mix, "lm", seed=-1)
    ts.state.heldout_prompts = [p.id for p in held]
    heldout = ts.answers(held)
    train = ts.add_prompts(1, ts.take(args.train_prompts, mix, "lm", seed=1))
    if args.train_examples:                     # the first N answers, whole prompts only (answers stay cached)
        keep, pids = [], []
        for e in train:
            if e.prompt_id not in pids:
                if sum(x.prompt_id == e.prompt_id for x in train) + len(keep) > args.train_examples:
                    break
                pids.append(e.prompt_id)
            keep.append(e)
        train = keep
        ts.groups = [train]
    return ts, heldout, train


def setup(args) -> Path:
    """Teacher answers + targets (cached), the one student, saved under a temp folder; returns it."""
    from distillgate import pipeline
    from distillgate.io import atomic_write_json
    from distillgate.models import save_model

    cfg = _config(args)
    t0 = time.perf_counter()
    teacher = pipeline.load_teacher(cfg)
    ts, heldout, train = _data(cfg, args, teacher)
    student, info = pipeline.build_student(cfg, teacher, pipeline.calibration_ids(cfg, teacher.tokenizer, train))
    work = Path(tempfile.mkdtemp(prefix="channels-bench-"))
    save_model(student, teacher.tokenizer, work / "student")
    atomic_write_json(work / "student_info.json", {"layer_map": info.get("layer_map"),
                                                   "kept": info.get("report", {}).get("kept_layers")})
    print(f"setup: {len(train)} training examples, {len(heldout)} held-out; student layers "
          f"{info.get('report', {}).get('kept_layers')} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return work


def run_row(args, name: str, work: Path) -> dict:
    """One row, in this process: train the saved student with ROWS[name], measure it."""
    import torch

    from distillgate import pipeline
    from distillgate.data.dataset import DistillDataset
    from distillgate.evaluate.providers import load_providers, measure_student
    from distillgate.models import load_model
    from distillgate.train import read_metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _config(args)
    cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"channels": dict(ROWS[name])})})
    teacher = pipeline.load_teacher(cfg)
    ts, heldout, train = _data(cfg, args, teacher)
    student = load_model(str(work / "student")).model.train()
    layer_map = json.loads((work / "student_info.json").read_text())["layer_map"]
    t0 = time.perf_counter()
    side = pipeline.channel_setup(cfg, teacher, student, layer_map, train)
    provider = pipeline.channel_provider(side, cfg, teacher, ts.provider(), ts.groups)
    obj = pipeline.make_objective(cfg, provider, vocab_size=len(teacher.tokenizer), examples=train,
                                  tokenizer=teacher.tokenizer, prompts=ts.pool, side=side)
    t_side = time.perf_counter() - t0           # attn / feature teacher data, clone masks and weights
    ds = DistillDataset(train, pad_id=pipeline.pad_id(teacher.tokenizer), seq_len=cfg.data.seq_len,
                        heldout_fraction=0.0)
    out = work / f"train-{name}"
    if side is not None:
        side.attach(student)
    try:
        res = pipeline.map_student(student, obj, ds, cfg.train, out, seed=cfg.train.seed, progress=False,
                                   callbacks=() if side is None else (side.on_step,))
    finally:
        if side is not None:
            side.detach()
    secs = [r["seconds"] for r in read_metrics(out / "metrics.jsonl") if not r.get("skipped")]
    student.eval()
    load_providers()
    metrics = ["kl", "top1_agreement", "ppl_ratio"] + (["inheritance"] if args.groups else [])
    vals, _, _ = measure_student(teacher, student, metrics,
                                 {"heldout": heldout, "ppl_text": cfg.eval.text_file, "ppl_tokens": cfg.eval.max_tokens,
                                  "inheritance_groups": args.groups, "seed": cfg.train.seed}, {})
    rec = side.record() if side is not None else {}
    style = None
    if args.style and (name == "kd" or "clone" in ROWS[name]):
        from distillgate.evaluate.style import style_report

        style = style_report(student, teacher.tokenizer, heldout, ts.pool, max_new_tokens=cfg.data.max_new_tokens,
                             temperature=cfg.data.gen_temperature or 0.8, top_p=cfg.data.gen_top_p, seed=1)
    return {"row": name, "channels": ROWS[name], **{k: vals.get(k) for k in metrics}, "style": style,
            "s_per_step": statistics.median(secs[1:] or secs), "peak_rss_gib": res.peak_rss_mb / 1024,
            "side_setup_s": t_side, "tokens": res.tokens, "final_terms": res.final_terms,
            "heads": [(h["teacher_layer"], h["teacher_head"], round(h["score"], 4)) for h in
                      rec.get("plan", {}).get("heads", [])], "cache": rec.get("cache")}


def _table(results: list[dict]) -> None:
    print("| row | channels | held-out KL | top-1 | WikiText-2 PPL ratio | G-C3 inheritance | s/step | peak RSS GiB "
          "| length ratio | MiniLM sim. to teacher set | hedging s/t |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        inh, st = r.get("inheritance"), r.get("style")
        sty = ("- | - | -" if not st else f"{st['length_ratio']:.3f} | {st['similarity']:.3f} | "
               f"{st['hedging/student']:.2f} / {st['hedging/teacher']:.2f}")
        print(f"| {r['row']} | {r['channels']} | {r['kl']:.4f} | {r['top1_agreement']:.3f} | {r['ppl_ratio']:.3f} | "
              f"{'-' if inh is None else f'{inh:.3f}'} | {r['s_per_step']:.2f} | {r['peak_rss_gib']:.2f} | {sty} |")
    st = next((r["style"] for r in results if r.get("style")), None)
    print(f"(loss tokens per row: {sorted({r['tokens'] for r in results})}"
          + (f"; teacher self-similarity {st['teacher_self_similarity']:.3f}" if st else "") + ")")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, from {list(ROWS)}")
    ap.add_argument("--mode", default="cached", choices=["cached", "online"], help="targets.mode of every row")
    ap.add_argument("--layer-selection", default="block_influence")
    ap.add_argument("--train-prompts", type=int, default=32)
    ap.add_argument("--heldout-prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=3, help="sampled teacher answers per prompt (every row trains on "
                    "all of them; clone needs >= 2)")
    ap.add_argument("--temperature", type=float, default=0.8, help="the teacher's sampling temperature (> 0 for clone)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="longest teacher answer")
    ap.add_argument("--train-examples", type=int, default=0, help="train on the first N training answers only, whole "
                    "prompts (0: all): fewer examples for the side channels' teacher data to cover")
    ap.add_argument("--reuse", default=None, help="a work folder of an earlier run: its saved student, no setup")
    ap.add_argument("--keep", action="store_true", help="with --reuse: keep the rows already measured there")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--groups", type=int, default=8, help="G-C3 paired groups (0: skip the check)")
    ap.add_argument("--style", type=int, default=1, help="style metrics for the kd and clone rows (0: skip)")
    ap.add_argument("--ppl-text", default=str(WIKITEXT))
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)     # internal: run one row in this process
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. teacher.path=DIR)")
    args = ap.parse_args()
    if args.row:
        print("ROW " + json.dumps(run_row(args, args.row, Path(args.work))), flush=True)
        return
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"--rows: unknown {bad}; rows: {list(ROWS)}")
    clone = [r for r in rows if "clone" in ROWS[r]]
    if clone and (args.samples < 2 or args.temperature <= 0):
        raise SystemExit(f"rows {clone} train the clone channel: they need --samples >= 2 (got {args.samples}) and "
                         f"--temperature > 0 (got {args.temperature}); drop them from --rows otherwise")
    if args.keep and not args.reuse:
        raise SystemExit("--keep needs --reuse WORK (the folder whose rows to keep)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.reuse) if args.reuse else setup(args)
    print(f"work folder: {work}", flush=True)
    passthrough, skip = [], False
    for a in sys.argv[1:]:                       # the same arguments for every row, without --rows / --reuse
        if skip or a.startswith("--rows") or a.startswith("--reuse") or a == "--keep":
            skip = a in ("--rows", "--reuse")
            continue
        passthrough.append(a)
    done = {}
    if args.keep:
        done = {p.stem[4:]: json.loads(p.read_text()) for p in sorted(work.glob("row-*.json"))}
        other = {n: r.get("flags") for n, r in done.items() if r.get("flags") != passthrough}
        if other:
            raise SystemExit(f"--keep: rows {sorted(other)} in {work} were measured with other flags "
                             f"({next(iter(other.values()))} vs {passthrough}); rerun them or drop --keep")
    for name in rows:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, *passthrough, "--row", name, "--work", str(work)],
                           capture_output=True, text=True, env=dict(os.environ))
        line = next((x for x in p.stdout.splitlines() if x.startswith("ROW ")), None)
        if p.returncode or line is None:
            raise SystemExit(f"row {name} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
        r = {**json.loads(line[4:]), "flags": passthrough}
        (work / f"row-{name}.json").write_text(json.dumps(r, indent=1))
        done[name] = r
        print(f"{name}: KL {r['kl']:.4f}, top-1 {r['top1_agreement']:.3f}, PPL ratio {r['ppl_ratio']:.3f}, "
              f"G-C3 {r.get('inheritance')}, {r['s_per_step']:.2f} s/step, {r['peak_rss_gib']:.2f} GiB, "
              f"side setup {r['side_setup_s']:.0f} s, heads {r['heads']}, cache {r['cache']}, "
              f"terms {r['final_terms']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    results = [done[n] for n in ROWS if n in done]
    print()
    _table(results)
    base = done.get("kd")
    if base is None:
        print("no kd row: no ratios")
        return
    print(" ".join(f"kl_ratio_{r['row'].replace('kd+', '')}_vs_kd={r['kl'] / base['kl']:.4f}"
                   for r in results if r["row"] != "kd"))


if __name__ == "__main__":
    main()
