"""The quickstart's training steps on this CPU: precision × worker layout (× compile), measured.

Runbook (from the repo root; ~3-6 minutes on 2 cores, more with ``--compile``)::

    .venv/bin/python benchmarks/quickstart_levers.py --json-out benchmarks/results/X.json
    .venv/bin/python benchmarks/quickstart_levers.py --smoke        # seconds (the tests)

For each of the quickstart's trained transformers (ViT-digits/4 on 16 px images, DiT-digits/2 on
8×8×4 latents; global batch 128 as in the recipe), one full training step (forward, loss, backward,
fused AdamW) on random data, in two layouts of a 2-core machine:

- ``1x2``: one process with 2 threads and the whole batch (what ``--num-workers 1
  --cpus-per-worker 2`` runs);
- ``2x1``: two processes with 1 thread each and half the batch, gradients all-reduced by DDP over
  gloo (what ``--num-workers 2`` runs), both stepping at once;

at fp32 and bf16 autocast (bf16 with the math attention path, as the trainer runs it). ``--compile``
adds ``torch.compile`` rows for the 1x2 layout. Reported: images/s of each setting (median over
``--rounds`` rounds of ``--steps`` steps after a warm-up). Only torch and vitdit (no Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GLOBAL_BATCH = 128


def _make(kind: str, smoke: bool):
    """(model, batch maker, loss fn) for one quickstart model."""
    import vitdit
    from vitdit.diffusion import create_diffusion

    if kind == "vit":
        model = vitdit.create_model("ViT-test/4" if smoke else "ViT-digits/4", num_classes=10, image_size=16)

        def batch(n: int, g: torch.Generator):
            return {
                "x": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1,
                "y": torch.randint(0, 10, (n,), generator=g),
            }

        def loss(m, b, g):
            return F.cross_entropy(m(b["x"]).float(), b["y"])

        return model, batch, loss
    model = vitdit.create_model("DiT-test/2" if smoke else "DiT-digits/2", num_classes=10, input_size=8)
    diffusion = create_diffusion(timestep_respacing="")

    def batch(n: int, g: torch.Generator):
        return {"x": torch.randn(n, 4, 8, 8, generator=g), "y": torch.randint(0, 10, (n,), generator=g)}

    def loss(m, b, g):
        t = torch.randint(0, diffusion.num_timesteps, (len(b["x"]),), generator=g)
        noise = torch.randn(b["x"].shape, generator=g)
        return diffusion.training_losses(m, b["x"], t, {"y": b["y"]}, noise=noise)["loss"].mean()

    return model, batch, loss


def _run(rank: int, world: int, kind: str, precision: str, compile_: bool, args, port: int, out) -> None:
    from pipelines.train.loop import make_optimizer, prepare_for_precision

    torch.set_num_threads(2 // world if os.cpu_count() and os.cpu_count() >= 2 else 1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    raw, make_batch, loss_fn = _make(kind, args.smoke)
    device = torch.device("cpu")
    prepare_for_precision(raw, precision, device)
    model = torch.compile(raw) if compile_ else raw
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(raw, 1e-3, 0.0, device)
    g = torch.Generator().manual_seed(rank)
    b = make_batch(GLOBAL_BATCH // world, g)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(model, b, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(args.rounds):
        if world > 1:
            torch.distributed.barrier()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        times.append((time.perf_counter() - t) / args.steps)
    if rank == 0:
        out.put({"warmup_s": round(warm, 2), "step_ms": round(1000 * statistics.median(times), 2),
                 "step_ms_min": round(1000 * min(times), 2), "step_ms_max": round(1000 * max(times), 2)})  # fmt: skip
    if world > 1:
        torch.distributed.destroy_process_group()


def measure(kind: str, precision: str, layout: str, compile_: bool, args) -> dict:
    world = 2 if layout == "2x1" else 1
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_run, args=(r, world, kind, precision, compile_, args, port, out))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    result = out.get(timeout=1800)
    for p in procs:
        p.join()
    result.update(kind=kind, precision=precision, layout=layout, compile=compile_)
    result["img_per_s"] = round(GLOBAL_BATCH / (result["step_ms"] / 1000), 1)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny presets, 1 round of 2 steps (tests)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="add compiled 1x2 rows (~1 min each to compile)")
    ap.add_argument("--skip", default="", help="comma-separated: vit,dit")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds, args.warmup = 2, 1, 1
    from vitdit.mfu import cpu_model_name, has_cpu_bf16_matrix_units

    rows = []
    for kind in ("vit", "dit"):
        if kind in args.skip.split(","):
            continue
        for precision in ("fp32", "bf16"):
            for layout in ("1x2", "2x1"):
                rows.append(measure(kind, precision, layout, False, args))
                print(json.dumps(rows[-1]), flush=True)
            if args.compile:
                rows.append(measure(kind, precision, "1x2", True, args))
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "cpu": cpu_model_name(),
        "amx_bf16": has_cpu_bf16_matrix_units(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "global_batch": GLOBAL_BATCH,
        "smoke": args.smoke,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
