"""FSDP2 under torchrun (``train.fsdp``): parameters, gradients and AdamW state sharded over the ranks.

The trainer keeps its plain model and optimizer as the *view* that checkpoints, rollback, the loop's commit and
validation use, and trains an FSDP2 replica (``torch.distributed.fsdp.fully_shard`` on every decoder layer and
the root): each rank holds 1/N of the replica's parameters, gradients and optimizer state, and all-gathers a
layer's weights only while it runs. FSDP2 averages the reduce-scattered gradients over the ranks; the trainer
divides the loss by the window's global token count (as in the DDP path, which sums), so under FSDP it scales
the loss by the world size (:attr:`ShardedTraining.loss_scale`) and both paths make the same update. (A divide
factor of 1 would avoid the scaling, but gloo has no PREMUL_SUM reduction.) :meth:`ShardedTraining.to_plain` gathers full weights and optimizer state into the view (before a
checkpoint and at the end: collective, every rank); :meth:`ShardedTraining.from_plain` re-shards the view after a
resume or rollback. Checkpoints are therefore the same files as without FSDP.

The memory win is the training state (gradients and the two AdamW moments: 3x the parameters, sharded); the
plain view stays in host memory, so the student must fit the host, not one accelerator.
"""

from __future__ import annotations

import copy

import torch


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)  # HF decoder layers
    if layers is None:
        fully_shard(model)
        return model
    # Only the decoder layers: the loop's fused loss reads the lm head's weight and calls the base model
    # directly, outside the root's forward hooks, so embeddings, final norm and head stay replicated (their
    # gradients are all-reduced by :meth:`ShardedTraining.clip`).
    for unit in layers:
        fully_shard(unit)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class ShardedTraining:
    """An FSDP2 replica of ``model`` and its optimizer (``make_optimizer(params)``), mirroring ``optimizer``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, make_optimizer):
        self.model, self.optimizer = model, optimizer
        self.net = _shard(copy.deepcopy(model))
        self.plain = [p for p in model.parameters() if p.requires_grad]
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        if len(self.plain) != len(self.params):
            raise RuntimeError("FSDP replica: parameter lists differ")
        from torch.distributed.tensor import DTensor

        # one param group per kind: the fused AdamW kernel takes DTensors or plain tensors, not both at once
        kinds = [[p for p in self.params if isinstance(p, DTensor)], [p for p in self.params if not isinstance(p, DTensor)]]
        self.opt = make_optimizer([{"params": k} for k in kinds if k])
        self.loss_scale = float(torch.distributed.get_world_size())  # FSDP2 averages gradients; the trainer sums
        self.from_plain()

    @torch.no_grad()
    def from_plain(self) -> None:
        """Weights and optimizer state of the plain view, sharded into the replica (after resume or rollback)."""
        from torch.distributed.tensor import distribute_tensor

        from torch.distributed.tensor import DTensor

        def like(s, v):  # v (full) as s is held: this rank's shard of a sharded parameter, else a copy
            return distribute_tensor(v, s.device_mesh, s.placements) if isinstance(s, DTensor) else v.clone()

        for p, s in zip(self.plain, self.params):
            s.copy_(like(s, p.detach()))
        self.opt.state.clear()
        for p, s in zip(self.plain, self.params):
            st = self.optimizer.state.get(p)
            if st:
                self.opt.state[s] = {k: like(s, v) if isinstance(v, torch.Tensor) and v.shape == p.shape else
                                     (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        for h in self.opt.param_groups:
            h.update({k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"})

    @torch.no_grad()
    def to_plain(self) -> None:
        """Full weights and optimizer state gathered into the plain view (collective: every rank calls it)."""
        for p, s in zip(self.plain, self.params):
            p.copy_(_full(s))
        for p, s in zip(self.plain, self.params):
            st = self.opt.state.get(s)
            if st:
                self.optimizer.state[p] = {k: _full(v).clone() if isinstance(v, torch.Tensor) else v
                                           for k, v in st.items()}
        self.optimizer.param_groups[0].update({k: v for k, v in self.opt.param_groups[0].items() if k != "params"})


    def clip(self, max_norm: float) -> float:
        """Clip the sharded gradients to ``max_norm`` (global norm); returns the norm before clipping."""
        if all(p.grad is None for p in self.params):
            raise RuntimeError("train.fsdp: no gradient reached the sharded parameters; FSDP2 needs the model's "
                               "forward to return tensors or a pytree (a Hugging Face ModelOutput), not e.g. a "
                               "SimpleNamespace")
        from torch.distributed.tensor import DTensor

        from . import distributed as dist

        replicated = [p for p in self.params if not isinstance(p, DTensor)]
        dist.all_reduce_grads(replicated)  # summed over ranks x loss_scale: divide it out again
        grads = [p.grad for p in self.params if p.grad is not None]
        for g in grads:
            if not isinstance(g, DTensor):
                g.div_(self.loss_scale)
        # the global norm: squares of this rank's shards summed over ranks, plus the replicated ones (same on
        # every rank), as clip_grad_norm_ computes it over the full gradients
        shard_sq = torch.stack([g.to_local().float().pow(2).sum() for g in grads if isinstance(g, DTensor)]
                               or [torch.zeros(())]).sum()
        shard_sq = torch.tensor(dist.all_reduce_sum([float(shard_sq)])[0])
        rep_sq = torch.stack([g.float().pow(2).sum() for g in grads if not isinstance(g, DTensor)]
                             or [torch.zeros(())]).sum()
        norm = float((shard_sq + rep_sq).sqrt())
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return norm
