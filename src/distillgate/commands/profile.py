"""`distillgate profile`: the teacher's baseline profile (SPEC S1), or a student's diff against one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="layer-wise activation statistics + benchmark scores (S1)",
                       description=__doc__)
    p.add_argument("--model", required=True, help="'default', a model folder, a .gguf file, or a hub id")
    p.add_argument("--text", help="real text to profile on (default: the built-in multi-domain prompts)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of text to use (default 1024)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--suite", default="none", help="evaluation suite whose scores join the profile "
                                                   "(none, quick, standard, or a suite YAML)")
    p.add_argument("--data-dir", help="folder of evaluation datasets for --suite")
    p.add_argument("--limit", type=int, help="cap every suite task at N documents")
    p.add_argument("--against", help="a saved profile to diff this model against (student vs teacher)")
    p.add_argument("--out", help="folder to save the profile artifact (default: print only)")
    p.add_argument("--json", dest="json_out", help="write the profile (or diff) as JSON here")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=run)


def _text_ids(tokenizer, path: str | None, tokens: int, seq_len: int):
    import torch

    from ..errors import ConfigError, InputError

    if tokens < seq_len or seq_len < 8:
        raise ConfigError("--tokens/--seq-len", (tokens, seq_len), "tokens >= seq_len >= 8")
    if path:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{path}: --text file not found")
        text = p.read_text(encoding="utf-8", errors="replace")
    else:
        from ..data.prompts import builtin_prompts

        text = "\n".join(m["content"] for r in builtin_prompts(256, None, 0) for m in r.messages)
    ids = tokenizer(text[: tokens * 12], return_tensors="pt").input_ids[0]
    n = (min(len(ids), tokens) // seq_len) * seq_len
    if n == 0:
        raise InputError(f"{path or 'built-in text'}: fewer than {seq_len} tokens")
    return ids[:n].reshape(-1, seq_len), torch.ones(n // seq_len, seq_len, dtype=torch.long)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..io import atomic_write_json
    from ..models import load_model
    from ..profile import STAT_INFO, build_profile, diff_profiles, load_profile, save_profile

    console = Console()
    against = load_profile(args.against) if args.against else None  # fail on a bad artifact before compute
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    ids, am = _text_ids(lm.tokenizer, args.text, args.tokens, args.seq_len)
    scores = {}
    if args.suite != "none":
        from ..evaluate.suite import run_suite

        card = run_suite(lm.model, lm.tokenizer, args.suite, data_dir=args.data_dir, limit=args.limit)
        scores = {k: v["value"] for k, v in card.to_dict()["metrics"].items() if v.get("value") is not None}
    meta = {"model": args.model, "path": lm.path, "fingerprint": lm.fingerprint, "text": args.text or "builtin"}
    layer_map = None
    dg = Path(lm.path) / "distillgate.json"
    if dg.is_file():
        layer_map = json.loads(dg.read_text()).get("layer_map")
        if isinstance(layer_map, dict):  # {student layer: teacher layer}, JSON keys are strings
            layer_map = [int(layer_map[k]) for k in sorted(layer_map, key=int)]
    prof = build_profile(lm.model, ids, am, meta=meta, scores=scores)
    if args.out:
        save_profile(prof, args.out, exist_ok=False)
    if against is not None:
        diff = diff_profiles(prof, against, layer_map=layer_map)
        t = Table(title=f"{args.model} vs {against.meta.get('model')} (layer map {diff['layer_map']})")
        t.add_column("statistic"), t.add_column("student (mean)"), t.add_column("teacher (mean)")
        t.add_column("mean |delta|")
        for k, v in diff["stats"].items():
            t.add_row(k, f"{sum(v['student']) / len(v['student']):.4g}",
                      f"{sum(v['teacher']) / len(v['teacher']):.4g}", f"{diff['summary'][k]:.4g}")
        for k, v in diff["summary"].items():
            if k.startswith("score/"):
                t.add_row(k, "", "", f"{v:+.4f}")
        console.print(t)
        if args.json_out:
            atomic_write_json(args.json_out, diff)
    else:
        t = Table(title=f"profile of {args.model}: {prof.meta['num_layers']} layers, {prof.meta['tokens']} tokens, "
                        f"{prof.meta['seconds']} s")
        t.add_column("statistic"), t.add_column("first"), t.add_column("middle"), t.add_column("last")
        t.add_column("meaning")
        mid = prof.num_layers // 2
        for k, v in prof.layers.items():
            t.add_row(k, f"{v[0]:.4g}", f"{v[mid]:.4g}", f"{v[-1]:.4g}", STAT_INFO[k])
        for k, v in scores.items():
            t.add_row(f"score/{k}", "", f"{v:.4f}", "", "benchmark score")
        console.print(t)
        if args.json_out:
            atomic_write_json(args.json_out, {"meta": prof.meta, "layers": prof.layers, "scores": prof.scores})
    if args.out:
        console.print(f"profile saved to {args.out}")
    return 0
