"""Checkpoints, EMA, LR schedule, MFU and the trainer's pure helpers (no Ray)."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from pipelines.train.loop import batch_plan, enable_grad_checkpointing, make_optimizer, resolve_precision
from vitdit.checkpoint import (
    CONFIG_KEYS,
    apply_retention,
    capture_rng_state,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_model,
    resolve_checkpoint_dir,
    restore_rng_state,
    save_checkpoint,
    steps_to_delete,
)
from vitdit.ema import create_ema, update_ema
from vitdit.errors import UnsafeCheckpointError, VitditError
from vitdit.lr import lr_at
from vitdit.mfu import gpu_peak_tflops, measure_matmul_tflops, peak_flops
from vitdit.models import create_model


def _dit_config(model) -> dict:
    import dataclasses

    cfg = {k: None for k in CONFIG_KEYS}
    cfg.update(kind="dit", model_name="DiT-test/2", model_config=dataclasses.asdict(model.config), step=3)
    return cfg


def test_round_trip_rebuilds_the_model_and_train_state(tmp_path):
    torch.manual_seed(0)
    model = create_model("DiT-test/2")
    ema = create_ema(model)
    with torch.no_grad():  # make the EMA differ from the model so use_ema is observable
        for p in ema.parameters():
            p.add_(0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 1])
    model(x, t, y).square().mean().backward()
    opt.step()
    rng = capture_rng_state()
    state = {"step": 3, "data_epoch": 1, "optimizer": opt.state_dict(), "rng": rng}
    d = save_checkpoint(
        tmp_path / checkpoint_name(3), _dit_config(model), model.state_dict(), ema.state_dict(), state
    )

    assert sorted(os.listdir(tmp_path)) == ["checkpoint_00000003"]  # no temp dir left behind
    ck = load_checkpoint(d)
    assert ck.step == 3 and ck.train_state["data_epoch"] == 1
    opt2 = torch.optim.AdamW(create_model("DiT-test/2").parameters(), lr=1e-3)
    opt2.load_state_dict(ck.train_state["optimizer"])  # optimizer state survives weights_only loading
    key = next(iter(opt.state_dict()["state"]))
    assert torch.equal(opt2.state_dict()["state"][key]["exp_avg"], opt.state_dict()["state"][key]["exp_avg"])

    raw, config = load_model(d, use_ema=False)
    ema_loaded, _ = load_model(d, use_ema=True)
    model.eval()
    with torch.no_grad():
        assert torch.equal(raw(x, t, y), model(x, t, y))
        assert torch.equal(ema_loaded(x, t, y), ema(x, t, y))
        assert not torch.equal(ema_loaded(x, t, y), model(x, t, y))
    assert config["model_name"] == "DiT-test/2" and set(CONFIG_KEYS) <= set(config)


def test_save_replaces_an_existing_checkpoint_atomically(tmp_path):
    model = torch.nn.Linear(2, 2)
    cfg = {"kind": "tiny"}
    d = save_checkpoint(tmp_path / "checkpoint_00000001", cfg, model.state_dict(), None, {"step": 1})
    with torch.no_grad():
        model.weight.fill_(7.0)
    save_checkpoint(d, cfg, model.state_dict(), None, {"step": 1})
    assert torch.all(load_checkpoint(d).model_state["weight"] == 7.0)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_00000001"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_crafted_pickle_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    d = save_checkpoint(
        tmp_path / "checkpoint_00000001", {"kind": "tiny"}, model.state_dict(), None, {"step": 1}
    )
    with open(os.path.join(d, "train_state.pt"), "wb") as f:
        pickle.dump({"step": _Evil()}, f)
    with pytest.raises(UnsafeCheckpointError, match="train_state.pt"):
        load_checkpoint(d)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(VitditError, match="not a checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(VitditError, match="neither a checkpoint"):
        resolve_checkpoint_dir(tmp_path)


def test_rng_states_round_trip_through_weights_only(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(3), np.random.rand(), random.random(), np.random.randn()  # advance every RNG a little
    state = capture_rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    restore_rng_state(torch.load(path, weights_only=True))
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_retention_keeps_last_k_and_every_mth(tmp_path):
    assert steps_to_delete([100, 200, 300, 400, 500], keep_last=2, keep_every=200) == [100, 300]
    assert steps_to_delete([1, 2, 3], keep_last=1) == [1, 2]
    model = torch.nn.Linear(1, 1)
    for step in (5, 10, 15, 20, 25):
        save_checkpoint(
            tmp_path / checkpoint_name(step), {"kind": "t"}, model.state_dict(), None, {"step": step}
        )
    os.makedirs(tmp_path / ".checkpoint_00000030.tmp-dead")  # a crashed write is not a checkpoint
    apply_retention(tmp_path, keep_last=2, keep_every=10)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 20, 25]
    assert resolve_checkpoint_dir(tmp_path).endswith("checkpoint_00000025")


def test_ema_update_is_the_lerp():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    ema = create_ema(model)
    before = ema.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight)
    assert not ema.weight.requires_grad


def test_lr_schedule():
    assert lr_at(0, 1.0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(50, 1.0, 100, warmup_steps=10) == 1.0
    assert lr_at(10, 1.0, 110, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(60, 1.0, 110, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(110, 1.0, 110, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(VitditError, match="linear"):
        lr_at(0, 1.0, 10, schedule="linear")


def test_batch_plan_keeps_the_global_batch():
    assert batch_plan(256, 1, None) == (256, 1)
    assert batch_plan(256, 2, 32) == (32, 4)
    with pytest.raises(VitditError, match="not divisible"):
        batch_plan(10, 3, None)
    with pytest.raises(VitditError, match="does not divide"):
        batch_plan(64, 2, 24)


def test_precision_and_mfu_peak():
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    # auto on a CPU is measured by the trainer's probe (tests/unit/test_precision.py), never read off a flag
    assert resolve_precision("auto", torch.device("cpu")) is None
    with pytest.raises(VitditError):
        resolve_precision("fp16", torch.device("cpu"))
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.0)
    assert gpu_peak_tflops("Some Future GPU", "bf16") is None
    assert peak_flops("cpu", "fp32", override_tflops=2.0) == 2e12
    measured = measure_matmul_tflops("fp32", size=256, seconds=0.05)
    assert 1e-4 < measured < 100  # a real measurement, in TFLOP/s


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = create_model("DiT-test/2")
    b = create_model("DiT-test/2")
    b.load_state_dict(a.state_dict())
    enable_grad_checkpointing(b)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 0])
    for m in (a, b):
        m(x, t, y).square().mean().backward()
    compared = 0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:  # frozen (the fixed sin-cos pos_embed)
            assert pb.grad is None, name
            continue
        # The same shapes through the same kernels in one process: recomputation repeats the forward
        # exactly, so the gradients are bit-identical (no rounding tolerance is needed).
        assert torch.equal(pa.grad, pb.grad), name
        compared += 1
    assert compared > 10
    assert set(a.state_dict()) == set(b.state_dict())  # keys unchanged


def test_fused_adamw_matches_the_multi_tensor_one_and_resume_keeps_the_kernel():
    torch.manual_seed(0)
    a = create_model("DiT-test/2")
    b = create_model("DiT-test/2")
    b.load_state_dict(a.state_dict())
    opt_a = make_optimizer(a, 1e-3, 0.01, torch.device("cpu"))
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.01)
    initial = {k: v.clone() for k, v in a.state_dict().items()}
    assert opt_a.param_groups[0]["fused"] is True
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 0])
    for _ in range(5):
        for m, opt in ((a, opt_a), (b, opt_b)):
            m(x, t, y).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    moved = 0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        # Fused and multi-tensor AdamW compute the same elementwise update in other operation orders:
        # a few fp32 roundings (u = 2^-24) per step, far inside 1e-5 absolute after 5 steps.
        assert torch.allclose(pa, pb, atol=1e-5), name
        moved += int(not torch.equal(pa, initial[name]))
    assert moved > 10  # the steps changed the weights: the agreement is not two idle optimizers
    # A checkpoint written by a foreach run resumes with foreach: the saved param group wins.
    opt_c = make_optimizer(b, 1e-3, 0.01, torch.device("cpu"))
    opt_c.load_state_dict(opt_b.state_dict())
    assert not opt_c.param_groups[0]["fused"]


def test_rerun_into_a_run_dir_continues_its_latest_checkpoint(tmp_path):
    """Re-running the same training command resumes from the run directory's latest checkpoint.

    The checkpoint here is a DiT one and the task a ViT one, so the driver stops at the kind check,
    before Ray starts: the error shows that it picked up checkpoint_00000007 by itself.
    """
    from pipelines.train.loop import TrainConfig, TrainTask, run_training

    model = create_model("DiT-test/2")
    for step in (3, 7):
        save_checkpoint(
            tmp_path / checkpoint_name(step), _dit_config(model), model.state_dict(), model.state_dict(), {}
        )

    class _ViTLike(TrainTask):
        kind = "vit"

    with pytest.raises(VitditError, match=r"checkpoint_00000007: a dit checkpoint, not vit"):
        run_training(_ViTLike(), TrainConfig(output=str(tmp_path), steps=10))
