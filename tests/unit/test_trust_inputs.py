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
