"""`distillgate run`: the closed loop (SPEC L1-L3, W4, W6, W7, D3), read top to bottom.

1. preflight: the config, its inputs and every stage's options, before anything is created;
2. open the store (a new run, or ``--resume`` from the version ``current`` points to);
3. set up the run's services (:mod:`.run`): teacher, prompt pool, held-out set, training set;
4. for each scheduled iteration (:func:`.core.schedule`): its stages' hooks and the core's part of each phase
   (:mod:`.core`), then one committed version (:mod:`.commit`);
5. stop when the gates pass ``converge_after`` consecutive evaluations (converged), the schedule ends or the
   wall-clock budget is spent.

Stages are plug-ins (:mod:`.contract`, :mod:`distillgate.stages`); the core knows none by name. Resume: every
committed version carries ``loop_state.json`` (:class:`.state.LoopState`: the next recipe, the histories, each
stage's state). ``--resume`` restores the student and state of ``current`` and re-runs from the next iteration;
teacher answers and targets come back from their caches and training is seeded per iteration, so the final
weights equal an uninterrupted run's (bitwise on CPU).
"""

from __future__ import annotations

import logging
import time

from .. import pipeline
from ..config import RunConfig
from ..errors import ConfigError
from .commit import record_catalog, repair_catalog  # noqa: F401  (public: the store CLI uses them)
from .contract import Iteration, Stage  # noqa: F401
from .core import converged, run_iteration, schedule
from .run import Run, apply_recipe, initial_recipe  # noqa: F401
from .state import LoopState
from ..tracking import LoopTracker

log = logging.getLogger(__name__)


def preflight(cfg: RunConfig) -> None:
    """Every check that needs no compute: the distillation inputs, the gate spec, each stage's options."""
    from ..stages import validate_options

    pipeline.preflight(cfg)
    if cfg.loop.gates_spec:
        from ..gates import load_gate_spec

        load_gate_spec(cfg.loop.gates_spec)
    validate_options(cfg.loop.stages)
    from ..placement import resolve_device

    resolve_device(cfg.teacher.device, "teacher.device")  # e.g. cuda asked for on a machine without it
    resolve_device(cfg.student.device, "student.device")
    if "probes" in cfg.loop.capability_checks and not cfg.loop.data_dir:
        raise ConfigError("loop.data_dir", None, "the evaluation datasets folder (needed by 'probes')")


def run(cfg: RunConfig | None, *, resume_run: str | None = None, root: str | None = None, progress=None,
        console=None, allow_teacher_change: bool = False) -> dict:
    """Run (or resume) the loop; returns a summary dict (run id, status, per-iteration gates and timings).

    A resume refuses a teacher whose weights or tokenizer fingerprint differ from the ones the resumed version
    recorded (before any model loads), unless ``allow_teacher_change``: then an alert is recorded and the next
    version carries a ``teacher_changed`` lineage note."""
    from ..stages import build
    from ..train import distributed as dist
    from .ranks import open_store, work_root

    t_start = time.time()
    state, sdir, start, lineage = None, None, 0, None
    root = root or (cfg.store_root if cfg else "runs")
    if resume_run is None:
        preflight(cfg)  # nothing is created before this passes
    group = _join_ranks(cfg, root, resume_run)
    try:
        store = open_store(cfg, root, resume_run)
    except BaseException:
        dist.shutdown(group)
        raise
    if resume_run is not None:
        cfg = RunConfig.model_validate(store.config)
        point = store.resume_point()
        if point.version is not None:
            from ..guard import check_resume_identity, teacher_identity

            try:
                fp, tok_fp = teacher_identity(cfg.teacher.path, cfg.teacher.trust_remote_code)
                lineage = check_resume_identity(store, point.version, fp, tok_fp, allow_change=allow_teacher_change,
                                                teacher_spec=cfg.teacher.path)
            except BaseException:
                store.close()
                dist.shutdown(group)
                raise
            repair_catalog(store, point.version)
            state = LoopState.load(point.version.load_json("loop_state.json"))
            if state.last_good is not None and state.last_good.version is None:
                state.last_good.version = point.version.version_id  # "this version" when it was written
            sdir = point.version.checkout("student", work_root(store) / "resume-student", replace=True)
            # Continue after the iteration whose state we restored (after a rollback, `current` is an older
            # iteration than the newest one committed: the run goes on from there, nothing is overwritten).
            start = point.version.iteration + 1
    stages = build(cfg.loop.stages)
    plan = schedule(cfg.loop.stages)
    run_ = Run(cfg, store, max_iterations=len(plan), progress=progress, console=console)
    run_.lineage_note = lineage
    status = "running"
    tracker = None
    try:
        store.set_run_status("running")
        tracker = LoopTracker(cfg, store, start, say=run_.say)
        run_.setup(state, sdir)
        budget = cfg.loop.budget_minutes * 60
        for k, entries in plan:
            if k < start:
                continue
            t0 = time.time()
            names = ", ".join(cfg.loop.stages[i].name for i in entries) or "setup"
            run_.say(f"[bold]iteration {k}[/] ({names})")
            it = run_iteration(run_, k, [stages[i] for i in entries], stages)
            tracker.iteration(it)
            _print_iteration(run_, it, time.time() - t0)
            if converged(run_):
                status = "converged"
                break
            # Iterations 1..min_iterations run even when the setup spent the budget (a loaded machine).
            if k >= cfg.loop.min_iterations and time.time() - t_start > budget:
                status = "budget_exhausted"
                run_.say(f"wall-clock budget of {cfg.loop.budget_minutes} min spent")
                break
        else:                         # every scheduled iteration ran, the gates did not pass
            status = "iterations_exhausted"
        store.set_run_status(status, converged=status == "converged")
        tracker.finish(status)
    except BaseException as e:
        from ..errors import DistillgateError

        stopped = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        try:  # a full disk or a lost lock must not hide the error that stopped the run
            store.set_run_status(stopped)
        except DistillgateError as inner:
            log.warning("could not record the run's status: %s", inner)
        if tracker is not None:
            tracker.finish(stopped)
        store.close()
        dist.shutdown(group)
        raise
    summary = {"run_id": store.run_id, "run_dir": str(store.dir), "status": status,
               "iterations": [{"iteration": h["iteration"], **{k: h["metrics"].get(k) for k in
                               ("kl", "top1_agreement", "ppl_ratio", "ttft_ratio", "peak_memory_ratio",
                                "flops_ratio")},
                               "gates_passed": h["gates_passed"]} for h in run_.state.history],
               "seconds": round(time.time() - t_start, 1), "rank": dist.rank(), "world_size": dist.world_size()}
    store.close()
    dist.barrier()  # rank 0 has closed the store: a relaunch right after finds its lock free
    dist.shutdown(group)
    return summary


def _join_ranks(cfg: RunConfig | None, root: str, resume_run: str | None) -> bool:
    """Under torchrun: join the process group (backend and collective timeout from ``distributed``; a resumed
    run's config is read from its store, read-only). Returns whether this call created the group."""
    from ..train import distributed as dist

    if not dist.launched():
        return False
    if cfg is None:
        from ..store import RunStore

        with RunStore.open(root, resume_run) as peek:
            cfg = RunConfig.model_validate(peek.config)
    return dist.init_from_env(cfg.distributed.backend, cfg.distributed.timeout_s)


def _print_iteration(run_: Run, it: Iteration, seconds: float) -> None:
    if run_.console is None or it.gates is None:
        return
    m = it.metrics
    run_.console.print(f"  KL {m.get('kl', float('nan')):.4f}  top-1 {m.get('top1_agreement', float('nan')):.3f}  "
                       f"PPL ratio {m.get('ppl_ratio', float('nan')):.3f}  "
                       f"({len(it.findings)} findings, {len(it.decisions)} decisions, {seconds:.0f} s)")
    short = lambda v: f"{len(v)} entries" if isinstance(v, (dict, list)) and len(v) > 4 else v  # noqa: E731
    for d in it.decisions:  # full values are in the decision log (catalog, report)
        run_.console.print(f"  [cyan]decision[/] {d.knob}: {short(d.old)} -> {short(d.new)}  ({d.rule})",
                           highlight=False)
