"""`models info` / `models derive` / `models import` CLI and model_info (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch

from distillgate.cli import main
from distillgate.commands import models as models_cmd
from distillgate.models import derive
from distillgate.models.info import format_info, model_info, param_counts
from distillgate.testing.tiny import TINY_CORPUS

pytestmark = pytest.mark.usefixtures("one_thread")




def test_model_info_counts(tiny_model_factory, tiny_tokenizer):
    m = tiny_model_factory(num_layers=2)
    info = model_info(m, tiny_tokenizer)
    V = len(tiny_tokenizer)
    body = 2 * (2048 + 1024 + 96 * 64 + 64) + 32
    assert info["architecture"] == "LlamaForCausalLM" and info["model_type"] == "llama"
    assert (info["layers"], info["hidden_size"], info["attention_heads"], info["kv_heads"]) == (2, 32, 4, 2)
    assert (info["head_dim"], info["mlp_size"], info["vocab_size"]) == (8, 64, V)
    assert info["tied_embeddings"] is True and info["dtype"] == "float32"
    assert (info["params_total"], info["params_embedding"], info["params_body"], info["params_lm_head"]) == (
        V * 32 + body, V * 32, body, 0)
    assert info["bytes"] == 4 * info["params_total"] and info["tokenizer_size"] == V
    untied = tiny_model_factory(num_layers=2, tie=False)
    assert param_counts(untied) == {"total": 2 * V * 32 + body, "embedding": V * 32, "lm_head": V * 32, "body": body}
    table = format_info(info, title="tiny")
    assert table.row_count == len(info) - 1  # params_lm_head hidden when tied


def test_cli_models_info_json_and_table(tiny_teacher_dir, capsys):
    assert main(["models", "info", str(tiny_teacher_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 4 and info["mlp_size"] == 64 and info["path"] == str(tiny_teacher_dir)
    assert main(["models", "info", str(tiny_teacher_dir)]) == 0
    out = capsys.readouterr().out
    assert "params_total" in out and "LlamaForCausalLM" in out


def test_cli_models_info_missing_folder(tmp_path, capsys):
    assert main(["models", "info", str(tmp_path / "nope")]) == 2
    assert "no such model folder" in " ".join(capsys.readouterr().err.split())  # rich wraps long lines


def test_cli_models_import_rejects_missing_file(tmp_path, capsys):
    assert main(["models", "import", str(tmp_path / "x.gguf")]) == 2
    assert "GGUF file not found" in " ".join(capsys.readouterr().err.split())


@pytest.fixture
def calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(" ".join(TINY_CORPUS), encoding="utf-8")
    return p


def test_cli_models_derive_saves_plain_student(tiny_teacher_dir, calib_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    rc = main(["models", "derive", "--teacher", str(tiny_teacher_dir), "--num-layers", "2", "--mlp-width", "48",
               "--calib-file", str(calib_file), "--calib-tokens", "128", "--calib-seq-len", "32", "--out", str(out),
               "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["out"] == str(out) and len(rep["kept_layers"]) == 2 and rep["calib_tokens"] == 128
    meta = json.loads((out / "distillgate.json").read_text())
    assert meta["layer_map"] == {str(i): t for i, t in enumerate(rep["kept_layers"])}
    assert len(meta["derivation"]["mlp_units_kept"]) == 2 and len(meta["derivation"]["mlp_units_kept"][0]) == 48
    m = AutoModelForCausalLM.from_pretrained(out)
    assert (m.config.num_hidden_layers, m.config.intermediate_size) == (2, 48)
    # table output, explicit layers, no calibration needed (uniform layers are not measured; magnitude MLP)
    rc = main(["models", "derive", "--teacher", str(tiny_teacher_dir), "--keep-layers", "0,3", "--mlp-width", "32",
               "--mlp-selection", "magnitude", "--out", str(tmp_path / "s2")])
    assert rc == 0 and "[0, 3]" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["--num-layers", "2"], "--calib-file: got None"),
    (["--num-layers", "2", "--calib-file", "/nonexistent.txt"], "file not found"),
    (["--num-layers", "4", "--selection", "uniform"], "the student must be smaller"),
    (["--keep-layers", "0,x"], "comma-separated integers"),
    (["--num-layers", "9", "--selection", "uniform"], "num_layers: got 9"),
])
def test_cli_models_derive_errors(tiny_teacher_dir, tmp_path, capsys, argv, msg):
    out = tmp_path / "s"
    assert main(["models", "derive", "--teacher", str(tiny_teacher_dir), "--out", str(out), *argv]) == 2
    assert msg in " ".join(capsys.readouterr().err.split())
    assert not out.exists()


def test_cli_models_derive_refuses_existing_out(tiny_teacher_dir, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    rc = main(["models", "derive", "--teacher", str(tiny_teacher_dir), "--num-layers", "2", "--selection", "uniform",
               "--out", str(tmp_path / "s")])
    assert rc == 2 and "does not exist yet" in " ".join(capsys.readouterr().err.split())


def test_cli_choices_mirror_library():
    assert models_cmd.LAYER_SELECTIONS == derive.LAYER_SELECTIONS
    assert models_cmd.MLP_SELECTIONS == derive.MLP_SELECTIONS


def test_gguf_import_folder_is_keyed_by_content_not_path_or_mtime(tmp_path, monkeypatch):
    """A reinstalled wheel (another venv: new path, new mtime, same bytes) reuses the import; other bytes don't."""
    import os

    from distillgate.models.load import imported_dir_for

    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))
    a, b, c = tmp_path / "v1" / "m.gguf", tmp_path / "v2" / "m.gguf", tmp_path / "v3" / "m.gguf"
    for f, data in ((a, b"GGUF same"), (b, b"GGUF same"), (c, b"GGUF diff")):
        f.parent.mkdir()
        f.write_bytes(data)
    os.utime(b, (1_000_000, 1_000_000))
    assert imported_dir_for(a) == imported_dir_for(b) != imported_dir_for(c)
    assert imported_dir_for(a).name.startswith("m-")
    memo = (tmp_path / "home" / "models" / "gguf-sha256.json").read_text()
    assert str(a.resolve()) in memo and str(b.resolve()) in memo
    a.write_bytes(b"GGUF changed")                                   # new size -> new stamp -> rehashed
    assert imported_dir_for(a) != imported_dir_for(b)


def _fake_gguf_loader(monkeypatch, tiny_model_factory, tiny_tokenizer, during=None):
    """transformers' GGUF loading replaced by the tiny model (no GGUF file to parse here); ``during()`` runs while
    the import converts, as another process would."""
    import transformers

    def model_from_pretrained(*a, **kw):
        if during is not None:
            during()
        return tiny_model_factory(seed=1)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **kw: tiny_tokenizer)


def test_gguf_import_to_the_cache_survives_a_concurrent_import(tmp_path, monkeypatch, tiny_model_factory,
                                                               tiny_tokenizer):
    """Two runs started together on a fresh machine both import the default teacher: the one that commits second
    uses the first one's folder instead of failing 'already exists' (seen with two bench processes)."""
    from distillgate.io import verify_manifest
    from distillgate.models.load import import_gguf, imported_dir_for

    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF bytes")
    out = imported_dir_for(gguf)
    _fake_gguf_loader(monkeypatch, tiny_model_factory, tiny_tokenizer, during=None)
    import_gguf(gguf, out_dir=tmp_path / "theirs")                  # what the other process commits
    theirs = verify_manifest(tmp_path / "theirs", kind="model")

    def other_writer_commits():
        import shutil
        if not out.exists():
            shutil.copytree(tmp_path / "theirs", out)

    _fake_gguf_loader(monkeypatch, tiny_model_factory, tiny_tokenizer, during=other_writer_commits)
    assert import_gguf(gguf) == out
    assert verify_manifest(out, kind="model")["files"] == theirs["files"]   # theirs kept, ours dropped
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert import_gguf(gguf) == out                                 # and the next start just reuses it


def test_gguf_import_replaces_an_unusable_cache_but_not_a_users_folder(tmp_path, monkeypatch, tiny_model_factory,
                                                                       tiny_tokenizer):
    from distillgate.errors import ArtifactError
    from distillgate.io import verify_manifest
    from distillgate.models.load import import_gguf, imported_dir_for

    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF bytes")
    _fake_gguf_loader(monkeypatch, tiny_model_factory, tiny_tokenizer)
    out = imported_dir_for(gguf)
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")                          # a leftover without a manifest
    assert import_gguf(gguf) == out
    verify_manifest(out, kind="model")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    with pytest.raises(ArtifactError):
        import_gguf(gguf, out_dir=mine)                             # the user's folder is never replaced
    assert (mine / "config.json").read_text() == "{}"
