"""Rich progress bar and end-of-run summary table for the trainer.

The bar shows step/total, loss and input tokens/s, lr and every loss term of the step; it is off when
stderr is not a terminal (logs, CI) or when the caller passes ``progress=False``. Everything here is
display only: numbers come from the loop.
"""

from __future__ import annotations

import math
import sys


def _fmt(v: float) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return str(v)
    return f"{v:.3e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.4f}"


class TrainProgress:
    """Context manager: ``with TrainProgress(total, start, enabled) as p: p.update(step, record)``."""

    def __init__(self, total: int, start: int = 0, enabled: bool | None = None):
        self.total, self.start = total, start
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> "TrainProgress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(self, step: int, record: dict) -> None:
        if self._progress is None:
            return
        parts = [f"loss {_fmt(record['loss'])}"]
        parts += [f"{k} {_fmt(v)}" for k, v in record.get("terms", {}).items()]
        parts += [f"lr {record['lr']:.2e}", f"{record['loss_tokens_per_s']:.0f} tgt tok/s",
                  f"{record['input_tokens_per_s']:.0f} in tok/s"]
        if record.get("skipped"):
            parts.append("[red]skipped[/red]")
        self._progress.update(self._task, completed=step, info="  ".join(parts))

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None


def summary_rows(result) -> list[tuple[str, str]]:
    """(label, value) rows of a :class:`~distillgate.train.types.TrainResult` for the summary table."""
    rows = [("steps", str(result.steps)), ("loss tokens", f"{result.tokens:,}"),
            ("input tokens", f"{result.input_tokens:,}"), ("seconds", f"{result.seconds:.1f}"),
            ("loss tokens/s (median)", f"{result.tokens_per_s:.1f}"),
            ("input tokens/s (median)", f"{result.input_tokens_per_s:.1f}"),
            *([("compile seconds (not in steps)", f"{result.compile_seconds:.1f}"
                + (" (student + online teacher)" if getattr(result, "teacher_compiled", False) else ""))]
              if getattr(result, "compiled", False) else []),
            ("final loss", _fmt(result.final_loss)), ("mean loss", _fmt(result.mean_loss))]
    rows += [(f"final {k}", _fmt(v)) for k, v in result.final_terms.items()]
    rows += [("skipped steps", str(result.skipped_steps)), ("rollbacks", str(result.rollbacks)),
             ("peak RSS (MiB)", f"{result.peak_rss_mb:.0f}"),
             ("last checkpoint", str(result.last_checkpoint or "-"))]
    return rows


def print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="training summary", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    for label, value in summary_rows(result):
        table.add_row(label, value)
    Console(stderr=True).print(table)
