"""Checks that refuse to go on with inputs that differ from the ones a run started with (issue 15).

``run --resume`` continues a run whose versions record the teacher they were distilled from
(``student/distillgate.json``: ``teacher_fingerprint``) and carry the teacher's tokenizer (``student/``). If the
teacher's weights or tokenizer changed between the kill and the resume, continuing would mix two teachers in
one lineage with nothing to show for it; :func:`check_resume_identity` refuses that unless the user says so,
and then it records an alert and returns a lineage note for the next version's meta.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .errors import InputError


def teacher_identity(teacher_spec: str, trust_remote_code: bool = False) -> tuple[str, str]:
    """(weights+config fingerprint, tokenizer fingerprint) of a teacher spec, without loading its weights.
    The weights fingerprint is the one :func:`distillgate.models.load_model` gives (content-hashed)."""
    from transformers import AutoTokenizer

    from .io import sha256_json
    from .models.load import fingerprint_folder, fingerprint_tokenizer, resolve_model_path

    path = resolve_model_path(teacher_spec)
    fp = fingerprint_folder(path) if Path(path).is_dir() else sha256_json(["hub", path])
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return fp, fingerprint_tokenizer(tok)


def recorded_identity(version) -> tuple[str | None, str | None]:
    """(teacher fingerprint, tokenizer fingerprint) recorded by a committed loop version; None where absent."""
    from transformers import AutoTokenizer

    from .models.load import fingerprint_tokenizer

    fp = None
    if "student/distillgate.json" in version.files:
        fp = version.load_json("student/distillgate.json").get("teacher_fingerprint")
    tok_fp = None
    if any(n.startswith("student/tokenizer") for n in version.files):
        with tempfile.TemporaryDirectory(prefix="dg-tok-") as d:
            for n in version.names("student/"):  # every file but the weights: what a tokenizer may read
                if not n.endswith(".safetensors"):
                    (Path(d) / n[len("student/"):]).parent.mkdir(parents=True, exist_ok=True)
                    (Path(d) / n[len("student/"):]).write_bytes(version.path_of(n).read_bytes())
            tok = AutoTokenizer.from_pretrained(d)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            tok_fp = fingerprint_tokenizer(tok)
    return fp, tok_fp


def check_resume_identity(store, version, teacher_fp: str, tokenizer_fp: str, *, allow_change: bool = False,
                          teacher_spec: str = "") -> dict | None:
    """Refuse to resume ``store``'s run from ``version`` with a teacher whose weights or tokenizer fingerprint
    differs from the one the version records (:class:`InputError`, exit 2). ``allow_change=True`` goes on:
    an alert is recorded (``store`` must be the writer) and a lineage note is returned, to be put in the
    next version's meta (``{"teacher_changed": {...}}``). Returns None when nothing changed."""
    if version is None:
        return None
    rec_fp, rec_tok = recorded_identity(version)
    changed = {}
    if rec_fp is not None and rec_fp != teacher_fp:
        changed["weights"] = {"from": rec_fp, "to": teacher_fp}
    if rec_tok is not None and rec_tok != tokenizer_fp:
        changed["tokenizer"] = {"from": rec_tok, "to": tokenizer_fp}
    if not changed:
        return None
    what = " and ".join(f"{k} fingerprint {v['from'][:12]} -> {v['to'][:12]}" for k, v in changed.items())
    where = f"teacher {teacher_spec!r}" if teacher_spec else "the teacher"
    if not allow_change:
        raise InputError(f"run {store.run_id}: {where} changed since version {version.version_id} was committed "
                         f"({what}); refusing to resume with another teacher: restore it, start a new run, or "
                         f"pass --allow-teacher-change (recorded as an alert and a lineage note)")
    note = {"teacher_changed": {**changed, "after_version": version.version_id, "teacher": teacher_spec}}
    store.record_alert("warning", "resume", f"resumed with a changed teacher ({what}) after version "
                                            f"{version.version_id}: {json.dumps(note, sort_keys=True)}",
                       version.version_id)
    return note
