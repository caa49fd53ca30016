"""Tiny trained checkpoints for the sampling / evaluation tests (no Ray Train: a few in-process steps)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

import vitdit
from vitdit.checkpoint import CONFIG_KEYS, checkpoint_name, save_checkpoint
from vitdit.digits import CLASS_NAMES, digits_arrays
from vitdit.preprocess import to_unit_range


def _config(kind: str, model_name: str, model, step: int, **extra) -> dict:
    cfg = {k: None for k in CONFIG_KEYS}
    cfg.update(
        kind=kind,
        model_name=model_name,
        model_config=dataclasses.asdict(model.config),
        step=step,
        class_names=list(CLASS_NAMES),
        vitdit_version=vitdit.__version__,
    )
    cfg.update(extra)
    return cfg


def make_dit_checkpoint(
    run_dir: str, step: int, vae_dir: str, train_steps: int = 3, seed: int = 0, mlflow: dict | None = None
) -> str:
    """A DiT-test/2 checkpoint after ``train_steps`` AdamW steps on random latents."""
    from vitdit.diffusion import create_diffusion
    from vitdit.vae import load_vae, vae_identity

    torch.manual_seed(seed)
    model = vitdit.create_model("DiT-test/2")
    diffusion = create_diffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(train_steps):
        x0 = torch.randn(8, 4, 8, 8)
        t = torch.randint(0, diffusion.num_timesteps, (8,))
        y = torch.randint(0, 10, (8,))
        loss = diffusion.training_losses(model, x0, t, model_kwargs={"y": y})["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    identity = vae_identity(load_vae(vae_dir), vae_dir)
    config = _config(
        "dit",
        "DiT-test/2",
        model,
        step,
        diffusion={"noise_schedule": "linear", "learn_sigma": True, "diffusion_steps": 1000},
        vae=dataclasses.asdict(identity),
        mlflow=mlflow,
    )
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}  # differs from the raw weights on purpose
    return save_checkpoint(
        os.path.join(run_dir, checkpoint_name(step)), config, model.state_dict(), ema, {"step": step}
    )


def make_flow_dit_checkpoint(
    run_dir: str, step: int, vae_dir: str, train_steps: int = 3, seed: int = 0
) -> str:
    """A DiT-test/2 trained a few steps with the rectified-flow objective (``--objective flow``)."""
    from vitdit.diffusion.flow import RectifiedFlow, scale_timesteps
    from vitdit.vae import load_vae, vae_identity

    torch.manual_seed(seed)
    model = vitdit.create_model("DiT-test/2", learn_sigma=False)
    flow = RectifiedFlow()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(train_steps):
        x0, y = torch.randn(8, 4, 8, 8), torch.randint(0, 10, (8,))
        net = scale_timesteps(model, 1000.0)
        loss = flow.training_losses(lambda x, t, y=y, net=net: net(x, t, y), x0)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    identity = vae_identity(load_vae(vae_dir), vae_dir)
    diffusion = {"objective": "flow", **flow.config(), "timestep_scale": 1000.0, "learn_sigma": False}
    config = _config(
        "dit", "DiT-test/2", model, step, diffusion=diffusion, vae=dataclasses.asdict(identity),
        mlflow={"tracking_uri": None, "run_id": None},
    )  # fmt: skip
    return save_checkpoint(
        os.path.join(run_dir, checkpoint_name(step)), config, model.state_dict(), None, {"step": step}
    )


def make_vit_checkpoint(run_dir: str, step: int = 10, train_steps: int = 10, seed: int = 0) -> str:
    """A ViT-test/4 digits classifier (16 px) after ``train_steps`` steps on the digits."""
    torch.manual_seed(seed)
    model = vitdit.create_model("ViT-test/4", num_classes=10)
    images, labels = digits_arrays(16)
    x = torch.from_numpy(to_unit_range(images))
    y = torch.from_numpy(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    for _ in range(train_steps):
        idx = torch.from_numpy(rng.choice(len(x), 64, replace=False))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    config = _config("vit", "ViT-test/4", model, step)
    return save_checkpoint(
        os.path.join(run_dir, checkpoint_name(step)),
        config,
        model.state_dict(),
        model.state_dict(),
        {"step": step},
    )
