"""`distillgate gates`: measure what can be measured here, compare with the gate spec, print and save a verdict.

Exit status: 0 when every counted gate passes (``all_passed``; with ``--require-converged`` also every gate
measured), 1 when any gate fails or is missing under ``on_missing: fail``, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PERF_METRICS = ("ttft_ratio", "peak_memory_ratio", "latency_volatility_ratio", "leak_pct_per_hour")


def register(subparsers) -> None:
    from ..evaluate.providers import CPU_PRESETS as P

    p = subparsers.add_parser(
        "gates", help="evaluate the acceptance gates (capability, performance, business, operations)",
        description="Measure the student against the teacher (perplexity ratio, TTFT, memory, latency "
                    "volatility, ...), merge metrics measured elsewhere, and check every gate of the spec.")
    p.add_argument("--student", required=True, help="student model: a folder, a .gguf file, or a hub id")
    p.add_argument("--teacher", default="default", help="teacher model, or a teacher profile folder (`distillgate "
                   "profile`) whose recorded model is used (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--spec", default=None, help="gate spec YAML (default: the shipped specs/gates.yaml)")
    p.add_argument("--metrics", action="append", default=[], metavar="FILE",
                   help="JSON of already measured metrics: {name: value} or a Scorecard {metrics: {name: "
                        "{value, ...}}}; repeatable, later files win; these are never re-measured")
    p.add_argument("--json", default=None, metavar="OUT", help="write the gate report JSON here")
    p.add_argument("--skip-perf", action="store_true", help="do not measure " + ", ".join(PERF_METRICS))
    p.add_argument("--skip", action="append", default=[], metavar="METRIC",
                   help="do not measure this metric (repeatable or comma-separated)")
    p.add_argument("--on-missing", choices=("fail", "skip"), default=None,
                   help="override the spec's policy for measurable gates without a value")
    p.add_argument("--require-converged", action="store_true",
                   help="exit 1 unless every gate (business and operations included) is measured and passes")
    g = p.add_argument_group("measurement")
    g.add_argument("--ppl-text", default=None, metavar="FILE", help="UTF-8 text for the perplexity ratio (G-C1)")
    g.add_argument("--ppl-tokens", type=int, default=2048, help="tokens of --ppl-text to score")
    g.add_argument("--lengths", default="32,128,512", help="TTFT prompt lengths in tokens (G-P1)")
    g.add_argument("--repeats", type=int, default=P["repeats"], help="TTFT repeats per length and model (interleaved)")
    g.add_argument("--warmup", type=int, default=P["warmup"], help="TTFT warm-up calls per length and model")
    g.add_argument("--context-len", type=int, default=P["context_len"], help="context for the memory breakdown (G-P3) and "
                   "the longest request of the volatility load (G-P2)")
    g.add_argument("--volatility-requests", type=int, default=P["volatility_requests"], help="requests in the G-P2 load")
    g.add_argument("--leak-seconds", type=float, default=0.0, help="G-P4 soak length (0: not run)")
    g.add_argument("--threads", type=int, default=1, help="torch threads for every measurement of both models "
                   "(1 is stable on a shared CPU; use the serving thread count on a dedicated machine)")
    g.add_argument("--data-dir", default=None, metavar="DIR", help="evaluation data for the G-C2 probes "
                   "(wnut17/, ud_english_ewt/, blimp/; default: $DISTILLGATE_DATA)")
    g.add_argument("--inheritance-groups", type=int, default=P["inheritance_groups"],
                   help="G-C3 paired groups (SPEC: 300; CPU preset shown)")
    g.add_argument("--path-instructions", type=int, default=P["path_instructions"],
                   help="G-C4 instructions (SPEC: 5,000; CPU preset shown)")
    g.add_argument("--traffic-log", default=None, metavar="FILE", help="a JSONL traffic event log (the schema of "
                   "distillgate.traffic.events: one turn per line, arms control / candidate): the business gates "
                   "(G-B) are measured from it, with its provenance")
    g.add_argument("--traffic-provenance", default="real", choices=("real", "replay", "simulated"),
                   help="what --traffic-log is, for lines that do not say (default: real production logs)")
    g.add_argument("--breaker-report", default=None, metavar="FILE", help="a G-O1 breaker report (bench/"
                   "operations.py --out): the G-O1 gates are read from it, with its provenance (generated attacks)")
    g.add_argument("--explanation-verdicts", default=None, metavar="CSV", help="a reviewed explanation CSV "
                   "(`distillgate explain export`, verdict column filled): G-O4 is the human pass rate; without it, "
                   "the automatic spot check runs on --explain-prompts built-in prompts")
    g.add_argument("--explain-prompts", type=int, default=P["explain_prompts"],
                   help="G-O4 automatic spot check: prompts explained (CPU preset shown)")
    g.add_argument("--rollback-report", default=None, metavar="FILE", help="a G-O5 rollback drill report "
                   "(`distillgate ops rollback-drill RUN --out FILE`): G-O5a/b are read from it")
    g.add_argument("--soak-report", default=None, metavar="FILE", help="a G-P4 gateway soak report (`distillgate ops "
                   "soak --out FILE`): leak_pct_per_hour is read from it")
    g.add_argument("--leak-through-gateway", action="store_true", help="run the --leak-seconds soak through the "
                   "gateway (the student behind a `transformers serve` backend under a locust load; its RSS)")
    g.add_argument("--teacher-registry", default=None, metavar="FILE", help="a teacher-version registry "
                   "(`distillgate ops teachers add`): G-O3 is measured against it")
    g.add_argument("--teacher-compat-report", default=None, metavar="FILE", help="a G-O3 report (`distillgate ops "
                   "teachers check --out FILE`)")
    g.add_argument("--window-days", type=float, default=30.0, help="KPI window over the log's timestamps (G-B1)")
    g.add_argument("--seed", type=int, default=P["seed"])
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=run)


def _positive(name: str, value, allow_zero: bool = False) -> None:
    from ..errors import ConfigError

    if value is None or (value < 0 if allow_zero else value <= 0):
        raise ConfigError(name, value, ">= 0" if allow_zero else "> 0")


def parse_lengths(value: str) -> list[int]:
    from ..errors import ConfigError

    try:
        lengths = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ConfigError("--lengths", value, "comma-separated positive integers, e.g. 32,128,512") from None
    if not lengths or any(L < 1 for L in lengths):
        raise ConfigError("--lengths", value, "comma-separated positive integers, e.g. 32,128,512")
    return lengths


def read_metrics(path: str) -> dict[str, float | None]:
    """A flat ``{name: number|null}`` JSON, or a Scorecard-like ``{metrics: {name: {value: ...}}}``."""
    from ..errors import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError("--metrics", path, "an existing JSON file")
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError("--metrics", path, f"valid JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        data = data["metrics"]
    if not isinstance(data, dict):
        raise ConfigError("--metrics", path, "a JSON object {metric: value}")
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            v = v.get("value")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"--metrics {path}: {k}", v, "a number or null")
        out[str(k)] = None if v is None else float(v)
    return out


def resolve_teacher(spec: str) -> str:
    """A model spec as is; a profile artifact (MANIFEST kind 'profile') -> the model folder it was built from,
    after checking that folder still has the fingerprint the profile recorded."""
    from ..errors import InputError
    from ..io import read_manifest
    from ..models.load import fingerprint_folder

    p = Path(spec)
    if not (p / "MANIFEST.json").is_file() or read_manifest(p).get("kind") != "profile":
        return spec
    meta = read_manifest(p).get("meta", {})
    model = meta.get("path")
    if not model or not Path(model).is_dir():
        raise InputError(f"{spec}: teacher profile records no existing model folder (meta.path={model!r})")
    if meta.get("fingerprint") and fingerprint_folder(model) != meta["fingerprint"]:
        raise InputError(f"{spec}: the model at {model} changed since this profile was built (fingerprint)")
    return model


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..errors import ConfigError
    from ..gates import GateContext, collect_metrics, evaluate_gates, load_gate_spec, load_providers
    from ..io import atomic_write_json
    from ..models.load import resolve_model_path

    # ---- validate everything before any compute
    spec = load_gate_spec(args.spec)
    if args.on_missing:
        spec = spec.model_copy(update={"on_missing": args.on_missing})
    lengths = parse_lengths(args.lengths)
    for name in ("ppl_tokens", "repeats", "context_len", "volatility_requests", "threads"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--warmup", args.warmup, allow_zero=True)
    _positive("--leak-seconds", args.leak_seconds, allow_zero=True)
    if args.ppl_text and not Path(args.ppl_text).is_file():
        raise ConfigError("--ppl-text", args.ppl_text, "an existing UTF-8 text file")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise ConfigError("--data-dir", args.data_dir, "an existing folder (wnut17/, ud_english_ewt/, blimp/)")
    if args.json and not Path(args.json).parent.is_dir():
        raise ConfigError("--json", args.json, "a path in an existing folder")
    business = None
    if args.traffic_log:  # read and validated whole before anything loads
        from ..business.window import evaluate_window
        from ..traffic.events import read_events

        _positive("--window-days", args.window_days)
        business = evaluate_window(read_events(args.traffic_log, args.traffic_provenance),
                                   window_days=args.window_days, seed=args.seed)
    breaker_report = None
    if args.breaker_report:
        from ..ops.gate import read_report

        breaker_report = read_report(args.breaker_report)
    verdicts = None
    _positive("--explain-prompts", args.explain_prompts)
    if args.explanation_verdicts:
        from ..ops.explain_review import read_verdicts

        verdicts = read_verdicts(args.explanation_verdicts)
    from ..ops import recovery, soak, teachers

    rollback_report = recovery.read_report(args.rollback_report) if args.rollback_report else None
    soak_report = soak.read_report(args.soak_report) if args.soak_report else None
    teacher_compat = teachers.read_report(args.teacher_compat_report) if args.teacher_compat_report else None
    if args.teacher_registry:
        if not Path(args.teacher_registry).is_file():
            raise ConfigError("--teacher-registry", args.teacher_registry, "an existing registry JSON")
        teachers.load_registry(args.teacher_registry)
    given: dict[str, float | None] = {}
    for f in args.metrics:
        given.update(read_metrics(f))
    skip = {m.strip() for s in args.skip for m in s.split(",") if m.strip()}
    known = {g.metric for g in spec.gates}
    if skip - known:
        raise ConfigError("--skip", sorted(skip - known), f"metrics of the spec: {sorted(known)}")
    if args.skip_perf:
        skip |= set(PERF_METRICS)
    teacher_spec = resolve_teacher(args.teacher)
    student_path, teacher_path = resolve_model_path(args.student), resolve_model_path(teacher_spec)
    from ..models.check import check_weight_folder

    for p in (student_path, teacher_path):  # a broken weight file is a usage error (2), not a failed gate (1)
        if Path(p).is_dir():
            check_weight_folder(p)

    # ---- measure (models load lazily: nothing loads when --metrics covers every gate)
    problems = load_providers()
    ctx = GateContext(student_spec=args.student, teacher_spec=teacher_spec, dtype=args.dtype, options={
        "ppl_text": args.ppl_text, "ppl_tokens": args.ppl_tokens, "lengths": lengths, "repeats": args.repeats,
        "warmup": args.warmup, "context_len": args.context_len, "volatility_requests": args.volatility_requests,
        "leak_seconds": args.leak_seconds, "threads": args.threads, "seed": args.seed, "data_dir": args.data_dir,
        "inheritance_groups": args.inheritance_groups, "path_instructions": args.path_instructions,
        "trust_remote_code": args.trust_remote_code, "business": business,
        "breaker_report": breaker_report, "explanation_verdicts": verdicts, "explain_prompts": args.explain_prompts,
        "rollback_report": rollback_report, "soak_report": soak_report,
        "leak_through_gateway": args.leak_through_gateway, "teacher_registry": args.teacher_registry,
        "teacher_compat": teacher_compat})
    from ..perf import torch_threads

    with torch_threads(args.threads):  # every measurement (perplexity too) runs on the same thread count
        metrics, notes = collect_metrics(spec, ctx, given, skip)
    details = {"measurements": ctx.details, "provider_modules": problems, "student": student_path,
               "teacher": teacher_path, "metrics_files": args.metrics, "skipped": sorted(skip),
               "sources": {m: ("--metrics" if m in given else "measured") for m, v in metrics.items() if v is not None}}
    provenance = {m: d["provenance"] for m, d in ctx.details.items() if isinstance(d, dict) and d.get("provenance")}
    sizes = {m: d["size"] for m, d in ctx.details.items() if isinstance(d, dict) and d.get("size")}
    report = evaluate_gates(spec, metrics, notes, details, provenance=provenance, sizes=sizes)

    # ---- print and save
    console = Console()
    _print_perf(console, ctx.details)
    console.print(report.format_table())
    if args.json:
        atomic_write_json(args.json, report.to_json())
        console.print(f"report: {args.json}")
    ok = report.all_passed and (report.converged or not args.require_converged)
    return 0 if ok else 1


def _print_perf(console, details: dict) -> None:
    perf = details.get("perf")
    if not perf:
        return
    mib = 1 << 20
    for who in ("teacher", "student"):
        t, m = perf["ttft"][who], perf["memory"][who]
        per = ", ".join(f"{L}: {v['median_ms']:.1f}" for L, v in t["per_length"].items())
        console.print(f"{who}: TTFT median {t['median_ms']:.1f} ms (by length {per}); memory "
                      f"params {m['params_bytes'] / mib:.1f} + KV {m['kv_cache_bytes'] / mib:.1f} + temporaries "
                      f"{m['activations_bytes'] / mib:.1f} = {m['total_bytes'] / mib:.1f} MiB at ctx {m['context_len']}")
