"""The two attention paths ("sdpa" and "math") compute the same function, forward and backward.

Tolerances: fp32 paths differ only in summation order (observed max |Δ| ~1e-7 on O(1) values), so
atol 1e-5. Under bf16 autocast the linears run in bf16 (8-bit mantissa, relative rounding 2^-8 ≈
4e-3) and the two paths round intermediate products at different points, so we compare each against
the fp32 reference with a relative L2 error of at most 1e-2 (observed 3.4e-3 to 4.0e-3 for outputs,
input and weight gradients on both paths: about one bf16 rounding, with 2.5× margin).
"""

from __future__ import annotations

import pytest
import torch

from vitdit.models import create_model
from vitdit.models.layers import ATTN_IMPLS, Attention, attention, set_attn_impl


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
    for impl in ATTN_IMPLS:
        assert torch.allclose(attention(q, k, v, impl), ref, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention"):
        attention(q, k, v, "flash3")


def test_sdpa_and_math_agree_fp32():
    x = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(1))
    out_s, gx_s, g_s = _run("sdpa", x, autocast=False)
    out_m, gx_m, g_m = _run("math", x, autocast=False)
    assert torch.allclose(out_s, out_m, atol=1e-5)
    assert torch.allclose(gx_s, gx_m, atol=1e-5)
    for name in g_s:
        assert torch.allclose(g_s[name], g_m[name], atol=1e-5), name


def test_sdpa_and_math_agree_bf16_autocast():
    x = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(1))
    ref_out, ref_gx, ref_g = _run("math", x, autocast=False)
    for impl in ATTN_IMPLS:
        out, gx, grads = _run(impl, x, autocast=True)
        assert out.dtype == torch.float32  # compared in fp32
        assert _rel(out, ref_out) < 1e-2, impl
        assert _rel(gx, ref_gx) < 1e-2, impl
        for name in ref_g:
            assert _rel(grads[name], ref_g[name]) < 1e-2, (impl, name)


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
    assert torch.allclose(outs["sdpa"], outs["math"], atol=1e-5)
    assert torch.allclose(grads["sdpa"], grads["math"], atol=1e-5)
    assert grads["sdpa"].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_tanh_gelu_is_the_same_function(dtype):
    """Under torch.compile gelu_tanh is written through sigmoid (faster on CPU); it must stay
    ``F.gelu(approximate="tanh")`` in value and gradient. fp32: round-off only (observed ~5e-7);
    bf16 output: at most one bf16 rounding apart (2^-8 relative)."""
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
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert _rel(ya, yb) < tol
    assert _rel(xa.grad, xb.grad) < tol
    # Eager runs aten's kernel itself, bit for bit.
    assert torch.equal(TanhGELU()(x), torch.nn.functional.gelu(x, approximate="tanh"))
