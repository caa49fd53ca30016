"""diffusers' ``DiTTransformer2DModel`` with DiT's timestep frequencies, kept through save and load.

diffusers' DiT embeds the timestep with frequencies 10000^(-i/127) (``downscale_freq_shift=1``,
hard-coded in its constructor); facebookresearch/DiT, and so vitdit, uses 10000^(-i/128). The shift
is not part of diffusers' config, so a plain ``DiTTransformer2DModel`` reloaded from disk computes
another function of the same weights (vitdit/export.py gives the measured differences). This
subclass sets DiT's shift of 0 on every block whenever it is built, by ``from_pretrained`` included,
so a saved export reloads exactly. Its constructor is diffusers' (same config keys).

diffusers loads a component named by its module path in ``model_index.json`` only when that module
is already imported: ``import vitdit.diffusers_dit`` before ``DiTPipeline.from_pretrained``.
"""

from __future__ import annotations

import functools

# ModelMixin is exported on purpose: diffusers picks a component's loading method by looking its
# base classes (ModelMixin, ...) up in the module that model_index.json names, i.e. this one.
from diffusers import DiTTransformer2DModel, ModelMixin  # noqa: F401

from vitdit.export import set_dit_timestep_shift


class DiTReleaseTransformer2DModel(DiTTransformer2DModel):
    """``DiTTransformer2DModel`` whose timestep embedding uses DiT's frequencies (shift 0)."""

    # wraps: diffusers reads the constructor's signature to map config.json onto its arguments.
    @functools.wraps(DiTTransformer2DModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        set_dit_timestep_shift(self, 0.0)


__all__ = ["DiTReleaseTransformer2DModel", "ModelMixin"]
