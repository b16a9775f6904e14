"""Kill-and-resume checks for loop tests: a straight run, the same run killed inside one iteration's training and
resumed, and a comparison of what both committed (stage states, student weights)."""

from __future__ import annotations

from pathlib import Path


def killed_and_resumed(cfg_for, roots: tuple[Path, Path], kill_at: int, *, after_training: bool = True,
                       on_distil=None) -> str:
    """Run ``cfg_for(roots[0])`` straight; run ``cfg_for(roots[1])`` with a ``KeyboardInterrupt`` raised in iteration
    ``kill_at``'s ``Run.distil`` (after its training when ``after_training``, else before), then ``--resume`` it.
    ``on_distil(run, it)`` is called at every distil of the second run. Returns the run id."""
    import pytest

    from .. import loop as loop_mod

    straight = loop_mod.run(cfg_for(roots[0]), progress=False)
    real = loop_mod.Run.distil
    state = {"killed": False}

    def dying(self, it, **kw):
        if on_distil is not None:
            on_distil(self, it)
        kill = it.index == kill_at and not state["killed"]
        if kill and not after_training:
            state["killed"] = True
            raise KeyboardInterrupt(f"simulated kill in iteration {kill_at}")
        out = real(self, it, **kw)
        if kill:
            state["killed"] = True
            raise KeyboardInterrupt(f"simulated kill in iteration {kill_at}")
        return out

    loop_mod.Run.distil = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            loop_mod.run(cfg_for(roots[1]), progress=False)
        loop_mod.run(None, resume_run=straight["run_id"], root=str(roots[1]), progress=False)
    finally:
        loop_mod.Run.distil = real
    return straight["run_id"]


def committed(root: Path, run_id: str) -> tuple[dict, dict]:
    """(the ``current`` version's stage states, its student weights ``{file: {tensor name: tensor}}``)."""
    from safetensors.torch import load_file

    from ..store import RunStore

    with RunStore.open(root, run_id) as s:
        v = s.resolve("current")
        states = v.load_json("loop_state.json")["stages"]
        weights = {n: load_file(str(v.path_of(n))) for n in v.names("student/") if n.endswith(".safetensors")}
    return states, weights


def assert_same_weights(a: dict, b: dict) -> None:
    """Bitwise equality of two ``committed(...)[1]`` weight sets."""
    assert a.keys() == b.keys()
    for f in a:
        assert a[f].keys() == b[f].keys(), f
        for k in a[f]:
            assert a[f][k].equal(b[f][k]), k
