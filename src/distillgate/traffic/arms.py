"""An A/B *arm*: anything that answers a chat request and says how long it took.

:class:`Arm` is the protocol (``respond(messages, user_id, session_id) -> Answer``). :class:`ModelArm` answers
with a Hugging Face causal LM in this process (greedy, the tokenizer's chat template); the production stage and
the tests use it. An arm behind the gateway (``distillgate serve``) is a thin adapter with the same method that
posts to ``/v1/chat/completions`` with ``X-User-Id`` / ``X-Session-Id`` headers: :class:`GatewayArm` wraps any
client with the gateway client's ``chat(messages, user_id=, session_id=, max_tokens=)`` (``distillgate serve``'s
``GatewayClient``); the gateway picks the arm (sticky per user) and says which in the answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class Answer:
    text: str
    latency_ms: float
    ttft_ms: float | None = None
    error: str | None = None
    model_version: str | None = None
    arm: str | None = None  # the arm that served it, when a router (the gateway) chose it


@runtime_checkable
class Arm(Protocol):
    name: str

    def respond(self, messages: list[dict], user_id: str, session_id: str) -> Answer: ...


class _FirstToken:
    """A logits processor that notes when generate first asks for scores: after the prefill, i.e. the first
    token's time (no streamer thread needed)."""

    def __init__(self):
        self.t = None

    def __call__(self, input_ids, scores):
        if self.t is None:
            self.t = time.perf_counter()
        return scores


class ModelArm:
    """Greedy answers from ``model`` (eval mode meanwhile) with ``tokenizer``; latency and TTFT measured."""

    def __init__(self, name: str, model, tokenizer, *, max_new_tokens: int = 32, max_prompt_tokens: int = 384,
                 version: str | None = None):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.max_new_tokens, self.max_prompt_tokens, self.version = max_new_tokens, max_prompt_tokens, version

    def _ids(self, messages: list[dict]):
        import torch

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            if not isinstance(ids, torch.Tensor):  # newer transformers return a BatchEncoding
                ids = ids["input_ids"]
        else:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            ids = tok(text, return_tensors="pt")["input_ids"]
        return ids[:, -self.max_prompt_tokens:]

    def respond(self, messages: list[dict], user_id: str, session_id: str) -> Answer:
        import torch
        from transformers import LogitsProcessorList

        t0 = time.perf_counter()
        was = self.model.training
        self.model.eval()
        try:
            ids = self._ids(messages)
            first = _FirstToken()
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
                self.tokenizer.eos_token_id
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=self.max_new_tokens, pad_token_id=pad,
                                          logits_processor=LogitsProcessorList([first]))
            text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            err = None
        except Exception as e:  # a failing arm is an ``error`` outcome for that session, not a crashed window
            text, err = "", f"{type(e).__name__}: {e}"
            first = _FirstToken()
        finally:
            self.model.train(was)
        t1 = time.perf_counter()
        ttft = None if first.t is None else 1000 * (first.t - t0)
        return Answer(text, 1000 * (t1 - t0), ttft, err, self.version)


class GatewayArm:
    """Both arms behind the gateway: ``client.chat(...)`` answers and reports the arm and version that served it
    (a router: :func:`distillgate.traffic.generator.simulate` records the arm from the answer)."""

    name = "gateway"

    def __init__(self, client, *, max_new_tokens: int = 32):
        self.client, self.max_new_tokens = client, max_new_tokens

    def respond(self, messages: list[dict], user_id: str, session_id: str) -> Answer:
        r = self.client.chat(messages, user_id=user_id, session_id=session_id, max_tokens=self.max_new_tokens)
        err = r.error if r.error is not None or r.status == 200 else f"HTTP {r.status}"
        return Answer(r.text or "", r.latency_ms, r.ttft_ms, err, r.version, r.arm)
