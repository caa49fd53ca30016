"""MLflow plumbing shared by every job: one tracking URI, bounded network waits.

Only the driver or rank 0 calls into this module (docs/design.md, "MLflow").
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SQLITE = "mlflow.db"

# The HTTP client's defaults (7 retries, backoff 2, 120 s timeout) can block a logging call for
# minutes when the server is away (docs/facts.md). Jobs bound them unless the user set them.
BOUNDED_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else ./mlflow.db; SQLite paths made absolute.

    Ray workers run in another directory, so a relative SQLite path would silently create a second
    store there.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_SQLITE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    elif "://" not in uri:  # a bare path: treat as a SQLite file
        uri = "sqlite:///" + os.path.abspath(uri)
    return uri


def bound_http_waits() -> None:
    """Apply BOUNDED_HTTP_ENV where the user has not chosen otherwise (before mlflow talks HTTP)."""
    for k, v in BOUNDED_HTTP_ENV.items():
        os.environ.setdefault(k, v)


# The description (the `mlflow.note.content` tag, shown on the experiment's page) of each experiment
# vitdit logs to by default.
EXPERIMENT_DESCRIPTIONS = {
    "vitdit-vae": "AutoencoderKL training (`vitdit train vae`): one run per output directory; "
    "train/ and val/ reconstruction losses, the latents' scale.",
    "vitdit-vit": "ViT classifier training (`vitdit train vit`): train/loss, val/accuracy; the trained "
    "ViT also scores generated samples in vitdit-eval.",
    "vitdit-dit": "DiT training on a latent data set (`vitdit train dit`): train/loss, val/loss, "
    "throughput and MFU per step, a fixed-seed sample grid every eval_every steps.",
    "vitdit-mmdit": "MM-DiT (SD3-style, text-conditioned) training (`vitdit train mmdit`): train/loss, "
    "val/loss, a sample grid of fixed prompts.",
    "vitdit-sample": "Batch sampling (`vitdit sample`): the sampling config and the sample grid of "
    "each samples directory.",
    "vitdit-eval": "Evaluations of samples (`vitdit evaluate`, scheduled evaluation): accuracy per "
    "class, FD, KID, precision/recall against a reference set.",
    "vitdit-quickstart": "`vitdit quickstart` runs: one run per quickstart, RUNNING while its stages "
    "run; params are the recipe, tags each stage's outcome and command, metrics its time and, at "
    "the end, the summary (accuracies, FD, KID, memorisation) with summary.json and the grid.",
    "vitdit-pipeline": "`vitdit pipeline RECIPE` runs: one run per pipeline run, RUNNING while its "
    "stages run; params are the recipe, tags each stage's outcome and command, metrics its time.",
}


def get_or_create_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (with its description) if absent.

    An existing experiment without a description gets vitdit's; one the user described is left alone.
    """
    description = EXPERIMENT_DESCRIPTIONS.get(name)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        tags = {"mlflow.note.content": description} if description else None
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=tags)
        except Exception:  # created meanwhile by another process (MLflow has no create-if-absent)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if description and "mlflow.note.content" not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, "mlflow.note.content", description)
    return exp.experiment_id


def training_run_name(kind: str, params: dict, output_name: str) -> str:
    """``dit DiT-digits/2 · 3000 steps`` (and the output directory's name when it says more than the kind)."""
    parts = [" ".join(str(p) for p in (kind, params.get("model.model_name")) if p)]
    if params.get("steps") is not None:
        parts.append(f"{params['steps']} steps")
    if output_name and output_name != kind:
        parts.append(output_name)
    return " · ".join(parts)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else str(v)
    return out


class PipelineRun:
    """The pipeline's MLflow run, opened before the first stage: RUNNING while stages run, each
    stage's outcome logged as it ends (tag ``stage.<name>``, metric ``seconds/<name>``), then
    FINISHED or FAILED. Tracking is best effort: a store that fails only costs a warning.
    """

    def __init__(self, tracking_uri: str, experiment: str = "vitdit-quickstart"):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_id: str | None = None
        self.client = None

    def _guard(self, what: str, fn, *args, **kwargs) -> Any:
        if self.client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must not stop the pipeline
            log.warning("MLflow %s failed: %s", what, str(e).splitlines()[0] if str(e) else e)
            return None

    def start(
        self, raw_recipe: dict[str, Any], run_name: str, tags: dict[str, str] | None = None
    ) -> str | None:
        """Create the run (RUNNING) with the recipe as params."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from pipelines.tracking import get_or_create_experiment

        try:
            self.client = MlflowClient(self.tracking_uri)
            exp_id = get_or_create_experiment(self.client, self.experiment)
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags or {})
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow at %s: cannot create the pipeline's run: %s", self.tracking_uri, e)
            self.client = None
            return None
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in _flatten(raw_recipe).items()]
        for i in range(0, len(params), 100):
            self._guard("log params", self.client.log_batch, self.run_id, params=params[i : i + 100])
        return self.run_id

    def stage_started(self, index: int, total: int, name: str, command: str, train_log) -> None:
        if self.client is not None:
            self._guard("set tag", self.client.set_tag, self.run_id, f"stage.{name}", "running")
            self._guard("set tag", self.client.set_tag, self.run_id, f"command.{name}", command[:5000])

    def stage_finished(self, index: int, total: int, name: str, status: str, seconds: float, exit_code: int):
        if self.client is None:
            return
        self._guard("set tag", self.client.set_tag, self.run_id, f"stage.{name}", status)
        if status in ("done", "failed"):
            self._guard(
                "log metric", self.client.log_metric, self.run_id, f"seconds/{name}", seconds, step=index
            )

    def log_summary(self, summary: dict[str, Any], summary_path: str) -> None:
        """The summary's scalar metrics, summary.json, the grid and the reports as artifacts."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        scalars = {k: float(v) for k, v in summary["metrics"].items() if isinstance(v, int | float)}
        scalars["seconds/total"] = summary["seconds"]
        machine = summary.get("machine") or {}
        scalars.update({f"cpu_share/{k}": v for k, v in (machine.get("cpu_time_shares") or {}).items()})
        metrics = [Metric(f"quickstart/{k}", v, now, 0) for k, v in scalars.items()]
        self._guard("log metrics", self.client.log_batch, self.run_id, metrics=metrics)
        cpu = str(machine.get("cpu_model"))[:500]
        self._guard("set tag", self.client.set_tag, self.run_id, "cpu_model", cpu)
        for key in ("grid", "held_out_grid", "memorization_report", "eval_report"):
            path = summary["artifacts"].get(key)
            if path and os.path.exists(path):
                self._guard("log artifact", self.client.log_artifact, self.run_id, path)
        self._guard("log artifact", self.client.log_artifact, self.run_id, summary_path)

    def end(self, status: str) -> None:
        """FINISHED or FAILED."""
        if self.client is not None:
            self._guard("end run", self.client.set_terminated, self.run_id, status=status)
