"""The ``operations`` stage: operations *drills* against the student as it is now, measured into the
iteration's gate table with their provenance.

A drill is ``fn(ctx: DrillContext, options) -> report`` (a JSON-able dict) registered with
:func:`register_drill` under a name, the gate metrics its report feeds, the gate-context option key the
metric providers read it from (``ctx.options[options_key]``) and its pydantic ``Options``. In each iteration
the stage watches (``start_iteration``, ``every``; ``when: capability_pass``: only once the previous iteration
passed every measured capability gate) it runs the configured drills at the start of validate, puts each report
in ``it.measure_options[options_key]`` and its metrics in ``it.extra_metrics`` (validate measures them through the
metric registry, provenance included), and writes it as ``ops-<drill>.json`` into the version.

Built in: ``breaker`` (G-O1, :mod:`.breaker_drill`: the generated attack corpus and normal traffic through the
gateway in front of the student; metrics ``breaker_switch_ms``, ``degraded_compliance_pct``, read from
``breaker_report``); ``teachers`` (G-O3), ``explain`` (G-O4), ``rollback`` (G-O5) and ``soak`` (G-P4), in
:mod:`.drills`. A drill in another module registers at import; list the module in :data:`DRILL_MODULES`
(or import it before the config is validated) so its name validates.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import DistillgateError


class NoDrillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Drill:
    name: str
    fn: Callable[["DrillContext", BaseModel], dict]
    metrics: tuple[str, ...]
    options_key: str
    Options: type[BaseModel] = NoDrillOptions
    description: str = ""


@dataclass
class DrillContext:
    """What a drill gets: the iteration, the run, the student now and its tokenizer, a seed, a version label."""

    it: Any
    run: Any
    model: Any
    tokenizer: Any
    version: str
    seed: int
    work: Path
    say: Callable[[str], None] = print
    extra: dict = field(default_factory=dict)


DRILLS: dict[str, Drill] = {}
DRILL_MODULES = ["distillgate.ops.operations", "distillgate.ops.drills"]  # modules that register drills (imported before validation)


def register_drill(name: str, fn, *, metrics: list[str] | tuple[str, ...], options_key: str,
                   Options: type[BaseModel] = NoDrillOptions, description: str = "") -> None:
    """Register drill ``name``: ``fn(ctx, options) -> report``; the report goes to ``options_key`` of the gate
    context, and validate measures ``metrics`` (registered metric providers reading that key)."""
    if not metrics:
        raise ValueError(f"drill {name!r}: metrics must name at least one gate metric")
    DRILLS[name] = Drill(name, fn, tuple(metrics), options_key, Options, description)


def available_drills() -> dict[str, Drill]:
    for mod in DRILL_MODULES:
        importlib.import_module(mod)
    return DRILLS


def _breaker(ctx: DrillContext, options) -> dict:
    from .breaker_drill import run_breaker_drill

    return run_breaker_drill(ctx.model, ctx.tokenizer, options, version=ctx.version, seed=ctx.seed, say=ctx.say)


def _register_builtins() -> None:
    from .breaker_drill import BreakerDrillOptions

    register_drill("breaker", _breaker, metrics=["breaker_switch_ms", "degraded_compliance_pct"],
                   options_key="breaker_report", Options=BreakerDrillOptions,
                   description="G-O1: attack corpus + normal traffic through the gateway in front of the student")


_register_builtins()


class OperationsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    drills: dict[str, dict] = Field(default_factory=lambda: {"breaker": {}},
                                    description="drill name -> its options (registered drills: breaker (G-O1), "
                                                "teachers (G-O3), explain (G-O4), rollback (G-O5), soak "
                                                "(G-P4); others register with distillgate.ops.operations.register_drill)")
    start_iteration: int = Field(1, ge=0, description="first iteration the drills run in")
    every: int = Field(1, ge=1, description="the drills run every this many iterations")
    when: Literal["always", "capability_pass"] = Field(
        "always", description="'capability_pass': only once the previous iteration passed every measured "
                              "capability gate (operations drills are for a student worth serving)")

    @model_validator(mode="after")
    def _drills_known(self):
        drills = available_drills()
        for name, opts in self.drills.items():
            if name not in drills:
                raise ValueError(f"drills.{name}: not a registered drill (registered: {sorted(drills)})")
            try:
                drills[name].Options.model_validate(opts or {})
            except ValidationError as e:
                err = e.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
                raise ValueError(f"drills.{name}.{loc}: {msg} (options of drill {name!r}: "
                                 f"{sorted(drills[name].Options.model_fields)})") from None
        return self

    def drill_options(self, name: str) -> BaseModel:
        return available_drills()[name].Options.model_validate(self.drills[name] or {})


def capability_passed(run) -> bool:
    """The previous iteration measured at least one capability gate and passed every one it measured."""
    from ..gates import evaluate_gates, load_gate_spec

    if not run.state.history:
        return False
    rep = evaluate_gates(load_gate_spec(run.cfg.loop.gates_spec), run.state.history[-1]["metrics"])
    return rep.dimensions["capability"].status == "pass"


class OperationsStage:
    """Operations drills as a loop stage (``iterations: 0``; it watches the other iterations)."""

    name, code = "operations", "G-O"
    Options = OperationsOptions

    def __init__(self, options: OperationsOptions | None = None):
        self.options = options or OperationsOptions()

    def _state(self, run) -> dict:
        return run.stage_state(getattr(self, "state_key", self.name))

    def due(self, it, run) -> bool:
        o = self.options
        if it.index < o.start_iteration or (it.index - o.start_iteration) % o.every:
            return False
        return o.when == "always" or capability_passed(run)

    def observe(self, phase, it, run) -> None:
        if phase != "validate" or not self.options.drills:
            return
        if not self.due(it, run):
            if self.options.when == "capability_pass" and it.index >= self.options.start_iteration:
                run.say(f"  operations: drills wait (the capability gates did not all pass before iteration "
                        f"{it.index})")
            return
        self.run_drills(it, run)

    def run_drills(self, it, run) -> None:
        from ..io import atomic_write_text
        from ..train import distributed as dist

        drills = available_drills()
        done = self._state(run).setdefault("drills", [])
        run.work.mkdir(parents=True, exist_ok=True)
        for name in self.options.drills:
            d = drills[name]
            opts = self.options.drill_options(name)
            ctx = DrillContext(it, run, run.student, run.teacher.tokenizer, f"iteration {it.index}",
                               int(getattr(opts, "seed", 0)) * 1000 + it.index, Path(run.work), run.say)
            rep = err = None
            if dist.is_main():  # under torchrun one drill (one gateway, one set of backends), its report to all
                try:
                    rep = d.fn(ctx, opts)
                except DistillgateError as e:  # bad input or a failed serve: the drill's gates stay not measured
                    err = str(e)
            rep, err = dist.broadcast_object((rep, err))
            if err is not None:
                run.say(f"  operations: drill {name} failed, its gates stay not measured: {err}")
                done.append({"iteration": it.index, "drill": name, "error": err})
                continue
            it.measure_options[d.options_key] = rep
            it.extra_metrics += [m for m in d.metrics if m not in it.extra_metrics]
            out = Path(run.work) / f"ops-{name}-{it.index:03d}.json"
            atomic_write_text(out, json.dumps(rep, indent=1, default=str))
            it.files[f"ops-{name}.json"] = out
            done.append({"iteration": it.index, "drill": name, "file": f"ops-{name}.json"})
        import shutil

        shutil.rmtree(Path(run.work) / f"ops-student-{it.index:03d}", ignore_errors=True)  # drills.py's saved copy
