"""Native multiple-choice scoring vs lm-evaluation-harness's HF backend: same model, same data, same batch.

    python bench/eval_throughput.py --data-dir ../shared/datasets [--copa 100] [--mmlu marketing:16]
                                    [--truthfulqa 40] [--truthfulqa-file mc_task.json]
                                    [--batch-size 8] [--dtype float32] [--repeats 3] [--threads N]

For each task, repeats alternate the two engines (native, lm-eval, native, ...) and the median wall time
is kept. Both sides start from the same documents and include their own tokenisation:

* native: ``distillgate.evaluate.choice.evaluate_mc`` (shared-context packing, shared few-shot prefix in
  the KV cache, vocabulary projection only at scored positions);
* lm-eval: ``HFLM(pretrained=model, tokenizer=tok, batch_size=B).loglikelihood(requests)`` on the requests
  lm-eval itself builds from our task YAML (task building is outside the timing: that favours lm-eval).

TruthfulQA MC1 and MC2 (lm-eval's ``truthfulqa_mc1``/``truthfulqa_mc2``, run from their stock YAML on the rows
our loader produced): ``--truthfulqa-file`` is a TruthfulQA ``mc_task.json``; without one, N *synthetic*
questions are generated (invented text, TruthfulQA's layout: the 6-shot preamble, 4-8 answers of 3-20 words,
1-3 true for MC2) - the shape is what costs time, not the words.

Accuracies must agree (same argmax per document; for MC2 also the same per-item true-answer mass). Last line: ``examples_per_s_ratio_vs_lm_eval=X``
(summed examples over summed median seconds across tasks, native / lm-eval).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def lm_eval_requests(task_name: str, data_dir: Path, limit: int, workdir: Path):
    """The lm-eval Instances for a local task, and the gold index per document."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from distillgate.evaluate.harness import render_task

    name = render_task(task_name, data_dir, workdir)
    task = get_task_dict([name], TaskManager(include_path=str(workdir), include_defaults=False))[name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task.instances


def lm_eval_acc(instances, lls, golds):
    by_doc = {}
    for inst, ll in zip(instances, lls):
        by_doc.setdefault(inst.doc_id, []).append((inst.idx, ll[0]))
    preds = [max(sorted(v), key=lambda x: x[1])[0] for _, v in sorted(by_doc.items())]
    return sum(p == g for p, g in zip(preds, golds)) / len(golds), preds


def mc2_from_lls(instances, lls, docs):
    """lm-eval's process_results_mc2 on its own log-likelihoods (shifted by the max first, as native scoring
    does: lm-eval's plain exp underflows to 0/0 when every answer's log-likelihood is below ~-745)."""
    import math

    by_doc = {}
    for inst, ll in zip(instances, lls):
        by_doc.setdefault(inst.doc_id, []).append((inst.idx, ll[0]))
    out = []
    for (_, v), d in zip(sorted(by_doc.items()), docs):
        top = max(x for _, x in v)
        p = [math.exp(x - top) for _, x in sorted(v)]
        out.append(sum(q for q, lab in zip(p, d.labels) if lab) / sum(p))
    return out


def synthetic_truthfulqa(workdir: Path, n: int) -> Path:
    """``n`` invented questions in TruthfulQA's mc_task.json layout (seeded, so every run times the same)."""
    import json
    import random

    rng = random.Random(0)
    words = ("river stone market window garden letter engine winter silver doctor island music paper "
             "mountain coffee station planet forest bridge candle").split()
    rows = []
    for i in range(n):
        answers = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))).capitalize() + "."
                   for _ in range(rng.randint(4, 8))]
        n_true = rng.randint(1, min(3, len(answers) - 1))
        rows.append({"question": f"What does the {rng.choice(words)} near the {rng.choice(words)} do in case {i}?",
                     "mc1_targets": {a: int(j == 0) for j, a in enumerate(answers)},
                     "mc2_targets": {a: int(j < n_true) for j, a in enumerate(answers)}})
    path = workdir / "mc_task.json"
    path.write_text(json.dumps(rows))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("DISTILLGATE_DATA", "../shared/datasets"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--copa", type=int, default=100, help="COPA dev items (0: skip)")
    ap.add_argument("--mmlu", default="marketing:16", help="SUBJECT:N, 5-shot ('' to skip)")
    ap.add_argument("--truthfulqa", type=int, default=40, help="TruthfulQA MC1 + MC2 items (0: skip)")
    ap.add_argument("--truthfulqa-file", help="a TruthfulQA mc_task.json (default: synthetic questions)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads for both engines (default: torch's choice; "
                                                 "1 is much faster on an oversubscribed machine)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    from distillgate.evaluate.choice import evaluate_mc, load_copa, load_mmlu
    from distillgate.models import load_model

    data = Path(args.data_dir)
    lm = load_model(args.model, dtype=args.dtype)
    model, tok = lm.model, lm.tokenizer
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    tasks = []
    workdir = Path(tempfile.mkdtemp(prefix="dg-bench-"))
    if args.copa:
        tasks.append(("copa", lambda: load_copa(data / "copa" / "copa-dev.xml", args.copa),
                      lm_eval_requests("copa", data, args.copa, workdir)))
    if args.mmlu:
        subject, _, n = args.mmlu.partition(":")
        n = int(n or 16)
        tasks.append((f"mmlu_{subject}", lambda s=subject, n=n: load_mmlu(data, s, n),
                      lm_eval_requests(f"mmlu:{subject}", data, n, workdir)))

    if args.truthfulqa:
        from distillgate.evaluate.formats import FORMATS, load_format

        tq = Path(args.truthfulqa_file) if args.truthfulqa_file else synthetic_truthfulqa(workdir, args.truthfulqa)
        for fmt in ("truthfulqa_mc1", "truthfulqa_mc2"):
            tasks.append((fmt, lambda f=fmt: FORMATS[f].docs(load_format(f, tq, args.truthfulqa)),
                          lm_eval_requests(f"{fmt}:{tq}", data, args.truthfulqa, workdir)))

    print(f"model={args.model} dtype={args.dtype} batch_size={args.batch_size} threads={torch.get_num_threads()} "
          f"repeats={args.repeats}")
    rows, tot = [], {"native": [0, 0.0], "lm_eval": [0, 0.0]}
    for name, load_docs, instances in tasks:
        times = {"native": [], "lm_eval": []}
        evaluate_mc(model, tok, load_docs()[:2], batch_size=args.batch_size)       # warm-up, untimed
        hflm.loglikelihood(instances[:4], disable_tqdm=True)
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            docs = load_docs()
            native = evaluate_mc(model, tok, docs, batch_size=args.batch_size)
            times["native"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lls = hflm.loglikelihood(instances, disable_tqdm=True)
            times["lm_eval"].append(time.perf_counter() - t0)
            print(f"  {name} repeat {rep}: native {times['native'][-1]:.2f} s, lm-eval {times['lm_eval'][-1]:.2f} s",
                  file=sys.stderr, flush=True)
        golds = [d.gold for d in docs]
        acc_lm, preds_lm = lm_eval_acc(instances, lls, golds)
        agree = sum(p == q["pred"] for p, q in zip(preds_lm, native["per_doc"])) / len(golds)
        if docs[0].labels is not None:          # MC2: the same true-answer mass per item, from lm-eval's lls
            mass = mc2_from_lls(instances, lls, docs)
            worst = max(abs(m - q["mc2"]) for m, q in zip(mass, native["per_doc"]))
            print(f"  {name}: mc2 native {native['mc2']:.4f} vs lm-eval {sum(mass) / len(mass):.4f}, "
                  f"max per-item difference {worst:.1e}", file=sys.stderr)
        for eng, acc in (("native", native["acc"]), ("lm_eval", acc_lm)):
            med = statistics.median(times[eng])
            tot[eng][0] += len(docs)
            tot[eng][1] += med
            rows.append((name, eng, len(docs), med, len(docs) / med, acc, agree))
    print(f"\n{'task':<18}{'engine':<10}{'docs':>6}{'median s':>10}{'examples/s':>12}{'acc':>8}{'same pred':>11}")
    for name, eng, n, med, eps, acc, agree in rows:
        print(f"{name:<18}{eng:<10}{n:>6}{med:>10.2f}{eps:>12.2f}{acc:>8.3f}{agree:>11.3f}")
    ratio = (tot["native"][0] / tot["native"][1]) / (tot["lm_eval"][0] / tot["lm_eval"][1])
    for name in {r[0] for r in rows}:
        nat, lme = (r for r in rows if r[0] == name)
        print(f"{name}: native/lm-eval examples/s = {nat[4] / lme[4]:.2f}x")
    print(f"examples_per_s_ratio_vs_lm_eval={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
