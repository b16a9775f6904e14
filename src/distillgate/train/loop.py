"""The training loop: AdamW, warmup+cosine, token-normalised gradient accumulation, clipping, bf16
autocast, checkpoints with bitwise resume, and a skip/rollback policy for NaN/Inf.

Reads top to bottom as setup -> (resume) -> steps -> final checkpoint -> result. One optimizer step:

1. lr for this step from the schedule (a pure function of the step index);
2. take ``grad_accum * world`` micro-batches; count the window's loss tokens (``loss_mask[:, 1:].sum()``)
   *before* any backward and all-reduce that count over ranks;
3. per micro-batch: ``loss_fn`` under autocast, then ``(total_sum / window_tokens).backward()``, so the
   gradient is the mean over every loss token of the window whatever the split (1x4 == 4x1);
4. all-reduce gradients (multi-process only; with ``train.fsdp`` an FSDP2 replica reduce-scatters them, see
   :mod:`.fsdp`), clip to ``max_grad_norm``, ``optimizer.step()``.

Non-finite policy (``on_nonfinite='skip'``, the default): a NaN/Inf loss or gradient norm skips the step
(no update, gradients dropped, the step still counts and its data is consumed) and is recorded. After
``max_consecutive_nonfinite`` skips in a row, model and optimizer roll back to the newest valid checkpoint
(or to the state at the start of this call when none was written yet) and the lr scale is halved: the same
lr that diverged would likely diverge again from the same weights. Data is not rewound, so the batches
that produced the NaNs are not replayed. More than ``max_rollbacks`` rollbacks raise NonFiniteError.
``on_nonfinite='raise'`` raises at the first non-finite step instead.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch

from ..config import TrainSpec
from ..errors import ArtifactError, ConfigError
from ..hardware import native_bf16, tune_malloc
from ..placement import to_device
from ..signals import raise_if_terminated
from . import distributed as dist
from .compile import compile_layers, compile_online_teacher, compile_seconds_so_far, uncompile
from .checkpoint import (list_checkpoints, load_latest, read_weights_and_optimizer, save_checkpoint,
                         write_weights_and_optimizer)
from .cursor import DataCursor, input_token_count, loss_token_count
from .fsdp import ShardedTraining
from .metrics import MetricsLog, peak_rss_mb, steady_median
from .progress import TrainProgress, print_summary
from .schedule import WarmupCosine
from .state import restore_rng, seed_everything
from .types import BatchSource, LossFn, NonFiniteError, StepInfo, StopTraining, TrainEvent, TrainResult, as_batch_fn

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """'auto' -> 'bf16' where bf16 matmuls are native (:func:`distillgate.hardware.native_bf16`), else 'fp32'."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device.type if device is not None else "cpu") else "fp32"


def make_optimizer(params: list[torch.nn.Parameter], spec: TrainSpec) -> torch.optim.AdamW:
    # Fused kernel (CPU and CUDA): one pass per parameter and no temporaries -- 5.3x faster than the
    # single-tensor path on an 81M-parameter student (0.06 s vs 0.32 s per step, 2 threads) and deterministic,
    # so resume stays bitwise.
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=True)


def train(model: torch.nn.Module, loss_fn: LossFn, batches: BatchSource | Callable, spec: TrainSpec,
          out_dir: str | Path, *, resume_from: str | Path | None = None,
          callbacks: Iterable[Callable[[StepInfo], None]] = (),
          on_nonfinite: Literal["skip", "raise"] = "skip", max_consecutive_nonfinite: int = 3,
          max_rollbacks: int = 3, progress: bool | None = None, tensorboard: bool | None = None,
          keep_checkpoints: int = 2) -> TrainResult:
    """Train ``model`` in place for ``spec.steps`` optimizer steps; checkpoints under ``out_dir/checkpoints``.

    ``loss_fn(model, batch)`` returns a LossOutput (``total_sum`` 0-dim differentiable, ``terms``);
    ``batches`` is a BatchSource (``.batches(epoch)``) or a function ``epoch -> list of batch dicts``,
    each with ``loss_mask`` [B,T]. ``resume_from``: a checkpoint folder, or a folder holding ``checkpoints/``;
    the newest checkpoint that verifies is restored (weights, optimizer, schedule, RNG, data position), so a
    resumed run is bitwise identical to an uninterrupted one on CPU. ``progress``: None = only on a TTY.
    ``tensorboard``: None = as ``spec.report_to`` says (``mlflow`` there logs the steps to an MLflow run too).
    """
    if on_nonfinite not in ("skip", "raise"):
        raise ConfigError("on_nonfinite", on_nonfinite, "'skip' or 'raise'")
    if max_consecutive_nonfinite < 1:
        raise ConfigError("max_consecutive_nonfinite", max_consecutive_nonfinite, ">= 1")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("model", type(model).__name__, "a model with trainable parameters")
    batch_fn = as_batch_fn(batches)
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    if resume_from is None and list_checkpoints(ckpt_root):
        # a fresh run would interleave its checkpoints with stale ones that a later resume/rollback picks up
        raise ArtifactError(f"{ckpt_root}: holds checkpoints of an earlier run; pass resume_from={str(out_dir)!r} "
                            f"to continue it, or choose an empty out_dir")
    prev_threads, was_training = torch.get_num_threads(), model.training
    try:
        return _run(model, loss_fn, batch_fn, spec, out_dir, resume_from, list(callbacks), on_nonfinite,
                    max_consecutive_nonfinite, max_rollbacks, progress, tensorboard, keep_checkpoints)
    finally:
        model.train(was_training)
        torch.set_num_threads(prev_threads)


def _run(model, loss_fn, batch_fn, spec, out_dir, resume_from, callbacks, on_nonfinite,
         max_consecutive_nonfinite, max_rollbacks, progress, tensorboard, keep_checkpoints) -> TrainResult:
    """The body of :func:`train` after validation (threads and train mode are restored by the caller)."""
    ckpt_root = out_dir / "checkpoints"
    main = dist.is_main()
    world, rank = dist.world_size(), dist.rank()
    params = [p for p in model.parameters() if p.requires_grad]
    precision = resolve_precision(spec.precision, params[0].device)
    if params[0].device.type == "cpu":
        tune_malloc()                        # reuse large freed blocks instead of page-faulting them in each step
    autocast = dict(device_type=params[0].device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    model.train()
    optimizer = make_optimizer(params, spec)
    sched = WarmupCosine(spec.lr, spec.steps, spec.warmup_steps, spec.min_lr_ratio)
    st = {"step": 0, "tokens": 0, "input_tokens": 0, "skipped": 0, "rollbacks": 0, "consecutive": 0,
          "history": {"loss": [], "loss_tps": [], "input_tps": []}, "last_terms": {}, "events": []}
    cursor = DataCursor(batch_fn)
    resumed_step, resume_events = None, []
    if resume_from is not None:
        ckpt, corrupt = load_latest(resume_from, model, optimizer)
        sched.scale = WarmupCosine.from_state_dict(ckpt.scheduler_state, str(ckpt.path / "scheduler.json")).scale
        restore_rng(ckpt.rng_tensors, ckpt.rng_meta)
        for k in st:
            st[k] = ckpt.trainer_state.get(k, st[k])
        cursor = DataCursor(batch_fn, ckpt.trainer_state["epoch"], ckpt.trainer_state["index"])
        resumed_step = st["step"]
        resume_events = [TrainEvent("checkpoint_fallback", st["step"], c).to_json() for c in corrupt]
        resume_events.append(TrainEvent("resume", st["step"], {"path": str(ckpt.path)}).to_json())
        st["events"] = st["events"] + resume_events
    else:
        seed_everything(spec.seed + rank)  # ranks draw different dropout masks; rank 0 == single process
    # train.fsdp: an FSDP2 replica trains; model/optimizer stay the (gathered) view checkpoints use
    shard = ShardedTraining(model, optimizer, lambda ps: make_optimizer(ps, spec)) if spec.fsdp and world > 1 \
        else None
    net, step_opt = (shard.net, shard.opt) if shard else (model, optimizer)
    # train.compile: the decoder layers of what trains run compiled (in place: same parameters, same state dict)
    compiled = compile_layers(net, spec.compile, spec.steps)
    # ... and so do the online teacher's (inference graph), when the loss runs one at training time
    teacher_compiled = compile_online_teacher(loss_fn, compiled, spec.compile, spec.steps)
    compile_s = 0.0
    # Rollback target until the first checkpoint exists (then the checkpoint is, and this is deleted). On disk,
    # not in memory: a second copy of the weights would add a full model to the peak RSS.
    snapshot = None if list_checkpoints(ckpt_root) else _snapshot(model, optimizer, out_dir / f"{_START}-{rank}")
    report_to = spec.report_to if tensorboard is None else ["tensorboard"] * bool(tensorboard)
    metrics = MetricsLog(out_dir, enabled=main, tensorboard="tensorboard" in report_to, resume_step=resumed_step,
                         mlflow=spec.mlflow if "mlflow" in report_to else None)
    for e in resume_events:
        metrics.event(e)
    last_ckpt: Path | None = None
    warned_count = False
    stopped = False
    t_start = time.perf_counter()

    def record_event(kind: str, detail: dict) -> None:
        ev = TrainEvent(kind, st["step"], detail).to_json()
        st["events"].append(ev)
        metrics.event(ev)

    def rollback(reason: str) -> None:
        if list_checkpoints(ckpt_root):
            ckpt, _ = load_latest(ckpt_root, model, optimizer)
            source = str(ckpt.path)
        else:
            read_weights_and_optimizer(snapshot, model, optimizer)
            source = "start of this run"
        if shard is not None:
            shard.from_plain()
        sched.scale *= 0.5
        st["rollbacks"] += 1
        st["consecutive"] = 0
        record_event("rollback", {"reason": reason, "restored": source, "lr_scale": sched.scale})
        log.warning("rollback %d at step %d (%s): restored %s, lr scale now %g",
                    st["rollbacks"], st["step"], reason, source, sched.scale)
        if st["rollbacks"] > max_rollbacks:
            raise NonFiniteError(f"training diverged: {st['rollbacks']} rollbacks (max_rollbacks={max_rollbacks}); "
                                 f"last cause at step {st['step']}: {reason}. Lower train.lr or check the data.")

    def checkpoint() -> Path | None:
        nonlocal snapshot
        if shard is not None:
            shard.to_plain()  # collective: every rank, before rank 0 writes the view
        if not main:
            dist.barrier()
            return None
        trainer_state = dict(st, **cursor.state(), spec=spec.model_dump())
        try:
            path = save_checkpoint(ckpt_root, st["step"], model, optimizer, sched.state_dict(), trainer_state,
                                   keep=keep_checkpoints)
        except NonFiniteError as e:
            rollback(str(e))
            path = save_checkpoint(ckpt_root, st["step"], model, optimizer, sched.state_dict(),
                                   dict(st, **cursor.state(), spec=spec.model_dump()), keep=keep_checkpoints)
        if snapshot is not None:
            shutil.rmtree(snapshot, ignore_errors=True)
            snapshot = None
        dist.barrier()
        return path

    try:
        show = False if (progress is False or not main) else (None if progress is None else True)
        with TrainProgress(spec.steps, st["step"], enabled=show) as bar:
            while st["step"] < spec.steps and not stopped:
                t0 = time.perf_counter()
                c0 = compile_seconds_so_far() if compiled.enabled else 0.0
                lr = sched.apply(step_opt, st["step"])
                window = [cursor.next() for _ in range(spec.grad_accum * world)]
                mine = [to_device(b, params[0].device) for b in window[rank::world]]
                counts = [loss_token_count(b) for b in mine]
                n_tok, n_in = (int(v) for v in dist.all_reduce_sum([sum(counts), sum(input_token_count(b) for b in mine)]))
                step_opt.zero_grad(set_to_none=True)
                loss_sum, term_sums, bad = 0.0, {}, ""
                for b, n in zip(mine, counts):
                    with torch.autocast(**autocast):
                        out = loss_fn(net, b)
                    total = out.total_sum.float()
                    if not bool(torch.isfinite(total)):
                        bad = f"non-finite loss ({float(total.detach())})"
                        break
                    if n_tok > 0:
                        (total * shard.loss_scale / n_tok if shard else total / n_tok).backward()
                    loss_sum += float(total.detach())
                    for k, v in out.terms.items():
                        term_sums[k] = term_sums.get(k, 0.0) + float(v) * n
                    if not warned_count and int(out.n_tokens) != n:
                        log.warning("loss_fn reports n_tokens=%d but loss_mask[:, 1:] counts %d; the trainer "
                                    "normalises by the mask count", int(out.n_tokens), n)
                        warned_count = True
                keys = sorted(term_sums)
                reduced = dist.all_reduce_sum([1.0 if bad else 0.0, loss_sum] + [term_sums[k] for k in keys])
                if reduced[0] and not bad:
                    bad = "non-finite loss on another rank"
                grad_norm = float("nan")
                if not bad:
                    if shard is None:
                        dist.all_reduce_grads(params)
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm, foreach=False))
                    else:  # FSDP2 reduce-scattered them already
                        grad_norm = shard.clip(spec.max_grad_norm)
                    if not math.isfinite(grad_norm):
                        bad = f"non-finite gradient norm ({grad_norm})"
                if n_tok == 0 and not bad:
                    bad = "no loss tokens in the window"
                if not bad:
                    step_opt.step()
                    st["consecutive"] = 0
                step_opt.zero_grad(set_to_none=True)
                # compile time (train.compile: first steps, a new shape) is reported apart from the step's time
                c_dt = compile_seconds_so_far() - c0 if compiled.enabled else 0.0
                compile_s += c_dt
                dt = max(time.perf_counter() - t0 - c_dt, 1e-9)
                st["step"] += 1
                st["tokens"] += n_tok
                st["input_tokens"] += n_in
                loss = reduced[1] / n_tok if n_tok and not bad else float("nan")
                terms = {k: v / n_tok for k, v in zip(keys, reduced[2:])} if n_tok and not bad else {}
                rec = {"step": st["step"], "epoch": cursor.epoch, "lr": lr, "loss": loss, "terms": terms,
                       "grad_norm": grad_norm, "loss_tokens": n_tok, "input_tokens": n_in,
                       "loss_tokens_per_s": n_tok / dt, "input_tokens_per_s": n_in / dt, "seconds": dt,
                       "compile_s": c_dt,
                       "elapsed_s": time.perf_counter() - t_start, "skipped": bool(bad)}
                if bad:
                    if on_nonfinite == "raise" and not bad.startswith("no loss"):
                        raise NonFiniteError(f"step {st['step']}: {bad} (on_nonfinite='raise')")
                    st["skipped"] += 1
                    if not bad.startswith("no loss"):
                        st["consecutive"] += 1
                    rec["reason"] = bad
                    record_event("skip", {"reason": bad})
                else:
                    st["history"]["loss"].append(loss)
                    st["history"]["loss_tps"].append(n_tok / dt)
                    st["history"]["input_tps"].append(n_in / dt)
                    st["last_terms"] = terms
                if bad or st["step"] % spec.log_every == 0 or st["step"] == spec.steps:
                    metrics.step(rec)
                bar.update(st["step"], rec)
                if st["consecutive"] >= max_consecutive_nonfinite:
                    rollback(f"{st['consecutive']} consecutive non-finite steps; last: {bad}")
                info = StepInfo(st["step"], spec.steps, lr, loss, terms, grad_norm, n_tok, n_in, dt, bool(bad),
                                cursor.epoch)
                raise_if_terminated()  # a SIGTERM swallowed by a finalizer stops training at the next step
                for cb in callbacks:
                    try:
                        cb(info)
                    except StopTraining:
                        stopped = True
                if spec.checkpoint_every and st["step"] % spec.checkpoint_every == 0 and st["step"] < spec.steps \
                        and not stopped:
                    last_ckpt = checkpoint()
            if st["step"] > (resumed_step or 0):
                last_ckpt = checkpoint()
            else:  # resumed a finished run: nothing to do
                last_ckpt = (list_checkpoints(ckpt_root) or [None])[-1]
    finally:
        uncompile(compiled)
        uncompile(teacher_compiled)
        metrics.close()
        if snapshot is not None:
            shutil.rmtree(snapshot, ignore_errors=True)

    hist = st["history"]
    result = TrainResult(
        steps=st["step"], tokens=st["tokens"], input_tokens=st["input_tokens"],
        seconds=time.perf_counter() - t_start,
        tokens_per_s=steady_median(hist["loss_tps"]), input_tokens_per_s=steady_median(hist["input_tps"]),
        final_loss=hist["loss"][-1] if hist["loss"] else float("nan"),
        mean_loss=sum(hist["loss"]) / len(hist["loss"]) if hist["loss"] else float("nan"),
        final_terms=dict(st["last_terms"]), skipped_steps=st["skipped"], rollbacks=st["rollbacks"],
        events=list(st["events"]), last_checkpoint=last_ckpt, metrics_path=metrics.path,
        peak_rss_mb=peak_rss_mb(), stopped_early=stopped, precision=precision,
        compile_seconds=compile_s, compiled=compiled.enabled, teacher_compiled=teacher_compiled.enabled)
    if main and progress is not False and (progress or bar.enabled):
        print_summary(result)
    return result


_START = "rollback-start"


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> Path:
    """Write weights and optimizer state to ``path`` (the rollback target before any checkpoint exists)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    write_weights_and_optimizer(path, model, optimizer)
    return path
