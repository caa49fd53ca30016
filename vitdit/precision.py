"""``--precision auto`` by measurement: time a few real training steps per candidate precision.

Which precision trains fastest on a CPU is not readable from its flags. Measured on this project's
2-core machines (benchmarks/RESULTS.md, README): on an Intel Xeon with AMX-BF16, an eager bf16 step
of DiT-digits/2 ran 760 img/s per thread against 535-575 in fp32; on an AVX-512 Xeon without bf16
instructions torch emulates bf16 matmuls (42 GFLOP/s against 155 fp32), so bf16 is the slow one; on
an AMD EPYC with AVX512-BF16 and no AMX, this probe measured bf16 steps 1.5-1.7× faster than fp32
for the quickstart's models. So the trainer asks the machine: a short probe at start-up, per candidate

- the achieved GFLOP/s of a square matmul (a figure to record next to the step times);
- the wall time of real training steps (forward, loss, backward, fused AdamW) of the model being
  trained, on a real batch, with the attention path that precision trains with;
- the losses of the first and of the last warm-up step (same weights, batch and seeds at the
  start), which must be finite and agree with fp32's within what bf16's rounding allows, or the
  candidate is refused (the correctness guard; the loss-agreement tests over whole
  short runs are in tests/test_train_dit.py and tests/test_train_vit.py).

The fastest correct candidate wins; bf16 must beat fp32 by ``MIN_GAIN`` (fp32 is the safe default
and wins ties within timing noise). The result is cached per (CPU model, torch version, workload)
in ``$VITDIT_CACHE_DIR/precision_probe.json`` (default ``~/.cache/vitdit``), so later runs on the
same kind of machine skip the probe.

This module only times what it is given: the trainer (pipelines/train/loop.py) builds the step.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from vitdit.mfu import cpu_model_name, measure_matmul_tflops

CPU_CANDIDATES = ("fp32", "bf16")
CACHE_NAME = "precision_probe.json"
CACHE_VERSION = 1
# bf16 must be at least this much faster than fp32 to be chosen: the probe's step times of one
# setting vary by a few percent between rounds on a quiet 2-core VM.
MIN_GAIN = 1.05
# A bf16 loss may differ from fp32's by this much relative: each bf16 matmul rounds its inputs to
# 8 significant bits (unit roundoff 2^-8 ≈ 0.4%); a loss is a mean over many such products, so a few
# roundings deep it stays well within 5%, while a broken path (overflow, a wrong kernel) is far off.
LOSS_RTOL = 0.05

# One training step at a precision: (precision) → a callable that runs one step and returns its loss.
StepFactory = Callable[[str], Callable[[], float]]


def cache_path() -> str:
    root = os.environ.get("VITDIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vitdit")
    return os.path.join(root, CACHE_NAME)


def cache_key(workload: str, threads: int) -> str:
    """What a probe's answer depends on: the CPU, torch, the workload (model, batch) and the threads."""
    return f"{cpu_model_name() or 'unknown cpu'}|torch {torch.__version__}|{workload}|threads {threads}"


def _read_cache(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_cache(path: str, key: str, entry: dict[str, Any]) -> None:
    """Add one entry (read, update, atomic rename; a concurrent writer may win, which only costs a probe)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_cache(path) or {"version": CACHE_VERSION, "entries": {}}
        data.setdefault("entries", {})[key] = entry
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:6]}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the probe simply runs again next time


def choose(figures: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(precision, reason) from the probe's figures: the fastest correct candidate, fp32 on a near-tie."""
    ok = {p: f for p, f in figures.items() if f.get("correct") and f.get("step_ms")}
    if "fp32" not in ok:
        return "fp32", "fp32 (the probe could not time it; the safe default)"
    best = min(ok, key=lambda p: ok[p]["step_ms"])
    if best == "fp32":
        return "fp32", "fp32 trained fastest"
    gain = ok["fp32"]["step_ms"] / ok[best]["step_ms"]
    if gain < MIN_GAIN:
        return "fp32", f"{best} was only {gain:.2f}× fp32 (below {MIN_GAIN}×: fp32 is kept)"
    return best, f"{best} trained {gain:.2f}× faster than fp32"


def probe(
    make_step: StepFactory,
    workload: str,
    candidates: tuple[str, ...] = CPU_CANDIDATES,
    *,
    warmup: int = 2,
    rounds: int = 3,
    steps_per_round: int = 1,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Time ``make_step(p)``'s step for each candidate ``p``; return the choice and the figures.

    Candidates are timed round-robin (``rounds`` rounds of ``steps_per_round`` steps, the median
    round per step), so a drift in the machine's speed during the probe hits them alike. The result::

        {"precision": "bf16", "reason": "...", "cached": False, "key": "...", "seconds": 2.1,
         "figures": {"fp32": {"step_ms", "matmul_gflops", "loss", "correct"}, "bf16": {...}}}
    """
    threads = torch.get_num_threads()
    key = cache_key(workload, threads)
    path = cache_path()
    if use_cache:
        hit = (_read_cache(path).get("entries") or {}).get(key)
        if hit and hit.get("precision") in candidates:
            return {**hit, "cached": True, "key": key}

    t0 = time.perf_counter()
    steps: dict[str, Callable[[], float]] = {}
    figures: dict[str, dict[str, Any]] = {}
    for p in candidates:
        figures[p] = {"matmul_gflops": round(1000.0 * measure_matmul_tflops(p, size=512, seconds=0.2), 1)}
        try:
            steps[p] = make_step(p)
            losses = [float(steps[p]()) for _ in range(max(warmup, 2))]
            # The first step: the same weights and batch for all (a zero-initialised output layer, as
            # DiT's, makes it equal for every precision); the last: after a few updates at p.
            figures[p]["loss"], figures[p]["loss_after_updates"] = losses[0], losses[-1]
            figures[p]["correct"] = all(math.isfinite(v) for v in losses)
        except Exception as e:  # noqa: BLE001 - a candidate this machine cannot run is not chosen
            figures[p].update(correct=False, error=f"{type(e).__name__}: {e}"[:300])
            steps.pop(p, None)
    ref = figures.get("fp32", {})
    for p in candidates:
        f = figures[p]
        if p == "fp32" or not f.get("correct") or not ref.get("correct"):
            continue
        for name in ("loss", "loss_after_updates"):
            if abs(f[name] - ref[name]) > LOSS_RTOL * max(abs(ref[name]), 1e-6):
                f["correct"] = False
                f["error"] = f"{name} {f[name]:.5g} differs from fp32's {ref[name]:.5g} by > {LOSS_RTOL:.0%}"
    per_step: dict[str, list[float]] = {p: [] for p in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(list(steps)))
        for p in order:
            start = time.perf_counter()
            for _ in range(steps_per_round):
                steps[p]()
            per_step[p].append((time.perf_counter() - start) / steps_per_round)
    for p, times in per_step.items():
        figures[p]["step_ms"] = round(1000.0 * statistics.median(times), 2)
    precision, reason = choose(figures)
    entry = {
        "precision": precision,
        "reason": reason,
        "figures": figures,
        "threads": threads,
        "workload": workload,
        "cpu_model": cpu_model_name(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 2),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if use_cache:
        _write_cache(path, key, entry)
    return {**entry, "cached": False, "key": key}


def fastest_matmul_precision(size: int = 1024, seconds: float = 0.3) -> str:
    """The precision of the faster square CPU matmul here, measured (for benchmarks and summaries,
    where no training step is at hand); bf16 must beat fp32 by ``MIN_GAIN``."""
    fp32 = measure_matmul_tflops("fp32", size=size, seconds=seconds)
    bf16 = measure_matmul_tflops("bf16", size=size, seconds=seconds)
    return "bf16" if bf16 >= MIN_GAIN * fp32 else "fp32"
