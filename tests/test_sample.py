"""Batch sampling: the samples layout, independence from the number of actors, DiT release files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _eval_utils import make_dit_checkpoint
from PIL import Image

from pipelines.sample import (
    SampleConfig,
    SampleGenerator,
    load_dit,
    resolve_sampling,
    run_sampling,
    sample_seed,
)
from vitdit import samples as layout
from vitdit.errors import VitditError


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory, tiny_vae_dir):
    run_dir = tmp_path_factory.mktemp("dit_run")
    make_dit_checkpoint(str(run_dir), 30, tiny_vae_dir, mlflow={"tracking_uri": None, "run_id": None})
    return str(run_dir)


def test_samples_layout_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
    labels = np.array([layout.label_for_index(i, [3, 5]) for i in range(7)])
    layout.write_images(str(tmp_path), range(7), images, labels)
    assert sorted(os.listdir(tmp_path / "images"))[:2] == ["000000_3.png", "000001_5.png"]
    back, back_labels = layout.finalize(str(tmp_path), 7, {"seed": 1})
    assert np.array_equal(back, images) and back_labels.tolist() == [3, 5, 3, 5, 3, 5, 3]
    with np.load(tmp_path / "samples.npz") as z:  # what ADM's evaluator reads
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (7, 8, 8, 3)
        assert z["arr_1"].tolist() == back_labels.tolist()
    first = (tmp_path / "samples.npz").read_bytes()
    layout.write_npz(str(tmp_path), images, labels)
    assert (tmp_path / "samples.npz").read_bytes() == first  # no timestamps in the zip
    grid = Image.open(tmp_path / "grid.png")  # one row per class: 2 rows of 8-px tiles upscaled to 64
    assert grid.size[1] == 2 * (64 + 2) + 2
    os.remove(tmp_path / "images" / "000004_3.png")
    with pytest.raises(VitditError, match="index 4"):
        layout.read_images(str(tmp_path), 7)


def test_release_state_dict_loads_into_inferred_dit(tmp_path, dit_run):
    model = load_dit(dit_run)
    path = tmp_path / "DiT-test-2.pt"
    torch.save(model.state_dict(), path)  # the release files are plain state dicts
    released = load_dit(str(path))
    assert (
        released.config.hidden_size == 32 and released.config.depth == 2 and released.config.num_classes == 10
    )
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(released(x, t, y), model(x, t, y))
    with pytest.raises(VitditError, match="records no VAE"):
        resolve_sampling(SampleConfig(checkpoint=str(path), output=str(tmp_path / "s")))


def test_sample_i_does_not_depend_on_its_batch(dit_run, tiny_vae_dir):
    cfg = SampleConfig(checkpoint=dit_run, output="unused", num_samples=4, sampling_steps=3, sampler="ddpm")
    _, resolved, classes = resolve_sampling(cfg)
    gen = SampleGenerator(vars(cfg), tiny_vae_dir, {"scaling_factor": 0.5, "shift_factor": None}, classes)
    four, labels = gen.generate(range(4))
    one, _ = gen.generate([2])
    assert labels.tolist() == [0, 1, 2, 3]
    # Per-sample generators: sample 2 alone matches sample 2 in a batch up to fp32 reassociation error
    # (batch 4 vs 1 kernels, ≲ 1e-4 relative: tests/_tolerance.py), far below one 8-bit level (2/255 of
    # [-1, 1]), so a pixel moves at most one level, where it sits on a rounding boundary.
    assert np.abs(one[0].astype(int) - four[2].astype(int)).max() <= 1
    assert not np.array_equal(four[0], four[1])


@pytest.mark.ray
def test_one_and_two_actors_give_identical_samples(ray_session, dit_run, tmp_path, mlflow_server):
    base = dict(
        checkpoint=dit_run, num_samples=10, batch_size=3, sampling_steps=3, classes=(1, 4, 7),
        cfg_scale=2.0, seed=5, tracking_uri=mlflow_server,
    )  # fmt: skip
    one = run_sampling(SampleConfig(output=str(tmp_path / "one"), num_actors=1, **base))
    two = run_sampling(SampleConfig(output=str(tmp_path / "two"), num_actors=2, **base, mlflow=False))
    assert one.num_generated == 10 and two.num_generated == 10
    a = (tmp_path / "one" / "samples.npz").read_bytes()
    assert a == (tmp_path / "two" / "samples.npz").read_bytes()
    names = sorted(os.listdir(tmp_path / "one" / "images"))
    assert names[:4] == ["000000_1.png", "000001_4.png", "000002_7.png", "000003_1.png"] and len(names) == 10
    assert Image.open(tmp_path / "one" / "grid.png").size[1] == 3 * (64 + 2) + 2  # a row per class

    # Resume: a lost PNG is regenerated alone (its chunk), and the npz comes out the same.
    os.remove(tmp_path / "two" / "images" / "000007_4.png")
    again = run_sampling(SampleConfig(output=str(tmp_path / "two"), num_actors=2, **base, mlflow=False))
    assert again.num_generated == 3 and (tmp_path / "two" / "samples.npz").read_bytes() == a
    with pytest.raises(VitditError, match="seed"):
        run_sampling(SampleConfig(output=str(tmp_path / "two"), **{**base, "seed": 6}, mlflow=False))

    # MLflow: the grid and the sampling config, in a run of the sampling experiment.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.get_run(one.mlflow_run_id)
    assert run.data.params["sample.seed"] == "5" and run.data.tags["vitdit.step"] == "30"
    assert {a.path for a in client.list_artifacts(one.mlflow_run_id, "samples")} == {
        "samples/grid.png", "samples/sampling.json",
    }  # fmt: skip


def test_a_flow_trained_dit_samples_with_euler(tmp_path, tiny_vae_dir):
    from _eval_utils import make_flow_dit_checkpoint

    from vitdit.diffusion.flow import cfg_velocity, euler_sample, scale_timesteps

    run = tmp_path / "flow_run"
    make_flow_dit_checkpoint(str(run), 3, tiny_vae_dir)
    cfg = SampleConfig(checkpoint=str(run), output="unused", num_samples=3, sampling_steps=4, cfg_scale=2.0)
    _, resolved, classes = resolve_sampling(cfg)
    assert resolved["sampler"] == "euler" and resolved["shift"] == 1.0
    with pytest.raises(VitditError, match="rectified-flow"):
        resolve_sampling(SampleConfig(checkpoint=str(run), output="unused", sampler="ddim"))
    gen = SampleGenerator(vars(cfg), tiny_vae_dir, {"scaling_factor": 0.5, "shift_factor": None}, classes)
    images, labels = gen.generate(range(3))
    assert images.shape == (3, 16, 16, 3) and labels.tolist() == [0, 1, 2]
    # The same latents by hand: Euler on the guided velocity (DiT fed 1000·t, null class 10).
    from vitdit.vae import decode_latents

    model = load_dit(str(run), use_ema=True)
    net = scale_timesteps(model, 1000.0)
    noise = torch.stack(
        [torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(sample_seed(0, i))) for i in range(3)]
    )
    y, null = torch.tensor([0, 1, 2]), torch.full((3,), 10)
    with torch.no_grad():
        z = euler_sample(lambda x, t: cfg_velocity(net, x, t, y, null, 2.0), noise, 4)
        expect = layout.to_uint8(decode_latents(gen.vae, z, {"scaling_factor": 0.5, "shift_factor": None}))
    assert np.abs(expect.astype(int) - images.astype(int)).max() <= 1
