"""`distillgate run`: the closed loop (SPEC L1-L3, W4, W6, W7, D3).

Each iteration runs extract -> map -> validate -> attribute -> compensate, every phase timed and recorded,
then commits one version to the run store (student weights, recipe, scorecard, gates, findings, loop state)
and moves the aliases. Iteration 0 anchors: held-out set, teacher baseline (and its S1 profile when the
``anchor`` stage is configured), the student derived by importance, and its first scorecard. Later iterations
belong to the configured stages (``stages.py``). The run ends when the gates pass ``converge_after``
consecutive evaluations (converged) or its iteration or wall-clock budget is spent.

Resume: every committed version carries ``loop_state.json`` (the next recipe and the history the strategy
reads). ``--resume`` restores the student and state of the version ``current`` points to and re-runs from the
next iteration; teacher answers and targets come back from their caches and training is seeded per
iteration, so the final weights equal an uninterrupted run's (bitwise on CPU).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import pipeline
from .attribution import MetricMeta, SampleDivergence, attribute
from .config import RunConfig
from .errors import ConfigError, InputError
from .io import distillgate_home, sha256_json
from .stages import PHASES, STAGES
from .strategy import Decision, StrategySpec, next_recipe

log = logging.getLogger(__name__)
LOOP_STATE_VERSION = 1
# Level shares of new prompts per curriculum tier (SPEC L3): simple statements first, nested conditions last.
TIER_LEVELS = {"lm": {1: 0.5, 2: 0.3, 3: 0.2}, "mid": {1: 0.2, 2: 0.5, 3: 0.3}, "high": {1: 0.1, 2: 0.3, 3: 0.6}}


def initial_recipe(cfg: RunConfig) -> dict:
    share = round(1.0 / len(cfg.data.domains), 6)
    return {"loss": {"channels": dict(cfg.loss.channels), "temperature": cfg.loss.temperature.model_dump(),
                     "domain_weights": dict(cfg.loss.domain_weights), "divergence": cfg.loss.divergence},
            "train": {"lr": cfg.train.lr, "steps": cfg.train.steps},
            "data": {"mix": {d: share for d in cfg.data.domains}},
            "hard_pool": {}, "curriculum": {"tier": "lm"}}


def apply_recipe(cfg: RunConfig, recipe: dict) -> RunConfig:
    """The iteration's config: the run config with the recipe's knobs in place (validated again)."""
    d = cfg.model_dump()
    d["loss"].update({k: copy.deepcopy(v) for k, v in recipe["loss"].items()})
    d["train"].update(recipe["train"])
    return RunConfig.model_validate(d)


@dataclass
class IterationContext:
    loop: "Loop"
    iteration: int
    stage: object
    recipe: dict
    cfg: RunConfig
    metrics: dict = field(default_factory=dict)
    teacher_metrics: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)
    hard_candidates: list = field(default_factory=list)
    findings: list = field(default_factory=list)
    decisions: list = field(default_factory=list)
    train_terms: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # logical name -> path (file or folder) to commit
    gates: object = None
    next_recipe: dict | None = None


class Loop:
    def __init__(self, cfg: RunConfig, store, *, progress: bool | None = None, console=None):
        self.cfg, self.store, self.progress = cfg, store, progress
        self.console = console
        self.work = Path(store.dir) / "work"
        self.state: dict = {}
        self.teacher = self.student = None
        self.heldout: list = []
        self.train_examples: list = []
        self.target_caches: list = []

    # ------------------------------------------------------------------------------------- setup / resume
    def _say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    def _pool(self) -> list:
        """Every prompt the run may use, in a fixed order (deterministic from the config)."""
        from .data.prompts import builtin_prompts, prompts_from_spec

        c = self.cfg
        if c.data.source == "builtin":
            need = c.loop.heldout_prompts + 16 + 3 * c.loop.prompts_per_iteration * self.max_iterations()
            return builtin_prompts(need, c.data.domains, c.data.seed)
        pool = prompts_from_spec(c.data.model_copy(update={"num_prompts": 10 ** 9}))
        random.Random(c.data.seed).shuffle(pool)
        return pool

    def max_iterations(self) -> int:
        return 1 + sum(s.iterations for s in self.cfg.loop.stages if s.name != "anchor")

    def schedule(self) -> list[tuple[int, str]]:
        names = [s.name for s in self.cfg.loop.stages]
        out = [(0, "anchor" if "anchor" in names else "setup")]
        k = 1
        for s in self.cfg.loop.stages:
            if s.name == "anchor":
                continue
            for _ in range(s.iterations):
                out.append((k, s.name))
                k += 1
        return out

    def setup(self, resume_state: dict | None = None, student_dir: Path | None = None) -> None:
        from .models import load_model

        for stale in Path(self.store.dir).glob(".student-*"):  # staging of a commit that was killed
            shutil.rmtree(stale, ignore_errors=True)

        self.teacher = pipeline.load_teacher(self.cfg)
        pool = self._pool()
        self.pool = {p.id: p for p in pool}
        self.pool_order = [p.id for p in pool]
        if resume_state is None:
            held = self._take(self.cfg.loop.heldout_prompts, initial_recipe(self.cfg)["data"]["mix"], "lm", set(),
                              seed=-1)
            self.state = {"format_version": LOOP_STATE_VERSION, "heldout_prompts": [p.id for p in held],
                          "used_prompts": {}, "recipe": initial_recipe(self.cfg), "history": [],
                          "decisions": [], "pass_streak": 0, "last_good": None, "best": None,
                          "structure": None, "perf": None}
        else:
            self.state = resume_state
        data = self.cfg.data.model_copy(update={"heldout_fraction": 0.0})
        self.data_spec = data
        held = [self.pool[i] for i in self.state["heldout_prompts"]]
        self.heldout = pipeline.extract(self.teacher, held, data, progress=self.progress is not False).examples("all")
        for k in sorted(self.state["used_prompts"], key=int):
            self._add_train([self.pool[i] for i in self.state["used_prompts"][k]])
        if student_dir is not None:
            self.student = load_model(str(student_dir)).model
            self.student.train()

    def _used(self) -> set[str]:
        used = set(self.state.get("heldout_prompts", []))
        for ids in self.state.get("used_prompts", {}).values():
            used |= set(ids)
        return used

    def _take(self, n: int, mix: dict[str, float], tier: str, used: set[str], seed: int) -> list:
        """``n`` unused prompts, split over domains by ``mix`` and over complexity levels by the tier.

        Counts per (domain, level) cell are allotted by largest remainders so they sum to exactly ``n`` (every
        domain with a share gets its part); a cell short of prompts is topped up from the rest of the pool."""
        rng = random.Random(f"{self.cfg.data.seed}:{seed}")
        levels = TIER_LEVELS[tier]
        free = [self.pool[i] for i in self.pool_order if i not in used]
        by_key: dict[tuple, list] = {}
        for p in free:
            by_key.setdefault((p.domain, p.level), []).append(p)
        total = sum(mix.values()) or 1.0
        cells = [((d, lv), n * share / total * lshare) for d, share in sorted(mix.items()) for lv, lshare in levels.items()]
        want = {k: int(x) for k, x in cells}
        short = n - sum(want.values())
        for k, x in sorted(cells, key=lambda c: -(c[1] - int(c[1])))[:max(short, 0)]:
            want[k] += 1
        chosen: list = []
        for k, w in want.items():
            bucket = by_key.get(k, [])
            chosen += bucket[:w]
            by_key[k] = bucket[w:]
        rest = [p for b in by_key.values() for p in b]
        rng.shuffle(rest)
        chosen += rest[: max(0, n - len(chosen))]
        return chosen[:n]

    def _add_train(self, prompts) -> list:
        if not prompts:
            return []
        ds = pipeline.extract(self.teacher, prompts, self.data_spec, progress=self.progress is not False)
        new = ds.examples("all")
        self.train_examples += new
        if self.cfg.targets.mode == "cached":
            self.target_caches.append(pipeline.teacher_provider(self.cfg, self.teacher, new,
                                                                progress=self.progress is not False))
        return new

    # ------------------------------------------------------------------------------------- stage work
    def build_initial_student(self, ctx: IterationContext) -> None:
        calib_prompts = self._take(16, ctx.recipe["data"]["mix"], "lm", self._used(), seed=-2)
        self.state["used_prompts"]["0"] = [p.id for p in calib_prompts]
        new = self._add_train(calib_prompts)
        calib = pipeline.calibration_ids(self.cfg, self.teacher.tokenizer, new) \
            if self.cfg.student.init == "derive" else None
        s = self.cfg.student
        if s.init == "derive":
            self._say(f"  deriving the student: {s.layer_selection} to {s.num_layers or 'half the'} layers"
                      f"{f', MLP {s.mlp_width}' if s.mlp_width else ''} on {calib.numel()} calibration tokens "
                      f"(greedy selection tries each block: minutes on a CPU)")
        t0 = time.time()
        self.student, info = pipeline.build_student(self.cfg, self.teacher, calib)
        rep = info.get("report") or {}
        if rep:
            self._say(f"  kept teacher layers {rep.get('kept_layers')}; calibration PPL teacher "
                      f"{rep.get('teacher_ppl') or float('nan'):.2f} -> student {rep.get('student_ppl') or float('nan'):.2f} "
                      f"({time.time() - t0:.0f} s)")
        self.state["student_init"] = info
        self.state["layer_map"] = info.get("layer_map")

    def anchor_profile(self, ctx: IterationContext) -> None:
        """S1: the teacher's profile on held-out teacher text, cached per teacher version."""
        from .profile import build_profile, load_profile, save_profile

        ids = [e.input_ids for e in self.heldout]
        flat = [t for row in ids for t in row][:1024]
        seq = 128
        n = (len(flat) // seq) * seq
        if n == 0:
            log.warning("held-out text too short to profile the teacher")
            return
        x = torch.tensor(flat[:n]).reshape(-1, seq)
        key = sha256_json([self.teacher.fingerprint, flat[:n]])[:16]
        path = distillgate_home() / "profiles" / key
        if path.exists():
            prof = load_profile(path)
        else:
            prof = build_profile(self.teacher.model, x, meta={"teacher": self.teacher.path})
            save_profile(prof, path, overwrite=False)
        ctx.files["teacher_profile"] = path
        ctx.teacher_metrics.update(prof.summary())

    def extract_iteration(self, ctx: IterationContext) -> None:
        r = ctx.recipe
        new = self._take(self.cfg.loop.prompts_per_iteration, r["data"]["mix"], r["curriculum"]["tier"],
                         self._used(), seed=ctx.iteration)
        if not new:
            ctx.findings.append({"kind": "data", "subject": "prompts", "severity": "warning",
                                 "message": "the prompt pool is exhausted: no new prompts this iteration",
                                 "data": {}})
        self.state["used_prompts"][str(ctx.iteration)] = [p.id for p in new]
        self._add_train(new)

    def train_iteration(self, ctx: IterationContext) -> None:
        from .data.dataset import DistillDataset

        ds = DistillDataset(self.train_examples, pad_id=pipeline.pad_id(self.teacher.tokenizer),
                            seq_len=self.cfg.data.seq_len, heldout_fraction=0.0)
        provider = pipeline.MultiTargets(self.target_caches) if self.cfg.targets.mode == "cached" else \
            pipeline.teacher_provider(self.cfg, self.teacher, [])
        objective = pipeline.make_objective(ctx.cfg, provider, vocab_size=len(self.teacher.tokenizer))
        out = self.work / f"iter-{ctx.iteration:03d}"
        shutil.rmtree(out, ignore_errors=True)  # a crashed attempt of this iteration restarts clean
        spec = ctx.cfg.train.model_copy(update={"seed": self.cfg.train.seed + ctx.iteration, "checkpoint_every": 0})
        res = pipeline.map_student(self.student, objective, ds, spec, out, seed=spec.seed,
                                   hard_weights=ctx.recipe.get("hard_pool") or None, progress=self.progress)
        # The iteration's result is committed as a version; its scratch checkpoints (weights + AdamW state,
        # ~0.8 GB for a 68M student) are not needed once training returned.
        shutil.rmtree(out, ignore_errors=True)
        ctx.train_terms = dict(res.final_terms)
        ctx.metrics.update({"train/tokens_per_s": res.tokens_per_s, "train/loss": res.final_loss,
                            "train/skipped_steps": res.skipped_steps, "train/rollbacks": res.rollbacks,
                            "train/examples": len(self.train_examples)})
        for k, v in res.final_terms.items():
            ctx.metrics[f"loss/{k}"] = v
        if res.skipped_steps or res.rollbacks:
            ctx.findings.append({"kind": "nonfinite", "subject": "train", "severity": "warning",
                                 "message": f"{res.skipped_steps} non-finite step(s) skipped, {res.rollbacks} "
                                            f"rollback(s) to the last good checkpoint", "data": {"events": res.events}})

    # ------------------------------------------------------------------------------------- core phases
    def _validate_core(self, ctx: IterationContext) -> None:
        from .gates import evaluate_gates, load_gate_spec

        v = pipeline.validate(self.student, self.teacher, self.heldout, ctx.cfg,
                              teacher_text_ppl=self.state.get("teacher_ppl_text"))
        ctx.metrics.update(v.metrics)
        ctx.samples = v.samples
        for k in ("teacher_ppl_heldout", "teacher_ppl_text"):
            if k in v.metrics:
                ctx.teacher_metrics[k] = v.metrics.pop(k)
                ctx.metrics.pop(k, None)
        self.state["teacher_ppl_text"] = ctx.teacher_metrics.get("teacher_ppl_text")
        structure = [self.student.config.num_hidden_layers, self.student.config.intermediate_size]
        if self.state.get("structure") != structure or not self.cfg.loop.perf_every_structure_change:
            from .perf import compare_perf

            self.student.eval()
            perf = compare_perf(self.teacher.model, self.student, self.teacher.tokenizer,
                                lengths=self.cfg.loop.perf_lengths, repeats=self.cfg.loop.perf_repeats,
                                context_len=max(self.cfg.loop.perf_lengths))
            self.student.train()
            self.state["perf"] = {"ttft_ratio": perf["ttft_ratio"], "peak_memory_ratio": perf["peak_memory_ratio"]}
            self.state["structure"] = structure
        ctx.metrics.update(self.state["perf"] or {})
        recent = self.train_examples[-32:]
        if recent and ctx.iteration > 0:
            _, ctx.hard_candidates = pipeline.heldout_divergence(self.student, self.teacher.model, recent,
                                                                 pipeline.pad_id(self.teacher.tokenizer))
        self._capability_checks(ctx)
        spec = load_gate_spec(self.cfg.loop.gates_spec)
        ctx.gates = evaluate_gates(spec, {k: v for k, v in ctx.metrics.items() if isinstance(v, (int, float))})

    def _capability_checks(self, ctx: IterationContext) -> None:
        """The slower G-C2/G-C3/G-C4 checks named in ``loop.capability_checks`` (teacher side cached)."""
        checks, t, tok = self.cfg.loop.capability_checks, self.teacher, self.teacher.tokenizer
        self.student.eval()
        try:
            if "inheritance" in checks:
                from .evaluate.inheritance import capability_inheritance

                r = capability_inheritance(self.student, t.model, tok, n_groups=self.cfg.loop.inheritance_groups,
                                           teacher_fingerprint=t.fingerprint)
                ctx.metrics["inheritance"] = r["inheritance"]
                ctx.metrics.update({f"inheritance/{k}": v for k, v in r["per_kind"].items()})
            if "decision_path" in checks:
                from .evaluate.decision_path import decision_path_consistency

                r = decision_path_consistency(self.student, t.model, tok, n=self.cfg.loop.path_instructions,
                                              teacher_fingerprint=t.fingerprint)
                ctx.metrics.update({"path_consistency": r["path_consistency"],
                                    "path_consistency_lenient": r["path_consistency_lenient"],
                                    "answer_agreement": r["answer_agreement"]})
            if "probes" in checks:
                from .evaluate.probes import f1_gap, probe_suite

                if not self.cfg.loop.data_dir:
                    raise ConfigError("loop.data_dir", None, "the evaluation datasets folder (needed by 'probes')")
                tr = self.state.get("teacher_probes") or probe_suite(t.model, tok, self.cfg.loop.data_dir)
                self.state["teacher_probes"] = tr
                gap = f1_gap(tr, probe_suite(self.student, tok, self.cfg.loop.data_dir))
                ctx.metrics["f1_gap_points"] = gap["f1_gap_points"]
        finally:
            self.student.train()

    def _attribute_core(self, ctx: IterationContext) -> None:
        hist = self.state["history"]
        prev = hist[-1]["metrics"] if hist else None
        thr = self.cfg.loop.regression_threshold
        meta = {"kl": MetricMeta(False, thr), "top1_agreement": MetricMeta(True, thr),
                "ppl_ratio": MetricMeta(False, thr), "student_ppl_heldout": MetricMeta(False, thr)}
        channels: dict[str, list[float]] = {}
        for h in hist + [{"terms": ctx.train_terms}]:
            for ch, v in (h.get("terms") or {}).items():
                channels.setdefault(ch, []).append(v)
        last_good = self.state["last_good"]
        failures = [g.model_dump() for g in ctx.gates.gates if g.status == "fail"] if ctx.gates else []
        found = attribute(iteration=ctx.iteration, metrics=ctx.metrics, prev=prev, teacher=ctx.teacher_metrics,
                          meta=meta, samples=ctx.samples, hard_candidates=ctx.hard_candidates, recipe=ctx.recipe,
                          last_good_recipe=last_good["recipe"] if last_good else None, channel_history=channels,
                          gate_failures=failures, plateau_threshold=self.cfg.loop.plateau_threshold)
        ctx.findings += found

    def _compensate_core(self, ctx: IterationContext) -> None:
        from .attribution import Finding

        findings = [f for f in ctx.findings if isinstance(f, Finding)]
        status = {g.id: g.status for g in ctx.gates.gates} if ctx.gates else {}
        recent = [Decision(**d) for d in self.state["decisions"][-32:]]
        last_good = self.state["last_good"]
        ctx.next_recipe, ctx.decisions = next_recipe(
            ctx.recipe, findings, iteration=ctx.iteration, last_good=last_good["recipe"] if last_good else None,
            gate_status=status, recent_decisions=recent, spec=StrategySpec())

    # ------------------------------------------------------------------------------------- one iteration
    def iteration(self, k: int, stage_name: str) -> IterationContext:
        stage = STAGES[stage_name]() if stage_name in STAGES else None
        recipe = copy.deepcopy(self.state["recipe"])
        ctx = IterationContext(self, k, stage, recipe, apply_recipe(self.cfg, recipe))
        self.store.begin_iteration(k)
        for phase in PHASES:
            t0 = time.time()
            status = "ok"
            try:
                if k == 0 and phase == "map":
                    self.build_initial_student(ctx)
                hook = getattr(stage, phase, None)
                if hook is not None:
                    hook(ctx)
                if phase == "validate":
                    self._validate_core(ctx)
                elif phase == "attribute":
                    self._attribute_core(ctx)
                elif phase == "compensate":
                    self._compensate_core(ctx)
            except BaseException:
                self.store.record_phase(k, phase, time.time() - t0, "failed")
                self.store.finish_iteration(k, "failed")
                raise
            self.store.record_phase(k, phase, time.time() - t0, status)
        t0 = time.time()
        vid = self.commit(ctx)
        self.store.record_phase(k, "commit", time.time() - t0, "ok")
        self.store.finish_iteration(k, "ok", converged=self.converged())
        ctx.metrics["version"] = vid
        return ctx

    def commit(self, ctx: IterationContext) -> int:
        from .models import save_model

        regressed = any(getattr(f, "kind", None) == "regression" for f in ctx.findings)
        nonfinite = any(isinstance(f, dict) and f.get("kind") == "nonfinite" for f in ctx.findings)
        gate_pass = bool(ctx.gates and ctx.gates.converged)  # D3: every gate measured and passing
        entry = {"iteration": ctx.iteration, "metrics": {k: v for k, v in ctx.metrics.items()
                                                         if isinstance(v, (int, float))},
                 "terms": ctx.train_terms, "recipe": ctx.recipe, "gates_passed": gate_pass}
        self.state["history"].append(entry)
        self.state["decisions"] += [d.to_dict() for d in ctx.decisions]
        self.state["pass_streak"] = self.state["pass_streak"] + 1 if gate_pass else 0
        if not regressed and not nonfinite:
            self.state["last_good"] = {"iteration": ctx.iteration, "recipe": ctx.recipe}
        kl = ctx.metrics.get("kl", math.inf)
        best = self.state["best"] is None or kl < self.state["best"]["kl"]
        if best:
            self.state["best"] = {"iteration": ctx.iteration, "kl": kl}
        self.state["recipe"] = ctx.next_recipe or ctx.recipe
        aliases = ["current"] + (["best"] if best else []) + (["stable"] if not regressed and not nonfinite else [])
        metrics_json = {"student": ctx.metrics, "teacher": ctx.teacher_metrics}
        gates_json = ctx.gates.to_json() if ctx.gates is not None else None
        findings = [self._finding_dict(f) for f in ctx.findings]
        decisions = [d.to_dict() for d in ctx.decisions]
        tmp = Path(tempfile.mkdtemp(dir=self.store.dir, prefix=".student-"))
        try:
            self.student.eval()
            sdir = save_model(self.student, self.teacher.tokenizer, tmp / "student",
                              meta={"iteration": ctx.iteration, "layer_map": self.state.get("layer_map"),
                                    "teacher": self.cfg.teacher.path, "teacher_fingerprint": self.teacher.fingerprint})
            self.student.train()
            stage_code = getattr(ctx.stage, "code", "S1")
            with self.store.begin_version(ctx.iteration, kind="iteration",
                                          meta={"stage": stage_code, "stage_name": getattr(ctx.stage, "name", "setup")}) as vw:
                vw.add_dir("student", sdir)
                for name, path in ctx.files.items():
                    p = Path(path)
                    (vw.add_dir(name, p) if p.is_dir() else vw.add_file(name, p))
                vw.add_json("recipe.json", {**ctx.recipe, "stage": stage_code})
                vw.add_json("next_recipe.json", self.state["recipe"])
                vw.add_json("metrics.json", metrics_json)
                if gates_json is not None:
                    vw.add_json("gates.json", gates_json)
                vw.add_json("findings.json", findings)
                vw.add_json("decisions.json", decisions)
                vw.add_json("divergence.json", [s.__dict__ for s in ctx.samples])
                vw.add_json("loop_state.json", self.state)
                vid = vw.commit(aliases=tuple(aliases), reason=f"iteration {ctx.iteration}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        record_catalog(self.store, vid, ctx.iteration, metrics_json, gates_json, findings, decisions)
        return vid

    @staticmethod
    def _finding_dict(f) -> dict:
        if isinstance(f, dict):
            return f
        return {"kind": f.kind, "subject": f.metric or f.kind, "message": f.message, "severity": f.severity,
                "data": f.evidence}

    def converged(self) -> bool:
        return self.state["pass_streak"] >= self.cfg.loop.converge_after


def record_catalog(store, vid: int, iteration: int, metrics_json: dict | None, gates_json: dict | None,
                   findings: list[dict] | None, decisions: list[dict] | None) -> None:
    """The catalog rows of a committed version (metrics, gates, findings, decisions), from its own JSON files;
    a ``None`` part is skipped.

    The version is committed first and these rows follow, so a crash in between leaves a version without
    rows; ``run --resume`` restores the missing ones for the version it continues from (:func:`repair_catalog`)."""
    num = lambda d: {k: v for k, v in (d or {}).items() if isinstance(v, (int, float))}  # noqa: E731
    if metrics_json is not None:
        store.record_metrics(vid, num(metrics_json.get("student")), "val")
        if metrics_json.get("teacher"):
            store.record_metrics(vid, num(metrics_json["teacher"]), "teacher")
    if gates_json is not None:
        store.record_gates(vid, [{"gate": g["id"], "passed": g["passed"], "value": g["value"],
                                  "threshold": g["threshold"], "dimension": g["dimension"], "detail": g}
                                 for g in gates_json["gates"]])
    if findings:
        store.record_findings(iteration, findings, vid)
    if decisions:
        store.record_decisions(iteration, [{"knob": d["knob"], "old": d["old"], "new": d["new"],
                                            "reason": f"[{d['rule']}] {d['reason']}"} for d in decisions])


def repair_catalog(store, version) -> list[str]:
    """Re-record whichever catalog rows of ``version`` a crash after its commit lost; returns what was rebuilt."""
    if version.kind == "rollback":
        return []
    cat, vid, it = store.catalog, version.version_id, version.iteration
    load = lambda n, default=None: version.load_json(n) if n in version.files else default  # noqa: E731
    parts = {"metrics": not cat.metrics(vid), "gates": not cat.gate_results(vid),
             "findings": not [f for f in cat.findings(it) if f.get("version_id") == vid],
             "decisions": not cat.decisions(it)}
    record_catalog(store, vid, it, load("metrics.json") if parts["metrics"] else None,
                   load("gates.json") if parts["gates"] else None,
                   load("findings.json", []) if parts["findings"] else None,
                   load("decisions.json", []) if parts["decisions"] else None)
    rebuilt = [k for k, missing in parts.items() if missing]
    if rebuilt:
        store.record_alert("warning", "loop", f"version {vid}: catalog rows rebuilt from its artifacts "
                                              f"({', '.join(rebuilt)}): the previous process stopped between "
                                              f"commit and catalog write", vid)
    return rebuilt


def _preflight_run(cfg: RunConfig) -> None:
    pipeline.preflight(cfg)
    if cfg.loop.gates_spec:
        from .gates import load_gate_spec

        load_gate_spec(cfg.loop.gates_spec)
    for s in cfg.loop.stages:
        if s.name == "anchor" and s.iterations != 0:
            raise ConfigError("loop.stages.anchor.iterations", s.iterations, "0 (anchoring is iteration 0)")


def run(cfg: RunConfig | None, *, resume_run: str | None = None, root: str | None = None, progress=None,
        console=None) -> dict:
    """Run (or resume) the loop; returns a summary dict (run id, status, per-iteration gates and timings)."""
    from .store import RunStore

    t_start = time.time()
    if resume_run is not None:
        store = RunStore.open(root or (cfg.store_root if cfg else "runs"), resume_run, writer=True)
        cfg = RunConfig.model_validate(store.config)
        point = store.resume_point()
        if point.version is None:
            state, sdir, start = None, None, 0
        else:
            repair_catalog(store, point.version)
            state = point.version.load_json("loop_state.json")
            sdir = point.version.checkout("student", store.dir / "work" / "resume-student", replace=True)
            # Continue after the iteration whose state we restored (after a rollback, `current` is an older
            # iteration than the newest one committed: the run goes on from there, nothing is overwritten).
            start = point.version.iteration + 1
    else:
        _preflight_run(cfg)  # nothing is created before this passes
        store = RunStore.create(root or cfg.store_root, cfg.model_dump(), run_id=cfg.run_id)
        state, sdir, start = None, None, 0
    loop = Loop(cfg, store, progress=progress, console=console)
    status = "running"
    try:
        store.set_run_status("running")
        loop.setup(state, sdir)
        budget = cfg.loop.budget_minutes * 60
        for k, stage in loop.schedule():
            if k < start:
                continue
            t0 = time.time()
            loop._say(f"[bold]iteration {k}[/] ({stage})")
            ctx = loop.iteration(k, stage)
            _print_iteration(loop, ctx, time.time() - t0)
            if loop.converged():
                status = "converged"
                break
            if time.time() - t_start > budget:
                status = "budget_exhausted"
                loop._say(f"wall-clock budget of {cfg.loop.budget_minutes} min spent")
                break
        else:                         # every scheduled iteration ran, the gates did not pass
            status = "iterations_exhausted"
        store.set_run_status(status, converged=status == "converged")
    except BaseException:
        store.set_run_status("failed")
        store.close()
        raise
    summary = {"run_id": store.run_id, "run_dir": str(store.dir), "status": status,
               "iterations": [{"iteration": h["iteration"], **{k: h["metrics"].get(k) for k in
                               ("kl", "top1_agreement", "ppl_ratio", "ttft_ratio", "peak_memory_ratio")},
                               "gates_passed": h["gates_passed"]} for h in loop.state["history"]],
               "seconds": round(time.time() - t_start, 1)}
    store.close()
    return summary


def _print_iteration(loop: Loop, ctx: IterationContext, seconds: float) -> None:
    if loop.console is None or ctx.gates is None:
        return
    m = ctx.metrics
    loop.console.print(f"  KL {m.get('kl', float('nan')):.4f}  top-1 {m.get('top1_agreement', float('nan')):.3f}  "
                       f"PPL ratio {m.get('ppl_ratio', float('nan')):.3f}  "
                       f"({len(ctx.findings)} findings, {len(ctx.decisions)} decisions, {seconds:.0f} s)")
    short = lambda v: f"{len(v)} entries" if isinstance(v, (dict, list)) and len(v) > 4 else v  # noqa: E731
    for d in ctx.decisions:  # full values are in the decision log (catalog, report)
        loop.console.print(f"  [cyan]decision[/] {d.knob}: {short(d.old)} -> {short(d.new)}  ({d.rule})",
                           highlight=False)
