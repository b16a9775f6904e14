import json
import math
import statistics

import pytest

from distillgate.config import DOMAINS
from distillgate.data.prompts import (
    GENERAL,
    builtin_prompts,
    complexity_score,
    level_of,
    load_hf_prompts,
    load_jsonl_prompts,
)
from distillgate.errors import ConfigError, InputError


def test_builtin_is_deterministic_and_seeded():
    a, b = builtin_prompts(40, seed=3), builtin_prompts(40, seed=3)
    assert [p.to_json() for p in a] == [p.to_json() for p in b]
    c = builtin_prompts(40, seed=4)
    assert [p.text for p in a] != [p.text for p in c]


def test_builtin_balanced_deduplicated_and_interleaved():
    ps = builtin_prompts(403, seed=0)
    assert len(ps) == 403
    assert len({p.text for p in ps}) == 403 and len({p.id for p in ps}) == 403
    per_domain = {d: sum(p.domain == d for p in ps) for d in DOMAINS}
    assert max(per_domain.values()) - min(per_domain.values()) <= 1
    # any prefix is balanced too (round-robin order)
    first16 = [p.domain for p in ps[:16]]
    assert all(first16.count(d) == 2 for d in DOMAINS)
    for d in DOMAINS:
        levels = [p.level for p in ps if p.domain == d]
        counts = [levels.count(lv) for lv in (1, 2, 3)]
        assert max(counts) - min(counts) <= 1
    assert all(p.messages[-1]["role"] == "user" and p.source == "builtin" for p in ps)


def test_builtin_domains_subset_and_errors():
    ps = builtin_prompts(9, domains=["legal", "travel"], seed=1)
    assert {p.domain for p in ps} == {"legal", "travel"}
    with pytest.raises(ConfigError, match="data.domains"):
        builtin_prompts(4, domains=["astrology"])
    with pytest.raises(ConfigError, match="data.num_prompts"):
        builtin_prompts(0)
    with pytest.raises(ConfigError, match="distinct built-in prompts"):
        builtin_prompts(2_000_000, domains=["legal"])


def test_complexity_orders_levels_from_structure():
    ps = builtin_prompts(240, seed=0)
    by_level = {lv: [p.complexity for p in ps if p.level == lv] for lv in (1, 2, 3)}
    means = [statistics.mean(by_level[lv]) for lv in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    assert max(by_level[1]) < min(by_level[3])
    assert all(0.0 <= c < 1.0 for c in by_level[1] + by_level[2] + by_level[3])
    # the score comes from the text, not the label: the structural level agrees with the template's level
    agree = sum(level_of(p.complexity) == p.level for p in ps) / len(ps)
    assert agree > 0.85


def test_complexity_score_pinned():
    # "What is a loan?": 4 words, 0 conditionals, 0 clause markers, 1 part ("?") -> s = 0.06 + 0.048
    assert complexity_score("What is a loan?") == pytest.approx(1 - math.exp(-0.108), abs=1e-4)
    # 2 conditionals (if, unless), 3 clause markers ("and", two commas), 1 part ("?"), 10 words
    assert complexity_score("If rain and wind, unless told so, do we go?") == pytest.approx(
        1 - math.exp(-(0.35 * 2 + 0.08 * 3 + 0.06 * 1 + 0.012 * 10)), abs=1e-4)


def _write(tmp_path, lines):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_prompts_and_messages(tmp_path):
    p = _write(tmp_path, [
        json.dumps({"prompt": "What is a bond?", "domain": "finance_risk"}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "If the fare is refundable, unless booked late, "
                                                             "can I cancel?"}], "domain": "travel"}),
        json.dumps({"prompt": "No domain here"}),
        json.dumps({"prompt": "What is a bond?", "domain": "finance_risk"}),  # duplicate: dropped
    ])
    ps = load_jsonl_prompts(p)
    assert [r.domain for r in ps] == ["finance_risk", "travel", GENERAL]
    assert ps[1].messages[0]["role"] == "system" and ps[1].complexity > ps[0].complexity
    assert ps[0].meta["line"] == 1 and ps[1].meta["line"] == 3


@pytest.mark.parametrize("line,needle", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON list"),
    (json.dumps({"text": "hi"}), "no 'prompt' or 'messages'"),
    (json.dumps({"prompt": "hi", "domain": "astrology"}), "unknown domain 'astrology'"),
    (json.dumps({"prompt": ""}), "non-empty string"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     "last message must be a user turn"),
    (json.dumps({"messages": [{"role": "bot", "content": "a"}]}), "messages[0]"),
])
def test_jsonl_bad_line_names_file_line_and_allowed(tmp_path, line, needle):
    p = _write(tmp_path, [json.dumps({"prompt": "fine"}), "", line])
    with pytest.raises(InputError) as e:
        load_jsonl_prompts(p)
    msg = str(e.value)
    assert f"{p}:3:" in msg and needle in msg and '"prompt"' in msg and "finance_risk" in msg


def test_jsonl_empty_or_missing_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(InputError, match="empty file"):
        load_jsonl_prompts(p)
    with pytest.raises(InputError, match="not found"):
        load_jsonl_prompts(tmp_path / "nope.jsonl")


def test_hf_prompts_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InputError, match="network access.*data.source=jsonl"):
        load_hf_prompts("tatsu-lab/alpaca", "train", "instruction", 4)


def test_builtin_is_prefix_stable():
    """Asking for more prompts appends: the first n are the same prompts, in the same order."""
    small, big = builtin_prompts(37, seed=2), builtin_prompts(301, seed=2)
    assert [p.id for p in small] == [p.id for p in big[:37]]
    two = builtin_prompts(11, domains=["legal", "travel"], seed=1)
    assert [p.id for p in two] == [p.id for p in builtin_prompts(60, domains=["legal", "travel"], seed=1)[:11]]


def test_a_runs_heldout_and_selection_prompts_do_not_depend_on_its_length(tmp_path):
    """The gates' held-out set and the selection split are drawn from a pool sized by the run's iteration count;
    a 3-iteration and a 9-iteration run of the same config must measure on the same prompts (and take the same
    first iteration), or their KL would not compare."""
    from distillgate.config import RunConfig, load_config
    from distillgate.loop.state import LoopState
    from distillgate.loop.training_set import TrainingSet, prompt_pool

    cfg = load_config(RunConfig, None, ["loop.heldout_prompts=12", "loop.prompts_per_iteration=16",
                                        "loop.strategy.exploration.selection_prompts=10", "data.seed=3"])
    mix = {d: 1.0 for d in cfg.data.domains}
    drawn = []
    for iterations in (3, 9):
        ts = TrainingSet(cfg, None, LoopState(recipe={}), prompt_pool(cfg, iterations), progress=False)
        held = ts.take(12, mix, "lm", seed=-1)
        ts.state.heldout_prompts = [p.id for p in held]
        sel = ts.take(10, mix, "lm", seed=-3)
        ts.state.selection_prompts = [p.id for p in sel]
        first = ts.take(16, mix, "lm", seed=0)
        drawn.append(([p.id for p in held], [p.id for p in sel], [p.id for p in first]))
    assert drawn[0] == drawn[1]
    assert not set(drawn[0][0]) & set(drawn[0][1])
