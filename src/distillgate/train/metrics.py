"""Training metrics: one JSONL record per logged step, TensorBoard scalars when available, run statistics.

``metrics.jsonl`` records (one JSON object per line)::

    {"step": 3, "epoch": 0, "lr": 3e-4, "loss": 2.31, "terms": {"kd": 2.1, "ce": 3.0}, "grad_norm": 0.8,
     "loss_tokens": 412, "input_tokens": 1024, "loss_tokens_per_s": 950.1, "input_tokens_per_s": 2361.0,
     "seconds": 0.43, "elapsed_s": 1.3, "skipped": false}

``loss`` is the step's token-weighted mean loss; ``terms`` are each channel's token-weighted mean over the
step's micro-batches. Skipped steps are always written (``skipped: true``, ``loss`` may be NaN, written as
``NaN`` which Python's json reads back). Events (skips, rollbacks, resume fallbacks) go to ``events.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import statistics
import sys
from pathlib import Path

from ..io import atomic_write_text

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSONL metrics (+ optional TensorBoard) for one training output folder.

    ``resume_step``: drop records after that step (they belong to steps the resumed run will redo).
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None, mlflow=None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.events_path = self.out_dir / "events.jsonl"
        self.enabled = enabled
        self._tb = None
        self._mlflow = None
        if not enabled:
            return
        if mlflow is not None:  # a MlflowSpec: the steps go to one MLflow run per output folder
            self._mlflow = _MlflowSteps(mlflow, self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for p in (self.path, self.events_path):
            if resume_step is None:
                atomic_write_text(p, "")
            else:
                _truncate_after(p, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:  # tensorboard is optional: `pip install distillgate[tb]`
                log.info("TensorBoard scalars off (%s)", e)
            else:
                self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=resume_step)

    def _append(self, path: Path, record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append(self.path, record)
        if self._tb is not None:
            s = record["step"]
            for key in ("loss", "lr", "grad_norm", "loss_tokens_per_s", "input_tokens_per_s"):
                v = record.get(key)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{key}", v, s)
            for name, v in record.get("terms", {}).items():
                if math.isfinite(v):
                    self._tb.add_scalar(f"train/term/{name}", v, s)
        if self._mlflow is not None:
            self._mlflow.step(record)

    def event(self, record: dict) -> None:
        if self.enabled:
            self._append(self.events_path, record)

    def close(self) -> None:
        if self._mlflow is not None:
            self._mlflow.close()
            self._mlflow = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


class _MlflowSteps:
    """Training steps of one output folder as one MLflow run (tracking URI default
    ``sqlite:///<out_dir>/mlflow.db``; a resumed training finds its run again by the output-folder tag)."""

    TAG = "distillgate.output_dir"

    def __init__(self, spec, out_dir: Path):
        from mlflow.tracking import MlflowClient

        out_dir = out_dir.resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        uri = spec.tracking_uri or f"sqlite:///{out_dir}/mlflow.db"
        self.client = c = MlflowClient(tracking_uri=uri)
        exp = c.get_experiment_by_name(spec.experiment)
        exp_id = exp.experiment_id if exp is not None else c.create_experiment(
            spec.experiment, artifact_location=(out_dir / "mlflow-artifacts").as_uri() if spec.tracking_uri is None
            else None)
        found = c.search_runs([exp_id], filter_string=f"tags.`{self.TAG}` = '{out_dir}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            c.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = c.create_run(exp_id, run_name=out_dir.name, tags={self.TAG: str(out_dir)}).info.run_id

    def step(self, record: dict) -> None:
        import time

        from mlflow.entities import Metric

        now, s = int(time.time() * 1000), int(record["step"])
        vals = {f"train/{k}": record.get(k) for k in ("loss", "lr", "grad_norm", "loss_tokens_per_s",
                                                        "input_tokens_per_s")}
        vals.update({f"train/term/{k}": v for k, v in record.get("terms", {}).items()})
        rows = [Metric(k, float(v), now, s) for k, v in vals.items()
                if isinstance(v, (int, float)) and math.isfinite(v)]
        if rows:
            self.client.log_batch(self.run_id, metrics=rows)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


def _truncate_after(path: Path, step: int) -> None:
    """Keep only records with ``step <= step`` (atomic rewrite); a missing file becomes empty."""
    if not path.is_file():
        atomic_write_text(path, "")
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a torn last line from a crash
            continue
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def steady_median(values: list[float], warmup: int | None = None) -> float:
    """Median of ``values`` after dropping the first ``warmup`` (default: 2, or 1 when fewer than 5 values):
    the first steps pay allocator and kernel warm-up. NaN when nothing is left."""
    vals = [v for v in values if math.isfinite(v)]
    if warmup is None:
        warmup = 2 if len(vals) >= 5 else (1 if len(vals) >= 2 else 0)
    vals = vals[warmup:]
    return statistics.median(vals) if vals else float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (getrusage: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024
