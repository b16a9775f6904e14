"""Does the closed loop earn its keep (issue 16)? The same run three ways, at the same total compute:

    (a) fixed      a fixed recipe: no strategy rule (``loop.strategy.rules=[]``);
    (b) strategy   the rule strategy (revert, weak_domain, plateau, tune, hard_pool, curriculum);
    (c) explore    the rules plus the exploration: every ``--every``-th joint iteration, ``--variants`` short
                   one-knob variants within ``--budget`` extra steps, the best by KL on the selection split
                   continuing; the iterations between rest and train those steps as main steps (reinvest).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/closed_loop.py
        # 3 seeds x 3 arms in one process, ~2-2.5 min an arm-seed on a quiet machine (README: 2 processes at a
        # time, --seeds 1 --first-seed S --arms ARM --json F each, then --merge)
    .venv/bin/python bench/closed_loop.py --seeds 1 --iterations 2                        # a smoke run

Same teacher (the embedded SmolLM2-135M-Instruct unless ``teacher.path=...``), same student initialisation (the
teacher's blocks ``--keep-layers``, MLP ``--mlp-width`` by weight magnitude), the same prompts in the same order
(built-in prompts, ``data.seed`` 0; the selection split is reserved in every arm, so every arm trains on the same
prompts), and the same optimizer steps in total: (c) runs ``--steps`` steps per iteration, the first ``h`` of
them as the screens of PBT (the winner's checkpoint continues), plus the losing variants' ``variants x h``
screen steps, and ``--steps + variants x h`` main steps in an iteration where the exploration rests; (a) and
(b) run ``--steps + variants x h`` main steps per iteration. (b) and (c) may move
the learning rate, the CE share and difficulty weighting (``tune_knobs``; (c) also a temperature bound), never
steps or data volume, so the compute stays equal. The seeds change the training seed (batch order, tail samples)
and the exploration sampler's seed.

Per arm, mean ± sd over the seeds: final held-out KL(teacher||student) and top-1 agreement (the gates' held-out
set: teacher answers to prompts of the training pool, never trained on; the selection split is a different set of
prompts), the WikiText-2 perplexity ratio student/teacher (``--ppl-text``, evaluation only), optimizer steps,
seconds, and the decisions each arm made. The last line:
``kl_ratio_strategy_vs_fixed=X kl_ratio_explore_vs_fixed=Y seeds=N`` (ratios of the seed means; < 1: better).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "datasets" / "wikitext2" / "valid.txt"
ARMS = ("fixed", "strategy", "explore")


def _overrides(args, arm: str, seed: int, root: str) -> list[str]:
    from distillgate.explore import horizon

    n, h = horizon(args.budget, args.steps, args.variants)
    extra = n * h  # the variants' screens; the main recipe's screen is the start of its own training (PBT)
    steps = args.steps if arm == "explore" else args.steps + extra
    over = [
        f"teacher.path={args.teacher}", "student.init=derive", f"student.keep_layers={args.keep_layers}",
        f"student.mlp_width={args.mlp_width}", "student.mlp_selection=activation", "student.calib_tokens=1024",
        f"data.max_new_tokens={args.max_new_tokens}", "data.seed=0", "targets.top_k=64",
        "loss.channels={kd: 1.0, ce: 0.0}", "loss.temperature={policy: complexity, min: 0.9, max: 1.2}",
        f"train.steps={steps}", "train.batch_size=4", f"train.lr={args.lr}", "train.warmup_steps=2",
        f"train.seed={seed}", "train.precision=fp32",
        f"loop.stages=[{{name: anchor, iterations: 0}}, {{name: joint, iterations: {args.iterations}}}]",
        "loop.budget_minutes=600", f"loop.prompts_per_iteration={args.prompts}",
        f"loop.heldout_prompts={args.heldout}", "loop.perf_lengths=[16]", "loop.perf_repeats=1",
        "loop.strategy.hard_candidates=16",
        f"loop.strategy.exploration.selection_prompts={args.selection}", f"loop.strategy.exploration.seed={seed}",
        f"store_root={root}", f"run_id={arm}-s{seed}"]
    if args.ppl_text:
        over += [f"eval.text_file={args.ppl_text}", f"eval.max_tokens={args.ppl_tokens}"]
    if arm == "fixed":
        over.append("loop.strategy.rules=[]")
    if arm == "explore":
        over += [f"loop.strategy.exploration.budget={args.budget}",
                 f"loop.strategy.exploration.variants={args.variants}",
                 f"loop.strategy.exploration.every={args.every}", f"loop.strategy.exploration.rest={args.rest}"]
    return over + list(args.overrides)


def run_arm(args, arm: str, seed: int, root: str) -> dict:
    from distillgate import loop as loop_mod
    from distillgate.config import RunConfig, load_config
    from distillgate.store import RunStore

    cfg = load_config(RunConfig, None, _overrides(args, arm, seed, root))
    t0 = time.time()
    summary = loop_mod.run(cfg, progress=False)
    seconds = time.time() - t0
    with RunStore.open(root, summary["run_id"]) as s:
        state = s.resolve("current").load_json("loop_state.json")
        skipped = [f"{f['iteration']}:{f['data']['rule']}:{f['subject']}->"
                   f"{f['data']['value']} (held: {f['data']['held_by']})"
                   for f in s.catalog.findings() if f["kind"] == "skipped_change"]
    hist = state["history"]
    last = hist[-1]["metrics"]
    steps = sum(int(h["recipe"]["train"]["steps"]) + int(h["metrics"].get("explore/steps", 0))
                + int(h["metrics"].get("explore/reinvested", 0))
                for h in hist if h.get("terms"))
    explore_s = sum(h["metrics"].get("explore/seconds", 0.0) for h in hist)
    decisions = collections.Counter(f"{d['rule']}:{d['knob']}" for d in state["decisions"])
    lr_path = [h["recipe"]["train"]["lr"] for h in hist if h.get("terms")]
    decision_path = [f"{d['iteration']}:{d['rule']}:{d['knob']}:{d['old']}->{d['new']}" for d in state["decisions"]
                     if d["rule"] != "hard_pool"]
    trials = [(t["iteration"], t.get("move"), round(t["value"], 4), round(t.get("se", 0.0), 4), t["adopted"])
              for t in state.get("strategy", {}).get("trials", [])]
    return {"arm": arm, "seed": seed, "run_id": summary["run_id"], "kl": last["kl"],
            "top1": last["top1_agreement"], "ppl_ratio": last.get("ppl_ratio"), "steps": steps, "seconds": seconds,
            "explore_seconds": explore_s, "decisions": dict(decisions), "lr_path": lr_path,
            "decision_path": decision_path, "trials": trials, "skipped": skipped,
            "kl_path": [round(h["metrics"]["kl"], 4) for h in hist]}


def _ms(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.4f} ± {sd:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=3, help="joint iterations per run")
    ap.add_argument("--steps", type=int, default=8, help="main optimizer steps per iteration of the explore arm")
    ap.add_argument("--budget", type=float, default=0.25, help="exploration's extra steps / main steps")
    ap.add_argument("--variants", type=int, default=1, help="variants per exploration (the product's default: 2)")
    ap.add_argument("--every", type=int, default=3, help="explore every N-th joint iteration; the ones between "
                    "rest and train the budget's screen steps as main steps (reinvest)")
    ap.add_argument("--rest", type=int, default=0, help="extra iterations the exploration rests after a null one")
    ap.add_argument("--lr", type=float, default=3e-4, help="the recipe's (and the fixed arm's) learning rate")
    ap.add_argument("--keep-layers", default="[0, 1, 2, 3, 4, 5, 6, 7, 23, 24, 25, 26, 27, 28, 29]",
                    help="teacher blocks the student keeps (default: the 15 the demo's greedy_fast picks)")
    ap.add_argument("--mlp-width", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=24, help="new prompts per iteration")
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--selection", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--ppl-text", default=str(WIKITEXT) if WIKITEXT.is_file() else "")
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--root", default=None, help="run store folder, kept (default: a temporary "
                    "one, each run's store deleted once its numbers are read)")
    ap.add_argument("--json", default=None, help="write every run's numbers here")
    ap.add_argument("overrides", nargs="*", help="more config overrides key=value for every arm")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 (to run "
                    "seeds in parallel processes, each with --json, then merge them with --merge)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="print the table and last line from these --json files instead of running")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    arms = [a for a in args.arms.split(",") if a]
    results = []
    if args.merge:
        for f in args.merge:
            results += json.loads(Path(f).read_text())
        arms = [a for a in arms if any(r["arm"] == a for r in results)]
        args.seeds = len({r["seed"] for r in results})
    else:
        root = args.root or tempfile.mkdtemp(prefix="closed-loop-")
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for arm in arms:
                r = run_arm(args, arm, seed, root)
                results.append(r)
                if not args.root:  # a run store holds its student versions (~1 GB a run): keep only the numbers
                    shutil.rmtree(Path(root) / r["run_id"], ignore_errors=True)
                if args.json:  # after every arm: a killed benchmark keeps what it measured
                    Path(args.json).write_text(json.dumps(results, indent=2))
    for r in results:
        print(f"seed {r['seed']} {r['arm']:9s} KL {r['kl']:.4f}  top-1 {r['top1']:.3f}  PPL ratio "
              f"{r['ppl_ratio'] if r['ppl_ratio'] is None else round(r['ppl_ratio'], 2)}  steps {r['steps']}  "
              f"{r['seconds']:.0f} s  KL path {r['kl_path']}  lr path {r['lr_path']}  "
              f"decisions {r.get('decision_path', [])}  skipped {r.get('skipped', [])}", flush=True)
    by = {a: [r for r in results if r["arm"] == a] for a in arms}
    print()
    print(f"| arm | final held-out KL | top-1 agreement | WikiText-2 PPL ratio | optimizer steps | seconds (of which "
          f"exploration) | decisions (all seeds) |")
    print("|---|---|---|---|---|---|---|")
    for a in arms:
        rs = by[a]
        dec = collections.Counter()
        for r in rs:
            dec.update(r["decisions"])
        dtext = ", ".join(f"{k} ×{v}" for k, v in sorted(dec.items())) or "none"
        print(f"| {a} | {_ms([r['kl'] for r in rs])} | {_ms([r['top1'] for r in rs])} | "
              f"{_ms([r['ppl_ratio'] for r in rs])} | {statistics.fmean(r['steps'] for r in rs):.0f} | "
              f"{statistics.fmean(r['seconds'] for r in rs):.0f} ({statistics.fmean(r['explore_seconds'] for r in rs):.0f}) | "
              f"{dtext} |")
    common = set.intersection(*({r["seed"] for r in by[a]} for a in arms))  # ratios on the seeds every arm ran
    args.seeds = len(common)
    kl = {a: statistics.fmean(r["kl"] for r in by[a] if r["seed"] in common) for a in arms if common}
    x = kl["strategy"] / kl["fixed"] if "strategy" in kl and "fixed" in kl else float("nan")
    y = kl["explore"] / kl["fixed"] if "explore" in kl and "fixed" in kl else float("nan")
    print()
    print(f"kl_ratio_strategy_vs_fixed={x:.4f} kl_ratio_explore_vs_fixed={y:.4f} seeds={args.seeds}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
