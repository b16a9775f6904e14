"""Quality and cost of student derivation on the real teacher: calibration perplexity of the initialised
student (no training) for each layer-selection method, side by side.

    HF_HUB_OFFLINE=1 python bench/derive_quality.py                 # 15 and 20 layers, all methods
    python bench/derive_quality.py --layers 15 --mlp-width 1024 --candidates 0   # 0 = exact greedy

Calibration: the first --tokens tokens of wikitext-2 valid (shared datasets), rows of --seq-len.
Prints a table; the last line is a machine-readable key=value summary.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from distillgate.models import load_model
from distillgate.models.derive import LAYER_SELECTIONS, calib_ids_from_text, derive_student

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "wikitext2" / "valid.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--text", default=os.environ.get("DERIVE_CALIB_TEXT", str(DEFAULT_TEXT)))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", default="15,20", help="comma-separated student depths")
    ap.add_argument("--selections", default="uniform,block_influence,greedy_ppl")
    ap.add_argument("--mlp-width", type=int, default=None)
    ap.add_argument("--candidates", type=int, default=8, help="greedy re-tries per step; 0 = all (exact greedy)")
    args = ap.parse_args()
    torch.manual_seed(0)

    lm = load_model(args.teacher)
    ids = calib_ids_from_text(lm.tokenizer, Path(args.text).read_text(encoding="utf-8"), args.tokens, args.seq_len)
    sels = [s for s in args.selections.split(",") if s]
    assert all(s in LAYER_SELECTIONS for s in sels), sels
    print(f"teacher {args.teacher}: {len(lm.model.model.layers)} layers; calibration {tuple(ids.shape)} tokens of "
          f"{Path(args.text).name}; torch threads {torch.get_num_threads()}")
    rows, summary, teacher_ppl = [], {}, None
    for n in [int(x) for x in args.layers.split(",")]:
        for sel in sels:
            t0 = time.perf_counter()
            student, rep = derive_student(lm.model, lm.tokenizer, ids, num_layers=n, mlp_width=args.mlp_width,
                                          layer_selection=sel, greedy_candidates=args.candidates or None)
            secs = time.perf_counter() - t0
            teacher_ppl = rep.teacher_ppl
            rows.append((n, sel, rep.selection_used, rep.student_ppl, secs, rep.params_student["total"], rep.kept_layers,
                         sum(t["trials"] for t in rep.greedy_trace)))
            summary[f"ppl_{sel}_{n}"] = rep.student_ppl
            summary[f"sec_{sel}_{n}"] = secs
            del student
    print(f"teacher calibration PPL: {teacher_ppl:.3f}")
    print(f"{'layers':>6} {'selection':<16} {'used':<16} {'student PPL':>13} {'x BI':>7} {'seconds':>8} "
          f"{'params':>11} {'trials':>6}  kept")
    for n, sel, used, ppl, secs, params, kept, trials in rows:
        bi = summary.get(f"ppl_block_influence_{n}")
        ratio = f"{ppl / bi:7.3f}" if bi else "      -"
        print(f"{n:>6} {sel:<16} {used:<16} {ppl:>13.2f} {ratio} {secs:>8.1f} {params:>11,} {trials:>6}  {kept}")
    kv = {"teacher_ppl": teacher_ppl, **summary}
    print(" ".join(f"{k}={v:.4g}" for k, v in kv.items()))


if __name__ == "__main__":
    main()
