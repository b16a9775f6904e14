"""The ``prune`` stage's options (``loop.stages[i].options`` of a ``name: prune`` entry; SPEC S3): what may be cut
and how far (``keep`` ratios or a ``target`` budget), how units are scored (``importance``), and when a cut that
regressed is retried smaller. Validated at preflight, before any compute; :mod:`distillgate.stages.prune` runs
them."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Kind = Literal["heads", "mlp", "layers", "hidden", "rotary"]
KIND_NAMES: tuple[str, ...] = get_args(Kind)


class KeepRatios(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heads: float = Field(0.7, gt=0.0, le=1.0, description="share of query heads kept per layer at the end")
    mlp: float = Field(0.7, gt=0.0, le=1.0, description="share of MLP units kept per layer at the end")
    layers: float = Field(1.0, gt=0.0, le=1.0, description="share of decoder blocks kept at the end")
    hidden: float = Field(1.0, gt=0.0, le=1.0, description="share of hidden channels kept at the end")
    rotary: float = Field(1.0, gt=0.0, le=1.0, description="share of rotary pairs (head_dim / 2) kept")


class PruneTarget(BaseModel):
    """A budget instead of ratios: one uniform keep ratio for every enabled kind is found by bisection."""

    model_config = ConfigDict(extra="forbid")
    params: int | None = Field(None, ge=1, description="parameter count to reach")
    flops_per_token: float | None = Field(None, gt=0, description="analytic forward FLOPs/token to reach (at "
                                                                  "loop.perf_lengths' longest context)")
    ttft_ratio: float | None = Field(None, gt=0, le=1.0, description="TTFT student/teacher to reach, planned "
                                     "through FLOPs (TTFT taken as proportional to FLOPs; the gate measures it)")

    @model_validator(mode="after")
    def _one(self):
        if sum(v is not None for v in (self.params, self.flops_per_token, self.ttft_ratio)) > 1:
            raise ValueError("give at most one of params, flops_per_token, ttft_ratio")
        return self


class ImportanceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["gradient", "fisher", "taylor", "obd", "taylor_trace", "learned", "activation", "magnitude",
                    "random"] = Field(
        "taylor_trace", description="gradient: accumulated |dL/dg| per calibration row; fisher: sum of (dL/dg)^2 per row; "
                                "taylor: sum_t |a.dL/da|; obd: the gate's Fisher on the model's own output "
                                "(Optimal Brain Damage, no teacher needed); taylor_trace: "
                                "taylor (sum_t |a.dL/da|) accumulated over the first trace_steps steps of this "
                                "iteration's re-distillation (its objective, data and order) with every unit kept, "
                                "the weights then restored (Molchanov et al. 2017); learned: unit gates trained (weights frozen) on the "
                                "loss plus a per-unit penalty, score = mean gate along the path; "
                                "activation: Minitron mean activation magnitude; magnitude: weight norms; random")
    source: Literal["student", "teacher"] = Field("student", description="score the student, or the teacher's "
                                                  "corresponding units through the layer/unit maps")
    calib_tokens: int = Field(1024, ge=256, description="calibration tokens (teacher answers, rows of 256)")
    trace_steps: int = Field(8, ge=1, description="taylor_trace: re-distillation steps the score accumulates "
                             "over (at most the iteration's steps)")


class PruneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kinds: list[Kind] = Field(["heads", "mlp"], description="what may be cut")
    keep: KeepRatios = Field(default_factory=KeepRatios)
    target: PruneTarget = Field(default_factory=PruneTarget)
    cycles: int = Field(3, ge=1, description="cuts to reach the target (each iteration of the stage cuts once "
                                             "until then, later iterations only re-distil)")
    gqa: Literal["per_group", "whole_groups"] = Field("per_group", description="per_group: every KV group keeps "
                                                      "the same number of query heads; whole_groups: drop KV groups")
    importance: ImportanceOptions = Field(default_factory=ImportanceOptions)
    steps: int | None = Field(None, ge=1, description="re-distillation steps per iteration (default: the "
                                                      "recipe's train.steps)")
    fade_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of the re-distillation steps over "
                                 "which dropped units' gates anneal 1 -> 0 (0: removed at once)")
    fold_in: bool = Field(True, description="least-squares refit of the kept units' output projections, kept "
                                            "only when it lowers KL on held-out calibration rows")
    tolerance: float = Field(0.15, ge=0.0, description="relative worsening of held-out metrics a cut may cost "
                             "after re-distillation before it counts as a regression")
    retry_on: list[str] = Field(["kl", "top1_agreement", "ppl_ratio", "student_ppl_heldout"],
                                description="the quality metrics whose regression past the tolerance makes the "
                                            "cut retry smaller (timing metrics are noise for this decision); "
                                            "each one the metric registry marks as a regression signal")
    retry_factor: float = Field(0.5, gt=0.0, lt=1.0, description="a regressed cut is retried this much smaller")
    max_retries: int = Field(2, ge=0, description="retries of one cut before it is skipped")

    @field_validator("retry_on")
    @classmethod
    def _regression_metrics(cls, v: list[str]) -> list[str]:
        # only a metric the registry marks as a regression signal ever gets a regression finding: any other name
        # here would never retry a cut (reverse_kl was in the default list and never did)
        from ..evaluate.providers import METRICS, load_providers

        load_providers()
        allowed = sorted(n for n, m in METRICS.items() if m.regression)
        bad = [n for n in v if n not in allowed]
        if bad:
            raise ValueError(f"{bad} never get a regression finding; allowed: {allowed}")
        return v

    @model_validator(mode="after")
    def _teacher_source_kinds(self):
        if self.importance.source == "teacher" and self.importance.method == "taylor_trace":
            raise ValueError("importance.method 'taylor_trace' accumulates along the student's re-distillation: "
                             "it needs source 'student'")
        if self.importance.source == "teacher" and set(self.kinds) - {"heads", "mlp", "layers"}:
            raise ValueError("importance.source 'teacher' maps the teacher's heads, MLP units and layers onto the "
                             f"student; kinds {sorted(set(self.kinds) - {'heads', 'mlp', 'layers'})} need "
                             "source 'student'")
        return self
