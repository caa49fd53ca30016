"""MM-DiT training and text-to-image sampling: the flow loss falls on captioned digit latents, MLflow
gets the run, resume is exact, sample i does not depend on the number of actors, bad input is refused.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _text_utils import make_tiny_clip
from _train_utils import write_caption_latents

from vitdit.errors import VitditError


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "text_encoder")


@pytest.fixture(scope="module")
def caption_latents(tiny_vae_dir, clip_dir, tmp_path_factory):
    return write_caption_latents(str(tmp_path_factory.mktemp("latents") / "captions"), tiny_vae_dir, clip_dir)


def _argv(latents: str, out, steps: int, *extra: str) -> list[str]:
    return [
        "--latents", latents, "--model", "MMDiT-tiny", "--output", str(out),
        "--val-fraction", "0.1", "--grid-samples", "3", "--grid-steps", "2",
        "--steps", str(steps), "--global-batch-size", "32", "--lr", "2e-3", "--ema-decay", "0.9",
        "--num-workers", "1", "--cpus-per-worker", "1", "--precision", "fp32",
        "--checkpoint-every", "20", "--log-every", "5", "--eval-every", "20", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mmdit_run(ray_session, mlflow_server, caption_latents, tmp_path_factory):
    """One 40-step run (checkpoints at 20 and 40) shared by the tests below."""
    from jobs.train_mmdit import main

    out = tmp_path_factory.mktemp("mmdit") / "run"
    argv = _argv(caption_latents, out, 40, "--tracking-uri", mlflow_server, "--experiment", "mmdit-test")
    assert main(argv) == 0
    return out


@pytest.mark.ray
def test_mmdit_job_trains_on_captioned_digits_and_logs_to_mlflow(mmdit_run, mlflow_server, clip_dir):
    from mlflow import MlflowClient

    from vitdit.checkpoint import load_model

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs(client.get_experiment_by_name("mmdit-test").experiment_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.model_name"] == "MMDiT-tiny"
    assert run.data.params["model.diffusion.objective"] == "flow"
    losses = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    ]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses  # the flow-matching loss falls
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [20, 40]
    assert client.get_metric_history(run.info.run_id, "train/mfu")[0].value > 0
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples" in p for p in images), images  # the prompt grid, decoded with the VAE

    config = json.loads((mmdit_run / "checkpoint_00000040" / "config.json").read_text())
    assert config["kind"] == "mmdit" and config["diffusion"]["objective"] == "flow"
    assert config["text"]["path"] == os.path.abspath(clip_dir)
    assert len(config["grid_prompts"]) == 3 and all(config["grid_prompts"])
    model, _ = load_model(mmdit_run / "checkpoint_00000040")
    # The data decides the text sizes: the tiny CLIP's 32-wide tokens, 16 of them, 24-wide pooled.
    assert (model.config.context_dim, model.config.context_len, model.config.pooled_dim) == (32, 16, 24)


@pytest.mark.ray
# 27 s, in `-m slow`: the trainer's resume is the same loop for every task, and the default run proves
# it exact four times (tests/test_train_faults.py's SIGKILL restart and --resume, the two-node
# restart, --resume from s3://); this adds the MM-DiT's task state (captions, text conditioning).
@pytest.mark.slow
def test_mmdit_resume_is_exact(mmdit_run, caption_latents, tmp_path):
    """--resume from the step-20 checkpoint into a new run reproduces the step-40 weights bit for bit."""
    from jobs.train_mmdit import main
    from vitdit.checkpoint import load_checkpoint

    out = tmp_path / "resumed"
    ckpt20 = str(mmdit_run / "checkpoint_00000020")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(_argv(caption_latents, out, 40, "--resume", ckpt20, "--tracking-uri", uri)) == 0
    a = load_checkpoint(mmdit_run / "checkpoint_00000040")
    b = load_checkpoint(out / "checkpoint_00000040")
    assert a.model_state.keys() == b.model_state.keys()
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k


@pytest.mark.ray
# 14 s, in `-m slow`: tests/test_sample.py proves sample i independent of the actor count in the
# default run (the same chunks and actor pool, pipelines/sample.py); this adds the prompt generator,
# the prompts' order and their file.
@pytest.mark.slow
def test_prompt_samples_do_not_depend_on_the_number_of_actors(mmdit_run, tmp_path):
    from pipelines.sample import SampleConfig, run_sampling
    from pipelines.sample_mmdit import PROMPTS_NAME

    prompts = ("a seven", "digit two", "zero")
    base = dict(
        checkpoint=str(mmdit_run), num_samples=7, batch_size=3, sampling_steps=3, prompt=prompts,
        cfg_scale=2.0, seed=5, mlflow=False, cpus_per_actor=0.5,
    )  # fmt: skip
    one = run_sampling(SampleConfig(output=str(tmp_path / "one"), num_actors=1, **base))
    two = run_sampling(SampleConfig(output=str(tmp_path / "two"), num_actors=2, **base))
    assert one.num_generated == two.num_generated == 7
    assert one.config["sampler"] == "euler" and one.config["prompts"] == list(prompts)
    assert (tmp_path / "one" / "samples.npz").read_bytes() == (tmp_path / "two" / "samples.npz").read_bytes()
    names = sorted(os.listdir(tmp_path / "one" / "images"))
    assert names[:4] == ["000000_0.png", "000001_1.png", "000002_2.png", "000003_0.png"]
    rows = [json.loads(line) for line in (tmp_path / "one" / PROMPTS_NAME).read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [prompts[i % 3] for i in range(7)]
    with np.load(tmp_path / "one" / "samples.npz") as z:
        images = z["arr_0"]
    assert images.shape == (7, 16, 16, 3) and not np.array_equal(images[0], images[1])
    # A re-run with other prompts into the same directory is refused (they decide what sample i is).
    with pytest.raises(VitditError, match="prompts"):
        run_sampling(SampleConfig(output=str(tmp_path / "one"), **{**base, "prompt": ("one",)}))


def test_prompt_flags_are_checked_against_the_checkpoint_kind(mmdit_run, tiny_vae_dir, tmp_path, caplog):
    from _eval_utils import make_dit_checkpoint

    from pipelines.sample import SampleConfig, resolve_sampling

    with pytest.raises(VitditError, match="--prompt"):
        resolve_sampling(SampleConfig(checkpoint=str(mmdit_run), output=str(tmp_path / "s")))
    with pytest.raises(VitditError, match="--classes"):
        resolve_sampling(
            SampleConfig(checkpoint=str(mmdit_run), output=str(tmp_path / "s"), prompt=("x",), classes=(1,))
        )
    with pytest.raises(VitditError, match="sampler ddim"):
        resolve_sampling(
            SampleConfig(checkpoint=str(mmdit_run), output=str(tmp_path / "s"), prompt=("x",), sampler="ddim")
        )
    with pytest.raises(VitditError, match="no such file"):
        resolve_sampling(
            SampleConfig(checkpoint=str(mmdit_run), output=str(tmp_path / "s"), prompts_file="/nonexistent")
        )
    # A prompt over the encoder's 16 tokens is truncated, with one warning naming how many.
    with caplog.at_level("WARNING"):
        _, resolved, _ = resolve_sampling(
            SampleConfig(checkpoint=str(mmdit_run), output=str(tmp_path / "s"), prompt=("seven " * 9, "two"))
        )
    assert "1 of 2 prompt(s) are longer than the text encoder's 16 tokens" in caplog.text
    assert resolved["prompts"][0] == "seven " * 9  # recorded as given
    dit_dir = tmp_path / "dit"
    make_dit_checkpoint(str(dit_dir), 3, tiny_vae_dir, mlflow={"tracking_uri": None, "run_id": None})
    with pytest.raises(VitditError, match="class-conditional DiT"):
        resolve_sampling(SampleConfig(checkpoint=str(dit_dir), output=str(tmp_path / "s"), prompt=("x",)))


@pytest.mark.ray
def test_an_mmdit_checkpoint_given_to_dit_commands_is_a_clear_error(
    mmdit_run, caption_latents, tmp_path, capsys
):
    from jobs.train_dit import main as train_dit

    argv = [
        "--latents", caption_latents, "--model", "DiT-test/2", "--output", str(tmp_path / "dit"),
        "--steps", "2", "--resume", str(mmdit_run / "checkpoint_00000040"),
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--num-workers", "1", "--cpus-per-worker", "1",
    ]  # fmt: skip
    assert train_dit(argv) == 2
    from jobs.export import main as export

    assert export([str(mmdit_run), str(tmp_path / "exported")]) == 2
    assert "'mmdit' checkpoint, not a DiT" in capsys.readouterr().err


def test_a_dit_preset_is_not_an_mmdit(tiny_vae_dir, tmp_path):
    from _train_utils import write_digit_latents

    from pipelines.train.mmdit import MMDiTTask, MMDiTTrainConfig

    plain = write_digit_latents(str(tmp_path / "plain"), tiny_vae_dir, n=64)
    with pytest.raises(VitditError, match="not an MM-DiT preset"):
        MMDiTTask(MMDiTTrainConfig(latents=plain, model="DiT-test/2"))
