"""Scheduled evaluation's claim protocol against a real `mlflow server` (the evaluation is a recorder)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest

from pipelines import scheduled_eval as se
from vitdit.checkpoint import checkpoint_name


def _fake_run_dir(root, steps, training_run_id):
    """Checkpoint directories with only config.json: the protocol reads nothing else."""
    for s in steps:
        d = root / checkpoint_name(s)
        d.mkdir(parents=True)
        (d / "config.json").write_text(
            json.dumps({"kind": "dit", "step": s, "mlflow": {"run_id": training_run_id}})
        )
    return str(root)


@pytest.fixture
def training_run(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("vitdit-dit") or client.get_experiment(
        client.create_experiment("vitdit-dit")
    )
    return client, client.create_run(exp.experiment_id).info.run_id


class Recorder:
    def __init__(self, delay=0.2):
        self.calls, self.lock, self.delay = [], threading.Lock(), delay

    def __call__(self, ref, run_id):
        with self.lock:
            self.calls.append((ref.step, run_id, threading.current_thread().name))
        time.sleep(self.delay)
        return {"eval/fake": float(ref.step)}


def test_parse_duration():
    assert (
        se.parse_duration("30m") == 1800 and se.parse_duration("2h") == 7200 and se.parse_duration("45") == 45
    )
    assert se.parse_duration(None) is None
    with pytest.raises(se.VitditError, match="--every"):
        se.parse_duration("soon")


def test_two_watchers_at_once_evaluate_each_checkpoint_exactly_once(
    mlflow_server, training_run, tmp_path, caplog
):
    client, train_id = training_run
    run_dir = _fake_run_dir(tmp_path / "run", [100, 200, 300], train_id)
    # Retention deleted step 50 before anyone evaluated it; the training run still names it.
    client.set_tag(train_id, "checkpoint.00000050", str(tmp_path / "run" / checkpoint_name(50)))
    recorder = Recorder()
    barrier = threading.Barrier(2)
    results, errors = {}, []
    experiment = f"eval-{tmp_path.name}"

    def watcher(name, source):
        try:
            barrier.wait()
            results[name] = se.watch(
                source, recorder, tracking_uri=mlflow_server, experiment=experiment, settle_s=0.5
            )
        except Exception as e:  # surfaced below
            errors.append(e)

    caplog.set_level(logging.INFO, logger="pipelines.scheduled_eval")
    # One watcher is given the run directory, the other the MLflow run id: the same keys.
    threads = [
        threading.Thread(target=watcher, args=("a", run_dir), name="a"),
        threading.Thread(target=watcher, args=("b", train_id), name="b"),
    ]
    client.log_param(train_id, "output", run_dir)
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    steps = sorted(step for step, _, _ in recorder.calls)
    assert steps == [100, 200, 300], recorder.calls
    done = [r for rs in results.values() for r in rs if r["state"] == "done"]
    assert sorted(r["step"] for r in done) == [100, 200, 300]
    assert "deleted by retention" in caplog.text and "checkpoint_00000050" in caplog.text

    # The evaluation runs are tagged, and the training run links to them.
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string="tags.`vitdit.eval.state` = 'done'",
    )
    assert sorted(int(r.data.tags[se.TAG_STEP]) for r in runs) == [100, 200, 300]
    assert all(r.data.tags[se.TAG_TRAINING_RUN] == train_id for r in runs)
    tags = client.get_run(train_id).data.tags
    assert {tags[f"vitdit.eval.{s:08d}"] for s in (100, 200, 300)} == {r.info.run_id for r in runs}

    # A later pass (cron) finds nothing to do; a new checkpoint is evaluated once.
    _fake_run_dir(tmp_path / "run", [400], train_id)
    again = se.watch(run_dir, recorder, tracking_uri=mlflow_server, experiment=experiment, settle_s=0.1)
    assert [r["step"] for r in again] == [400]
    assert sorted(step for step, _, _ in recorder.calls) == [100, 200, 300, 400]


def test_stale_claim_is_taken_over_and_failure_is_retried(mlflow_server, training_run, tmp_path):
    client, train_id = training_run
    run_dir = _fake_run_dir(tmp_path / "run", [10], train_id)
    experiment = f"eval-{tmp_path.name}"
    protocol = se.ClaimProtocol(client, experiment, claim_timeout_s=60.0, settle_s=0.1)
    ref = se.find_checkpoints(run_dir)[0][0]
    # A watcher that died mid-evaluation left a claim behind.
    dead = protocol.try_claim(ref)
    assert dead is not None and protocol.status(ref.key) == "claimed"
    recorder = Recorder(delay=0)
    kwargs = dict(tracking_uri=mlflow_server, experiment=experiment, claim_timeout_s=60.0, settle_s=0.1)
    assert se.watch(run_dir, recorder, **kwargs) == [] and recorder.calls == []  # still live: left alone
    # Its heartbeat stops: two minutes later the claim is stale.
    client.set_tag(dead, se.TAG_HEARTBEAT, str(int(time.time() * 1000) - 120_000))
    assert protocol.status(ref.key) is None

    def failing(ref, run_id):
        raise RuntimeError("out of memory")

    assert [r["state"] for r in se.watch(run_dir, failing, **kwargs)] == ["failed"]
    out = se.watch(run_dir, recorder, **kwargs)  # the failure is retried; the stale claim ignored
    assert [r["state"] for r in out] == ["done"] and [c[0] for c in recorder.calls] == [10]
    assert protocol.status(ref.key) == "done"


def test_checkpoint_deleted_after_listing_is_skipped(mlflow_server, training_run, tmp_path, caplog):
    client, train_id = training_run
    run_dir = _fake_run_dir(tmp_path / "run", [7], train_id)
    ref = se.find_checkpoints(run_dir)[0][0]

    def deleting_evaluate(ref, run_id):  # retention runs while the evaluation loads the checkpoint
        import shutil

        shutil.rmtree(ref.path)
        raise FileNotFoundError(os.path.join(ref.path, "ema.safetensors"))

    caplog.set_level(logging.INFO, logger="pipelines.scheduled_eval")
    out = se.watch(
        run_dir, deleting_evaluate, tracking_uri=mlflow_server, experiment=f"e-{tmp_path.name}", settle_s=0.1
    )
    assert [r["state"] for r in out] == ["skipped"]
    assert "deleted by retention" in caplog.text
    protocol = se.ClaimProtocol(client, f"e-{tmp_path.name}")
    assert protocol.status(ref.key) == "skipped"


def test_one_store_per_watcher_derived_from_the_run(mlflow_server, training_run, tmp_path, monkeypatch):
    """Without --tracking-uri a watcher claims where the checkpoints' training run lives, not in
    ./mlflow.db (claims in one store and results in another lost every evaluation's metrics)."""
    client, train_id = training_run
    root = tmp_path / "run"
    run_dir = _fake_run_dir(root, [10], train_id)
    config = root / checkpoint_name(10) / "config.json"
    config.write_text(
        json.dumps({"kind": "dit", "step": 10, "mlflow": {"run_id": train_id, "tracking_uri": mlflow_server}})
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert se.store_of(run_dir) == mlflow_server
    assert se.store_of(run_dir, "sqlite:///other.db") == f"sqlite:///{tmp_path / 'other.db'}"  # explicit wins
    assert se.store_of(str(tmp_path / "empty")) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = f"eval-{tmp_path.name}"
    (record,) = se.watch(run_dir, Recorder(delay=0), experiment=experiment, settle_s=0.1)
    assert record["state"] == "done"
    assert client.get_run(record["run_id"]).data.tags[se.TAG_STATE] == "done"  # on the training run's server
    assert client.get_run(train_id).data.tags["vitdit.eval.00000010"] == record["run_id"]
    assert not (tmp_path / "mlflow.db").exists()


def test_logging_into_a_given_run_that_fails_is_an_error_not_a_warning(tmp_path):
    """Scheduled evaluation hands sampling and evaluation its claim run: if logging there fails, the
    evaluation must fail (claim retryable), not report success with the metrics lost."""
    from pipelines.evaluate import EvalConfig, log_evaluation

    report_path = tmp_path / "report.json"
    report_path.write_text("{}")
    report = {
        "step": 10, "metrics": {"eval/fd": 1.0}, "extractor": {"sha256": "x", "checkpoint": "c"},
        "reference": "r", "inception_weights_sha256": None, "report_path": str(report_path),
    }  # fmt: skip
    cfg = EvalConfig(samples=str(tmp_path), reference="r", classifier="c", mlflow_run="no-such-run",
                     tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")  # fmt: skip
    with pytest.raises(se.VitditError, match="no-such-run"):
        log_evaluation(cfg, report, {})
    # A standalone evaluation (no run given) keeps its report and only warns.
    assert log_evaluation(EvalConfig(samples=str(tmp_path), reference="r", classifier="c",
                                     tracking_uri="sqlite:////proc/no-such-dir/m.db"), report, {}) is None  # fmt: skip


_DYING_WATCHER = """
import sys, time
from pipelines import scheduled_eval as se

run_dir, uri, experiment, started = sys.argv[1:5]

def slow(ref, run_id):
    open(started, "w").write(run_id)
    time.sleep(600)  # killed long before this ends

se.watch(run_dir, slow, tracking_uri=uri, experiment=experiment, claim_timeout_s=4.0, settle_s=0.1)
"""


def test_watcher_killed_mid_evaluation_its_claim_is_taken_over_after_the_timeout(
    mlflow_server, training_run, tmp_path
):
    """A watcher process SIGKILLed mid-evaluation (what its node's death does to it: no cleanup, no
    final tag) leaves a live-looking claim; a restarted watcher leaves it alone while its heartbeat is
    younger than the claim timeout, then takes it over, and every checkpoint is evaluated exactly once."""
    import signal
    import subprocess
    import sys

    client, train_id = training_run
    run_dir = _fake_run_dir(tmp_path / "run", [10, 20], train_id)
    experiment = f"eval-{tmp_path.name}"
    started = tmp_path / "started"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", _DYING_WATCHER, run_dir, mlflow_server, experiment, str(started)],
        cwd=root, start_new_session=True, env={**os.environ, "PYTHONPATH": root},
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not started.exists():
            assert proc.poll() is None, f"the watcher exited with {proc.returncode} before evaluating"
            assert time.time() < deadline, "the watcher never started an evaluation"
            time.sleep(0.1)
        time.sleep(1.5)  # a heartbeat or two (every claim_timeout / 4 = 1 s)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    killed_at = time.time()
    dead_claim = started.read_text()
    protocol = se.ClaimProtocol(client, experiment, claim_timeout_s=4.0)
    ref10 = next(r for r in se.find_checkpoints(run_dir)[0] if r.step == 10)
    assert client.get_run(dead_claim).data.tags[se.TAG_STEP] == "10"

    # The restarted watcher: step 20 (never reached) at once; step 10 only once its claim is stale.
    recorder = Recorder(delay=0)
    kwargs = dict(tracking_uri=mlflow_server, experiment=experiment, claim_timeout_s=4.0, settle_s=0.1)
    first = se.watch(run_dir, recorder, **kwargs)
    assert [r["step"] for r in first] == [20], first
    taken_over = None
    while taken_over is None:
        assert time.time() < killed_at + 30, "the dead watcher's claim was never taken over"
        if [r["step"] for r in se.watch(run_dir, recorder, **kwargs)] == [10]:
            taken_over = time.time() - killed_at
        time.sleep(0.2)
    # Its last heartbeat was at most 1 s before the kill: stale after 3-4 s, never before.
    assert 2.5 < taken_over < 4.0 + 10, taken_over
    print(f"claim taken over {taken_over:.1f} s after the watcher was killed (claim timeout 4 s)")
    assert sorted(step for step, _, _ in recorder.calls) == [10, 20]
    done = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string="tags.`vitdit.eval.state` = 'done'",
    )
    assert sorted(int(r.data.tags[se.TAG_STEP]) for r in done) == [10, 20]
    assert dead_claim not in {r.info.run_id for r in done}
    assert client.get_run(dead_claim).data.tags[se.TAG_STATE] == se.CLAIMED  # nobody wrote for the dead one
    assert protocol.status(ref10.key) == se.DONE
