"""``vitdit export``: a diffusers DiTPipeline directory that samples what vitdit's DDIM samples."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from _eval_utils import make_dit_checkpoint
from _tolerance import DIT_TEST_LAYERS, DIT_TEST_N, U_FP32, reassociation_rtol, reassociation_tol

import vitdit.diffusers_dit  # noqa: F401 - the exported transformer's class (see vitdit/export_pipeline.py)
from jobs.cli import main as cli
from vitdit.diffusion import create_diffusion
from vitdit.diffusion.samplers import cfg_model, ddim_sample
from vitdit.dit_release import load_dit
from vitdit.errors import VitditError
from vitdit.export_pipeline import EXPORT_INFO_NAME, export_dit_pipeline, pipeline_vae
from vitdit.vae import decode_latents, load_vae

STEPS = 4  # divides the 1000 training steps: DDIM's "ddim4" and diffusers' "leading" spacing agree


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory, tiny_vae_dir):
    """A DiT-test/2 checkpoint whose every weight matters: a few training steps leave the
    zero-initialised adaLN and output layers (and with them the timestep and label paths) near zero,
    so every weight but the fixed positional table gets N(0, 0.02) added; EMA and raw differ."""
    from safetensors.torch import load_file, save_file

    from vitdit.checkpoint import EMA_NAME, MODEL_NAME

    run_dir = tmp_path_factory.mktemp("export_run")
    path = make_dit_checkpoint(str(run_dir), 30, tiny_vae_dir, train_steps=3)
    raw = load_file(os.path.join(path, MODEL_NAME))
    for name, seed in ((MODEL_NAME, 1), (EMA_NAME, 2)):
        gen = torch.Generator().manual_seed(seed)
        state = {
            k: v if k == "pos_embed" else v + 0.02 * torch.randn(v.shape, generator=gen)
            for k, v in raw.items()
        }
        save_file(state, os.path.join(path, name))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, dit_ckpt):
    out = str(tmp_path_factory.mktemp("export") / "pipe")
    assert cli(["export", dit_ckpt, out]) == 0
    return out


def _load(out: str):
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_sample(pipe, labels: list[int], seeds: list[int], guidance: float):
    """Images in [0, 1] and the latents the pipeline decoded (read at the VAE's first layer)."""
    seen = []
    hook = pipe.vae.post_quant_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipe(
            class_labels=labels,
            guidance_scale=guidance,
            generator=gens,
            num_inference_steps=STEPS,
            output_type="pt",
        )
    finally:
        hook.remove()
    return out.images, seen[0] * pipe.vae.config.scaling_factor  # scaled latents, as vitdit's


def _vitdit_sample(ckpt: str, vae_dir: str, labels: list[int], seeds: list[int], guidance: float):
    """vitdit's DDIM: images in [0, 1], the scaled latents, and (t, max|x_t|, max|ε̂|) of each step."""
    model = load_dit(ckpt)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    fn = model if guidance == 1.0 else cfg_model(model, guidance, null_class=model.config.num_classes)
    steps = []

    def recorded(x, t, y):
        out = fn(x, t, y)
        steps.append((int(t[0]), x.abs().max().item(), out[:, : x.shape[1]].abs().max().item()))
        return out

    diffusion = create_diffusion(f"ddim{STEPS}")
    z = ddim_sample(recorded, diffusion, noise, {"y": torch.tensor(labels)})
    vae = load_vae(vae_dir)
    images = (decode_latents(vae, z, vae) + 1) / 2  # [-1, 1] → the pipeline's [0, 1]
    return images, z, steps, diffusion


def _ddim_tolerance(steps: list[tuple[int, float, float]], guidance: float) -> float:
    """How far apart two float32 DDIM runs of the same model and schedule may end (absolute).

    Per step, the ε̂ of two implementations of the same network (fused vs split qkv, other sums)
    differ by ``reassociation_rtol`` for DiT-test/2 (times |1-s|+|s| under guidance s), and the ᾱ
    that diffusers takes as a float32 product of T = 1000 factors by ``reassociation_rtol(T)``.
    A step x' = √ᾱ' x̂₀ + √(1-ᾱ') ε̂ with x̂₀ = (x - √(1-ᾱ) ε̂)/√ᾱ passes on at most √(ᾱ'/ᾱ) times
    an ε̂ error, and (|x| + |ε̂|)/2 · √(ᾱ'/ᾱ) times a relative ᾱ error; the later steps multiply
    by √(ᾱ''/ᾱ') ..., which telescopes to 1/√ᾱ_t (the chain ends at ᾱ = 1).
    """
    acp = create_diffusion().alphas_cumprod
    r_eps = (abs(1 - guidance) + abs(guidance)) * reassociation_rtol(DIT_TEST_N, DIT_TEST_LAYERS)
    r_acp = reassociation_rtol(1000)
    return sum((r_eps * e + r_acp * (x + e)) / math.sqrt(float(acp[t])) for t, x, e in steps)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_exported_pipeline_samples_what_vitdit_samples(exported, dit_ckpt, tiny_vae_dir, guidance):
    pipe = _load(exported)
    labels, seeds = [0, 3, 9], [11, 12, 13]
    theirs, z_theirs = _pipeline_sample(pipe, labels, seeds, guidance)
    ours, z_ours, steps, diffusion = _vitdit_sample(dit_ckpt, tiny_vae_dir, labels, seeds, guidance)
    # Same timesteps: diffusers' "leading" DDIM spacing and vitdit's "ddimN" respacing.
    pipe.scheduler.set_timesteps(STEPS)
    assert pipe.scheduler.timesteps.tolist() == diffusion.timestep_map.flip(0).tolist()
    torch.testing.assert_close(z_theirs, z_ours, rtol=0.0, atol=_ddim_tolerance(steps, guidance))
    # Images: the same VAE decodes both; they agree far below one 8-bit level.
    assert (theirs - ours).abs().max().item() < 0.5 / 255
    assert not torch.allclose(ours[0], ours[1])  # the samples are not all the same image


def test_exported_directory_contents(exported, dit_ckpt, tiny_vae_dir):
    pipe = _load(exported)
    with open(os.path.join(exported, "model_index.json")) as f:
        index = json.load(f)
    assert index["transformer"] == ["vitdit.diffusers_dit", "DiTReleaseTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["id2label"] == {str(i): str(i) for i in range(10)}
    assert pipe.get_label_ids(["3", "7"]) == [3, 7]
    # DiT's timestep frequencies survive the reload; diffusers' own class would rebuild a shift of 1.
    shifts = {b.norm1.emb.time_proj.downscale_freq_shift for b in pipe.transformer.transformer_blocks}
    assert shifts == {0.0}
    # The label table: 10 classes, the pipeline's null label 1000 = the model's null class (row 10).
    model = load_dit(dit_ckpt)
    table = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    ours = model.y_embedder.embedding_table.weight
    assert table.shape[0] == 1001
    assert torch.equal(table[:10], ours[:10]) and torch.equal(table[1000], ours[10])
    # The scheduler's ᾱ are DiT's linear schedule's (float32 cumulative product: ≤ T·u relative).
    base = create_diffusion()
    torch.testing.assert_close(
        pipe.scheduler.alphas_cumprod.double(), base.alphas_cumprod, rtol=1000 * U_FP32, atol=0.0
    )
    assert pipe.scheduler.config.clip_sample is False
    assert pipe.vae.config.scaling_factor == load_vae(tiny_vae_dir).config.scaling_factor
    with open(os.path.join(exported, EXPORT_INFO_NAME)) as f:
        record = json.load(f)
    assert record["checkpoint"] == dit_ckpt and record["weights"] == "ema" and record["step"] == 30


def test_portable_export_loads_diffusers_class_and_differs(tmp_path, dit_ckpt, tiny_vae_dir):
    """--portable: diffusers' own class, whose reload brings back its timestep frequencies; its
    samples move by more than the tolerance the exact export is held to (what that test detects)."""
    out = str(tmp_path / "portable")
    assert cli(["export", dit_ckpt, out, "--portable"]) == 0
    pipe = _load(out)
    assert type(pipe.transformer).__name__ == "DiTTransformer2DModel"
    assert pipe.transformer.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 1
    labels, seeds = [0, 3, 9], [11, 12, 13]
    _, z_theirs = _pipeline_sample(pipe, labels, seeds, 1.0)
    _, z_ours, steps, _ = _vitdit_sample(dit_ckpt, tiny_vae_dir, labels, seeds, 1.0)
    assert (z_theirs - z_ours).abs().max().item() > _ddim_tolerance(steps, 1.0)


def test_no_ema_exports_the_raw_weights(tmp_path, dit_ckpt):
    out = str(tmp_path / "raw")
    assert cli(["export", dit_ckpt, out, "--no-ema"]) == 0
    pipe = _load(out)
    raw = load_dit(dit_ckpt, use_ema=False)
    assert torch.equal(pipe.transformer.proj_out_2.weight, raw.final_layer.linear.weight)
    with open(os.path.join(out, EXPORT_INFO_NAME)) as f:
        assert json.load(f)["weights"] == "raw"


def test_shift_factor_is_folded_into_post_quant_conv(tiny_vae_dir):
    """DiTPipeline ignores shift_factor: the export moves the shift into the decoder's first layer."""
    scale, shift = 0.5, 0.3
    plain, folded = load_vae(tiny_vae_dir), pipeline_vae(load_vae(tiny_vae_dir), scale, shift)
    assert folded.config.shift_factor is None and folded.config.scaling_factor == scale
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = plain.post_quant_conv(z / scale + shift)
        got = folded.post_quant_conv(z / scale)
    # One 1×1 convolution summing C = 4 products and a bias, in another order.
    torch.testing.assert_close(got, ref, **reassociation_tol(ref, n=4 + 1))
    with torch.no_grad():
        ref_img, got_img = plain.decode(z / scale + shift).sample, folded.decode(z / scale).sample
    assert (got_img - ref_img).abs().max().item() < 0.5 / 255 * 2  # under half an 8-bit level of [-1, 1]


def test_refuses_non_empty_output_unless_overwrite(tmp_path, dit_ckpt, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["export", dit_ckpt, str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert cli(["export", dit_ckpt, str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp dirs left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["export", dit_ckpt, str(empty)]) == 0  # an empty directory is fine
    (tmp_path / "a_file").write_text("x")
    assert cli(["export", dit_ckpt, str(tmp_path / "a_file")]) == 2
    assert "not a directory" in capsys.readouterr().err


def _edited_checkpoint(src: str, dst: str, **changes) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key, value in changes.items():
        config[key] = value(config[key]) if callable(value) else value
    with open(path, "w") as f:
        json.dump(config, f)
    return dst


def test_refuses_what_cannot_be_exported_faithfully(tmp_path, dit_ckpt, tiny_vae_dir, capsys):
    from _vae_utils import make_tiny_vae

    # make_dit_checkpoint's EMA halves every tensor, the positional table too: diffusers would
    # recompute the table and sample from another model.
    halved = make_dit_checkpoint(str(tmp_path / "halved"), 1, tiny_vae_dir, train_steps=1)
    with pytest.raises(VitditError, match="pos_embed"):
        export_dit_pipeline(halved, str(tmp_path / "o0"))

    flow = _edited_checkpoint(
        dit_ckpt, str(tmp_path / "flow"), diffusion=lambda d: {**d, "objective": "flow"}
    )
    with pytest.raises(VitditError, match="rectified-flow"):
        export_dit_pipeline(flow, str(tmp_path / "o1"))
    vit = _edited_checkpoint(dit_ckpt, str(tmp_path / "vit"), kind="vit")
    assert cli(["export", vit, str(tmp_path / "o2")]) == 2
    assert "not a DiT" in capsys.readouterr().err
    wide_vae = make_tiny_vae(tmp_path / "vae8", latent_channels=8)
    with pytest.raises(VitditError, match="8 latent channels"):
        export_dit_pipeline(dit_ckpt, str(tmp_path / "o3"), vae=wide_vae)
    release = tmp_path / "DiT-test-2.pt"
    torch.save(load_dit(dit_ckpt).state_dict(), release)  # a facebookresearch/DiT-style file: no VAE
    with pytest.raises(VitditError, match="records no VAE"):
        export_dit_pipeline(str(release), str(tmp_path / "o4"))
    assert not any((tmp_path / f"o{i}").exists() for i in range(5))
    # With its VAE named, the release file exports.
    assert export_dit_pipeline(str(release), str(tmp_path / "o5"), vae=tiny_vae_dir)["kind"] == "release"


def test_vae_gets_the_factors_the_dit_was_trained_with(tmp_path, dit_ckpt, tiny_vae_dir):
    """The checkpoint's recorded latent factors win over the VAE config's (the DiT learned those)."""
    edited = _edited_checkpoint(
        dit_ckpt, str(tmp_path / "ck"), vae=lambda v: {**v, "scaling_factor": 0.25, "shift_factor": 0.1}
    )
    export_dit_pipeline(edited, str(tmp_path / "out"))
    pipe = _load(str(tmp_path / "out"))
    assert pipe.vae.config.scaling_factor == 0.25 and pipe.vae.config.shift_factor is None
    plain = load_vae(tiny_vae_dir)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = plain.post_quant_conv(z / 0.25 + 0.1)  # vitdit's decode: z / scale + shift
        got = pipe.vae.post_quant_conv(z / 0.25)  # the pipeline's: z / scale
    torch.testing.assert_close(got, ref, **reassociation_tol(ref, n=4 + 1))
    with open(tmp_path / "out" / EXPORT_INFO_NAME) as f:
        assert json.load(f)["latent_shift_factor_folded"] == 0.1
