"""G-O2 drift: the daily measure on a traffic log, the three-day trigger, the gate metric, the recalibration rule."""

import numpy as np
import pytest

from distillgate.errors import ConfigError, InputError
from distillgate.ops.clock import DAY, SimClock
from distillgate.ops.drift import DriftOptions, DriftStage, daily_drift
from distillgate.traffic.events import TurnEvent
from distillgate.traffic.generator import START_TS

WORDS = [f"w{i}" for i in range(40)]


def _log(days=7, drift_from=3, turns=60, seed=0):
    """Answers drawn from a Zipf-like word distribution; unseen domain 'legal' drifts to a reversed one
    from ``drift_from`` on, the seen domain 'finance' never drifts."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, len(WORDS) + 1)
    base /= base.sum()
    shifted = base[::-1].copy()
    out = []
    for d in range(days):
        for i in range(turns):
            for dom in ("legal", "finance"):
                p = shifted if (dom == "legal" and d >= drift_from) else base
                p = 0.5 * p + 0.5 * base if p is shifted else p  # a partial shift
                words = rng.choice(WORDS, size=50, p=p)
                ts = START_TS + d * DAY + (i + 0.5) * DAY / turns
                out.append(TurnEvent(ts=ts, session_id=f"s{d}-{i}-{dom}", user_id=f"u{i}", arm="candidate", turn=1,
                                     domain=dom, traffic_type="support", request=f"q {d} {i} {dom}",
                                     response=" ".join(words), latency_ms=10.0, outcome="resolved",
                                     provenance="simulated"))
    return out


OPTS = DriftOptions(threshold=0.042, unseen_domains=["legal"], n_resamples=100)


def test_drift_injected_from_day_3_triggers_on_day_5_not_before():
    events = _log()
    clock = SimClock(START_TS)
    seen = {}
    for day in range(1, 8):  # the daily job, run at the end of each simulated day
        clock.set(START_TS + day * DAY)
        rep = daily_drift(events, OPTS, release_ts=START_TS, until=clock.now())
        seen[day - 1] = rep["trigger_day"]
    assert [seen[d] for d in range(5)] == [None] * 5
    assert seen[5] == 5 and seen[6] == 5
    rep = daily_drift(events, OPTS, release_ts=START_TS, until=START_TS + 7 * DAY)
    kl = {r["day"]: r["kl"] for r in rep["days"]}
    assert all(kl[d] < 0.042 for d in (1, 2)) and all(kl[d] > 0.042 for d in (3, 4, 5, 6))
    for r in rep["days"]:
        assert r["ci_low"] <= r["kl"] <= r["ci_high"] and r["status"] == "measured"
    assert rep["drift_kl_min_3day"] == pytest.approx(min(kl[4], kl[5], kl[6]))
    assert rep["seed_prompts"] and all(p["domain"] == "legal" for p in rep["seed_prompts"])
    assert {p["text"].split()[1] for p in rep["seed_prompts"]} <= {"3", "4", "5"}, "seeds come from the streak days"


def test_seen_domain_does_not_drift_and_threshold_is_configuration():
    events = _log()
    rep = daily_drift(events, DriftOptions(threshold=0.042, unseen_domains=["finance"], n_resamples=100), until=START_TS + 7 * DAY)
    assert rep["trigger_day"] is None and rep["drift_kl_min_3day"] < 0.042
    legal = OPTS.model_copy(update={"consecutive_days": 2})
    assert daily_drift(events, legal, until=START_TS + 7 * DAY)["trigger_day"] == 4


def test_a_thin_day_is_insufficient_and_breaks_the_streak():
    events = [e for e in _log() if not (e.ts // DAY == (START_TS + 4 * DAY) // DAY and e.session_id.endswith("7-legal"))]
    events = [e for e in events if not (START_TS + 4 * DAY <= e.ts < START_TS + 5 * DAY and e.domain == "legal"
                                        and int(e.session_id.split("-")[1]) >= 10)]
    rep = daily_drift(events, OPTS, until=START_TS + 7 * DAY)
    day4 = next(r for r in rep["days"] if r["day"] == 4)
    assert day4["status"] == "insufficient"
    assert rep["trigger_day"] is None  # 3 above, 4 thin, 5 and 6 above: never three in a row


def test_bad_input_is_named():
    with pytest.raises(InputError, match="no answered turns"):
        daily_drift(_log(days=2), OPTS.model_copy(update={"unseen_domains": ["medical"]}))
    with pytest.raises(ConfigError, match="drift.threshold"):
        daily_drift(_log(days=2), DriftOptions())
    with pytest.raises(ConfigError):
        SimClock().advance(-1)
    with pytest.raises(Exception, match="threshold"):
        DriftOptions(threshold=0)


def test_recalibration_rule_seeds_next_recipe_through_the_strategy():
    from distillgate.schema import Finding
    from distillgate.strategy import StrategySpec, next_recipe

    prompts = [{"text": "q", "domain": "legal", "traffic_type": "support", "session_id": "s"}]
    f = Finding("drift", "warning", "drift", "drift above 0.042 for 3 days", {"prompts": prompts}, 4)
    rules = DriftStage().rules()
    rec, dec = next_recipe({}, [f], iteration=4, last_good=None, gate_status={}, recent_decisions=[],
                           spec=StrategySpec(), rules=rules)
    assert rec["drift"]["prompts"] == prompts and dec[0].rule == "drift_recalibration" and dec[0].new == 1
    rec2, dec2 = next_recipe(rec, [], iteration=5, last_good=None, gate_status={}, recent_decisions=[],
                             spec=StrategySpec(), rules=rules)
    assert rec2["drift"]["prompts"] == [] and dec2[0].old == 1


def test_drift_command_runs_the_daily_job_on_a_log(tmp_path, capsys):
    from distillgate.cli import main
    from distillgate.traffic.events import write_events

    log = write_events(tmp_path / "t.jsonl", _log(days=7, turns=40))
    assert main(["drift", str(log), "--unseen", "legal"]) == 0
    out = capsys.readouterr().out
    assert "recalibration triggered on day 5" in out and "threshold 0.042" in out
    assert main(["drift", str(tmp_path / "missing.jsonl")]) != 0
