"""A SIGTERM whose exception a finalizer swallowed still stops the run (at the next phase or optimizer step)."""

import signal

import pytest

from distillgate import signals


class _Finalizer:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)   # the exception raised here is ignored by Python


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, on purpose
def test_a_sigterm_swallowed_in_a_finalizer_is_raised_at_the_next_check():
    previous = signal.signal(signal.SIGTERM, signals.handle_sigterm)
    try:
        signals.reset()
        obj = _Finalizer()
        del obj                                # the handler's Terminated is swallowed inside __del__
        assert signals.pending()
        with pytest.raises(signals.Terminated):
            signals.raise_if_terminated()
    finally:
        signal.signal(signal.SIGTERM, previous)
        signals.reset()


def test_training_stops_at_the_next_step_after_a_swallowed_sigterm(tiny_model_factory, tmp_path):
    import torch

    from distillgate.config import TrainSpec
    from distillgate.train import train

    model = tiny_model_factory()
    batch = {"input_ids": torch.randint(4, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "loss_mask": torch.ones(2, 8, dtype=torch.bool)}
    steps = []

    def loss_fn(m, b):
        from types import SimpleNamespace

        out = m(input_ids=b["input_ids"]).logits.float().logsumexp(-1).sum()
        return SimpleNamespace(total_sum=out, n_tokens=16, terms={})

    def swallow_after_first(info):
        steps.append(info.step)
        if info.step == 1:
            signals._pending = True          # what the handler records when its exception was swallowed

    try:
        with pytest.raises(signals.Terminated):
            train(model, loss_fn, lambda epoch: [batch], TrainSpec(steps=5, batch_size=2, warmup_steps=0),
                  tmp_path / "out", callbacks=[swallow_after_first], progress=False)
    finally:
        signals.reset()
    assert steps == [1]
