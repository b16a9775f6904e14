"""S3 structure-aware refinement (SPEC S3): the ``prune`` stage cuts the student progressively and re-distils it.

Each iteration of the stage is one *cut* (until ``cycles`` cuts are done; later iterations only re-distil):

1. **score** every unit of the enabled kinds (:mod:`distillgate.models.prune`): by default (``taylor_trace``)
   the first-order Taylor term ``sum_t |a . dL/da|`` of each unit, i.e. ``|dL/dg|`` of a per-token gate on its
   output, summed over the first ``importance.trace_steps`` steps of this iteration's re-distillation (L its
   distillation loss against the teacher, S3.2) with every unit kept, the weights then restored; the one-shot
   methods score on calibration tokens of the teacher's answers instead; ``importance.source: teacher`` scores
   the teacher's corresponding units through the layer and unit maps;
2. **choose** this cycle's share of the way to the target (``keep`` ratios per kind, or a ``target`` parameter
   count / FLOPs per token / TTFT ratio), times the recipe's ``prune.strength``; GQA-aware, uniform per layer;
3. **fade**: re-distil with the dropped units frozen and their gates annealed 1 -> 0 over the first
   ``fade_fraction`` of the steps (0 for the rest), so the kept units learn to do without them;
4. **remove** them (surgery to a stock HF model) and **fold in** their contribution: a ridge least-squares
   refit of each layer's ``o_proj`` / ``down_proj`` columns of the kept units against the full output, kept only
   when it lowers the KL on held-out calibration rows (a selection split, not the gates' held-out set);
5. the core validates and gates the cut. A held-out KL rise within ``tolerance`` is the expected price of the cut;
   past it, the regression is diagnosed (the per-layer heat map of what was removed, knob blame naming
   ``prune.strength`` and the structure), and this stage's rule restores the last good version's weights and
   retries with ``retry_factor`` x the cut, at most ``max_retries`` times; the decision log says so.

The stage's plan (the original counts, what was kept in the original indexing, the cycles done, the state
before the last cut) lives in ``run.stage_state("prune")``, so ``--resume`` in the middle of a cycle continues
bitwise. Every cut writes ``prune.json`` (scores, kept units, fold-in, FLOPs before/after per component) into
its version.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from ..schema import Finding
from .prune_options import KIND_NAMES, PruneOptions

log = logging.getLogger(__name__)


def _counts(D: dict) -> dict:
    return {"heads": D["heads"], "mlp": D["mlp"], "layers": D["layers"], "hidden": D["hidden"],
            "rotary": D["head_dim"] // 2}


class PruneStage:
    name, code = "prune", "S3"
    Options = PruneOptions

    def __init__(self, options: PruneOptions | None = None):
        self.options = options or PruneOptions()

    # ------------------------------------------------------------------------------------- planning
    def _final_ratios(self, run, D: dict) -> dict:
        """Final keep ratio per enabled kind (the ``target`` budget turned into one uniform ratio)."""
        o = self.options
        ratios = {k: (getattr(o.keep, k) if k in o.kinds else 1.0) for k in KIND_NAMES}
        t = o.target
        if t.params is None and t.flops_per_token is None and t.ttft_ratio is None:
            return ratios
        from ..models.info import param_counts
        from ..models.flops import flops_per_token

        T = max(run.cfg.loop.perf_lengths)
        student = run.student
        if t.params is not None:
            total, emb = param_counts(student)["total"], param_counts(student)["embedding"]
            want = lambda r: emb + (total - emb) * r  # noqa: E731  (body roughly linear in a uniform ratio)
            goal = t.params
        else:
            f0 = flops_per_token(student, T)
            fixed = f0["lm_head"]
            goal = t.flops_per_token if t.flops_per_token is not None else \
                t.ttft_ratio * flops_per_token(run.teacher.model, T)["total"]
            want = lambda r: fixed + (f0["total"] - fixed) * r  # noqa: E731
        lo, hi = 0.01, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if want(mid) < goal else (lo, mid)
        r = hi
        n = len(o.kinds) or 1
        per = r ** (1.0 / n) if n > 1 else r  # every kind cut by the same factor: their product is r
        return {k: (per if k in o.kinds else 1.0) for k in KIND_NAMES}

    def _targets(self, run, st: dict, strength: float):
        from ..models.prune import Targets, dims

        D = dims(run.student)
        orig = st["original"]
        cur = _counts(D)
        c, N = st["cycles_done"], self.options.cycles
        ratios = st["final_ratios"]
        out, raw = {}, {}
        for k in KIND_NAMES:
            goal = orig[k] * ratios[k] ** ((c + 1) / N)
            raw[k] = cur[k] - strength * (cur[k] - goal)
            out[k] = max(1, min(cur[k], int(round(raw[k]))))
        if "heads" in self.options.kinds:  # whole query heads per KV group, or whole groups
            step = D["kv_heads"] if self.options.gqa == "per_group" else D["heads"] // D["kv_heads"]
            out["heads"] = max(step, min(cur["heads"], step * int(round(raw["heads"] / step))))
        return Targets(heads=out["heads"], mlp=out["mlp"], layers=out["layers"], hidden=out["hidden"],
                       rotary_pairs=out["rotary"]), cur

    # ------------------------------------------------------------------------------------- the hooks
    def map(self, it, run) -> None:
        import torch

        from .. import pipeline
        from ..models import prune as P
        from ..models.flops import flops_report
        from ..models.importance import importance

        o = self.options
        st = run.stage_state(getattr(self, "state_key", self.name))
        knobs = it.recipe.setdefault("prune", {})
        strength = float(knobs.get("strength", 1.0))
        knobs["strength"] = strength
        if knobs.pop("restore", False) and st.get("before_cut"):
            lg = run.state.last_good
            if lg is not None and lg.version is not None:
                run.restore_student(lg.version)
                knobs["restored_from"] = lg.version
                b = st["before_cut"]
                st["keep_total"], st["cycles_done"] = b["keep_total"], b["cycles_done"]
                run.state.layer_map = b["layer_map"]
                run.say(f"  prune: restored version {lg.version}'s weights; retrying with strength {strength:g}")
        D0 = P.dims(run.student)
        if "original" not in st:
            st.update({"original": _counts(D0), "cycles_done": 0, "keep_total": P.full_keep(run.student).to_dict(),
                       "cuts": []})
            st["final_ratios"] = self._final_ratios(run, D0)
            st["teacher_map"] = self._teacher_map(run)
        if st["cycles_done"] >= o.cycles or strength <= 0:
            knobs["cut"] = None
            if strength <= 0 and st["cycles_done"] < o.cycles:
                st["cycles_done"] += 1  # the skipped cycle is done: the next cut is the next cycle's
            it.findings.append(Finding("prune", "info", "prune", "no cut this iteration ("
                                       + ("all cycles done" if strength > 0 else "the strategy skipped it")
                                       + "): re-distillation only"))
            run.distil(it, steps=o.steps)
            return
        t0 = time.time()
        targets, cur = self._targets(run, st, strength)
        kinds = [k for k in o.kinds if getattr(targets, "rotary_pairs" if k == "rotary" else k) < cur[k]]
        if not kinds:
            knobs["cut"] = None
            st["cycles_done"] += 1
            it.findings.append(Finding("prune", "info", "prune", "the cut rounds to nothing at this size: "
                                       "re-distillation only"))
            run.distil(it, steps=o.steps)
            return
        examples = run.training.examples
        calib = pipeline.calibration_ids(run.cfg.model_copy(update={"student": run.cfg.student.model_copy(
            update={"calib_tokens": o.importance.calib_tokens, "calib_file": None})}), run.teacher.tokenizer,
            examples[::-1])
        n_rows = calib.shape[0]
        fit_rows, sel_rows = (calib[: max(1, n_rows - 1)], calib[max(1, n_rows - 1):]) if n_rows > 1 else (calib, calib)
        student, teacher = run.student, run.teacher.model
        t_score = time.time()
        if o.importance.source == "teacher":
            scores = self._teacher_scores(run, st, fit_rows, kinds)
        elif o.importance.method == "taylor_trace":
            scores = self._trace_scores(run, it, kinds)
        else:
            scores = importance(student, fit_rows, kinds=kinds, method=o.importance.method, teacher=teacher,
                                  seed=run.cfg.train.seed + it.index)
        secs = {"importance": time.time() - t_score}
        keep = P.select(student, scores, targets, gqa=o.gqa)
        heat = self._heat(scores, keep, D0)
        st["before_cut"] = {"keep_total": st["keep_total"], "cycles_done": st["cycles_done"],
                            "layer_map": run.state.layer_map}
        # fade: dropped units frozen, their gates annealed 1 -> 0, while the kept ones re-distil
        steps = o.steps or it.recipe["train"]["steps"]
        fade_steps = int(round(o.fade_fraction * steps))
        gates = P.Gates(student, tuple(kinds))
        gates.values.update(P.gate_values(student, keep, 0.0 if fade_steps == 0 else 1.0))
        t_fade = time.time()
        with gates, P.frozen(student, keep) as restore:
            def on_step(info, gates=gates):
                restore()
                g = 0.0 if fade_steps == 0 else max(0.0, 1.0 - info.step / fade_steps)
                gates.values.update(P.gate_values(student, keep, g))
            run.distil(it, steps=o.steps, callbacks=[on_step])
        secs["redistil"] = time.time() - t_fade
        # remove, and fold the dropped units' contribution into the kept ones when that helps
        t_fold = time.time()
        plain = P.apply_keep(student, keep)
        fold = {"tried": bool(o.fold_in)}
        new = plain
        if o.fold_in:
            weights = P.fold_in(student, keep, fit_rows)
            if weights:
                saved = {k: student.get_parameter(k).detach().clone() for k in weights}
                with torch.no_grad():
                    for k, w in weights.items():
                        student.get_parameter(k).copy_(w)
                folded = P.apply_keep(student, keep)
                with torch.no_grad():
                    for k, w in saved.items():
                        student.get_parameter(k).copy_(w)
                kl_plain, kl_fold = _kl(plain, teacher, sel_rows), _kl(folded, teacher, sel_rows)
                fold.update({"kl_without": kl_plain, "kl_with": kl_fold, "kept": kl_fold < kl_plain,
                             "split": f"{sel_rows.shape[0]} held-out calibration row(s) of {sel_rows.shape[1]}"})
                if kl_fold < kl_plain:
                    new = folded
            else:
                fold.update({"kept": False, "note": "nothing to refit (no heads or MLP units cut)"})
        secs["fold_in"] = time.time() - t_fold
        T = max(run.cfg.loop.perf_lengths)
        flops = flops_report(student, new, T)
        before_s, total = P.dims(student), P.Keep.from_dict(st["keep_total"])
        st["keep_total"] = P.compose(total, keep).to_dict()
        st["cycles_done"] += 1
        layer_map = run.state.layer_map
        if layer_map:
            lm = {int(k): v for k, v in layer_map.items()}
            layer_map = {i: lm[li] for i, li in enumerate(keep.layers)}
        changed = ", ".join(f"{k} {cur[k]}->{getattr(targets, 'rotary_pairs' if k == 'rotary' else k)}"
                            for k in kinds)
        run.replace_student(new, f"prune cut {st['cycles_done']}/{o.cycles}: {changed}", layer_map=layer_map)
        secs["total"] = time.time() - t0
        report = P.PruneReport(
            method=o.importance.method, source=o.importance.source, kinds=list(kinds), before=_counts(before_s),
            after=_counts(P.dims(new)), keep=keep.to_dict(), score_summary=_summary(scores),
            removed_share_by_layer=heat, fold_in=fold, flops=flops, seconds={k: round(v, 3) for k, v in secs.items()})
        st["cuts"].append({"iteration": it.index, "after": report.after, "flops_saved_pct": flops["flops_saved_pct"],
                           "fold_in_kept": fold.get("kept")})
        knobs["cut"] = {k: getattr(targets, "rotary_pairs" if k == "rotary" else k) for k in kinds}
        path = run.work / f"prune-{it.index:03d}.json"
        from ..io import atomic_write_json

        atomic_write_json(path, report.to_dict())
        it.files["prune.json"] = path
        it.metrics.update({"prune/flops_saved_pct": flops["flops_saved_pct"],
                           "prune/params_saved_pct": flops["params"]["saved_pct"],
                           "prune/fold_in_kept": float(bool(fold.get("kept"))),
                           "prune/seconds": secs["total"]})
        from ..evaluate.providers import METRICS

        it.tolerances = {n: o.tolerance for n, m in METRICS.items() if m.regression}
        it.tolerance_reason = (f"a prune cut may cost up to {100 * o.tolerance:g}% after re-distillation "
                               "(loop.stages[].options.tolerance)")
        kinds_h = [k for k in ("heads", "mlp", "layers") if k in heat]
        grid = {"rows": kinds_h, "cols": list(range(len(heat[kinds_h[0]]))) if kinds_h else [],
                "z": [heat[k] for k in kinds_h], "title": "share of each layer's importance the cut removed",
                "x_label": "layer (before the cut)", "y_label": "kind", "value_label": "share removed"}
        it.regression_evidence = {"heatmap_layer_kind": grid, "prune_cut": knobs["cut"],
                                  "prune_strength": strength}
        run.say(f"  prune cut {st['cycles_done']}/{o.cycles} ({o.importance.method} importance on "
                f"{o.importance.source}): {changed}; FLOPs/token -{flops['flops_saved_pct']:.1f}%, params "
                f"-{flops['params']['saved_pct']:.1f}%; fold-in "
                f"{'kept' if fold.get('kept') else 'not kept'} ({secs['total']:.0f} s)")

    def rules(self):
        return [("prune_retry", self._retry_rule)]

    def _retry_rule(self, s) -> None:
        """A regressed cut: restore the last good weights and retry the cut smaller (or skip it)."""
        prune = s.recipe.get("prune")
        if not isinstance(prune, dict):
            return
        prune.pop("restore", None)
        prune.pop("restored_from", None)
        cut = prune.pop("cut", None)
        if cut is None:
            prune.pop("retries", None)
            if float(prune.get("strength", 1.0)) != 1.0:
                s.record("prune_retry", "prune.strength", prune["strength"], 1.0, "the next cut starts at full "
                         "strength again")
            return
        regs = [f for f in s.of_kind("regression") if f.subject in self.options.retry_on]
        if not regs or s.last_good is None:
            if prune.get("retries") or float(prune.get("strength", 1.0)) != 1.0:
                prune.pop("retries", None)
                s.record("prune_retry", "prune.strength", prune.get("strength", 1.0), 1.0,
                         "the retried cut held; the next cut starts at full strength")
            return
        retries = int(prune.get("retries", 0))
        old = float(prune.get("strength", 1.0))
        worst = max(regs, key=lambda f: f.evidence.get("relative_worsening", 0))
        if retries >= self.options.max_retries:
            s.record("prune_retry", "prune.strength", old, 0.0,
                     f"{worst.subject} regressed past the cut's tolerance after {retries} retries; restoring the "
                     f"last good weights and skipping this cut", value=0.0)
            prune.update({"restore": True, "retries": 0})
            return
        new = round(old * self.options.retry_factor, 4)
        s.record("prune_retry", "prune.strength", old, new,
                 f"{worst.message}; restoring the last good version's weights and retrying the cut at "
                 f"{new:g} x its size (retry {retries + 1}/{self.options.max_retries})")
        prune.update({"restore": True, "retries": retries + 1})

    # ------------------------------------------------------------------------------------- helpers
    def _teacher_map(self, run) -> dict | None:
        """The student's units in the teacher's indexing, when the student was derived from this teacher."""
        rep = (run.state.student_init or {}).get("report") or {}
        lm = run.state.layer_map
        if not rep or not lm:
            return None
        from ..models.prune import dims

        D = dims(run.student)
        layers = [int(lm[str(i)] if str(i) in lm else lm[i]) for i in range(D["layers"])]
        return {"layers": layers, "mlp": rep.get("mlp_units_kept")}

    def _teacher_scores(self, run, st: dict, ids, kinds) -> dict:
        """Teacher-side scores of the student's current units (``importance.source: teacher``)."""
        import torch

        from ..errors import ConfigError
        from ..models import prune as P
        from ..models.importance import importance

        tm = st.get("teacher_map")
        if tm is None or "hidden" in kinds or "rotary" in kinds:
            raise ConfigError("loop.stages[].options.importance.source", "teacher",
                              "'student' here: the teacher's units map onto the student only for heads, MLP units "
                              "and layers of a student derived from this teacher (student.init: derive)")
        t_scores = importance(run.teacher.model, ids, kinds=kinds, method=self.options.importance.method,
                                teacher=None, seed=run.cfg.train.seed)
        total = P.Keep.from_dict(st["keep_total"])  # current student units in the first-prune student's indexing
        out = {}
        t_layers = [tm["layers"][i] for i in total.layers]
        if "layers" in kinds:
            out["layers"] = torch.stack([t_scores["layers"][t] for t in t_layers])
        if "heads" in kinds:
            out["heads"] = torch.stack([t_scores["heads"][t][total.heads[j]] for j, t in enumerate(t_layers)])
        if "mlp" in kinds:
            units = tm["mlp"]
            out["mlp"] = torch.stack([t_scores["mlp"][t][[units[li][u] for u in total.mlp[j]]]
                                      for j, (li, t) in enumerate(zip(total.layers, t_layers))])
        return out

    def _trace_scores(self, run, it, kinds) -> dict:
        """``taylor_trace``: the first ``trace_steps`` steps of this iteration's re-distillation (``run.distil``:
        its recipe, objective, data, order and lr schedule) run with every unit kept and a per-token gate on each
        unit; the taylor term of every step's backward is summed (:class:`TaylorTrace`), then the student's
        weights are put back, so the cut and the re-distillation start from the same student as with any other
        method. An exploration winner's checkpoint (``it.continue_from``) is left for the re-distillation."""
        import torch

        from ..models.importance import TaylorTrace
        from ..train import distributed as dist

        o = self.options
        student = run.student
        steps = o.steps or it.recipe["train"]["steps"]
        saved = {k: v.detach().clone() for k, v in student.state_dict().items()}
        cont, it.continue_from = it.continue_from, None
        out = Path(run.work) / f"iter-{it.index:03d}-trace"
        try:
            with TaylorTrace(student, tuple(kinds)) as trace:
                run.distil(it, steps=o.steps, stop_at=min(o.importance.trace_steps, steps), out_dir=out,
                           callbacks=[trace.collect])
        finally:
            with torch.no_grad():
                student.load_state_dict(saved)
            it.continue_from = cont
            shutil.rmtree(out, ignore_errors=True)
        return dist.all_reduce_tensors(trace.scores())  # each rank's backward saw its share of the batches

    @staticmethod
    def _heat(scores: dict, keep, D: dict) -> dict:
        """Per layer and kind, the share of that layer's importance the cut removes (the diagnosis heat map)."""
        out: dict = {}
        kept_layers = set(keep.layers)
        pos = {li: j for j, li in enumerate(keep.layers)}
        for kind in ("heads", "mlp"):
            if kind not in scores:
                continue
            rows = []
            for li in range(D["layers"]):
                s = scores[kind][li].double().clamp_min(0)
                tot = float(s.sum()) or 1.0
                kept = getattr(keep, kind)[pos[li]] if li in kept_layers else []
                rows.append(round(1.0 - float(s[kept].sum()) / tot, 4))
            out[kind] = rows
        if "layers" in scores:
            out["layers"] = [0.0 if li in kept_layers else 1.0 for li in range(D["layers"])]
        return out


def _kl(model, teacher, ids) -> float:
    import torch

    from ..models.importance import kl_sum

    with torch.no_grad():
        s = model(input_ids=ids, use_cache=False).logits[:, :-1]
        t = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
    return float(kl_sum(s, t)) / (s.shape[0] * s.shape[1])


def _summary(scores: dict) -> dict:
    """Quantiles of each kind's scores (the report shows the distribution)."""
    import torch

    out = {}
    for k, v in scores.items():
        x = v.double().flatten()
        q = torch.quantile(x, torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], dtype=torch.float64))
        out[k] = {"n": int(x.numel()), "quantiles": [float(a) for a in q], "mean": float(x.mean()),
                  "hist": [int(c) for c in torch.histc(x.float(), bins=12, min=float(x.min()), max=float(x.max()))]}
    return out

