"""Seconds per gate of the validate phase for the demo's student: teacher side cold vs cached.

    OMP_NUM_THREADS=1 python bench/validate.py --data-dir ../shared/datasets [--student DIR]
        [--gates ppl_ratio,f1_gap_points,inheritance,path_consistency,perf,latency_volatility_ratio]
        [--cold | --no-cold] [--repeats 1] [--layer-selection uniform]

The student is the demo's shape (configs/demo.yaml: 15 of the teacher's 30 layers, MLP 1024), derived from
the default teacher (``--layer-selection uniform`` by default: the timing depends on the shape, not on which
layers were kept; ``greedy_fast`` derives it exactly like the demo, slower), or a saved student (``--student``).
Every gate is measured through the one metric registry (:func:`distillgate.evaluate.providers.measure_student`)
at its CPU preset, one gate at a time:

* cold: a fresh ``$DISTILLGATE_HOME`` and an empty ``teacher_cache`` (iteration 0 of a run on a new machine);
* cached: the same gate again with the ``teacher_cache`` the cold pass filled (iteration > 0 of a run): only the
  student side is paid. Timing gates (G-P1/G-P3 ``perf``, G-P2) measure both models every time by design.

G-C1 reads ``--ppl-text`` (default: the ``# text =`` lines of the UD EWT files under ``--data-dir``).
A table per gate: cold s, cached s, size used / SPEC size, value, CI. Last line machine-readable:
``validate_cached_s=X validate_cold_s=Y <gate>_cached_s=... <gate>_cold_s=...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

GATES = ("ppl_ratio", "f1_gap_points", "inheritance", "path_consistency", "perf", "latency_volatility_ratio")
PERF = ("ttft_ratio", "peak_memory_ratio")


def ud_text(data_dir: Path, out: Path) -> Path:
    lines = [ln[len("# text = "):] for p in sorted((data_dir / "ud_english_ewt").glob("*.conllu"))
             for ln in p.read_text(encoding="utf-8").splitlines() if ln.startswith("# text = ")]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="evaluation datasets (wnut17/, ud_english_ewt/, blimp/)")
    ap.add_argument("--student", help="a saved student folder (default: derive the demo's shape)")
    ap.add_argument("--layer-selection", default="uniform", choices=["uniform", "greedy_fast"])
    ap.add_argument("--gates", default=",".join(GATES), help=f"comma list of {GATES}")
    ap.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the cold teacher side (fresh cache folder); --no-cold: cached only "
                         "(the teacher side is then filled first, untimed)")
    ap.add_argument("--repeats", type=int, default=1, help="cached passes per gate (median kept)")
    ap.add_argument("--ppl-text", help="G-C1 text file (default: UD EWT sentences)")
    ap.add_argument("--home", help="$DISTILLGATE_HOME to use (default: a fresh folder; an earlier run's folder "
                                   "makes 'cold' mean: teacher side on disk, not yet in the run's memory)")
    args = ap.parse_args(argv)
    gates = [g for g in args.gates.split(",") if g]
    bad = [g for g in gates if g not in GATES]
    if bad:
        ap.error(f"--gates: unknown {bad}; allowed {list(GATES)}")
    data_dir = Path(args.data_dir).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="bench-validate-"))
    os.environ["DISTILLGATE_HOME"] = args.home or str(tmp / "home")   # cold: nothing cached on disk
    print(f"DISTILLGATE_HOME={os.environ['DISTILLGATE_HOME']}", file=sys.stderr)

    import torch

    from distillgate.evaluate.providers import CPU_PRESETS, load_providers, measure_student
    from distillgate.models import load_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load_providers()
    teacher = load_model("default")
    if args.student:
        student = load_model(args.student).model
    else:
        from distillgate.models.derive import derive_student

        calib = None
        if args.layer_selection != "uniform":
            ids = teacher.tokenizer(ud_text(data_dir, tmp / "calib.txt").read_text()[:20000],
                                    return_tensors="pt")["input_ids"][:, :1024]
            calib = ids.reshape(4, -1)
        student, _ = derive_student(teacher.model, teacher.tokenizer, calib, num_layers=15, mlp_width=1024,
                                    layer_selection=args.layer_selection,
                                    mlp_selection="magnitude" if calib is None else "activation")
    opts = {"data_dir": str(data_dir), "ppl_text": args.ppl_text or str(ud_text(data_dir, tmp / "ud.txt")),
            "ppl_tokens": 2048, "lengths": [32, 128, 256], "repeats": 3, "context_len": 256}
    tc: dict = {}
    rows, last = [], {}
    for g in gates:
        names = list(PERF) if g == "perf" else [g]
        cold = None
        if g in ("perf", "latency_volatility_ratio"):   # both models timed every time: nothing to cache
            t0 = time.perf_counter()
            vals, notes, ctx = measure_student(teacher, student, names, opts, tc)
            cold = time.perf_counter() - t0
            cached = [cold]
        elif args.cold:
            t0 = time.perf_counter()
            vals, notes, ctx = measure_student(teacher, student, names, opts, tc)
            cold = time.perf_counter() - t0
        else:
            measure_student(teacher, student, names, opts, tc)   # fill the teacher side, untimed
        if g not in ("perf", "latency_volatility_ratio"):
            cached = []
        for _ in range(args.repeats if g not in ("perf", "latency_volatility_ratio") else 0):
            t0 = time.perf_counter()
            vals, notes, ctx = measure_student(teacher, student, names, opts, tc)
            cached.append(time.perf_counter() - t0)
        d = ctx.details.get(names[0]) if isinstance(ctx.details.get(names[0]), dict) else {}
        for side in ("teacher", "student"):   # where a gate's time went (probes: cumulative per part)
            sec = (d.get(side) or {}).get("seconds") if isinstance(d.get(side), dict) else None
            if sec:
                print(f"    {g} {side}: {({k: round(v, 1) for k, v in sec.items()})}", file=sys.stderr)
        if isinstance(d.get("seconds"), dict):
            print(f"    {g} seconds: {({k: round(v, 1) for k, v in d['seconds'].items()})}", file=sys.stderr)
        size = d.get("size") or {}
        lo, hi = vals.get(f"{names[0]}/ci_low"), vals.get(f"{names[0]}/ci_high")
        rows.append((g, cold, statistics.median(cached), size, vals.get(names[0]), (lo, hi), notes.get(names[0])))
        print(f"  {g}: cold {cold if cold is None else round(cold, 1)} s, cached {statistics.median(cached):.1f} s",
              file=sys.stderr, flush=True)
    print(f"\nvalidate gates for a 15-layer / MLP-1024 student, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {os.getloadavg()[0]:.1f} (presets: {CPU_PRESETS})")
    print(f"{'gate':26s} {'cold s':>8s} {'cached s':>9s}  {'size used/SPEC':22s} {'value':>9s}  CI95")
    for g, cold, cached, size, val, (lo, hi), note in rows:
        sz = f"{size.get('used', '-')}/{size.get('spec') or 'n.s.'} {size.get('unit', '')}" if size else "-"
        ci = f"[{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else "-"
        v = "-" if val is None else f"{val:.4g}"
        print(f"{g:26s} {'-' if cold is None else f'{cold:8.1f}':>8s} {cached:9.1f}  {sz:22s} {v:>9s}  {ci}"
              + (f"  ({note})" if note else ""))
        last[f"{g}_cached_s"] = round(cached, 2)
        if cold is not None:
            last[f"{g}_cold_s"] = round(cold, 2)
    total_cached = sum(r[2] for r in rows)
    total_cold = sum(r[1] for r in rows) if all(r[1] is not None for r in rows) else None
    print(" ".join([f"validate_cached_s={total_cached:.2f}",
                    f"validate_cold_s={'nan' if total_cold is None else f'{total_cold:.2f}'}"]
                   + [f"{k}={v}" for k, v in last.items()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
