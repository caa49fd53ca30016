"""Images/s of the Ray Data encode pipeline against a bare single-process PyTorch loop.

Both encode the same PNG files with the same VAE (the SD-VAE architecture, random weights: 4 blocks
of 128/256/512/512 channels, 2 layers per block, 4 latent channels, 32 norm groups, as in
stabilityai/sd-vae-ft-ema's config.json) at 256×256, with the same number of compute threads, in the
same run. Both include decode + centre crop + encode; the Ray side also writes its parquet parts.

    python benchmarks/encode.py --num-images 64            # the number in RESULTS.md
    python benchmarks/encode.py --smoke                    # tiny VAE, 16 px: a seconds-long check

"steady" rates leave out the first batch (model load, actor start-up, first-call kernels) on both
sides: the rate a long encode job runs at. "e2e" rates are wall time from loading the VAE (the bare
loop) or starting the dataset (Ray: actor process start-up, imports and VAE load included) to the last
write; the gap is a fixed start-up cost (30-34 s measured here), so the e2e ratio approaches the steady one
as the image count grows. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_vae(path: str, smoke: bool) -> str:
    from benchmarks.gpu import sd_vae

    torch.manual_seed(0)
    sd_vae(16 if smoke else 256, smoke).save_pretrained(path)
    return path


def make_images(root: str, n: int, resolution: int) -> list[str]:
    """n PNGs slightly larger than the resolution (so the centre crop resizes), one class folder."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "0"), exist_ok=True)
    paths = []
    for i in range(n):
        h, w = resolution + int(rng.integers(0, 32)), resolution + int(rng.integers(0, 64))
        # Smooth noise compresses and decodes like a photo more than white noise does.
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        p = os.path.join(root, "0", f"{i:05d}.png")
        im.save(p)
        paths.append(p)
    return paths


def bare_loop(vae_dir: str, paths: list[str], resolution: int, batch: int, threads: int) -> dict:
    from vitdit.preprocess import preprocess_bytes, to_unit_range
    from vitdit.vae import encode_posterior, load_vae

    torch.set_num_threads(threads)
    t0 = time.perf_counter()  # loading the VAE is part of the job on both sides
    vae = load_vae(vae_dir)
    t_first = None
    for start in range(0, len(paths), batch):
        imgs = []
        for p in paths[start : start + batch]:
            with open(p, "rb") as f:
                imgs.append(preprocess_bytes(f.read(), resolution))
        x = torch.from_numpy(to_unit_range(np.stack(imgs)))  # B, 3, R, R
        mean, std = encode_posterior(vae, x)
        _ = (mean.half().numpy(), std.half().numpy())
        if t_first is None:
            t_first = time.perf_counter()
    t1 = time.perf_counter()
    n_after = len(paths) - min(batch, len(paths))
    return {
        "e2e_img_s": len(paths) / (t1 - t0),
        "steady_img_s": n_after / (t1 - t_first) if n_after else float("nan"),
        "seconds": t1 - t0,
    }


def ray_pipeline(
    vae_dir: str, root: str, out: str, resolution: int, batch: int, threads: int, n: int
) -> dict:
    import ray

    from pipelines.encode import EncodeConfig, _ChunkWriter, _Output, build_dataset
    from pipelines.images import read_image_source

    # One logical CPU for the read/preprocess tasks, `threads` for the encoder actor. An already
    # running Ray (the test suite's) is used as it is.
    own = not ray.is_initialized()
    if own:
        ray.init(num_cpus=threads + 1, include_dashboard=False, object_store_memory=512 * 1024**2)
    try:
        t0 = time.perf_counter()
        # One part (= one read task = one block) per batch, so results stream back batch by batch.
        cfg = EncodeConfig(
            input=root,
            output=out,
            vae=vae_dir,
            resolution=resolution,
            batch_size=batch,
            part_size=batch,
        )
        source = read_image_source(root, part_size=cfg.part_size)
        o = _Output(out)
        o.fs.create_dir(o.path("_progress"), recursive=True)
        ds = build_dataset(source, source.chunks, cfg, num_actors=1, gpus=0.0, cpus=float(threads))
        writer = _ChunkWriter(o, source.chunks, flips=False)
        t_first, n_first, seen = None, 0, 0
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            writer.add(b)
            seen += len(b["id"])
            if t_first is None:
                t_first, n_first = time.perf_counter(), seen
        t1 = time.perf_counter()
        assert writer.encoded == n, (writer.encoded, n)
        return {
            "e2e_img_s": n / (t1 - t0),
            "steady_img_s": (n - n_first) / (t1 - t_first) if n > n_first else float("nan"),
            "seconds": t1 - t0,
        }
    finally:
        if own:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="compute threads on both sides")
    p.add_argument("--smoke", action="store_true", help="tiny VAE at 16 px, a few images")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    resolution = 16 if args.smoke else 256
    n = min(args.num_images, 24) if args.smoke else args.num_images
    with tempfile.TemporaryDirectory() as tmp:
        vae_dir = make_vae(os.path.join(tmp, "vae"), args.smoke)
        paths = make_images(os.path.join(tmp, "images"), n, resolution)
        bare = bare_loop(vae_dir, paths, resolution, args.batch_size, args.threads)
        ray_res = ray_pipeline(
            vae_dir,
            os.path.join(tmp, "images"),
            os.path.join(tmp, "out"),
            resolution,
            args.batch_size,
            args.threads,
            n,
        )
    result = {
        "benchmark": "encode",
        "smoke": args.smoke,
        "num_images": n,
        "resolution": resolution,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "bare_e2e_img_s": round(bare["e2e_img_s"], 3),
        "bare_steady_img_s": round(bare["steady_img_s"], 3),
        "ray_e2e_img_s": round(ray_res["e2e_img_s"], 3),
        "ray_steady_img_s": round(ray_res["steady_img_s"], 3),
        "ratio_steady": round(ray_res["steady_img_s"] / bare["steady_img_s"], 3),
        "ratio_e2e": round(ray_res["e2e_img_s"] / bare["e2e_img_s"], 3),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}",
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
