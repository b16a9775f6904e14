"""The run's services: what a stage (and the core) may use, and the only code that holds the run's models.

:class:`Run` implements :class:`~distillgate.loop.contract.RunServices`: the teacher, the student
(``replace_student`` / ``restore_student`` keep the structure descriptor, the layer map, the perf staleness and
the recipe's ``student.structure`` right), the held-out examples, the training set (``run.training``), training
(``distil``), measurement through the one metric registry (``measure``), each stage's namespaced state
(``stage_state``) and a work folder.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import pipeline
from ..schema import Finding
from ..train import distributed as dist
from .ranks import work_root
from .state import LoopState, StageState
from .training_set import TrainingSet, prompt_pool

log = logging.getLogger(__name__)


def initial_recipe(cfg) -> dict:
    share = round(1.0 / len(cfg.data.domains), 6)
    return {"loss": {"channels": dict(cfg.loss.channels), "temperature": cfg.loss.temperature.model_dump(),
                     "domain_weights": dict(cfg.loss.domain_weights), "divergence": cfg.loss.divergence,
                     "domain_channel_shares": {d: dict(v) for d, v in cfg.loss.domain_channel_shares.items()}},
            "train": {"lr": cfg.train.lr, "steps": cfg.train.steps},
            "data": {"mix": {d: share for d in cfg.data.domains}},
            "hard_pool": {}, "curriculum": {"tier": "lm"}, "student": {"structure": None}}


def apply_recipe(cfg, recipe: dict):
    """The iteration's config: the run config with the recipe's knobs in place (validated again)."""
    import copy

    d = cfg.model_dump()
    d["loss"].update({k: copy.deepcopy(v) for k, v in recipe["loss"].items()})
    d["train"].update(recipe["train"])
    return type(cfg).model_validate(d)


@dataclass
class Measurement:
    values: dict
    notes: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)   # SampleDivergence per held-out example (when measured)


class Run:
    def __init__(self, cfg, store, *, max_iterations: int, progress=None, console=None):
        self.cfg, self.store, self.progress, self.console = cfg, store, progress, console
        self.work = work_root(store)  # under torchrun: a private folder on ranks > 0 (they never write the store)
        self.max_iterations = max_iterations
        self.state = LoopState()
        self.teacher = None
        self._student = None
        self.heldout: list = []
        self.selection: list = []       # the exploration's selection split (teacher answers; never trained on)
        self.training: TrainingSet | None = None
        self.teacher_cache: dict = {}   # teacher-side measurements, valid for this teacher and data (one run)
        self.current = None             # the Iteration being run
        self.lineage_note: dict | None = None  # goes into the next committed version's meta (e.g. teacher_changed)
        self.placement: dict = {}       # where each model runs (W3): committed in every version's meta

    # ------------------------------------------------------------------------------------- basics
    def say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    @property
    def student(self):
        return self._student

    def stage_state(self, name: str) -> dict:
        """Stage ``name``'s own state (a JSON-able dict): saved in every version, restored by ``--resume``."""
        return self.state.stages.setdefault(name, StageState()).data

    # ------------------------------------------------------------------------------------- setup
    def setup(self, state: LoopState | None, student_dir: Path | None) -> None:
        from ..models import load_model

        for stale in Path(self.store.dir).glob(".student-*") if dist.is_main() else ():  # a killed commit's staging
            shutil.rmtree(stale, ignore_errors=True)
        self.teacher = pipeline.load_teacher(self.cfg)
        self.placement.update(teacher=self.teacher.placement.to_json(), ranks=dist.world_size())
        show = self.progress is not False
        fresh = state is None
        self.state = LoopState(recipe=initial_recipe(self.cfg)) if fresh else state
        self.training = TrainingSet(self.cfg, self.teacher, self.state, prompt_pool(self.cfg, self.max_iterations),
                                    progress=show)
        if fresh:
            held = self.training.take(self.cfg.loop.heldout_prompts, self.state.recipe["data"]["mix"], "lm", seed=-1)
            self.state.heldout_prompts = [p.id for p in held]
            n_sel = self.cfg.loop.strategy.exploration.selection_prompts
            if n_sel:  # after the held-out prompts, so it can never hold one of them
                sel = self.training.take(n_sel, self.state.recipe["data"]["mix"], "lm", seed=-3)
                self.state.selection_prompts = [p.id for p in sel]
        self.heldout = self.training.answers([self.training.pool[i] for i in self.state.heldout_prompts])
        self.selection = self.training.answers([self.training.pool[i] for i in self.state.selection_prompts])
        self.training.restore()
        if student_dir is not None:
            self.replace_student(load_model(str(student_dir)).model, "resumed")

    def ensure_student(self, it) -> None:
        """The initial student (once per run, before the first map): derived by importance from the teacher,
        loaded, or built from a config (``student.init``), on 16 calibration prompts of the teacher's answers."""
        if self._student is not None:
            return
        calib_prompts = self.training.take(16, it.recipe["data"]["mix"], "lm", seed=-2)
        new = self.training.add_prompts(it.index, calib_prompts)
        s = self.cfg.student
        calib = pipeline.calibration_ids(self.cfg, self.teacher.tokenizer, new) if s.init == "derive" else None
        if s.init == "derive":
            self.say(f"  deriving the student: {s.layer_selection} to {s.num_layers or 'half the'} layers"
                     f"{f', MLP {s.mlp_width}' if s.mlp_width else ''} on {calib.numel()} calibration tokens "
                     f"(greedy selection tries each block: minutes on a CPU)")
        t0 = time.time()
        student, info = pipeline.build_student(self.cfg, self.teacher, calib)
        rep = info.get("report") or {}
        if rep:
            self.say(f"  kept teacher layers {rep.get('kept_layers')}; calibration PPL teacher "
                     f"{rep.get('teacher_ppl') or float('nan'):.2f} -> student {rep.get('student_ppl') or float('nan'):.2f} "
                     f"({time.time() - t0:.0f} s)")
        self.state.student_init = info
        self.replace_student(student, f"initial student ({info.get('init')})", layer_map=info.get("layer_map"))

    # ------------------------------------------------------------------------------------- the student
    def replace_student(self, model, change: str, *, layer_map=None) -> None:
        """Make ``model`` the student: the structure descriptor in this iteration's and the next recipe
        (``student.structure``, which attribution can blame), the layer map, and perf marked stale when the
        structure changed (validate re-measures it)."""
        import torch

        from ..models.info import structure
        from ..placement import place_student

        self.placement["student"] = place_student(self.cfg.student).to_json()
        self._student = model.to(self.placement["student"]["device"], getattr(torch, self.cfg.student.dtype))
        model.train()
        desc = structure(model)
        if layer_map is not None:
            self.state.layer_map = layer_map
        for recipe in (self.state.recipe, getattr(self.current, "recipe", None)):
            if recipe is not None:
                recipe.setdefault("student", {})["structure"] = desc
        log.info("student replaced: %s (%s)", change, desc)

    def restore_student(self, version) -> None:
        """Bring back the student weights of ``version`` (an id, an alias or a Version) as the student."""
        from ..models import load_model

        v = version if hasattr(version, "checkout") else (
            self.store.resolve(version) if isinstance(version, str) else self.store.get_version(int(version)))
        folder = v.checkout("student", self.work / "restore-student", replace=True)
        self.replace_student(load_model(str(folder)).model, f"restored from version {v.version_id}")
        if self.current is not None and v.iteration is not None:
            # this iteration's changes are judged against what it started from, not the iteration before it
            self.current.baseline_iteration = v.iteration

    # ------------------------------------------------------------------------------------- training
    def distil(self, it, *, steps: int | None = None, examples: list | None = None, callbacks=(), channels=None,
               stop_at: int | None = None, out_dir=None, branch_from=None):
        """Train the student in place on ``examples`` (default: the whole training set) with this iteration's
        recipe (objective, lr, hard pool) for ``steps`` (default: the recipe's); metrics go to ``it``.
        ``callbacks``: ``fn(StepInfo)`` after every optimizer step (e.g. a prune stage's gate schedule).
        ``channels``: a :class:`distillgate.side_channels.ChannelSetup` for the attn / feature channels (the joint
        stage builds it); without one those channels are left out of this call, with a finding.
        ``it.continue_from`` (the exploration's winner): continue that checkpoint (weights, AdamW state, schedule
        and data position) to ``steps`` instead of starting fresh; it is used once.
        ``stop_at`` (the exploration's screens): stop after that many steps of the ``steps``-step schedule and
        keep the checkpoint under ``out_dir`` (default: the iteration's scratch folder, deleted after training).
        ``branch_from`` (the exploration's screens after a shared prefix): continue that checkpoint like
        ``continue_from`` but leave it in place (several screens branch from it)."""
        from ..train import StopTraining
        from ..data.dataset import DistillDataset
        from ..side_channels import SIDE_CHANNELS, side_channels_on

        exs = self.training.examples if examples is None else examples
        ds = DistillDataset(exs, pad_id=pipeline.pad_id(self.teacher.tokenizer), seq_len=self.cfg.data.seq_len,
                            heldout_fraction=0.0)
        cfg = it.cfg
        if channels is None and side_channels_on(cfg.loss):
            off = {k: w for k, w in cfg.loss.channels.items() if k in SIDE_CHANNELS and w > 0}
            rest = {k: w for k, w in cfg.loss.channels.items() if k not in SIDE_CHANNELS}
            it.findings.append(Finding("channels", "warning", "map", f"channels {sorted(off)} need their teacher data, "
                                       f"which this stage does not build: trained without them this iteration",
                                       {"channels": off}))
            cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"channels": rest})})
        provider = self.training.provider()
        if channels is not None:
            provider = pipeline.channel_provider(channels, cfg, self.teacher, provider, self.training.groups)
        objective = pipeline.make_objective(cfg, provider, vocab_size=len(self.teacher.tokenizer), examples=exs,
                                            tokenizer=self.teacher.tokenizer, prompts=self.training.pool,
                                            side=channels)
        out = self.work / f"iter-{it.index:03d}" if out_dir is None else Path(out_dir)
        shutil.rmtree(out, ignore_errors=True)  # a crashed attempt of this iteration restarts clean
        resume, it.continue_from = it.continue_from, None
        consumed = resume is not None
        if branch_from is not None:
            resume, consumed = str(branch_from), False
        if stop_at is not None:
            def stop(info, _n=int(stop_at)):
                if info.step >= _n:
                    raise StopTraining
            callbacks = (*callbacks, stop)
        update = {"seed": self.cfg.train.seed + it.index, "checkpoint_every": 0}
        if steps is not None:
            update["steps"] = steps
        if stop_at is None and it.extra_steps:  # a resting exploration's budget, reinvested (used once)
            update["steps"] = int(update.get("steps", it.cfg.train.steps)) + it.extra_steps
            it.extra_steps = 0
        spec = it.cfg.train.model_copy(update=update)
        if channels is not None:
            channels.attach(self._student)
            callbacks = (*callbacks, channels.on_step)
        try:
            res = pipeline.map_student(self._student, objective, ds, spec, out, seed=spec.seed,
                                       hard_weights=it.recipe.get("hard_pool") or None, progress=self.progress,
                                       callbacks=callbacks, tensorboard=False,  # per-iteration trackers: LoopTracker
                                       resume_from=resume)
        finally:
            if channels is not None:
                channels.detach()
        # The iteration's result is committed as a version; its scratch checkpoints (weights + AdamW state,
        # ~0.8 GB for a 68M student) are not needed once training returned (a screen's are: it may continue).
        if stop_at is None:
            shutil.rmtree(out, ignore_errors=True)
        if consumed:  # a continued screen's checkpoint is consumed
            shutil.rmtree(resume, ignore_errors=True)
        it.train_terms = dict(res.final_terms)
        it.metrics.update(dist.broadcast_object({  # rank 0's timings on every rank: the same state everywhere
            "train/tokens_per_s": res.tokens_per_s, "train/loss": res.final_loss,
            "train/skipped_steps": res.skipped_steps, "train/rollbacks": res.rollbacks, "train/examples": len(exs),
            "train/steps": res.steps}))
        for k, v in res.final_terms.items():
            it.metrics[f"loss/{k}"] = v
        if res.skipped_steps or res.rollbacks:
            it.findings.append(Finding("nonfinite", "warning", "train",
                                       f"{res.skipped_steps} non-finite step(s) skipped, {res.rollbacks} "
                                       f"rollback(s) to the last good checkpoint", {"events": res.events}))
        return res

    # ------------------------------------------------------------------------------------- measurement
    def measure_options(self, extra: dict | None = None) -> dict:
        """Provider options from the run config (sizes of every check), plus ``extra``."""
        c, lp = self.cfg, self.cfg.loop
        return {"heldout": self.heldout, "ppl_text": c.eval.text_file, "ppl_tokens": c.eval.max_tokens,
                "lengths": lp.perf_lengths, "repeats": lp.perf_repeats, "context_len": max(lp.perf_lengths),
                "inheritance_groups": lp.inheritance_groups, "path_instructions": lp.path_instructions,
                "data_dir": lp.data_dir, "seed": c.train.seed, "serving": lp.serving, **(extra or {})}

    def measure(self, metrics: list[str], **options) -> Measurement:
        """Measure ``metrics`` on the current student through the metric registry (the one ``distillgate
        gates`` uses), with the run's options (``options`` override them); the student is in eval mode."""
        from ..evaluate.providers import load_providers, measure_student

        from ..evaluate.providers import HELDOUT_METRICS

        load_providers()
        opts, done = self.measure_options(options), None
        if dist.world_size() > 1 and opts.get("heldout") and set(metrics) & {*HELDOUT_METRICS, "ppl_ratio"}:
            # every rank: the held-out comparison, its batches split over the ranks and merged
            _, _, done = measure_student(self.teacher, self._student, ["kl"], opts, self.teacher_cache)
        result = None
        if dist.is_main():  # then rank 0 measures the rest alone (timings undisturbed); every rank gets the
            with dist.solo():  # numbers, so attribution and the next recipe are the same on every rank
                values, notes, ctx = measure_student(self.teacher, self._student, metrics, opts,
                                                     self.teacher_cache, done)
            result = Measurement(values, notes, ctx.details, ctx.cache.get("heldout_samples") or [])
        return dist.broadcast_object(result)
