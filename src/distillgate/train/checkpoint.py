"""Resumable training checkpoints: atomic folders with a sha256 manifest, no pickle.

Layout of ``<out_dir>/checkpoints/step-00000010/`` (kind ``train_checkpoint``, format 1)::

    model.safetensors       weights (safetensors.torch.save_model: tied weights stored once)
    optimizer.safetensors   AdamW moments and step counters      optimizer.json  param-group hyper-params
    rng.safetensors         torch CPU generator state (uint8)    rng.json        python + numpy states
    scheduler.json          WarmupCosine state (peak lr, total/warmup steps, min ratio, rollback scale)
    trainer.json            step, data position (epoch, index), tokens seen, loss history, events

Writers refuse non-finite weights. Readers verify the manifest (sha256 of every file) before touching the
model; :func:`load_latest` falls back to the previous checkpoint when the newest one is corrupt.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ..errors import ArtifactError
from ..io import atomic_dir, verify_manifest
from .state import capture_rng, optimizer_from_parts, optimizer_to_parts
from .types import NonFiniteError

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "train_checkpoint"
CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def first_nonfinite_param(model: torch.nn.Module) -> str | None:
    """Name of the first floating-point parameter/buffer holding NaN/Inf, or None."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Committed-looking checkpoint folders under ``root``, oldest first (temp folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler_state: dict, trainer_state: dict, keep: int = 2) -> Path:
    """Write ``root/step-XXXXXXXX`` atomically and delete all but the newest ``keep`` checkpoints.

    Raises :class:`NonFiniteError` (and writes nothing) when a weight is NaN/Inf.
    """
    bad = first_nonfinite_param(model)
    if bad is not None:
        raise NonFiniteError(f"refusing to checkpoint step {step}: parameter {bad} holds NaN/Inf")
    final = Path(root) / checkpoint_name(step)
    rng_tensors, rng_meta = capture_rng()
    state = dict(trainer_state, step=step,
                 param_names=[n for n, _ in model.named_parameters()])
    with atomic_dir(final, kind=CHECKPOINT_KIND, format_version=CHECKPOINT_FORMAT,
                    meta={"step": step}, overwrite=True) as tmp:
        write_weights_and_optimizer(tmp, model, optimizer)
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        for name, obj in (("rng.json", rng_meta), ("scheduler.json", scheduler_state), ("trainer.json", state)):
            (tmp / name).write_text(json.dumps(obj, indent=1, sort_keys=True))
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_weights_and_optimizer(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """``model.safetensors``, ``optimizer.safetensors`` and ``optimizer.json`` into an existing ``folder``."""
    opt_tensors, opt_meta = optimizer_to_parts(optimizer)
    save_model(model, str(folder / "model.safetensors"))
    save_file(opt_tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps(opt_meta, indent=1, sort_keys=True))


def read_weights_and_optimizer(folder: Path, model: torch.nn.Module,
                               optimizer: torch.optim.Optimizer | None) -> None:
    """Load what :func:`write_weights_and_optimizer` wrote, in place; ArtifactError when it does not fit."""
    opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_meta = _read_json(folder / "optimizer.json")
    try:
        load_model(model, str(folder / "model.safetensors"), strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{folder}/model.safetensors: does not fit the model ({e})") from e
    if optimizer is not None:
        optimizer_from_parts(optimizer, opt_tensors, opt_meta, source=str(folder / "optimizer.json"))


@dataclass
class LoadedCheckpoint:
    path: Path
    scheduler_state: dict
    trainer_state: dict
    rng_tensors: dict[str, torch.Tensor]
    rng_meta: dict


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from e


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    verify: bool = True) -> LoadedCheckpoint:
    """Verify ``path``'s manifest, then load weights (and optimizer state) in place.

    Raises :class:`ArtifactError` naming the file on corruption, a wrong kind/format, or a checkpoint of a
    different model (parameter names or shapes differ); the model is untouched when verification fails.
    """
    path = Path(path)
    if verify:
        verify_manifest(path, kind=CHECKPOINT_KIND, format_version=CHECKPOINT_FORMAT)
    trainer_state = _read_json(path / "trainer.json")
    names = [n for n, _ in model.named_parameters()]
    if trainer_state.get("param_names") != names:
        raise ArtifactError(f"{path}/trainer.json: checkpoint of another model (parameter names differ from "
                            f"the model given; {len(trainer_state.get('param_names', []))} vs {len(names)})")
    read_weights_and_optimizer(path, model, optimizer)
    return LoadedCheckpoint(path=path, scheduler_state=_read_json(path / "scheduler.json"),
                            trainer_state=trainer_state, rng_tensors=load_file(str(path / "rng.safetensors")),
                            rng_meta=_read_json(path / "rng.json"))


def resume_candidates(resume_from: str | Path) -> list[Path]:
    """Checkpoints to try, newest first. ``resume_from`` is a checkpoint folder (it, then older siblings),
    a ``checkpoints/`` folder, or a training output folder holding ``checkpoints/``."""
    p = Path(resume_from)
    if _NAME.match(p.name):
        step = int(_NAME.match(p.name).group(1))
        older = [c for c in list_checkpoints(p.parent) if int(_NAME.match(c.name).group(1)) < step]
        return [p] + older[::-1]
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    found = list_checkpoints(root)
    if not found:
        raise ArtifactError(f"{resume_from}: no checkpoint folders (step-XXXXXXXX) to resume from")
    return found[::-1]


def load_latest(resume_from: str | Path, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer | None = None) -> tuple[LoadedCheckpoint, list[dict]]:
    """Load the newest checkpoint that verifies; -> (it, [{'path', 'error'} for each corrupt one skipped]).

    Raises :class:`ArtifactError` listing every failure when none verifies.
    """
    skipped: list[dict] = []
    for cand in resume_candidates(resume_from):
        try:
            verify_manifest(cand, kind=CHECKPOINT_KIND, format_version=CHECKPOINT_FORMAT)
        except ArtifactError as e:
            log.warning("checkpoint %s is unusable (%s); trying the previous one", cand, e)
            skipped.append({"path": str(cand), "error": str(e)})
            continue
        return load_checkpoint(cand, model, optimizer, verify=False), skipped
    raise ArtifactError(f"{resume_from}: no valid checkpoint; " +
                        "; ".join(f"{s['path']}: {s['error']}" for s in skipped))
