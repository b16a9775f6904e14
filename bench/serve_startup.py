"""How long a fresh `transformers serve` takes to answer: startup, the first request, the steady requests after it.

    python bench/serve_startup.py [--repeats 3] [--requests 12] [--python /other/venv/bin/python ...]

Why: transformers 5.25 rewrote `transformers serve` (one engine process per model) and on this 2-core machine a
model's first request went from ~2 s to ~16 s, which is why pyproject pins transformers below 5.25 (README,
"Dependencies"). This is the measurement to repeat before lifting that pin: give it a second venv with the other
release (``--python``) and both are measured in one run, alternating, each on a fresh server.

Per interpreter (its transformers version is read from it) and repeat: an unpinned server (no model on its
command line, started as the test fixtures start it: :func:`distillgate.serve.backends.start`, one OMP thread) on a
free loopback port; **startup** = process start to ``/health`` answering; then ``--requests`` one-token chat
completions to a tiny random model folder (2 layers, hidden 64), one at a time: **first** = the first one's
latency (the model's load inside the server), **steady** = the median of the others. Table: the median over the
repeats. Last line, per interpreter: ``transformers=V startup_s=X first_request_s=Y steady_ms=Z
first_over_steady=R`` (separated by ``;`` when there are several).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _version(python: str) -> str:
    return subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _chat(url: str, model: str) -> float:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 1,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read()[:500]!r}") from None
    return time.perf_counter() - t0


def one(python: str, model: str, requests: int, log_dir: Path) -> dict:
    from distillgate.serve.backends import _tail, start

    t0 = time.perf_counter()
    b = start("transformers", None, "unpinned", log_dir, timeout=300, threads=1, python=python)
    try:
        startup = time.perf_counter() - t0
        lat = [_chat(b.url, model) for _ in range(requests)]
    except RuntimeError as e:
        raise RuntimeError(f"{e}{_tail(b.log_file)}") from None
    finally:
        b.stop(20)  # the process group: 5.25's serve has engine child processes
    return {"startup_s": startup, "first_request_s": lat[0], "steady_ms": 1000 * statistics.median(lat[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", action="append", default=None,
                    help="interpreter whose transformers serves (repeatable; default: this one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=12, help="requests per server (>= 2)")
    args = ap.parse_args()
    if args.requests < 2:
        ap.error("--requests must be at least 2 (the first one and the steady ones after it)")
    pythons = args.python or [sys.executable]
    from distillgate.testing import make_tiny_tokenizer, save_tiny_model

    with tempfile.TemporaryDirectory(prefix="dg-serve-startup-") as tmp:
        tmp = Path(tmp)
        model = str(save_tiny_model(tmp / "model", num_layers=2, hidden=64, intermediate=128, seed=0,
                                    tokenizer=make_tiny_tokenizer()))
        versions = [_version(p) for p in pythons]
        runs: dict[int, list[dict]] = {i: [] for i in range(len(pythons))}
        for r in range(args.repeats):  # alternate the interpreters, so a slow minute hits both
            for i, p in enumerate(pythons):
                runs[i].append(one(p, model, args.requests, tmp))
                print(f"repeat {r + 1}/{args.repeats} transformers {versions[i]}: " + ", ".join(
                    f"{k} {v:.3g}" for k, v in runs[i][-1].items()), flush=True)
    keys = ("startup_s", "first_request_s", "steady_ms")
    rows = []
    for i, v in enumerate(versions):
        med = {k: statistics.median(x[k] for x in runs[i]) for k in keys}
        med["first_over_steady"] = 1000 * med["first_request_s"] / med["steady_ms"]
        rows.append((v, med))
    print(f"\n| transformers | startup (s) | first request (s) | steady request (ms) | first / steady |  "
          f"(median of {args.repeats} fresh servers, {args.requests} one-token requests each)")
    print("|---|---|---|---|---|")
    for v, m in rows:
        print(f"| {v} | {m['startup_s']:.2f} | {m['first_request_s']:.2f} | {m['steady_ms']:.1f} | "
              f"{m['first_over_steady']:.0f} |")
    print("; ".join(f"transformers={v} startup_s={m['startup_s']:.2f} first_request_s={m['first_request_s']:.2f} "
                    f"steady_ms={m['steady_ms']:.1f} first_over_steady={m['first_over_steady']:.0f}"
                    for v, m in rows))


if __name__ == "__main__":
    main()
