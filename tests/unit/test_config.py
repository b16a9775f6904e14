"""The config validation table: every bad input fails before compute, names the field, creates nothing."""

import pytest

from distillgate.config import DistillConfig, RunConfig, config_reference, load_config
from distillgate.errors import ConfigError, InputError
from distillgate.pipeline import preflight
from distillgate.recipes.distill import distill
from distillgate.testing import make_tiny_tokenizer, save_tiny_model

TABLE = [
    (["loss.temperature.value=0"], "loss.temperature.value", "greater than 0"),
    (["loss.temperature.value=-1"], "loss.temperature.value", "greater than 0"),
    (["loss.beta=1.5"], "loss.beta", "less than or equal to 1"),
    (["loss.beta=-0.1"], "loss.beta", "greater than or equal to 0"),
    (["train.lr=0"], "train.lr", "greater than 0"),
    (["train.lr=abc"], "train.lr", "number"),
    (["train.steps=2.5"], "train.steps", "integer"),
    (["trian.lr=1"], "trian", "unknown key"),
    (["loss.divergence=kl"], "loss.divergence", "forward_kl"),
    (["data.domains=[space]"], "data.domains", "unknown domain"),
    (["data.source=jsonl"], "data", "data.path is required"),
    (["loss.channels={kd: 0, ce: 0}"], "loss.channels", "positive weight"),
    (["loss.temperature.min=3", "loss.temperature.max=2"], "loss.temperature", "min"),
    (["train.precision=fp16"], "train.precision", "bf16"),
]


@pytest.mark.parametrize("overrides,field,allowed", TABLE)
def test_validation_table(overrides, field, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(DistillConfig, None, overrides)
    assert e.value.field.startswith(field) and allowed in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(DistillConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DistillConfig, bad)


def _cfg(teacher, tmp_path, *over):
    return load_config(DistillConfig, None, [f"teacher.path={teacher}", f"output_dir={tmp_path / 'out'}", *over])


def test_student_larger_than_teacher_fails_before_compute(tiny_teacher_dir, tmp_path):
    for over, field in ((["student.num_layers=5"], "student.num_layers"), (["student.num_layers=4"], "student.num_layers"),
                        (["student.mlp_width=128"], "student.mlp_width"),
                        (["student.init=config", "student.config={num_hidden_layers: 6}"], "student.config")):
        with pytest.raises(ConfigError) as e:
            distill(_cfg(tiny_teacher_dir, tmp_path, *over))
        assert e.value.field.startswith(field)  # student.config.num_hidden_layers: the key that is too large
        assert not (tmp_path / "out").exists()


def test_vocabulary_mismatch_fails_before_compute(tiny_teacher_dir, tmp_path):
    other = save_tiny_model(tmp_path / "other", num_layers=1, tokenizer=make_tiny_tokenizer(vocab_size=300))
    with pytest.raises(ConfigError) as e:
        distill(_cfg(tiny_teacher_dir, tmp_path, "student.init=model", f"student.path={other}"))
    assert e.value.field == "student.path" and "vocab" in str(e.value).lower()
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="vocabulary"):
        preflight(_cfg(tiny_teacher_dir, tmp_path, "student.init=config", "student.config={vocab_size: 100}"))


def test_empty_and_missing_data_files(tiny_teacher_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises((ConfigError, InputError), match="empty"):
        distill(_cfg(tiny_teacher_dir, tmp_path, "data.source=jsonl", f"data.path={empty}"))
    with pytest.raises(ConfigError, match="data.path"):
        distill(_cfg(tiny_teacher_dir, tmp_path, "data.source=jsonl", f"data.path={tmp_path / 'nope.jsonl'}"))
    with pytest.raises(ConfigError, match="teacher.path"):
        distill(_cfg(tmp_path / "no-model", tmp_path))
    assert not (tmp_path / "out").exists()


def test_every_key_is_documented():
    rows = config_reference(RunConfig)
    assert len(rows) > 50
    assert all(desc for _, _, _, desc in rows if not _.startswith("loop.stages")), \
        [k for k, _, _, d in rows if not d]
