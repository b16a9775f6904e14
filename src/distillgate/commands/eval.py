"""`distillgate eval`: run an evaluation suite on a model (and its teacher), print the scorecard and, with a
teacher, the items the teacher gets right and the student wrong, by task and capability tag."""

from __future__ import annotations

import argparse


def _epilog() -> str:
    from ..evaluate.formats import FORMATS

    fmts = "\n".join(f"  {f.name:15s} {f.kind:13s} {f.input_format}" for f in FORMATS.values())
    return ("suite: quick | standard | a suite YAML file | one FORMAT:FILE line (e.g. copa:dev.xml,\n"
            "hellaswag:hellaswag_val.jsonl, mmlu:marketing, lm_eval:my_task.yaml). Relative paths resolve\n"
            "against --data-dir ($DISTILLGATE_DATA) when set, else the current folder. Every task's data is\n"
            "checked before a model loads. A failing task does not lose the others: --json is written,\n"
            "marked \"partial\": true, and the exit status is 1.\n\n"
            f"formats (FORMAT, kind, input):\n{fmts}\n\n"
            "The full reference (suite fields, formats, metrics) is in the README, section Evaluation reference.")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a suite or a benchmark file (MMLU, HellaSwag, ...)",
                       description="Evaluate --model (and --teacher on the same suite) and print metric, "
                                   "student, teacher, delta. With --teacher: teacher_kl tasks compare the two, and "
                                   "the per-item diff lists what the student lost, by task and capability tag.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    # The epilog lists the formats, which imports evaluate (and torch): built only when help is printed, so
    # that `distillgate --help` and every other command's parser stay fast.
    format_help = p.format_help

    def _format_help() -> str:
        p.epilog = _epilog()
        return format_help()

    p.format_help = _format_help
    p.add_argument("--model", required=True, help="'default', a model folder, a .gguf file or a hub id")
    p.add_argument("--teacher", help="teacher model (same tokenizer) for the teacher column, teacher_kl and the diff")
    p.add_argument("--baseline", metavar="JSON", help="the teacher's earlier `eval --json` on the same suite (S1.3: "
                                                      "the golden reference): teacher column and per-item diff "
                                                      "without running the teacher again")
    p.add_argument("--suite", default="quick", help="quick, standard, a suite YAML file, or FORMAT:FILE "
                                                    "(default: quick)")
    p.add_argument("--data-dir", help="folder relative paths resolve against (default: $DISTILLGATE_DATA, "
                                      "else the current folder)")
    p.add_argument("--limit", type=int, help="cap every task's documents at N")
    p.add_argument("--batch-size", type=int, default=8, help="continuations scored per forward (default 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    p.add_argument("--json", dest="json_out", help="write the scorecard(s), per-item results and the diff here")
    p.add_argument("--store", metavar="ROOT", help="also keep the result in the run store ROOT (with --run)")
    p.add_argument("--run", dest="run_id", help="run id under --store; written to <run>/work/eval/<label>.json")
    p.add_argument("--label", default="eval", help="file name of the result in the run store (default: eval)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code shipped with the weights")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from ..errors import ConfigError
    from ..evaluate.harness import default_data_dir
    from ..evaluate.metrics import Scorecard
    from ..evaluate.suite import load_suite, prepare_suite, run_suite
    from ..io import atomic_write_json
    from ..models import load_model

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit", args.limit, "an integer >= 1")
    if args.batch_size < 1:
        raise ConfigError("--batch-size", args.batch_size, "an integer >= 1")
    if args.baseline and args.teacher:
        raise ConfigError("--baseline", args.baseline, "either --teacher or --baseline, not both")
    if bool(args.store) != bool(args.run_id):
        raise ConfigError("--store/--run", args.store or args.run_id, "both or neither")
    data_dir = default_data_dir(args.data_dir)
    if data_dir is not None and not data_dir.is_dir():
        raise ConfigError("--data-dir", str(data_dir), "an existing folder")
    suite = load_suite(args.suite)
    prepared = prepare_suite(suite, data_dir, args.limit)       # every task's data checked before any model
    baseline = _baseline(args.baseline, suite.name) if args.baseline else None
    store = _open_store(args) if args.store else None           # a wrong run id fails before compute too
    console = Console()
    card, tcard = Scorecard(model=args.model, suite=suite.name), baseline
    kw = dict(data_dir=data_dir, limit=args.limit, batch_size=args.batch_size)
    interrupted = False
    try:
        student = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        teacher = (load_model(args.teacher, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
                   if args.teacher else None)
        run_suite(student.model, student.tokenizer, prepared, teacher=teacher and teacher.model, card=card, **kw)
        if teacher:
            tcard = Scorecard(model=args.teacher, suite=suite.name)
            run_suite(teacher.model, teacher.tokenizer, prepared, card=tcard, **kw)
    except KeyboardInterrupt:
        interrupted = True
        for c in (card, tcard):
            if c is not None:
                c.partial = True
                c.errors.setdefault("<interrupted>", "KeyboardInterrupt: stopped before the suite finished")
    result = _result(card, tcard)
    _print(console, suite.name, args, card, tcard, result.get("diff"))
    if args.json_out:
        atomic_write_json(args.json_out, result)
        console.print(f"wrote {args.json_out}" + (" (partial)" if result["partial"] else ""))
    if store is not None:
        try:
            path = store.work_dir("eval") / f"{args.label}.json"
            atomic_write_json(path, result)
            console.print(f"kept in the run store: {path}")
        finally:
            store.close()
    if interrupted:
        return 130
    if result["partial"]:
        for c in (card, tcard):
            for task, msg in (c.errors if c else {}).items():
                console.print(f"[bold red]task {task} failed ({c.model}):[/] {msg}", highlight=False)
        return 1
    return 0


def _baseline(path: str, suite_name: str):
    from ..errors import ConfigError
    from ..evaluate.metrics import Scorecard

    card = Scorecard.load(path)
    if card.suite != suite_name:
        raise ConfigError("--baseline", path, f"a scorecard of suite {suite_name!r} (this one is of {card.suite!r})")
    if card.partial:
        raise ConfigError("--baseline", path, f"a complete scorecard (this one is partial: {card.errors})")
    return card


def _open_store(args):
    from ..store import RunStore

    return RunStore.open(args.store, args.run_id, writer=True)


def _result(card, tcard) -> dict:
    """The student's Scorecard at top level (Scorecard.load and `distillgate gates` read it), the teacher's
    nested, and the per-item diff when both ran."""
    from ..evaluate.diff import item_diff

    out = {**card.to_dict(), "teacher": tcard.to_dict() if tcard else None}
    out["partial"] = card.partial or bool(tcard and tcard.partial)
    if tcard is not None:
        out["diff"] = item_diff(card, tcard, max_items=None)
    return out


def _print(console, suite_name, args, card, tcard, diff) -> None:
    from rich.table import Table

    table = Table(title=f"suite {suite_name}: {args.model}" + (f" vs {tcard.model}" if tcard else ""))
    for col in ("metric", "tier", "n", "student", "teacher", "delta"):
        table.add_column(col, justify="left" if col in ("metric", "tier") else "right")
    for name, m in card.metrics.items():
        t = tcard.metrics.get(name) if tcard else None
        arrow = "↑" if m["higher_is_better"] else "↓"
        val = f"{m['value']:.4f}" + (f" ±{m['stderr']:.3f}" if "stderr" in m else "")
        table.add_row(f"{name} {arrow}", m["capability_tier"], str(m["n"]), val,
                      f"{t['value']:.4f}" if t else "", f"{m['value'] - t['value']:+.4f}" if t else "")
    console.print(table)
    if not diff or not diff["by_task"]:
        return
    for key, title in (("by_task", "task"), ("by_tag", "capability tag")):
        t = Table(title=f"items the teacher gets right and the student wrong, by {title}")
        for col in (title, "n", "teacher right", "student right", "lost", "gained", "first lost items"):
            t.add_column(col, justify="left" if col in (title, "first lost items") else "right")
        rows = sorted(diff[key].items(), key=lambda kv: (-kv[1]["lost"], kv[0]))
        for name, r in rows[:20]:
            t.add_row(name, str(r["n"]), str(r["teacher_correct"]), str(r["student_correct"]), str(r["lost"]),
                      str(r["gained"]), ", ".join(map(str, r["lost_items"][:3])))
        console.print(t)
