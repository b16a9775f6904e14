"""`distillgate distill --config X.yaml [key=value ...]`: one distillation pass."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a smaller student (one pass)", description=__doc__)
    p.add_argument("--config", help="YAML config (see --help-config); defaults apply to missing keys")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=20")
    p.add_argument("--help-config", action="store_true", help="print every config key with its default and exit")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def print_config_reference(model_cls) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..config import config_reference

    t = Table(title=f"{model_cls.__name__} keys")
    for c in ("key", "type", "default", "meaning"):
        t.add_column(c, overflow="fold")
    for row in config_reference(model_cls):
        t.add_row(*row)
    Console(width=200).print(t)


def run(args) -> int:
    from rich.console import Console

    from ..config import DistillConfig, load_config

    if args.help_config:
        print_config_reference(DistillConfig)
        return 0
    cfg = load_config(DistillConfig, args.config, args.overrides)
    from ..recipes.distill import distill, summary_table

    res = distill(cfg, progress=False if args.no_progress else None, resume=args.resume)
    Console().print(summary_table(res.summary))
    return 0
