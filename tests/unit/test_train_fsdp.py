"""FSDP2 on CPU (gloo, 2 processes, ``train.fsdp``) on a tiny HF Llama (tied embeddings, each decoder layer
sharded): 2 sharded ranks x grad_accum 1 == 1 process x grad_accum 2, and its checkpoints are the plain format
(full tensors and AdamW state, loadable without FSDP).

Also the worker entry point: ``python test_train_fsdp.py RANK WORLD INIT_FILE OUT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _model():
    from distillgate.testing import make_tiny_model
    from test_train_support import VOCAB

    return make_tiny_model(VOCAB, num_layers=2, hidden=32, intermediate=64, seed=0).train()


def _spec(grad_accum: int, fsdp: bool):
    from test_train_support import spec

    return spec(steps=3, batch_size=2, grad_accum=grad_accum, lr=1e-2, warmup_steps=0).model_copy(
        update={"fsdp": fsdp})


@pytest.mark.slow  # 2 subprocesses importing transformers: ~45 s on a loaded 2-core machine
def test_two_fsdp_ranks_match_single_process_and_write_plain_checkpoints(tmp_path):
    from safetensors.torch import load_file

    from distillgate.train import read_metrics, train
    from distillgate.train.checkpoint import load_latest
    from distillgate.train.loop import make_optimizer
    from test_train_support import EpochBatches, ce_loss

    single = tmp_path / "single"
    train(_model(), ce_loss, EpochBatches(n_batches=4), _spec(2, False), single, progress=False,
          tensorboard=False)
    out = tmp_path / "fsdp"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]), OMP_NUM_THREADS="1")
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(init), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    a = load_file(str(single / "checkpoints" / "step-00000003" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)  # summation order differs: float32 rounding
    ra, rb = read_metrics(single / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [x["loss_tokens"] for x in ra] == [x["loss_tokens"] for x in rb]
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]) and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-4
    # the checkpoint holds the full AdamW state: a plain process resumes from it
    model = _model()
    opt = make_optimizer(list(model.parameters()), _spec(1, False))
    ckpt, _ = load_latest(out, model, opt)
    plain, _ = load_latest(single, _model(), make_optimizer(list(_model().parameters()), _spec(1, False)))
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape
    assert ckpt.trainer_state["step"] == plain.trainer_state["step"] == 3


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from distillgate.train import train
    from test_train_support import EpochBatches, ce_loss

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        train(_model(), ce_loss, EpochBatches(n_batches=4), _spec(1, True), out, progress=False,
              tensorboard=False)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
