"""S4 behaviour-consistency reinforcement (SPEC S4): challenge inputs, three checks, a hard pool at 3x weight.

Each iteration the stage owns:

* **extract**: the teacher's answers to the hard pool's challenges join the training set (once per challenge;
  on resume the ones added before are added again first, in their order, so the set is the straight run's),
  and the pool is checked with the student as it is *before* this iteration's training;
* **map**: training on everything so far; pool members weigh ``weight`` (3x, S4.3) through the recipe's
  ``hard_pool``, which this stage's rule ``consistency_pool`` writes in compensate;
* **validate**: ``challenges`` new challenge inputs (six kinds, :mod:`distillgate.consistency.challenge`) from
  the prompt pool, plus the pool again, answered by teacher and student and judged by the three checks
  (:mod:`distillgate.consistency.checks`); failures enter the pool, members that passed ``pass_to_leave``
  times in a row leave. Pass rates per check and per kind are registered metrics (``consistency/...``) and
  the per-kind table, the pool's rates before / after and example failures go to ``consistency.json``,
  committed with the version (the HTML report shows them);
* **attribute**: a ``consistency_pool`` finding carries the pool for the rule.

Everything it must remember (the pool, the challenges it trained on, the semantic threshold) lives in
``run.stage_state(state_key)`` (``consistency``, or ``consistency[i]`` for one of several entries; their pools
share the recipe's ``s4-*`` hard-pool keys, the newest writer's weight wins).
"""

from __future__ import annotations

import json
import logging

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..consistency.challenge import KINDS
from ..consistency.checks import CHECKS
from ..evaluate.providers import register_metric
from ..errors import reject_unknown
from ..schema import Finding

log = logging.getLogger(__name__)
POOL_PREFIX = "s4-"  # challenge ids (and so their example ids) start with it: the rule owns those pool keys


class ConsistencyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    challenges: int = Field(24, ge=0, description="new challenge inputs per iteration (kinds cycled in order)")
    kinds: list[str] = Field(list(KINDS), min_length=1, description=f"challenge kinds, from {list(KINDS)}")
    steps: int | None = Field(None, ge=1, description="optimizer steps per iteration (default: the recipe's "
                                                      "train.steps)")
    weight: float | None = Field(None, gt=0.0, description="loss weight of pool samples (default: "
                                 "loop.strategy.hard_weight, 3.0 = S4.3's three times)")
    pass_to_leave: int = Field(2, ge=1, description="iterations in a row a pool sample must pass to leave")
    pool_max: int = Field(64, ge=1, description="most samples in the pool (oldest leave first)")
    semantic_threshold: float | None = Field(None, ge=-1.0, le=1.0, description="cosine under which answers "
                                             "differ (default: calibrated on the labelled set)")
    nli_model: str | None = Field(None, description="a local NLI cross-encoder folder for a second semantic "
                                  "opinion (never downloaded; default: none)")
    logic_tolerance: float = Field(0.01, ge=0.0, le=0.5, description="relative tolerance of quantity checks")
    quality_margin: float = Field(0.15, ge=0.0, le=1.0, description="how far the student's quality may fall "
                                  "under the teacher's")
    quality_floor: float = Field(0.3, ge=0.0, le=1.0, description="lowest politeness / density accepted")
    max_new_tokens: int | None = Field(None, ge=1, description="student answer length (default: "
                                       "data.max_new_tokens, the teacher's)")
    examples: int = Field(2, ge=0, description="example failures per kind kept for the report")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v):
        reject_unknown(v, KINDS, "kind")
        if len(set(v)) != len(v):
            raise ValueError(f"repeated kind(s) in {v}")
        return v

    @field_validator("nli_model")
    @classmethod
    def _nli(cls, v):
        from pathlib import Path

        if v is not None and not Path(v).is_dir():
            raise ValueError(f"{v!r} is not a local folder (the NLI model is never downloaded)")
        return v


def _register_metrics() -> None:
    kw = {"module": __name__, "regression_threshold": 0.25, "tier": "mid"}
    register_metric("consistency/pass", higher_is_better=True, description="S4: share of new challenge inputs "
                    "whose student answer passes all three checks", **kw)
    for c in CHECKS:
        register_metric(f"consistency/pass/{c}", higher_is_better=True,
                        description=f"S4: share of new challenge inputs passing the {c} check", **kw)
    for k in KINDS:
        register_metric(f"consistency/pass/kind/{k}", higher_is_better=True,
                        description=f"S4: share of new {k} challenge inputs passing all checks", **kw)
    register_metric("consistency/pool/pass_before", higher_is_better=True, regression=False, module=__name__,
                    description="S4.3: hard-pool pass rate before this iteration's training")
    register_metric("consistency/pool/pass_after", higher_is_better=True, regression=False, module=__name__,
                    description="S4.3: hard-pool pass rate after this iteration's training")
    register_metric("consistency/pool/size", higher_is_better=False, regression=False, module=__name__,
                    description="S4.3: samples in the hard pool after this iteration")


_register_metrics()


class ConsistencyStage:
    name, code = "consistency", "S4"
    Options = ConsistencyOptions

    def __init__(self, options: ConsistencyOptions | None = None):
        self.options = options or ConsistencyOptions()

    # ------------------------------------------------------------------------------------- phases
    def observe(self, phase, it, run) -> None:
        """Before every iteration's extract (this stage's or another's): pool members train from the iteration
        after they entered, whichever stage runs it, and a resumed run re-adds every group it had."""
        if phase == "extract":
            self._train_groups(it, run)

    def _train_groups(self, it, run) -> None:
        from ..data.dataset import truncate

        st = self._state(run)
        # Pool members join training in groups, one per iteration they entered in; a group's teacher answers
        # are taken from that iteration's judged list (one cached dataset), so no challenge is answered twice,
        # and on resume re-adding the groups in order rebuilds the straight run's training set and caches.
        groups = st.setdefault("trained", [])
        done = {i for g in groups for i in g["ids"]}
        pending: dict[int, list[str]] = {}
        for m in st.get("pool", []):
            if m["challenge"]["id"] not in done:
                pending.setdefault(m["entered"], []).append(m["challenge"]["id"])
        groups += [{"iteration": e, "ids": ids} for e, ids in sorted(pending.items())]
        have = {e.id for e in run.training.examples}
        for g in groups:
            # a group is added whole once: members whose answer does not fit data.seq_len are never in the
            # training set, so "any member present" (not "every member") says the group is in
            if not any(f"{i}/s0" in have for i in g["ids"]):
                exs = {e.prompt_id: e for e in self._teacher_examples(run, st["judged"][str(g["iteration"])])}
                # cut to data.seq_len as the training set's own examples are; a challenge whose prompt fills
                # the window has no answer token left to train on
                cut = [truncate(exs[i], run.cfg.data.seq_len) for i in g["ids"] if i in exs]
                fits = [e for e in cut if e is not None]
                if len(fits) < len(g["ids"]):
                    it.findings.append(Finding("data", "warning", "consistency/pool",
                                               f"{len(g['ids']) - len(fits)} pool challenge(s) of iteration "
                                               f"{g['iteration']} have no answer token within data.seq_len="
                                               f"{run.cfg.data.seq_len}: checked, not trained"))
                if fits:
                    run.training.add_examples(fits)

    def extract(self, it, run) -> None:
        st = self._state(run)
        pool = st.get("pool", [])
        before = self._judge(run, [m["challenge"] for m in pool]) if pool else []
        st["pool_before"] = [{"challenge": {"id": o["challenge"]["id"], "kind": o["challenge"]["kind"]},
                              "failed": o["failed"]} for o in before]

    def map(self, it, run) -> None:
        run.distil(it, steps=self.options.steps)

    def validate(self, it, run) -> None:
        from ..consistency import challenge, pool as pool_mod
        from .production import traffic_sources

        st = self._state(run)
        o = self.options
        held = {e.prompt_id for e in run.heldout}  # never made into training challenges: held-out stays unseen
        sources = [run.training.pool[i] for i in run.training.pool_order if i not in held]
        sources += traffic_sources(it.recipe)  # requests that failed in the last A/B window (L4 feedback)
        new = [c.to_json() for c in challenge.generate(sources, o.challenges, run.cfg.train.seed * 7919 + it.index,
                                                       o.kinds)]
        members = st.get("pool", [])
        st.setdefault("judged", {})[str(it.index)] = new
        fresh = self._judge(run, new)
        rechecked = self._judge(run, [m["challenge"] for m in members])
        after = {r["challenge"]["id"]: r for r in rechecked}
        st["pool"], entered, left = pool_mod.update(members, after, fresh, it.index, pass_to_leave=o.pass_to_leave,
                                                    max_size=o.pool_max)
        st["entered"], st["left"] = entered, left
        keep = {str(g["iteration"]) for g in st.get("trained", [])} | {str(m["entered"]) for m in st["pool"]}
        st["judged"] = {k: v for k, v in st["judged"].items() if k in keep}  # lists a member or group came from

        new_rates = pool_mod.rates(fresh)
        before_rates, after_rates = pool_mod.rates(st.pop("pool_before", [])), pool_mod.rates(rechecked)
        if new_rates["all"] is not None:
            it.metrics["consistency/pass"] = new_rates["all"]
            for c, v in new_rates["check"].items():
                it.metrics[f"consistency/pass/{c}"] = v
            for k, v in new_rates["kind"].items():
                it.metrics[f"consistency/pass/kind/{k}"] = v
        if before_rates["all"] is not None:
            it.metrics["consistency/pool/pass_before"] = before_rates["all"]
        if after_rates["all"] is not None:
            it.metrics["consistency/pool/pass_after"] = after_rates["all"]
        it.metrics["consistency/pool/size"] = len(st["pool"])

        table = {}
        for k in o.kinds:
            rows = [r for r in fresh if r["challenge"]["kind"] == k]
            table[k] = {"generated": len(rows), "answered": sum(r["answered"] for r in rows),
                        "failed": sum(bool(r["failed"]) for r in rows),
                        **{f"failed_{c}": sum(c in r["failed"] for r in rows) for c in CHECKS}}
        examples = []
        for k in o.kinds:
            examples += [_example(r) for r in fresh if r["challenge"]["kind"] == k and r["failed"]][:o.examples]
        history = st.setdefault("history", [])
        history.append({"iteration": it.index, "new": new_rates, "pool_before": before_rates,
                        "pool_after": after_rates, "pool_size": len(st["pool"]), "entered": len(entered),
                        "left": len(left)})
        path = run.work / f"consistency-{it.index:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"iteration": it.index, "kinds": table, "new": new_rates,
                                    "pool_before": before_rates, "pool_after": after_rates,
                                    "pool_size": len(st["pool"]), "entered": entered, "left": left,
                                    "calibration": st.get("calibration"), "examples": examples}, indent=1))
        it.files["consistency.json"] = path
        run.say(f"  S4: {len(fresh)} challenges, pass {_pct(new_rates['all'])} "
                f"(semantic {_pct(new_rates['check']['semantic'])}, logic {_pct(new_rates['check']['logic'])}, "
                f"quality {_pct(new_rates['check']['quality'])}); pool {len(members)} -> {len(st['pool'])}, "
                f"pass before {_pct(before_rates['all'])} after {_pct(after_rates['all'])}")

    def attribute(self, it, run) -> None:
        st = self._state(run)
        pool = st.get("pool", [])
        it.findings.append(Finding(
            "consistency_pool", "info", "consistency/pool",
            f"{len(pool)} challenge(s) in the S4 hard pool ({len(st.get('entered', []))} entered, "
            f"{len(st.get('left', []))} left)",
            {"entry": getattr(self, "state_key", self.name),
             "pool": {m["example_id"]: m["challenge"]["kind"] for m in pool},
             "failed_checks": {m["example_id"]: m["failed_checks"] for m in pool}}))

    # ------------------------------------------------------------------------------------- strategy
    def rules(self):
        weight, key = self.options.weight, getattr(self, "state_key", self.name)

        def consistency_pool(s) -> None:
            """S4.3: the pool's challenges train at ``weight`` (default loop.strategy.hard_weight) next round."""
            found = [f for f in s.of_kind("consistency_pool") if f.evidence.get("entry", key) == key]
            if not found:
                return
            w = s.spec.hard_weight if weight is None else weight
            old = dict(s.get("hard_pool") or {})
            mine = {k: w for k in found[-1].evidence["pool"]}
            new = {k: v for k, v in old.items() if not k.startswith(POOL_PREFIX)} | mine
            if new != old:
                n_old = sum(k.startswith(POOL_PREFIX) for k in old)
                s.record("consistency_pool", "hard_pool", len(old), len(new),
                         f"S4 hard pool {n_old} -> {len(mine)} challenge(s), trained next round at weight {w}",
                         value=new)
        return [("consistency_pool", consistency_pool)]

    # ------------------------------------------------------------------------------------- helpers
    def _state(self, run) -> dict:
        """This entry's state (``state_key``: the name, or ``name[i]`` when several entries use the stage)."""
        return run.stage_state(getattr(self, "state_key", self.name))

    def _judge(self, run, challenges: list[dict]) -> list[dict]:
        """Teacher answers (cached), student answers (greedy) and the three checks for ``challenges``."""
        from ..consistency.challenge import Challenge
        from ..consistency.judge import Judge, calibrate_semantic
        from ..consistency.checks import semantic
        from ..consistency import labelled
        from ..data.generate import generate_responses

        if not challenges:
            return []
        o, st = self.options, self._state(run)
        records = [Challenge.from_json(c).record() for c in challenges]
        teacher = self._teacher_answers(run, challenges)
        model = run.student
        was = model.training
        model.eval()
        try:
            exs = generate_responses(model, run.teacher.tokenizer, records,
                                     max_new_tokens=o.max_new_tokens or run.cfg.data.max_new_tokens,
                                     batch_size=run.cfg.data.gen_batch_size, progress=False)
        finally:
            model.train(was)
        student = {e.prompt_id: e.response.strip() for e in exs}
        encoder = semantic.load_encoder()
        if o.semantic_threshold is None and "calibration" not in st:
            cal = calibrate_semantic(encoder, labelled.load("semantic"))
            st["calibration"] = {"threshold": cal.threshold, "auc": cal.auc, "f1": cal.f1}
        threshold = o.semantic_threshold if o.semantic_threshold is not None else st["calibration"]["threshold"]
        nli = semantic.NLI(o.nli_model) if o.nli_model else None
        judge = Judge(encoder, threshold, nli, o.logic_tolerance, o.quality_margin, o.quality_floor)
        return judge(challenges, [teacher.get(r.id, "") for r in records], [student.get(r.id, "") for r in records])


    def _teacher_examples(self, run, challenges: list[dict]) -> list:
        """The teacher's answers (generated once per list, then cached), whole: the checks read the full
        answer, and a list of long challenges must not fail on data.seq_len (the dataset cache key holds
        no seq_len, so this is the same cached dataset the training set would open)."""
        from .. import pipeline
        from ..consistency.challenge import Challenge

        spec = run.cfg.data.model_copy(update={"heldout_fraction": 0.0, "seq_len": 1 << 30})
        records = [Challenge.from_json(c).record() for c in challenges]
        show = getattr(run, "progress", None) is not False
        return pipeline.extract(run.teacher, records, spec, progress=show).examples("all")

    def _teacher_answers(self, run, challenges: list[dict]) -> dict[str, str]:
        """The teacher's answer per challenge id, each from the list it was first judged in (cached)."""
        judged = self._state(run).get("judged", {})
        want = {c["id"] for c in challenges}
        out: dict[str, str] = {}
        for k in sorted(judged, key=int):
            if want & {c["id"] for c in judged[k]}:
                out.update({e.prompt_id: e.response.strip() for e in self._teacher_examples(run, judged[k])
                            if e.prompt_id in want})
        rest = [c for c in challenges if c["id"] not in out]
        out.update({e.prompt_id: e.response.strip() for e in self._teacher_examples(run, rest)} if rest else {})
        return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _example(r: dict) -> dict:
    c = r["challenge"]
    return {"kind": c["kind"], "request": c["text"], "source": c["source_text"],
            "transformation": c["transformation"], "teacher": r["teacher"], "student": r["student"],
            "failed": r["failed"], "why": {n: r["checks"][n]["reason"] for n in r["failed"]}}
