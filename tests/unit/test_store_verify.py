"""Integrity: truncated or bit-flipped blobs and manifests are typed errors with a fallback to the previous
version; nothing non-finite is ever committed; blobs are deduplicated and repaired."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import save_file

from distillgate.errors import ArtifactError, ConfigError
from distillgate.store import NonFiniteError, RunStore


def _commit(store, iteration, weights: torch.Tensor, note: str) -> int:
    with store.begin_version(iteration) as vw:
        vw.add_tensors("student/model.safetensors", {"w": weights})
        vw.add_json("note.json", {"note": note})
        return vw.commit()


@pytest.fixture
def two_versions(tmp_path):
    s = RunStore.create(tmp_path, {}, run_id="r")
    v1 = _commit(s, 0, torch.arange(12.0).reshape(3, 4), "one")
    v2 = _commit(s, 1, torch.arange(12.0).reshape(3, 4) * 2, "two")
    yield s, v1, v2
    s.close()


def _blob(store, vid, name):
    e = store.get_version(vid).files[name]
    return store.blobs.path(e["sha256"])


def _make_writable(p):
    os.chmod(p, 0o644)


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete"])
def test_damaged_blob_is_typed_error_and_falls_back(two_versions, damage):
    s, v1, v2 = two_versions
    p = _blob(s, v2, "student/model.safetensors")
    _make_writable(p)
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[:-7])
    elif damage == "bitflip":
        with open(p, "r+b") as f:  # same size, one bit different
            f.seek(len(data) - 3)
            f.write(bytes([data[-3] ^ 0x01]))
    else:
        p.unlink()
    with pytest.raises(ArtifactError, match=r"version 2 file 'student/model.safetensors'"):
        s.get_version(v2).path_of("student/model.safetensors", deep=True)
    assert s.get_version(v2).load_json("note.json") == {"note": "two"}  # the intact file still reads
    v = s.latest_valid_version()
    assert v.version_id == v1
    assert torch.equal(v.load_tensors("student/model.safetensors")["w"], torch.arange(12.0).reshape(3, 4))
    assert s.catalog.version_row(v2)["status"] == "corrupt"
    alerts = s.catalog.alerts()
    assert alerts[-1]["level"] == "error" and alerts[-1]["version_id"] == v2
    assert s.resume_point().version.version_id == v1


def test_reader_falls_back_without_writing(two_versions, tmp_path):
    s, v1, v2 = two_versions
    p = _blob(s, v2, "note.json")
    _make_writable(p)
    p.write_bytes(b'{"note": "tw0"}\n')  # same length, other content
    with RunStore.open(tmp_path, "r", writer=False) as reader:
        assert reader.latest_valid_version().version_id == v1
        with pytest.raises(ArtifactError, match="read-only"):
            reader.record_alert("info", "x", "y")
    assert s.catalog.version_row(v2)["status"] == "committed"  # only the writer marks versions


def test_tampered_manifest_is_detected(two_versions):
    s, v1, v2 = two_versions
    m = s.dir / "versions" / f"{v2:06d}.json"
    m.write_text(m.read_text().replace('"two"', '"tw0"').replace('"kind": "candidate"', '"kind": "candidat3"'))
    with pytest.raises(ArtifactError, match="version 2: manifest .* sha256 mismatch"):
        s.get_version(v2)
    assert s.latest_valid_version().version_id == v1


def test_shared_corrupt_blob_falls_back_past_every_version_using_it(tmp_path):
    with RunStore.create(tmp_path, {}, run_id="r") as s:
        v1 = _commit(s, 0, torch.ones(4), "a")
        v2 = _commit(s, 1, torch.zeros(4), "b")
        v3 = _commit(s, 2, torch.zeros(4), "c")  # same weights as v2: one blob
        assert _blob(s, v2, "student/model.safetensors") == _blob(s, v3, "student/model.safetensors")
        p = _blob(s, v3, "student/model.safetensors")
        _make_writable(p)
        p.write_bytes(p.read_bytes()[:-1])
        assert s.latest_valid_version().version_id == v1
        # committing the same bytes again repairs the shared blob instead of referencing the broken one
        v4 = _commit(s, 3, torch.zeros(4), "d")
        assert s.get_version(v2).path_of("student/model.safetensors", deep=True) == p
        assert s.latest_valid_version().version_id == v4


def test_non_finite_tensors_are_never_committed(tmp_path):
    with RunStore.create(tmp_path, {}, run_id="r") as s:
        w = torch.ones(3, 3)
        w[1, 2] = float("nan")
        with pytest.raises(NonFiniteError, match=r"'student/model.safetensors'.*'w' \(3, 3\) has 1 non-finite"):
            with s.begin_version(0) as vw:
                vw.add_tensors("student/model.safetensors", {"b": torch.zeros(2), "w": w})
                vw.commit()
        f = tmp_path / "inf.safetensors"
        save_file({"x": torch.tensor([1.0, math.inf], dtype=torch.bfloat16)}, str(f))
        with pytest.raises(NonFiniteError, match="'x'"):
            with s.begin_version(0) as vw:
                vw.add_file("m.safetensors", f)
        d = tmp_path / "model"
        d.mkdir()
        save_file({"ok": torch.ones(2)}, str(d / "a.safetensors"))
        save_file({"bad": torch.tensor([-math.inf])}, str(d / "b.safetensors"))
        with pytest.raises(NonFiniteError, match="'bad'"):
            with s.begin_version(0) as vw:
                vw.add_dir("student", d)
        with pytest.raises(NonFiniteError, match="NaN"):
            with s.begin_version(0) as vw:
                vw.add_json("strict.json", {"loss": float("nan")}, allow_nan=False)
        assert s.versions() == [] and s.latest_valid_version() is None
        with s.begin_version(0) as vw:  # integer tensors and finite floats pass
            vw.add_tensors("t.safetensors", {"i": torch.arange(3), "f": torch.zeros(2, dtype=torch.float16)})
            vw.add_json("metrics.json", {"loss": float("nan")})  # a diverged metric is recorded, not lost
            assert vw.commit() == 1
        assert math.isnan(s.get_version(1).load_json("metrics.json")["loss"])


def test_writer_misuse_is_refused(tmp_path):
    with RunStore.create(tmp_path, {}, run_id="r") as s:
        vw = s.begin_version(0)
        with pytest.raises(ArtifactError, match="still being written"):
            s.begin_version(0)
        with pytest.raises(ConfigError, match="logical name"):
            vw.add_json("../escape.json", {})
        vw.add_json("a.json", {})
        with pytest.raises(ConfigError, match="not yet used"):
            vw.add_json("a.json", {})
        vw.abort()
        empty = s.begin_version(0)
        with pytest.raises(ArtifactError, match="nothing added"):
            empty.commit()
        empty.abort()
        with pytest.raises(ConfigError, match="kind"):
            s.begin_version(0, kind="Bad Kind")
        with pytest.raises(ConfigError, match="iteration"):
            s.begin_version(-1)
        with s.begin_version(0, parent="best") as vw:  # no version yet: an unset alias means no parent
            vw.add_json("a.json", {})
            vw.commit(aliases=())
        with pytest.raises(ConfigError, match=r"parent: got 'best'"):
            s.begin_version(1, parent="best")
        with pytest.raises(ConfigError, match="committed version"):
            s.begin_version(1, parent=7)
        s.close()
    with RunStore.create(tmp_path, {}, run_id="r2") as s:
        with pytest.raises(ArtifactError, match="without commit"):
            with s.begin_version(0) as vw:
                vw.add_json("a.json", {})
        assert s.versions() == []


def test_checkout_gives_a_loadable_hf_model_folder(tmp_path, tiny_student_dir):
    from transformers import AutoModelForCausalLM

    with RunStore.create(tmp_path / "runs", {}, run_id="r") as s:
        with s.begin_version(0, kind="init") as vw:
            names = vw.add_dir("student", tiny_student_dir)
            vid = vw.commit()
        assert "student/config.json" in names
        out = s.get_version(vid).checkout("student", tmp_path / "checkout")
        a = AutoModelForCausalLM.from_pretrained(out)
        b = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
        for (ka, ta), (kb, tb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items()), strict=True):
            assert ka == kb and torch.equal(ta, tb)
        assert s.get_version(vid).checkout("student", out) == out  # idempotent: same linked blobs
        (out / "extra.txt").write_text("x")
        with pytest.raises(ArtifactError, match="already exists and is not a linked checkout"):
            s.get_version(vid).checkout("student", out)
        s.get_version(vid).checkout("student", out, replace=True)
        assert not (out / "extra.txt").exists() and (out / "config.json").is_file()
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_add_file_move_and_dedup(tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"x" * 5000)
    with RunStore.create(tmp_path / "runs", {}, run_id="r") as s:
        with s.begin_version(0) as vw:
            sha = vw.add_file("w.bin", src, move=True)
            vw.commit()
        assert not src.exists()
        src.write_bytes(b"x" * 5000)
        with s.begin_version(1) as vw:
            assert vw.add_file("again.bin", src) == sha
            vw.commit()
        assert src.exists() and s.blobs.all_hashes() == {sha}
        assert s.get_version(2).path_of("again.bin").read_bytes() == b"x" * 5000
        assert oct(s.blobs.path(sha).stat().st_mode & 0o777) == "0o444"  # blobs are read-only
