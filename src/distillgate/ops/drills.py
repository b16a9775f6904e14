"""The operations stage's drills for G-O3, G-O4, G-O5 and G-P4, against the student as it is in the iteration.

Each one is the measurement its ``distillgate`` command runs, called on the iteration's student, so a loop with
``operations`` in its stages puts every operations gate (and the G-P4 leak gate) into the version's gate table
with its provenance:

* ``teachers`` (G-O3, metric ``teacher_version_compat_share``): :func:`.teachers.check_compatibility` of the
  student against the teacher registry (``registry``: a file, default the ``DISTILLGATE_HOME`` one that
  ``distillgate ops teachers register`` writes); the report says whether the run's own teacher is in it.
* ``explain`` (G-O4, metric ``explanation_spot_check_pct``): three-part explanations of ``prompts`` built-in probe
  prompts, each auto spot-checked; the review sheet (``explanations.csv`` / ``.html`` / ``.json``, the files
  ``distillgate explain import`` reads back once a person has filled the verdicts) goes into the version.
* ``rollback`` (G-O5, metrics ``rollback_minutes``, ``rollback_added_latency_ms``): the iteration's student
  served behind the gateway under the locust load of ``loop.serving``, rolled back to each of the run's last
  ``versions`` stable versions (:func:`.recovery.drill`, backends started from the store's weights).
* ``soak`` (G-P4, metric ``leak_pct_per_hour``): the student served by a real backend behind the gateway under
  load for ``seconds``, its RSS sampled (:func:`.soak.gateway_soak`).

The student is saved once per iteration (safetensors, with the teacher's tokenizer) to the run's work folder
for the drills that serve it from a process.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import InputError
from .explain import ExplainOptions
from .operations import DrillContext, register_drill
from .teachers import CompatOptions


def _saved_student(ctx: DrillContext) -> Path:
    """The iteration's student as a model folder (written once per iteration, reused by every drill)."""
    from ..io import atomic_write_text

    folder = ctx.work / f"ops-student-{ctx.it.index:03d}"
    if not (folder / ".complete").is_file():
        ctx.model.save_pretrained(folder, safe_serialization=True)
        ctx.tokenizer.save_pretrained(folder)
        atomic_write_text(folder / ".complete", ctx.version + "\n")
    return folder


def _serve_student(ctx: DrillContext, work: Path):
    """A ``loop.serving.backend`` process serving the iteration's student (logs under ``work/logs``)."""
    from ..serve import backends

    spec = ctx.run.cfg.loop.serving
    return backends.start(spec.backend, _saved_student(ctx), f"iteration-{ctx.it.index}", work / "logs",
                          device=spec.device, timeout=spec.startup_timeout_s, threads=spec.backend_threads)


# ------------------------------------------------------------------------------------------------ G-O3

class TeachersDrillOptions(CompatOptions):
    registry: str | None = Field(None, description="teacher registry file (`distillgate ops teachers register`); "
                                                   "default: the one under DISTILLGATE_HOME")

    @field_validator("registry")
    @classmethod
    def _exists(cls, v):
        if v is not None and not Path(v).is_file():
            raise ValueError(f"{v}: no teacher registry there (write one with `distillgate ops teachers register "
                             f"PATH --date YYYY-MM-DD --registry FILE`)")
        return v


def _teachers(ctx: DrillContext, o: TeachersDrillOptions) -> dict:
    from ..models.load import fingerprint_folder
    from .teachers import check_compatibility, load_registry, registry_path

    path = Path(o.registry) if o.registry else registry_path()
    entries = load_registry(path)
    if not entries:
        raise InputError(f"G-O3: the teacher registry {path} holds no version (register them with `distillgate ops "
                         f"teachers register PATH --date YYYY-MM-DD`)")
    rep = check_compatibility(SimpleNamespace(model=ctx.model, tokenizer=ctx.tokenizer), entries,
                              CompatOptions(**o.model_dump(exclude={"registry"})))
    tpath = getattr(ctx.run.cfg.teacher, "path", None)
    fp = fingerprint_folder(tpath) if tpath and Path(tpath).is_dir() else None
    rep.update(registry=str(path), run_teacher_registered=None if fp is None else
               any(e["fingerprint"] == fp for e in entries))
    ctx.say(f"  operations: G-O3 {rep['n_compatible']}/{rep['n_versions']} teacher versions compatible "
            f"(registry {path})")
    return rep


# ------------------------------------------------------------------------------------------------ G-O4

class ExplainDrillOptions(ExplainOptions):
    prompts: int = Field(8, ge=1, le=1000, description="built-in probe prompts explained and spot-checked")


def _explain(ctx: DrillContext, o: ExplainDrillOptions) -> dict:
    from .explain_review import automatic_report, explain_all, export, probe_prompts

    opts = ExplainOptions(**o.model_dump(exclude={"prompts"}))
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        exs = explain_all(ctx.model, ctx.tokenizer, probe_prompts(o.prompts, seed=o.seed), opts,
                          progress=lambda i, n, ex: ctx.say(f"  operations: G-O4 explanation {i}/{n} "
                                                            f"{'pass' if ex.check['passed'] else 'fail'}"))
    finally:
        ctx.model.train(was_training)
    files = export(exs, ctx.work / f"ops-explain-{ctx.it.index:03d}", ctx.version,
                   {"iteration": ctx.it.index, "method": opts.method})
    for kind, p in files.items():
        ctx.it.files[f"explanations.{kind}"] = Path(p)
    return {**automatic_report(exs, opts.method),
            "review_files": sorted(f"explanations.{kind}" for kind in files)}


# ------------------------------------------------------------------------------------------------ G-O5

class RollbackDrillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    versions: int = Field(3, ge=1, le=20, description="roll back to each of the run's last this many stable versions")
    window_s: float = Field(3.0, gt=0, le=600, description="seconds of requests before / after each rollback whose "
                                                           "p50 latencies are compared")
    warmup_s: float | None = Field(None, ge=0, le=600, description="load before the first 'before' window (the "
                                                                   "locust ramp, a cold backend); None: window_s")
    max_load_factor: float = Field(10.0, gt=1, description="a 'before' p50 over this many times the idle p50 means "
                                                           "the load saturates the backend: G-O5b is not measured")


def _rollback(ctx: DrillContext, o: RollbackDrillOptions) -> dict:
    from .recovery import drill, store_launcher

    store, spec = ctx.run.store, ctx.run.cfg.loop.serving
    stable = store.stable_versions(o.versions)
    if not stable:
        raise InputError("G-O5: the run has no stable version yet, nothing to roll back to")
    work = ctx.work / f"ops-rollback-{ctx.it.index:03d}"
    start = _serve_student(ctx, work)
    ctx.say(f"  operations: G-O5 serving {ctx.version}, then rolling back to "
            + ", ".join(f"v{x}" for x in stable) + " under load")
    rep = drill(start, [str(x) for x in stable], store_launcher(store, spec, work), spec, work, window_s=o.window_s,
                warmup_s=o.warmup_s, max_load_factor=o.max_load_factor, say=ctx.say)
    rep.update(served_first=ctx.version, stable_versions=stable)
    if len(stable) < o.versions:
        rep["note"] = f"the run has {len(stable)} stable version(s), fewer than the {o.versions} asked for"
    return rep


# ------------------------------------------------------------------------------------------------ G-P4

class SoakDrillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(60.0, gt=0, le=7 * 86400, description="soak duration (the SPEC soaks 48 h)")
    sample_every_s: float = Field(0.5, gt=0, description="RSS sampling period")
    warmup_s: float = Field(30.0, ge=0, description="load before the first sample (a 900 s soak of `transformers "
                                                    "serve` grew most in its first minutes: allocator warm-up)")


def _soak(ctx: DrillContext, o: SoakDrillOptions) -> dict:
    from .soak import gateway_soak

    spec = ctx.run.cfg.loop.serving
    work = ctx.work / f"ops-soak-{ctx.it.index:03d}"
    b = _serve_student(ctx, work)
    try:
        rep = gateway_soak(b, o.seconds, spec, work, sample_every_s=o.sample_every_s, warmup_s=o.warmup_s)
    finally:
        b.stop()
    ctx.say(f"  operations: G-P4 soak {o.seconds:g} s, upper bound {rep['pct_per_hour_upper95']:.4g} %/h")
    return rep


register_drill("teachers", _teachers, metrics=["teacher_version_compat_share"], options_key="teacher_compat",
               Options=TeachersDrillOptions, description="G-O3: the student against every teacher version of the "
                                                         "registry of the last twelve months")
register_drill("explain", _explain, metrics=["explanation_spot_check_pct"], options_key="explanation_report",
               Options=ExplainDrillOptions, description="G-O4: explanations of probe prompts, auto spot-checked; "
                                                        "the review sheet in the version")
register_drill("rollback", _rollback, metrics=["rollback_minutes", "rollback_added_latency_ms"],
               options_key="rollback_report", Options=RollbackDrillOptions,
               description="G-O5: rollbacks to the last stable versions under load through the gateway")
register_drill("soak", _soak, metrics=["leak_pct_per_hour"], options_key="soak_report", Options=SoakDrillOptions,
               description="G-P4: the student served behind the gateway under load, its RSS sampled")
