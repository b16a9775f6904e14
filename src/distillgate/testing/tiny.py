"""A tiny byte-level BPE tokenizer with a ChatML template and tiny Llama models built from a config.

Used by the unit tests (2 layers, hidden 32) so they never touch the hub or the real teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_CORPUS = [
    "The quarterly report shows revenue grew by 12 percent while costs stayed flat.",
    "Please summarise the patient's symptoms and list the medication dosage.",
    "The contract terminates on 31 December unless either party gives notice.",
    "Students should read chapter three before the exam on Monday.",
    "My order arrived damaged; I would like a refund or a replacement.",
    "This laptop has 16 GB of memory and a battery that lasts ten hours.",
    "The flight to Lisbon departs at 9:40 and the hotel check-in is at 3 pm.",
    "Call the function with a list of integers; it returns their sorted copy.",
    "If the loan is approved and the rate is fixed, the monthly payment is 420 dollars.",
    "A cat sat on the mat. The dog barked at the mailman. It rained all day.",
] * 4


def make_tiny_tokenizer(vocab_size: int = 384):
    """A deterministic byte-level BPE tokenizer (HF fast tokenizer) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TINY_CORPUS, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_model(vocab_size: int, num_layers: int = 2, hidden: int = 32, intermediate: int = 64,
                    heads: int = 4, kv_heads: int = 2, seed: int = 0, tie: bool = True,
                    dtype: torch.dtype = torch.float32):
    """A random LlamaForCausalLM (the SmolLM2 architecture) built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    # Random init gives near-uniform outputs; scale embeddings up so distributions are peaked enough for
    # divergences, top-k and agreement metrics to be non-trivial.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
    return model.eval()


def save_tiny_model(out_dir: str | Path, num_layers: int = 2, hidden: int = 32, intermediate: int = 64,
                    seed: int = 0, tokenizer=None) -> Path:
    """Write a tiny model + tokenizer as a committed distillgate model folder."""
    from ..models import save_model

    tok = tokenizer or make_tiny_tokenizer()
    model = make_tiny_model(len(tok), num_layers=num_layers, hidden=hidden, intermediate=intermediate, seed=seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return save_model(model, tok, out_dir)


def tiny_loop_config(teacher_dir: str | Path, root: str | Path, stages: str, **extra):
    """A loop config sized for tests: a 1-layer student built from a config, 2 steps, 8 prompts, 8-token answers,
    ``stages`` as a YAML flow list (``loop.stages``), ``extra`` as further ``key=value`` overrides."""
    from ..config import RunConfig, load_config

    over = [f"teacher.path={teacher_dir}", "student.init=config",
            "student.config={num_hidden_layers: 1, intermediate_size: 32}",
            "data.max_new_tokens=8", "data.gen_batch_size=8", "train.steps=2", "train.batch_size=4",
            "train.warmup_steps=0", "train.precision=fp32", "targets.top_k=8", "loop.prompts_per_iteration=8",
            "loop.heldout_prompts=4", f"loop.stages={stages}", "loop.perf_lengths=[16]", "loop.perf_repeats=1",
            "loop.strategy.hard_candidates=0", "data.seq_len=512", f"store_root={root}"]
    return load_config(RunConfig, None, over + [f"{k}={v}" for k, v in extra.items()])
