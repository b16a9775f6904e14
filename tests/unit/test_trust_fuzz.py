"""Issue 15, fuzz: 200 mutated safetensors headers and 200 mutated run configs each end in a typed error (or are
accepted, and then really load), every one within bounded time and memory. Seeded: a failure reproduces."""

from __future__ import annotations

import json
import random
import resource
import shutil
import time

import pytest

from distillgate.errors import DistillgateError, InputError

N = 200
MAX_SECONDS = 5.0          # per case
MAX_RSS_GROWTH_MB = 512    # over the whole fuzz run (ru_maxrss is the peak)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _weird(rng: random.Random):
    return rng.choice([-1, 0, 1, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 30, 1.5, float("nan"), float("inf"), "", "x",
                       "F32", "BF16", "I8", None, True, [], [0], [1, 2], [-5, 3], [0, 10 ** 12], {}, {"a": 1},
                       "\u00e9" * 3, [[1]], [1.5, 2]])


def _plausible(rng: random.Random):
    """A value of the right type but any size: it passes the schema and has to be caught by preflight."""
    return rng.choice([rng.randint(1, 8), rng.randint(1, 2 ** 20), rng.randint(-4, 0), 10.0 ** rng.randint(-5, 5)])


def _mutate_header(rng: random.Random, raw: bytes) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    header, body = raw[8:8 + n], raw[8 + n:]
    op = rng.randrange(8)
    if op == 0:                                           # header length: random, huge, off by a few
        n2 = rng.choice([0, 1, n - 1, n + 1, n + 7, len(raw), 2 ** 40, 2 ** 64 - 1, rng.randrange(2 ** 32)])
        return n2.to_bytes(8, "little") + raw[8:]
    if op == 1:                                           # flip bytes inside the JSON
        h = bytearray(header)
        for _ in range(rng.randint(1, 4)):
            h[rng.randrange(len(h))] ^= 1 << rng.randrange(8)
        header = bytes(h)
    elif op == 2:                                         # truncate or extend the body
        body = body[:rng.randrange(len(body))] if rng.random() < 0.7 else body + bytes(rng.randint(1, 64))
    else:                                                 # structured: a field of one tensor gets a weird value
        d = json.loads(header)
        names = [k for k in d if k != "__metadata__"]
        name = rng.choice(names)
        field = rng.choice(["dtype", "shape", "data_offsets", "extra", "entry", "__metadata__"])
        if field == "entry":
            d[name] = _weird(rng)
        elif field == "__metadata__":
            d["__metadata__"] = _weird(rng)
        else:
            d[name][field] = _weird(rng)
        header = json.dumps(d).encode()
    return len(header).to_bytes(8, "little") + header + body


def test_fuzz_safetensors_headers(tiny_teacher_dir, tmp_path):
    from safetensors.torch import load_file

    from distillgate.models.check import check_safetensors

    raw = (tiny_teacher_dir / "model.safetensors").read_bytes()
    rng = random.Random(15)
    peak0, kinds, accepted = _peak_mb(), {}, 0
    for i in range(N):
        p = tmp_path / f"m{i % 4}.safetensors"
        p.write_bytes(_mutate_header(rng, raw))
        t0 = time.perf_counter()
        try:
            check_safetensors(p)
        except InputError as e:
            kinds[str(e).split(": ", 1)[-1][:24]] = kinds.get(str(e).split(": ", 1)[-1][:24], 0) + 1
        else:  # accepted: then safetensors itself must load it (the check is never weaker than the loader)
            accepted += 1
            load_file(str(p))
        assert time.perf_counter() - t0 < MAX_SECONDS, f"case {i}"
    assert _peak_mb() - peak0 < MAX_RSS_GROWTH_MB
    assert accepted < N // 2 and len(kinds) >= 5, (accepted, kinds)


_BASE = ["student.init=config", "student.config={num_hidden_layers: 1, intermediate_size: 32}",
         "data.max_new_tokens=8", "train.steps=1", "targets.top_k=8"]
_KEYS = ["train.steps", "train.lr", "train.batch_size", "targets.top_k", "targets.tail_samples", "loss.channels",
         "loss.temperature.value", "loss.temperature.min", "loss.temperature.policy", "loss.divergence",
         "data.max_new_tokens", "data.num_prompts", "data.domains", "data.seq_len", "data.max_prompt_tokens",
         "student.config", "student.num_layers", "student.init", "student.keep_layers", "loop.stages",
         "loop.prompts_per_iteration", "eval.max_tokens", "nonsense", "teacher.dtype", "loss.domain_weights"]
_PREFLIGHT_KEYS = ["student.config", "student.config", "targets.top_k", "loss.channels", "data.max_prompt_tokens",
                   "loss.temperature.value", "data.seq_len", "data.num_prompts"]
_STUDENT_KEYS = ["num_hidden_layers", "intermediate_size", "hidden_size", "num_attention_heads", "vocab_size",
                 "rope_theta", "bogus", "num_key_value_heads", "max_position_embeddings"]


def _mutated_config(rng: random.Random, teacher) -> dict:
    from distillgate.config import apply_overrides

    d = apply_overrides({}, [f"teacher.path={teacher}", *_BASE])
    deep = rng.random() < 0.5  # half the cases: well-typed values in the fields only preflight can judge
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(_PREFLIGHT_KEYS if deep else _KEYS)
        pick = _plausible if deep or rng.random() < 0.5 else _weird
        if key == "student.config" and rng.random() < 0.8:
            value = {rng.choice(_STUDENT_KEYS): pick(rng)}
        elif key == "loss.channels" and rng.random() < 0.7:
            value = {rng.choice(["kd", "ce", "bogus", ""]): pick(rng)}
        else:
            value = pick(rng)
        node = d
        parts = key.split(".")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = value
    return d


def test_fuzz_run_configs(tiny_teacher_dir, tmp_path, monkeypatch):
    from distillgate.config import RunConfig, parse_config
    from distillgate.pipeline import preflight

    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    rng = random.Random(1515)
    peak0, typed, passed = _peak_mb(), 0, 0
    for i in range(N):
        d = _mutated_config(rng, teacher)
        t0 = time.perf_counter()
        try:
            preflight(parse_config(RunConfig, d))
        except DistillgateError:
            typed += 1
        except Exception as e:  # anything else is a bug: print the config that produced it
            pytest.fail(f"case {i}: {type(e).__name__}: {e}\nconfig: {json.dumps(d, default=str)}")
        else:
            passed += 1
        assert time.perf_counter() - t0 < MAX_SECONDS, f"case {i}: {d}"
    assert _peak_mb() - peak0 < MAX_RSS_GROWTH_MB
    assert typed > N // 2, (typed, passed)
