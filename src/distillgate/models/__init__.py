"""Model loading (HF folder, hub id, GGUF import), fingerprints, saving, and student derivation."""

from .load import (  # noqa: F401
    DEFAULT_TEACHER,
    LoadedModel,
    default_teacher_dir,
    fingerprint_folder,
    fingerprint_model,
    fingerprint_tokenizer,
    import_gguf,
    load_model,
    parse_dtype,
    save_model,
)
