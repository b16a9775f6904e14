"""Issue 15, inputs: content fingerprints verified against the manifest (a stale MANIFEST.json is never trusted)."""

from __future__ import annotations

import os
import shutil

import pytest

from distillgate.errors import InputError
from distillgate.models.load import fingerprint_folder, load_model
from distillgate.testing import save_tiny_model


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLGATE_HOME", str(tmp_path / "dg-home"))


def test_swapped_weights_under_a_kept_manifest_are_refused(tmp_path, tiny_tokenizer):
    a = save_tiny_model(tmp_path / "a", num_layers=2, seed=0, tokenizer=tiny_tokenizer)
    b = save_tiny_model(tmp_path / "b", num_layers=2, seed=1, tokenizer=tiny_tokenizer)
    fp_a = fingerprint_folder(a)
    assert load_model(str(a)).fingerprint == fp_a
    # the user replaces the weights and keeps the old manifest: the old fingerprint must not come back
    shutil.copyfile(b / "model.safetensors", a / "model.safetensors")
    with pytest.raises(InputError, match=r"model.safetensors: content differs .*MANIFEST.json is stale"):
        fingerprint_folder(a)
    with pytest.raises(InputError, match="stale"):
        load_model(str(a))
    # without the manifest, the fingerprint is the new content's (the same as folder b's)
    os.unlink(a / "MANIFEST.json")
    assert fingerprint_folder(a) == fingerprint_folder(b) != fp_a


def test_fingerprint_is_from_content_and_memoised_by_stat(tmp_path, tiny_tokenizer, monkeypatch):
    from distillgate import io

    a = save_tiny_model(tmp_path / "a", num_layers=2, seed=0, tokenizer=tiny_tokenizer)
    os.unlink(a / "MANIFEST.json")
    fp = fingerprint_folder(a)
    calls = []
    real = io.sha256_file
    monkeypatch.setattr(io, "sha256_file", lambda p: calls.append(p) or real(p))
    io._memo.clear()                                 # a new process: only the on-disk memo is left
    assert fingerprint_folder(a) == fp and calls == []
    # same size, same mtime, new bytes (e.g. `cp -p`): ctime/inode moved, so it is hashed again
    w = a / "model.safetensors"
    st = w.stat()
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint_folder(a) != fp and calls


# ---------------------------------------------------------------------------------------- hostile weight files
import json  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

from distillgate.cli import main  # noqa: E402
from distillgate.models.check import check_safetensors  # noqa: E402


def _rewrite_header(path, mutate):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    mutate(header)
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])


def _huge_header(p):
    raw = p.read_bytes()
    p.write_bytes((1 << 40).to_bytes(8, "little") + raw[8:])


def _bad_offsets(p):
    def m(h):
        name = sorted(k for k in h if k != "__metadata__")[0]
        h[name]["data_offsets"][1] += 4
    _rewrite_header(p, m)


def _truncated(p):
    p.write_bytes(p.read_bytes()[:-100])


def _nonfinite(value):
    def f(p):
        t = load_file(str(p))
        name = sorted(t)[-1]
        t[name] = t[name].clone()
        t[name].view(-1)[3] = value
        save_file(t, str(p))
    return f


HOSTILE = {"huge header length": (_huge_header, "header length"), "bad offsets": (_bad_offsets, "data_offsets"),
           "truncated body": (_truncated, "truncated"), "NaN weights": (_nonfinite(float("nan")), "NaN/inf"),
           "Inf weights": (_nonfinite(float("inf")), "NaN/inf")}


def _run_args(teacher, root, *extra):
    return ["run", f"teacher.path={teacher}", "student.init=config",
            "student.config={num_hidden_layers: 1, intermediate_size: 32}", "data.max_new_tokens=8",
            "train.steps=1", "targets.top_k=8", f"store_root={root}", *extra, "--no-report", "--no-progress"]


def _one_line_exit_2(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    return err


def _hostile_teacher(tmp_path, tiny_teacher_dir, mutate):
    t = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, t)
    os.unlink(t / "MANIFEST.json")          # a hand-made folder: only the files themselves can be checked
    mutate(t / "model.safetensors")
    return t


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_teacher_weights_fail_preflight_before_any_folder(case, tmp_path, tiny_teacher_dir, capsys):
    mutate, match = HOSTILE[case]
    t = _hostile_teacher(tmp_path, tiny_teacher_dir, mutate)
    root = tmp_path / "runs"
    _one_line_exit_2(capsys, _run_args(t, root), match)
    assert not root.exists()
    with pytest.raises(InputError, match=match.replace("/", ".")):
        check_safetensors(t / "model.safetensors")


def test_nonfinite_student_fails_preflight(tmp_path, tiny_teacher_dir, tiny_student_dir, capsys):
    s = tmp_path / "student"
    shutil.copytree(tiny_student_dir, s)
    os.unlink(s / "MANIFEST.json")
    _nonfinite(float("inf"))(s / "model.safetensors")
    root = tmp_path / "runs"
    argv = [a for a in _run_args(tiny_teacher_dir, root, "student.init=model", f"student.path={s}")
            if not a.startswith("student.config")]
    _one_line_exit_2(capsys, argv, "NaN/inf")
    assert not root.exists()


def test_gates_on_a_broken_weight_file_exits_2(tmp_path, tiny_teacher_dir, tiny_student_dir, capsys):
    s = tmp_path / "student"
    shutil.copytree(tiny_student_dir, s)
    os.unlink(s / "MANIFEST.json")
    _truncated(s / "model.safetensors")
    _one_line_exit_2(capsys, ["gates", "--student", str(s), "--teacher", str(tiny_teacher_dir), "--skip-perf"],
                     "truncated")


def _jsonl(tmp_path, text):
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"prompt": text, "domain": "legal"}) + "\n")
    return p


BAD_VALUES = {
    "unknown channel": (["loss.channels={bogus: 1}"], "loss.channels.bogus"),
    "top_k over the vocabulary": (["targets.top_k=100000"], "targets.top_k"),
    "negative layers": (["student.config={num_hidden_layers: -1}"], "student.config.num_hidden_layers"),
    "unknown student key": (["student.config={num_hidden_layerz: 1}"], "student.config.num_hidden_layerz"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_config_values_fail_preflight_before_any_folder(case, tmp_path, tiny_teacher_dir, capsys):
    extra, match = BAD_VALUES[case]
    root = tmp_path / "runs"
    _one_line_exit_2(capsys, _run_args(tiny_teacher_dir, root, *extra), match)
    assert not root.exists()


def test_a_1mb_prompt_is_refused_at_preflight_unread(tmp_path, tiny_teacher_dir, capsys):
    import time

    p = _jsonl(tmp_path, "why " * 250_000)
    root = tmp_path / "runs"
    t0 = time.perf_counter()
    _one_line_exit_2(capsys, _run_args(tiny_teacher_dir, root, "data.source=jsonl", f"data.path={p}"),
                     "data.max_prompt_tokens")
    assert time.perf_counter() - t0 < 10 and not root.exists()


def test_a_collapsing_temperature_is_refused_at_preflight(tmp_path, tiny_teacher_dir, capsys):
    root = tmp_path / "runs"
    err = _one_line_exit_2(capsys, _run_args(tiny_teacher_dir, root, "loss.temperature.value=0.001"),
                           "loss.temperature.value")
    assert "collapse" in err and not root.exists()
    # the measurement itself: nothing collapses at T = 1, everything at T = 0.001
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillgate.data.prompts import builtin_prompts
    from distillgate.pipeline import collapsed_share

    m = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_teacher_dir))
    prompts = builtin_prompts(4, ["legal", "medical"], 0)
    assert collapsed_share(m, tok, prompts, 1.0) == 0.0
    assert collapsed_share(m, tok, prompts, 0.001) == 1.0


# ---------------------------------------------------------------------------------------- YAML and text input
from distillgate.config import RunConfig, load_config  # noqa: E402
from distillgate.errors import ConfigError  # noqa: E402

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))


def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    import time

    p = tmp_path / "bomb.yaml"
    p.write_text(BOMB)
    assert len(BOMB) < 1100
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="alias"):
        load_config(RunConfig, p)
    assert time.perf_counter() - t0 < 1.0


def test_yaml_duplicate_keys_are_refused(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  steps: 3\n  lr: 0.1\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'steps' \(first at line 2\)"):
        load_config(RunConfig, p)
    with pytest.raises(ConfigError, match="duplicate key"):
        load_config(RunConfig, None, ["loss.channels={kd: 1, kd: 2}"])
    p.write_text("a: &x 1\nb: *x\n")                  # an alias or two are still fine
    with pytest.raises(ConfigError, match="^a: "):      # (then the schema speaks)
        load_config(RunConfig, p)


def test_non_utf8_yaml_and_jsonl_name_the_file(tmp_path):
    from distillgate.data.prompts import load_jsonl_prompts

    y = tmp_path / "bad.yaml"
    y.write_bytes(b"train:\n  steps: 3 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*line 2, column 17: not UTF-8 text \(byte 0xe9\)"):
        load_config(RunConfig, y)
    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 2, column 16: not UTF-8"):
        load_jsonl_prompts(j)


def test_non_utf8_jsonl_through_the_cli_is_one_line_exit_2(tmp_path, tiny_teacher_dir, capsys):
    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'{"prompt": "caf\xe9"}\n')
    root = tmp_path / "runs"
    _one_line_exit_2(capsys, _run_args(tiny_teacher_dir, root, "data.source=jsonl", f"data.path={j}"), "not UTF-8")
    assert not root.exists()
