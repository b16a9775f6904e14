"""`distillgate distill`: one distillation pass (SPEC L1 extract + map, with a validation around it).

Reads top to bottom: preflight (no compute, no output folder on a bad config) -> teacher -> extract (teacher
answers, cached) -> student (derived by importance) -> teacher targets (cached top-k or online) -> map
(training) -> validate (held-out KL / top-1 / perplexities, before and after) -> save (plain HF folder).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import DistillConfig
from ..errors import ConfigError
from ..io import atomic_write_json
from ..pipeline import (build_student, calibration_ids, channel_provider, channel_setup, extract, load_teacher,
                        make_objective, map_student, preflight, teacher_provider, validate)


@dataclass
class DistillResult:
    student_dir: Path
    summary: dict


def distill(cfg: DistillConfig, *, progress: bool | None = None, resume: bool = False) -> DistillResult:
    t0 = time.time()
    # 1. setup: every cheap check first; nothing is written before it passes.
    pre = preflight(cfg)
    out = Path(cfg.output_dir)
    if (out / "student").exists() and not resume:
        raise ConfigError("output_dir", cfg.output_dir, "a folder without a previous student (choose another "
                                                        "output_dir, delete it, or pass --resume)")
    teacher = load_teacher(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", cfg.model_dump())

    # 2. extract: teacher answers (reused when nothing changed), split by prompt.
    prompts = pre.prompts or __import__("distillgate.data.prompts", fromlist=["x"]).prompts_from_spec(cfg.data)
    dataset = extract(teacher, prompts, cfg.data, progress=progress is not False)
    train_ex, held = dataset.examples("train"), dataset.examples("heldout")
    if not held:
        raise ConfigError("data.heldout_fraction", cfg.data.heldout_fraction, "a share that holds out at least "
                                                                              "one prompt (or more prompts)")

    # 3. student: derived from the teacher by measured importance (or loaded / built from a config).
    calib = calibration_ids(cfg, teacher.tokenizer, train_ex) if cfg.student.init == "derive" else None
    student, sinfo = build_student(cfg, teacher, calib)
    teacher_side: dict = {}  # the teacher's held-out log-probs and text perplexity, measured once
    before = validate(student, teacher, held, cfg, teacher_cache=teacher_side)

    # 4. map: train on the teacher's targets (and, with attn / feature on, their key heads and block features;
    #    the feature adapters are part of the student only while it trains).
    provider = teacher_provider(cfg, teacher, train_ex, progress=progress is not False)
    side = channel_setup(cfg, teacher, student, sinfo.get("layer_map"), train_ex)
    provider = channel_provider(side, cfg, teacher, provider, [train_ex])
    objective = make_objective(cfg, provider, vocab_size=len(teacher.tokenizer), examples=train_ex,
                               tokenizer=teacher.tokenizer, prompts=prompts, side=side)
    resume_from = out / "train" if resume and (out / "train" / "checkpoints").exists() else None
    if side is not None:
        side.attach(student)
    try:
        result = map_student(student, objective, dataset, cfg.train, out / "train", seed=cfg.train.seed,
                             resume_from=resume_from, progress=progress,
                             callbacks=() if side is None else (side.on_step,))
    finally:
        if side is not None:
            side.detach()

    # 5. validate and save.
    after = validate(student, teacher, held, cfg, teacher_cache=teacher_side)
    from ..models import save_model
    from ..models.info import model_info

    meta = {"teacher": cfg.teacher.path, "teacher_fingerprint": teacher.fingerprint, "student": sinfo,
            "layer_map": sinfo.get("layer_map"), "metrics": after.metrics}
    student.eval()
    student_dir = save_model(student, teacher.tokenizer, out / "student", meta=meta, overwrite=True)
    summary = {
        "teacher": {"path": teacher.path, **{k: model_info(teacher.model)[k] for k in ("params_total", "layers")}},
        "student": {"path": str(student_dir), **{k: model_info(student)[k] for k in ("params_total", "layers")},
                    "init": sinfo},
        "data": dataset.counts(),
        "before": before.metrics, "after": after.metrics, "train": result.to_json(),
        "channels": None if side is None else side.record(),
        "seconds": round(time.time() - t0, 1),
    }
    atomic_write_json(out / "summary.json", summary)
    return DistillResult(student_dir=student_dir, summary=summary)


def summary_table(summary: dict):
    """The end-of-run table: teacher vs student (before and after training)."""
    from rich.table import Table

    b, a, tr = summary["before"], summary["after"], summary["train"]
    t = Table(title="distillgate distill: summary")
    t.add_column("metric"), t.add_column("teacher", justify="right"), t.add_column("student (init)", justify="right")
    t.add_column("student (distilled)", justify="right")
    t.add_row("parameters", f"{summary['teacher']['params_total']:,}", "",
              f"{summary['student']['params_total']:,}")
    t.add_row("layers", str(summary["teacher"]["layers"]), "", str(summary["student"]["layers"]))
    t.add_row("held-out PPL (teacher answers)", f"{a['teacher_ppl_heldout']:.3f}", f"{b['student_ppl_heldout']:.3f}",
              f"{a['student_ppl_heldout']:.3f}")
    if "teacher_ppl_text" in a:
        t.add_row("text-file PPL", f"{a['teacher_ppl_text']:.3f}", f"{b['student_ppl_text']:.3f}",
                  f"{a['student_ppl_text']:.3f}")
    t.add_row("PPL ratio (G-C1)", "1.000", f"{b['ppl_ratio']:.3f}", f"{a['ppl_ratio']:.3f}")
    t.add_row("KL(teacher||student) / token", "0", f"{b['kl']:.4f}", f"{a['kl']:.4f}")
    t.add_row("top-1 agreement", "1.000", f"{b['top1_agreement']:.3f}", f"{a['top1_agreement']:.3f}")
    t.add_row("train tokens/s (loss tokens)", "", "", f"{tr['tokens_per_s']:.1f}")
    t.add_row("train steps / skipped / precision", "", "",
              f"{tr['steps']} / {tr['skipped_steps']} / {tr.get('precision') or '?'}")
    t.add_row("peak RSS", "", "", f"{tr['peak_rss_mb']:.0f} MB")
    ch = summary.get("channels") or {}
    heads = (ch.get("plan") or {}).get("heads") or []
    if heads:
        t.add_row("attn key heads (teacher -> student)", "", "", ", ".join(
            f"L{h['teacher_layer']}.H{h['teacher_head']}->L{h['student_layer']}.H{h['student_head']}" for h in heads))
    cache = ch.get("cache") or {}
    if cache:
        extra = [f"{cache['bytes_per_position']} B/position"]
        if cache.get("attn_topk_mass") is not None:
            extra.append(f"attn top-k mass {cache['attn_topk_mass']:.3f}")
        if cache.get("feature_recon_error") is not None:
            extra.append(f"PCA error {cache['feature_recon_error']:.3f}")
        t.add_row("attn / feature teacher cache", "", "", ", ".join(extra))
    t.add_row("student saved to", "", "", summary["student"]["path"])
    return t
