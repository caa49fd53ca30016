"""CPU-time accounting for honest timings (vitdit.mfu): /proc/stat readings and their shares."""

from __future__ import annotations

import os
import platform
import time

import pytest
import torch

from jobs.quickstart import STEAL_WARNING, cpu_matmul_gflops, machine_lines
from vitdit.mfu import cpu_model_name, cpu_time_shares, cpu_times

STAT = """cpu  {user} 50 {system} {idle} 10 0 {softirq} {steal} 7 0
cpu0 1 2 3 4 5 6 7 8 0 0
intr 123 4 5
"""


def _stat(tmp_path, name, **ticks):
    path = tmp_path / name
    path.write_text(STAT.format(**ticks))
    return str(path)


def test_cpu_time_shares_split_a_period_into_busy_idle_and_steal(tmp_path):
    before = cpu_times(_stat(tmp_path, "a", user=1000, system=200, idle=5000, softirq=20, steal=100))
    after = cpu_times(_stat(tmp_path, "b", user=1600, system=300, idle=5200, softirq=20, steal=200))
    assert before == {"user": 1000, "nice": 50, "system": 200, "idle": 5000, "iowait": 10, "irq": 0,
                      "softirq": 20, "steal": 100}  # fmt: skip
    shares = cpu_time_shares(before, after)
    # 1,000 ticks passed: 700 busy (user 600 + system 100), 200 idle, 100 steal; guest columns ignored.
    assert shares == pytest.approx({"busy": 0.7, "idle": 0.2, "steal": 0.1})
    assert cpu_time_shares(after, before) is None  # counters never go backwards: not one period
    assert cpu_time_shares(None, after) is None


def test_cpu_times_of_a_kernel_without_a_steal_column_and_of_no_proc(tmp_path):
    old = tmp_path / "old"
    old.write_text("cpu 10 0 5 100 0 0 0\n")
    assert cpu_times(str(old))["steal"] == 0
    assert cpu_times(str(tmp_path / "missing")) is None
    assert cpu_model_name(str(tmp_path / "missing")) == (platform.processor() or None)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Example CPU @ 2.50GHz\n")
    assert cpu_model_name(str(info)) == "Example CPU @ 2.50GHz"


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc only")
def test_busy_share_of_this_machine_rises_while_a_cpu_spins():
    before = cpu_times()
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:
        pass
    shares = cpu_time_shares(before, cpu_times())
    assert shares is not None and sum(shares.values()) == pytest.approx(1.0)
    # One of os.cpu_count() CPUs spun the whole time, so busy + steal is at least about its share
    # (half of it here: the kernel counts in 10 ms ticks and the window is a little over 0.5 s).
    assert shares["busy"] + shares["steal"] >= 0.5 / (os.cpu_count() or 1)
    assert cpu_model_name()


def test_the_quickstart_summary_warns_when_the_hypervisor_took_cpu_time():
    machine = {"cpu_model": "Some Xeon", "cpus": 2, "amx_bf16": False}
    calm = machine_lines({**machine, "cpu_time_shares": {"busy": 0.9, "idle": 0.08, "steal": 0.02}})
    assert calm[0] == "  machine: Some Xeon, 2 CPUs (no AMX-BF16)"
    assert calm[1] == "  CPU time during the run: busy 90%, idle 8%, steal 2%"
    assert len(calm) == 2
    stolen = machine_lines({**machine, "cpu_time_shares": {"busy": 0.7, "idle": 0.1, "steal": 0.2}})
    assert len(stolen) == 3 and "20%" in stolen[2] and "steal" in stolen[2]
    assert 0.02 < STEAL_WARNING <= 0.2
    assert machine_lines({}) == ["  machine: unknown CPU, None CPUs (no AMX-BF16)"]
    fast = machine_lines({**machine, "matmul_gflops": {"fp32": 154.4, "bf16": 301.0}})
    assert fast[1] == "  2048² matmul at the start: fp32 154 GFLOP/s, bf16 301 GFLOP/s"


def test_the_quickstart_summary_says_what_each_stage_trained_in_and_why():
    probes = {
        "vit": {"precision": "bf16", "requested": "auto", "cached": False,
                "figures": {"fp32": {"step_ms": 80.2}, "bf16": {"step_ms": 55.0}}},
        "vae": {"precision": "fp32", "requested": "fp32"},
        "dit": {"precision": "bf16", "requested": "auto", "cached": True,
                "figures": {"fp32": {"step_ms": 70.0}, "bf16": {"step_ms": 50.4}}},
    }  # fmt: skip
    lines = machine_lines({"cpu_model": "EPYC", "cpus": 2, "precision_probe": probes})
    assert lines[1] == "  vit trained in bf16 (probe: a step in fp32 80 ms, bf16 55 ms)"
    assert lines[2] == "  vae trained in fp32 (set in the recipe)"
    assert lines[3] == "  dit trained in bf16 (probe: a step in fp32 70 ms, bf16 50 ms; cached)"


def test_the_quickstart_measures_this_cpus_matmul_speed():
    threads = torch.get_num_threads()
    gflops = cpu_matmul_gflops(seconds=0.2)
    assert gflops is not None and set(gflops) == {"fp32", "bf16"}
    assert all(0.5 < v < 100_000 for v in gflops.values())  # real CPU measurements, in GFLOP/s
    assert torch.get_num_threads() == threads  # restored for the caller
