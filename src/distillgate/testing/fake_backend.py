"""A fake OpenAI-compatible backend for the G-O1 tests and benchmark: a *gullible* model that executes every
attack (answers with the system prompt followed by the user's message, so any attack that reaches it leaks
and repeats), with switches to fail (HTTP 500) or stall (sleep) on demand for the circuit-breaker tests."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class FakeControl:
    """Mutable behaviour: ``fail`` (answer 500), ``delay_s`` (sleep first); ``calls`` counts requests."""

    def __init__(self, name: str = "fake"):
        self.name, self.fail, self.delay_s, self.calls = name, False, 0.0, 0


def gullible_app(ctl: FakeControl) -> Starlette:
    async def chat(request: Request):
        ctl.calls += 1
        body = json.loads(await request.body())
        if ctl.delay_s:
            await asyncio.sleep(ctl.delay_s)
        if ctl.fail:
            return JSONResponse({"error": {"message": "injected failure", "code": "fake_500"}}, status_code=500)
        text = " ".join(m["content"] for m in body["messages"] if isinstance(m.get("content"), str))
        text = f"[{ctl.name}] {text}"
        rid = f"fake-{ctl.calls}"
        if body.get("stream"):
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": ctl.name,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]}
            end = dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])

            async def gen():
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode()
            return StreamingResponse(gen(), media_type="text/event-stream")
        return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": ctl.name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    async def health(request: Request):
        return Response("ok")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])
