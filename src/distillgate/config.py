"""Typed, validated configuration (pydantic v2). Loaded from YAML plus ``key=value`` overrides.

Every field documents itself (``description``) and is validated before any compute: unknown keys, wrong
types and out-of-range values raise :class:`~distillgate.errors.ConfigError` naming the field, the value and
what is allowed. ``distillgate distill --help-config`` prints this reference.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, reject_unknown
from .evaluate.providers import CPU_PRESETS
from .ops.alerts import AlertOptions
from .serve.spec import ServingSpec
from .strategy import StrategySpec

DOMAINS = ("finance_risk", "medical", "legal", "education", "customer_support", "ecommerce", "travel",
           "technical_docs")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ModelSpec(_Strict):
    path: str = Field("default", description="'default' (embedded SmolLM2-135M-Instruct), a local HF folder, "
                                             "a .gguf file, or a hub id (online only)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights dtype when loaded")
    trust_remote_code: bool = Field(False, description="run model code shipped with the weights (off by default)")
    device: str = Field("cpu", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="where the teacher runs: auto (this rank's GPU when CUDA is available, "
                                           "else cpu), cpu, cuda or cuda:N")
    fit: Literal["auto", "strict"] = Field(
        "auto", description="when the teacher does not fit its device's free memory: auto keeps it in bfloat16, "
                            "then offloads it to the CPU (recorded with the reason); strict refuses")


class StudentSpec(_Strict):
    init: Literal["derive", "model", "config"] = Field(
        "derive", description="derive: cut layers/MLP units from the teacher by measured importance; "
                              "model: load `path`; config: random init from `config` (HF config dict)")
    path: str | None = Field(None, description="student model (init=model): folder, .gguf or hub id")
    config: dict[str, Any] | None = Field(None, description="HF config overrides on the teacher's config (init=config)")
    num_layers: int | None = Field(None, ge=1, description="decoder layers to keep (init=derive); default: half")
    mlp_width: int | None = Field(None, ge=1, description="MLP intermediate size to keep (init=derive); default: teacher's")
    layer_selection: Literal["greedy_fast", "greedy_ppl", "block_influence", "uniform"] = Field(
        "greedy_fast", description="how layers are chosen: greedy_fast: greedy removal by calibration NLL, "
                                   "seeded by residual-gate gradients, lazily re-evaluated, trials scored on the "
                                   "targets + the teacher's top tokens, the pick checked by exact calibration "
                                   "PPL; greedy_ppl: the older greedy that scores every trial by exact PPL "
                                   "(4x slower at the demo's setting); block influence (1-cos(in,out)); or "
                                   "every k-th layer")
    keep_layers: list[int] | None = Field(None, description="explicit teacher layer indices to keep (overrides selection)")
    mlp_selection: Literal["activation", "magnitude"] = Field(
        "activation", description="MLP unit importance: mean |act * down-proj norm| on calibration text, or weight norm")
    calib_tokens: int = Field(2048, ge=64, description="calibration tokens used to measure importance")
    calib_file: str | None = Field(None, description="text file for calibration (default: teacher-generated train text)")
    device: str = Field("cpu", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="where the student trains and is evaluated: auto (this rank's GPU when "
                                           "CUDA is available, else cpu), cpu, cuda or cuda:N")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="the student's weights dtype (training "
                                                                          "precision is train.precision)")


class DataSpec(_Strict):
    source: Literal["builtin", "jsonl", "hf"] = Field("builtin", description="prompt source")
    path: str | None = Field(None, description="JSONL file (source=jsonl): {prompt, domain} or {messages}")
    hf_name: str | None = Field(None, description="datasets name (source=hf, online)")
    hf_split: str = Field("train", description="datasets split (source=hf)")
    hf_field: str = Field("prompt", description="column holding the prompt (source=hf)")
    num_prompts: int = Field(64, ge=1, description="prompts to use (builtin generates this many)")
    domains: list[str] = Field(list(DOMAINS), description=f"business domains for builtin prompts, from {DOMAINS}")
    seed: int = Field(0, description="prompt generation and split seed")
    max_new_tokens: int = Field(96, ge=1, le=4096, description="teacher answer length cap")
    samples_per_prompt: int = Field(1, ge=1, le=16, description="sampled teacher answers per prompt (S2.4)")
    gen_temperature: float = Field(0.0, ge=0.0, description="teacher sampling temperature (0 = greedy)")
    gen_top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling p")
    gen_batch_size: int = Field(16, ge=1, description="prompts per batched generation")
    heldout_fraction: float = Field(0.125, ge=0.0, lt=1.0, description="share of prompts held out (split by prompt)")
    seq_len: int = Field(256, ge=8, description="max tokens per training sequence")
    max_prompt_tokens: int = Field(1024, ge=1, le=32768, description="longest prompt accepted, in tokens of the "
                                   "teacher's chat template; a longer one is refused at preflight (before any "
                                   "compute: a 1 MB prompt once tried to allocate 360 GB)")

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, v):
        reject_unknown(v, DOMAINS, "domain")
        if not v:
            raise ValueError(f"at least one domain from {list(DOMAINS)}")
        return v

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "jsonl" and not self.path:
            raise ValueError("data.path is required when data.source is 'jsonl'")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("data.hf_name is required when data.source is 'hf'")
        return self


class TargetSpec(_Strict):
    mode: Literal["cached", "online"] = Field("cached", description="cached: teacher top-k computed once and "
                                              "stored; online: teacher forward every step (dense)")
    top_k: int = Field(64, ge=1, description="teacher log-probs kept per token (plus the tail mass)")
    tail_samples: int = Field(16, ge=0, le=4096, description="tokens drawn per position from the teacher's "
                              "distribution outside the top k (4 bytes each): the forward-KL loss then trains "
                              "the tail's shape too (unbiased at T = 1, importance-weighted otherwise); other "
                              "divergences, and 0, treat the tail as one bucket (its mass only)")
    batch_size: int = Field(8, ge=1, description="sequences per teacher forward when computing targets")


class TemperatureSpec(_Strict):
    policy: Literal["fixed", "complexity", "entropy"] = Field(
        "fixed", description="fixed: `value`; complexity: simple prompts hotter, complex ones cooler (S2.1); "
                             "entropy: from the teacher's mean entropy on the sample")
    value: float = Field(1.0, gt=0.0, le=20.0, description="temperature (policy=fixed)")
    min: float = Field(0.7, gt=0.0, le=20.0, description="lowest temperature a dynamic policy picks")
    max: float = Field(2.0, gt=0.0, le=20.0, description="highest temperature a dynamic policy picks")

    @model_validator(mode="after")
    def _order(self):
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class CloneSpec(_Strict):
    """``loss.clone``: the response-cloning channel (S2.4, ``loss.channels.clone``)."""
    diversity_floor: float = Field(0.3, ge=0.0, le=1.0, description="weight of a token no other teacher sample "
                                   "agrees on (aligned spans shared by every sample weigh 1)")
    coherence_min: float = Field(0.3, ge=-1.0, le=1.0, description="teacher samples whose MiniLM coherence is "
                                 "under this are dropped")
    prompt_weight: float = Field(0.5, ge=0.0, le=1.0, description="share of the prompt similarity in a sample's "
                                 "coherence (the rest: mean similarity to the prompt's other samples)")
    concise_ratio: float = Field(1.5, ge=1.0, description="conciseness: the student's expected answer length may "
                                 "reach this multiple of the teacher's median before it is penalised")
    concise_weight: float = Field(1.0, ge=0.0, description="weight of the conciseness term inside the clone "
                                  "channel (0: off)")


class AttentionSpec(_Strict):
    key_heads: int = Field(3, ge=1, le=64, description="teacher heads aligned by the attn channel (S2.2: the three "
                                                        "that carry the core semantic aggregation), the top ones by "
                                                        "attention-rollout flow into the last positions on "
                                                        "calibration text")
    heads: list[tuple[int, int]] | None = Field(None, description="explicit teacher [layer, head] pairs to align "
                                                                  "(default: found by rollout)")
    calib_tokens: int = Field(1024, ge=16, description="calibration tokens (teacher answers) the key heads are "
                                                       "scored on")
    last_positions: int = Field(8, ge=1, description="the rollout's end: this many last real tokens of each "
                                                     "calibration row")
    cache_top_k: int = Field(16, ge=0, description="targets.mode=cached: keys kept per query and head in the "
                                                   "attention cache (4 bytes each; the rest is one tail bucket); "
                                                   "0: no cache (the attn channel then needs targets.mode=online)")
    norm_weight: float = Field(0.1, ge=0.0, description="weight of the output-norm term (log |head output| "
                                                        "squared difference) next to the key KL")


class FeatureSpec(_Strict):
    loss: Literal["mse", "cosine"] = Field("mse", description="alignment of each student block output with the "
                                                              "(projected) teacher block feature: MSE scaled by "
                                                              "the teacher feature's mean square, or 1 - cosine")
    inject: bool = Field(True, description="add the teacher feature through the gated adapter (off: alignment "
                                           "loss only)")
    gate_init: float = Field(0.02, gt=0.0, lt=1.0, description="initial gate sigmoid(a) (near closed)")
    anneal: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="gate multiplier 1 -> 0 within each training call (each loop iteration)")
    anneal_start: float = Field(0.0, ge=0.0, le=1.0, description="share of the steps before the gates start closing")
    anneal_end: float = Field(0.75, ge=0.0, le=1.0, description="share of the steps after which the gates are "
                                                                "closed (the rest trains the plain student)")
    cache_rank: int = Field(32, ge=0, description="targets.mode=cached: rank of the PCA basis (per teacher "
                                                  "layer, fitted on calibration data) the cached features are "
                                                  "stored in (2 bytes per layer and component); 0: no cache "
                                                  "(the feature channel then needs targets.mode=online)")
    calib_tokens: int = Field(2048, ge=16, description="calibration positions the PCA basis is fitted on")

    @model_validator(mode="after")
    def _order(self):
        if self.anneal_end < self.anneal_start:
            raise ValueError(f"anneal_end {self.anneal_end} must be >= anneal_start {self.anneal_start}")
        return self


class LossSpec(_Strict):
    divergence: Literal["forward_kl", "reverse_kl", "gjsd", "tv"] = Field(
        "forward_kl", description="token-level divergence between teacher and student distributions")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="generalized JSD interpolation (divergence=gjsd)")
    channels: dict[str, float] = Field({"kd": 1.0, "ce": 0.0},
                                       description="channel -> weight; kd: divergence, ce: cross-entropy on the "
                                                   "teacher's tokens, attn: key-head attention alignment "
                                                   "(S2.2, loss.attention), feature: gated intermediate "
                                                   "adapters (S2.3, loss.feature)")
    temperature: TemperatureSpec = Field(default_factory=TemperatureSpec)
    domain_weights: dict[str, float] = Field(default_factory=dict, description="domain -> loss weight (default 1)")
    domain_channel_shares: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="S2.5 level 1: {domain: {channel: share}} scales each channel's loss "
                                          "on that domain's samples (default 1; the strategy may move them)")
    difficulty_weighting: bool = Field(False, description="down-weight tokens where the teacher is unsure (S2.5.2)")
    difficulty_floor: float = Field(0.5, ge=0.0, le=1.0, description="lowest difficulty weight")
    chunk_size: int = Field(256, ge=16, description="tokens per chunk of the fused lm-head + loss (256: 0.40x the "
                                                     "unfused peak memory at SmolLM2 size, bench/fused_loss.py)")
    t2_scale: bool = Field(True, description="multiply token-level divergences by T^2 (Hinton), so gradients keep "
                                             "their scale across temperatures")
    clone: CloneSpec = Field(default_factory=CloneSpec)
    attention: AttentionSpec = Field(default_factory=AttentionSpec)
    feature: FeatureSpec = Field(default_factory=FeatureSpec)

    @field_validator("channels")
    @classmethod
    def _channels(cls, v):
        for k, w in v.items():
            if w < 0:
                raise ValueError(f"channel {k!r} weight {w} must be >= 0")
        if not v or sum(v.values()) <= 0:
            raise ValueError("at least one channel needs a positive weight")
        return v

    @field_validator("domain_channel_shares")
    @classmethod
    def _dcs(cls, v):
        reject_unknown(v, DOMAINS, "domain")
        for d, per in v.items():
            for ch, w in per.items():
                if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                    raise ValueError(f"share of channel {ch!r} in domain {d!r} must be a finite number >= 0, got {w}")
        return v

    @field_validator("domain_weights")
    @classmethod
    def _dw(cls, v):
        bad = [d for d in v if d not in DOMAINS]
        if bad:
            raise ValueError(f"unknown domain(s) {bad}; allowed: {list(DOMAINS)}")
        if any(w < 0 for w in v.values()):
            raise ValueError("domain weights must be >= 0")
        return v


class TrainSpec(_Strict):
    steps: int = Field(40, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(3e-4, gt=0.0, le=1.0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_steps: int = Field(4, ge=0, description="linear warmup steps, then cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr as a fraction of the peak")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping norm")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where the hardware has native bf16 (CUDA, or a CPU with AVX512-BF16 "
                            "/ AMX), else fp32 -- on a CPU without them bf16 matmuls are ~3.5x slower than fp32; "
                            "fp16 is not offered (unstable on CPU)")
    seed: int = Field(0, description="training seed (init, shuffling)")
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint every N steps (0: only at end)")
    log_every: int = Field(1, ge=1, description="metrics JSONL every N steps")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    compile: Literal["off", "auto", "on"] = Field(
        "off", description="compile the student's decoder layers with torch.compile (inductor; RMSNorm, rotary, "
                           "SiLU*up fused around the matmuls; the lm-head loss stays eager). on: always (needs a C++ "
                           "compiler on a CPU, triton on CUDA); auto: on CUDA, and on a CPU for runs of >= 64 steps "
                           "(a cold compile costs ~1.5 min there); kernels are cached under "
                           "$DISTILLGATE_HOME/compile and reused by later runs and iterations; compile seconds are "
                           "reported apart from step seconds. With an online teacher (targets.mode: online, kd/ce) "
                           "its decoder layers compile too, as an inference graph, whenever the student's do")
    fsdp: bool = Field(False, description="under torchrun: shard parameters, gradients and AdamW state over the "
                                          "ranks (FSDP2 fully_shard per decoder layer) instead of replicating them; "
                                          "same updates, same checkpoints")
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        ["tensorboard"], description="trackers that get the metrics, like the HF Trainer's list ([] for none): "
                                     "tensorboard (scalars under <run>/tensorboard, or <output_dir>/train/tb for "
                                     "`distill`; skipped with a note when it is not installed), mlflow (one MLflow "
                                     "run per distillgate run: metrics, gates, report, registered-model aliases; "
                                     "needs `pip install 'distillgate[mlflow]'`)")
    mlflow: "MlflowSpec" = Field(default_factory=lambda: MlflowSpec(), description="MLflow settings "
                                                                                   "(report_to: [mlflow])")

    @field_validator("report_to")
    @classmethod
    def _report_to(cls, v):
        v = list(dict.fromkeys(v))
        if "mlflow" in v:
            import importlib.util

            if importlib.util.find_spec("mlflow") is None:
                raise ValueError("'mlflow' needs the MLflow client, which is not installed: pip install "
                                 "'distillgate[mlflow]' (or remove mlflow from train.report_to)")
        return v


class MlflowSpec(_Strict):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite:///<run dir>/mlflow.db "
                                                       "for a run, <output_dir>/train/mlflow.db for `distill`: "
                                                       "no server)")
    experiment: str = Field("distillgate", min_length=1, description="MLflow experiment name")
    registered_model: str | None = Field(None, description="registered model whose aliases mirror the run's "
                                                           "current/best/stable (default: distillgate-<run id>)")


TrainSpec.model_rebuild()


class EvalSpec(_Strict):
    text_file: str | None = Field(None, description="plain text file for perplexity (e.g. wikitext2 valid.txt)")
    max_tokens: int = Field(4096, ge=16, description="tokens of text_file / held-out text to evaluate")


class DistillConfig(_Strict):
    teacher: ModelSpec = Field(default_factory=ModelSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    targets: TargetSpec = Field(default_factory=TargetSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    output_dir: str = Field("outputs/distill", description="where the student, metrics and checkpoints go")

    @model_validator(mode="after")
    def _cross(self):
        if self.student.init == "model" and not self.student.path:
            raise ValueError("student.path is required when student.init is 'model'")
        if self.targets.mode == "cached" and self.loss.temperature.policy == "entropy" and self.targets.top_k < 2:
            raise ValueError("temperature policy 'entropy' needs targets.top_k >= 2")
        return self


# ---------------------------------------------------------------------------------------------- loading

MAX_YAML_ALIASES = 32  # a config needs a few anchors at most; a ~1 KB alias bomb expands to billions of nodes


class _GuardedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys (last-wins silently drops a setting) and more
    than :data:`MAX_YAML_ALIASES` alias references (a "billion laughs" document: each alias is cheap to parse
    but the config's validation and JSON dump expand the shared tree; one took 67 s and all memory)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"more than {MAX_YAML_ALIASES} alias references (*name): refused (alias bomb?)", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def safe_yaml(text: str, where: str):
    """Parse YAML text with :class:`_GuardedLoader`; :class:`ConfigError` naming ``where`` on any problem."""
    try:
        return yaml.load(text, Loader=_GuardedLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(where, text[:80] if len(text) < 80 else f"{text[:60]}...", f"valid YAML ({e})"
                          .replace("\n", " ")) from None
    except RecursionError:
        raise ConfigError(where, f"{text[:60]}...", "YAML nested less deeply") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(item, item, "overrides of the form key.sub=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), safe_yaml(raw, key.strip()) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for k in path[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(path), value, f"{k} is not a section")
        node[path[-1]] = value
    return data


def _validation_to_config_error(e: ValidationError, data: dict) -> ConfigError:
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "<config>"
    value = err.get("input")
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check spelling; see `distillgate distill --help-config`)"
    elif err["type"] == "literal_error":
        msg = msg.replace("Input should be", "one of")
    else:
        msg = msg.replace("Input should be ", "").replace("Value error, ", "")
    return ConfigError(field, value, msg + (f"  [+{len(e.errors()) - 1} more]" if len(e.errors()) > 1 else ""))


def load_yaml(path: str | os.PathLike | None) -> dict:
    if path is None:
        return {}
    from .errors import InputError
    from .io import MAX_CONFIG_BYTES, read_text_utf8

    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", str(path), "an existing YAML file")
    try:
        text = read_text_utf8(p, max_bytes=MAX_CONFIG_BYTES)
    except InputError as e:
        raise ConfigError("--config", str(path), f"a UTF-8 YAML file of at most {MAX_CONFIG_BYTES >> 10} KB "
                                                 f"({e})") from None
    try:
        data = safe_yaml(text, "--config") or {}
    except ConfigError as e:
        raise ConfigError("--config", str(path), e.allowed) from None
    if not isinstance(data, dict):
        raise ConfigError("--config", str(path), "a YAML mapping at the top level")
    return data


def parse_config(model_cls: type[BaseModel], data: dict):
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise _validation_to_config_error(e, data) from None


def load_config(model_cls: type[BaseModel], path: str | os.PathLike | None, overrides: list[str] = ()):
    """YAML file + ``a.b=c`` overrides -> validated config; raises ConfigError before any work."""
    return parse_config(model_cls, apply_overrides(load_yaml(path), list(overrides)))


def config_reference(model_cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) rows for docs and ``--help-config``."""
    rows = []
    for name, f in model_cls.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += config_reference(ann, f"{prefix}{name}.")
            continue
        default = f.default_factory() if f.default_factory is not None else f.default
        import typing

        if typing.get_origin(ann) is Literal:
            tname = " | ".join(repr(a) for a in typing.get_args(ann))
        else:
            tname = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        rows.append((prefix + name, tname, repr(default), f.description or ""))
    return rows


# ---------------------------------------------------------------------------------------------- the loop



class StageSpec(_Strict):
    name: str = Field(..., description="stage plug-in name: anchor (S1), joint (S2), or any stage registered "
                                         "with distillgate.stages.register_stage or the `distillgate.stages` "
                                         "entry-point group")
    iterations: int = Field(1, ge=0, description="iterations this stage runs for (0: it takes part in the setup "
                                                 "iteration 0 only, as anchor does)")
    options: dict[str, Any] = Field(default_factory=dict, description="the stage's own options, validated by "
                                                                      "its Options model at preflight")


class LoopSpec(_Strict):
    stages: list[StageSpec] = Field(
        default_factory=lambda: [StageSpec(name="anchor", iterations=0), StageSpec(name="joint", iterations=4)],
        description="the run's stages in order; each contributes to the phases of its iterations")
    budget_minutes: float = Field(60.0, gt=0, description="wall-clock budget; the run stops after the "
                                                          "iteration that crosses it (but see min_iterations)")
    min_iterations: int = Field(2, ge=0, description="iterations after the setup iteration 0 that always run, "
                                                     "even when the setup (teacher import, answer generation, "
                                                     "derivation) spent the budget: the budget is checked only "
                                                     "from iteration min_iterations on, so a run may overrun "
                                                     "budget_minutes by up to that many iterations; 0: the "
                                                     "budget may stop the run right after iteration 0")
    converge_after: int = Field(2, ge=1, description="converged when all gates pass this many consecutive "
                                                     "evaluations")
    prompts_per_iteration: int = Field(48, ge=1, description="new teacher prompts extracted each iteration "
                                                             "(mixed by the recipe's domain shares)")
    heldout_prompts: int = Field(24, ge=1, description="fixed held-out prompts (extracted once, never trained on)")
    regression_threshold: float = Field(0.02, ge=0.0, description="relative worsening that counts as a "
                                                                  "regression (L2)")
    strategy: StrategySpec = Field(default_factory=StrategySpec,
                                   description="the compensate phase's rules and every number they use")
    gates_spec: str | None = Field(None, description="gate spec YAML (default: the shipped SPEC thresholds)")
    perf_every_structure_change: bool = Field(True, description="measure TTFT/memory when the student's "
                                                                "structure changes (else every iteration)")
    perf_lengths: list[int] = Field([32, 128, 512], description="prompt lengths for the TTFT measurement (G-P1)")
    perf_repeats: int = Field(3, ge=1, description="TTFT repeats per length and model (median and P99 reported)")
    capability_checks: list[Literal["probes", "inheritance", "decision_path", "volatility"]] = Field(
        default_factory=list, description="slower G-C2/G-C3/G-C4 checks to run in validate, and G-P2 "
                                          "(volatility: measured with G-P1/G-P3); sizes: the CPU presets")
    inheritance_groups: int = Field(CPU_PRESETS["inheritance_groups"], ge=8,
                                    description="G-C3 paired groups per check (SPEC: 300)")
    path_instructions: int = Field(CPU_PRESETS["path_instructions"], ge=3,
                                   description="G-C4 instructions per check (SPEC: 5,000)")
    data_dir: str | None = Field(None, description="evaluation datasets folder for the G-C2 probes "
                                                   "(e.g. ../shared/datasets)")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="the gateway: `distillgate serve` "
                                 "and G-P2 through it (L4, issue 11)")
    alerts: AlertOptions = Field(default_factory=AlertOptions, description="D2: every commit records the "
                                 "dimension scores (wall clock); a dimension failing this long raises a work order")

    @field_validator("stages")
    @classmethod
    def _stages(cls, v):
        from .stages import available_stages  # the registry: a new stage registers there, the core stays

        stages = available_stages()
        bad = [s.name for s in v if s.name not in stages]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; registered: {sorted(stages)}")
        if not any(s.iterations > 0 for s in v):
            raise ValueError("at least one stage needs iterations >= 1")
        return v


class RetentionSpec(_Strict):
    keep_last: int | None = Field(None, description="versions to keep, newest first (None: keep every version; "
                                                     "1 is refused: it leaves nothing to roll back to)")
    keep_aliases: bool = Field(True, description="keep every version an alias points to (best, stable, ...); "
                                                 "False keeps only current and the last three stable ones (G-O5) "
                                                 "and drops the other aliases of pruned versions")
    keep_referenced: bool = Field(True, description="keep every version whose gates all passed and every version "
                                                    "a kept rollback restored")
    auto_gc: bool = Field(False, description="apply the policy after every committed iteration (needs keep_last)")

    @field_validator("keep_last")
    @classmethod
    def _keep_last(cls, v):
        if v is not None and v < 2:
            raise ValueError(f"keep_last={v} is refused: it would keep only the newest version, leaving nothing to "
                             f"roll back to; use 2 or more (or leave it unset to keep every version)")
        return v

    @model_validator(mode="after")
    def _auto_needs_keep(self):
        if self.auto_gc and self.keep_last is None:
            raise ValueError("auto_gc: true needs keep_last (how many versions to keep)")
        return self


class StoreSpec(_Strict):
    retention: RetentionSpec = Field(default_factory=RetentionSpec, description="which versions `distillgate "
                                                                                "runs gc` (or auto_gc) keeps")


class DistributedSpec(_Strict):
    """Used only under torchrun (``torchrun --nproc-per-node N -m distillgate run ...``)."""

    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="process-group backend; auto: NCCL when "
                                                                        "CUDA is available, else gloo")
    timeout_s: float = Field(1800.0, gt=0.0, description="longest wait of any collective: a rank that died makes "
                                                         "the others fail after at most this long (rank 0 "
                                                         "validates alone while the others wait, so it must exceed "
                                                         "one validate phase)")


class RunConfig(DistillConfig):
    loop: LoopSpec = Field(default_factory=LoopSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    store_root: str = Field("runs", description="run store folder (SQLite catalog + artifacts)")
    store: StoreSpec = Field(default_factory=StoreSpec, description="run store policies (retention)")
    run_id: str | None = Field(None, description="run id (default: timestamp + config hash)")
