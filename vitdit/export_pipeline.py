"""Export a vitdit DiT checkpoint as a diffusers ``DiTPipeline`` directory (``vitdit export``).

The directory holds what ``DiTPipeline.from_pretrained(OUT)`` loads: ``transformer/`` (the DiT's
weights in diffusers' layout, :func:`vitdit.export.dit_to_diffusers`), ``vae/`` (the checkpoint's
AutoencoderKL), ``scheduler/`` (a ``DDIMScheduler`` on the checkpoint's noise schedule) and
``model_index.json`` (with ``id2label`` from the class names), plus ``vitdit_export.json`` saying
where it came from. Sampling it with DDIM matches ``vitdit sample --sampler ddim --cfg-scale s``
from the same checkpoint and noise to float32 rounding (tests/test_export_pipeline.py), because:

- **Timestep frequencies.** diffusers' DiT rebuilds its timestep embedding with frequencies
  10000^(-i/127) on every load; DiT's are 10000^(-i/128). The transformer is saved as
  :class:`vitdit.diffusers_dit.DiTReleaseTransformer2DModel`, which restores DiT's on load, so
  ``import vitdit.diffusers_dit`` must precede ``from_pretrained`` (diffusers imports no module a
  directory names). ``portable=True`` (``--portable``) saves diffusers' own class instead: it loads
  without vitdit, but computes another function of the same weights. Measured on a quickstart
  ``DiT-digits/2`` (EMA, step 2500), 10 samples of 50-step DDIM from the same noise, against
  ``vitdit``'s sampler, images in [0, 1]: portable up to 0.061 apart (15 8-bit levels; mean 0.0057),
  the default class up to 1.1e-6 (float32 rounding), with and without guidance (scale 3).
- **Latent scale and shift.** ``DiTPipeline`` decodes ``latents / vae.config.scaling_factor`` and
  ignores ``shift_factor``; the DiT was trained on ``(raw - shift) · scale`` with the factors its
  config.json records. The exported VAE carries the recorded ``scaling_factor``, and a shift is
  folded into the bias of ``post_quant_conv`` (the first layer ``decode`` applies, a 1×1
  convolution: ``W(z/s + shift) + b = W z/s + (b + W·shift)``), its ``shift_factor`` set to None.
  That VAE decodes for this pipeline; its encoder is unchanged.
- **Classifier-free guidance.** ``DiTPipeline`` uses label 1000 as the null class. A model with
  fewer classes that was trained with label dropout gets a label table of 1000 rows plus its null
  row at index 1000 (rows ``num_classes..999``, which no class name maps to, hold the null
  embedding too), so ``guidance_scale > 1`` works and guides all latent channels, as
  ``vitdit sample`` does by default. A model trained without label dropout has no null class:
  use ``guidance_scale=1``.
- **Sampler.** ``DDIMScheduler`` with ``clip_sample=False``, ``set_alpha_to_one=True`` and
  "leading" spacing takes the timesteps of DDIM's "ddimN" respacing when N divides the training
  steps (50 of 1000: both 980, 960, ..., 0). ``DiTPipeline`` drops the learned-variance channels,
  which deterministic DDIM does not use.

Refused, because the pipeline cannot reproduce them: a checkpoint trained with another objective
than Gaussian diffusion (a rectified-flow DiT), an architecture diffusers' DiT lacks
(``dit_to_diffusers``), a ``pos_embed`` other than DiT's fixed sin-cos table (diffusers recomputes
it), a VAE whose latent channels differ from the DiT's, a shift on a VAE without
``post_quant_conv``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Any

import torch

import vitdit
from vitdit.errors import VitditError

log = logging.getLogger(__name__)

EXPORT_INFO_NAME = "vitdit_export.json"
# DiTPipeline.__call__ hard-codes the null (unconditional) label 1000, ImageNet's class count.
PIPELINE_NULL_CLASS = 1000
# diffusion["objective"] values that mean the Gaussian ε-prediction diffusion this export maps.
_DIFFUSION_OBJECTIVES = (None, "diffusion", "ddpm", "gaussian")


def ddim_scheduler(diffusion: dict[str, Any]):
    """A ``DDIMScheduler`` on the noise schedule of a checkpoint's ``diffusion`` settings.

    The same β as :func:`vitdit.diffusion.get_beta_schedule` (diffusers computes them in float32):
    "linear" is DDPM's 1e-4 → 0.02 scaled by 1000/T, "cosine" is diffusers' ``squaredcos_cap_v2``.
    """
    from diffusers import DDIMScheduler

    schedule = diffusion.get("noise_schedule", "linear")
    steps = int(diffusion.get("diffusion_steps", 1000))
    if schedule == "linear":
        scale = 1000.0 / steps  # ADM/DiT rescale the linear schedule for T != 1000
        betas = {"beta_schedule": "linear", "beta_start": scale * 1e-4, "beta_end": scale * 0.02}
    elif schedule == "cosine":
        betas = {"beta_schedule": "squaredcos_cap_v2"}
    else:
        raise VitditError(f"noise_schedule {schedule!r} has no diffusers scheduler equivalent here")
    return DDIMScheduler(
        num_train_timesteps=steps,
        clip_sample=False,  # vitdit's DDIM does not clip x0 (latents are not bounded to [-1, 1])
        set_alpha_to_one=True,  # the last step lands on ᾱ = 1, as the respaced chain's ᾱ_prev(0)
        steps_offset=0,
        prediction_type="epsilon",
        timestep_spacing="leading",
        **betas,
    )


def _check_objective(checkpoint: str, diffusion: dict[str, Any]) -> None:
    objective = diffusion.get("objective")
    if objective == "flow":
        raise VitditError(
            f"--checkpoint {checkpoint}: trained with the rectified-flow objective; DiTPipeline samples "
            "ε-prediction diffusion models only, so it cannot be exported faithfully"
        )
    if objective not in _DIFFUSION_OBJECTIVES:
        raise VitditError(f"--checkpoint {checkpoint}: unknown training objective {objective!r}")


def _check_pos_embed(model) -> None:
    """diffusers recomputes the positional table: the model's must be DiT's fixed sin-cos one."""
    from vitdit.models.dit import sincos_pos_embed_2d

    cfg = model.config
    grid = cfg.input_size // cfg.patch_size
    table = torch.from_numpy(sincos_pos_embed_2d(cfg.hidden_size, grid)).float().unsqueeze(0)  # 1, T, D
    # Sines and cosines in [-1, 1] computed in float64 and rounded to float32: two computations
    # differ by an ulp (6e-8) at most; 1e-6 allows that and no trained or altered table.
    if model.pos_embed.shape != table.shape or not torch.allclose(
        model.pos_embed.float().cpu(), table, atol=1e-6
    ):
        raise VitditError(
            "the DiT's pos_embed is not the fixed sin-cos table that diffusers' DiT recomputes on load, "
            "so it cannot be exported faithfully"
        )


def pipeline_transformer(model, portable: bool = False):
    """The DiT as the transformer of a ``DiTPipeline`` (eval mode, fp32).

    ``portable=False``: a :class:`~vitdit.diffusers_dit.DiTReleaseTransformer2DModel` (exact after
    reload); True: diffusers' ``DiTTransformer2DModel`` (see the module docstring). The label table
    is padded so that the pipeline's null label 1000 is the model's null class.
    """
    from diffusers import DiTTransformer2DModel

    from vitdit.export import dit_to_diffusers

    cfg = model.config
    _check_pos_embed(model)
    ref = dit_to_diffusers(model.float())
    kwargs = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    state = ref.state_dict()
    if cfg.class_dropout_prob > 0 and cfg.num_classes < PIPELINE_NULL_CLASS:
        kwargs["num_embeds_ada_norm"] = PIPELINE_NULL_CLASS
        for key in [k for k in state if k.endswith("class_embedder.embedding_table.weight")]:
            table = state[key]  # num_classes + 1, D: the null row last
            null = table[cfg.num_classes :]  # 1, D
            pad = null.expand(PIPELINE_NULL_CLASS + 1 - table.shape[0], -1)  # 1000 - num_classes, D
            state[key] = torch.cat([table[: cfg.num_classes], pad, null], dim=0)  # 1001, D
    elif cfg.class_dropout_prob > 0 and cfg.num_classes != PIPELINE_NULL_CLASS:
        log.warning(
            "the model has %d classes: DiTPipeline's null label %d is one of them, so its guidance "
            "(guidance_scale > 1) is not classifier-free guidance for this model",
            cfg.num_classes,
            PIPELINE_NULL_CLASS,
        )
    if portable:
        cls = DiTTransformer2DModel
    else:
        from vitdit.diffusers_dit import DiTReleaseTransformer2DModel as cls
    transformer = cls(**kwargs)
    transformer.load_state_dict(state, strict=True)
    return transformer.eval()


def pipeline_vae(vae, scaling_factor: float, shift_factor: float | None):
    """``vae`` prepared for ``DiTPipeline``'s decode (``latents / scaling_factor``, no shift).

    A shift is folded into ``post_quant_conv``'s bias (see the module docstring).
    """
    shift = float(shift_factor or 0.0)
    if shift:
        conv = getattr(vae, "post_quant_conv", None)
        if not isinstance(conv, torch.nn.Conv2d) or conv.kernel_size != (1, 1):
            raise VitditError(
                f"the VAE's latents are shifted by {shift} and it has no 1×1 post_quant_conv to fold "
                "the shift into; DiTPipeline ignores shift_factor, so it cannot be exported faithfully"
            )
        with torch.no_grad():
            w = conv.weight[:, :, 0, 0].double()  # C_out, C_in
            bias = conv.bias.double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
            folded = bias + w.sum(dim=1) * shift  # W·(shift, ..., shift) + b
            if conv.bias is None:
                conv.bias = torch.nn.Parameter(folded.to(conv.weight.dtype))
            else:
                conv.bias.copy_(folded.to(conv.bias.dtype))
    vae.register_to_config(scaling_factor=float(scaling_factor), shift_factor=None)
    return vae


def _check_output(output: str, overwrite: bool) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise VitditError(f"OUT {output}: exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise VitditError(
            f"OUT {output}: exists and is not empty; choose another directory or pass --overwrite"
        )


def export_dit_pipeline(
    checkpoint: str,
    output: str,
    vae: str | None = None,
    use_ema: bool = True,
    overwrite: bool = False,
    portable: bool = False,
) -> dict[str, Any]:
    """Write the ``DiTPipeline`` directory of a DiT checkpoint to ``output``; returns what
    ``vitdit_export.json`` records.

    ``checkpoint``: a checkpoint directory, a run directory (its latest checkpoint) or a
    facebookresearch/DiT ``.pt`` (which needs ``vae``). ``vae``: a hub name or local diffusers
    directory (default: the checkpoint's). The directory appears complete or not at all (written
    beside it, then renamed); a non-empty ``output`` is replaced only with ``overwrite``.
    """
    from diffusers import DiTPipeline

    from vitdit.dit_release import checkpoint_info, load_dit
    from vitdit.vae import load_vae, vae_identity

    output = os.path.abspath(os.path.expanduser(output))
    _check_output(output, overwrite)
    info = checkpoint_info(checkpoint)
    diffusion = dict(info["diffusion"])
    _check_objective(checkpoint, diffusion)
    recorded = info["vae"] or {}
    vae_name = vae or recorded.get("name_or_path")
    if not vae_name:
        raise VitditError(f"--checkpoint {checkpoint}: records no VAE; pass --vae")
    mc = info["model_config"]
    names = [str(n) for n in info["class_names"]]
    if len(names) != int(mc["num_classes"]):
        raise VitditError(
            f"--checkpoint {checkpoint}: {len(names)} class names for {mc['num_classes']} classes"
        )

    model = load_dit(checkpoint, use_ema=use_ema)
    transformer = pipeline_transformer(model, portable=portable)
    autoencoder = load_vae(vae_name)
    identity = vae_identity(autoencoder, vae_name)
    if autoencoder.config.latent_channels != model.config.in_channels:
        raise VitditError(
            f"--vae {vae_name}: {autoencoder.config.latent_channels} latent channels, the DiT takes "
            f"{model.config.in_channels}"
        )
    if recorded.get("sha256") and identity.sha256 and identity.sha256 != recorded["sha256"]:
        log.warning("--vae %s differs from the VAE the checkpoint was trained with (%s)", vae_name, recorded)
    # The factors the DiT's training latents were scaled with, else (a release file) the VAE's own.
    scaling = float(recorded.get("scaling_factor") or identity.scaling_factor)
    shift = recorded.get("shift_factor") if recorded else identity.shift_factor
    if abs(scaling - identity.scaling_factor) > 1e-6 * abs(scaling):
        log.warning(
            "the checkpoint's latents were scaled by %s, --vae %s says %s: the export uses the checkpoint's",
            scaling, vae_name, identity.scaling_factor,
        )  # fmt: skip
    autoencoder = pipeline_vae(autoencoder, scaling, shift)
    scheduler = ddim_scheduler({**{"noise_schedule": "linear", "diffusion_steps": 1000}, **diffusion})

    id2label = {str(i): name for i, name in enumerate(names)}
    pipe = DiTPipeline(transformer=transformer, vae=autoencoder, scheduler=scheduler, id2label=id2label)
    # DiTPipeline keeps id2label only as its lookup table; in the config it reaches model_index.json.
    pipe.register_to_config(id2label=id2label)
    record = {
        "format": 1,
        "checkpoint": info["path"],
        "kind": info["kind"],
        "step": info["step"],
        "weights": "ema" if use_ema else "raw",
        "model_config": mc,
        "diffusion": diffusion,
        "vae": {"name_or_path": identity.name_or_path, "sha256": identity.sha256},
        "latent_scaling_factor": scaling,
        "latent_shift_factor_folded": shift,
        "transformer_class": type(transformer).__module__ + "." + type(transformer).__name__,
        # The label that gives the model's null class in the pipeline (None: no guidance).
        "null_class": PIPELINE_NULL_CLASS
        if mc.get("class_dropout_prob", 0) > 0 and int(mc["num_classes"]) <= PIPELINE_NULL_CLASS
        else None,
        "vitdit_version": vitdit.__version__,
    }

    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, EXPORT_INFO_NAME), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        if os.path.isdir(output):
            _check_output(output, overwrite)  # still true: nothing appeared meanwhile unless allowed
            old = os.path.join(parent, f".{os.path.basename(output)}.old-{uuid.uuid4().hex[:8]}")
            os.rename(output, old)
            os.rename(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s weights) to %s", info["path"], record["weights"], output)
    return record


__all__ = [
    "EXPORT_INFO_NAME",
    "ddim_scheduler",
    "export_dit_pipeline",
    "pipeline_transformer",
    "pipeline_vae",
]
