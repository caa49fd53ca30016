"""Scheduled evaluation: sample and evaluate every checkpoint of a training run exactly once.

``vitdit evaluate --watch RUN_ID_OR_RUN_DIR [--every 30m]`` (or ``python -m jobs.scheduled_eval``)
lists the run's checkpoints, and for each one that has no evaluation yet claims it on MLflow,
samples, evaluates, and records the result; without ``--every`` it exits after one pass. Run it
from cron or as a periodic ``ray job submit``; several watchers may run at once.

Claim protocol (MLflow has no create-if-absent and tags are last-writer-wins, docs/facts.md):

1. A watcher skips a checkpoint whose key already has a ``done`` or ``skipped`` run, or a live claim.
2. Otherwise it creates a *claim run* in the evaluation experiment (default ``vitdit-eval``) tagged
   with the checkpoint key and ``vitdit.eval.state = claimed``, waits ``settle`` seconds (longer than
   an MLflow request plus clock skew between watchers), and lists the claims of that key again.
3. Among the live claims (state ``claimed`` and a heartbeat younger than ``claim_timeout``), the one
   with the earliest ``(start_time, run_id)`` proceeds; every other claimant marks its own run
   ``withdrawn`` and moves on. If some claim is already ``done``, every claimant withdraws.
4. The winner refreshes ``vitdit.eval.heartbeat`` while it works, evaluates into its claim run (so
   the claim run *is* the evaluation run: metrics at the checkpoint's step, the JSON report, the
   grid), then sets the state to ``done`` (or ``failed``: a later pass tries again) and tags the
   training run with ``vitdit.eval.<step:08d> = <evaluation run id>``.
5. A claim whose heartbeat is older than ``claim_timeout`` with no result is stale (its watcher
   died): it no longer counts in step 3, so the next watcher takes the checkpoint over. Keep
   ``claim_timeout`` well above one heartbeat interval (a quarter of it).

Tags on the runs of the evaluation experiment:

=============================  ===================================================================
``vitdit.kind``                ``eval``
``vitdit.eval.checkpoint_key`` ``<training run id>@<step:08d>`` (``<abs run dir>@<step:08d>`` when
                               the checkpoint records no MLflow run)
``vitdit.eval.checkpoint``     the checkpoint directory
``vitdit.eval.step``           the checkpoint's step
``vitdit.eval.state``          ``claimed`` | ``done`` | ``failed`` | ``withdrawn`` | ``skipped``
``vitdit.eval.heartbeat``      milliseconds since the epoch, refreshed while the claim works
``vitdit.eval.watcher``        ``<host>:<pid>:<random>`` of the claimant
``vitdit.training_run_id``     the training run (also the link back from it, see step 4)
=============================  ===================================================================

A checkpoint that retention deleted before anyone evaluated it is skipped with a log line (and,
if it was claimed meanwhile, its claim marked ``skipped``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines import storage
from vitdit.checkpoint import CONFIG_NAME, read_config
from vitdit.errors import VitditError

log = logging.getLogger(__name__)

TAG_KIND = "vitdit.kind"
TAG_KEY = "vitdit.eval.checkpoint_key"
TAG_CHECKPOINT = "vitdit.eval.checkpoint"
TAG_STEP = "vitdit.eval.step"
TAG_STATE = "vitdit.eval.state"
TAG_HEARTBEAT = "vitdit.eval.heartbeat"
TAG_WATCHER = "vitdit.eval.watcher"
TAG_TRAINING_RUN = "vitdit.training_run_id"
CLAIMED, DONE, FAILED, WITHDRAWN, SKIPPED = "claimed", "done", "failed", "withdrawn", "skipped"
FINAL = (DONE, SKIPPED)


def parse_duration(text: str | float | int | None) -> float | None:
    """``"30m"``, ``"2h"``, ``"45s"``, ``"1d"`` or a number of seconds → seconds (None stays None)."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise VitditError(f"--every {text!r}: expected a duration such as 30m, 2h, 90s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@dataclass
class CheckpointRef:
    step: int
    path: str
    key: str
    training_run_id: str | None


# --- run directories on local disk or object storage ---------------------------------------------


def _remote(path: str | None) -> bool:
    return bool(path) and storage.is_uri(path) and not path.startswith("file://")


def _is_dir(path: str) -> bool:
    """A local directory, or a prefix on object storage that holds something."""
    return storage.exists(path) if _remote(path) else os.path.isdir(path)


def _checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``list_checkpoints`` for a local run directory or a run URI (s3://.../run)."""
    from pipelines.train.restore import list_checkpoints_any

    return list_checkpoints_any(run_dir)


def _config(checkpoint: str) -> dict:
    return (
        (storage.read_json(storage.join(checkpoint, CONFIG_NAME)) or {})
        if _remote(checkpoint)
        else read_config(checkpoint)
    )


def find_checkpoints(source: str, client=None) -> tuple[list[CheckpointRef], list[CheckpointRef]]:
    """(existing, deleted) checkpoints of a run directory or an MLflow training run id.

    A run id is resolved through the run's ``output`` param (its run directory) and its
    ``checkpoint.<step>`` tags (which also name checkpoints that retention has deleted since).
    """
    run_id, run_dir, tagged = None, None, {}
    if _is_dir(source):
        run_dir = source if _remote(source) else os.path.abspath(source)
    else:
        if client is None:
            raise VitditError(f"--watch {source!r}: no such directory (and no MLflow client for a run id)")
        try:
            run = client.get_run(source)
        except Exception as e:  # noqa: BLE001 - mlflow raises its own exception types
            raise VitditError(
                f"--watch {source!r}: neither a run directory nor an MLflow run id ({e})"
            ) from e
        run_id = run.info.run_id
        run_dir = run.data.params.get("output")
        for k, v in run.data.tags.items():
            if k.startswith("checkpoint.") and k[len("checkpoint.") :].isdigit():
                tagged[int(k[len("checkpoint.") :])] = v
    existing = {step: path for step, path in (_checkpoints(run_dir) if run_dir else [])}
    if run_id is None and existing:
        latest = existing[max(existing)]
        run_id = (_config(latest).get("mlflow") or {}).get("run_id")
    prefix = run_id or run_dir
    ref = lambda step, path: CheckpointRef(step, path, f"{prefix}@{step:08d}", run_id)
    found = [ref(s, p) for s, p in sorted(existing.items())]
    deleted = [ref(s, p) for s, p in sorted(tagged.items()) if s not in existing and not _is_dir(p)]
    return found, deleted


def store_of(source: str, tracking_uri: str | None = None) -> str:
    """The one MLflow store a watcher uses for its claims, the sampling and the evaluation.

    ``tracking_uri`` when given; else, for a run directory, the store its newest checkpoint
    recorded (where its training run lives, so the evaluations are linked to it); else
    ``$MLFLOW_TRACKING_URI`` or ./mlflow.db. Claiming in one store while logging into another
    would mark a checkpoint done whose metrics went nowhere.
    """
    from pipelines.tracking import resolve_tracking_uri

    if tracking_uri:
        return resolve_tracking_uri(tracking_uri)
    if _is_dir(source):
        found = _checkpoints(source)
        if found:
            recorded = (_config(found[-1][1]).get("mlflow") or {}).get("tracking_uri")
            if recorded:
                return resolve_tracking_uri(recorded)
    return resolve_tracking_uri(None)


class ClaimProtocol:
    """Exactly-once claims of checkpoint keys on an MLflow experiment (see the module docstring)."""

    def __init__(
        self, client, experiment: str, claim_timeout_s: float = 3600.0, settle_s: float = 2.0
    ) -> None:
        self.client = client
        self.experiment_id = self._experiment_id(experiment)
        self.claim_timeout_ms = int(claim_timeout_s * 1000)
        self.settle_s = settle_s
        self.watcher = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 - another watcher created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def claims(self, key: str) -> list:
        from mlflow.entities import ViewType

        key = key.replace("'", "\\'")
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_KEY}` = '{key}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
        )

    def _stale(self, run, now_ms: int) -> bool:
        beat = int(run.data.tags.get(TAG_HEARTBEAT) or run.info.start_time or 0)
        return now_ms - beat > self.claim_timeout_ms

    def status(self, key: str) -> str | None:
        """``done``/``skipped`` when finished, ``claimed`` while a live claim works, else None."""
        runs = self.claims(key)
        states = {r.data.tags.get(TAG_STATE) for r in runs}
        for s in FINAL:
            if s in states:
                return s
        now = int(time.time() * 1000)
        if any(r.data.tags.get(TAG_STATE) == CLAIMED and not self._stale(r, now) for r in runs):
            return CLAIMED
        return None

    def try_claim(self, ref: CheckpointRef) -> str | None:
        """Create a claim run for ``ref``; its run id if this watcher won, else None (withdrawn)."""
        if self.status(ref.key) is not None:
            return None
        now = int(time.time() * 1000)
        tags = {
            TAG_KIND: "eval",
            TAG_KEY: ref.key,
            TAG_CHECKPOINT: ref.path,
            TAG_STEP: str(ref.step),
            TAG_STATE: CLAIMED,
            TAG_HEARTBEAT: str(now),
            TAG_WATCHER: self.watcher,
        }
        if ref.training_run_id:
            tags[TAG_TRAINING_RUN] = ref.training_run_id
        run = self.client.create_run(
            self.experiment_id, start_time=now, tags=tags, run_name=f"eval-step-{ref.step:08d}"
        )
        mine = run.info.run_id
        time.sleep(self.settle_s)  # let concurrent claims land before comparing
        runs = self.claims(ref.key)
        if any(r.data.tags.get(TAG_STATE) in FINAL for r in runs):
            self.finish(mine, WITHDRAWN)
            return None
        now = int(time.time() * 1000)
        live = [
            r
            for r in runs
            if r.data.tags.get(TAG_STATE) == CLAIMED and (r.info.run_id == mine or not self._stale(r, now))
        ]
        winner = min(live, key=lambda r: (r.info.start_time, r.info.run_id))
        if winner.info.run_id != mine:
            log.info("step %d: claimed by %s first; withdrawing", ref.step, winner.info.run_id)
            self.finish(mine, WITHDRAWN)
            return None
        return mine

    def heartbeat(self, run_id: str) -> None:
        self.client.set_tag(run_id, TAG_HEARTBEAT, str(int(time.time() * 1000)))

    def finish(self, run_id: str, state: str) -> None:
        self.client.set_tag(run_id, TAG_STATE, state)
        status = {DONE: "FINISHED", SKIPPED: "FINISHED", FAILED: "FAILED"}.get(state, "KILLED")
        self.client.set_terminated(run_id, status=status)


class _Heartbeat:
    """Refreshes a claim's heartbeat from a thread while the evaluation runs."""

    def __init__(self, protocol: ClaimProtocol, run_id: str, every_s: float):
        self.protocol, self.run_id, self.every_s = protocol, run_id, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.protocol.heartbeat(self.run_id)
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the timeout is generous
                log.warning("heartbeat of claim %s failed: %s", self.run_id, e)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


EvaluateFn = Callable[[CheckpointRef, str], dict[str, Any] | None]


def watch(
    source: str,
    evaluate: EvaluateFn,
    *,
    tracking_uri: str | None = None,
    experiment: str = "vitdit-eval",
    every_s: float | None = None,
    claim_timeout_s: float = 3600.0,
    settle_s: float = 2.0,
    stop: threading.Event | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every checkpoint of ``source`` not yet evaluated; with ``every_s`` keep polling.

    ``evaluate(ref, run_id)`` samples and evaluates one checkpoint, logging into the MLflow run
    ``run_id`` (the claim run, in the store ``store_of(source, tracking_uri)``); it must raise when
    that logging fails, so the claim ends ``failed`` and a later pass retries. Returns one record
    per checkpoint this watcher handled.
    """
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import bound_http_waits

    bound_http_waits()
    client = MlflowClient(store_of(source, tracking_uri))
    protocol = ClaimProtocol(client, experiment, claim_timeout_s, settle_s)
    stop = stop or threading.Event()
    handled: list[dict[str, Any]] = []
    reported_deleted: set[str] = set()
    while True:
        found, deleted = find_checkpoints(source, client)
        for ref in deleted:
            if ref.key not in reported_deleted and protocol.status(ref.key) is None:
                log.info(
                    "step %d: checkpoint %s was deleted by retention before evaluation; skipped",
                    ref.step,
                    ref.path,
                )
                reported_deleted.add(ref.key)
        for ref in found:
            if stop.is_set():
                break
            record = _handle(protocol, client, ref, evaluate, claim_timeout_s)
            if record is not None:
                handled.append(record)
        if every_s is None or stop.wait(every_s):
            return handled


def _handle(protocol: ClaimProtocol, client, ref: CheckpointRef, evaluate: EvaluateFn, timeout: float):
    run_id = protocol.try_claim(ref)
    if run_id is None:
        return None
    if not _is_dir(ref.path):
        log.info(
            "step %d: checkpoint %s was deleted by retention before evaluation; skipped", ref.step, ref.path
        )
        protocol.finish(run_id, SKIPPED)
        return {"step": ref.step, "run_id": run_id, "state": SKIPPED}
    log.info("step %d: evaluating %s (MLflow run %s)", ref.step, ref.path, run_id)
    try:
        with _Heartbeat(protocol, run_id, max(timeout / 4, 0.5)):
            result = evaluate(ref, run_id)
    except Exception as e:
        if not _is_dir(ref.path):
            log.info(
                "step %d: checkpoint %s deleted by retention during evaluation; skipped", ref.step, ref.path
            )
            protocol.finish(run_id, SKIPPED)
            return {"step": ref.step, "run_id": run_id, "state": SKIPPED}
        log.exception("step %d: evaluation failed (a later pass retries): %s", ref.step, e)
        protocol.finish(run_id, FAILED)
        return {"step": ref.step, "run_id": run_id, "state": FAILED, "error": str(e)}
    protocol.finish(run_id, DONE)
    if ref.training_run_id:
        try:  # the link from the training run to its evaluations (docs/design.md, "MLflow")
            client.set_tag(ref.training_run_id, f"vitdit.eval.{ref.step:08d}", run_id)
        except Exception as e:  # noqa: BLE001 - the training run may live on another server
            log.warning("could not tag training run %s: %s", ref.training_run_id, e)
    return {"step": ref.step, "run_id": run_id, "state": DONE, "result": result}


# --- the watch job (`vitdit evaluate --watch`) ------------------------------------------------------

# Flags that the sampling and evaluation configs share or that watch mode sets per checkpoint.
_SAMPLE_SKIP = ("checkpoint", "output", "mlflow_run_id", "mlflow", "tracking_uri", "experiment", "overwrite")
_EVAL_SKIP = (
    "samples",
    "mlflow_run",
    "step",
    "report",
    "mlflow",
    "tracking_uri",
    "experiment",
    "vae",
    "batch_size",
)


@dataclasses.dataclass
class WatchConfig:
    watch: str = dataclasses.field(metadata={"help": "training run directory or MLflow run id"})
    every: str | None = dataclasses.field(
        default=None, metadata={"help": "keep polling, e.g. 30m (default: one pass)"}
    )
    samples_root: str | None = dataclasses.field(
        default=None, metadata={"help": "where samples go (default: RUN_DIR/eval_samples)"}
    )
    claim_timeout: str = dataclasses.field(
        default="2h", metadata={"help": "a claim without heartbeat this long is stale"}
    )
    tracking_uri: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "MLflow store for claims, samples and metrics (default: the one the run's checkpoints "
            "recorded, else $MLFLOW_TRACKING_URI, else ./mlflow.db)"
        },
    )
    experiment: str = dataclasses.field(
        default="vitdit-eval", metadata={"help": "MLflow experiment of the claim (= evaluation) runs"}
    )


def run_watch(args: argparse.Namespace) -> int:
    """``vitdit evaluate --watch``: sample and evaluate each unclaimed checkpoint; 1 if one failed."""
    from pipelines.evaluate import EvalConfig, run_evaluation
    from pipelines.sample import SampleConfig, run_sampling

    values = vars(args)
    for flag in ("reference", "classifier"):
        if not values.get(flag):
            raise VitditError(f"--{flag} is required with --watch")
    pick = lambda cls, skip: {
        f.name: values[f.name] for f in dataclasses.fields(cls) if f.name not in skip and f.name in values
    }

    # One store for the claims, the sampling and the evaluation (store_of says which).
    uri = store_of(args.watch, args.tracking_uri)
    print(f"watching {args.watch}; claims and results in MLflow at {uri}")

    def evaluate(ref, run_id):
        if _remote(ref.path):  # s3://.../run/checkpoint_N → s3://.../run/eval_samples/checkpoint_N
            parent, name = ref.path.rstrip("/").rsplit("/", 1)
            out = storage.join(args.samples_root or storage.join(parent, "eval_samples"), name)
        else:
            root = args.samples_root or os.path.join(os.path.dirname(ref.path), "eval_samples")
            out = os.path.join(root, os.path.basename(ref.path))
        common = {"tracking_uri": uri, "mlflow": True}
        run_sampling(SampleConfig(**pick(SampleConfig, _SAMPLE_SKIP), checkpoint=ref.path, output=out, mlflow_run_id=run_id, **common))  # fmt: skip
        report = run_evaluation(EvalConfig(**pick(EvalConfig, _EVAL_SKIP), samples=out, mlflow_run=run_id, step=ref.step, vae=values.get("vae"), **common))  # fmt: skip
        return report["metrics"]

    handled = watch(
        args.watch, evaluate, tracking_uri=uri, experiment=args.experiment,
        every_s=parse_duration(args.every), claim_timeout_s=parse_duration(args.claim_timeout),
    )  # fmt: skip
    for r in handled:
        print(f"step {r['step']}: {r['state']} (MLflow run {r['run_id']})")
    if not handled:
        print("nothing to evaluate: every checkpoint has an evaluation or a live claim")
    return 1 if any(r["state"] == "failed" for r in handled) else 0
