"""Tiny, deterministic models and tokenizers for tests, docs and benchmarks (no download, no hub)."""

from .tiny import TINY_CORPUS, make_tiny_model, make_tiny_tokenizer, save_tiny_model, tiny_loop_config  # noqa: F401
