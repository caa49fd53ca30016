"""The text tower trained with an MM-DiT (no pretrained text encoder): tokenizer, model, a short Ray
run on captions only, and sampling from the checkpoint alone."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _train_utils import write_caption_latents

from vitdit.captions import BOS_ID, EOS_ID, PAD_ID, UNK_ID, CaptionTokenizer, build_tokenizer_json
from vitdit.errors import VitditError
from vitdit.models import get_preset
from vitdit.models.text_tower import TextConditionedMMDiT, TextTowerConfig


def test_tokenizer_is_built_from_the_captions_deterministically():
    captions = ["forty-seven", "the number forty-seven", "Twenty three", "twenty-one"]
    a, b = build_tokenizer_json(captions), build_tokenizer_json(list(reversed(captions)))
    assert a == b  # the vocabulary does not depend on caption order
    tok = CaptionTokenizer(a, max_length=6)
    ids, cut = tok.ids_numpy(["forty-seven", "", "twenty nine", "the number forty-seven"])
    vocab = json.loads(a)["model"]["vocab"]
    assert ids[0].tolist() == [BOS_ID, vocab["forty"], vocab["-"], vocab["seven"], EOS_ID, PAD_ID]
    assert ids[1].tolist() == [BOS_ID, EOS_ID] + [PAD_ID] * 4  # the empty caption
    assert ids[2].tolist()[:4] == [BOS_ID, vocab["twenty"], UNK_ID, EOS_ID]  # "nine" is unseen
    # Too long: cut to 6 tokens, keeping [EOS] (the tower pools there).
    assert cut == 1 and ids[3].tolist() == [
        BOS_ID,
        vocab["the"],
        vocab["number"],
        vocab["forty"],
        vocab["-"],
        EOS_ID,
    ]
    assert vocab["forty"] < vocab["the"]  # words numbered by falling count
    with pytest.raises(VitditError, match="at least 2"):
        CaptionTokenizer(a, max_length=1)


def test_text_conditioned_mmdit_pools_at_eos_and_counts_its_macs():
    tok = CaptionTokenizer(build_tokenizer_json(["a seven", "a two"]), max_length=8)
    tower = TextTowerConfig(
        vocab_size=tok.vocab_size, max_length=8, hidden_size=32, num_layers=2, num_heads=4
    )
    torch.manual_seed(0)
    model = TextConditionedMMDiT(get_preset("MMDiT-tiny"), tower).eval()
    assert model.config.context_dim == 32 and model.config.context_len == 8
    ids = tok(["a seven", "a two", ""])
    with torch.no_grad():
        tokens, pooled = model.encode_text(ids)
        eos = (ids == EOS_ID).int().argmax(1)
        torch.testing.assert_close(pooled, tokens[torch.arange(3), eos])  # CLIP pools at [EOS]
        out = model(torch.randn(3, 4, 8, 8), torch.rand(3), ids)
    assert out.shape == (3, 4, 8, 8)
    assert model.forward_macs() > model.mmdit.forward_macs() > 0
    assert model.blocks is model.mmdit.blocks  # gradient checkpointing finds the joint blocks


@pytest.fixture(scope="module")
def caption_only_latents(tiny_vae_dir, tmp_path_factory):
    return write_caption_latents(
        str(tmp_path_factory.mktemp("latents") / "captions_only"), tiny_vae_dir, None
    )


@pytest.mark.ray
def test_mmdit_trains_its_own_text_tower_and_samples_from_the_checkpoint_alone(
    ray_session, caption_only_latents, tmp_path
):
    from jobs.train_mmdit import main
    from pipelines.sample import SampleConfig, run_sampling
    from vitdit.checkpoint import load_model
    from vitdit.models.text_tower import TOWER_KIND

    out = tmp_path / "run"
    argv = [
        "--latents", caption_only_latents, "--model", "MMDiT-tiny", "--output", str(out),
        "--val-fraction", "0.1", "--grid-samples", "3", "--grid-steps", "2", "--text-width", "32",
        "--steps", "40", "--global-batch-size", "32", "--lr", "2e-3", "--ema-decay", "0.9",
        "--num-workers", "1", "--cpus-per-worker", "1", "--precision", "fp32",
        "--checkpoint-every", "40", "--log-every", "5", "--eval-every", "40",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses  # tower and MM-DiT learn together

    ckpt = out / "checkpoint_00000040"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["text"]["kind"] == TOWER_KIND and config["text"]["max_length"] == 16
    model, _ = load_model(ckpt)
    assert isinstance(model, TextConditionedMMDiT)
    assert any(k.startswith("text_tower.") for k in model.state_dict())

    samples = run_sampling(
        SampleConfig(
            checkpoint=str(out),
            output=str(tmp_path / "s"),
            num_samples=4,
            batch_size=2,
            sampling_steps=3,
            prompt=("a seven", "digit two"),
            cfg_scale=2.0,
            mlflow=False,
            cpus_per_actor=1,
        )  # fmt: skip
    )
    assert samples.num_generated == 4 and samples.config["text_encoder"] is None
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["arr_0"].shape == (4, 16, 16, 3) and z["arr_1"].tolist() == [0, 1, 0, 1]
    with pytest.raises(VitditError, match="own text tower"):
        run_sampling(
            SampleConfig(
                checkpoint=str(out), output=str(tmp_path / "s2"), prompt=("x",), text_encoder=str(tmp_path)
            )
        )
    assert os.path.isdir(tmp_path / "s" / "images")


def test_data_without_captions_or_embeddings_is_refused(tiny_vae_dir, tmp_path):
    from _train_utils import write_digit_latents

    from pipelines.train.mmdit import MMDiTTask, MMDiTTrainConfig

    plain = write_digit_latents(str(tmp_path / "plain"), tiny_vae_dir, n=64)
    with pytest.raises(VitditError, match="no captions and no text embeddings"):
        MMDiTTask(MMDiTTrainConfig(latents=plain))
