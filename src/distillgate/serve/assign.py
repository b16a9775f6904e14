"""Sticky A/B assignment: a unit (user, else session) hashes to a fixed point in [0, 1) per experiment, and
the arms own consecutive ranges of that interval by weight, the scheme GrowthBook's SDKs use (there with
FNV-1a; here MurmurHash3 x86 32-bit from ``mmh3``, the hash Optimizely and Unleash use). Deterministic across
processes and restarts (no state to keep); a unit sees the same arm for as long as the weights stay, and
changing a weight moves only the units near the boundary it shifts."""

from __future__ import annotations

import mmh3

from ..errors import ConfigError


class Assigner:
    """``Assigner("exp1", {"control": 0.5, "candidate": 0.5}).assign("user-17") -> "control"``."""

    def __init__(self, experiment: str, weights: dict[str, float]):
        if not experiment or not isinstance(experiment, str):
            raise ConfigError("serving.experiment", experiment, "a non-empty name")
        if not weights or any(not isinstance(w, (int, float)) or w < 0 for w in weights.values()) \
                or sum(weights.values()) <= 0:
            raise ConfigError("serving.weights", weights, "arm -> weight >= 0, at least one weight > 0")
        self.experiment = experiment
        total = float(sum(weights.values()))
        self.weights = {a: w / total for a, w in weights.items()}
        edges, acc = [], 0.0
        for arm, w in self.weights.items():
            acc += w
            edges.append((acc, arm))
        self._edges = edges

    def bucket(self, unit: str) -> float:
        """The unit's point in [0, 1) for this experiment."""
        return mmh3.hash(f"{self.experiment}:{unit}", 0, signed=False) / 2.0 ** 32

    def assign(self, unit: str) -> str:
        b = self.bucket(unit)
        for edge, arm in self._edges:
            if b < edge and self.weights[arm] > 0:
                return arm
        return next(a for _, a in reversed(self._edges) if self.weights[a] > 0)  # float rounding at 1.0
