"""How much of a training step is matrix multiplication, for vitdit and its peer, and the ceiling that
puts on any speed-up over the peer.

Runbook (from the repo root; ~3-6 minutes on 2 cores, most of it compiling)::

    .venv/bin/python benchmarks/matmul_share.py                 # DiT-S/2 b8 and ViT-S/16 b8, compiled
    .venv/bin/python benchmarks/matmul_share.py --smoke         # tiny presets, eager (the tests)

Both sides at their fastest CPU setting in ``benchmarks/train_step.py`` (the precision of the faster
matmul, measured; matmul-softmax-matmul attention, ``torch.compile`` per block, fused AdamW), built and timed by the
same code (``benchmarks/gpu.py``: the two sides alternate, ``--rounds`` rounds of ``--iters``
steps, median over rounds; this machine's speed drifts within minutes). Then each is profiled: the self time of the matrix
multiplications (``aten::mm``, ``addmm``, ``bmm``, ``baddbmm`` and oneDNN's linear) and the FLOPs of
their recorded shapes are summed per step; the matmul share is that self time over the wall time of the same
profiled steps.

Why: the two implementations run the same network, so their matrix multiplications have nearly the
same FLOPs (checked here from the shapes: vitdit's ViT does ~7% fewer, computing only [cls] in its last
block, and diffusers' DiT a little more, recomputing the conditioning MLP per block) and run in the
same aten/oneDNN kernels. A step can go no faster
than its matmuls, so vitdit's step time is at least its own matmul time, and its speed-up over the
peer is at most ``peer step time / vitdit matmul time`` (``ceiling_vs_peer``), whatever is done to the
rest of the step (the non-matmul work that compilation and fusion can shrink). The last line of
stdout is the whole result as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu import bench_dit, bench_vit, keep_freed_memory, transformers_available  # noqa: E402
from vitdit.precision import fastest_matmul_precision  # noqa: E402

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
    import time

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    us = flops = 0.0
    calls = 0
    for ev in prof.events():
        if ev.name in MATMUL_OPS:
            us += ev.self_cpu_time_total
            flops += _matmul_flops(ev.name, ev.input_shapes)
            calls += 1
    return {"matmul_sec": us / 1e6 / steps, "matmul_flops": flops / steps, "matmul_calls": calls // steps,
            "profiled_sec_per_step": wall / steps}  # fmt: skip


def add_shares(rows: list[dict]) -> dict[str, dict]:
    """Rows by side, with the matmul share of the step and the matmuls' achieved TFLOP/s."""
    for row in rows:
        # Of the profiled steps themselves (the steps the matmul time was read from): against the separately
        # timed step, one smoke step can come out shorter than the profiled matmuls (a CI machine measured 1.84).
        row["matmul_share"] = row["matmul_sec"] / row["profiled_sec_per_step"]
        row["matmul_tflops"] = row["matmul_flops"] / row["matmul_sec"] / 1e12 if row["matmul_sec"] else 0.0
    return {row["side"]: row for row in rows}


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
    ap.add_argument(
        "--keep-heap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc keeps freed memory (no page faults from the other side's heap history)",
    )
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    kept = keep_freed_memory() if args.keep_heap else False
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dit_name, dit_batch, vit_name, vit_batch, compile_ = "DiT-S/2", 8, "ViT-S/16", 8, True
    if args.smoke:
        dit_name, dit_batch, vit_name, vit_batch, compile_ = "DiT-test/2", 2, "ViT-test/4", 2, False
        args.warmup, args.iters, args.rounds, args.profile_steps = 1, 1, 1, 1
    precision = fastest_matmul_precision()  # measured: bf16 where its matmul beats fp32's here
    result: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "smoke": args.smoke, "keep_heap": kept,
                    "setting": f"{precision}{' autocast' if precision == 'bf16' else ''}, math attention, "
                               f"compile={compile_}, fused AdamW"}  # fmt: skip
    cpu = torch.device("cpu")
    inspect = functools.partial(profile_matmuls, steps=args.profile_steps)

    def settings(peer: str) -> list[dict]:
        return [
            {"side": s, "precision": precision, "compile": compile_, "attn": "math"} for s in ("vitdit", peer)
        ]

    dit = add_shares(bench_dit(dit_name, dit_batch, cpu, settings("diffusers"), args.warmup, args.iters,
                               rounds=args.rounds, inspect=inspect))  # fmt: skip
    result["dit"] = {**dit, **compare(dit["vitdit"], dit["diffusers"])}
    if transformers_available():
        vit = add_shares(bench_vit(vit_name, vit_batch, cpu, settings("transformers"), args.warmup, args.iters,
                                   None, rounds=args.rounds, inspect=inspect))  # fmt: skip
        result["vit"] = {**vit, **compare(vit["vitdit"], vit["transformers"])}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
