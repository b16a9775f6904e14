"""``loop.serving``: how `distillgate serve` runs the gateway and how validate measures G-P2 through it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ServingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(False, description="validate measures G-P2 (latency_volatility_ratio) through the "
                                             "gateway under a locust load on loopback (else: the in-process "
                                             "FIFO simulation)")
    backend: Literal["transformers", "vllm"] = Field("transformers", description="model server started per "
                                                     "version: `transformers serve` (CPU) or `vllm serve` (GPU)")
    device: str = Field("cpu", description="device the transformers backend runs on")
    backend_threads: int | None = Field(1, ge=1, description="OMP threads per backend process (None: torch's "
                                                             "default)")
    experiment: str = Field("distillgate", min_length=1, description="A/B experiment name (the hash seed of "
                                                                     "the sticky assignment)")
    candidate_weight: float = Field(0.5, ge=0.0, le=1.0, description="share of users served by the candidate")
    shadow: bool = Field(False, description="also call the production (control) model for each request the "
                                            "candidate serves, and log its answer next to the candidate's")
    shadow_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of requests shadow-called")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body accepted (else 413)")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for (else 400)")
    startup_timeout_s: float = Field(180.0, gt=0, description="how long a backend may take to become healthy")
    load_users: int = Field(8, ge=1, le=1000, description="G-P2 load: concurrent simulated sessions (locust users)")
    load_seconds: float = Field(20.0, gt=0, le=3600, description="G-P2 load: duration (locust --run-time)")
    load_max_tokens: int = Field(8, ge=1, le=512, description="G-P2 load: tokens generated per request")
    long_context_words: int = Field(300, ge=8, description="G-P2 load: words of the long documents one in three "
                                                           "sessions opens with (contexts grow per turn up to it)")
    burst_size: int = Field(4, ge=1, le=256, description="G-P2 load: requests a burst user fires at once")
    burst_every_s: float = Field(3.0, gt=0, description="G-P2 load: seconds between a burst user's bursts")
    think_time_s: float = Field(0.2, ge=0, description="G-P2 load: a session's mean pause between turns")
    seed: int = Field(0, description="G-P2 load: seed of the simulated sessions")
    detector: Literal["off", "rules", "rules+minilm"] = Field("off", description="G-O1 attack detector before "
                                                              "routing: a detected attack gets the degraded safe "
                                                              "response; rules+minilm adds MiniLM similarity to "
                                                              "known attacks on cue-bearing requests the rules pass")
    detector_threshold: float = Field(0.62, gt=0, lt=1, description="G-O1 MiniLM cosine that flags an attack")
    breaker: bool = Field(False, description="G-O1 circuit breaker per backend (closed/open/half-open, pybreaker); "
                                             "while the candidate's is open its requests go to the control "
                                             "(the previous stable version)")
    breaker_fail_max: int = Field(5, ge=1, description="consecutive failures (5xx, unreachable, timeout) that open "
                                                       "a breaker")
    breaker_reset_s: float = Field(10.0, gt=0, description="seconds a breaker stays open before a half-open trial")
    breaker_timeout_s: float = Field(30.0, gt=0, description="a backend answer slower than this counts as a failure")
