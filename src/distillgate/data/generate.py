"""Teacher answer generation (SPEC L1 *extract*, S2.4 raw material): batched, KV-cached, deterministic.

Each answer becomes an :class:`Example`: the chat-templated prompt followed by the teacher's response tokens
and, when the teacher stopped by itself, its end-of-turn token. ``loss_mask`` is 1 exactly on those response
(+ end-of-turn) tokens (architecture.md "Data and alignment"). An answer cut by ``max_new_tokens`` gets no
end-of-turn token, so a student is never taught to stop where the teacher did not.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

from ..errors import ConfigError, InputError
from .prompts import PromptRecord

END_OF_TURN = "<|im_end|>"


@dataclass
class Example:
    """One tokenised chat. ``input_ids``/``loss_mask`` have equal length; ``loss_mask[0] == 0``."""

    id: str
    prompt_id: str
    sample_idx: int
    domain: str
    complexity: float
    input_ids: list[int]
    loss_mask: list[int]
    response: str
    finished: bool = True  # the teacher emitted end-of-turn before max_new_tokens

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def n_targets(self) -> int:
        return sum(self.loss_mask)


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: ``<|im_end|>`` in ChatML vocabularies, else ``eos``."""
    tid = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
        return tid
    if tokenizer.eos_token_id is None:
        raise InputError("tokenizer has neither <|im_end|> nor an eos token: cannot mark the end of an answer")
    return tokenizer.eos_token_id


def stop_ids(tokenizer) -> list[int]:
    return sorted({end_of_turn_id(tokenizer)} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None
                                                 else set()))


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant header (generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the teacher's tokenizer has no chat template; give a chat (instruct) model")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_example(prompt: PromptRecord, sample_idx: int, prompt_ids: list[int], response_ids: list[int],
                  finished: bool, eot: int, response: str) -> Example:
    """Concatenate prompt + response (+ end-of-turn when ``finished``) with the matching loss mask."""
    targets = list(response_ids) + ([eot] if finished else [])
    return Example(id=f"{prompt.id}/s{sample_idx}", prompt_id=prompt.id, sample_idx=sample_idx,
                   domain=prompt.domain, complexity=prompt.complexity, input_ids=list(prompt_ids) + targets,
                   loss_mask=[0] * len(prompt_ids) + [1] * len(targets), response=response, finished=finished)


def _split_response(row: list[int], stops: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(row):
        if t in stops:
            return row[:i], True
    return row, False


def generate_responses(model, tokenizer, prompts: Sequence[PromptRecord], *, max_new_tokens: int,
                       samples_per_prompt: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                       batch_size: int = 16, seed: int = 0, progress: bool = True) -> list[Example]:
    """Teacher answers for ``prompts``: ``len(prompts) * samples_per_prompt`` examples in prompt order.

    Prompts are sorted by token length (longest first) and generated in left-padded batches of
    ``batch_size`` with the KV cache; generation stops at eos / ``<|im_end|>``. Greedy when
    ``temperature == 0``; sampling uses a private RNG seeded from (seed, batch index), so results depend on
    (prompts, settings, seed) and never on the caller's global RNG state.
    """
    import torch
    from transformers import GenerationConfig

    if samples_per_prompt > 1 and temperature == 0.0:
        raise ConfigError("data.samples_per_prompt", samples_per_prompt,
                          "1 when data.gen_temperature is 0 (greedy answers would be identical)")
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("max_new_tokens/batch_size", (max_new_tokens, batch_size), "integers >= 1")
    eot, stops = end_of_turn_id(tokenizer), stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    encoded = [encode_prompt(tokenizer, p.messages) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    sampling = temperature > 0.0
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                               temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                               top_k=0 if sampling else None,  # 0: no top-k cut (HF's default is 50)
                               num_return_sequences=samples_per_prompt, eos_token_id=stops,
                               pad_token_id=pad, use_cache=True)
    from ..train import distributed as dist

    device = next(model.parameters()).device
    results: dict[int, list[Example]] = {}
    n_new = 0
    bar, task = progress_bar(progress and dist.is_main(), len(prompts), "teacher answers")
    t0 = time.perf_counter()
    starts = list(range(0, len(order), batch_size))
    try:
        # Under torchrun each rank answers every world-th batch (same batches, same per-batch seeds as one
        # process); every rank gets all the answers.
        for b in dist.mine(len(starts)):
            idx = order[starts[b]:starts[b] + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every prompt ends at the last column
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                att[r, width - len(encoded[i]):] = 1
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(seed * 1_000_003 + b)
                out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),
                                     generation_config=gen_cfg)
            new = out[:, width:].tolist()
            for r, i in enumerate(idx):
                exs = []
                for s in range(samples_per_prompt):
                    resp, finished = _split_response(new[r * samples_per_prompt + s], set(stops))
                    n_new += len(resp) + finished
                    text = tokenizer.decode(resp, skip_special_tokens=True)
                    exs.append(build_example(prompts[i], s, encoded[i], resp, finished, eot, text))
                results[i] = exs
            if bar is not None:
                rate = n_new / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=len(idx) * dist.world_size(),
                           tps=f"{rate:,.0f} tok/s" + (" on rank 0" if dist.world_size() > 1 else ""))
    finally:
        if bar is not None:
            bar.stop()
    results = dist.merge_shards(results, everywhere=True)  # token lists: small next to the targets
    return [ex for i in range(len(prompts)) for ex in results[i]]


def progress_bar(enabled: bool, total: int, label: str):
    """A started rich progress bar with a ``tps`` field (tokens/s), or (None, None) when disabled."""
    if not enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[tps]}"), transient=False)
    task = bar.add_task("gen", total=total, tps="")
    bar.start()
    return bar, task
