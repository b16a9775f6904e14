"""Native evaluation vs a direct lm-evaluation-harness run, item by item, on a real model and real data.

    python bench/eval_parity.py --data-dir ../shared/datasets [--model default] [--copa 100] [--mmlu 10]
                                [--blimp 50] [--wikitext-docs 2] [--threads 1]

For each task both paths score the same items: native (``distillgate.evaluate``) and lm-eval 0.4.13 running
its own stock task YAML on the same rows (``include``d with ``dataset_path: json``; BLiMP through lm-eval's
``blimp`` template). Printed per task: items, items with the same answer, the largest per-choice
log-likelihood difference, and the score difference. The invented files in ``tests/data/formats`` cover the
formats ``../shared/datasets`` has no data for (their scores mean nothing; their agreement does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _by_doc(items):
    return [it for _, it in sorted((int(it["doc_id"].rsplit(":", 1)[1]), it) for it in items)]


def compare(name, native_items, ref_items, native_score, ref_score, key="pred"):
    ref = _by_doc(ref_items)
    same = sum(a[key] == b[key] for a, b in zip(native_items, ref))
    dll = max((abs(x - y) for a, b in zip(native_items, ref) for x, y in zip(a["loglikelihoods"], b["loglikelihoods"])),
              default=0.0)
    return (name, len(native_items), same, dll, native_score - ref_score)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("DISTILLGATE_DATA", "../shared/datasets"))
    ap.add_argument("--model", default="default", help="a model, or 'tiny' for the random test model")
    ap.add_argument("--copa", type=int, default=100)
    ap.add_argument("--mmlu", type=int, default=10, help="items per MMLU subject (every subject with dev+test)")
    ap.add_argument("--blimp", type=int, default=50, help="pairs per BLiMP paradigm")
    ap.add_argument("--wikitext-docs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()

    import lm_eval.tasks
    import torch
    import yaml

    if args.threads:
        torch.set_num_threads(args.threads)
    from distillgate.evaluate.choice import evaluate_mc, load_copa, load_mmlu, mmlu_subjects
    from distillgate.evaluate.formats import FORMATS, load_format
    from distillgate.evaluate.harness import run_lm_eval
    from distillgate.evaluate.lm import document_perplexity, score_last_word, score_minimal_pairs

    if args.model == "tiny":
        from distillgate.testing import make_tiny_model, make_tiny_tokenizer

        tok = make_tiny_tokenizer()
        model = make_tiny_model(len(tok), seed=3)
    else:
        from distillgate.models import load_model

        lm = load_model(args.model)
        model, tok = lm.model, lm.tokenizer
    data, bs = Path(args.data_dir), args.batch_size
    t0 = time.perf_counter()
    rows = []

    def ref(task, **kw):
        (r,) = run_lm_eval(model, tok, [task], log_samples=True, batch_size=bs, **kw).values()
        return r

    if args.copa:
        nat = evaluate_mc(model, tok, load_copa(data / "copa" / "copa-dev.xml", args.copa), batch_size=bs)
        r = ref("copa", data_dir=data, limit=args.copa)
        rows.append(compare(f"copa (shared, first {args.copa})", nat["per_doc"], r["items"], nat["acc"], r["acc"]))
    for subject in mmlu_subjects(data) if args.mmlu else []:
        nat = evaluate_mc(model, tok, load_mmlu(data, subject, args.mmlu), batch_size=bs)
        r = ref(f"mmlu:{subject}", data_dir=data, limit=args.mmlu)
        rows.append(compare(f"mmlu {subject} 5-shot", nat["per_doc"], r["items"], nat["acc"], r["acc"]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.blimp:
            pairs = []
            for f in sorted((data / "blimp").glob("*.jsonl")):
                pairs += [json.loads(x) for x in f.read_text().splitlines()[: args.blimp]]
            (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
            cfg = {"include": str(Path(lm_eval.tasks.__file__).parent / "blimp" / "_template_yaml"),
                   "task": "dg_blimp", "dataset_path": "json", "dataset_name": None,
                   "dataset_kwargs": {"data_files": {"train": str(tmp / "pairs.jsonl")}, "cache_dir": str(tmp / "c")}}
            (tmp / "dg_blimp.yaml").write_text(yaml.safe_dump(cfg))
            nat = score_minimal_pairs(model, tok, load_format("blimp", tmp / "pairs.jsonl"), batch_size=2 * bs)
            r = ref(str(tmp / "dg_blimp.yaml"))
            rows.append(compare(f"blimp (shared, 6 x {args.blimp})", nat["per_doc"], r["items"], nat["accuracy"],
                                r["acc"]))
        if args.wikitext_docs:
            lines = (data / "wikitext2" / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
            heads = [i for i, ln in enumerate(lines) if ln.startswith(" = ") and not ln.startswith(" = = ")]
            (tmp / "wiki.txt").write_text("".join(lines[: heads[args.wikitext_docs]]), encoding="utf-8")
            pages = [p["page"] for _, p in load_format("wikitext", tmp / "wiki.txt")]
            nat = document_perplexity(model, tok, pages, batch_size=bs)
            r = ref(f"wikitext:{tmp / 'wiki.txt'}")
            dll = max(abs(a["loglikelihood"] - b["pred"]) for a, b in zip(nat["per_doc"], _by_doc(r["items"])))
            rows.append((f"wikitext-2 valid, {len(pages)} articles (word ppl)", len(pages), len(pages), dll,
                         nat["word_perplexity"] - r["word_perplexity"]))
        files = ROOT / "tests" / "data" / "formats"
        for fmt, file in [("hellaswag", "hellaswag.jsonl"), ("arc", "arc_ai2.jsonl"), ("piqa", "valid.jsonl"),
                          ("winogrande", "winogrande.jsonl"), ("boolq", "boolq_release.jsonl"), ("sciq", "sciq.json"),
                          ("openbookqa", "openbookqa_ai2.jsonl"), ("truthfulqa_mc1", "mc_task.json"),
                          ("truthfulqa_mc2", "mc_task.json")]:
            nat = evaluate_mc(model, tok, FORMATS[fmt].docs(load_format(fmt, files / file)), batch_size=bs)
            r = ref(f"{fmt}:{files / file}")
            m = FORMATS[fmt].metrics[0]
            rows.append(compare(f"{fmt} (invented, {file})", nat["per_doc"], r["items"], nat[m], r["acc" if m == "mc2" else m]))
        nat = score_last_word(model, tok, load_format("lambada", files / "lambada.jsonl"))
        r = ref(f"lambada:{files / 'lambada.jsonl'}")
        rows.append(compare("lambada (invented) perplexity", nat["per_doc"], r["items"], nat["perplexity"],
                            r["perplexity"], key="correct"))
    print(f"model={args.model} threads={torch.get_num_threads()} seconds={time.perf_counter() - t0:.0f}")
    print("| task | items | same answer | max abs(delta log-likelihood) | score delta (native - lm-eval) |")
    print("|---|---|---|---|---|")
    for name, n, same, dll, ds in rows:
        print(f"| {name} | {n} | {same} | {dll:.2e} | {ds:+.2e} |")
    ok = all(same == n for _, n, same, _, _ in rows) and all(abs(ds) <= 1e-3 for *_, ds in rows[:-1])
    print(f"parity_ok={ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
