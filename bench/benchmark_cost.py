"""What the anchor's ``benchmark`` option costs a run: the teacher's profile once, then each student measurement.

    python bench/benchmark_cost.py --data-dir ../shared/datasets [--suite quick] [--limit 20] [--threads 1]

The student is the teacher with only the demo's 15 kept layers (0-7 and 23-29), untrained: a student as a run's
iteration 0 sees it. The benchmark is measured twice through the metric registry exactly as the loop's validate
does (``distillgate.evaluate.providers.measure`` of ``bench_lost_share`` with one run-long ``teacher_cache``): the
first measurement includes the teacher's profile (unless it is already in ``$DISTILLGATE_HOME/eval_cache``), the
second is the per-iteration cost. Last line: ``first_s=A later_s=B n=N lost=L gained=G``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch

    from distillgate.evaluate import benchmark as bench
    from distillgate.evaluate.providers import GateContext, load_providers, measure
    from distillgate.models import load_model

    torch.set_num_threads(a.threads)
    t = load_model("default")
    s_model = copy.deepcopy(t.model)
    keep = list(range(8)) + list(range(23, 30))
    s_model.model.layers = torch.nn.ModuleList([s_model.model.layers[i] for i in keep])
    s_model.config.num_hidden_layers = len(keep)
    for i, layer in enumerate(s_model.model.layers):
        layer.self_attn.layer_idx = i
    s = SimpleNamespace(model=s_model, tokenizer=t.tokenizer, fingerprint=None, path=None)
    load_providers()
    teacher_cache, seconds, out = {}, [], Path(tempfile.mkdtemp()) / "benchmark.json"
    for _ in range(2):
        ctx = GateContext.with_models(t, s, {"benchmark": {"suite": a.suite, "data_dir": a.data_dir, "limit": a.limit,
                                                           "batch_size": 8, "max_items": 20, "out": str(out)}},
                                      teacher_cache)
        t0 = time.perf_counter()
        with torch.no_grad():
            values, notes = measure(ctx, [bench.PRIMARY])
        seconds.append(time.perf_counter() - t0)
        if notes:
            raise SystemExit(f"benchmark not measured: {notes}")
    doc = json.loads(out.read_text())
    print(f"{'metric':40s} {'teacher':>10s} {'student':>10s}")
    for k, v in sorted(doc["student_metrics"].items()):
        if not k.endswith(("/ci_low", "/ci_high")):
            tv = doc["teacher_metrics"].get(k)
            print(f"{k:40s} {'' if tv is None else f'{tv:10.4g}':>10s} {v:10.4g}")
    print("capabilities lost / gained:", {r["tag"]: (r["lost"], r["gained"]) for r in doc["regressed"]
                                          if r["tag"] in doc["capabilities"]})
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"first_s={seconds[0]:.1f} later_s={seconds[1]:.1f} n={doc['n']} lost={doc['lost']} gained={doc['gained']}")


if __name__ == "__main__":
    main()
