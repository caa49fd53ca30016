"""Tolerances that follow from the dtypes and sizes compared, not from what one machine produced.

Two evaluations of the same function that differ only in the order of their sums (another batch
size or thread count, another CPU's blocked GEMM kernels: AVX2, AVX-512, AMX; or a second
implementation of the same math: fused vs explicit attention, diffusers vs ours) differ by rounding
error only. Standard floating-point error analysis (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., §3.1 and §3.5):

- A length-``n`` dot product in a precision with unit roundoff ``u`` is off by at most
  ``γ_n Σ|x_i y_i|`` with ``γ_n = n·u / (1 - n·u)``: ``n·u`` relative to the magnitude of the terms
  summed, in the worst case. The worst case needs every rounding to push the same way; roundings
  that behave as independent random variables give ``~√n·u`` (Higham §2.8; Higham and Mary,
  "A new approach to probabilistic rounding error analysis", SISC 2019), which is what blocked
  kernels show in practice. Two evaluations differ by at most the sum of their two errors.
- A network passes the error of each reduction layer (linear, matmul, normalisation) on to the
  next. With normalised activations a layer neither grows nor shrinks it much, and the roundings of
  different layers are independent, so the errors of ``layers`` chained reductions of length at most
  ``n`` add like a random walk, as one reduction of length ``layers·n``: ``~√(layers·n)·u``.
- The error is relative to the magnitude of the *terms*, not of the result: an output near zero is
  the cancellation of large terms and keeps their absolute error. The scale used here is the largest
  magnitude of the reference, ``ref.abs().max()``; the tolerance is ``atol = rel·scale`` (plus the
  same ``rtol``, which only matters for the largest elements).

``MARGIN`` (8) covers what the estimate leaves out: the largest of many compared elements lies ~4
standard deviations out (4×), and layers of randomly initialised test networks have gains somewhat
above one (2×). A wrong code path (a dropped term, a mis-mapped weight) shows as an O(1) relative
error, orders of magnitude above any tolerance this gives for the sizes the tests use.

A check, not the basis: on an AMD EPYC (AVX-512, AVX512-BF16) with 1 and 2 threads, and with ATen,
oneDNN and MKL capped at AVX2 (and at SSE4.1 with MKL_CBWR=COMPATIBLE), no comparison using these
tolerances came within 6% of its bound.

Rounding the *inputs* to a narrower type (bf16 autocast) is not a reassociation: each rounding adds
u/√3 relative rms error whatever the sum's length (see tests/unit/test_layers.py).
"""

from __future__ import annotations

import math

import torch

#: Unit roundoff u = 2^-p (p: significand bits, the implicit bit included), round to nearest.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,  # ≈ 6.0e-8
    torch.float16: 2.0**-11,  # ≈ 4.9e-4
    torch.bfloat16: 2.0**-8,  # ≈ 3.9e-3
}
U_FP32 = UNIT_ROUNDOFF[torch.float32]
U_BF16 = UNIT_ROUNDOFF[torch.bfloat16]

#: Estimate → tolerance: 4× for the extreme element over many, 2× for layer gains above one.
MARGIN = 8.0

#: Chained reductions per transformer block: qkv, q·kᵀ, the softmax sum, weights·v, proj, two
#: LayerNorms, fc1, fc2. A model of ``b`` blocks counts ``TRANSFORMER_BLOCK_LAYERS·b`` plus its
#: embedding and head layers.
TRANSFORMER_BLOCK_LAYERS = 9

#: DiT-test/2 (the tests' DiT) in these terms: its longest reduction is the timestep MLP's 256-d
#: input; 2 blocks, plus patch embedding, the timestep MLP's two linears, final norm and linear.
DIT_TEST_N, DIT_TEST_LAYERS = 256, 2 * TRANSFORMER_BLOCK_LAYERS + 5


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of ``dtype``: the largest relative error of rounding one real number to it."""
    return UNIT_ROUNDOFF[dtype]


def reassociation_rtol(
    n: int, layers: int = 1, dtype: torch.dtype = torch.float32, margin: float = MARGIN
) -> float:
    """The relative error (to the scale of the values) by which two evaluations of the same
    function may differ when only their summation order differs: ``margin·√(layers·n)·u``.

    ``n``: the longest reduction (inner dimension) of any layer; ``layers``: the number of chained
    reduction layers from input to output; ``dtype``: the precision the reductions round to.
    Also the bound for a norm-wise relative error ‖a − b‖ / ‖b‖.
    """
    if n < 1 or layers < 1:
        raise ValueError(f"n and layers must be >= 1, got n={n}, layers={layers}")
    return margin * math.sqrt(layers * n) * unit_roundoff(dtype)


def reassociation_tol(
    ref: torch.Tensor,
    n: int,
    layers: int = 1,
    dtype: torch.dtype | None = None,
    gain: float = 1.0,
    margin: float = MARGIN,
) -> dict[str, float]:
    """``rtol``/``atol`` keywords for ``torch.testing.assert_close``/``torch.allclose`` comparing
    ``ref`` with another evaluation of the same function in another summation order.

    ``atol = rel·max|ref|`` (see the module docstring: the error scales with the terms summed, not
    with each output) and ``rtol = rel``, where ``rel = reassociation_rtol(n, layers, dtype)``.
    ``dtype`` defaults to ``ref``'s. ``gain`` multiplies both for a linear map applied to the
    compared outputs afterwards, e.g. classifier-free guidance ``(1 - s)·uncond + s·cond`` passes on
    ``|1 - s| + |s|`` times its inputs' error.
    """
    rel = gain * reassociation_rtol(n, layers, ref.dtype if dtype is None else dtype, margin)
    scale = ref.detach().abs().max().item() if ref.numel() else 0.0
    return {"rtol": rel, "atol": rel * scale}
