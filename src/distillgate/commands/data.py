"""`distillgate data generate`: teacher answers for the configured prompts, cached by content hash."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="prompts and teacher-answered datasets")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    g = sub.add_parser("generate", help="generate (or reuse) the teacher-answered dataset of a config",
                       description="Reads the `data` and `teacher` sections of the config; the dataset is cached "
                                   "under $DISTILLGATE_HOME/datasets by a hash of teacher, tokenizer, prompts and "
                                   "generation settings, so a second run with the same inputs is instant.")
    g.add_argument("--config", help="YAML config (DistillConfig); defaults apply when omitted")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.num_prompts=16")
    g.add_argument("--prompts-only", action="store_true",
                   help="only write the prompts as JSONL (loadable with data.source=jsonl); no teacher run")
    g.add_argument("--out", help="with --prompts-only: JSONL file to write (default: stdout)")
    g.add_argument("--root", help="dataset cache folder (default: $DISTILLGATE_HOME/datasets)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=run_generate)


def _prompt_line(p) -> dict:
    body = {"prompt": p.text} if len(p.messages) == 1 else {"messages": p.messages}
    return {"id": p.id, **body, "domain": p.domain, "level": p.level, "complexity": p.complexity}


def run_generate(args) -> int:
    from ..config import DistillConfig, load_config
    from ..data.prompts import prompts_from_spec

    cfg = load_config(DistillConfig, args.config, args.overrides)
    prompts = prompts_from_spec(cfg.data)
    if args.prompts_only:
        text = "".join(json.dumps(_prompt_line(p), ensure_ascii=False) + "\n" for p in prompts)
        if args.out:
            from ..io import atomic_write_text

            atomic_write_text(args.out, text)
            print(f"wrote {len(prompts)} prompts to {args.out}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0

    from rich.console import Console
    from rich.table import Table

    from ..data.dataset import get_or_generate_dataset
    from ..models import load_model

    teacher = load_model(cfg.teacher.path, cfg.teacher.dtype, trust_remote_code=cfg.teacher.trust_remote_code)
    ds = get_or_generate_dataset(teacher, prompts, cfg.data, root=args.root, progress=not args.no_progress)
    counts = ds.counts()
    table = Table(title=f"teacher-answered dataset ({cfg.data.source}, {len(prompts)} prompts)")
    table.add_column("domain")
    for split in ("train", "heldout"):
        table.add_column(f"{split} examples", justify="right")
    domains = sorted(set(counts["train"]["domains"]) | set(counts["heldout"]["domains"]))
    for d in domains:
        table.add_row(d, *(str(counts[s]["domains"].get(d, 0)) for s in ("train", "heldout")))
    for label, field in (("prompts", "prompts"), ("examples", "examples"), ("tokens", "tokens"),
                         ("answer tokens", "target_tokens")):
        table.add_row(f"[bold]{label}", *(f"{counts[s][field]:,}" for s in ("train", "heldout")))
    console = Console()
    console.print(table)
    unfinished = sum(not e.finished for e in ds.examples("all"))
    if unfinished:
        console.print(f"{unfinished} answer(s) hit max_new_tokens={cfg.data.max_new_tokens} or seq_len="
                      f"{cfg.data.seq_len} (no end-of-turn target)")
    if ds.dropped:
        console.print(f"{ds.dropped} example(s) dropped: prompt longer than seq_len={cfg.data.seq_len}")
    console.print(f"saved: {ds.path}  (key {ds.key[:16]})", soft_wrap=True)  # a path must stay copyable
    return 0
