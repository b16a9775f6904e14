"""Trackers where users already look (``train.report_to``, like the HF Trainer's list): TensorBoard and MLflow.

The run store stays the record (versions, catalog, report); a tracker is a mirror of it, written after each
committed iteration:

* **tensorboard**: per-iteration scalars (every numeric metric, gates passed, phase seconds) under
  ``<run>/tensorboard`` (``tensorboard --logdir runs/<run>/tensorboard``); a resumed run purges the steps it redoes.
* **mlflow**: one MLflow run per distillgate run (found again by its ``distillgate.run_id`` tag on resume) with
  the config as params, per-iteration metrics (step = iteration), each gate's verdict and value, the iteration's
  ``gates.json`` and the HTML report as artifacts, and a registered model whose aliases ``current``, ``best`` and
  ``stable`` mirror the store's (one model version per aliased store version; its source is the run folder,
  its tags name the version). Tracking URI default: ``sqlite:///<run>/mlflow.db`` (no server, works offline;
  ``mlflow ui --backend-store-uri sqlite:///runs/<run>/mlflow.db`` shows it).

A tracker that fails (an unreachable server, a locked database) is switched off for the rest of the run with a
warning and an alert: the distillation goes on, the store has everything.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

log = logging.getLogger(__name__)
MIRRORED_ALIASES = ("current", "best", "stable")
RUN_TAG = "distillgate.run_id"
VERSION_TAG = "distillgate.version"


def _name(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_-. /``); anything else becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(name))[:250]


def _numbers(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _flatten(d, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, default=str) if not isinstance(v, str) else v
    return out


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, folder: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.w = SummaryWriter(str(folder), purge_step=purge_step)

    def iteration(self, k: int, metrics: dict, gates: list, phases: dict, store, vid: int) -> None:
        for name, v in metrics.items():
            self.w.add_scalar(f"iteration/{name}", v, k)
        if gates:
            self.w.add_scalar("gates/passed", sum(g.passed for g in gates), k)
        for name, p in phases.items():
            self.w.add_scalar(f"phase_seconds/{name}", p["seconds"], k)
        self.w.flush()

    def finish(self, status: str) -> None:
        self.w.add_text("run/status", status)
        self.w.close()


class MlflowSink:
    name = "mlflow"

    def __init__(self, spec, store, config: dict, reopen: bool = True):
        from mlflow.tracking import MlflowClient

        default = spec.tracking_uri is None
        self.uri = spec.tracking_uri or f"sqlite:///{Path(store.dir).resolve()}/mlflow.db"
        self.client = c = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        exp = c.get_experiment_by_name(spec.experiment)
        if exp is None:
            art = (Path(store.dir).resolve() / "mlflow-artifacts").as_uri() if default else None
            exp_id = c.create_experiment(spec.experiment, artifact_location=art)
        else:
            exp_id = exp.experiment_id
        found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{store.run_id}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            if reopen:                          # a resumed run continues its MLflow run
                c.update_run(self.run_id, status="RUNNING")
        else:
            from mlflow.entities import Param

            run = c.create_run(exp_id, run_name=store.run_id, tags={RUN_TAG: store.run_id,
                                                                    "distillgate.run_dir": str(store.dir)})
            self.run_id = run.info.run_id
            params = [Param(k[:250], v[:6000]) for k, v in sorted(_flatten(config).items())]
            for i in range(0, len(params), 100):
                c.log_batch(self.run_id, params=params[i:i + 100])
        self.model = spec.registered_model or f"distillgate-{store.run_id}"
        self.run_dir = Path(store.dir)
        self._versions: dict[int, str] | None = None

    def iteration(self, k: int, metrics: dict, gates: list, phases: dict, store, vid: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(_name(name), v, now, k) for name, v in metrics.items()]
        for g in gates:
            rows.append(Metric(_name(f"gate/{g.gate}/passed"), float(g.passed), now, k))
            if g.value is not None and math.isfinite(g.value):
                rows.append(Metric(_name(f"gate/{g.gate}/value"), float(g.value), now, k))
        if gates:
            rows.append(Metric("gates_passed", float(sum(g.passed for g in gates)), now, k))
        rows += [Metric(_name(f"phase_seconds/{name}"), float(p["seconds"]), now, k) for name, p in phases.items()]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])
        v = store.get_version(vid)
        if "gates.json" in v.files:
            self.client.log_text(self.run_id, v.path_of("gates.json").read_text(), f"iterations/{k:03d}/gates.json")
        self.mirror_aliases(store)

    def _model_versions(self) -> dict[int, str]:
        if self._versions is None:
            c = self.client
            try:
                c.get_registered_model(self.model)
            except Exception:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST
                c.create_registered_model(self.model, tags={RUN_TAG: self.run_dir.name},
                                          description=f"distillgate run {self.run_dir.name}: aliases mirror the "
                                                      f"run store's {', '.join(MIRRORED_ALIASES)}")
            self._versions = {}
            for mv in c.search_model_versions(f"name='{self.model}'"):
                if VERSION_TAG in (mv.tags or {}):
                    self._versions[int(mv.tags[VERSION_TAG])] = mv.version
        return self._versions

    def mirror_aliases(self, store) -> None:
        """Point the registered model's aliases at the model versions of the store versions the store's aliases
        name (creating a model version the first time a store version is aliased); drop one the store dropped."""
        c, have = self.client, self._model_versions()
        aliases = store.aliases()
        for name in MIRRORED_ALIASES:
            vid = aliases.get(name)
            if vid is None:
                try:
                    c.delete_registered_model_alias(self.model, name)
                except Exception:  # noqa: BLE001 - not set: nothing to drop
                    pass
                continue
            if vid not in have:
                v = store.get_version(vid)
                mv = c.create_model_version(
                    self.model, source=self.run_dir.resolve().as_uri(), run_id=self.run_id,
                    tags={VERSION_TAG: str(vid), "distillgate.iteration": str(v.iteration),
                          "distillgate.kind": v.kind, RUN_TAG: store.run_id},
                    description=f"store version {vid} (iteration {v.iteration}) of run {store.run_id}; its student "
                                f"folder: Version.checkout('student', ...), or `distillgate rollback "
                                f"{store.run_id} --to-version {vid}`")
                have[vid] = mv.version
            c.set_registered_model_alias(self.model, name, have[vid])

    def log_report(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), "report")

    def finish(self, status: str) -> None:
        mlflow_status = {"interrupted": "KILLED", "failed": "FAILED"}.get(status, "FINISHED")
        self.client.set_tag(self.run_id, "distillgate.status", status)
        self.client.set_terminated(self.run_id, mlflow_status)


class LoopTracker:
    """The ``train.report_to`` trackers of one loop run. ``start``: the first iteration this process runs
    (TensorBoard drops the steps from there on: a resumed run redoes them)."""

    def __init__(self, cfg, store, start: int = 0, say=None):
        self.store, self.say = store, say or (lambda msg: None)
        self.sinks: list = []
        for name in cfg.train.report_to:
            try:
                if name == "tensorboard":
                    try:
                        import torch.utils.tensorboard  # noqa: F401
                    except Exception as e:  # noqa: BLE001 - the default tracker; optional: distillgate[tb]
                        log.info("TensorBoard scalars off (%s)", e)
                        continue
                    self.sinks.append(TensorBoardSink(Path(store.dir) / "tensorboard", start or None))
                else:
                    self.sinks.append(MlflowSink(cfg.train.mlflow, store, store.config))
            except Exception as e:  # noqa: BLE001 - a tracker never stops the run
                self._off(name, e)

    def _off(self, name: str, e: Exception) -> None:
        msg = f"train.report_to {name}: switched off ({type(e).__name__}: {e}); the run store has every record"
        log.warning(msg)
        self.say(f"  [yellow]{msg}[/]")
        try:
            self.store.record_alert("warning", "tracking", msg)
        except Exception:  # noqa: BLE001 - the store may be what failed
            pass

    def _each(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as e:  # noqa: BLE001
                self.sinks.remove(sink)
                self._off(sink.name, e)

    def iteration(self, it) -> None:
        """Mirror iteration ``it`` (committed: ``it.metrics['version']`` is its version id)."""
        if not self.sinks:
            return
        vid = it.metrics.get("version")
        metrics = _numbers({k: v for k, v in it.metrics.items() if k != "version"})
        metrics.update({f"teacher/{k}": v for k, v in _numbers(it.teacher_metrics or {}).items()})
        gates = self.store.catalog.gate_results(vid) if vid is not None else []
        phases = next((x["phases"] for x in self.store.catalog.iterations() if x["iteration"] == it.index), {})
        self._each("iteration", it.index, metrics, gates, phases, self.store, vid)

    def finish(self, status: str) -> None:
        self._each("finish", status)
        self.sinks = []


def log_report(cfg, store, path: str | Path) -> bool:
    """Attach the rendered report to the run's MLflow run (when ``report_to`` names mlflow); True if logged."""
    if "mlflow" not in cfg.train.report_to:
        return False
    try:
        sink = MlflowSink(cfg.train.mlflow, store, store.config, reopen=False)
        sink.log_report(Path(path))
        return True
    except Exception as e:  # noqa: BLE001
        log.warning("train.report_to mlflow: the report was not logged (%s: %s)", type(e).__name__, e)
        return False
