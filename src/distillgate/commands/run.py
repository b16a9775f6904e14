"""`distillgate run --config run.yaml [key=value ...]` (or `--resume RUN`): the closed loop until the gates
pass or the budget ends, every iteration versioned in the run store, then the HTML report."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the main job: iterate extract/map/validate/attribute/compensate to the gates",
                       description=__doc__)
    p.add_argument("--config", help="run YAML (see --help-config)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. loop.budget_minutes=10")
    p.add_argument("--resume", metavar="RUN", help="continue run RUN from its last committed iteration")
    p.add_argument("--root", help="run store folder (default: store_root of the config, 'runs')")
    p.add_argument("--allow-teacher-change", action="store_true",
                   help="with --resume: go on although the teacher's weights or tokenizer changed since the "
                        "last committed version (recorded as an alert and a lineage note); refused otherwise")
    p.add_argument("--help-config", action="store_true", help="print every config key with its default and exit")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from rich.console import Console

    from ..config import RunConfig, load_config
    from ..errors import ConfigError

    if args.help_config:
        from .distill import print_config_reference

        print_config_reference(RunConfig)
        return 0
    import sys

    # Tables are wide (gate, metric, value, threshold, status, margin, note): don't fold them at 80 columns
    # when the output is a pipe or a log file.
    import os

    # under torchrun only rank 0 talks (every rank runs the same loop)
    console = Console(width=None if sys.stdout.isatty() else 160, quiet=int(os.environ.get("RANK", "0")) != 0)
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume", args.resume, "no --config or overrides (a run resumes with its own config)")
        cfg = None
    else:
        if args.allow_teacher_change:
            raise ConfigError("--allow-teacher-change", True, "only with --resume")
        cfg = load_config(RunConfig, args.config, args.overrides)
    from ..loop import run as run_loop

    summary = run_loop(cfg, resume_run=args.resume, root=args.root, console=console,
                       allow_teacher_change=args.allow_teacher_change,
                       progress=False if args.no_progress else None)
    if summary.get("rank", 0) != 0:  # under torchrun: rank 0 prints and writes the report
        return 0
    root = str(Path(summary["run_dir"]).parent)
    from ..gates import GateReport
    from ..store import RunStore

    with RunStore.open(root, summary["run_id"]) as store:
        v = store.resolve("current")
        gates = GateReport.from_json(v.load_json("gates.json")) if "gates.json" in v.files else None
    if gates is not None:
        console.print(gates.format_table())
    _trajectory(console, summary)
    if not args.no_report:
        from ..report.from_store import load_report_data
        from ..report.html import render_report

        out = render_report(load_report_data(root, summary["run_id"]), Path(summary["run_dir"]) / "report.html")
        console.print(f"report: {out}")
        from ..tracking import log_report

        with RunStore.open(root, summary["run_id"]) as store:
            if log_report(RunConfig.model_validate(store.config), store, out):
                console.print("report logged to the run's MLflow run (artifact report/report.html)")
    console.print(f"run {summary['run_id']}: [bold]{summary['status']}[/] after {summary['seconds']} s "
                  f"({summary['run_dir']})")
    return 0


def _trajectory(console, summary: dict) -> None:
    from rich.table import Table

    t = Table(title=f"run {summary['run_id']}: trajectory")
    for c in ("iter", "KL", "top-1", "PPL ratio (G-C1)", "TTFT ratio (G-P1)", "memory ratio (G-P3)",
              "FLOPs/token vs teacher", "all gates"):
        t.add_column(c, justify="right")
    f = lambda x, d=4: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    for h in summary["iterations"]:
        t.add_row(str(h["iteration"]), f(h["kl"]), f(h["top1_agreement"], 3), f(h["ppl_ratio"], 3),
                  f(h["ttft_ratio"], 3), f(h["peak_memory_ratio"], 3), f(h.get("flops_ratio"), 3),
                  "pass" if h["gates_passed"] else "fail")
    console.print(t)
