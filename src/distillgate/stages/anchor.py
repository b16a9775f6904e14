"""S1 knowledge anchoring (SPEC S1.2, S1.3): in the setup iteration 0, the teacher's layer-wise profile on
held-out teacher text, cached per teacher version and text, committed with iteration 0 and summarised in its
teacher metrics. The initial student is measured against it by the core's validate like every later one."""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class AnchorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profile: bool = Field(True, description="build (or reuse) the teacher's S1.2 layer-wise profile")
    profile_tokens: int = Field(1024, ge=16, description="held-out tokens the profile is measured on")
    profile_seq_len: int = Field(128, ge=8, description="sequence length the profile's text is cut into")


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
