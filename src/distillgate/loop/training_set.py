"""The run's prompts and training examples: a fixed prompt pool, the held-out prompts, the prompts each
iteration took, the teacher's answers to them and their cached targets (one cache per addition).

Everything is deterministic from the config and the loop state (``heldout_prompts``, ``used_prompts``), so a
resumed run rebuilds the same training set from the caches without asking the teacher again."""

from __future__ import annotations

import random

from .. import pipeline

# Level shares of new prompts per curriculum tier (SPEC L3): simple statements first, nested conditions last.
TIER_LEVELS = {"lm": {1: 0.5, 2: 0.3, 3: 0.2}, "mid": {1: 0.2, 2: 0.5, 3: 0.3}, "high": {1: 0.1, 2: 0.3, 3: 0.6}}


def prompt_pool(cfg, max_iterations: int) -> list:
    """Every prompt the run may use, in a fixed order (deterministic from the config)."""
    from ..data.prompts import builtin_prompts, prompts_from_spec

    if cfg.data.source == "builtin":
        need = (cfg.loop.heldout_prompts + cfg.loop.strategy.exploration.selection_prompts + 16
                + 3 * cfg.loop.prompts_per_iteration * max_iterations)
        return builtin_prompts(need, cfg.data.domains, cfg.data.seed)
    pool = prompts_from_spec(cfg.data.model_copy(update={"num_prompts": 10 ** 9}))
    random.Random(cfg.data.seed).shuffle(pool)
    return pool


class TrainingSet:
    """Prompts -> teacher answers -> examples (+ cached targets), with the loop state's bookkeeping."""

    def __init__(self, cfg, teacher, state, pool: list, *, progress: bool = True):
        self.cfg, self.teacher, self.state, self.progress = cfg, teacher, state, progress
        self.pool = {p.id: p for p in pool}
        self.pool_order = [p.id for p in pool]
        self.data_spec = cfg.data.model_copy(update={"heldout_fraction": 0.0})
        self.prompt_examples: list = []  # teacher answers to the run's prompts, in the order they were taken
        self.stage_examples: list = []   # examples a stage added (add_examples), in the order they were added
        self.target_caches: list = []
        self.groups: list[list] = []     # the examples of each addition, in order (one teacher-side cache each)

    @property
    def examples(self) -> list:
        """Everything trained on: the prompt examples, then the stages' examples. The order is canonical, not
        the order of the calls, so a resumed run (which rebuilds the prompt examples first and lets each stage
        re-add its own) trains on exactly the straight run's list."""
        return self.prompt_examples + self.stage_examples

    def used(self) -> set[str]:
        used = set(self.state.heldout_prompts) | set(self.state.selection_prompts)
        for ids in self.state.used_prompts.values():
            used |= set(ids)
        return used

    def take(self, n: int, mix: dict[str, float], tier: str, seed: int) -> list:
        """``n`` unused prompts, split over domains by ``mix`` and over complexity levels by the tier.

        Counts per (domain, level) cell are allotted by largest remainders so they sum to exactly ``n`` (every
        domain with a share gets its part); a cell short of prompts is topped up from the rest of the pool."""
        rng = random.Random(f"{self.cfg.data.seed}:{seed}")
        levels = TIER_LEVELS[tier]
        used = self.used()
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

    def answers(self, prompts) -> list:
        """The teacher's answers to ``prompts`` as examples (generated once, then from the dataset cache)."""
        if not prompts:
            return []
        ds = pipeline.extract(self.teacher, prompts, self.data_spec, progress=self.progress)
        return ds.examples("all")

    def add_prompts(self, iteration: int, prompts) -> list:
        """Record ``prompts`` as iteration ``iteration``'s and add their examples (and targets) to training."""
        self.state.used_prompts[str(iteration)] = [p.id for p in prompts]
        return self._extend(prompts)

    def add_examples(self, examples) -> None:
        """Add already answered examples (e.g. a stage's own) to training, with their targets. They are not
        recorded in the loop state: the stage keeps what it needs to re-add them after a resume (its
        ``observe`` hook sees every iteration)."""
        self._with_targets(list(examples), self.stage_examples)

    def _extend(self, prompts) -> list:
        new = self.answers(prompts)
        self._with_targets(new, self.prompt_examples)
        return new

    def _with_targets(self, new: list, into: list) -> None:
        if not new:
            return
        into += new
        self.groups.append(list(new))
        if self.cfg.targets.mode == "cached":
            self.target_caches.append(pipeline.teacher_provider(self.cfg, self.teacher, new, progress=self.progress))

    def restore(self) -> None:
        """Rebuild the examples of every recorded iteration (resume): answers and targets come from caches."""
        for k in sorted(self.state.used_prompts, key=int):
            self._extend([self.pool[i] for i in self.state.used_prompts[k]])

    def provider(self):
        """The teacher side for training: every cache so far, or the online teacher."""
        if self.cfg.targets.mode == "cached":
            return pipeline.MultiTargets(self.target_caches)
        return pipeline.teacher_provider(self.cfg, self.teacher, [])


def feed_requests(run, state: dict, it, recipe_key: str, kind: str, prefix: str) -> list[tuple[dict, int]]:
    """Requests a rule chose (``it.recipe[recipe_key].prompts``: ``{text, domain, ...}``) join training with the
    teacher's answers. Every group fed so far is kept in ``state["fed"]`` and re-added after a resume; a group
    already in the training set is skipped. Returns ``(group, examples added)`` for each group added now."""
    from .. import pipeline
    from ..data.dataset import truncate
    from ..data.prompts import make_record

    fed = state.setdefault("fed", [])
    want = (it.recipe.get(recipe_key) or {}).get("prompts") or []
    if want and not any(g["iteration"] == it.index for g in fed):
        fed.append({"iteration": it.index, "prompts": want})
    have = {e.prompt_id for e in run.training.examples}
    added = []
    for g in fed:
        records = [request_record(p, kind, prefix) for p in g["prompts"]]
        if not records or any(r.id in have for r in records):
            continue
        spec = run.cfg.data.model_copy(update={"heldout_fraction": 0.0})
        exs = pipeline.extract(run.teacher, records, spec, progress=False).examples("all")
        fits = [x for x in (truncate(e, run.cfg.data.seq_len) for e in exs) if x is not None]
        if fits:
            run.training.add_examples(fits)
        added.append((g, len(fits)))
    return added


def request_record(p: dict, kind: str, prefix: str):
    """One chosen request ``{text, domain, ...}`` as a PromptRecord of source ``kind`` (id ``prefix`` + hash)."""
    from ..data.prompts import make_record

    r = make_record([{"role": "user", "content": p["text"]}], p["domain"], kind, meta={kind: p})
    r.id = prefix + r.id
    return r
