"""Quality and cost of student derivation on the real teacher: calibration perplexity of the initialised
student (no training) for each layer-selection method, side by side.

    HF_HUB_OFFLINE=1 python bench/derive_quality.py                 # 15 and 20 layers, all methods
    python bench/derive_quality.py --layers 15 --mlp-width 1024 --candidates 0   # 0 = exact greedy

Calibration: the first --tokens tokens of wikitext-2 valid (shared datasets), rows of --seq-len.
Prints a table; the last line is a machine-readable key=value summary.

    python bench/derive_quality.py --compare --threads 1        # old greedy_ppl vs the default greedy_fast

--compare: the demo's setting (15 layers, MLP 1024, 1024 calibration tokens in rows of 256) unless overridden;
derives the student with the old `greedy_ppl` search and the default `greedy_fast` in one process, alternating
A B B A ... over --repeats, and prints median wall seconds, CPU seconds, the student's calibration PPL and its
PPL on held-out text (--heldout-tokens tokens from the middle of the same file on, never seen by the search).
Last line: derive_time_ratio_new_vs_greedy=X calib_ppl_ratio_new_vs_greedy=Y heldout_ppl_ratio_new_vs_greedy=Z.
"""

from __future__ import annotations

import argparse
import logging
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
    ap.add_argument("--layers", default="15,20", help="comma-separated student depths (greedy searches once, to "
                    "the shallowest, and reads deeper students off its removal trace)")
    ap.add_argument("--selections", default="uniform,block_influence,greedy_fast,greedy_ppl")
    ap.add_argument("--mlp-width", type=int, default=None)
    ap.add_argument("--candidates", type=int, default=8, help="greedy re-tries per step; 0 = all (exact greedy)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default). On a shared, "
                    "oversubscribed 2-core machine 1 thread was ~10x faster than 2 (OpenMP spin-waits)")
    ap.add_argument("--compare", action="store_true", help="old greedy_ppl vs the default greedy_fast, side by side "
                    "(defaults become the demo's: --layers 15 --mlp-width 1024 --tokens 1024 --seq-len 256)")
    ap.add_argument("--repeats", type=int, default=1, help="--compare: derivations per method (median reported)")
    ap.add_argument("--heldout-tokens", type=int, default=2048, help="--compare: held-out tokens (second half)")
    args = ap.parse_args()
    if args.compare:
        for k, v in (("layers", "15"), ("mlp_width", 1024), ("tokens", 1024), ("seq_len", 256)):
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logging.basicConfig(format="  %(message)s")
    logging.getLogger("distillgate.models.derive").setLevel(logging.INFO)  # one line per greedy step

    lm = load_model(args.teacher)
    text = Path(args.text).read_text(encoding="utf-8")
    ids = calib_ids_from_text(lm.tokenizer, text, args.tokens, args.seq_len)
    if args.compare:
        return compare(args, lm, ids, calib_ids_from_text(lm.tokenizer, text[len(text) // 2:], args.heldout_tokens,
                                                         args.seq_len))
    # greedy last: its deeper students are compared with the block-influence pick of the same depth
    sels = sorted({s for s in args.selections.split(",") if s}, key=lambda s: (s == "greedy_ppl", s))
    assert all(s in LAYER_SELECTIONS for s in sels), sels
    print(f"teacher {args.teacher}: {len(lm.model.model.layers)} layers; calibration {tuple(ids.shape)} tokens of "
          f"{Path(args.text).name}; torch threads {torch.get_num_threads()}")
    rows, summary, teacher_ppl = [], {}, None
    depths = sorted({int(x) for x in args.layers.split(",")})
    greedy_rep = None
    for n in depths:
        for sel in sels:
            t0, c0 = time.perf_counter(), time.process_time()
            cpu = float("nan")  # CPU seconds (all threads): comparable across runs on a shared machine
            if sel == "greedy_ppl" and greedy_rep is not None:
                # Greedy removal does not depend on the target depth: the deeper student is the state after the
                # first L-n steps of the shallower run. Rebuild it (and re-apply derive_student's final
                # comparison with the block-influence pick) instead of searching again.
                L = greedy_rep.teacher_layers
                removed = [t["removed"] for t in greedy_rep.greedy_trace[: L - n]]
                kept = [i for i in range(L) if i not in removed]
                student, rep = derive_student(lm.model, lm.tokenizer, ids, num_layers=n, keep_layers=kept,
                                              mlp_width=args.mlp_width)
                search = sum(t["seconds"] for t in greedy_rep.greedy_trace[: L - n])
                bi = summary[f"ppl_block_influence_{n}"] if "block_influence" in sels else float("inf")
                used = "greedy_ppl" if rep.student_ppl <= bi else "block_influence"
                ppl, secs = min(rep.student_ppl, bi), search + time.perf_counter() - t0
                trials = sum(t["trials"] for t in greedy_rep.greedy_trace[: L - n])
                kept = kept if used == "greedy_ppl" else summary[f"kept_block_influence_{n}"]
            else:
                student, rep = derive_student(lm.model, lm.tokenizer, ids, num_layers=n, mlp_width=args.mlp_width,
                                              layer_selection=sel, greedy_candidates=args.candidates or None)
                secs, ppl, used, kept = time.perf_counter() - t0, rep.student_ppl, rep.selection_used, rep.kept_layers
                cpu = time.process_time() - c0
                trials = sum(t["trials"] for t in rep.greedy_trace)
                if sel == "greedy_ppl":
                    greedy_rep = rep
            teacher_ppl = teacher_ppl or rep.teacher_ppl
            rows.append((n, sel, used, ppl, secs, cpu, rep.params_student["total"], kept, trials))
            summary[f"ppl_{sel}_{n}"], summary[f"sec_{sel}_{n}"], summary[f"kept_{sel}_{n}"] = ppl, secs, kept
            summary[f"cpu_{sel}_{n}"] = cpu
            print(f"  done {n} {sel}: PPL {ppl:.2f} in {secs:.1f} s ({cpu:.1f} CPU s)", flush=True)
            del student
    print(f"teacher calibration PPL: {teacher_ppl:.3f}")
    print(f"{'layers':>6} {'selection':<16} {'used':<16} {'student PPL':>13} {'x BI':>7} {'seconds':>8} {'CPU s':>7} "
          f"{'params':>11} {'trials':>6}  kept")
    for n, sel, used, ppl, secs, cpu, params, kept, trials in rows:
        bi = summary.get(f"ppl_block_influence_{n}")
        ratio = f"{ppl / bi:7.3f}" if bi else "      -"
        print(f"{n:>6} {sel:<16} {used:<16} {ppl:>13.2f} {ratio} {secs:>8.1f} {cpu:>7.1f} {params:>11,} "
              f"{trials:>6}  {kept}")
    kv = {"teacher_ppl": teacher_ppl, **{k: v for k, v in summary.items() if not k.startswith("kept_")}}
    print(" ".join(f"{k}={v:.4g}" for k, v in kv.items()))


def compare(args, lm, ids, held) -> None:
    """Old greedy_ppl vs new greedy_fast on the same teacher, calibration and held-out tokens, same process."""
    import statistics

    from distillgate.models.derive import calibration_ppl

    n = int(args.layers.split(",")[0])
    print(f"teacher {args.teacher}: {len(lm.model.model.layers)} layers -> {n} layers, MLP {args.mlp_width}; "
          f"calibration {tuple(ids.shape)} tokens of {Path(args.text).name}, held-out {tuple(held.shape)} "
          f"(second half of the file); torch threads {torch.get_num_threads()}; repeats {args.repeats}")
    try:
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    except OSError:
        pass
    methods = ("greedy_ppl", "greedy_fast")
    runs: dict[str, list] = {m: [] for m in methods}
    for r in range(args.repeats):
        for sel in (methods if r % 2 == 0 else methods[::-1]):  # A B B A: load drift hits both alike
            t0, c0 = time.perf_counter(), time.process_time()
            student, rep = derive_student(lm.model, lm.tokenizer, ids, num_layers=n, mlp_width=args.mlp_width,
                                          layer_selection=sel, greedy_candidates=args.candidates or None)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            runs[sel].append((secs, cpu, rep, calibration_ppl(student, held)))
            print(f"  done {sel} #{r + 1}: calib PPL {rep.student_ppl:.3f} in {secs:.1f} s ({cpu:.1f} CPU s), "
                  f"used {rep.selection_used}", flush=True)
            del student
    print(f"teacher calibration PPL: {runs[methods[0]][0][2].teacher_ppl:.3f}")
    print(f"{'method':<12} {'used':<16} {'seconds':>8} {'CPU s':>7} {'search s':>8} {'trials':>6} {'calib PPL':>10} "
          f"{'layers-only':>11} {'held-out PPL':>12}  kept")
    med = {}
    for sel in methods:
        rs = runs[sel]
        rep, held_ppl = rs[0][2], rs[0][3]
        assert all(x[2].kept_layers == rep.kept_layers for x in rs), "derivation is not deterministic"
        med[sel] = (statistics.median(x[0] for x in rs), statistics.median(x[1] for x in rs))
        trials = sum(t["trials"] for t in rep.greedy_trace)
        search = statistics.median(x[2].seconds["layer_selection"] for x in rs)
        print(f"{sel:<12} {rep.selection_used:<16} {med[sel][0]:>8.1f} {med[sel][1]:>7.1f} {search:>8.1f} "
              f"{trials:>6} {rep.student_ppl:>10.3f} {rep.selection_ppl[rep.selection_used]:>11.3f} "
              f"{held_ppl:>12.3f}  {rep.kept_layers}")
    old, new = runs["greedy_ppl"][0], runs["greedy_fast"][0]
    kv = {"derive_time_ratio_new_vs_greedy": med["greedy_fast"][0] / med["greedy_ppl"][0],
          "cpu_time_ratio_new_vs_greedy": med["greedy_fast"][1] / med["greedy_ppl"][1],
          "calib_ppl_ratio_new_vs_greedy": new[2].student_ppl / old[2].student_ppl,
          "heldout_ppl_ratio_new_vs_greedy": new[3] / old[3],
          "sec_greedy": med["greedy_ppl"][0], "sec_new": med["greedy_fast"][0],
          "calib_ppl_greedy": old[2].student_ppl, "calib_ppl_new": new[2].student_ppl}
    print(" ".join(f"{k}={v:.4g}" for k, v in kv.items()))


if __name__ == "__main__":
    main()
