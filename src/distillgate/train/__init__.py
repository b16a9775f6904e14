"""Training loop (single process; data-parallel hooks for torchrun), checkpoints with bitwise resume."""

from .checkpoint import list_checkpoints, load_checkpoint, load_latest, save_checkpoint  # noqa: F401
from .loop import make_optimizer, train  # noqa: F401
from .metrics import read_metrics  # noqa: F401
from .schedule import WarmupCosine, lr_factor  # noqa: F401
from .types import (  # noqa: F401
    Batch, BatchSource, LossOutputLike, NonFiniteError, StepInfo, StopTraining, TrainEvent, TrainResult,
)
