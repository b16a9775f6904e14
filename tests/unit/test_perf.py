"""TTFT, memory breakdown, latency volatility and leak measurement on tiny models."""

import math

import numpy as np
import pytest
import torch

from distillgate import perf


def test_kv_cache_bytes_matches_analytic(tiny_model_factory):
    m = tiny_model_factory()  # 2 layers, 2 kv heads, head_dim 32/4 = 8
    with torch.inference_mode():
        out = m(input_ids=torch.arange(4, 24)[None], use_cache=True)
    got = perf.kv_cache_bytes(perf._cache_of(out))
    assert got == perf.analytic_kv_cache_bytes(m.config, 20) == 2 * 2 * 2 * 8 * 20 * 4 == 5120
    assert perf.analytic_kv_cache_bytes(m.config, 20, batch=3, dtype=torch.bfloat16) == 5120 * 3 // 2


def test_params_bytes_counts_tied_weights_once(tiny_model_factory, tiny_tokenizer):
    tied, untied = tiny_model_factory(tie=True), tiny_model_factory(tie=False)
    expect = sum(p.numel() * 4 for p in tied.parameters()) + sum(b.numel() * b.element_size() for b in tied.buffers())
    assert perf.params_bytes(tied) == expect
    assert perf.params_bytes(untied) - perf.params_bytes(tied) == len(tiny_tokenizer) * 32 * 4


def test_peak_extra_alloc_counts_temporaries():
    def fn():
        keep = torch.empty(1_000_000)   # 4,000,000 bytes kept
        tmp = torch.empty(500_000)      # 2,000,000 bytes freed again
        del tmp
        return keep

    peak, keep = perf._peak_extra_alloc(fn)
    assert peak == 6_000_000 and keep.numel() == 1_000_000


def test_measure_memory_breakdown(tiny_model_factory):
    m = tiny_model_factory()
    r = perf.measure_memory(m, context_len=64)
    assert r["kv_cache_bytes"] == r["kv_cache_bytes_analytic"] == 2 * 2 * 2 * 8 * 64 * 4
    assert r["peak_extra_bytes"] >= r["kv_cache_bytes"] and r["activations_bytes"] > 0
    assert r["total_bytes"] == r["params_bytes"] + r["kv_cache_bytes"] + r["activations_bytes"]
    assert r["params_bytes"] == perf.params_bytes(m)
    longer = perf.measure_memory(m, context_len=128)
    assert longer["kv_cache_bytes"] == 2 * r["kv_cache_bytes"]


def test_measure_ttft_shapes(tiny_model_factory, tiny_tokenizer):
    m = tiny_model_factory()
    r = perf.measure_ttft(m, tiny_tokenizer, [8, 32], repeats=3, warmup=1, threads=1)
    assert set(r["per_length"]) == {8, 32} and r["n"] == 6 and r["threads"] == 1
    assert all(v["n"] == 3 and 0 < v["median_ms"] <= v["p99_ms"] for v in r["per_length"].values())
    texts = {16: ["Call the function with a list.", "The flight departs at 9:40."]}
    r = perf.measure_ttft(m, tiny_tokenizer, texts, repeats=2, warmup=0)
    assert r["per_length"][16]["n"] == 2
    assert perf.prompt_ids(tiny_tokenizer, 40).shape == (1, 40)
    assert torch.get_num_threads() == r["threads"]  # restored


def test_small_student_ratios_below_one(tiny_model_factory, tiny_tokenizer):
    teacher = tiny_model_factory(num_layers=6, hidden=256, intermediate=1024, heads=4, kv_heads=2)
    student = tiny_model_factory(num_layers=2, hidden=32, intermediate=64)
    r = perf.compare_perf(teacher, student, tiny_tokenizer, lengths=[64, 128], repeats=3, warmup=1,
                          context_len=64, threads=1)
    assert 0 < r["ttft_ratio"] < 1 and 0 < r["peak_memory_ratio"] < 0.2
    d = r["details"]
    assert set(d["ttft"]["ratio_per_length"]) == {64, 128}
    assert r["ttft_ratio"] == pytest.approx(math.sqrt(np.prod(list(d["ttft"]["ratio_per_length"].values()))))
    mem = d["memory"]
    assert r["peak_memory_ratio"] == mem["student"]["total_bytes"] / mem["teacher"]["total_bytes"]
    assert mem["teacher"]["kv_cache_bytes"] == 2 * 6 * 2 * 64 * 64 * 4  # head_dim 256/4 = 64


def test_fifo_latencies_and_volatility():
    assert perf.fifo_latencies([0, 0, 0, 10], [1, 2, 3, 1]) == [1, 3, 6, 1]
    v = perf.latency_volatility([0.01] * 99 + [0.05])
    assert v["p50_ms"] == pytest.approx(10.0) and v["p99_ms"] == pytest.approx(10.4)  # numpy linear percentile
    assert v["volatility"] == pytest.approx(1.04)


def test_bursty_load_is_seeded_and_bounded():
    a, b = perf.bursty_load(30, seed=3, max_context=128), perf.bursty_load(30, seed=3, max_context=128)
    assert a == b and len(a) == 30 and a != perf.bursty_load(30, seed=4, max_context=128)
    assert all(1 <= r.prompt_len <= 128 and 4 <= r.new_tokens <= 12 for r in a)
    arrivals = [r.arrival for r in a]
    assert arrivals == sorted(arrivals) and len(set(arrivals)) < len(arrivals)  # bursts share an instant


def test_compare_latency_volatility_tiny(tiny_model_factory, tiny_tokenizer):
    t, s = tiny_model_factory(num_layers=4), tiny_model_factory()
    r = perf.compare_latency_volatility(t, s, tiny_tokenizer, n_requests=6, max_context=32, threads=1)
    d = r["details"]
    assert r["latency_volatility_ratio"] == pytest.approx(d["student"]["volatility"] / d["teacher"]["volatility"])
    assert d["teacher"]["n"] == d["student"]["n"] == 6 and d["teacher"]["volatility"] >= 1.0


LEAKY = """
import json
from distillgate import perf
from distillgate.testing import make_tiny_tokenizer

class Leaky:  # generate() keeps 32 MiB per call, like a cache that is never evicted
    def __init__(self):
        self.kept = []

    def generate(self, **kw):
        self.kept.append(b"\\x01" * (32 << 20))  # written, so resident

print(json.dumps(perf.leak_rate(Leaky(), make_tiny_tokenizer(), iterations=8, warmup=1)))
"""


def test_leak_rate_detects_growth_and_bounds_clean_runs(tiny_model_factory, tiny_tokenizer):
    # In a fresh process: in this long-lived one, memory freed by earlier tests stays resident and new
    # allocations reuse it, so RSS would not move (seen in a full-suite run).
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LEAKY], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    leaky = json.loads(out.stdout.strip().splitlines()[-1])
    assert leaky["n"] == 8 and leaky["slope_bytes_per_s"] > 0 and leaky["rss_end"] - leaky["rss_start"] >= 128 << 20
    assert leaky["pct_per_hour_upper95"] > leaky["pct_per_hour"] > 0.003
    clean = perf.leak_rate(tiny_model_factory(), tiny_tokenizer, iterations=3, warmup=1, prompt_len=8,
                           new_tokens=2)
    # a few seconds cannot certify 0.003 %/h: the bound includes RSS's page resolution over the run
    assert clean["pct_per_hour_upper95"] >= clean["resolution_pct_per_hour"] > 0.003


def test_ttft_ratio_ci_brackets_the_ratio_and_marks_noisy_findings_uncertain():
    from distillgate.attribution import MetricMeta, attribute
    from distillgate.perf import ttft_ratio_ci

    teacher = {32: [10.0, 11.0, 9.0, 10.5, 30.0], 128: [20.0, 21.0, 19.0, 20.0, 60.0]}
    student = {32: [5.0, 5.5, 4.5, 5.2, 16.0], 128: [10.0, 10.5, 9.5, 10.0, 31.0]}
    lo, hi = ttft_ratio_ci(teacher, student)
    assert lo <= 0.5 <= hi and hi - lo < 0.2           # paired repeats: the load spike in repeat 5 cancels
    assert ttft_ratio_ci({32: [1.0]}, {32: [1.0]}) is None
    metrics = {"ttft_ratio": 0.66, "ttft_ratio/ci_low": 0.4, "ttft_ratio/ci_high": 0.9}
    gate = {"id": "G-P1", "metric": "ttft_ratio", "value": 0.66, "comparator": "<", "threshold": 0.65}
    found = attribute(iteration=2, metrics=metrics, prev={"ttft_ratio": 0.5}, teacher={},
                      meta={"ttft_ratio": MetricMeta(False, 0.02)}, samples=[], recipe={}, last_good_recipe={},
                      channel_history={}, gate_failures=[gate])
    assert {f.kind for f in found} == {"gate_fail", "regression"} and all(f.uncertain for f in found)
    narrow = {**metrics, "ttft_ratio/ci_low": 0.655, "ttft_ratio/ci_high": 0.67}
    found = attribute(iteration=2, metrics=narrow, prev={"ttft_ratio": 0.5}, teacher={},
                      meta={"ttft_ratio": MetricMeta(False, 0.02)}, samples=[], recipe={}, last_good_recipe={},
                      channel_history={}, gate_failures=[gate])
    assert not any(f.uncertain for f in found)
