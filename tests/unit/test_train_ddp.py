"""Data parallel on CPU (gloo, 2 processes): 2 ranks x grad_accum 1 == 1 process x grad_accum 2.

Also the worker entry point: ``python test_train_ddp.py RANK WORLD INIT_FILE OUT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent


def _spec(grad_accum: int):
    from test_train_support import spec

    return spec(steps=3, batch_size=2, grad_accum=grad_accum, lr=1e-2, warmup_steps=0)


def test_two_gloo_ranks_match_single_process(tmp_path):
    from safetensors.torch import load_file

    from distillgate.train import read_metrics, train
    from test_train_support import EpochBatches, TinyLM, ce_loss

    single = tmp_path / "single"
    train(TinyLM(dropout=0.0), ce_loss, EpochBatches(n_batches=4), _spec(2), single, progress=False,
          tensorboard=False)
    ddp = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1")
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(init), str(ddp)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    a = load_file(str(single / "checkpoints" / "step-00000003" / "model.safetensors"))
    b = load_file(str(ddp / "checkpoints" / "step-00000003" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    ra, rb = read_metrics(single / "metrics.jsonl"), read_metrics(ddp / "metrics.jsonl")
    assert [x["loss_tokens"] for x in ra] == [x["loss_tokens"] for x in rb]  # global counts all-reduced
    assert [x["loss"] for x in rb] == [pytest_approx(x["loss"]) for x in ra]


def pytest_approx(v):
    import pytest

    return pytest.approx(v, rel=1e-5)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from distillgate.train import train
    from test_train_support import EpochBatches, TinyLM, ce_loss

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        train(TinyLM(dropout=0.0), ce_loss, EpochBatches(n_batches=4), _spec(1), out, progress=False,
              tensorboard=False)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
