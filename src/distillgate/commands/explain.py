"""`distillgate explain`: G-O4 explanations and their human spot check.

    distillgate explain export RUN|MODEL --prompts FILE --out DIR [--sample N] [--method ig|gxi]
    distillgate explain import CSV [--allow-unreviewed] [--json]
"""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("explain", help="three-part explanations (premises, reasoning chain, confidence) and their "
                                       "spot check (G-O4)")
    s = p.add_subparsers(dest="explain_command", required=True, metavar="{export,import}")
    e = s.add_parser("export", help="explain a sample of prompts; write explanations.html/.csv/.json for review")
    e.add_argument("model", metavar="RUN|MODEL", help="a run id under --root (its --version), or a model folder, "
                                                      ".gguf file or 'default'")
    e.add_argument("--prompts", default=None, metavar="FILE", help="JSONL prompts ({\"prompt\": ...} or "
                   "{\"messages\": [...]}, optional \"answer\": explained as given); default: built-in prompts")
    e.add_argument("--out", required=True, metavar="DIR", help="folder to write the three files into")
    e.add_argument("--sample", type=int, default=None, metavar="N", help="explain a seeded random sample of N "
                   "prompts (default: all of --prompts, or 30 built-in ones)")
    e.add_argument("--root", default="runs", help="folder holding the runs (default: ./runs)")
    e.add_argument("--version", default="current", help="the run's version: id or alias (default: current)")
    e.add_argument("--method", choices=("ig", "gxi"), default="ig", help="attribution (default: ig, Captum "
                   "LayerIntegratedGradients; gxi: gradient x input)")
    # defaults: ExplainOptions' (not imported here: it imports torch, and `distillgate --help` stays fast)
    e.add_argument("--n-steps", type=int, default=None, help="integration points of ig (default: 8)")
    e.add_argument("--top-k", type=int, default=None, help="premises per explanation, at most a third of the "
                   "prompt's spans (default: 3)")
    e.add_argument("--max-new-tokens", type=int, default=None, help="answer length when the model answers "
                                                                    "(default: 32)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=1, help="torch threads")
    e.set_defaults(func=run_export)
    i = s.add_parser("import", help="read a reviewed CSV's verdicts: the pass rate with a Wilson 95%% CI")
    i.add_argument("csv", help="explanations.csv with the verdict column filled (pass / fail)")
    i.add_argument("--allow-unreviewed", action="store_true", help="leave rows with an empty verdict out "
                                                                   "(default: an error)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=run_import)


def _model(args):
    """(label, LoadedModel) of RUN|MODEL."""
    from ..errors import ConfigError
    from ..models import load_model

    spec = args.model
    if spec == "default" or Path(spec).exists() or not (Path(args.root) / spec).is_dir():
        if spec != "default" and not Path(spec).exists():
            raise ConfigError("RUN|MODEL", spec, f"a run under --root {args.root}, a model folder or .gguf file, "
                                                 "or 'default'")
        return spec, load_model(spec)
    from ..store import RunStore

    store = RunStore.open(args.root, spec, writer=False)
    v = store.resolve(int(args.version) if args.version.isdigit() else args.version)
    folder = v.checkout("student", store.dir / "explain" / f"v{v.version_id}")
    return f"{spec}/v{v.version_id}", load_model(str(folder))


def run_export(args) -> int:
    import random

    from rich.console import Console

    from ..errors import ConfigError
    from ..ops.explain import ExplainOptions
    from ..ops.explain_review import explain_all, export, probe_prompts, read_prompt_file
    from ..perf import torch_threads

    given = {"n_steps": args.n_steps, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens}
    try:
        opts = ExplainOptions(method=args.method, seed=args.seed, **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        err = e.errors()[0]
        raise ConfigError("--" + str(err["loc"][0]).replace("_", "-"), err.get("input"), err["msg"]) from None
    if args.sample is not None and args.sample < 1:
        raise ConfigError("--sample", args.sample, "an integer >= 1")
    if Path(args.out).is_file():
        raise ConfigError("--out", args.out, "a folder (it is created), not a file")
    prompts = read_prompt_file(args.prompts) if args.prompts else probe_prompts(args.sample or 30, args.seed)
    if args.sample is not None and args.sample < len(prompts):
        prompts = random.Random(args.seed).sample(prompts, args.sample)
    label, lm = _model(args)
    con = Console()
    con.print(f"explaining {len(prompts)} prompt(s) with {label} ({opts.method})")

    def progress(i, n, ex):
        con.print(f"  [{i}/{n}] {ex.id}: {len(ex.premises)} premise(s), {len(ex.steps)} step(s), automatic check "
                  + ("[green]pass[/]" if ex.check["passed"] else "[red]fail[/]: " + "; ".join(ex.check["reasons"])))

    with torch_threads(args.threads):
        exs = explain_all(lm.model, lm.tokenizer, prompts, opts, progress)
    paths = export(exs, args.out, label, {"options": opts.model_dump(), "prompts": args.prompts})
    k = sum(e.check["passed"] for e in exs)
    con.print(f"automatic spot check: {k}/{len(exs)} pass ({100 * k / len(exs):.1f}%)")
    con.print(f"wrote {paths['html']} (to read), {paths['csv']} (fill the verdict column, then `distillgate "
              f"explain import {paths['csv']}`), {paths['json']}")
    return 0


def run_import(args) -> int:
    from ..ops.explain_review import read_verdicts

    s = read_verdicts(args.csv, allow_unreviewed=args.allow_unreviewed)
    if args.json:
        print(json.dumps(s.to_dict(), indent=1))
    else:
        lo, hi = s.ci95
        print(f"{s.path}: {s.passed}/{s.n} explanations pass the human spot check: {s.pct:.1f}% "
              f"(Wilson 95% CI {lo:.1f}-{hi:.1f}%)" + (f"; {s.unreviewed} not reviewed" if s.unreviewed else ""))
        print("use it as G-O4: distillgate gates ... --explanation-verdicts " + s.path)
    return 0
