"""How much of a training step is matrix multiplication, for vitdit and its peer, and the ceiling that
puts on any speed-up over the peer.

Runbook (from the repo root; ~3-6 minutes on 2 cores, most of it compiling)::

    .venv/bin/python benchmarks/matmul_share.py                 # DiT-S/2 b8 and ViT-S/16 b8, bf16, compiled
    .venv/bin/python benchmarks/matmul_share.py --smoke         # tiny presets, eager (the tests)

Both sides at their fastest CPU setting in ``benchmarks/train_step.py`` (bf16 autocast,
matmul-softmax-matmul attention, ``torch.compile`` per block, fused AdamW). Each step is timed
without the profiler, the two sides alternating (``--rounds`` rounds of ``--iters`` steps, the
median over rounds; this machine's speed drifts within minutes), then profiled: the self time of the matrix
multiplications (``aten::mm``, ``addmm``, ``bmm``, ``baddbmm`` and oneDNN's linear) and the FLOPs of
their recorded shapes are summed per step.

Why: the two implementations run the same network, so their matrix multiplications have the same
FLOPs (checked here from the shapes) and run in the same aten/oneDNN kernels. A step can go no faster
than its matmuls, so vitdit's step time is at least its own matmul time, and its speed-up over the
peer is at most ``peer step time / vitdit matmul time`` (``ceiling_vs_peer``), whatever is done to the
rest of the step (the non-matmul work that compilation and fusion can shrink). The last line of
stdout is the whole result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu import (  # noqa: E402
    HFViTClassifier,
    apply_compile,
    build_dit,
    set_peer_attention,
    time_step,
    train_step_fn,
    transformers_available,
)

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")


def _matmul_flops(name: str, shapes: list) -> float:
    """FLOPs of one matmul call from its recorded input shapes (0 when they are not recorded)."""
    try:
        if name in ("aten::mm", "aten::addmm"):
            a, b = (shapes[0], shapes[1]) if name == "aten::mm" else (shapes[1], shapes[2])
            return 2.0 * a[0] * a[1] * b[1]
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = (shapes[0], shapes[1]) if name == "aten::bmm" else (shapes[1], shapes[2])
            return 2.0 * a[0] * a[1] * a[2] * b[2]
        if name == "mkldnn::_linear_pointwise":
            x, w = shapes[0], shapes[1]
            rows = 1
            for d in x[:-1]:
                rows *= d
            return 2.0 * rows * x[-1] * w[0]
    except (IndexError, TypeError):
        pass
    return 0.0


def profile_matmuls(step: Callable[[], None], steps: int) -> dict:
    """Per step: seconds of matmul self time and the matmuls' FLOPs, under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    us = flops = 0.0
    calls = 0
    for ev in prof.events():
        if ev.name in MATMUL_OPS:
            us += ev.self_cpu_time_total
            flops += _matmul_flops(ev.name, ev.input_shapes)
            calls += 1
    return {"matmul_sec": us / 1e6 / steps, "matmul_flops": flops / steps, "matmul_calls": calls // steps}


def dit_step(side: str, name: str, batch: int, compile_: bool) -> Callable[[], None]:
    from vitdit.models import get_preset
    from vitdit.models.layers import set_attn_impl

    c = get_preset(name)
    torch.manual_seed(0)
    model = build_dit(side, name, torch.device("cpu"))
    if side == "vitdit":
        set_attn_impl(model, "math")
    else:
        set_peer_attention(model, "math")
    model.train()
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, c.num_classes, (batch,))
    target = torch.randn(batch, c.in_channels * (2 if c.learn_sigma else 1), c.input_size, c.input_size)
    if compile_:
        apply_compile(model, model.blocks if side == "vitdit" else model.transformer_blocks, "blocks")
    if side == "vitdit":
        fwd = lambda: model(x, t, y)  # noqa: E731
    else:
        fwd = lambda: model(hidden_states=x, timestep=t, class_labels=y).sample  # noqa: E731
    return train_step_fn(model, fwd, target, torch.device("cpu"), "bf16")


def vit_step(side: str, name: str, batch: int, size: int | None, compile_: bool) -> Callable[[], None]:
    from vitdit.models import create_model
    from vitdit.models.layers import set_attn_impl

    overrides = {"image_size": size} if size else {}
    torch.manual_seed(0)
    if side == "vitdit":
        model = set_attn_impl(create_model(name, **overrides), "math")
        blocks = model.blocks
        c = model.config
    else:
        c = create_model(name, **overrides).config
        model = HFViTClassifier(c, "math")
        blocks = model.vit.layers if hasattr(model.vit, "layers") else model.vit.encoder.layer
    model.train()
    x = torch.randn(batch, c.in_chans, c.image_size, c.image_size)
    labels = torch.randint(0, c.num_classes, (batch,))
    if compile_:
        apply_compile(model, blocks, "blocks")
    return train_step_fn(model, lambda: model(x), None, torch.device("cpu"), "bf16", labels=labels)


def measure(makers: dict[str, Callable[[], Callable[[], None]]], args) -> dict[str, dict]:
    """Build and warm every side, time them alternately (median over rounds), then profile each."""
    cpu = torch.device("cpu")
    steps = {}
    for label, make in makers.items():
        steps[label] = make()
        time_step(steps[label], cpu, args.warmup, 0)  # warm-up and compilation
    rounds: dict[str, list[float]] = {label: [] for label in steps}
    labels = list(steps)
    for r in range(args.rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            rounds[label].append(time_step(steps[label], cpu, 0, args.iters))
    rows = {}
    for label, step in steps.items():
        times = sorted(rounds[label])
        sec = times[len(times) // 2]
        row = {"label": label, "sec_per_step": sec, "round_sec_per_step": rounds[label],
               **profile_matmuls(step, args.profile_steps)}  # fmt: skip
        row["matmul_share"] = row["matmul_sec"] / sec
        row["matmul_tflops"] = row["matmul_flops"] / row["matmul_sec"] / 1e12 if row["matmul_sec"] else 0.0
        print(json.dumps({"progress": row}), flush=True)
        rows[label] = row
    return rows


def compare(ours: dict, peer: dict) -> dict:
    return {
        "speedup_measured": peer["sec_per_step"] / ours["sec_per_step"],
        "matmul_flops_ratio": ours["matmul_flops"] / peer["matmul_flops"] if peer["matmul_flops"] else None,
        # vitdit's step cannot take less than its own matmuls: the most it can gain over the peer.
        "ceiling_vs_peer": peer["sec_per_step"] / ours["matmul_sec"] if ours["matmul_sec"] else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny presets, eager, 1 step each (the tests)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dit_name, dit_batch, vit_name, vit_batch, vit_size, compile_ = "DiT-S/2", 8, "ViT-S/16", 8, None, True
    if args.smoke:
        dit_name, dit_batch, vit_name, vit_batch, vit_size, compile_ = (
            "DiT-test/2",
            2,
            "ViT-test/4",
            2,
            None,
            False,
        )
        args.warmup, args.iters, args.rounds, args.profile_steps = 1, 1, 1, 1
    result: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "smoke": args.smoke,
                    "setting": f"bf16 autocast, math attention, compile={compile_}, fused AdamW"}  # fmt: skip
    dit = measure(
        {
            side: (lambda s=side: dit_step(s, dit_name, dit_batch, compile_))
            for side in ("vitdit", "diffusers")
        },
        args,
    )
    result["dit"] = {**dit, **compare(dit["vitdit"], dit["diffusers"])}
    if transformers_available():
        vit = measure(
            {
                side: (lambda s=side: vit_step(s, vit_name, vit_batch, vit_size, compile_))
                for side in ("vitdit", "transformers")
            },
            args,
        )
        result["vit"] = {**vit, **compare(vit["vitdit"], vit["transformers"])}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
