"""Smoke modes of the benchmark scripts: they run end to end on tiny presets and print their JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_gpu_benchmark_smoke_runs_without_installing_vitdit(tmp_path):
    """benchmarks/gpu.py as the lead runs it on a GPU machine: PYTHONPATH=. from the repo root."""
    env = {**os.environ, "PYTHONPATH": ".", "OUT": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = _last_json(out.stdout)
    assert result["smoke"] is True and result["device"] == "cpu"
    assert json.load(open(tmp_path / "gpu_bench.json")) == result
    for part, peer in (("dit", "diffusers"), ("vit", "transformers")):
        sides = {r["side"] for r in result[part]["rows"]}
        assert sides == {"vitdit", peer}
        assert all(r["img_per_s"] > 0 and r["train_flops_per_img"] > 0 for r in result[part]["rows"])
        assert result[part]["ratios"]["best_vs_best"] > 0
    assert result["vae_encode"]["img_per_s"] > 0
    assert result["peaks_flops"]["matmul_fp32"] > 0


def test_train_step_benchmark_smoke():
    import contextlib
    import io

    from benchmarks.train_step import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--smoke", "--no-keep-heap"]) == 0  # mallopt would outlive the test in this process
    result = _last_json(buf.getvalue())
    assert result["keep_heap"] is False
    dit = result["dit"]
    settings = {(r["side"], r["precision"], r["attn"]) for r in dit["rows"]}
    assert settings == {
        (s, p, a) for s in ("vitdit", "diffusers") for p, a in (("fp32", "sdpa"), ("bf16", "math"))
    }
    # (a) identical settings both eager, and (b) best against best, for both model families.
    assert {"same_fp32_sdpa_eager", "same_bf16_math_eager", "best_vs_best"} <= set(dit["ratios"])
    assert {"same_fp32_sdpa_eager", "best_vs_best"} <= set(result["vit"]["ratios"])
    for part in ("dit", "vit"):  # the >= 1.0x target at identical settings, judged over every pair
        target = result[part]["same_settings_target"]
        same = [v for k, v in result[part]["ratios"].items() if k.startswith("same_")]
        assert target["min_ratio"] == min(same) and target["met"] == (min(same) >= 1.0)
    assert all(0 < r["frac_of_matmul"] for r in dit["rows"])
    assert all("minor_faults_per_step" in r for r in dit["rows"])  # counting: the keep_freed_memory test
    per_round = dit["ratios"]["best_vs_best_per_round"]  # smoke: 2 rounds
    assert per_round["min"] <= per_round["median"] <= per_round["max"]
    if os.path.exists("/proc/stat"):  # how busy the host was while the benchmark ran, itself included
        shares = result["cpu_time_shares"]
        assert sum(shares.values()) == pytest.approx(1.0) and shares["busy"] > 0


def test_matmul_share_smoke_sees_the_same_matmuls_on_both_sides():
    import contextlib
    import io

    from benchmarks.matmul_share import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--smoke", "--no-keep-heap"]) == 0
    result = _last_json(buf.getvalue())
    # The same network on both sides. vitdit's ViT computes only [cls] in its last block (the only
    # token the head reads), so its matmul FLOPs are the forward_macs ratio of the two paths (its patch
    # embedding is also a matmul here, where the peer's is a convolution the count leaves out: +2.5% for
    # this tiny model); diffusers' DiT recomputes the timestep/class embedding MLP in every block.
    from vitdit.models import create_model

    with torch.device("meta"):
        vit = create_model("ViT-test/4")
    fewer = vit.forward_macs() / vit.forward_macs(all_tokens=True)  # 0.62 for this depth-2 model
    assert result["vit"]["matmul_flops_ratio"] == pytest.approx(fewer, rel=0.05)
    assert 0.9 < result["dit"]["matmul_flops_ratio"] < 1.0
    for part, peer in (("dit", "diffusers"), ("vit", "transformers")):
        for side in ("vitdit", peer):
            row = result[part][side]
            assert row["matmul_calls"] > 0 and 0 < row["matmul_share"] < 1
        # A ratio of two timings (the peer's step, vitdit's matmuls): reported, never bounded in a
        # test (a shared machine moves it either way; the measured values live in RESULTS.md).
        assert result[part]["ceiling_vs_peer"] > 0


def test_compiled_rows_run_at_the_precision_that_is_fast_on_this_cpu():
    sys.path.insert(0, ROOT)
    from benchmarks.train_step import cpu_settings

    for precision in ("fp32", "bf16"):
        rows = cpu_settings("ours", "peer", smoke=False, compile_=True, compile_precision=precision)
        compiled = [(r["side"], r["precision"], r["attn"]) for r in rows if r["compile"]]
        assert compiled == [
            ("ours", precision, "math"),
            ("peer", precision, "math"),
            ("peer", precision, "sdpa"),
        ]
        assert len([r for r in rows if not r["compile"]]) == 8  # 2 sides × fp32/bf16 × sdpa/math, eager
    assert not any(r["compile"] for r in cpu_settings("ours", "peer", smoke=True, compile_=False))


def test_pairs_run_back_to_back_and_same_setting_ratios_are_paired_per_round():
    sys.path.insert(0, ROOT)
    from benchmarks.gpu import _paired_order, ratios

    settings = [
        {"side": side, "precision": p, "compile": False, "attn": "math"}
        for side in ("ours", "peer")
        for p in ("fp32", "bf16")
    ]
    assert _paired_order(settings) == [0, 2, 1, 3]  # ours fp32, peer fp32, ours bf16, peer bf16

    def row(side, precision, rounds):
        ts = sorted(rounds)
        return {"side": side, "precision": precision, "compile": False, "attn": "math",
                "img_per_s": 1 / ts[len(ts) // 2], "round_sec_per_step": rounds}  # fmt: skip

    # The machine slows 3× in the last rounds: each round's pair is level, the medians are not.
    rows = [row("ours", "fp32", [1.0, 1.0, 3.0, 3.0, 3.0]), row("peer", "fp32", [1.0, 1.0, 1.0, 3.0, 3.0])]
    out = ratios(rows, "ours", "peer")
    assert out["same_fp32_math_eager"] == 1.0
    assert out["best_vs_best"] == 1 / 3  # best vs best stays a ratio of medians
    assert out["best_vs_best_per_round"] == {"median": 1.0, "min": 1 / 3, "max": 1.0}


def test_keep_freed_memory_stops_the_page_faults_of_repeated_large_allocations():
    # A fresh process per mode: mallopt lasts for the process. A training step's pattern in small:
    # tensors of 16-64 MiB allocated and freed, over and over. glibc by default maps and unmaps (or
    # trims) them, so each round faults ~28,000 pages of 4 KiB back in; kept, the heap settles within
    # a few rounds and stops faulting (the median round is compared: a settling round may still fault).
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); from benchmarks.gpu import keep_freed_memory, "
        "minor_faults\n"
        "kept = keep_freed_memory() if sys.argv[2] == '1' else False\n"
        "faults = []\n"
        "for _ in range(12):\n"
        "    f0 = minor_faults()\n"
        "    a = torch.ones(1 << 22); b = torch.ones(1 << 24); del a; c = torch.ones(1 << 23); del b, c\n"
        "    faults.append(minor_faults() - f0)\n"
        "print(kept, sorted(faults[4:])[4])\n"  # the median round once the heap has had 4 rounds
    )
    out = {}
    for mode in ("0", "1"):
        res = subprocess.run(
            [sys.executable, "-c", code, ROOT, mode], capture_output=True, text=True, check=True
        )
        kept, faults = res.stdout.split()
        out[mode] = (kept == "True", float(faults))
    assert out["0"][0] is False and out["1"][0] is True
    assert out["0"][1] > 10_000
    assert out["1"][1] < 0.1 * out["0"][1]


@pytest.mark.slow
def test_data_start_benchmark_smoke(tmp_path):
    out = tmp_path / "data_start.json"
    subprocess.run(
        [sys.executable, "benchmarks/data_start.py", "--smoke", "--json-out", str(out)],
        check=True, cwd=ROOT, capture_output=True, timeout=600,
    )  # fmt: skip
    record = json.loads(out.read_text())
    for key in (
        "read_v2_default_s",
        "read_v1_s",
        "val_split_udf_importing_torch_s",
        "val_split_udf_torch_free_s",
    ):
        assert len(record[key]) == 2 and all(t > 0 for t in record[key]), key


@pytest.mark.slow
def test_quickstart_levers_smoke(tmp_path):
    """benchmarks/quickstart_levers.py: both layouts (1 process × 2 threads, 2 DDP processes × 1) at
    both precisions, for both of the quickstart's transformers."""
    out = tmp_path / "levers.json"
    subprocess.run(
        [sys.executable, "benchmarks/quickstart_levers.py", "--smoke", "--json-out", str(out)],
        check=True, cwd=ROOT, capture_output=True, timeout=600,
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    got = {(r["kind"], r["precision"], r["layout"]) for r in rows}
    assert got == {(k, p, lay) for k in ("vit", "dit") for p in ("fp32", "bf16") for lay in ("1x2", "2x1")}
    assert all(r["img_per_s"] > 0 and r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"] for r in rows)
