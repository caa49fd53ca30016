"""How many MM-DiT steps the numbers task needs: a plain-PyTorch loop (no Ray) with number accuracy
measured along the way.

The numbers quickstart (``vitdit quickstart --task numbers``) has to fit in 15 minutes on 2 CPU cores,
so its recipe was chosen from runs of this script on the stages' own outputs: the latents of
``vitdit encode`` (captions included), the VAE, and the digits ViT that reads the samples. It trains
vitdit's ``TextConditionedMMDiT`` (the model ``vitdit train mmdit`` trains when no text encoder is
given: tokenizer from the captions, a CLIP-style tower trained jointly) with the same flow loss, EMA
and caption dropout, and every ``--eval-every`` steps samples every number 10..99 from its words
(Euler, classifier-free guidance) and reads them with the ViT: number accuracy on seen and on
held-out numbers, and seconds so far.

    python benchmarks/numbers_feasibility.py --workdir runs/numbers --steps 2000 --eval-every 250

``--workdir`` is a numbers recipe's workdir after its ``encode`` and ``vit`` stages (``latents/``,
``vae/vae``, ``vit/checkpoint_*``, ``numbers/numbers.json``). One JSON line per evaluation, and the
whole curve in ``--json-out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_latents(latents: str) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    import pyarrow.parquet as pq

    manifest = json.load(open(os.path.join(latents, "manifest.json")))
    shape = manifest["latent_shape"]
    means, stds, captions = [], [], []
    for part in manifest["parts"]:
        t = pq.read_table(os.path.join(latents, part["path"]), columns=["mean", "std", "caption"])
        for col, out in (("mean", means), ("std", stds)):
            flat = np.asarray(t.column(col).combine_chunks().flatten(), dtype=np.float32)
            out.append(flat.reshape(-1, *shape))
        captions += t.column("caption").to_pylist()
    return np.concatenate(means), np.concatenate(stds), captions, manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--model", default="MMDiT-digits")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--dropout", type=float, default=0.1, help="caption dropout")
    ap.add_argument("--text-width", type=int, default=64)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--text-max-length", type=int, default=10)
    ap.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    ap.add_argument("--hidden", type=int, default=None, help="override the preset's width")
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--samples-per-number", type=int, default=2)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from pipelines.evaluate import Extractor
    from vitdit import numbers
    from vitdit.captions import CaptionTokenizer, build_tokenizer_json
    from vitdit.diffusion.flow import RectifiedFlow, cfg_velocity, euler_sample
    from vitdit.models.mmdit import MMDIT_PRESETS
    from vitdit.models.text_tower import TextConditionedMMDiT, TextTowerConfig
    from vitdit.vae import decode_latents, load_vae, scale_latents

    w = args.workdir
    mean, std, captions, manifest = load_latents(os.path.join(w, "latents"))
    vae_cfg = manifest["vae"]
    tok_json = build_tokenizer_json(captions)
    tok = CaptionTokenizer(tok_json, args.text_max_length)
    ids, cut = tok.ids_numpy(captions)
    ids = torch.from_numpy(ids).long()
    empty = torch.from_numpy(tok.ids_numpy([""])[0]).long()
    cfg = MMDIT_PRESETS[args.model]
    over = {
        k: v for k, v in (("depth", args.depth), ("hidden_size", args.hidden), ("num_heads", args.heads)) if v
    }
    cfg = dataclasses.replace(cfg, **over)
    tower = TextTowerConfig(
        vocab_size=tok.vocab_size, max_length=args.text_max_length, hidden_size=args.text_width,
        num_layers=args.text_layers, num_heads=4,
    )  # fmt: skip
    model = TextConditionedMMDiT(cfg, tower)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    flow = RectifiedFlow()
    step_fn = torch.compile(model) if args.compile else model
    mean_t, std_t = torch.from_numpy(mean), torch.from_numpy(std)

    vae = load_vae(os.path.join(w, "vae", "vae"))
    vit_ckpt = sorted(glob.glob(os.path.join(w, "vit", "checkpoint_*")))[-1]
    extractor = Extractor(vit_ckpt)
    order = [extractor.class_names.index(str(d)) for d in range(10)]
    held_out = tuple(json.load(open(os.path.join(w, "numbers", numbers.MANIFEST)))["held_out"])
    targets = np.repeat(np.arange(10, 100), args.samples_per_number)
    prompts = [numbers.number_words(int(n)) for n in targets]
    prompt_ids = torch.from_numpy(tok.ids_numpy(prompts)[0]).long()

    def evaluate(net) -> dict:
        gen = torch.Generator().manual_seed(1234)
        out = []
        for i in range(0, len(targets), 90):
            c = prompt_ids[i : i + 90]
            noise = torch.randn((len(c), *manifest["latent_shape"]), generator=gen)

            def v(x, t, c=c):
                return cfg_velocity(lambda xx, tt, cc: net(xx, tt, cc), x, t, c, empty, args.cfg)

            z = euler_sample(v, noise, args.sample_steps)
            img = decode_latents(vae, z, vae_cfg)  # B, 3, H, W in [-1, 1]
            out.append(((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        images = np.concatenate(out)
        pred = numbers.read_numbers(lambda x: extractor(x)[1][:, order], images, extractor.image_size)
        return numbers.number_accuracy(pred, targets, held_out)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * p))

    curve, t_train = [], 0.0
    gen = torch.Generator().manual_seed(args.seed)
    n = len(mean)
    perm, pos = torch.randperm(n, generator=gen), 0
    print(
        json.dumps({"params": n_params, "rows": n, "truncated": int(cut), "config": dataclasses.asdict(cfg)})
    )
    for step in range(args.steps):
        t0 = time.perf_counter()
        if pos + args.batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + args.batch]
        pos += args.batch
        x0 = scale_latents(mean_t[idx] + std_t[idx] * torch.randn(mean_t[idx].shape, generator=gen), vae_cfg)
        c = ids[idx]
        drop = torch.rand(len(idx), generator=gen) < args.dropout
        c = torch.where(drop[:, None], empty, c)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        model.train()
        with torch.autocast("cpu", torch.bfloat16, enabled=args.precision == "bf16"):
            terms = flow.training_losses(lambda x, t, c=c: step_fn(x, t, c), x0, generator=gen)
            loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        t_train += time.perf_counter() - t0
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            t1 = time.perf_counter()
            acc = evaluate(ema)
            row = {
                "step": step + 1,
                "loss": round(float(loss), 4),
                "train_s": round(t_train, 1),
                "steps_per_s": round((step + 1) / t_train, 2),
                "eval_s": round(time.perf_counter() - t1, 1),
                **{k: round(v, 3) for k, v in acc.items() if k.startswith(("number", "tens", "units"))},
            }
            curve.append(row)
            print(json.dumps(row), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "params": n_params, "curve": curve}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
