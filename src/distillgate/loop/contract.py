"""The plug-in contract between the loop core and its stages (SPEC L1, section 2). No heavy imports.

A **stage** is any object with

* ``name`` (its config name), ``code`` (the SPEC stage it implements: S1..S4);
* ``Options``: a pydantic model, the stage's config section ``loop.stages[i].options`` (validated at preflight;
  errors name ``loop.stages[i].options.<field>``); the instance gets it as ``stage.options``;
* optional hooks ``extract(it, run)``, ``map(it, run)``, ``validate(it, run)``, ``attribute(it, run)``, called in
  phase order in each iteration the stage owns, *before* the core's own part of that phase (the core makes sure
  a student exists before map, measures the gates after validate, attributes after attribute, runs the strategy
  in compensate, then commits);
* optional ``observe(phase, it, run)``: called at the start of every phase of *every* iteration of the run (the
  stage's own or not, iteration 0 included), before that phase's hooks; it may only add to what the iteration
  measures and keeps (``it.extra_metrics``, ``it.measure_options``, ``it.files``, ``it.findings``,
  ``it.teacher_metrics``) and to its own state. The anchor uses it to measure every student against the
  teacher's benchmark profile (S1.3) in the iterations other stages own;
* optional ``rules()``: strategy rules ``[(name, fn(step))]`` (see :mod:`distillgate.strategy`), run after the
  core rules in every iteration of the run;
* optional class attribute ``setup_only = True``: the stage only works in iteration 0 (its entry must say
  ``iterations: 0``). An entry with ``iterations: 0`` takes part in iteration 0, the setup iteration.

A stage is built once per run, ``factory(options)``; what it must remember across iterations lives in
``run.stage_state(stage.state_key)`` (a JSON-able dict saved in every committed version and restored by
``--resume``), never in attributes, so resume stays bitwise. ``state_key`` is set by the registry: the stage's
name, or ``name[i]`` when the same stage appears in several entries of ``loop.stages`` (each entry its own).

``it`` is the :class:`Iteration` (this iteration's recipe, config, metrics, findings, files to commit) and
``run`` the :class:`RunServices` (teacher, student, data, training, measurement, store access). A stage touches
only these two; it never imports the loop core, and can be unit-tested against a fake ``run``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from ..schema import PHASES  # noqa: F401  (re-exported: the phase order hooks follow)

HOOKS = ("extract", "map", "validate", "attribute")


class NoOptions(BaseModel):
    """A stage without options: ``options`` must be empty."""

    model_config = ConfigDict(extra="forbid")


@runtime_checkable
class Stage(Protocol):
    name: str
    code: str
    Options: type[BaseModel]


@dataclass
class Iteration:
    """One iteration's working set, filled phase by phase and committed as one version."""

    index: int
    stage: Any                      # the stage instance (None for a setup iteration without setup stages)
    recipe: dict                    # the knobs this iteration runs with (a copy; the next one is built apart)
    cfg: Any                        # the run config with the recipe applied (RunConfig)
    metrics: dict = field(default_factory=dict)
    teacher_metrics: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)          # SampleDivergence per held-out example
    hard_candidates: list = field(default_factory=list)  # SampleDivergence per recent training example
    findings: list = field(default_factory=list)         # schema.Finding
    decisions: list = field(default_factory=list)        # schema.Decision
    train_terms: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # logical name -> path (file or folder) to commit with the version
    gates: Any = None                          # GateReport
    next_recipe: dict | None = None
    measure_options: dict = field(default_factory=dict)  # provider options a stage adds for this iteration
    extra_metrics: list = field(default_factory=list)    # registered metrics a stage asks validate to measure
    # metric -> relative worsening this iteration's change is expected to cost (a prune cut): attribution
    # reports a regression only past max(the metric's threshold, this); the reason goes into the finding
    tolerances: dict = field(default_factory=dict)
    tolerance_reason: str = ""
    # the iteration whose metrics attribution compares this one with: the previous one, unless the student was
    # restored from a version during this iteration (run.restore_student sets it to that version's iteration)
    baseline_iteration: int | None = None
    regression_evidence: dict = field(default_factory=dict)  # what a stage knows about where a regression would
    # come from (a prune cut's per-layer heat map): added to this iteration's regression findings
    # a training checkpoint the iteration's next ``run.distil`` continues from instead of starting fresh: the
    # exploration's winner (PBT exploit: its weights, AdamW state, schedule and data position); used once
    continue_from: str | None = None
    # knob -> why no rule may move it for the next recipe: the exploration screened it this iteration and kept
    # its value (no variant of it beat the main recipe); an adopted variant is held through it.decisions. With
    # ``screen_bounds`` a value is ``{"why", "refuted": [[incumbent, value], ...]}``: the knob may move toward a
    # refuted value, not to it or past it
    screened: dict = field(default_factory=dict)
    # optimizer steps the iteration's next main training (``run.distil`` without ``stop_at``) adds to its
    # schedule: the budget of an exploration that rests (reinvest); used once
    extra_steps: int = 0

    @property
    def iteration(self) -> int:  # the name the older hooks used
        return self.index


class RunServices(Protocol):
    """What a stage may use (see :class:`distillgate.loop.run.Run` for the implementation)."""

    cfg: Any
    teacher: Any
    work: Any

    @property
    def student(self): ...
    def replace_student(self, model, change: str) -> None: ...
    def restore_student(self, version) -> None: ...
    def stage_state(self, name: str) -> dict: ...
    def measure(self, metrics: list[str], **options) -> dict: ...
    def distil(self, it: Iteration, *, steps: int | None = None, examples: list | None = None,
               callbacks=(), channels=None): ...
    def say(self, msg: str) -> None: ...


StageFactory = Callable[[BaseModel], Any]
