"""Serialise training state without pickle: optimizer and RNG states as safetensors tensors + JSON scalars.

* optimizer: every tensor of ``optimizer.state_dict()['state']`` goes to safetensors under
  ``"{param_index}.{name}"``; non-tensor per-param values and the param groups' hyper-parameters
  (lr, betas, eps, weight_decay, ... and the param index lists) go to JSON;
* RNG: the torch CPU generator state is a uint8 tensor (safetensors); python ``random`` and numpy's
  MT19937 states are JSON lists.
Round trips are exact (same bytes), which the resume test relies on.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..errors import ArtifactError


def optimizer_to_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors for safetensors, JSON-able dict) describing ``optimizer.state_dict()`` exactly."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous()  # no copy: written before the next step
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"type": type(optimizer).__name__, "param_groups": groups, "scalars": scalars,
            "tuple_keys": sorted({k for g in sd["param_groups"] for k, v in g.items() if isinstance(v, tuple)})}
    return tensors, meta


def optimizer_from_parts(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                         source: str = "optimizer") -> None:
    """Load what :func:`optimizer_to_parts` wrote into ``optimizer`` (same type and parameter layout)."""
    if meta.get("type") != type(optimizer).__name__:
        raise ArtifactError(f"{source}: optimizer type {meta.get('type')!r}, the trainer uses "
                            f"{type(optimizer).__name__!r}")
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    tuple_keys = set(meta.get("tuple_keys", []))
    groups = [{k: (tuple(v) if k in tuple_keys else v) for k, v in g.items()} for g in meta["param_groups"]]
    n_saved = [len(g["params"]) for g in groups]
    n_now = [len(g["params"]) for g in optimizer.param_groups]
    if n_saved != n_now:
        raise ArtifactError(f"{source}: param groups hold {n_saved} parameters, the model has {n_now}")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """-> ({'torch_cpu': uint8 tensor}, {'python': ..., 'numpy': ...}) of the process-global generators."""
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return {"torch_cpu": torch.get_rng_state()}, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    v, st, gauss = meta["python"]
    random.setstate((v, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU), python ``random`` and numpy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
