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
        from ..io import atomic_write_json

        setup = self._channels(it, run)
        run.distil(it, steps=self.options.steps, **({} if setup is None else {"channels": setup}))
        if setup is not None:   # the plan, the caches' bytes/position, top-k mass, PCA error, the final gates
            st = run.stage_state(getattr(self, "state_key", self.name))
            atomic_write_json(it.files["channels"], {**setup.record(), "head_scores": st.get("head_scores")})

    def _channels(self, it, run):
        """The attn / feature channels' setup for this iteration (None when both are off). The key heads are
        found once (rollout on the run's first examples) and kept in the stage state, so later iterations and a
        resumed run align the same heads; a pruned student's heads follow the prune stage's keep sets."""
        from .. import pipeline
        from ..side_channels import side_channels_on
        from ..teacher_side import head_map_from_keep

        if not side_channels_on(it.cfg.loss):
            return None
        st = run.stage_state(getattr(self, "state_key", self.name))
        keep = next((s.data["keep_total"] for s in run.state.stages.values() if "keep_total" in s.data), None)
        setup = pipeline.channel_setup(it.cfg, run.teacher, run.student, run.state.layer_map, run.training.examples,
                                       head_map=head_map_from_keep(keep), known_heads=st.get("key_heads"))
        heads = setup.plan.heads
        if heads:
            if "key_heads" not in st:
                st["key_heads"] = [[p.teacher_layer, p.teacher_head, p.score] for p in heads]
                st["head_scores"] = setup.plan.head_scores
            run.say("  attn: teacher key heads " + ", ".join(f"L{p.teacher_layer}.H{p.teacher_head}" for p in heads))
            it.findings.append(Finding("channels", "info", "map", "attn aligns teacher heads " + ", ".join(
                f"L{p.teacher_layer}.H{p.teacher_head} (score {p.score:.3f}) -> student L{p.student_layer}.H"
                f"{p.student_head}" for p in heads), {"heads": [list(map(float, (p.teacher_layer, p.teacher_head,
                                                                                   p.score))) for p in heads]}))
        path = run.work / f"channels-{it.index:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        it.files["channels"] = str(path)
        return setup
