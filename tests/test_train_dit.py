"""DiT training: the loss falls on digit latents, MLflow gets everything, DDP = one worker, bf16 = fp32."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from _tolerance import DIT_TEST_LAYERS, DIT_TEST_N, reassociation_tol
from _train_utils import write_digit_latents

from vitdit.diffusion import create_diffusion
from vitdit.models import create_model


@pytest.fixture(scope="module")
def digit_latents(tiny_vae_dir, tmp_path_factory):
    return write_digit_latents(str(tmp_path_factory.mktemp("latents") / "digits"), tiny_vae_dir, flips=True)


@pytest.mark.ray
def test_dit_job_trains_on_digits_and_logs_to_a_real_mlflow_server(
    ray_session, mlflow_server, digit_latents, tmp_path, capsys
):
    from mlflow import MlflowClient

    from jobs.train_dit import main
    from vitdit.checkpoint import load_model

    out = tmp_path / "dit"
    argv = [
        "--latents", digit_latents, "--model", "DiT-test/2", "--output", str(out),
        "--val-fraction", "0.1", "--grid-samples", "4", "--grid-steps", "2",
        "--steps", "40", "--global-batch-size", "32", "--lr", "2e-3", "--ema-decay", "0.9",
        "--num-workers", "2", "--cpus-per-worker", "0.5", "--precision", "auto",
        "--checkpoint-every", "20", "--log-every", "5", "--eval-every", "20",
        "--tracking-uri", mlflow_server, "--experiment", "dit-test",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"checkpoints: {out}" in printed and "mlflow run: " in printed

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs(client.get_experiment_by_name("dit-test").experiment_id)
    assert run.info.run_id in printed and run.info.status == "FINISHED"
    params = run.data.params
    assert params["steps"] == "40" and params["global_batch_size"] == "32"
    assert params["model.model_name"] == "DiT-test/2" and params["model.vae.scaling_factor"] == "0.5"
    losses = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    ]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses  # the loss falls
    for key in ("train/lr", "train/grad_norm", "train/img_per_s", "train/mfu", "train/data_wait_frac"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(5, 41, 5)), key
    assert client.get_metric_history(run.info.run_id, "train/mfu")[0].value > 0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [20, 40]
    tags = run.data.tags
    assert tags["checkpoint.latest"] == str(out / "checkpoint_00000040")
    assert tags["checkpoint.00000020"] == str(out / "checkpoint_00000020")
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples" in p for p in images), images  # the sample grid, decoded with the VAE

    ckpt = out / "checkpoint_00000040"
    config = json.loads((ckpt / "config.json").read_text())
    assert (
        config["kind"] == "dit"
        and config["step"] == 40
        and config["class_names"] == [str(i) for i in range(10)]
    )
    assert config["vae"]["scaling_factor"] == 0.5 and config["dataset"]["fingerprint"] == "digits-test"
    assert config["mlflow"] == {"tracking_uri": mlflow_server, "run_id": run.info.run_id}
    model, _ = load_model(ckpt)
    assert model.config.input_size == 8 and model.config.num_classes == 10
    assert sorted(os.listdir(out)) == [
        "_ray", "checkpoint_00000020", "checkpoint_00000040", "precision.json", "summary.json", "train_log.jsonl"
    ]  # fmt: skip
    # --precision auto: rank 0 probed both precisions on a real batch; the run records the choice.
    record = json.loads((out / "precision.json").read_text())
    assert record["requested"] == "auto" and record["precision"] in ("fp32", "bf16")
    assert all(record["figures"][p]["step_ms"] > 0 for p in ("fp32", "bf16")), record
    run = client.get_run(run.info.run_id)
    assert run.data.params["precision"] == "auto"
    assert run.data.params["precision_resolved"] == run.data.tags["precision.resolved"] == record["precision"]
    assert json.loads(run.data.tags["precision.probe"]) == record["figures"]
    assert client.get_metric_history(run.info.run_id, "precision_probe/fp32_step_ms")[0].step == 0


def _dit_loss(model, x0, y, seed):
    g = torch.Generator().manual_seed(seed)
    diffusion = create_diffusion()
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return diffusion.training_losses(model, x0, t, model_kwargs={"y": y}, noise=noise)["loss"]


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = create_model("DiT-test/2", class_dropout_prob=0.0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x0, y = torch.load(os.path.join(out_dir, "batch.pt"))
    share = x0.shape[0] // world
    x0, y = x0[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    # Two micro batches per rank, no_sync on the first (the trainer's gradient accumulation).
    half = share // 2
    with ddp.no_sync():
        (_dit_loss(ddp, x0[:half], y[:half], seed=rank * 10).mean() / 2).backward()
    (_dit_loss(ddp, x0[half:], y[half:], seed=rank * 10 + 1).mean() / 2).backward()
    if rank == 0:
        torch.save(
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, f"{out_dir}/grads.pt"
        )
    dist.destroy_process_group()


def test_two_ddp_workers_give_the_gradients_of_one_worker(tmp_path):
    """The same global batch of 8 on 1 worker, or 2 DDP (gloo) workers × 2 micro batches of 2."""
    torch.manual_seed(1)
    x0, y = torch.randn(8, 4, 8, 8), torch.randint(0, 10, (8,))
    torch.save((x0, y), tmp_path / "batch.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ddp_grads = torch.load(tmp_path / "grads.pt")

    torch.manual_seed(0)
    model = create_model("DiT-test/2", class_dropout_prob=0.0)
    # The same samples with the same noise and timesteps as the workers drew for them.
    losses = [
        _dit_loss(model, x0[i : i + 2], y[i : i + 2], seed=s) for i, s in zip((0, 2, 4, 6), (0, 1, 10, 11))
    ]
    torch.cat(losses).mean().backward()
    assert len(ddp_grads) > 10
    for name, p in model.named_parameters():
        if name in ddp_grads:
            # Another process (thread count, batch split) sums in another order: fp32 reassociation of
            # the forward and the backward through DiT-test/2 (tests/_tolerance.py).
            tol = reassociation_tol(p.grad, DIT_TEST_N, 2 * DIT_TEST_LAYERS)
            torch.testing.assert_close(ddp_grads[name], p.grad, **tol, msg=name)


def _train_losses(digit_latents, precision: str, steps: int) -> tuple[list[float], float]:
    from pipelines.latents import load_latents_numpy
    from vitdit.models.layers import set_attn_impl

    arrays, manifest = load_latents_numpy(digit_latents)
    mean = torch.from_numpy(arrays["mean"]).float() * manifest.vae.scaling_factor
    labels = torch.from_numpy(arrays["label"]).long()
    torch.manual_seed(0)
    model = create_model("DiT-test/2", hidden_size=64, num_heads=4)
    if precision == "bf16":
        set_attn_impl(model, "math")  # what the trainer does for bf16 on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, mean.shape[0], (64,), generator=g)
        torch.manual_seed(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = _dit_loss(model, mean[idx], labels[idx], seed=step).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, steps / (time.perf_counter() - start)


def test_bf16_and_fp32_losses_agree_over_a_short_run(digit_latents):
    """The basis of --precision auto = bf16 on CPUs with AMX: it trains like fp32.

    Tolerance: the mean loss of the last 10 of 40 steps within 5% (relative), and every step's loss
    within 10% (bf16 has a 8-bit mantissa; per-step losses are single batches).
    """
    steps = 40
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared, oversubscribed 2-core machine crawl
    try:
        fp32, fp32_speed = _train_losses(digit_latents, "fp32", steps)
        bf16, bf16_speed = _train_losses(digit_latents, "bf16", steps)
    finally:
        torch.set_num_threads(threads)
    print(f"fp32 {fp32_speed:.1f} steps/s, bf16 {bf16_speed:.1f} steps/s (tiny model, shared CPU)")
    assert sum(fp32[-10:]) / 10 < 0.8 * fp32[0]  # it trains at all
    tail32, tail16 = sum(fp32[-10:]) / 10, sum(bf16[-10:]) / 10
    assert abs(tail16 - tail32) / tail32 < 0.05, (tail32, tail16)
    for a, b in zip(fp32, bf16):
        assert abs(a - b) / a < 0.10, (a, b)
