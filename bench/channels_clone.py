"""Channel ablation, the response-cloning rows (S2.4): kd only vs kd + clone on the same student, data and tokens.

    .venv/bin/python bench/channels_clone.py [--steps 30] [--prompts 40] [--samples 3] [--configs kd,kd+clone]

Meant to merge into ``bench/channels.py`` (kd / kd+attn / kd+feature / kd+clone / all four): :data:`CONFIGS`
holds this file's rows as plain ``key=value`` overrides of one base ``distillgate distill`` config.

Setup (identical for every row): SmolLM2-135M-Instruct answers ``--prompts`` built-in prompts ``--samples``
times at temperature 0.8 (S2.4 needs several sampled answers; every row trains on all of them, so kd-only
sees the same tokens); 20% of the prompts are held out. The student keeps 15 of the 30 teacher blocks, chosen
by block influence on the teacher's answers (deterministic: every row starts from the same weights). Each row runs ``distillgate distill`` in its own
subprocess (peak RSS is its own) and then measures, on the held-out prompts: KL(teacher||student) per token,
top-1 agreement, WikiText-2 perplexity ratio (G-C1), a small G-C3 inheritance check (``--groups`` paired
groups) and the style metrics of ``evaluate/style.py`` (length ratio, MiniLM similarity to the teacher's
answer set, politeness / hedging / follow-up markers, refusals). Seconds per step and peak RSS come from the
training. The last line is machine-readable and ends with each channel's KL ratio against kd only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = Path(os.environ.get("DISTILLGATE_SHARED", ROOT.parent / "shared")) / "datasets" / "wikitext2" / "valid.txt"

CONFIGS = {
    "kd": ["loss.channels={kd: 1.0}"],
    "kd+clone": ["loss.channels={kd: 1.0, clone: 0.3}"],
}
"""Row name -> overrides of :func:`base_overrides` (this file's rows of the channel ablation)."""


def base_overrides(work: Path, name: str, steps: int, prompts: int, samples: int) -> list[str]:
    over = ["teacher.path=default", f"output_dir={work / name}", "student.init=derive", "student.num_layers=15",
            "student.layer_selection=block_influence",
            "data.source=builtin", f"data.num_prompts={prompts}", f"data.samples_per_prompt={samples}",
            "data.gen_temperature=0.8", "data.max_new_tokens=48", "data.gen_batch_size=16", "data.seq_len=256",
            "data.heldout_fraction=0.2", "targets.mode=cached", "targets.top_k=64",
            f"train.steps={steps}", "train.batch_size=4", "train.lr=3e-4", "train.warmup_steps=3",
            "train.precision=fp32", "eval.max_tokens=2048"]
    if WIKITEXT.is_file():
        over.append(f"eval.text_file={WIKITEXT}")
    return over


def worker(name: str, work: Path, steps: int, prompts: int, samples: int, groups: int) -> None:
    import torch

    from distillgate.config import DistillConfig, load_config
    from distillgate.data.dataset import get_or_generate_dataset
    from distillgate.data.prompts import prompts_from_spec
    from distillgate.evaluate.inheritance import capability_inheritance
    from distillgate.evaluate.style import style_report
    from distillgate.models import load_model
    from distillgate.recipes.distill import distill

    torch.manual_seed(0)
    cfg = load_config(DistillConfig, None, base_overrides(work, name, steps, prompts, samples) + CONFIGS[name])
    res = distill(cfg, progress=False)
    tr = res.summary["train"]
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    teacher = load_model("default")
    student = load_model(str(res.student_dir)).model.eval()
    ps = prompts_from_spec(cfg.data)
    ds = get_or_generate_dataset(teacher, ps, cfg.data, progress=False)
    style = style_report(student, teacher.tokenizer, ds.examples("heldout"), {p.id: p for p in ps},
                         max_new_tokens=cfg.data.max_new_tokens, temperature=cfg.data.gen_temperature,
                         top_p=cfg.data.gen_top_p, seed=1)
    inh = capability_inheritance(student, teacher.model, teacher.tokenizer, n_groups=groups, max_new_tokens=32,
                                 teacher_fingerprint=teacher.fingerprint)
    a = res.summary["after"]
    out = {"name": name, "kl": a["kl"], "top1": a["top1_agreement"], "ppl_ratio": a["ppl_ratio"],
           "inheritance": inh["inheritance"], "s_per_step": tr["seconds"] / max(tr["steps"], 1),
           "peak_rss_mb": max(tr["peak_rss_mb"], rss_train), "tokens": tr["tokens"], "terms": tr["final_terms"],
           "style": style, "text_ppl": "teacher_ppl_text" in a}
    (work / f"{name}.json").write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--groups", type=int, default=16, help="G-C3 paired groups (the gate uses 300)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="keep rows already measured in --work (run the rows in "
                    "separate commands, then print the table of all of them)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="dg-channels-clone-"))
    if args.worker:
        worker(args.worker, work, args.steps, args.prompts, args.samples, args.groups)
        return
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        raise SystemExit(f"--configs: unknown {bad}; allowed: {list(CONFIGS)}")
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for n in names:
        if args.reuse and (work / f"{n}.json").is_file():
            rows[n] = json.loads((work / f"{n}.json").read_text())
            continue
        cmd = [sys.executable, __file__, "--worker", n, "--work", str(work), "--steps", str(args.steps),
               "--prompts", str(args.prompts), "--samples", str(args.samples), "--groups", str(args.groups)]
        print(f"[{n}] {' '.join(CONFIGS[n])}", flush=True)
        r = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{n} failed:\n{r.stderr[-4000:]}")
        rows[n] = json.loads((work / f"{n}.json").read_text())
    if args.reuse:
        rows.update({n: json.loads((work / f"{n}.json").read_text()) for n in CONFIGS
                     if n not in rows and (work / f"{n}.json").is_file()})
    rows = {n: rows[n] for n in CONFIGS if n in rows}
    hdr = (f"{'config':<10} {'KL':>8} {'top-1':>7} {'PPL ratio':>9} {'G-C3':>6} {'s/step':>7} {'RSS MB':>7} "
           f"{'len ratio':>9} {'sim':>6} {'polite s/t':>11} {'hedge s/t':>10} {'refuse s/t':>11}")
    print(hdr)
    for n, r in rows.items():
        st = r["style"]
        print(f"{n:<10} {r['kl']:8.4f} {r['top1']:7.3f} {r['ppl_ratio']:9.3f} {r['inheritance']:6.3f} "
              f"{r['s_per_step']:7.2f} {r['peak_rss_mb']:7.0f} {st['length_ratio']:9.3f} {st['similarity']:6.3f} "
              f"{st['politeness/student']:5.2f}/{st['politeness/teacher']:<5.2f} "
              f"{st['hedging/student']:4.2f}/{st['hedging/teacher']:<5.2f} "
              f"{st['refusal/student']:5.2f}/{st['refusal/teacher']:<5.2f}")
    ppl = "WikiText-2 valid" if next(iter(rows.values()))["text_ppl"] else "held-out teacher answers"
    tokens = {r["tokens"] for r in rows.values()}
    print(f"(PPL ratio on {ppl}; loss tokens per row: {sorted(tokens)}; teacher self-similarity "
          f"{next(iter(rows.values()))['style']['teacher_self_similarity']:.3f})")
    base = rows.get("kd")
    kv = [f"{k}_{n.replace('+', '_')}={v:.5g}" for n, r in rows.items()
          for k, v in (("kl", r["kl"]), ("top1", r["top1"]), ("ppl_ratio", r["ppl_ratio"]))]
    if base:
        kv += [f"kl_ratio_{n.replace('+', '_')}={r['kl'] / base['kl']:.4f}" for n, r in rows.items() if n != "kd"]
    print(" ".join(kv))


if __name__ == "__main__":
    main()
