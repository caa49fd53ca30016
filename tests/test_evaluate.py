"""Evaluation end to end on a tiny trained DiT and ViT classifier, logged to a real MLflow server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from _eval_utils import make_dit_checkpoint, make_vit_checkpoint

from pipelines.evaluate import EvalConfig, run_evaluation
from pipelines.sample import SampleConfig, SampleGenerator, resolve_sampling
from vitdit import samples as layout


@pytest.fixture(scope="module")
def tiny_samples(tmp_path_factory, tiny_vae_dir):
    """12 samples of a tiny DiT written in the samples layout (in-process: the Ray path is test_sample's)."""
    root = tmp_path_factory.mktemp("eval")
    ckpt = make_dit_checkpoint(
        str(root / "dit"), 40, tiny_vae_dir, mlflow={"tracking_uri": None, "run_id": None}
    )
    cfg = SampleConfig(
        checkpoint=ckpt, output=str(root / "samples"), num_samples=12, sampling_steps=3, batch_size=12
    )
    _, resolved, classes = resolve_sampling(cfg)
    from vitdit.vae import load_vae, vae_identity

    resolved["vae_identity"] = dataclasses.asdict(vae_identity(load_vae(tiny_vae_dir), tiny_vae_dir))
    gen = SampleGenerator(dataclasses.asdict(cfg), tiny_vae_dir, resolved["vae_identity"], classes)
    images, labels = gen.generate(range(12))
    layout.write_images(cfg.output, range(12), images, labels)
    layout.finalize(cfg.output, 12, resolved)
    vit = make_vit_checkpoint(str(root / "vit"))
    return cfg.output, vit


def test_evaluate_end_to_end(tiny_samples, digits_root, mlflow_server, tmp_path):
    samples, vit = tiny_samples
    cfg = EvalConfig(
        samples=samples, reference=digits_root, classifier=vit, max_reference=60, kid_subsets=10,
        tracking_uri=mlflow_server, report=str(tmp_path / "report.json"),
    )  # fmt: skip
    report = run_evaluation(cfg)
    m = report["metrics"]
    for key in ("eval/fd", "eval/kid", "eval/precision", "eval/recall", "eval/is", "eval/accuracy",
                "eval/floor/fd", "eval/floor/accuracy", "eval/reference/accuracy"):  # fmt: skip
        assert np.isfinite(m[key]), key
    assert m["eval/fd"] > 0 and 1.0 - 1e-9 <= m["eval/is"] <= 10 + 1e-9
    assert 0 <= m["eval/precision"] <= 1 and {f"eval/accuracy/{c}" for c in "0123456789"} <= set(m)
    # The floor: the untrained tiny VAE's reconstructions differ from the reference images (FD > 0);
    # which of floor and samples is closer depends on that random VAE, so it is not asserted.
    assert m["eval/floor/fd"] > 0 and m["eval/floor/fd"] != m["eval/fd"]
    sha = hashlib.sha256(open(os.path.join(vit, "ema.safetensors"), "rb").read()).hexdigest()
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["extractor"]["sha256"] == sha and on_disk["step"] == 40 and on_disk["num_reference"] == 60

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["vitdit.eval.extractor_sha256"] == sha
    history = client.get_metric_history(run.info.run_id, "eval/fd")
    assert [h.step for h in history] == [40] and history[0].value == pytest.approx(m["eval/fd"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} == {
        "evaluation/report.json", "evaluation/grid.png",
    }  # fmt: skip


def test_evaluate_job_bad_input_exits_2(tmp_path, capsys):
    from jobs.evaluate import main

    rc = main(
        ["--samples", str(tmp_path / "nope"), "--reference", str(tmp_path), "--classifier", str(tmp_path)]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
