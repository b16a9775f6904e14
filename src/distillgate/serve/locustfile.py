"""Locust load for G-P2 through the gateway (run headless by :mod:`.load`; configured by the JSON in the
``DISTILLGATE_LOAD`` environment variable). Kept import-free of distillgate: locust monkey-patches the process
with gevent, so it runs in its own process.

Two user kinds, on every arm in ``arms`` with the same requests (each turn goes to each arm, in a random
order, so arms see the same mix at the same moments):

- ``Session`` (3 of 4 users): a multi-turn conversation whose context grows each turn; one in three opens
  with a long document (``long_context_words``); pauses ~``think_time_s`` between turns;
- ``Burst`` (1 of 4): every ``burst_every_s`` fires ``burst_size`` requests at once.
"""

import json
import os
import random
import uuid

import gevent.pool
from locust import FastHttpUser, between, constant, task

CFG = json.loads(os.environ.get("DISTILLGATE_LOAD", "{}"))
ARMS = CFG.get("arms", ["teacher", "student"])
MAX_TOKENS = int(CFG.get("max_tokens", 8))
LONG = int(CFG.get("long_context_words", 300))
WORDS = ("the report says that our order was late and the refund for the account in march was not paid so "
         "please check which team handles billing questions about invoices shipping dates and returns").split()
_rng = random.Random(int(CFG.get("seed", 0)))


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _post(client, arm: str, messages: list, user: str, session: str) -> None:
    body = {"model": arm, "messages": messages, "max_tokens": MAX_TOKENS, "stream": True}
    with client.post("/v1/chat/completions", json=body, name=arm, catch_response=True,
                     headers={"X-User-Id": user, "X-Session-Id": session}) as r:
        if r.status_code != 200:
            r.failure(f"HTTP {r.status_code}: {r.text[:200]}")


class Session(FastHttpUser):
    weight = 3
    think = float(CFG.get("think_time_s", 0.2))
    wait_time = between(0.5 * think, 1.5 * think)

    def on_start(self):
        self.rng = random.Random(_rng.random())
        self.user, self.session = f"u-{uuid.uuid4().hex[:8]}", f"s-{uuid.uuid4().hex[:8]}"
        first = _text(self.rng, self.rng.randint(LONG // 2, LONG)) if self.rng.random() < 1 / 3 else ""
        self.words = first.split()

    @task
    def turn(self):
        self.words += _text(self.rng, self.rng.randint(6, 24)).split()
        self.words = self.words[-LONG:]
        messages = [{"role": "user", "content": " ".join(self.words)}]
        for arm in self.rng.sample(ARMS, len(ARMS)):
            _post(self.client, arm, messages, self.user, self.session)


class Burst(FastHttpUser):
    weight = 1
    wait_time = constant(float(CFG.get("burst_every_s", 3.0)))

    def on_start(self):
        self.rng = random.Random(_rng.random())
        self.user = f"b-{uuid.uuid4().hex[:8]}"

    @task
    def burst(self):
        group = gevent.pool.Group()
        for i in range(int(CFG.get("burst_size", 4))):
            messages = [{"role": "user", "content": _text(self.rng, self.rng.randint(8, 48))}]
            for arm in self.rng.sample(ARMS, len(ARMS)):
                group.spawn(_post, self.client, arm, messages, self.user, f"{self.user}-{i}")
        group.join()
