"""The two attention paths ("sdpa" and "math") compute the same function, forward and backward.

Tolerances: fp32 paths differ only in summation order, so they get the reassociation tolerance of
tests/_tolerance.py for their reduction lengths and depth. Under bf16 autocast the linears and the
attention round their inputs and outputs to bf16 (unit roundoff u = 2^-8 ≈ 3.9e-3), at different
points on the two paths, so each is compared with the fp32 reference by relative L2 error: a rounding
to bf16 adds u/√3 of relative rms error (uniform on ±u), about 6 chained roundings forward and as many
backward give √12·u/√3 = 2u, and a norm-wise error needs no extreme-element margin, so 2× that:
BF16_REL_L2 = 4u ≈ 1.6e-2 (about 1u occurs, with every ISA tried).
"""

from __future__ import annotations

import pytest
import torch
from _tolerance import DIT_TEST_LAYERS, DIT_TEST_N, U_BF16, U_FP32, reassociation_tol

from vitdit.models import create_model
from vitdit.models.layers import ATTN_IMPLS, Attention, attention, set_attn_impl

BF16_REL_L2 = 4 * U_BF16  # see the module docstring


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _run(impl: str, x: torch.Tensor, autocast: bool):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, attn_impl=impl)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = attn(x)
    out.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
    return out.float().detach(), x.grad.clone(), grads


def test_attention_function_paths_agree():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=gen) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1) @ v
    # q·kᵀ over d = 8, the softmax sum and weights·v over 10 keys: 3 chained reductions, n = 10.
    tol = reassociation_tol(ref, n=10, layers=3)
    for impl in ATTN_IMPLS:
        assert torch.allclose(attention(q, k, v, impl), ref, **tol)
    with pytest.raises(ValueError, match="unknown attention"):
        attention(q, k, v, "flash3")


def test_sdpa_and_math_agree_fp32():
    x = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(1))
    out_s, gx_s, g_s = _run("sdpa", x, autocast=False)
    out_m, gx_m, g_m = _run("math", x, autocast=False)
    # Forward: qkv (32), q·kᵀ, softmax, weights·v (17 tokens), proj (32): 5 reductions, n ≤ 32. The
    # backward runs them again in reverse; weight gradients reduce over 3·17 = 51 tokens.
    assert torch.allclose(out_s, out_m, **reassociation_tol(out_m, n=32, layers=5))
    assert torch.allclose(gx_s, gx_m, **reassociation_tol(gx_m, n=51, layers=10))
    for name in g_s:
        assert torch.allclose(g_s[name], g_m[name], **reassociation_tol(g_m[name], n=51, layers=10)), name


def test_sdpa_and_math_agree_bf16_autocast():
    x = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(1))
    ref_out, ref_gx, ref_g = _run("math", x, autocast=False)
    for impl in ATTN_IMPLS:
        out, gx, grads = _run(impl, x, autocast=True)
        assert out.dtype == torch.float32  # compared in fp32
        assert _rel(out, ref_out) < BF16_REL_L2, impl
        assert _rel(gx, ref_gx) < BF16_REL_L2, impl
        for name in ref_g:
            assert _rel(grads[name], ref_g[name]) < BF16_REL_L2, (impl, name)


def test_set_attn_impl_switches_a_whole_dit():
    """The model-level switch gives the same DiT outputs and gradients on both paths (fp32)."""
    torch.manual_seed(0)
    model = create_model("DiT-test/2")
    with torch.no_grad():  # non-zero adaLN and output layers, so attention reaches the output
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.05)
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 10])
    outs, grads = {}, {}
    for impl in ATTN_IMPLS:
        set_attn_impl(model, impl)
        assert all(m.attn_impl == impl for m in model.modules() if isinstance(m, Attention))
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        outs[impl] = out.detach()
        grads[impl] = model.blocks[0].attn.qkv.weight.grad.clone()
    # DiT-test/2's reductions (tests/_tolerance.py); the gradient's backward pass doubles the chain.
    n, layers = DIT_TEST_N, DIT_TEST_LAYERS
    assert torch.allclose(outs["sdpa"], outs["math"], **reassociation_tol(outs["math"], n, layers))
    assert torch.allclose(grads["sdpa"], grads["math"], **reassociation_tol(grads["math"], n, 2 * layers))
    assert grads["sdpa"].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_tanh_gelu_is_the_same_function(dtype):
    """Under torch.compile gelu_tanh is written through sigmoid (faster on CPU); it must stay
    ``F.gelu(approximate="tanh")`` in value and gradient. fp32: each side is ~12 elementwise
    roundings (≤ u = 2^-24 each; tanh, exp within ~1 ulp), which the derivative's x·(1 - tanh²)
    term amplifies up to ~3× for |x| ≲ 10: 2 sides · 12 · 3 ≈ 72u, so 128u (observed ≤ 7u). bf16:
    both compute in fp32 and round once, so they are at most one bf16 ulp apart: 2u = 2^-7."""
    from vitdit.models.layers import TanhGELU, gelu_tanh

    x = (torch.randn(64, 48) * 3).to(dtype)
    compiled = torch.compile(gelu_tanh, backend="inductor", fullgraph=True)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = compiled(xa)
    yb = torch.nn.functional.gelu(xb, approximate="tanh")
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert ya.dtype == dtype
    tol = 128 * U_FP32 if dtype == torch.float32 else 2 * U_BF16  # see the docstring
    assert _rel(ya, yb) < tol
    assert _rel(xa.grad, xb.grad) < tol
    # Eager runs aten's kernel itself, bit for bit.
    assert torch.equal(TanhGELU()(x), torch.nn.functional.gelu(x, approximate="tanh"))
