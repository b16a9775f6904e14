"""`distillgate models import|info|derive`: import a GGUF, describe a model, derive a student from a teacher."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LAYER_SELECTIONS = ("greedy_fast", "greedy_ppl", "block_influence", "uniform")  # mirrors models.derive (no import)
MLP_SELECTIONS = ("activation", "magnitude")


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="import, inspect and derive models",
                              description="Import a GGUF, describe a model, or derive a smaller student.")
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    imp = sub.add_parser("import", help="de-quantize a GGUF into a safetensors model folder")
    imp.add_argument("gguf", help="path to a .gguf file")
    imp.add_argument("--out", default=None, help="output folder (default: the model cache)")
    imp.add_argument("--overwrite", action="store_true", help="re-import even if the folder exists")
    imp.set_defaults(func=run_import)

    info = sub.add_parser("info", help="architecture, sizes and parameter counts of a model")
    info.add_argument("model", help="'default', a model folder, a .gguf file, or a hub id")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--dtype", default="float32")
    info.add_argument("--trust-remote-code", action="store_true")
    info.set_defaults(func=run_info)

    der = sub.add_parser("derive", help="derive a smaller student (drop blocks, shrink MLP) from a teacher")
    der.add_argument("--teacher", default="default", help="'default', a model folder, a .gguf file, or a hub id")
    der.add_argument("--num-layers", type=int, default=None, help="decoder blocks to keep (default: all)")
    der.add_argument("--keep-layers", default=None, help="explicit teacher block indices, e.g. 0,2,4 (overrides "
                     "--selection)")
    der.add_argument("--mlp-width", type=int, default=None, help="MLP units per block (default: teacher's)")
    der.add_argument("--selection", default="greedy_fast", choices=LAYER_SELECTIONS)
    der.add_argument("--mlp-selection", default="activation", choices=MLP_SELECTIONS)
    der.add_argument("--greedy-candidates", type=int, default=8, help="greedy re-tries per step, at most (0: all)")
    der.add_argument("--calib-file", default=None, help="UTF-8 text file of calibration text")
    der.add_argument("--calib-tokens", type=int, default=2048)
    der.add_argument("--calib-seq-len", type=int, default=512)
    der.add_argument("--dtype", default="float32")
    der.add_argument("--out", required=True, help="output model folder (must not exist unless --overwrite)")
    der.add_argument("--overwrite", action="store_true")
    der.add_argument("--json", action="store_true", help="print the derivation report as JSON")
    der.set_defaults(func=run_derive)


def run_import(args: argparse.Namespace) -> int:
    from ..models import import_gguf

    print(import_gguf(args.gguf, out_dir=args.out, overwrite=args.overwrite))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..models import load_model
    from ..models.info import format_info, model_info

    lm = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    info = {"path": lm.path, "fingerprint": lm.fingerprint[:16], **model_info(lm.model, lm.tokenizer)}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        Console().print(format_info(info, title=args.model))
    return 0


def _parse_keep(value: str | None) -> list[int] | None:
    from ..errors import ConfigError

    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ConfigError("--keep-layers", value, "comma-separated integers, e.g. 0,2,4") from None


def _validate_derive(args: argparse.Namespace) -> None:
    from ..errors import ConfigError, InputError

    if args.calib_file is not None and not Path(args.calib_file).is_file():
        raise InputError(f"--calib-file {args.calib_file}: file not found")
    needs = (args.num_layers is not None and args.keep_layers is None and args.selection != "uniform") or (
        args.mlp_width is not None and args.mlp_selection == "activation")
    if needs and args.calib_file is None:
        raise ConfigError("--calib-file", None, f"a text file (required by --selection {args.selection} / "
                          f"--mlp-selection {args.mlp_selection})")
    if Path(args.out).exists() and not args.overwrite:
        raise ConfigError("--out", args.out, "a folder that does not exist yet (or pass --overwrite)")
    if args.greedy_candidates < 0:
        raise ConfigError("--greedy-candidates", args.greedy_candidates, "0 (all) or a positive integer")


def run_derive(args: argparse.Namespace) -> int:
    _validate_derive(args)
    from rich.console import Console

    from ..errors import ConfigError
    from ..models import load_model, save_model
    from ..models.derive import calib_ids_from_text, check_not_larger, derive_student, layer_map

    keep = _parse_keep(args.keep_layers)
    lm = load_model(args.teacher, dtype=args.dtype)
    cfg = lm.model.config
    if (keep is None and args.num_layers in (None, cfg.num_hidden_layers)
            and args.mlp_width in (None, cfg.intermediate_size)):
        raise ConfigError("--num-layers/--mlp-width", (args.num_layers, args.mlp_width),
                          f"fewer than the teacher's {cfg.num_hidden_layers} layers or "
                          f"{cfg.intermediate_size} MLP units (the student must be smaller)")
    ids = None
    if args.calib_file is not None:
        text = Path(args.calib_file).read_text(encoding="utf-8")
        ids = calib_ids_from_text(lm.tokenizer, text, args.calib_tokens, args.calib_seq_len)
    student, rep = derive_student(lm.model, lm.tokenizer, ids, num_layers=args.num_layers, mlp_width=args.mlp_width,
                                  layer_selection=args.selection, keep_layers=keep, mlp_selection=args.mlp_selection,
                                  greedy_candidates=args.greedy_candidates or None)
    check_not_larger(lm.model, student)
    meta = {"derived_from": {"teacher": args.teacher, "teacher_path": lm.path, "teacher_fingerprint": lm.fingerprint},
            "layer_map": layer_map(rep), "derivation": rep.to_dict()}
    out = save_model(student, lm.tokenizer, args.out, meta=meta, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"out": str(out), **{k: v for k, v in rep.to_dict().items() if k != "mlp_units_kept"}},
                         indent=2))
        return 0
    Console().print(_report_table(rep, str(out)))
    return 0


def _report_table(rep, out: str):
    from rich.table import Table

    t = Table(title=f"derived student -> {out}", show_header=False)
    t.add_column("field")
    t.add_column("value")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    used = "" if rep.selection_used == rep.selection else f" (used {rep.selection_used})"
    t.add_row("selection", rep.selection + used)
    t.add_row("kept layers", f"{len(rep.kept_layers)}/{rep.teacher_layers}: {rep.kept_layers}")
    t.add_row("dropped layers", str(rep.dropped_layers))
    how = f" ({rep.mlp_selection})" if rep.mlp_selection else ""
    t.add_row("mlp width", f"{rep.mlp_width}/{rep.teacher_mlp_width}{how}")
    for who, c in (("teacher", rep.params_teacher), ("student", rep.params_student)):
        t.add_row(f"params {who}", f"{c['total']:,} (embedding {c['embedding']:,}, body {c['body']:,}"
                  + (f", lm_head {c['lm_head']:,}" if c["lm_head"] else "") + ")")
    t.add_row("student/teacher params", f"{rep.params_student['total'] / rep.params_teacher['total']:.3f}")
    t.add_row("calibration PPL teacher", fmt(rep.teacher_ppl))
    t.add_row("calibration PPL student", fmt(rep.student_ppl))
    for k, v in rep.selection_ppl.items():
        t.add_row(f"  PPL of {k} pick", fmt(v))
    t.add_row("calibration tokens", str(rep.calib_tokens))
    t.add_row("seconds", ", ".join(f"{k} {v:.1f}" for k, v in rep.seconds.items()))
    return t
