"""What a model is: architecture, sizes and parameter counts (``distillgate models info``)."""

from __future__ import annotations

import torch


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: total (shared tensors once), embedding (input), lm_head (0 when tied), body (the rest)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already de-duplicates tied tensors; ids make it explicit
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n_emb = emb.weight.numel() if emb is not None else 0
    n_head = 0
    if head is not None and (emb is None or head.weight is not emb.weight):
        n_head = sum(p.numel() for p in head.parameters())
    return {"total": total, "embedding": n_emb, "lm_head": n_head, "body": total - n_emb - n_head}


def model_info(model: torch.nn.Module, tokenizer=None) -> dict:
    """A JSON-able summary of a causal LM (and its tokenizer when given)."""
    cfg = model.config
    counts = param_counts(model)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    n_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    heads = getattr(cfg, "num_attention_heads", None)
    info = {
        "architecture": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "attention_heads": heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", heads),
        "head_dim": getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None),
        "mlp_size": getattr(cfg, "intermediate_size", None),
        "vocab_size": emb.weight.shape[0],
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "tied_embeddings": bool(tied),
        "params_total": counts["total"],
        "params_embedding": counts["embedding"],
        "params_body": counts["body"],
        "params_lm_head": counts["lm_head"],
        "bytes": n_bytes,
    }
    if getattr(cfg, "layer_types", None) is not None:
        info["layer_types"] = sorted(set(cfg.layer_types))
    if tokenizer is not None:
        info["tokenizer_size"] = len(tokenizer)
        info["chat_template"] = bool(getattr(tokenizer, "chat_template", None))
    return info


def _fmt(key: str, value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if key == "bytes":
        return f"{value:,} ({value / 2**20:.1f} MiB)"
    if isinstance(value, int) and key.startswith("params"):
        return f"{value:,} ({value / 1e6:.2f}M)"
    if isinstance(value, int):
        return f"{value:,}" if value >= 10_000 else str(value)
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def format_info(info: dict, title: str | None = None):
    """A rich Table of ``model_info`` output (skips params_lm_head when embeddings are tied)."""
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("field")
    table.add_column("value", justify="right")
    for k, v in info.items():
        if k == "params_lm_head" and info.get("tied_embeddings"):
            continue
        table.add_row(k, _fmt(k, v))
    return table


def structure(model: torch.nn.Module) -> dict:
    """The shape the loop tracks (recipe ``student.structure``): what a prune or a derivation changes.

    ``{layers, heads, kv_heads, head_dim, intermediate_size, hidden_size, params}`` from the HF config (counts
    are uniform per layer, so a stock config describes the model) and the parameter count."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    return {"layers": getattr(cfg, "num_hidden_layers", None), "heads": heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", heads),
            "head_dim": getattr(cfg, "head_dim", None) or (hidden // heads if heads and hidden else None),
            "intermediate_size": getattr(cfg, "intermediate_size", None), "hidden_size": hidden,
            "params": param_counts(model)["total"]}
