"""Regional compilation of the student's decoder layers (``train.compile``) with a persistent compile cache.

What is compiled: each decoder layer (``nn.Module.compile`` in place, so parameter names, state dicts and
checkpoints are unchanged), i.e. the element-wise work between the matmuls (RMSNorm, rotary, SiLU * up,
residual adds) is fused by inductor around the attention and MLP matmuls. What is not: the embedding, the final
norm and the fused lm-head loss (:mod:`distillgate.losses.fused`, an ``autograd.Function`` with a closed-form
backward) run eagerly, so the loss math is exactly the eager one. Every layer of a model has the same graph,
so dynamo compiles it once and the other layers reuse the code (parameters are graph inputs).

Shapes: ``dynamic=None`` (torch's default): the first sequence length compiles static; a second length
recompiles once with a symbolic length, so variable-length batches do not recompile per shape.

Cache: inductor's FX-graph and AOTAutograd caches live under ``$DISTILLGATE_HOME/compile/torch-<version>``
(``TORCHINDUCTOR_CACHE_DIR``, unless the user set it), so later runs and later loop iterations reuse the
compiled kernels: a cold compile of one layer's forward+backward on a 2-core CPU is minutes (gcc), a warm one
seconds (dynamo still traces; inductor and the C++ build are skipped). Inductor keys its entries by the graph,
the torch version and its config, so a shared folder is safe.

Online teacher: when the student compiles and the loss runs a teacher at training time (the loss function's
``online_teacher_model()`` returns it: :class:`distillgate.targets.OnlineTeacher`, the kd / ce online path),
the teacher's decoder layers are compiled the same way (:func:`compile_online_teacher`). The teacher runs under
``no_grad``, so dynamo traces an inference graph (forward only: no AOTAutograd backward, a cheaper compile
than the student's) into the same cache. ``train.compile: auto`` therefore applies to the teacher exactly when
it applies to the student (same rule, evaluated for the teacher's device; an offloaded teacher on a device
without a compiler stays eager, with the reason logged). The online provider of the attn / feature channels
(:class:`distillgate.teacher_side.OnlineChannelTeacher`) stays eager: it captures q / k and block outputs with
hooks registered per call, which a compiled layer would not run.

Compile time is measured from dynamo's own counters (``entire_frame_compile`` + ``entire_backward_compile``)
and reported apart from step time: per step as ``compile_s`` in the metrics, in total as
``TrainResult.compile_seconds``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io import distillgate_home

log = logging.getLogger(__name__)

AUTO_MIN_STEPS = 64
"""``train.compile: auto`` on a CPU compiles only for runs of at least this many optimizer steps (see
:func:`resolve_compile`). Measured (README "Compiled decoder layers", loaded 2-core CPU, fp32, the 15-layer
student at 4 x 256): a cold compile cost 92.6 s and saved ~4 s per step, break-even ~23 steps; 64 leaves a
margin for a quieter machine (smaller absolute saving per step). A warm cache (4.9 s) pays back in ~2 steps."""


@dataclass
class CompileInfo:
    enabled: bool
    reason: str
    layers: int = 0
    cache_dir: str | None = None
    modules: list = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {"enabled": self.enabled, "reason": self.reason, "layers": self.layers, "cache_dir": self.cache_dir}


def compile_cache_dir() -> Path:
    """Where inductor's caches go: ``$TORCHINDUCTOR_CACHE_DIR`` when set, else
    ``$DISTILLGATE_HOME/compile/torch-<version>``."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    return distillgate_home() / "compile" / f"torch-{torch.__version__}"


def cxx_compiler() -> str | None:
    """The C++ compiler inductor uses on a CPU ($CXX, else g++ / c++ / clang++ on PATH), or None."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def compiler_missing(device: torch.device) -> str | None:
    """Why inductor cannot compile for ``device`` here, or None when it can."""
    if device.type == "cpu":
        return None if cxx_compiler() else "no C++ compiler on PATH (inductor's CPU backend needs g++ or clang++)"
    if device.type == "cuda":
        import importlib.util

        return None if importlib.util.find_spec("triton") else "triton is not installed (inductor's CUDA backend)"
    return f"inductor does not support device type {device.type!r}"


def resolve_compile(mode: str, device: torch.device, steps: int) -> tuple[bool, str]:
    """``train.compile`` -> (compile?, why). ``on`` fails when the compiler is missing; ``auto`` compiles on CUDA
    when triton is there, and on a CPU when a C++ compiler is there and the run has >= :data:`AUTO_MIN_STEPS`
    steps: a cold compile of the decoder layers cost 92.6 s on a loaded 2-core CPU (warm cache: 4.9 s) against a
    saving of ~4 s per (loaded) step (README "Compiled decoder layers"), so short runs stay eager."""
    if mode == "off":
        return False, "train.compile: off"
    missing = compiler_missing(device)
    if mode == "on":
        if missing:
            raise ConfigError("train.compile", mode, f"'off' or 'auto' here: {missing}")
        return True, "train.compile: on"
    if mode != "auto":
        raise ConfigError("train.compile", mode, "'off', 'auto' or 'on'")
    if missing:
        return False, f"auto: {missing}"
    if device.type == "cpu" and steps < AUTO_MIN_STEPS:
        return False, f"auto: {steps} steps < {AUTO_MIN_STEPS} on a CPU (the compile would not pay for itself)"
    return True, f"auto: {device.type}"


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (HF causal LMs: ``model.model.layers``; else the longest
    ModuleList of same-class blocks)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        return layers
    best = None
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1 \
                and (best is None or len(mod) > len(best)):
            best = mod
    if best is None:
        raise ConfigError("train.compile", "on", f"a model with a ModuleList of decoder layers "
                                                 f"({type(model).__name__} has none); use train.compile: off")
    return best


BACKEND = "inductor"
"""The torch.compile backend ``train.compile`` uses (tests set ``aot_eager`` to check the wiring without a C++
build; it then compiles whenever the mode is not ``off``)."""


def compile_layers(model: torch.nn.Module, mode: str, steps: int, *, backend: str | None = None) -> CompileInfo:
    """Compile ``model``'s decoder layers in place when ``mode`` says so (see :func:`resolve_compile`).
    Undo with :func:`uncompile`. ``backend``: ``inductor`` (what ``train.compile`` uses); tests pass
    ``aot_eager`` to check the wiring without a C++ build."""
    backend = backend or BACKEND
    device = next(model.parameters()).device
    enabled, reason = resolve_compile(mode, device, steps) if backend == "inductor" else (mode != "off", backend)
    if not enabled:
        return CompileInfo(False, reason)
    cache = compile_cache_dir()
    if backend == "inductor":
        cache.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))  # read by inductor when it first compiles
    layers = list(decoder_layers(model))
    for layer in layers:
        layer.compile(backend=backend, dynamic=None)
    log.info("compiling %d decoder layers (%s; cache %s)", len(layers), reason, cache)
    return CompileInfo(True, reason, len(layers), str(cache), layers)


def compile_online_teacher(loss_fn, student: CompileInfo, mode: str, steps: int, *,
                           backend: str | None = None) -> CompileInfo:
    """Compile the decoder layers of the teacher ``loss_fn`` runs at training time (``loss_fn.
    online_teacher_model()``; None: nothing to compile) when the student's layers were compiled (``student``)
    and ``mode`` allows it on the teacher's device. Never raises for the teacher's device: a teacher that cannot
    compile there stays eager (logged). Undo with :func:`uncompile`."""
    getter = getattr(loss_fn, "online_teacher_model", None)
    teacher = getter() if callable(getter) else None
    if teacher is None:
        return CompileInfo(False, "no online teacher")
    if not student.enabled:
        return CompileInfo(False, f"the student is not compiled ({student.reason})")
    try:
        info = compile_layers(teacher, mode, steps, backend=backend)
    except ConfigError as e:          # train.compile: on, but the (offloaded) teacher's device has no compiler
        info = CompileInfo(False, f"teacher stays eager: {e}")
    if not info.enabled:
        log.info("online teacher not compiled: %s", info.reason)
    else:
        log.info("compiled the online teacher's %d decoder layers (inference graph)", info.layers)
    return info


def uncompile(info: CompileInfo) -> None:
    """Back to eager (evaluation after training runs in inference mode: the compiled training graph's guards
    would fail there and recompile)."""
    for layer in info.modules:
        layer._compiled_call_impl = None
    info.modules = []


def compile_seconds_so_far() -> float:
    """Seconds this process has spent in dynamo/inductor compiling (forward frames + lazily compiled backward)."""
    try:
        from torch._dynamo.utils import calculate_time_spent
    except ImportError:  # pragma: no cover - torch without dynamo
        return 0.0
    t = calculate_time_spent()
    return float(t.get("entire_frame_compile", 0.0) + t.get("entire_backward_compile", 0.0))
