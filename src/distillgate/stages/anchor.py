"""S1 knowledge anchoring (SPEC S1.1, S1.2, S1.3).

* S1.2, in the setup iteration 0: the teacher's layer-wise profile on held-out teacher text, cached per teacher
  version and text, committed with iteration 0 and summarised in its teacher metrics. The initial student is
  measured against it by the core's validate like every later one.
* S1.1 / S1.3, with option ``benchmark`` (off by default): the teacher's benchmark profile on that suite,
  computed once (cached per teacher fingerprint, suite, items and limit: :mod:`distillgate.evaluate.benchmark`),
  and in iteration 0 and every ``benchmark_every``-th iteration after it, whichever stage owns it (through the
  contract's ``observe``), the student measured against it through the metric registry (``bench_lost_share``,
  ``bench_<task>/<metric>``). The per-item diff is committed with the version as ``benchmark.json`` and each
  capability the student loses items of becomes a ``capability_gap`` finding (an error when it lost more than
  at the previous benchmark iteration).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

log = logging.getLogger(__name__)


class AnchorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profile: bool = Field(True, description="build (or reuse) the teacher's S1.2 layer-wise profile")
    profile_tokens: int = Field(1024, ge=16, description="held-out tokens the profile is measured on")
    profile_seq_len: int = Field(128, ge=8, description="sequence length the profile's text is cut into")
    benchmark_limit: int | None = Field(20, ge=1, description="items per benchmark task (per file / subject); "
                                                              "null: every item")
    benchmark_every: int = Field(1, ge=1, description="measure the student on the benchmark in iteration 0 and "
                                                      "every N-th iteration after it")
    benchmark_data_dir: str | None = Field(None, description="folder the suite's relative paths resolve from "
                                                             "(default: $DISTILLGATE_DATA, else the current folder)")
    benchmark_batch_size: int = Field(8, ge=1, description="batch size of the benchmark's scoring")
    benchmark_items: int = Field(20, ge=1, description="item ids kept per task / capability row of the diff")
    benchmark: str | None = Field(None, description="S1.1 benchmark suite: quick, standard, a suite YAML file or "
                                                    "FORMAT:FILE (see the evaluation reference); null: off")

    @field_validator("benchmark")
    @classmethod
    def _suite_and_data(cls, v: str | None, info: ValidationInfo) -> str | None:
        """The suite parses and every task's data reads (at preflight, before any model loads)."""
        if v is None:
            return v
        from ..errors import DistillgateError
        from ..evaluate.suite import prepare_suite

        from pydantic_core import PydanticCustomError

        ddir = info.data.get("benchmark_data_dir")
        try:
            prepare_suite(v, ddir, info.data.get("benchmark_limit"))
        except DistillgateError as e:
            hint = ("" if ddir else "; relative paths resolve against option benchmark_data_dir (else "
                                    "$DISTILLGATE_DATA, else the current folder)")
            raise PydanticCustomError("benchmark_suite", "a suite whose data reads ({error}){hint}",
                                      {"error": str(e), "hint": hint}) from None
        return v


class AnchorStage:
    name, code = "anchor", "S1"
    Options = AnchorOptions
    setup_only = True

    def __init__(self, options: AnchorOptions | None = None):
        self.options = options or AnchorOptions()

    def validate(self, it, run) -> None:
        if not self.options.profile:
            return
        import torch

        from ..io import distillgate_home, sha256_json
        from ..profile import build_profile, load_profile, save_profile

        flat = [t for e in run.heldout for t in e.input_ids][:self.options.profile_tokens]
        seq = self.options.profile_seq_len
        n = (len(flat) // seq) * seq
        if n == 0:
            log.warning("held-out text too short to profile the teacher")
            return
        x = torch.tensor(flat[:n]).reshape(-1, seq)
        key = sha256_json([run.teacher.fingerprint, flat[:n]])[:16]
        path = distillgate_home() / "profiles" / key
        if path.exists():
            prof = load_profile(path)
        else:
            prof = build_profile(run.teacher.model, x, meta={"teacher": run.teacher.path})
            save_profile(prof, path, overwrite=False)
        it.files["teacher_profile"] = path
        it.teacher_metrics.update(prof.summary())

    # ------------------------------------------------------------------------------ the benchmark (S1.1, S1.3)
    def _due(self, it) -> bool:
        return self.options.benchmark is not None and it.index % self.options.benchmark_every == 0

    def _out(self, it, run) -> Path:
        return Path(run.work) / f"benchmark-{it.index:03d}.json"

    def observe(self, phase: str, it, run) -> None:
        if not self._due(it):
            return
        if phase == "validate":       # ask the core's validate to measure it, with the suite's options
            from ..evaluate.benchmark import PRIMARY

            out = self._out(it, run)
            out.unlink(missing_ok=True)   # a crashed attempt of this iteration must not leave its diff
            o = self.options
            it.extra_metrics.append(PRIMARY)
            it.measure_options["benchmark"] = {"suite": o.benchmark, "data_dir": o.benchmark_data_dir,
                                               "limit": o.benchmark_limit, "batch_size": o.benchmark_batch_size,
                                               "max_items": o.benchmark_items, "out": str(out)}
        elif phase == "attribute":    # the diff the provider wrote: commit it, name the capabilities lost
            from ..evaluate.benchmark import capability_findings

            out = self._out(it, run)
            if not out.is_file():     # the provider failed: its note is in the gate table
                return
            doc = json.loads(out.read_text())
            it.files["benchmark.json"] = out
            it.teacher_metrics.update(doc["teacher_metrics"])
            state = run.stage_state(self.name)
            gaps = capability_findings(doc, it.index, state.get("benchmark_last"))
            it.findings += gaps
            run.say(f"  benchmark {doc['suite']}: the student loses {doc['lost']} of {doc['n']} items the teacher "
                    f"gets right, gains {doc['gained']}"
                    + (f" (most in {', '.join(f.evidence['capability'] for f in gaps[:3])})" if gaps else ""))
            by_tag = doc["diff"]["by_tag"]
            state["benchmark_last"] = {"iteration": it.index,
                                       "lost": {c: by_tag.get(c, {}).get("lost", 0) for c in doc["capabilities"]}}
