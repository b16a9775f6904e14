import random

import pytest
import torch

from distillgate.config import DataSpec
from distillgate.data import dataset as dsmod
from distillgate.data.dataset import DistillDataset, get_or_generate_dataset, split_prompts, text_file_examples
from distillgate.data.generate import Example
from distillgate.errors import ConfigError
from distillgate.models.load import LoadedModel, fingerprint_model


def _examples(n_prompts=24, samples=2, seed=0):
    rng = random.Random(seed)
    out = []
    for p in range(n_prompts):
        n_prompt = rng.randint(3, 12)
        for s in range(samples):
            n_resp = rng.randint(1, 20)
            out.append(Example(id=f"p{p}/s{s}", prompt_id=f"p{p}", sample_idx=s, domain=["legal", "travel"][p % 2],
                               complexity=p / n_prompts, input_ids=[rng.randrange(4, 300) for _ in range(n_prompt + n_resp)],
                               loss_mask=[0] * n_prompt + [1] * n_resp, response=""))
    return out


def test_split_is_by_prompt_and_deterministic():
    ds = DistillDataset(_examples(), pad_id=3, seq_len=64, heldout_fraction=0.25, seed=1)
    train, held = ds.examples("train"), ds.examples("heldout")
    assert not {e.prompt_id for e in train} & {e.prompt_id for e in held}
    assert len({e.prompt_id for e in held}) == 6 and len(train) + len(held) == 48
    for e in held:  # all samples of a held-out prompt are held out
        assert sum(x.prompt_id == e.prompt_id for x in held) == 2
    again = DistillDataset(list(reversed(_examples())), pad_id=3, seq_len=64, heldout_fraction=0.25, seed=1)
    assert {e.id for e in again.examples("heldout")} == {e.id for e in held}  # independent of list order
    other = DistillDataset(_examples(), pad_id=3, seq_len=64, heldout_fraction=0.25, seed=2)
    assert {e.id for e in other.examples("heldout")} != {e.id for e in held}
    assert split_prompts(["a", "b"], 0.01, 0) and len(split_prompts(["a", "b"], 0.99, 0)) == 1
    assert split_prompts(["a", "b", "c"], 0.0, 0) == set()


def test_batches_deterministic_resumable_and_cover_each_example_once():
    ds = DistillDataset(_examples(), pad_id=3, seq_len=64, heldout_fraction=0.0)
    e0 = ds.batches("train", batch_size=5, epoch=0, seed=7)
    assert [b["example_ids"] for b in e0] == [b["example_ids"] for b in ds.batches("train", 5, 0, 7)]
    e1 = ds.batches("train", batch_size=5, epoch=1, seed=7)
    assert [b["example_ids"] for b in e0] != [b["example_ids"] for b in e1]
    for epoch in (e0, e1):
        ids = [i for b in epoch for i in b["example_ids"]]
        assert sorted(ids) == sorted(e.id for e in ds.examples("train"))
    # resume at (epoch 1, index 3): recomputing the epoch and skipping gives the same batches
    resumed = ds.batches("train", 5, epoch=1, seed=7)[3:]
    for a, b in zip(resumed, e1[3:]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and a["example_ids"] == b["example_ids"]
    # length bucketing: fewer pad tokens than the same batch size in random order
    pad = sum(int((b["attention_mask"] == 0).sum()) for b in e0)
    rng = random.Random(0)
    ex = ds.examples("train")
    rng.shuffle(ex)
    pad_random = sum(int((dsmod.collate(ex[i:i + 5], 3)["attention_mask"] == 0).sum()) for i in range(0, len(ex), 5))
    assert pad < pad_random / 3
    with pytest.raises(ConfigError, match="split"):
        ds.batches("test")


def test_collate_layout_and_hard_weights():
    ex = _examples(2, 1)
    b = dsmod.collate(ex, pad_id=3, hard_weights={ex[1].id: 3.0})
    T = max(len(e.input_ids) for e in ex)
    assert b["input_ids"].shape == (2, T) and b["input_ids"].dtype == torch.long
    for r, e in enumerate(ex):  # right padding
        n = len(e.input_ids)
        assert b["input_ids"][r, :n].tolist() == e.input_ids and (b["input_ids"][r, n:] == 3).all()
        assert b["attention_mask"][r].tolist() == [1] * n + [0] * (T - n)
        assert b["loss_mask"][r].tolist() == e.loss_mask + [0] * (T - n)
    assert b["sample_weight"].tolist() == [1.0, 3.0] and b["domains"] == ["legal", "travel"]
    assert b["complexity"].dtype == torch.float32 and b["example_ids"] == [ex[0].id, ex[1].id]


def test_truncation_and_dropping():
    ex = Example(id="a/s0", prompt_id="a", sample_idx=0, domain="legal", complexity=0.5,
                 input_ids=list(range(10, 30)), loss_mask=[0] * 8 + [1] * 12, response="x")
    long_prompt = Example(id="b/s0", prompt_id="b", sample_idx=0, domain="legal", complexity=0.5,
                          input_ids=list(range(10, 30)), loss_mask=[0] * 16 + [1] * 4, response="x")
    ds = DistillDataset([ex, long_prompt], pad_id=3, seq_len=12, heldout_fraction=0.0)
    (only,) = ds.examples("all")
    assert only.input_ids == list(range(10, 22)) and only.loss_mask == [0] * 8 + [1] * 4 and not only.finished
    assert ds.dropped == 1


def test_save_load_and_get_or_generate_reuse(tmp_path, tiny_tokenizer, tiny_model_factory, monkeypatch):
    model = tiny_model_factory(seed=0)
    teacher = LoadedModel(model, tiny_tokenizer, "", fingerprint_model(model))
    spec = DataSpec(num_prompts=4, max_new_tokens=3, heldout_fraction=0.25, seq_len=64, gen_batch_size=4)
    from distillgate.data.prompts import builtin_prompts

    prompts = builtin_prompts(4)
    ds = get_or_generate_dataset(teacher, prompts, spec, root=tmp_path, progress=False)
    assert ds.path.parent == tmp_path and len(ds.examples("all")) == 4 and len(ds.examples("heldout")) == 1
    assert [p.id for p in ds.prompts] == [p.id for p in prompts]

    def boom(*a, **k):
        raise AssertionError("regenerated although nothing changed")

    monkeypatch.setattr(dsmod, "generate_responses", boom)
    again = get_or_generate_dataset(teacher, prompts, spec, root=tmp_path, progress=False)
    assert again.path == ds.path and [e.to_json() for e in again.examples("all")] == [e.to_json() for e in ds.examples("all")]
    # seq_len and the split are applied on load, so they reuse the same answers
    shorter = get_or_generate_dataset(teacher, prompts, spec.model_copy(update={"seq_len": 200, "heldout_fraction": 0.5}),
                                      root=tmp_path, progress=False)
    assert shorter.path == ds.path and len(shorter.examples("heldout")) == 2
    # a generation setting changes the key
    with pytest.raises(AssertionError, match="regenerated"):
        get_or_generate_dataset(teacher, prompts, spec.model_copy(update={"max_new_tokens": 4}), root=tmp_path,
                                progress=False)


def test_text_file_examples(tmp_path, tiny_tokenizer):
    p = tmp_path / "t.txt"
    p.write_text("The contract terminates on 31 December unless either party gives notice. " * 6)
    ex = text_file_examples(p, tiny_tokenizer, seq_len=16, max_tokens=40)
    assert [len(e.input_ids) for e in ex] == [16, 16, 8]
    assert all(e.loss_mask == [0] + [1] * (len(e.input_ids) - 1) for e in ex)
    ids = tiny_tokenizer(p.read_text(), add_special_tokens=False)["input_ids"]
    assert sum((e.input_ids for e in ex), []) == ids[:40]
