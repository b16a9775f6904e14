"""S2 multi-granularity joint distillation (SPEC S2): each iteration extracts the teacher's answers to new
prompts (mixed by the recipe's domain shares and curriculum tier) and trains the student on every example so
far through the recipe's loss channels."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..schema import Finding


class JointOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: int | None = Field(None, ge=0, description="new prompts per iteration (default: "
                                                        "loop.prompts_per_iteration)")
    steps: int | None = Field(None, ge=1, description="optimizer steps per iteration (default: the recipe's "
                                                      "train.steps)")


class JointStage:
    name, code = "joint", "S2"
    Options = JointOptions

    def __init__(self, options: JointOptions | None = None):
        self.options = options or JointOptions()

    def extract(self, it, run) -> None:
        n = run.cfg.loop.prompts_per_iteration if self.options.prompts is None else self.options.prompts
        n = int(it.recipe.get("data", {}).get("prompts", n))  # the strategy's new-data volume knob, when set
        new = run.training.take(n, it.recipe["data"]["mix"], it.recipe["curriculum"]["tier"], it.index)
        if n and not new:
            it.findings.append(Finding("data", "warning", "prompts",
                                       "the prompt pool is exhausted: no new prompts this iteration"))
        run.training.add_prompts(it.index, new)

    def map(self, it, run) -> None:
        run.distil(it, steps=self.options.steps)
