"""Distillation losses: divergences (dense and top-k + tail), the fused chunked lm-head loss, temperature
policies, and the objective the trainer calls. Channel losses are combined in :mod:`distillgate.weighting`."""

from .divergence import (  # noqa: F401
    DIVERGENCES,
    cross_entropy,
    divergence,
    forward_kl,
    gjsd,
    reverse_kl,
    total_variation,
)
from .fused import fused_distill_loss, unfused_distill_loss  # noqa: F401
from .objective import DistillObjective, LossOutput, TeacherProvider  # noqa: F401
from .temperature import temperatures  # noqa: F401
