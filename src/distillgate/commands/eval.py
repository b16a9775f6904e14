"""`distillgate eval`: run an evaluation suite on a model (and its teacher) and print the scorecard."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a suite (perplexity, BLiMP, COPA, MMLU, BBH, GSM8K)",
                       description="Evaluate --model (and --teacher on the same suite) and print metric, "
                                   "student, teacher, delta. With --teacher, teacher_kl tasks compare the two.")
    p.add_argument("--model", required=True, help="'default', a model folder, a .gguf file or a hub id")
    p.add_argument("--teacher", help="teacher model (same tokenizer) for the teacher column and teacher_kl")
    p.add_argument("--suite", default="quick", help="quick, standard, or a suite YAML file (default: quick)")
    p.add_argument("--data-dir", help="folder of evaluation datasets (default: $DISTILLGATE_DATA)")
    p.add_argument("--limit", type=int, help="cap every task's documents at N")
    p.add_argument("--batch-size", type=int, default=8, help="continuations scored per forward (default 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    p.add_argument("--json", dest="json_out", help="write the scorecard(s) as JSON here")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code shipped with the weights")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..errors import ConfigError
    from ..evaluate.harness import default_data_dir
    from ..evaluate.suite import load_suite, run_suite
    from ..io import atomic_write_json
    from ..models import load_model

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit", args.limit, "an integer >= 1")
    if args.batch_size < 1:
        raise ConfigError("--batch-size", args.batch_size, "an integer >= 1")
    suite = load_suite(args.suite)                      # validate before loading any model
    data_dir = default_data_dir(args.data_dir)
    if data_dir is not None and not data_dir.is_dir():
        raise ConfigError("--data-dir", str(data_dir), "an existing folder")
    console = Console()
    student = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    teacher = (load_model(args.teacher, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
               if args.teacher else None)
    kw = dict(data_dir=data_dir, limit=args.limit, batch_size=args.batch_size)
    card = run_suite(student.model, student.tokenizer, suite, teacher=teacher and teacher.model,
                     model_name=args.model, **kw)
    tcard = run_suite(teacher.model, teacher.tokenizer, suite, model_name=args.teacher, **kw) if teacher else None

    table = Table(title=f"suite {suite.name}: {args.model}" + (f" vs {args.teacher}" if teacher else ""))
    for col in ("metric", "tier", "n", "student", "teacher", "delta"):
        table.add_column(col, justify="left" if col in ("metric", "tier") else "right")
    for name, m in card.metrics.items():
        t = tcard.metrics.get(name) if tcard else None
        arrow = "↑" if m["higher_is_better"] else "↓"
        val = f"{m['value']:.4f}" + (f" ±{m['stderr']:.3f}" if "stderr" in m else "")
        table.add_row(f"{name} {arrow}", m["capability_tier"], str(m["n"]), val,
                      f"{t['value']:.4f}" if t else "", f"{m['value'] - t['value']:+.4f}" if t else "")
    console.print(table)
    if args.json_out:
        # The student's Scorecard at top level (Scorecard.load and `distillgate gates` read it), teacher nested.
        atomic_write_json(args.json_out, {**card.to_dict(), "teacher": tcard.to_dict() if tcard else None})
        console.print(f"wrote {args.json_out}")
    return 0
