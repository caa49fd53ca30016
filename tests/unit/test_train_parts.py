"""The training loop's parts without Ray: the worker plan, the resume choice, restoring a checkpoint,
one train step, the metric sink's exactly-once logging (with the backfill of steps a killed run had
not sent to MLflow), and a size check that keeps every function in pipelines/train/ readable."""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import pickle

import pytest
import torch
import torch.nn as nn

from pipelines.train.mlflow_logger import AsyncRunLogger
from pipelines.train.plan import WorkerPlan, batch_plan, build_worker_plan, check_config
from pipelines.train.restore import (
    checkpoints_of_this_fit,
    choose_resume_dir,
    data_position,
    load_training_state,
    restart_checkpoint,
    resume_config,
)
from pipelines.train.save import make_config_json, make_train_state, write_checkpoint, write_pointer
from pipelines.train.sink import LastLogged, MetricSink, backfill_on_resume, log_file_rows, train_metrics
from pipelines.train.step import StepParts, train_step
from pipelines.train.task import POINTER_NAME, TrainConfig, TrainTask
from tests._tolerance import reassociation_rtol
from vitdit.checkpoint import capture_rng_state, checkpoint_name, list_checkpoints, load_checkpoint
from vitdit.errors import VitditError

TRAIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "pipelines" / "train"
MAX_FUNCTION_LINES = 80


def test_no_function_in_pipelines_train_exceeds_80_lines():
    too_long = []
    for path in sorted(TRAIN_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, "functions over 80 lines: " + ", ".join(too_long)


def test_every_name_other_code_imports_from_loop_is_still_there():
    from pipelines.train.loop import (  # noqa: F401
        NonFiniteLossError,
        TrainConfig,
        TrainTask,
        _Background,
        _logged_rows,
        _start_warm_up,
        _ValidationBatches,
        batch_plan,
        enable_grad_checkpointing,
        make_optimizer,
        prepare_for_precision,
        probe_precision,
        resolve_precision,
        run_training,
    )


# --- the plan --------------------------------------------------------------------------------------


class _Task(TrainTask):
    """A regression task on a linear model: small enough to train a step in microseconds."""

    kind = "test"
    num_train_rows = 100

    def build_model(self) -> nn.Module:
        return nn.Linear(3, 2)

    def model_config(self) -> dict:
        return {"model_name": "linear-3-2"}

    def loss(self, model, batch, generator):
        err = model(batch["x"]) - batch["y"]
        return (err**2).mean(), {"abs_err": float(err.detach().abs().mean())}


def _plan(tmp_path, **cfg_kwargs) -> WorkerPlan:
    cfg = TrainConfig(output=str(tmp_path), **cfg_kwargs)
    check_config(cfg)
    return build_worker_plan(
        _Task(), cfg, has_val=False, resume_dir=None, run_id=None, tracking_uri=None, last_logged=LastLogged()
    )


def test_batch_plan_splits_the_global_batch_and_refuses_what_does_not_divide():
    assert batch_plan(64, 2, None) == (32, 1)
    assert batch_plan(64, 2, 8) == (8, 4)
    with pytest.raises(VitditError, match="not divisible by --num-workers 3"):
        batch_plan(64, 3, None)
    with pytest.raises(VitditError, match="--micro-batch-size 12 does not divide the per-worker share 32"):
        batch_plan(64, 2, 12)
    with pytest.raises(VitditError, match="--keep-checkpoints 0"):
        check_config(TrainConfig(output="x", keep_checkpoints=0))


def test_worker_plan_is_frozen_picklable_and_records_the_run_directory(tmp_path):
    (tmp_path / checkpoint_name(5)).mkdir()
    (tmp_path / checkpoint_name(5) / "config.json").write_text("{}")
    plan = _plan(tmp_path, global_batch_size=64, num_workers=2, micro_batch_size=16, cache_rows=50)
    assert (plan.micro, plan.accum) == (16, 2)
    assert plan.cache_data  # 100 rows over 2 workers: 50 each, at most --cache-rows
    assert plan.preexisting_checkpoints == (checkpoint_name(5),)
    assert plan.log_path == str(tmp_path / "train_log.jsonl")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.micro = 8
    assert pickle.loads(pickle.dumps(plan)).cfg == plan.cfg
    uri = build_worker_plan(
        _Task(),
        TrainConfig(output="s3://bucket/run", cache_rows=10),
        has_val=True,
        resume_dir=None,
        run_id="r",
        tracking_uri="sqlite:///x.db",
        last_logged=LastLogged(3, 4),
    )
    assert uri.log_path is None and uri.preexisting_checkpoints == () and not uri.cache_data


# --- the resume choice and restoring -----------------------------------------------------------------


def _write_checkpoints(run_dir, steps, kind="test") -> nn.Module:
    """Checkpoints of a linear model at ``steps``, as the loop writes them (with retention)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    cfg = TrainConfig(output=str(run_dir), keep_checkpoints=10)
    for step in steps:
        state = make_train_state(
            step, data_epoch=1, data_batches_in_epoch=3, world=1, micro=4, cfg=cfg, optimizer=optimizer
        )
        config = make_config_json({"model_name": "linear"}, kind, step, {"run_id": None})
        write_checkpoint(str(run_dir), step, config, model.state_dict(), model.state_dict(), state, cfg)
    return model


def test_resume_choice_prefers_the_flag_then_the_run_directory_latest(tmp_path):
    run = tmp_path / "run"
    _write_checkpoints(run, (3, 7))
    assert choose_resume_dir(None, str(run)).endswith(checkpoint_name(7))  # a re-run continues
    assert choose_resume_dir(str(run / checkpoint_name(3)), str(run)).endswith(checkpoint_name(3))
    assert choose_resume_dir(str(run), str(tmp_path / "new")).endswith(checkpoint_name(7))
    assert choose_resume_dir(None, str(tmp_path / "new")) is None  # a new run
    # An s3:// run's latest checkpoint is found too (listed in the bucket: tests/s3/test_s3_pipeline.py).
    assert choose_resume_dir(None, "file://" + str(run)).endswith(checkpoint_name(7))
    with pytest.raises(VitditError, match="neither a checkpoint directory nor a run directory"):
        choose_resume_dir(str(tmp_path / "missing"), str(run))
    assert resume_config(None, "test") == {}
    assert resume_config(str(run / checkpoint_name(7)), "test")["step"] == 7
    with pytest.raises(VitditError, match=r"checkpoint_00000007: a test checkpoint, not dit"):
        resume_config(str(run / checkpoint_name(7)), "dit")


def test_a_restarted_worker_takes_the_newest_of_rays_checkpoint_and_this_fits_own(tmp_path):
    run = tmp_path / "run"
    _write_checkpoints(run, (2,))
    before = [p.split("/")[-1] for _, p in list_checkpoints(run)]
    _write_checkpoints(run, (4, 6))  # written by this fit
    own = checkpoints_of_this_fit(str(run), before)
    assert [p.split("/")[-1] for p in own] == [checkpoint_name(4), checkpoint_name(6)]
    older = str(run / checkpoint_name(4))  # Ray had not collected the report of step 6
    assert restart_checkpoint(older, own, str(run / checkpoint_name(2))).endswith(checkpoint_name(6))
    assert restart_checkpoint(None, [], str(run / checkpoint_name(2))).endswith(checkpoint_name(2))
    assert restart_checkpoint(None, [], None) is None
    pointer = write_pointer(older, 4)
    assert json.loads(pathlib.Path(pointer, POINTER_NAME).read_text()) == {"path": older, "step": 4}


def test_data_position_replays_the_epoch_only_with_the_same_batch_layout():
    state = {"step": 9, "data_epoch": 2, "data_batches_in_epoch": 5, "num_workers": 2, "micro_batch_size": 8}
    assert data_position(state, world=2, micro=8) == (9, 2, 5)
    assert data_position(state, world=1, micro=8) == (9, 3, 0)
    assert data_position(state, world=2, micro=4) == (9, 3, 0)
    assert data_position({"step": 4}, world=3, micro=2) == (4, 0, 0)  # an older checkpoint


def test_restore_loads_weights_ema_optimizer_and_rng(tmp_path):
    model = _write_checkpoints(tmp_path, (5,))
    torch.manual_seed(123)
    expected_draw = torch.rand(3)  # the RNG the checkpoint saved, one draw further
    torch.manual_seed(123)
    rng = capture_rng_state()
    state = load_checkpoint(tmp_path / checkpoint_name(5))
    state.train_state["rng"] = rng
    fresh, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    torch.manual_seed(999)
    load_training_state(state, fresh, ema, optimizer)
    assert torch.equal(torch.rand(3), expected_draw)
    for p, q, r in zip(fresh.parameters(), ema.parameters(), model.parameters()):
        assert torch.equal(p, r) and torch.equal(q, r)
    assert int(optimizer.state_dict()["state"][0]["step"]) == 1


# --- one train step ---------------------------------------------------------------------------------


class _Batches:
    def __init__(self, batches):
        self.batches, self.epoch, self.batches_in_epoch = list(batches), 0, 0

    def next(self):
        self.batches_in_epoch += 1
        return self.batches.pop(0)


def _step(batches, accum, cfg, inject_nan=False):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    parts = StepParts(
        _Task(), model, model, optimizer, None, _Batches(batches), torch.device("cpu"), accum, 0, 1, False
    )
    return model, train_step(parts, cfg, 1, inject_nan=inject_nan)


def test_accumulated_micro_batches_make_the_step_of_the_whole_batch():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
    cfg = TrainConfig(output="x", lr=0.5, grad_clip=0.0, steps=10)
    whole, out1 = _step([{"x": x, "y": y}], 1, cfg)
    split, out2 = _step([{"x": x[:4], "y": y[:4]}, {"x": x[4:], "y": y[4:]}], 2, cfg)
    rtol = reassociation_rtol(n=8, layers=2)
    assert out2.loss == pytest.approx(out1.loss, rel=rtol)
    assert out2.grad_norm == pytest.approx(out1.grad_norm, rel=rtol)
    assert set(out2.extras) == {"abs_err"} and out2.extras["abs_err"] == pytest.approx(
        out1.extras["abs_err"], rel=rtol
    )
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * float(a.abs().max()))
    torch.manual_seed(0)
    assert not torch.allclose(whole.weight, nn.Linear(3, 2).weight)  # the step did update


def test_a_nonfinite_loss_stops_the_step_without_an_update():
    cfg = TrainConfig(output="x", lr=0.5, steps=10)
    model, out = _step([{"x": torch.ones(4, 3), "y": torch.zeros(4, 2)}], 1, cfg, inject_nan=True)
    torch.manual_seed(0)
    untouched = nn.Linear(3, 2)
    assert out.nonfinite and out.grad_norm is None and out.loss != out.loss
    assert torch.equal(model.weight, untouched.weight) and torch.equal(model.bias, untouched.bias)


def test_train_metrics_count_every_worker_against_one_devices_peak():
    m = train_metrics(
        loss=0.5, lr=1e-3, grad_norm=2.0, extras={"mse": 0.4}, steps=10, elapsed=2.0, data_wait=0.5,
        global_batch_size=64, flops_per_sample=1e6, world=2, peak_flops=1e9, epoch=3,
    )  # fmt: skip
    assert m["train/img_per_s"] == 320.0
    assert m["train/mfu"] == pytest.approx(1e6 * 320 / 2 / 1e9)
    assert m["train/data_wait_frac"] == 0.25 and m["train/mse"] == 0.4 and m["train/epoch"] == 3


# --- the metric sink and the backfill ----------------------------------------------------------------


def _write_log(path, steps, val_at=()):
    sink = MetricSink(None, str(path), LastLogged())
    for step in steps:
        sink.log(step, {"train/loss": 1.0 / step, "train/epoch": 0})
        if step in val_at:
            sink.log(step, {"val/loss": 0.9})


class _Handle:
    """The two calls the driver's backfill makes on ``RunHandle``, recorded."""

    def __init__(self, last: int | None, accept: bool = True):
        self.last, self.accept, self.sent = last, accept, []

    def last_logged_step(self):
        return self.last

    def log_metric_rows(self, rows):
        self.sent.append(rows)
        return self.accept


def test_backfill_sends_only_the_steps_between_mlflows_last_and_the_checkpoint(tmp_path):
    log_path = tmp_path / "train_log.jsonl"
    _write_log(log_path, range(1, 7), val_at=(4,))
    with open(log_path, "a") as f:
        f.write('{"step": 7, "train/lo')  # a line cut by the SIGKILL
    handle = _Handle(last=2)
    got = backfill_on_resume(handle, str(log_path), resumed=True, reopened=True, checkpoint_step=4)
    assert [[step for step, _ in rows] for rows in handle.sent] == [[3, 4, 4]]
    assert got == LastLogged(mlflow=4, file=6)  # 5 and 6 are re-done by the continued run

    nothing_missing = _Handle(last=4)
    got = backfill_on_resume(nothing_missing, str(log_path), resumed=True, reopened=True, checkpoint_step=4)
    assert nothing_missing.sent == [] and got == LastLogged(mlflow=4, file=6)
    unreadable = _Handle(last=None)  # MLflow's history cannot be read: it is taken to have the file's
    got = backfill_on_resume(unreadable, str(log_path), resumed=True, reopened=True, checkpoint_step=4)
    assert unreadable.sent == [] and got == LastLogged(mlflow=6, file=6)
    refused = _Handle(last=2, accept=False)
    assert (
        backfill_on_resume(refused, str(log_path), resumed=True, reopened=True, checkpoint_step=4).mlflow == 2
    )
    new_run = _Handle(last=2)  # another tracking store: a new MLflow run, nothing to backfill
    got = backfill_on_resume(new_run, str(log_path), resumed=True, reopened=False, checkpoint_step=4)
    assert new_run.sent == [] and got == LastLogged(mlflow=-1, file=6)
    on_uri = _Handle(last=2)
    assert backfill_on_resume(on_uri, None, resumed=True, reopened=True, checkpoint_step=4) == LastLogged(
        2, -1
    )
    assert on_uri.sent == []


def test_the_sink_logs_each_step_once_across_a_restart(tmp_path):
    """A worker killed after step 6 (checkpoint at 4) whose MLflow thread had sent steps 1-2 only:
    the restarted worker sends 3-4 from the log file, re-does 5-8, and each sink has each step once."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("restart")).info.run_id
    log_path = tmp_path / "train_log.jsonl"
    _write_log(log_path, range(1, 7), val_at=(4,))  # the killed worker's file
    for step in (1, 2):  # what its MLflow thread had sent
        client.log_metric(run_id, "train/loss", 1.0 / step, step=step)

    sink = MetricSink(AsyncRunLogger(uri, run_id), str(log_path), LastLogged())
    sink.catch_up_after_restart(run_id, start_step=4)
    for step in range(5, 9):
        sink.log(step, {"train/loss": 1.0 / step, "train/epoch": 0})
        if step == 8:
            sink.log(step, {"val/loss": 0.8})  # the validation of a step follows its train metrics
    assert sink.logger.close()

    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    assert {m.step: m.value for m in history} == pytest.approx({s: 1.0 / s for s in range(1, 9)})
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/loss")) == [4, 8]
    rows = list(log_file_rows(str(log_path)))
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 9))
    assert [r["step"] for r in rows if "val/loss" in r] == [4, 8]


def test_a_restart_without_a_readable_mlflow_history_never_logs_a_step_twice(tmp_path):
    log_path = tmp_path / "train_log.jsonl"
    _write_log(log_path, range(1, 7))
    unusable = AsyncRunLogger("notascheme://nowhere", "0" * 32, close_timeout_s=1)
    sink = MetricSink(unusable, str(log_path), LastLogged())
    sink.catch_up_after_restart("0" * 32, start_step=4)
    assert (sink.mlflow_upto, sink.file_upto) == (6, 6)
    sink.log(6, {"train/loss": 0.1})  # a re-done step: already in the file
    sink.log(7, {"train/loss": 0.1})
    assert [r["step"] for r in log_file_rows(str(log_path))] == [1, 2, 3, 4, 5, 6, 7]
