"""The stage registry: the loop's plug-ins by config name (SPEC section 2; the contract is
:mod:`distillgate.loop.contract`).

Built in: ``anchor`` (S1, :mod:`.anchor`), ``joint`` (S2, :mod:`.joint`), ``prune`` (S3, :mod:`.prune`) and
``consistency`` (S4, :mod:`.consistency`) and ``production`` (L4 A/B windows, :mod:`.production`) and ``drift`` (G-O2, :mod:`distillgate.ops.drift`) and ``operations`` (G-O drills,
:mod:`distillgate.ops.operations`). Other stages register with
:func:`register_stage`, or, from an installed package, through the Python entry-point group
``distillgate.stages`` (``[project.entry-points."distillgate.stages"] my_stage = "my_pkg.stage:MyStage"``):
the entry's name is the config name and it loads to the stage class (or any ``factory(options)`` with an
``Options`` model). Nothing here imports torch, so the config validates stage names cheaply.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "distillgate.stages"
STAGES: dict[str, Any] = {}
_entry_points_loaded = False


def register_stage(name: str, factory) -> None:
    """Register a stage class (or ``factory(options)`` carrying ``Options``) under config name ``name``."""
    STAGES[name] = factory


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in STAGES:
            continue
        try:
            register_stage(ep.name, ep.load())
        except Exception as e:  # a broken third-party package must not hide the built-in stages
            log.warning("stage entry point %s (%s) failed to load: %s", ep.name, ep.value, e)


def available_stages(refresh: bool = False) -> dict[str, Any]:
    """Every registered stage: the built-ins, :func:`register_stage` calls and installed entry points."""
    global _entry_points_loaded
    if refresh:
        _entry_points_loaded = False
    _load_entry_points()
    return STAGES


def options_model(factory) -> type[BaseModel]:
    from ..loop.contract import NoOptions

    return getattr(factory, "Options", None) or NoOptions


def validate_options(specs) -> list[BaseModel]:
    """Each ``loop.stages[i].options`` validated by its stage's ``Options`` (ConfigError naming the field)."""
    stages = available_stages()
    out = []
    for i, s in enumerate(specs):
        if s.name not in stages:
            raise ConfigError(f"loop.stages[{i}].name", s.name, f"a registered stage: {sorted(stages)}")
        factory = stages[s.name]
        try:
            out.append(options_model(factory).model_validate(s.options or {}))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
            raise ConfigError(f"loop.stages[{i}].options" + (f".{loc}" if loc else ""), err.get("input"),
                              f"{msg} (options of stage {s.name!r}: "
                              f"{sorted(options_model(factory).model_fields)})") from None
        if getattr(factory, "setup_only", False) and s.iterations != 0:
            raise ConfigError(f"loop.stages[{i}].iterations", s.iterations,
                              f"0 (stage {s.name!r} works in the setup iteration 0 only)")
    return out


def build(specs) -> list[Any]:
    """One instance per stage entry, ``factory(options)``, with ``options`` and ``state_key`` set on it."""
    stages = available_stages()
    out = []
    names = [s.name for s in specs]
    for i, (spec, opts) in enumerate(zip(specs, validate_options(specs))):
        obj = stages[spec.name](opts)
        if getattr(obj, "options", None) is None:
            obj.options = opts
        # the key of the stage's own state: its name, or name[i] when the stage appears in several entries
        # (each entry has its own options, so its own plan)
        obj.state_key = spec.name if names.count(spec.name) == 1 else f"{spec.name}[{i}]"
        out.append(obj)
    return out


def _builtins() -> None:
    from .anchor import AnchorStage
    from .consistency import ConsistencyStage
    from .joint import JointStage
    from ..ops.drift import DriftStage
    from ..ops.operations import OperationsStage
    from .production import ProductionStage
    from .prune import PruneStage

    register_stage("anchor", AnchorStage)
    register_stage("joint", JointStage)
    register_stage("prune", PruneStage)
    register_stage("consistency", ConsistencyStage)
    register_stage("production", ProductionStage)
    register_stage("drift", DriftStage)
    register_stage("operations", OperationsStage)


_builtins()
