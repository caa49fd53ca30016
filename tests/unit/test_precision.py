"""``--precision auto`` by measurement (vitdit.precision; the trainer's probe in pipelines/train/loop.py)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import vitdit
from pipelines.train.loop import TrainConfig, probe_precision
from vitdit import precision as vp


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITDIT_CACHE_DIR", str(tmp_path / "cache"))


def _fake_steps(ms: dict[str, float], losses: dict[str, float] | None = None, calls: list | None = None):
    """A step factory whose steps sleep ``ms[p]`` and return ``losses[p]`` (default 1.0)."""

    def make(p: str):
        if calls is not None:
            calls.append(p)

        def step() -> float:
            time.sleep(ms[p] / 1000.0)
            return (losses or {}).get(p, 1.0)

        return step

    return make


def test_the_faster_candidate_wins_and_the_answer_is_cached():
    calls: list[str] = []
    first = vp.probe(
        _fake_steps({"fp32": 30.0, "bf16": 10.0}, calls=calls), "fake", rounds=2, steps_per_round=1
    )
    assert first["precision"] == "bf16" and not first["cached"]
    assert first["figures"]["bf16"]["step_ms"] < first["figures"]["fp32"]["step_ms"]
    assert all(f["matmul_gflops"] > 0 and f["correct"] for f in first["figures"].values())
    assert "faster than fp32" in first["reason"]
    with open(vp.cache_path()) as f:
        assert first["key"] in json.load(f)["entries"]
    again = vp.probe(_fake_steps({"fp32": 30.0, "bf16": 10.0}, calls=calls), "fake")
    assert again["cached"] and again["precision"] == "bf16" and calls == ["fp32", "bf16"]  # no new steps
    # Another workload (or thread count, CPU, torch version) is probed anew.
    other = vp.probe(_fake_steps({"fp32": 5.0, "bf16": 20.0}), "other", rounds=2, steps_per_round=1)
    assert other["precision"] == "fp32" and not other["cached"]


def test_fp32_wins_near_ties_and_wrong_or_failing_candidates():
    figures = {"fp32": {"step_ms": 10.0, "correct": True}, "bf16": {"step_ms": 9.8, "correct": True}}
    assert vp.choose(figures)[0] == "fp32"  # 1.02x is within timing noise
    figures["bf16"]["step_ms"] = 5.0
    assert vp.choose(figures)[0] == "bf16"
    figures["bf16"]["correct"] = False
    assert vp.choose(figures)[0] == "fp32"
    # A bf16 step whose loss is far from fp32's is refused, however fast.
    off = vp.probe(
        _fake_steps({"fp32": 20.0, "bf16": 1.0}, {"fp32": 1.0, "bf16": 1.5}), "off", use_cache=False
    )
    assert off["precision"] == "fp32" and not off["figures"]["bf16"]["correct"]
    assert "differs from fp32" in off["figures"]["bf16"]["error"]
    nan = vp.probe(_fake_steps({"fp32": 20.0, "bf16": 1.0}, {"bf16": math.nan}), "nan", use_cache=False)
    assert nan["precision"] == "fp32" and not nan["figures"]["bf16"]["correct"]

    def broken(p):
        if p == "bf16":
            raise RuntimeError("no bf16 kernel")
        return _fake_steps({"fp32": 1.0})(p)

    failed = vp.probe(broken, "broken", use_cache=False)
    assert failed["precision"] == "fp32" and "no bf16 kernel" in failed["figures"]["bf16"]["error"]


class _TinyDiTTask:
    """Just what the probe calls: kind and loss (the DiT training loss on random latents)."""

    kind = "dit"

    def __init__(self):
        from vitdit.diffusion import create_diffusion

        self.diffusion = create_diffusion(timestep_respacing="")

    def loss(self, model, batch, generator):
        x = batch["x"]
        t = torch.randint(0, self.diffusion.num_timesteps, (len(x),), generator=generator)
        return self.diffusion.training_losses(model, x, t, {"y": batch["y"]})["loss"].mean(), {}


def test_the_trainer_probes_real_steps_of_copies_of_the_model():
    torch.manual_seed(0)
    raw = vitdit.create_model("DiT-test/2")
    before = {k: v.clone() for k, v in raw.state_dict().items()}
    batch = {"x": torch.randn(8, 4, 8, 8), "y": torch.randint(0, 10, (8,))}
    report = probe_precision(
        _TinyDiTTask(), raw, batch, TrainConfig(output="unused", lr=1e-3), torch.device("cpu")
    )
    assert report["precision"] in ("fp32", "bf16")
    for p in ("fp32", "bf16"):
        f = report["figures"][p]
        assert f["correct"] and f["step_ms"] > 0 and math.isfinite(f["loss"]), (p, f)
    # The same weights, batch and seeds: the losses agree to bf16 rounding (vitdit.precision.LOSS_RTOL).
    for key in ("loss", "loss_after_updates"):
        assert report["figures"]["bf16"][key] == pytest.approx(
            report["figures"]["fp32"][key], rel=vp.LOSS_RTOL
        )
    assert "micro 8" in report["key"] and f"torch {torch.__version__}" in report["key"]
    assert all(torch.equal(v, before[k]) for k, v in raw.state_dict().items())  # the run's model untouched
    assert all(m.attn_impl == "sdpa" for m in raw.modules() if hasattr(m, "attn_impl"))
