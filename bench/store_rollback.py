"""G-O5 recovery: how long the run store takes to commit a model-sized version, roll back to each of the last
three stable versions (cold: sha256 of every blob; warm: blobs this process already hashed, deep=False),
and check the restored model out as a plain Hugging Face folder.

    python bench/store_rollback.py [--mb 540] [--repeats 3] [--root /tmp/dg-bench-store]

Each version holds one safetensors file of ``--mb`` MB (540 MB = SmolLM2-135M in fp32) with other random
weights, plus a small config. Rollback = verify every blob of the target (sha256, cold cache: a fresh process
opening the run) + write one manifest + one SQLite transaction. Last line: machine-readable key=value.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from distillgate.store import RunStore


def _weights(mb: int, seed: int, path: Path) -> Path:
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(mb * (1 << 20) // 4, generator=g)}, str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=540)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", default=None)
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="dg-bench-store-"))
    shutil.rmtree(root / "bench", ignore_errors=True)
    src = root / "src.safetensors"

    commit_s = []
    with RunStore.create(root, {"bench": True}, run_id="bench") as s:
        for it in range(4):  # versions 1-3 become stable, 4 is the current one we roll back from
            _weights(args.mb, it, src)
            t0 = time.perf_counter()
            with s.begin_version(it) as vw:
                vw.add_file("student/model.safetensors", src, move=True)
                vw.add_json("student/config.json", {"iteration": it})
                vid = vw.commit(aliases=("current", "stable") if it < 3 else ("current",))
            commit_s.append(time.perf_counter() - t0)
        stable = s.stable_versions()

    rows = []
    for target in stable:
        cold, warm, checkout = [], [], []
        for _ in range(args.repeats):
            with RunStore.open(root, "bench", writer=True) as s:  # fresh open: nothing verified yet
                t0 = time.perf_counter()
                vid = s.rollback(version=target, reason="bench")
                cold.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                s.rollback(version=target, reason="bench (warm)", deep=False)
                warm.append(time.perf_counter() - t0)
                dest = root / f"checkout-{vid}"
                t0 = time.perf_counter()
                s.get_version(vid).checkout("student", dest)
                checkout.append(time.perf_counter() - t0)
                shutil.rmtree(dest)
        rows.append((target, statistics.median(cold), statistics.median(warm), statistics.median(checkout)))

    print(f"version size {args.mb} MB + config; commit (copy-free move + sha256 + NaN scan + fsync), median of 4: "
          f"{statistics.median(commit_s):.2f} s")
    print(f"{'stable version':>15} {'rollback cold s':>16} {'warm, cached ms':>17} {'checkout ms':>12}")
    for target, c, w, k in rows:
        print(f"{'v' + str(target):>15} {c:16.3f} {w * 1000:17.1f} {k * 1000:12.1f}")
    worst = max(r[1] for r in rows)
    print(f"G-O5 budget 900 s; worst cold rollback {worst:.3f} s -> ratio {worst / 900:.5f} of budget")
    with RunStore.open(root, "bench") as s:
        n_blobs = len(s.blobs.all_hashes())
    shutil.rmtree(root, ignore_errors=True)
    print(f"mb={args.mb} commit_s={statistics.median(commit_s):.3f} rollback_cold_s={worst:.3f} "
          f"rollback_warm_ms={max(r[2] for r in rows) * 1000:.1f} checkout_ms={max(r[3] for r in rows) * 1000:.1f} "
          f"blobs={n_blobs}")


if __name__ == "__main__":
    main()
