"""``distributed.all_reduce_tensors`` over 2 gloo ranks: every key summed, shapes and devices kept.

Also the worker entry point: ``python test_distributed_reduce.py RANK WORLD INIT_FILE OUT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent


def test_all_reduce_tensors_sums_every_key_over_two_ranks(tmp_path):
    from distillgate.train.distributed import all_reduce_tensors

    one = {"mlp": torch.ones(2, 3, dtype=torch.float64)}
    assert all_reduce_tensors(one) is one  # one process: the same dict
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(tmp_path / "init"), str(tmp_path / f"{r}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    for r in range(2):
        got = json.loads((tmp_path / f"{r}.json").read_text())
        assert got["heads"] == [[1.0, 3.0], [5.0, 7.0]]  # rank 0: 0..3, rank 1: 1..4, summed
        assert got["mlp"] == [10.5] and got["dtype"] == "torch.float64"


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from distillgate.train.distributed import all_reduce_tensors

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        got = all_reduce_tensors({"heads": torch.arange(4, dtype=torch.float64).view(2, 2) + rank,
                                  "mlp": torch.tensor([5.0 + rank * 0.5])})
        Path(out).write_text(json.dumps({"heads": got["heads"].tolist(), "mlp": got["mlp"].tolist(),
                                         "dtype": str(got["mlp"].dtype)}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
