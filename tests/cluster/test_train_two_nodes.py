"""`vitdit train dit --num-workers 2` on two Ray nodes through the job API.

- ``--placement spread`` puts one worker on each node; ``pack`` (Ray Train's default) puts both on
  one. The spread run's worker node is SIGKILLed after the first checkpoint: Ray Train
  (``FailureConfig(max_failures=1)``) restarts the worker group from that checkpoint on the node
  that is left (the two 0.5-CPU workers fit there), every step is done and no step reaches MLflow
  twice; and it ends with the pack run's weights and MLflow metrics (data-parallel training does not
  depend on where its ranks run, and the restart is exact). One test, two fits: ~80 s of the default run.
- No room left after the node loss: the job stops with the line that says how to resume (the unit
  form in the default run, end to end in ``slow``, ~90 s).
"""

from __future__ import annotations

import io
import os
import time

import pytest
import torch
from _train_utils import read_train_log, write_digit_latents
from safetensors.torch import load_file

from pipelines.submit import _client, submit, wait_for_job

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.ray
STEPS = 60


@pytest.fixture(scope="module")
def latents(tiny_vae_dir, tmp_path_factory):
    return write_digit_latents(str(tmp_path_factory.mktemp("latents") / "digits"), tiny_vae_dir)


def train_args(
    latents: str, out: str, mlflow: str, experiment: str, placement: str, cpus: float
) -> list[str]:
    return [
        "--latents", latents, "--model", "DiT-test/2", "--output", out,
        "--val-fraction", "0.1", "--grid-samples", "2", "--grid-steps", "2",
        "--steps", str(STEPS), "--global-batch-size", "32", "--lr", "2e-3", "--ema-decay", "0.9",
        "--num-workers", "2", "--cpus-per-worker", str(cpus), "--placement", placement,
        "--precision", "fp32", "--checkpoint-every", "20", "--keep-checkpoints", "3", "--log-every", "5", "--eval-every", str(STEPS),
        "--tracking-uri", mlflow, "--experiment", experiment,
    ]  # fmt: skip


def worker_nodes(address: str, submission_id: str) -> list[str | None]:
    """Node ids of a job's Ray Train workers (every worker group it started), from the state API."""
    from ray.util.state import list_actors

    job_id = _client(address).get_job_info(submission_id).job_id
    actors = list_actors(address=address, filters=[("job_id", "=", job_id)], limit=1000,
                         raise_on_missing_output=False, detail=True)  # fmt: skip
    return [a.node_id for a in actors if "RayTrainWorker" in a.class_name]


def run_metrics(mlflow: str, experiment: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(mlflow)
    (run,) = client.search_runs(client.get_experiment_by_name(experiment).experiment_id)
    assert run.info.status == "FINISHED"
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in ("train/loss", "train/grad_norm", "val/loss")
    }


def weights(out: str, step: int) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, f"checkpoint_{step:08d}", "model.safetensors"))


def test_spread_and_pack_train_alike_and_a_node_killed_mid_training_resumes_on_the_node_left(
    two_nodes, latents, mlflow_server, tmp_path
):
    """``--placement pack`` puts both workers on one node, uninterrupted. ``spread`` puts one on each
    node; its worker node is SIGKILLed after checkpoint 20 and Ray Train restarts the group on the head
    from that checkpoint. Both end with the same weights and the same MLflow metrics, each step once:
    where the ranks ran, and the node loss, change nothing (the restart on a cluster of half the CPUs
    reads the same blocks: pipelines/latents.py, read_parquet_parts)."""
    pack_out = str(tmp_path / "pack")
    log = io.StringIO()
    pack_args = train_args(latents, pack_out, mlflow_server, "two-nodes-pack", "pack", 0.5)
    pack = submit(two_nodes.address, "train_dit", pack_args, working_dir=ROOT, out=log, timeout_s=300)
    assert pack.status == "SUCCEEDED", log.getvalue()[-3000:]
    pack_nodes = worker_nodes(two_nodes.address, pack.submission_id)
    assert len(pack_nodes) == 2 and len(set(pack_nodes)) == 1, pack_nodes

    out = str(tmp_path / "dit")
    experiment = "two-nodes-node-loss"
    args = train_args(latents, out, mlflow_server, experiment, "spread", 0.5)
    first = submit(two_nodes.address, "train_dit", args, working_dir=ROOT, wait=False, out=None)
    ckpt = os.path.join(out, "checkpoint_00000020")
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(ckpt, "config.json")):  # the checkpoint's last file
        assert time.time() < deadline, "no checkpoint in 240 s"
        time.sleep(0.1)
    before = worker_nodes(two_nodes.address, first.submission_id)
    assert set(before) == two_nodes.alive_node_ids(), before  # spread: one worker per node
    killed_at = time.time()
    dead_after = two_nodes.kill_worker(two_nodes.workers[-1])
    log = io.StringIO()
    outcome = wait_for_job(_client(two_nodes.address), first.submission_id, out=log, timeout_s=300)
    print(f"GCS marked the node dead in {dead_after:.1f} s; the job ended {time.time() - killed_at:.0f} s "
          f"after the kill: {outcome.status}")  # fmt: skip
    assert outcome.status == "SUCCEEDED", log.getvalue()[-3000:]
    after = worker_nodes(two_nodes.address, first.submission_id)
    survivors = two_nodes.alive_node_ids()
    # The first group's rank on the head, then the restarted group's two ranks, both on the head.
    assert len(after) >= 4 and sum(n in survivors for n in after) >= 3, after
    assert os.path.isdir(os.path.join(out, f"checkpoint_{STEPS:08d}"))
    losses = read_train_log(out)  # raises on a step logged twice
    assert sorted(losses) == list(range(5, STEPS + 1, 5))
    metrics = run_metrics(mlflow_server, experiment)
    steps = [s for s, _ in metrics["train/loss"]]
    assert steps == list(range(5, STEPS + 1, 5)), steps  # every step once in MLflow
    # The same run as the uninterrupted one on one node: same checkpoints, weights, metrics.
    assert sorted(os.listdir(out)) == sorted(os.listdir(pack_out))
    for step in (20, STEPS):
        a, b = weights(out, step), weights(pack_out, step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    assert metrics == run_metrics(mlflow_server, "two-nodes-pack")


@pytest.mark.slow
@pytest.mark.heavy
def test_node_lost_with_no_room_left_stops_with_how_to_resume_and_the_resume_finishes(
    two_nodes, latents, mlflow_server, tmp_path
):
    """End to end: the one training worker needs 3 CPUs, which only an added 3-CPU node (logical CPUs)
    has; the head and the other worker node (2 each) run the data stream. That node is killed: no node
    left has room, so after --node-wait-s the job stops with the line that says how to resume. A
    replacement node joins, the same command with --resume finishes the run, every step logged once."""
    out = str(tmp_path / "dit")
    experiment = "two-nodes-no-room"
    args = train_args(latents, out, mlflow_server, experiment, "pack", 3)
    args[args.index("--num-workers") + 1] = "1"
    args += ["--node-wait-s", "10"]  # with the nodes' 5 s worker-group start timeout: 2 tries
    big = two_nodes.start_worker(num_cpus=3)
    first = submit(two_nodes.address, "train_dit", args, working_dir=ROOT, wait=False, out=None)
    ckpt = os.path.join(out, "checkpoint_00000020")
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(ckpt, "config.json")):
        assert time.time() < deadline, "no checkpoint in 240 s"
        time.sleep(0.1)
    killed_at = time.time()
    two_nodes.kill_worker(big)
    log = io.StringIO()
    outcome = wait_for_job(_client(two_nodes.address), first.submission_id, out=log, timeout_s=300)
    stopped_after = time.time() - killed_at
    print(
        f"no room after the node loss: the job ended {stopped_after:.0f} s after the kill: {outcome.status}"
    )
    assert outcome.status == "FAILED", log.getvalue()[-3000:]
    text = log.getvalue()
    assert "training stopped: the cluster had no room for --num-workers 1 × --cpus-per-worker 3" in text, (
        text[-3000:]
    )
    assert f"--resume {out}" in text and "checkpoint_000000" in text
    assert "Traceback" not in text.split("training stopped:")[-1]  # the line, not a stack dump, ends it
    assert stopped_after < 120
    # As the line says: once the cluster has room again, the same command with --resume.
    two_nodes.start_worker(num_cpus=3)
    rerun_log = io.StringIO()
    again = submit(two_nodes.address, "train_dit", [*args, "--resume", out], working_dir=ROOT, out=rerun_log,
                   timeout_s=300, submission_id=first.submission_id + "-resume")  # fmt: skip
    assert again.status == "SUCCEEDED", rerun_log.getvalue()[-3000:]
    assert os.path.isdir(os.path.join(out, f"checkpoint_{STEPS:08d}"))
    assert sorted(read_train_log(out)) == list(range(5, STEPS + 1, 5))  # raises on a step logged twice


def test_no_room_to_restart_stops_with_how_to_resume(tmp_path):
    """What fit raises when the workers found no room within --node-wait-s becomes one line that says
    how to resume; the unit form of the slow end-to-end test above (fast, in the default run)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    from pipelines.train.loop import TrainConfig, _raise_if_no_room
    from vitdit.errors import VitditError

    os.makedirs(tmp_path / "checkpoint_00000020")
    (tmp_path / "checkpoint_00000020" / "config.json").write_text("{}")
    cfg = TrainConfig(output=str(tmp_path), steps=60, num_workers=2, cpus_per_worker=0.5, node_wait_s=30)
    error = ControllerError(WorkerGroupStartupTimeoutError(num_workers=2))
    with pytest.raises(VitditError) as info:
        _raise_if_no_room(error, cfg)
    message = str(info.value)
    assert "no room for --num-workers 2 × --cpus-per-worker 0.5 for --node-wait-s 30 s" in message
    assert f"--resume {tmp_path}" in message and "checkpoint_00000020" in message
    _raise_if_no_room(RuntimeError("a bug"), cfg)  # anything else is left alone
