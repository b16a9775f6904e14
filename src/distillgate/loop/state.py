"""The loop's state: everything a resumed run needs to continue as if never stopped, typed and versioned.

Saved as ``loop_state.json`` in every committed version; ``--resume`` reads it back from the version
``current`` points to. Only the loop core and the run services write it; stages keep theirs in ``stages``
(namespaced by stage name, through ``run.stage_state(name)``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ArtifactError

LOOP_STATE_VERSION = 2


class LastGood(BaseModel):
    """The newest iteration without a regression or a non-finite step: its recipe and its version (whose
    weights ``run.restore_student`` can bring back). ``version`` None: the version holding this state."""

    model_config = ConfigDict(extra="forbid")
    iteration: int
    version: int | None = None
    recipe: dict


class StageState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    data: dict[str, Any] = Field(default_factory=dict)


class LoopState(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)
    format_version: int = LOOP_STATE_VERSION
    heldout_prompts: list[str] = Field(default_factory=list)
    used_prompts: dict[str, list[str]] = Field(default_factory=dict)   # iteration -> prompt ids it added
    recipe: dict = Field(default_factory=dict)                         # the next iteration's recipe
    history: list[dict] = Field(default_factory=list)                  # per iteration: metrics, terms, recipe
    decisions: list[dict] = Field(default_factory=list)
    pass_streak: int = 0
    last_good: LastGood | None = None
    best: dict | None = None                                           # {iteration, kl}
    perf: dict | None = None                                           # last perf measurement's metrics
    perf_structure: dict | None = None                                 # the structure perf was measured on
    student_init: dict | None = None
    layer_map: Any = None
    stages: dict[str, StageState] = Field(default_factory=dict)
    selection_prompts: list[str] = Field(default_factory=list)         # the exploration's selection split
    strategy: dict[str, Any] = Field(default_factory=dict)             # what the strategy measured (knobs.Memory)

    @classmethod
    def load(cls, data: dict, where: str = "loop_state.json") -> "LoopState":
        if data.get("format_version") != LOOP_STATE_VERSION:
            raise ArtifactError(f"{where}: loop state format {data.get('format_version')} (this version reads "
                                f"{LOOP_STATE_VERSION}); resume it with the distillgate version that wrote it")
        return cls.model_validate(data)

    def to_json(self) -> dict:
        return self.model_dump(mode="json")
