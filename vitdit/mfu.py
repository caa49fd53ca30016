"""Peak FLOP/s for model FLOPs utilisation (MFU = training FLOPs / (elapsed × peak)).

The peak comes from, in order: an explicit ``--peak-tflops``; a table of dense tensor-core peaks of
known GPUs (vendor datasheets, without sparsity); on a CPU, a matmul measured once at start at the
training precision (the issue's measurement here: 4096² matmul 390 GFLOP/s fp32, 2,177 bf16).

Also the CPU facts that timings depend on: bf16 matrix units, the model name, and the machine's CPU
time by kind (busy, idle, and "steal", taken by a hypervisor for other guests) over a run.
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
    """True on CPUs with AMX-BF16 (Sapphire Rapids and later). A fact to record next to timings, not
    a rule for choosing a precision: CPUs without AMX differ (bf16 is ~4× slower than fp32 on an
    AVX-512 Xeon without bf16 instructions, 1.25-1.5× faster on an AMD EPYC with AVX512-BF16), so
    ``--precision auto`` measures (``vitdit.precision``)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


# The fields of /proc/stat's "cpu" line (proc(5)), in clock ticks since boot. guest and guest_nice
# are already counted in user and nice.
_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times(path: str = "/proc/stat") -> dict[str, int] | None:
    """The machine's cumulative CPU time by kind (clock ticks, all CPUs) from ``/proc/stat``.

    None where there is no such file (not Linux). Two readings give the shares of the time between
    them (``cpu_time_shares``): on a virtual machine, "steal" is time the hypervisor gave to other
    guests while this one had work, so stage times and benchmarks then run slower than on an idle
    host (on this project's 2-core VM: 10-20% steal in `top` during one quickstart, 3% over another).
    """
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == "cpu":
                    values = [int(v) for v in fields[1 : 1 + len(_STAT_FIELDS)]]
                    values += [0] * (len(_STAT_FIELDS) - len(values))  # old kernels: no steal column
                    return dict(zip(_STAT_FIELDS, values, strict=True))
    except (OSError, ValueError):
        return None
    return None


def cpu_time_shares(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, float] | None:
    """Shares of the machine's CPU time between two ``cpu_times()`` readings: busy, idle, steal (sum 1)."""
    if not before or not after:
        return None
    delta = {k: after[k] - before[k] for k in _STAT_FIELDS}
    total = sum(delta.values())
    if total <= 0 or min(delta.values()) < 0:
        return None
    idle = delta["idle"] + delta["iowait"]
    steal = delta["steal"]
    return {"busy": (total - idle - steal) / total, "idle": idle / total, "steal": steal / total}


def cpu_model_name(path: str = "/proc/cpuinfo") -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (x86 and most ARM kernels), else ``platform.processor()``."""
    import platform

    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


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
