"""S4 checks and hard pool: how fast each check runs, how well each separates the labelled set, and what the
3x pool weight buys over weight 1.

    python bench/consistency.py [--config configs/consistency.yaml] [--challenges N] [--steps N]
                                [--root /tmp/dg-bench-s4] [--no-pool] [--reuse-w3 ROOT:RUN] [key=value ...]

1. **Speed**: each check over every labelled row of its kind, repeated for >= 2 s: checks per second
   (semantic in batches of the whole set, as the stage calls it; logic and quality one pair at a time).
2. **Labelled set** (``distillgate/consistency/data/labelled.jsonl``): precision / recall / F1 of flagging a
   failure on the ``test`` split; the semantic threshold is calibrated on the ``calib`` split only (its ROC AUC
   on the test split is printed too). The logic and quality rules have no fitted parameters, but they were
   written alongside the set: read their scores as a development-set figure, not a held-out one.
3. **Pool weight**: the loop runs twice from ``--config`` (its stages, with at least two consistency
   iterations), once with the pool at ``weight: 3`` and once at ``weight: 1``, everything else equal (same data,
   same steps, same seeds, shared caches: no budget stop). The first consistency iteration fills the pool; the
   last one trains on it and re-checks it: the pass rate after that iteration, per check, for both weights.
   ``key=value`` overrides go to both runs (e.g. ``teacher.path=...`` for a smaller teacher). Set
   ``DISTILLGATE_HOME`` to a run's home to reuse its teacher answers and targets, and ``--reuse-w3 ROOT:RUN``
   to take the weight-3 side from a finished ``distillgate run --config`` of the same config (checked).

Last line: ``check_f1_semantic=A check_f1_logic=B check_f1_quality=C pool_pass_gain_vs_weight1=D`` (D: pass rate
at weight 3 minus at weight 1, in points of a fraction; ``nan`` with ``--no-pool``).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

from distillgate.consistency import labelled
from distillgate.consistency.checks import logic, quality, semantic
from distillgate.consistency.judge import calibrate_semantic


def _rate(fn, n_items: int, min_s: float = 2.0) -> float:
    fn()  # warm-up: parsers and the encoder load once
    t0, done = time.perf_counter(), 0
    while time.perf_counter() - t0 < min_s:
        fn()
        done += n_items
    return done / (time.perf_counter() - t0)


def checks_part(encoder) -> dict[str, dict]:
    out = {}
    calib, test = labelled.load("semantic", "calib"), labelled.load("semantic", "test")
    cal = calibrate_semantic(encoder, calib)
    sims = semantic.cosine(encoder, [r["teacher"] for r in test], [r["student"] for r in test])
    test_roc = semantic.calibrate(sims, [r["expect"] == "fail" for r in test])
    flagged = [bool(s < cal.threshold) for s in sims]
    rows = labelled.load("semantic")
    speed = _rate(lambda: semantic.check_many(encoder, [r["teacher"] for r in rows], [r["student"] for r in rows],
                                              cal.threshold), len(rows))
    out["semantic"] = {**labelled.scores([r["expect"] == "fail" for r in test], flagged), "per_s": speed,
                       "note": f"threshold {cal.threshold:.3f} (calib split), test ROC AUC {test_roc.auc:.3f}"}
    for name, fn in (("logic", lambda r: logic.check(r["request"], r["teacher"], r["student"])),
                     ("quality", lambda r: quality.check(r["teacher"], r["student"]))):
        rows, test = labelled.load(name), labelled.load(name, "test")
        res = [not fn(r).passed for r in test]
        speed = _rate(lambda: [fn(r) for r in rows], len(rows))
        out[name] = {**labelled.scores([r["expect"] == "fail" for r in test], res), "per_s": speed,
                     "note": "rules (no fitted parameters; developed with the set)"}
    return out


def pool_part(args, overrides: list[str]) -> dict[float, dict]:
    import json

    from distillgate import loop as loop_mod
    from distillgate.config import RunConfig, load_config
    from distillgate.store import RunStore

    root = Path(args.root or tempfile.mkdtemp(prefix="dg-bench-s4-"))
    os.environ.setdefault("DISTILLGATE_HOME", str(root / "home"))  # both runs share teacher answers and targets
    base = load_config(RunConfig, args.config, overrides)
    out = {}
    if args.reuse_w3:
        out[3.0] = _reused(args.reuse_w3, base, _stages(base, 3.0, args))
    for w in (3.0, 1.0):
        if w in out:
            continue
        stages = _stages(base, w, args)
        run_id = f"w{int(w)}"
        cfg = load_config(RunConfig, args.config, [*overrides, f"loop.stages={json.dumps(stages)}",
                                                   f"store_root={root / 'runs'}", f"run_id={run_id}",
                                                   "loop.budget_minutes=600"])
        t0 = time.perf_counter()
        loop_mod.run(cfg, progress=False)
        with RunStore.open(root / "runs", run_id) as s:
            rep = s.resolve("current").load_json("consistency.json")
        out[w] = {"before": rep["pool_before"], "after": rep["pool_after"], "iteration": rep["iteration"],
                  "minutes": (time.perf_counter() - t0) / 60}
    return out


def _stages(base, w: float, args) -> list[dict]:
    """The config's stages with the consistency entry's pool weight (and --challenges / --steps) set."""
    out = []
    for spec in base.loop.stages:
        d = spec.model_dump(mode="json")
        if d["name"] == "consistency":
            d["options"] = {**(d.get("options") or {}), "weight": w,
                            **({"challenges": args.challenges} if args.challenges else {}),
                            **({"steps": args.steps} if args.steps else {})}
        out.append(d)
    return out


def _reused(where: str, base, want_stages: list[dict]) -> dict:
    """The weight-3 side from a finished run of the same config (``ROOT:RUN_ID``), checked to be that config."""
    from distillgate.store import RunStore

    root, run_id = where.rsplit(":", 1)
    with RunStore.open(root, run_id, writer=False) as s:
        cfg = s.catalog.run_row()["config"]
        v = s.resolve("current")
        rep = v.load_json("consistency.json")
        state = v.load_json("loop_state.json")
    mine = base.model_dump(mode="json")
    for sec in ("teacher", "student", "data", "targets", "loss", "train"):
        if cfg.get(sec) != mine[sec]:
            raise SystemExit(f"--reuse-w3 {where}: its {sec} config differs from this config's")
    stages = [{**st, "options": {k: v for k, v in (st.get("options") or {}).items() if k != "weight"}}
              for st in cfg["loop"]["stages"]]
    want = [{**st, "options": {k: v for k, v in (st.get("options") or {}).items() if k != "weight"}}
            for st in want_stages]
    weights = {(st.get("options") or {}).get("weight") for st in cfg["loop"]["stages"] if st["name"] == "consistency"}
    if stages != want or not weights <= {None, 3.0}:
        raise SystemExit(f"--reuse-w3 {where}: its stages differ from this config's (or its pool weight is not 3)")
    done = sum(st["iterations"] for st in want)
    if len(state["history"]) != done + 1:
        raise SystemExit(f"--reuse-w3 {where}: it ran {len(state['history'])} of {done + 1} iterations (budget stop?)")
    return {"before": rep["pool_before"], "after": rep["pool_after"], "iteration": rep["iteration"],
            "minutes": float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/consistency.yaml")
    ap.add_argument("--challenges", type=int, default=None, help="challenges per round (default: the config's)")
    ap.add_argument("--steps", type=int, default=None, help="steps per consistency round (default: the config's)")
    ap.add_argument("--root", default=None)
    ap.add_argument("--no-pool", action="store_true", help="only the speed and labelled-set parts")
    ap.add_argument("--reuse-w3", default=None, metavar="ROOT:RUN_ID",
                    help="take the weight-3 side from a finished run of this config (e.g. runs:<run id>)")
    args, overrides = ap.parse_known_args()

    checks = checks_part(semantic.load_encoder())
    print(f"{'check':<10}{'checks/s':>10}{'n':>5}{'P':>8}{'R':>8}{'F1':>8}  note")
    for name, r in checks.items():
        print(f"{name:<10}{r['per_s']:>10.1f}{r['n']:>5}{r['precision']:>8.3f}{r['recall']:>8.3f}{r['f1']:>8.3f}  "
              f"{r['note']}")

    gain = math.nan
    if not args.no_pool:
        pool = pool_part(args, overrides)
        print(f"\npool of iteration {pool[3.0]['iteration']}'s training, re-checked after it")
        print(f"{'pool weight':<12}{'n':>4}{'before':>8}{'after':>8}" + "".join(f"{c:>10}" for c in
                                                                             ("semantic", "logic", "quality"))
              + f"{'minutes':>9}")
        for w, r in pool.items():
            b, a = r["before"], r["after"]
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"{w:<12g}{a['n']:>4}{fmt(b['all']):>8}{fmt(a['all']):>8}"
                  + "".join(f"{fmt(a['check'][c]):>10}" for c in ("semantic", "logic", "quality"))
                  + f"{r['minutes']:>9.1f}")
        a3, a1 = pool[3.0]["after"]["all"], pool[1.0]["after"]["all"]
        if a3 is not None and a1 is not None:
            gain = a3 - a1
    print(f"check_f1_semantic={checks['semantic']['f1']:.4f} check_f1_logic={checks['logic']['f1']:.4f} "
          f"check_f1_quality={checks['quality']['f1']:.4f} pool_pass_gain_vs_weight1={gain:.4f}")


if __name__ == "__main__":
    main()
