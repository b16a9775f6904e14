"""Store cost per iteration and retention: bytes written by a version commit when the student folder is copied
into the blob store (before) vs renamed in (``move=True``, what ``loop/commit.py`` does now), what an iteration with
unchanged weights adds on disk, and what ``runs gc`` (``prune(keep_last=2)``) frees and how long it takes.

    python bench/store_retention.py [--mb 64] [--iterations 6] [--repeats 3] [--root /tmp/dg-bench-ret]

Each iteration saves a student folder (``model.safetensors`` of ``--mb`` MB, new random weights except in
iteration 3, which keeps iteration 2's; plus config/tokenizer files that never change) on the run's file system,
then commits it. "written" is the bytes this process passed to write() during the commit (``wchar`` of
/proc/self/io; the folder's own save is not counted: it is the same for both). Median over ``--repeats`` runs.
Last line: machine-readable key=value.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from distillgate.store import RunStore


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _student(folder: Path, mb: int, seed: int) -> None:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(mb * (1 << 20) // 4, generator=g)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 32}))
    (folder / "tokenizer.json").write_text(json.dumps({"vocab": list(range(2000))}))


def one_run(root: Path, mb: int, iterations: int, move: bool) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    written, growth = [], []
    with RunStore.create(root, {"bench": True}, run_id="r") as s:
        for it in range(iterations):
            tmp = Path(tempfile.mkdtemp(dir=s.dir, prefix=".student-"))
            _student(tmp / "student", mb, seed=2 if it == 3 else it)   # iteration 3: unchanged weights
            disk0, w0 = s.blobs.total_bytes(), _wchar()
            with s.begin_version(it, kind="iteration") as vw:
                vw.add_dir("student", tmp / "student", move=move)
                vw.add_json("metrics.json", {"kl": 1.0 / (it + 1)})
                vw.commit(aliases=("current", "stable") if it % 2 else ("current",))
            written.append(_wchar() - w0)
            growth.append(s.blobs.total_bytes() - disk0)
            shutil.rmtree(tmp)
        before = s.blobs.total_bytes()
        t0 = time.perf_counter()
        pruned = s.prune(keep_last=2)
        gc_s = time.perf_counter() - t0
        after = s.blobs.total_bytes()
    return {"written": written, "growth": growth, "pruned": pruned, "gc_s": gc_s, "before": before, "after": after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", default=None)
    args = ap.parse_args()
    if args.iterations < 5:
        ap.error("--iterations must be >= 5 (iteration 3 is the unchanged one; gc keeps 2)")
    base = Path(args.root or tempfile.mkdtemp(prefix="dg-bench-ret-"))
    res = {m: [one_run(base / m, args.mb, args.iterations, m == "move") for _ in range(args.repeats)]
           for m in ("copy", "move")}
    med = lambda m, key, i: statistics.median(r[key][i] for r in res[m])  # noqa: E731
    mb = 1e6
    print(f"student weights {args.mb} MB per iteration; MB written by one commit (median of {args.repeats}) and "
          f"MB the blob store grew")
    print(f"{'iteration':>9} {'weights':>10} {'copy: written':>14} {'move: written':>14} {'disk growth':>12}")
    for i in range(args.iterations):
        print(f"{i:>9} {'unchanged' if i == 3 else 'new':>10} {med('copy', 'written', i) / mb:14.1f} "
              f"{med('move', 'written', i) / mb:14.1f} {med('move', 'growth', i) / mb:12.1f}")
    r = res["move"][0]
    gc_s = statistics.median(x["gc_s"] for x in res["move"])
    print(f"gc keep_last=2 (+ alias targets, last 3 stable): pruned {r['pruned']}, {r['before'] / mb:.1f} MB -> "
          f"{r['after'] / mb:.1f} MB on disk in {gc_s * 1000:.0f} ms")
    new = [i for i in range(args.iterations) if i != 3]
    copy_w = statistics.median(med("copy", "written", i) for i in new) / mb
    move_w = statistics.median(med("move", "written", i) for i in new) / mb
    shutil.rmtree(base, ignore_errors=True)
    print(f"mb={args.mb} copy_written_mb={copy_w:.1f} move_written_mb={move_w:.1f} "
          f"unchanged_growth_mb={med('move', 'growth', 3) / mb:.3f} gc_freed_mb={(r['before'] - r['after']) / mb:.1f} "
          f"gc_ms={gc_s * 1000:.0f}")


if __name__ == "__main__":
    main()
