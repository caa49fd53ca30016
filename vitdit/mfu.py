"""Peak FLOP/s for model FLOPs utilisation (MFU = training FLOPs / (elapsed × peak)).

The peak comes from, in order: an explicit ``--peak-tflops``; a table of dense tensor-core peaks of
known GPUs (vendor datasheets, without sparsity); on a CPU, a matmul measured once at start at the
training precision (the issue's measurement here: 4096² matmul 390 GFLOP/s fp32, 2,177 bf16).
"""

from __future__ import annotations

import functools
import time

import torch

# Dense peak TFLOP/s by (substring of torch.cuda.get_device_name(), precision). fp32 means TF32 on
# tensor cores (what training uses with TF32 on). Ordered: first match wins, so "H100 PCIe" and
# "H100 NVL" come before the SXM default.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 418.0}),
    ("H100", {"bf16": 989.4, "fp32": 494.7}),
    ("H200", {"bf16": 989.4, "fp32": 494.7}),
    ("GH200", {"bf16": 989.4, "fp32": 494.7}),
    ("B200", {"bf16": 2250.0, "fp32": 1100.0}),
    ("A100", {"bf16": 312.0, "fp32": 156.0}),
    ("A10G", {"bf16": 70.0, "fp32": 35.0}),
    ("A10", {"bf16": 125.0, "fp32": 62.5}),
    ("L40S", {"bf16": 362.0, "fp32": 183.0}),
    ("L4", {"bf16": 121.0, "fp32": 60.0}),
    ("V100", {"fp32": 15.7}),  # no bf16 tensor cores
    ("T4", {"fp32": 8.1}),
]


def has_cpu_bf16_matrix_units() -> bool:
    """True on CPUs with AMX-BF16 (Sapphire Rapids and later), where bf16 matmuls run ~5× fp32.

    Without them torch emulates bf16 matmuls: on an AVX-512 Xeon without AMX, a 2048³ bf16 matmul
    measured 42 GFLOP/s against 155 for fp32 (2 threads), so bf16 is the *slow* precision there.
    """
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def fastest_cpu_precision() -> str:
    """The precision ``--precision auto`` trains at on this CPU: "bf16" with AMX-BF16, else "fp32"."""
    return "bf16" if has_cpu_bf16_matrix_units() else "fp32"


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's peak for a GPU name and precision ("fp32" | "bf16"), or None when unknown."""
    for key, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None


@functools.lru_cache(maxsize=8)
def measure_matmul_tflops(precision: str = "fp32", size: int = 1024, seconds: float = 0.5) -> float:
    """Achieved TFLOP/s of a square CPU matmul at ``precision`` with torch's current thread count."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(2):  # warm-up: first calls pick kernels and allocate
        a @ b
    n, start = 0, time.perf_counter()
    while True:
        a @ b
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 3:
            break
    return 2.0 * size**3 * n / elapsed / 1e12


def peak_flops(device: torch.device | str, precision: str, override_tflops: float | None = None) -> float:
    """Peak FLOP/s to divide by: override, else GPU table, else a measured CPU matmul."""
    if override_tflops:
        return override_tflops * 1e12
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf = gpu_peak_tflops(name, precision)
        if tf is not None:
            return tf * 1e12
    return measure_matmul_tflops(precision) * 1e12


def mfu(flops_per_sample: float, samples_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak."""
    return flops_per_sample * samples_per_s / peak if peak > 0 else 0.0
