"""VAE training: the loss, the architecture flags, and a real run that writes <output>/vae."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipelines.train.loop import TrainConfig
from pipelines.train.vae import (
    VAETask,
    VAETaskConfig,
    VAEWithLoss,
    build_autoencoder,
    measure_latent_std,
    vae_loss,
)
from pipelines.train.vit import to_model_input
from vitdit.digits import digits_arrays, split_indices
from vitdit.errors import VitditError


def test_vae_loss_terms():
    x = torch.zeros(2, 3, 4, 4)
    # A perfect reconstruction with the prior as posterior costs nothing.
    loss, parts = vae_loss(x, x.clone(), torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), kl_weight=1e-2)
    assert loss.item() == 0.0 and parts["kl"] == 0.0
    # Reconstruction off by 0.5 everywhere: L1 0.5 + L2 0.25; mean 1 in every latent element: KL 0.5.
    loss, parts = vae_loss(x, x + 0.5, torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), kl_weight=0.1)
    assert parts["l1"] == pytest.approx(0.5) and parts["mse"] == pytest.approx(0.25)
    assert parts["kl"] == pytest.approx(0.5) and loss.item() == pytest.approx(0.8)


def test_architecture_flags_are_checked_before_ray(tmp_path):
    train_cfg = TrainConfig(output=str(tmp_path))
    with pytest.raises(VitditError, match="norm-num-groups"):
        VAETask(VAETaskConfig(images="x", block_out_channels=(30, 64)), train_cfg)
    with pytest.raises(VitditError, match="down-sampling"):
        VAETask(VAETaskConfig(images="x", resolution=18, block_out_channels=(8, 16, 16)), train_cfg)
    with pytest.raises(VitditError, match="kl-weight"):
        VAETask(VAETaskConfig(images="x", kl_weight=-1.0), train_cfg)
    # The job turns them into exit code 2 with the message, before starting Ray.
    from jobs.train_vae import main

    assert main(["--images", "x", "--output", str(tmp_path), "--block-out-channels", "30,64"]) == 2


def test_forward_shapes_and_std_measurement():
    cfg = VAETaskConfig(images="x", block_out_channels=(8, 16), norm_num_groups=4)
    torch.manual_seed(0)
    model = VAEWithLoss(build_autoencoder(cfg))
    images = torch.from_numpy(digits_arrays(16)[0][:8])
    recon, mean, logvar = model(to_model_input(images), torch.Generator().manual_seed(0))
    assert recon.shape == (8, 3, 16, 16) and mean.shape == logvar.shape == (8, 4, 8, 8)
    std = measure_latent_std(model.vae.eval(), [images[:4], images[4:]])
    with torch.no_grad():
        post = model.vae.encode(to_model_input(images)).latent_dist
    # Posterior samples spread at least as much as the means alone.
    assert std >= post.mean.std().item() * 0.9 and std > 0


@pytest.mark.ray
def test_train_vae_writes_calibrated_loadable_vae(ray_session, digits_root, tmp_path):
    from diffusers import AutoencoderKL

    from jobs.train_vae import main
    from vitdit.checkpoint import read_config

    out = tmp_path / "vae_run"
    rc = main(
        ["--images", digits_root, "--output", str(out), "--steps", "40", "--global-batch-size", "64",
         "--checkpoint-every", "40", "--eval-every", "20", "--log-every", "10",
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    )  # fmt: skip
    assert rc == 0

    vae = AutoencoderKL.from_pretrained(str(out / "vae")).eval()
    assert vae.config.block_out_channels == [32, 64] and vae.config.latent_channels == 4
    assert vae.config.shift_factor is None
    scaling = vae.config.scaling_factor
    assert scaling != 1.0  # set from the data, not the constructor default

    # On the training images, scaled posterior samples have unit std (SD's calibration).
    images, labels = digits_arrays(16)
    train_idx, val_idx = split_indices(labels)
    x = to_model_input(torch.from_numpy(images[train_idx]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
    assert (z * scaling).std().item() == pytest.approx(1.0, abs=0.05)

    # Reconstructions improved over training: the trained VAE against the same initial weights.
    def recon_mse(model) -> float:
        xv = to_model_input(torch.from_numpy(images[val_idx]))
        with torch.no_grad():
            return torch.nn.functional.mse_loss(
                model.decode(model.encode(xv).latent_dist.mean).sample, xv
            ).item()

    torch.manual_seed(0)  # the loop seeds the initial weights with --seed 0
    initial = build_autoencoder(VAETaskConfig(images="x")).eval()
    assert recon_mse(vae) < 0.5 * recon_mse(initial)
    rows = [json.loads(line) for line in open(out / "train_log.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    assert [r["step"] for r in rows if "val/mse" in r] == [20, 40]

    # A checkpoint as every trainer writes, and the summary names the saved VAE.
    config = read_config(out / "checkpoint_00000040")
    assert config["kind"] == "vae" and config["model_config"]["latent_channels"] == 4
    summary = json.load(open(out / "summary.json"))
    assert os.path.samefile(summary["vae_dir"], out / "vae")
    assert summary["scaling_factor"] == pytest.approx(scaling)


def test_flops_per_sample_counts_the_convolutions(tmp_path):
    cfg = VAETaskConfig(images="x", block_out_channels=(8, 16), norm_num_groups=4)
    task = VAETask(cfg, TrainConfig(output=str(tmp_path)))
    small = task.flops_per_sample(task.build_model())
    big = VAETask(VAETaskConfig(images="x"), TrainConfig(output=str(tmp_path)))
    # 4× the channels is ~16× the convolution FLOPs; a count of zero would hide the VAE from MFU.
    assert small > 0 and 8 < big.flops_per_sample(big.build_model()) / small < 20


def test_save_vae_to_a_uri_and_locally(tmp_path):
    from diffusers import AutoencoderKL

    from pipelines.train.vae import save_vae

    vae = build_autoencoder(VAETaskConfig(images="x", block_out_channels=(8, 16), norm_num_groups=4))
    vae.register_to_config(scaling_factor=0.7)
    local = save_vae(vae, str(tmp_path / "a"))
    remote = save_vae(vae, f"file://{tmp_path / 'b'}")
    assert remote.startswith("file://")
    for d in (local, str(tmp_path / "b" / "vae")):
        assert AutoencoderKL.from_pretrained(d).config.scaling_factor == 0.7
