"""`vitdit pipeline` with an s3:// workdir, every stage a Ray job, against a real S3 server (moto).

One test walks the stages in order (VAE, encode, ViT, DiT, sample, evaluate) at the quickstart's
smoke sizes, on a digits subset uploaded to the bucket; then checks what the bucket holds, what the
MLflow server (artifact store on the same bucket) holds, that a second submission skips every
stage, and that the secret key appears nowhere: not in the recipe, the jobs' entrypoints, metadata,
runtime envs or logs, the pipeline's output, nor in any MLflow param or tag.

It goes on with `vitdit evaluate --watch s3://.../dit` (one pass evaluates checkpoint 3 into the
bucket, a second finds nothing to do) and `train dit --resume s3://.../checkpoint_00000003`, whose
weights after two more steps must equal those of the same resume from a local copy.

Budget: slow (not in the default run). Measured on the shared 2-core machine: the pipeline part
352 s + 121 s of fixtures; the whole test passed in 664 s + 122 s of fixtures (1090 s in a run at a
load average of ~20).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from _s3_utils import upload_digits_subset

from pipelines import storage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ["vae", "encode", "vit", "dit", "sample", "evaluate"]


def _pipeline(recipe_path: str, head) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jobs.pipeline", recipe_path, "--address", head.address,
           "--working-dir", ROOT, "--python", sys.executable]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.ray
def test_pipeline_on_s3_through_the_job_api_then_skips(
    s3, s3_ray_head, s3_mlflow_server, digits_root, tmp_path
):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from pipelines.quickstart import build_recipe

    bucket = s3.bucket
    images = f"s3://{bucket}/e2e/digits"
    upload_digits_subset(digits_root, images, tmp_path)
    workdir = f"s3://{bucket}/e2e/run"
    raw = build_recipe(workdir, s3_mlflow_server, smoke_test=True)
    del raw["stages"]["data"]
    raw["inputs"] = {"images": images}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    t0 = int(time.time() * 1000)

    first = _pipeline(str(recipe), s3_ray_head)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-6000:]
    for k, name in enumerate(STAGES, 1):
        assert f"[{k}/{len(STAGES)}] {name:8s} done in " in out, name

    # Everything is in the bucket, nothing on the local disk of the driver.
    keys = set(s3.keys("e2e/run/"))
    for key in ("vae/vae/config.json", "vae/vae/diffusion_pytorch_model.safetensors", "latents/manifest.json",
                "vit/checkpoint_00000003/model.safetensors", "dit/checkpoint_00000003/model.safetensors",
                "dit/checkpoint_00000003/train_state.pt", "samples/samples.npz", "samples/grid.png",
                "eval/report.json"):  # fmt: skip
        assert f"e2e/run/{key}" in keys, key
    assert not any(os.path.exists(os.path.join(ROOT, d)) for d in ("s3:", "s3:/"))
    manifest = storage.read_json(f"{workdir}/latents/manifest.json")
    assert manifest["vae"]["name_or_path"] == f"{workdir}/vae/vae"  # named where every node finds it
    sampling = storage.read_json(f"{workdir}/samples/sampling.json")
    assert sampling["checkpoint"] == f"{workdir}/dit/checkpoint_00000003"
    local = tmp_path / "samples"
    storage.copy_dir(f"{workdir}/samples", str(local))
    with np.load(local / "samples.npz") as npz:
        assert npz["arr_0"].shape == (20, 16, 16, 3) and list(npz["arr_1"][:10]) == list(range(10))
    report = storage.read_json(f"{workdir}/eval/report.json")
    assert report["samples"] == f"{workdir}/samples" and report["reference"] == f"{images}/val"
    assert all(np.isfinite(v) for v in report["metrics"].values()), report["metrics"]

    # MLflow: runs on the server, their artifacts in the bucket (through the server's proxy).
    client = MlflowClient(s3_mlflow_server)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    runs = [r for r in runs if r.info.start_time >= t0]
    assert {"vitdit-vae", "vitdit-vit", "vitdit-dit", "vitdit-sample", "vitdit-eval"} <= {
        client.get_experiment(r.info.experiment_id).name for r in runs
    }
    art = s3.keys("mlartifacts/")
    assert any(k.endswith("/artifacts/samples/grid.png") for k in art), art
    assert any(k.endswith("/artifacts/evaluation/report.json") for k in art), art

    # A second submission finds every stage complete and submits no job.
    jobs = JobSubmissionClient(s3_ray_head.address)
    n_jobs = len(jobs.list_jobs())
    second = _pipeline(str(recipe), s3_ray_head)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-4000:]
    for k, name in enumerate(STAGES, 1):
        assert f"[{k}/{len(STAGES)}] {name:8s} output complete, skipped" in out2, name
    assert len(jobs.list_jobs()) == n_jobs

    # `vitdit evaluate --watch s3://.../dit`: the DiT run's checkpoint is sampled and evaluated once,
    # into the bucket; a second pass finds nothing to do.
    watch = [sys.executable, "-m", "jobs.evaluate", "--watch", f"{workdir}/dit",
             "--reference", f"{images}/val", "--classifier", f"{workdir}/vit/checkpoint_00000003",
             "--tracking-uri", s3_mlflow_server, "--num-samples", "10", "--sampling-steps", "2",
             "--batch-size", "10", "--num-actors", "1", "--max-reference", "40", "--kid-subsets", "4",
             "--address", s3_ray_head.gcs_address]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    w1 = subprocess.run(watch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out3 = w1.stdout + w1.stderr
    assert w1.returncode == 0 and "step 3: done" in out3, out3[-4000:]
    assert "e2e/run/dit/eval_samples/checkpoint_00000003/samples.npz" in set(s3.keys("e2e/run/dit/"))
    assert "e2e/run/dit/eval_samples/checkpoint_00000003/evaluation.json" in set(s3.keys("e2e/run/dit/"))
    w2 = subprocess.run(watch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out4 = w2.stdout + w2.stderr
    assert w2.returncode == 0 and "nothing to evaluate" in out4, out4[-3000:]

    # `train dit --resume s3://.../checkpoint_3` continues exactly as from the same checkpoint on disk.
    resumed = _resume_dit_both_ways(raw, workdir, s3_ray_head, tmp_path)
    shown_resume = resumed.pop("logs")
    for name in resumed["s3"]:
        np.testing.assert_array_equal(resumed["s3"][name], resumed["disk"][name], err_msg=name)

    # The secret key is nowhere it could be read by others.
    secret = s3.secret_key
    shown = [recipe.read_text(), out, out2, out3, out4, *shown_resume]
    for job in jobs.list_jobs():
        shown.append(json.dumps({"entrypoint": job.entrypoint, "metadata": job.metadata,
                                 "runtime_env": job.runtime_env}))  # fmt: skip
        if job.submission_id:  # drivers that joined by address are listed too, without logs here
            shown.append(jobs.get_job_logs(job.submission_id))
    for r in runs:
        shown.append(json.dumps({"params": r.data.params, "tags": r.data.tags}))
    for r in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        shown.append(json.dumps({"params": r.data.params, "tags": r.data.tags}))  # the watcher's too
    leaks = [i for i, text in enumerate(shown) if secret in text or s3.access_key in text]
    assert not leaks, f"{len(leaks)} of {len(shown)} texts hold the key"
    # Nor the endpoint: it is configuration of the machines, not of a run.
    assert not [t for t in shown if s3.endpoint in t]


def _resume_dit_both_ways(raw: dict, workdir: str, head, tmp_path) -> dict:
    """Two more DiT steps from ``dit/checkpoint_00000003``: once resumed from the bucket into the
    bucket, once from a local copy onto local disk, each a Ray job; returns both final weights."""
    import io

    from safetensors.numpy import load_file

    from pipelines.recipe import STAGES as RECIPE_STAGES
    from pipelines.recipe import parse_recipe, stage_argv
    from pipelines.submit import submit

    recipe = parse_recipe(raw)
    argv = stage_argv(recipe, next(s for s in RECIPE_STAGES if s.name == "dit"))
    argv[argv.index("--steps") + 1] = "5"

    def with_flag(args: list[str], flag: str, value: str) -> list[str]:
        if flag in args:
            args = list(args)
            args[args.index(flag) + 1] = value
            return args
        return [*args, flag, value]

    local_ckpt = tmp_path / "checkpoint_00000003"
    storage.copy_dir(f"{workdir}/dit/checkpoint_00000003", str(local_ckpt))
    runs = {
        "s3": (f"{workdir}/dit/checkpoint_00000003", f"{workdir}/dit_resumed"),
        "disk": (str(local_ckpt), str(tmp_path / "dit_resumed")),
    }
    weights, logs = {}, []
    for where, (resume, output) in runs.items():
        args = with_flag(with_flag(argv, "--output", output), "--resume", resume)
        # Each its own throwaway store: a resumed run reopens its checkpoint's MLflow run otherwise.
        args = with_flag(args, "--tracking-uri", f"sqlite:///{tmp_path / where}.db")
        log = io.StringIO()
        outcome = submit(head.address, "train_dit", args, working_dir=ROOT, python=sys.executable, out=log)
        logs.append(log.getvalue())
        assert outcome.status == "SUCCEEDED", (where, log.getvalue()[-4000:])
        final = tmp_path / f"final_{where}"
        storage.copy_dir(f"{output}/checkpoint_00000005", str(final))
        weights[where] = load_file(str(final / "model.safetensors"))
        assert json.loads((final / "config.json").read_text())["step"] == 5, where
    return {**weights, "logs": logs}
