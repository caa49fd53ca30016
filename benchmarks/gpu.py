"""Training throughput and MFU on one GPU: vitdit's DiT, MM-DiT and ViT against diffusers and transformers.

Runbook (an H100/H200, from the repo root, nothing installed but torch + diffusers; ~10 minutes)::

    PYTHONPATH=. python benchmarks/gpu.py            # writes $OUT/gpu_bench.json when $OUT is set
    PYTHONPATH=. python benchmarks/gpu.py --smoke    # tiny CPU run (what tests/test_benchmarks.py does)

Measures, each as a full training step (forward, loss, backward, AdamW step) on random data:

- DiT-XL/2 at 256 px (32×32×4 latents): vitdit ``DiT`` vs diffusers ``DiTTransformer2DModel`` of the
  same configuration, bf16 autocast, eager and ``torch.compile`` (compiled per block, "regional
  compilation": every block shares one graph, so compiling costs one block, not 28);
- ViT-B/16 at 224 px: vitdit ``ViT`` vs transformers ``ViTModel`` + a linear head (skipped when
  transformers is not importable);
- SD3-Medium's MM-DiT at 1024 px (128×128×16 latents, 4096 image + 333 text tokens): vitdit
  ``MMDiT`` vs diffusers ``SD3Transformer2DModel`` of the same configuration, bf16 autocast, eager and
  compiled (``--mmdit-batch``, ``--mmdit-size`` for another latent side);
- SD-VAE (the Stable Diffusion AutoencoderKL architecture, random weights) encoding images/s.

MFU = images/s × 6 × forward MACs / peak, with the peak from a table (H100/H200 SXM: 989 TFLOP/s
dense bf16) and also relative to a measured 8192³ bf16 matmul. Only torch, diffusers, safetensors
and numpy are imported (no Ray, no MLflow): ``benchmarks/train_step.py`` reuses these helpers on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/gpu.py` from anywhere


def table_peak(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak FLOP/s from vitdit.mfu's table (None: unknown, CPU)."""
    from vitdit.mfu import gpu_peak_tflops

    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    tflops = gpu_peak_tflops(name, "bf16")  # H100/H200 SXM: 989.4 dense bf16
    return name, tflops * 1e12 if tflops else None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process (CPU benchmarks); True where it took.

    PyTorch's CPU allocator returns each step's activations to malloc. With glibc's defaults, large
    blocks are mmap-ed and unmapped again, or trimmed off the heap, so the next step faults every page
    back in: 53-56 thousand minor faults per DiT-S/2 step (batch 8, bf16, compiled) with both sides'
    models in one process, ~10 thousand with one model alone, 0-180 with this; 0.13-0.16 s of system
    time per step before. How many depends on the heap's history, i.e. on the other side's
    allocations, so a paired benchmark would charge one side for the other's fragmentation. With a
    1 GiB mmap threshold and no trimming the process keeps its peak and stops faulting. Not applied
    to training: an RSS that never shrinks is the wrong default for a long job's worker.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is unavailable)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul(device: torch.device, dtype: torch.dtype, n: int, iters: int = 10) -> float:
    """Achieved FLOP/s of an n×n×n matmul (2n³ FLOPs), after warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def autocast(device: torch.device, precision: str):
    """bf16 autocast (weights stay fp32, as the trainer does) or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision {precision!r}")


def time_step(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of ``step`` (median of ``iters`` timed calls after ``warmup`` calls)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    if not times:
        return float("nan")
    times.sort()
    return times[len(times) // 2]


def compile_blocks(blocks: nn.ModuleList) -> None:
    """Regional compilation: each block compiled in place; identical blocks reuse one graph."""
    for block in blocks:
        block.compile()


def apply_compile(model: nn.Module, blocks: nn.ModuleList, scope: str) -> None:
    """``scope`` "blocks" (regional, compiles one block's graph) or "model" (whole forward, longer)."""
    if scope == "blocks":
        compile_blocks(blocks)
    elif scope == "model":
        model.compile()
    else:
        raise ValueError(f"unknown compile scope {scope!r}")


def profile_step(step: Callable[[], None], device: torch.device, label: str, rows: int = 12) -> None:
    """Print the ops that take the most device (or CPU) time over two steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- profile {label} ---", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)


def train_step_fn(
    model: nn.Module,
    forward: Callable[[], torch.Tensor],
    target: torch.Tensor | None,
    device: torch.device,
    precision: str,
    labels: torch.Tensor | None = None,
) -> Callable[[], None]:
    """One AdamW training step: MSE to ``target`` (DiT) or cross-entropy to ``labels`` (ViT)."""
    # Fused AdamW on both sides, as vitdit's trainer runs it (pipelines/train/loop.make_optimizer):
    # the optimizer belongs to the harness, not to either model.
    fused = device.type in ("cpu", "cuda")
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        if fused
        else torch.optim.AdamW(model.parameters(), lr=1e-4)
    )

    def step() -> None:
        with autocast(device, precision):
            out = forward()
        out = out.float()
        loss = F.mse_loss(out, target) if labels is None else F.cross_entropy(out, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# --- DiT --------------------------------------------------------------------------------------------
def build_dit(side: str, name: str, device: torch.device) -> nn.Module:
    """vitdit's DiT preset, or diffusers' DiTTransformer2DModel of the same configuration."""
    from vitdit.models import create_model, get_preset

    if side == "vitdit":
        with torch.device(device):  # initialise in place: DiT-XL/2 is 675M parameters
            return create_model(name)
    from diffusers import DiTTransformer2DModel

    c = get_preset(name)
    with torch.device(device):
        return DiTTransformer2DModel(
            num_attention_heads=c.num_heads,
            attention_head_dim=c.hidden_size // c.num_heads,
            in_channels=c.in_channels,
            out_channels=c.in_channels * (2 if c.learn_sigma else 1),
            num_layers=c.depth,
            sample_size=c.input_size,
            patch_size=c.patch_size,
            num_embeds_ada_norm=c.num_classes,
            norm_eps=1e-6,  # DiT's value (docs/facts.md)
        )


def forward_macs(name: str) -> int:
    """Forward MACs per sample of a preset, counted on the meta device (no memory, no init)."""
    from vitdit.models import create_model

    with torch.device("meta"):
        return create_model(name).forward_macs()


def set_peer_attention(peer: nn.Module, attn: str) -> None:
    """diffusers: "sdpa" is its default AttnProcessor2_0, "math" the matmul-softmax-matmul AttnProcessor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    for m in peer.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor() if attn == "math" else AttnProcessor2_0())


def dit_train_step(name: str, batch: int, device: torch.device, s: dict) -> Callable[[], None]:
    """One DiT training step on random data at setting ``s`` {side, precision, compile, attn}."""
    from vitdit.models import get_preset
    from vitdit.models.layers import set_attn_impl

    c = get_preset(name)
    side = s["side"]
    torch.manual_seed(0)
    model = build_dit(side, name, device)
    if side == "vitdit":
        set_attn_impl(model, s["attn"])
    else:
        set_peer_attention(model, s["attn"])
    model.train()
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, c.num_classes, (batch,), device=device)
    target = torch.randn(batch, c.in_channels * (2 if c.learn_sigma else 1), c.input_size, c.input_size,
                         device=device)  # fmt: skip
    if s["compile"]:
        blocks = model.blocks if side == "vitdit" else model.transformer_blocks
        apply_compile(model, blocks, s.get("scope", "blocks"))
    if side == "vitdit":
        fwd = lambda: model(x, t, y)  # noqa: E731
    else:
        fwd = lambda: model(hidden_states=x, timestep=t, class_labels=y).sample  # noqa: E731
    return train_step_fn(model, fwd, target, device, s["precision"])


def bench_dit(
    name: str,
    batch: int,
    device: torch.device,
    settings: list[dict],
    warmup: int,
    iters: int,
    rounds: int = 1,
    inspect: Callable[[Callable[[], None]], dict] | None = None,
) -> list[dict]:
    """images/s of one training step for each setting {side, precision, compile, attn}."""
    make = functools.partial(dit_train_step, name, batch, device)
    ordered = [s for side in ("vitdit", "diffusers") for s in settings if s["side"] == side]
    return run_settings(name, batch, device, ordered, make, 6.0 * forward_macs(name), warmup, iters, rounds,
                        inspect)  # fmt: skip


def run_settings(
    model_name: str,
    batch: int,
    device: torch.device,
    settings: list[dict],
    make: Callable[[dict], Callable[[], None]],
    train_flops_per_img: float | dict[str, float],
    warmup: int,
    iters: int,
    rounds: int,
    inspect: Callable[[Callable[[], None]], dict] | None = None,
) -> list[dict]:
    """Time one training step per setting; ``inspect(step)``, when given, adds its keys to the row
    (after the timing, e.g. a profile). ``train_flops_per_img`` is one number, or one per side where
    the two sides' networks do different work (vitdit's ViT computes only [cls] in its last block).

    rounds == 1: one setting after another, each freed before the next (GPU-sized models).
    rounds > 1: every setting is built and warmed first, then timed round-robin ``rounds`` times
    (``iters`` steps per setting per round, the two sides of a pair back to back, the order
    reversed every other round); the median over all rounds is reported. On a shared or throttled
    machine the load then falls on every setting alike instead of on whichever ran last.
    """

    def row(
        s: dict, sec: float, wall: float, rounds_sec: list[float] | None = None, faults: float = 0
    ) -> dict:
        r = {
            "model": model_name, "side": s["side"], "precision": s["precision"], "compile": s["compile"],
            "attn": s["attn"], "batch": batch, "sec_per_step": sec, "img_per_s": batch / sec,
            "train_flops_per_img": (
                train_flops_per_img[s["side"]] if isinstance(train_flops_per_img, dict) else train_flops_per_img
            ), "wall_s": wall, "minor_faults_per_step": faults,
        }  # fmt: skip
        if rounds_sec is not None:  # round-robin: each round's time, and the slowest/fastest as img/s
            r["round_sec_per_step"] = rounds_sec
            r["img_per_s_round_min_max"] = [batch / max(rounds_sec), batch / min(rounds_sec)]
        return r

    rows: list[dict] = []
    if rounds <= 1:
        for s in settings:
            t0 = time.perf_counter()
            step = make(s)
            time_step(step, device, warmup, 0)
            f0 = minor_faults()
            sec = time_step(step, device, 0, iters)
            faults = (minor_faults() - f0) / max(iters, 1)
            if s.get("profile"):
                profile_step(step, device, f"{model_name} {s}")
            rows.append(row(s, sec, time.perf_counter() - t0, faults=faults))
            if inspect is not None:
                rows[-1].update(inspect(step))
            del step
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps({"progress": rows[-1]}), flush=True)
        return rows
    steps, walls = [], []
    for s in settings:
        t0 = time.perf_counter()
        step = make(s)
        time_step(step, device, warmup, 0)  # warm-up (and compilation) only
        steps.append(step)
        walls.append(time.perf_counter() - t0)
        print(json.dumps({"progress": {"built": s, "wall_s": walls[-1]}}), flush=True)
    times: list[list[float]] = [[] for _ in settings]  # seconds per step, one entry per round
    faults = [0] * len(settings)
    order = _paired_order(settings)
    for rnd in range(rounds):
        for i in order if rnd % 2 == 0 else order[::-1]:
            step = steps[i]
            t0, f0 = time.perf_counter(), minor_faults()
            sec = time_step(step, device, 0, iters)
            faults[i] += minor_faults() - f0
            times[i].append(sec)
            walls[i] += time.perf_counter() - t0
    for i, s in enumerate(settings):
        ts = sorted(times[i])
        rows.append(row(s, ts[len(ts) // 2], walls[i], times[i], faults[i] / (rounds * max(iters, 1))))
        if inspect is not None:
            rows[-1].update(inspect(steps[i]))
        print(json.dumps({"progress": rows[-1]}), flush=True)
    return rows


def _paired_order(settings: list[dict]) -> list[int]:
    """Indices with each (a) pair adjacent: a setting of one side, then the same on the other side.

    Rounds alternate this order and its reverse, so neither side of a pair always runs first and
    a drift of the machine's speed within a round falls on both sides of every pair alike.
    """
    key = lambda s: (s["precision"], s["compile"], s["attn"])  # noqa: E731
    order: list[int] = []
    for i, s in enumerate(settings):
        if i in order:
            continue
        order.append(i)
        order += [j for j, o in enumerate(settings) if j not in order and key(o) == key(s)]
    return order


# --- MM-DiT (Stable Diffusion 3) ---------------------------------------------------------------------
def mmdit_config(name: str, input_size: int | None = None, context_len: int | None = None):
    """An MM-DiT preset's config, optionally at another latent side and text length."""
    from vitdit.models import get_preset

    overrides = {k: v for k, v in (("input_size", input_size), ("context_len", context_len)) if v}
    return get_preset(name, **overrides)


def build_mmdit(side: str, cfg, device: torch.device) -> nn.Module:
    """vitdit's MMDiT, or diffusers' SD3Transformer2DModel of the same configuration."""
    from vitdit.models import model_from_config

    with torch.device(device):  # initialise in place: SD3-Medium is 2B parameters
        if side == "vitdit":
            return model_from_config(cfg)
        from diffusers import SD3Transformer2DModel

        from vitdit.export import _sd3_kwargs

        return SD3Transformer2DModel(**_sd3_kwargs(cfg))


def mmdit_train_step(cfg, batch: int, device: torch.device, s: dict) -> Callable[[], None]:
    """One rectified-flow-style MM-DiT training step (MSE to a velocity target) on random data.

    Attention: ours through ``set_attn_impl``; diffusers has no matmul-softmax-matmul processor for its
    joint attention, so its "math" setting runs its ``JointAttnProcessor2_0`` with SDPA restricted to
    torch's MATH backend (the same explicit matmul → softmax → matmul, as an SDPA decomposition).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vitdit.models.layers import set_attn_impl

    side = s["side"]
    torch.manual_seed(0)
    model = build_mmdit(side, cfg, device)
    if side == "vitdit":
        set_attn_impl(model, s["attn"])
    model.train()
    size = cfg.input_size
    x = torch.randn(batch, cfg.in_channels, size, size, device=device)
    t = torch.rand(batch, device=device)
    context = torch.randn(batch, cfg.context_len, cfg.context_dim, device=device)
    pooled = torch.randn(batch, cfg.pooled_dim, device=device)
    target = torch.randn(batch, cfg.out_channels, size, size, device=device)
    if s["compile"]:
        blocks = model.blocks if side == "vitdit" else model.transformer_blocks
        apply_compile(model, blocks, s.get("scope", "blocks"))
    if side == "vitdit":
        fwd = lambda: model(x, t, context, pooled)  # noqa: E731
    else:
        backend = SDPBackend.MATH if s["attn"] == "math" else None

        def fwd() -> torch.Tensor:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                return model(x, encoder_hidden_states=context, pooled_projections=pooled,
                             timestep=1000 * t).sample  # fmt: skip

    return train_step_fn(model, fwd, target, device, s["precision"])


def bench_mmdit(
    name: str,
    batch: int,
    device: torch.device,
    settings: list[dict],
    warmup: int,
    iters: int,
    rounds: int = 1,
    input_size: int | None = None,
    context_len: int | None = None,
    inspect: Callable[[Callable[[], None]], dict] | None = None,
) -> list[dict]:
    """images/s of one MM-DiT training step per setting {side, precision, compile, attn}, both sides
    at ``name``'s config (optionally another latent side / text length) and the same batch."""
    from vitdit.models.mmdit import mmdit_forward_macs

    cfg = mmdit_config(name, input_size, context_len)
    make = functools.partial(mmdit_train_step, cfg, batch, device)
    ordered = [s for side in ("vitdit", "diffusers") for s in settings if s["side"] == side]
    label = f"{name}@{cfg.input_size}+{cfg.context_len}"  # latent side + text tokens
    flops = 6.0 * mmdit_forward_macs(cfg)
    return run_settings(label, batch, device, ordered, make, flops, warmup, iters, rounds, inspect)


# --- ViT --------------------------------------------------------------------------------------------
class HFViTClassifier(nn.Module):
    """transformers' ViTModel (no pooler) + a linear head on [cls]: the same network as vitdit's ViT."""

    def __init__(self, c, attn: str):
        super().__init__()
        from transformers import ViTConfig as HFViTConfig
        from transformers import ViTModel

        hf = HFViTConfig(
            hidden_size=c.embed_dim,
            num_hidden_layers=c.depth,
            num_attention_heads=c.num_heads,
            intermediate_size=c.mlp_hidden_dim,
            image_size=c.image_size,
            patch_size=c.patch_size,
            num_channels=c.in_chans,
            layer_norm_eps=c.layer_norm_eps,
            qkv_bias=c.qkv_bias,
        )
        hf._attn_implementation = "eager" if attn == "math" else "sdpa"
        self.vit = ViTModel(hf, add_pooling_layer=False)
        self.head = nn.Linear(c.embed_dim, c.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(pixel_values=x).last_hidden_state[:, 0])


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def bench_vit(
    name: str,
    batch: int,
    device: torch.device,
    settings: list[dict],
    warmup: int,
    iters: int,
    image_size: int | None,
    rounds: int = 1,
    inspect: Callable[[Callable[[], None]], dict] | None = None,
) -> list[dict]:
    from vitdit.models import create_model
    from vitdit.models.layers import set_attn_impl

    if not transformers_available():
        settings = [s for s in settings if s["side"] != "transformers"]
    overrides = {"image_size": image_size} if image_size else {}
    probe = create_model(name, **overrides)
    c = probe.config
    # vitdit's forward computes only [cls] in the last block; the peer computes every token there.
    flops = {"vitdit": 6.0 * probe.forward_macs(), "transformers": 6.0 * probe.forward_macs(all_tokens=True)}
    del probe

    def make(s: dict) -> Callable[[], None]:
        torch.manual_seed(0)
        if s["side"] == "vitdit":
            model = set_attn_impl(create_model(name, **overrides), s["attn"]).to(device)
            blocks = model.blocks
        else:
            model = HFViTClassifier(c, s["attn"]).to(device)
            vit = model.vit  # transformers 5 keeps the blocks in .layers, 4.x in .encoder.layer
            blocks = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
        model.train()
        x = torch.randn(batch, c.in_chans, c.image_size, c.image_size, device=device)
        labels = torch.randint(0, c.num_classes, (batch,), device=device)
        if s["compile"]:
            apply_compile(model, blocks, s.get("scope", "blocks"))
        return train_step_fn(model, lambda m=model, x=x: m(x), None, device, s["precision"], labels=labels)

    return run_settings(
        f"{name}@{c.image_size}", batch, device, settings, make, flops, warmup, iters, rounds, inspect
    )


# --- SD-VAE encoding --------------------------------------------------------------------------------
def sd_vae(resolution: int, smoke: bool) -> nn.Module:
    """A diffusers AutoencoderKL with Stable Diffusion's VAE architecture, random weights.

    As stabilityai/sd-vae-ft-ema's config.json: 4 blocks of 128/256/512/512 channels (8× down-sampling),
    2 layers per block, 4 latent channels, 32 norm groups, scaling factor 0.18215. ``smoke``: 2 tiny
    blocks, for the tests.
    """
    from diffusers import AutoencoderKL

    blocks = (8, 16) if smoke else (128, 256, 512, 512)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1 if smoke else 2,
        latent_channels=4,
        norm_num_groups=4 if smoke else 32,
        sample_size=resolution,
        scaling_factor=0.18215,
    )


def bench_vae_encode(device: torch.device, batch: int, resolution: int, smoke: bool, iters: int) -> dict:
    """images/s of ``AutoencoderKL.encode`` with Stable Diffusion's VAE architecture (random weights)."""
    vae = sd_vae(resolution, smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = vae.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dtype)

    @torch.no_grad()
    def step() -> None:
        vae.encode(x).latent_dist.sample()

    sec = time_step(step, device, warmup=2, iters=iters)
    return {"model": "sd-vae-encode", "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "resolution": resolution, "img_per_s": batch / sec}  # fmt: skip


def add_mfu(rows: list[dict], peaks: dict[str, float | None]) -> None:
    """MFU against the table peak and against the measured matmul at the row's precision."""
    for r in rows:
        achieved = r["img_per_s"] * r["train_flops_per_img"]
        r["achieved_tflops"] = achieved / 1e12
        table = peaks.get("table_bf16") if r["precision"] == "bf16" else None
        r["mfu_table"] = achieved / table if table else None
        measured = peaks.get(f"matmul_{r['precision']}")
        r["frac_of_matmul"] = achieved / measured if measured else None


def ratios(rows: list[dict], ours: str, peer: str) -> dict:
    """(a) same settings, both eager (round-robin runs: median of per-round ratios); (b) each side's best.

    ``best_vs_best`` is the ratio of the two best rows' medians; ``best_vs_best_per_round`` (round-robin
    runs) the median, min and max over rounds of that pair's ratio within a round, which shows how
    far the machine's drift moves it.

    ``best_vs_peer_default`` also compares against the peer's best row at its default attention
    ("sdpa": diffusers' ``AttnProcessor2_0``, transformers' ``attn_implementation="sdpa"``), i.e.
    the peer with only precision and compile varied; ``best_vs_best`` lets the peer switch to its
    math path too.
    """
    out = {}
    by = {(r["side"], r["precision"], r["compile"], r["attn"]): r for r in rows}
    same = [k for k in by if k[0] == ours and not k[2] and (peer, k[1], False, k[3]) in by]
    for k in same:
        a, b = by[k], by[(peer, k[1], False, k[3])]
        ra, rb = a.get("round_sec_per_step"), b.get("round_sec_per_step")
        if ra and rb and len(ra) == len(rb):  # round-robin: the median of the per-round pair ratios
            pair = sorted(tb / ta for ta, tb in zip(ra, rb))
            out[f"same_{k[1]}_{k[3]}_eager"] = pair[len(pair) // 2]
        else:
            out[f"same_{k[1]}_{k[3]}_eager"] = a["img_per_s"] / b["img_per_s"]
    best_ours = max((r for r in rows if r["side"] == ours), key=lambda r: r["img_per_s"], default=None)
    best_peer = max((r for r in rows if r["side"] == peer), key=lambda r: r["img_per_s"], default=None)
    if best_ours and best_peer:
        out["best_vs_best"] = best_ours["img_per_s"] / best_peer["img_per_s"]
        ra, rb = best_ours.get("round_sec_per_step"), best_peer.get("round_sec_per_step")
        if ra and rb and len(ra) == len(rb):  # the two best rows timed in the same rounds
            pair = sorted(tb / ta for ta, tb in zip(ra, rb))
            out["best_vs_best_per_round"] = {"median": pair[len(pair) // 2], "min": pair[0], "max": pair[-1]}
        out["best_ours"] = {k: best_ours[k] for k in ("precision", "compile", "attn", "img_per_s")}
        out["best_peer"] = {k: best_peer[k] for k in ("precision", "compile", "attn", "img_per_s")}
        default_peer = max(
            (r for r in rows if r["side"] == peer and r["attn"] == "sdpa"),
            key=lambda r: r["img_per_s"],
            default=None,
        )
        if default_peer:
            out["best_vs_peer_default"] = best_ours["img_per_s"] / default_peer["img_per_s"]
            out["best_peer_default"] = {
                k: default_peer[k] for k in ("precision", "compile", "attn", "img_per_s")
            }
    return out


def settings_grid(
    ours: str, peer: str, precisions: list[str], compile_: list[bool], attns: list[str]
) -> list[dict]:
    return [
        {"side": side, "precision": p, "compile": c, "attn": a}
        for side in (ours, peer)
        for p in precisions
        for c in compile_
        for a in attns
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (seconds); for the tests")
    ap.add_argument("--dit-batch", type=int, default=64)
    ap.add_argument("--vit-batch", type=int, default=128)
    ap.add_argument("--mmdit-batch", type=int, default=8)
    ap.add_argument("--mmdit-size", type=int, default=None,
                    help="latent side of the MM-DiT rows (default: SD3-Medium's 128, i.e. 1024 px)")  # fmt: skip
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument(
        "--compile-scope",
        default="blocks",
        choices=["blocks", "model"],
        help="blocks: regional compilation (one block's graph, quick); model: the whole forward",
    )
    ap.add_argument("--profile", action="store_true", help="print the top ops of each eager DiT step")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: dit,vit,mmdit,vae")
    ap.add_argument(
        "--json-out", default=None, help="JSON path (default: $OUT/gpu_bench.json when $OUT is set)"
    )
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the trainer's fp32 setting on GPUs
        torch.backends.cudnn.allow_tf32 = True
    skip = set(filter(None, args.skip.split(",")))
    if args.smoke:
        dit_name, vit_name, vit_size, mmdit_name = "DiT-test/2", "ViT-test/4", None, "MMDiT-tiny"
        args.dit_batch, args.vit_batch, args.vae_batch, args.mmdit_batch = 2, 2, 2, 2
        args.warmup, args.iters = 1, 2
        mm_n, vae_res = 256, 16
    else:
        dit_name, vit_name, vit_size, mmdit_name = "DiT-XL/2", "ViT-B/16", 224, "SD3-Medium"
        mm_n, vae_res = 8192, 256
    compile_opts = [False] if args.no_compile or args.smoke else [False, True]

    name, table = table_peak(device)
    result: dict = {
        "device": name,
        "torch": torch.__version__,
        "smoke": args.smoke,
        "compile_scope": args.compile_scope,
        "batches": {"dit": args.dit_batch, "vit": args.vit_batch, "mmdit": args.mmdit_batch},
    }
    try:
        import diffusers

        result["diffusers"] = diffusers.__version__
    except ImportError:
        result["diffusers"] = None
    peaks = {"table_bf16": table, "matmul_bf16": measure_matmul(device, torch.bfloat16, mm_n),
             "matmul_fp32": measure_matmul(device, torch.float32, mm_n)}  # fmt: skip
    result["peaks_flops"] = peaks
    print(json.dumps({"progress": {"peaks": peaks, "device": name}}), flush=True)
    out = args.json_out or (
        os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else None
    )

    def save() -> None:  # after every part: a run cut short by its time limit keeps what it measured
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=2)

    if "dit" not in skip:
        grid = settings_grid("vitdit", "diffusers", ["bf16"], compile_opts, ["sdpa"])
        for g in grid:
            g["scope"], g["profile"] = args.compile_scope, args.profile and not g["compile"]
        dit_rows = bench_dit(dit_name, args.dit_batch, device, grid, args.warmup, args.iters)
        add_mfu(dit_rows, peaks)
        result["dit"] = {"rows": dit_rows, "ratios": ratios(dit_rows, "vitdit", "diffusers")}
        save()
    if "vit" not in skip:
        grid = settings_grid("vitdit", "transformers", ["bf16"], compile_opts, ["sdpa"])
        for g in grid:
            g["scope"] = args.compile_scope
        vit_rows = bench_vit(vit_name, args.vit_batch, device, grid, args.warmup, args.iters, vit_size)
        add_mfu(vit_rows, peaks)
        result["vit"] = {"rows": vit_rows, "ratios": ratios(vit_rows, "vitdit", "transformers"),
                         "transformers_available": transformers_available()}  # fmt: skip
        save()
    if "mmdit" not in skip:
        grid = settings_grid("vitdit", "diffusers", ["bf16"], compile_opts, ["sdpa"])
        for g in grid:
            g["scope"] = args.compile_scope
        mmdit_rows = bench_mmdit(mmdit_name, args.mmdit_batch, device, grid, args.warmup, args.iters,
                                 input_size=args.mmdit_size)  # fmt: skip
        add_mfu(mmdit_rows, peaks)
        result["mmdit"] = {"rows": mmdit_rows, "ratios": ratios(mmdit_rows, "vitdit", "diffusers")}
        save()
    if "vae" not in skip:
        result["vae_encode"] = bench_vae_encode(device, args.vae_batch, vae_res, args.smoke, args.iters)
        save()

    save()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
