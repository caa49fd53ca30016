"""`vitdit pipeline` with an s3:// workdir, every stage a Ray job, against a real S3 server (moto).

One test walks the stages in order at the quickstart's smoke sizes, on a digits subset uploaded to
the bucket; then checks what the bucket holds, what the MLflow server (artifact store on the same
bucket) holds, that a second submission skips every stage, and that the secret key appears nowhere:
not in the recipe, the jobs' entrypoints, metadata, runtime envs or logs, the pipeline's output, nor
in any MLflow param or tag. It goes on with `vitdit evaluate --watch s3://.../dit` (one pass
evaluates the run's checkpoints into the bucket, a second finds nothing to do) and `train dit
--resume s3://.../checkpoint_00000003`.

Two forms:
- ``compact`` (default run): encode, DiT (5 steps, checkpoints 3 and 5), sample, evaluate. The encode
  stage's command is run first, its driver SIGKILLed once a part is in the bucket, and run again:
  each id exactly once, and the pipeline finds the stage complete. The VAE is
  written to the bucket in-process by the VAE stage's own ``save_vae``, the classifier is a ViT
  checkpoint made here and uploaded: their stages' Ray Train fits take the DiT's path to the bucket. The resume from the bucket's checkpoint 3 must end with the weights of the uninterrupted
  run's checkpoint 5. Measured 2026-12-04 on the 2-core EPYC: 160-182 s
  plus 10-19 s of fixtures.
- ``full`` (slow): every stage of the quickstart (the ViT trained to the bucket too); the resume from
  the bucket must equal the same resume from a local copy. 206 s + 14 s of fixtures on the idle
  machine (the pipeline 126 s, the second submission 4 s, two watch passes 15 s, two resumes 57 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from _s3_utils import upload_digits_subset

from pipelines import storage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL = ("vae", "encode", "vit", "dit", "sample", "evaluate")
COMPACT = ("encode", "dit", "sample", "evaluate")


def _encode_killed_then_rerun(s3, recipe_raw: dict, head, tmp_path) -> list[str]:
    """The recipe's encode stage, its driver SIGKILLed once the first part is in the bucket, then the
    same command again: the second finishes from the parts the first wrote, each id exactly once.
    The drivers join ``head`` (whose workers have the S3 variables) as a `ray job submit` driver
    would. Returns both drivers' logs."""
    from pipelines.recipe import STAGES as RECIPE_STAGES
    from pipelines.recipe import parse_recipe, stage_argv

    recipe = parse_recipe(recipe_raw)
    argv = [
        *stage_argv(recipe, next(s for s in RECIPE_STAGES if s.name == "encode")),
        "--address",
        head.gcs_address,
    ]
    out = argv[argv.index("--output") + 1]
    progress = out.split(f"s3://{s3.bucket}/")[1] + "/_progress/chunk-"

    def markers() -> list[str]:  # finished parts (a ``.json.tmp-*`` is one being written)
        return [k for k in s3.keys(progress) if k.endswith(".json")]

    def encode(log_name: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        log = open(tmp_path / log_name, "wb")
        return subprocess.Popen([sys.executable, "-m", "jobs.encode_latents", *argv], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    proc = encode("encode-first.log")
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None and not markers():
            time.sleep(0.2)
        first = (tmp_path / "encode-first.log").read_text()
        assert proc.poll() is None, f"driver ended before the first part: {first[-3000:]}"
        assert markers(), "no finished part within 150 s"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not storage.exists(f"{out}/manifest.json")
    done_before = len(markers())
    images = [k for k in s3.keys(recipe_raw["inputs"]["images"].split(f"s3://{s3.bucket}/")[1] + "/train/")
              if k.endswith(".png")]  # fmt: skip
    n_parts = -(-len(images) // 4)
    assert 1 <= done_before < n_parts, (done_before, n_parts)

    again = encode("encode-second.log")
    assert again.wait(300) == 0, (tmp_path / "encode-second.log").read_text()[-3000:]
    second = (tmp_path / "encode-second.log").read_text()
    assert f"{done_before} resumed" in second, second[-2000:]
    ids = []
    fs, _ = storage.filesystem(out)
    for key in sorted(k for k in s3.keys(out.split(f"s3://{s3.bucket}/")[1] + "/") if k.endswith(".parquet")):
        ids += pq.read_table(f"{s3.bucket}/{key}", filesystem=fs, columns=["id"]).column("id").to_pylist()
    expected = sorted(k.split("/train/")[1] for k in images)
    assert len(ids) == len(set(ids)) and sorted(ids) == expected  # each id exactly once
    return [first, second]


def _pipeline(recipe_path: str, head) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jobs.pipeline", recipe_path, "--address", head.address,
           "--working-dir", ROOT, "--python", sys.executable]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.ray
@pytest.mark.parametrize(
    "stages",
    [
        pytest.param(COMPACT, id="compact"),
        pytest.param(FULL, id="full", marks=[pytest.mark.slow, pytest.mark.heavy]),
    ],
)
def test_pipeline_on_s3_through_the_job_api_then_skips(
    stages, s3, s3_ray_head, s3_mlflow_server, digits_root, tiny_vae_dir, tmp_path
):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from pipelines.quickstart import build_recipe

    compact = stages == COMPACT
    bucket = s3.bucket
    prefix = "e2e-compact" if compact else "e2e"
    images = f"s3://{bucket}/{prefix}/digits"
    upload_digits_subset(digits_root, images, tmp_path)
    workdir = f"s3://{bucket}/{prefix}/run"
    raw = build_recipe(workdir, s3_mlflow_server, smoke_test=True)
    del raw["stages"]["data"]
    raw["inputs"] = {"images": images}
    vae = f"{workdir}/vae/vae"
    if compact:
        from _eval_utils import make_vit_checkpoint
        from diffusers import AutoencoderKL

        from pipelines.train.vae import save_vae

        # The VAE stage's upload (save_pretrained, then into the bucket), in-process: its Ray Train
        # fit is the DiT's path again, in the full form.
        vae = save_vae(AutoencoderKL.from_pretrained(tiny_vae_dir), f"s3://{bucket}/{prefix}/trained")
        assert vae == f"s3://{bucket}/{prefix}/trained/vae"
        raw["inputs"]["vae"] = vae
        del raw["stages"]["vae"], raw["stages"]["vit"]
        classifier = f"s3://{bucket}/{prefix}/classifier/checkpoint_00000010"
        storage.copy_dir(make_vit_checkpoint(str(tmp_path / "vit")), classifier)
        raw["inputs"]["classifier"] = classifier
        raw["stages"]["dit"].update(steps=5, checkpoint_every=3)
        raw["stages"]["encode"]["part_size"] = 4  # 40 parts: the kill below lands mid-run
    else:
        classifier = f"{workdir}/vit/checkpoint_00000003"
    last = raw["stages"]["dit"]["steps"]
    # What an earlier run on this machine left in the local staging directory of the samples' URI (a
    # bucket emptied or re-created since) is not this run's: sampling starts from what the URI holds.
    from pipelines.sample import staging_dir

    stale = staging_dir(f"{workdir}/samples")
    os.makedirs(stale, exist_ok=True)
    with open(os.path.join(stale, "sampling.json"), "w") as f:
        json.dump({"vae": "s3://elsewhere/vae", "checkpoint": "s3://elsewhere/dit/checkpoint_00000001"}, f)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    t0 = int(time.time() * 1000)
    # Compact: the encode stage's own command first, killed mid-run and re-run; the pipeline then finds
    # its output complete.
    encode_logs = _encode_killed_then_rerun(s3, raw, s3_ray_head, tmp_path) if compact else []
    ran = stages[1:] if compact else stages

    first = _pipeline(str(recipe), s3_ray_head)
    out = first.stdout + first.stderr
    print("\n".join(line for line in out.splitlines() if " done in " in line))
    print(f"pipeline: {time.time() - t0 / 1000:.0f} s")
    assert first.returncode == 0, out[-6000:]
    for k, name in enumerate(stages, 1):
        done = f"[{k}/{len(stages)}] {name:8s} " + ("done in " if name in ran else "output complete, skipped")
        assert done in out, name

    # Everything is in the bucket, nothing on the local disk of the driver.
    keys = set(s3.keys(f"{prefix}/run/"))
    expected = ["latents/manifest.json", "dit/checkpoint_00000003/model.safetensors",
                "dit/checkpoint_00000003/train_state.pt", f"dit/checkpoint_{last:08d}/model.safetensors",
                "samples/samples.npz", "samples/grid.png", "eval/report.json"]  # fmt: skip
    if not compact:
        expected += ["vit/checkpoint_00000003/model.safetensors"]
    for key in expected:
        assert f"{prefix}/run/{key}" in keys, key
    vae_keys = set(s3.keys(vae.split(f"s3://{bucket}/")[1] + "/"))
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert f"{vae.split(f's3://{bucket}/')[1]}/{name}" in vae_keys, name
    assert not any(os.path.exists(os.path.join(ROOT, d)) for d in ("s3:", "s3:/"))
    manifest = storage.read_json(f"{workdir}/latents/manifest.json")
    assert manifest["vae"]["name_or_path"] == vae  # named where every node finds it
    sampling = storage.read_json(f"{workdir}/samples/sampling.json")
    assert sampling["checkpoint"] == f"{workdir}/dit/checkpoint_{last:08d}"
    assert not os.path.exists(stale)  # removed after the upload
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
    experiments = {"vitdit-dit", "vitdit-sample", "vitdit-eval"} | (
        set() if compact else {"vitdit-vae", "vitdit-vit"}
    )
    assert experiments <= {client.get_experiment(r.info.experiment_id).name for r in runs}
    art = s3.keys("mlartifacts/")
    assert any(k.endswith("/artifacts/samples/grid.png") for k in art), art
    assert any(k.endswith("/artifacts/evaluation/report.json") for k in art), art

    # A second submission finds every stage complete and submits no job.
    jobs = JobSubmissionClient(s3_ray_head.address)
    n_jobs = len(jobs.list_jobs())
    second = _pipeline(str(recipe), s3_ray_head)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-4000:]
    for k, name in enumerate(stages, 1):
        assert f"[{k}/{len(stages)}] {name:8s} output complete, skipped" in out2, name
    assert len(jobs.list_jobs()) == n_jobs

    # `vitdit evaluate --watch s3://.../dit`: the DiT run's checkpoints are sampled and evaluated once,
    # into the bucket; a second pass finds nothing to do.
    watch = [sys.executable, "-m", "jobs.evaluate", "--watch", f"{workdir}/dit",
             "--reference", f"{images}/val", "--classifier", classifier,
             "--tracking-uri", s3_mlflow_server, "--num-samples", "10", "--sampling-steps", "2",
             "--batch-size", "10", "--num-actors", "1", "--max-reference", "40", "--kid-subsets", "4",
             "--address", s3_ray_head.gcs_address]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    w1 = subprocess.run(watch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out3 = w1.stdout + w1.stderr
    assert w1.returncode == 0 and "step 3: done" in out3 and f"step {last}: done" in out3, out3[-4000:]
    evaluated = set(s3.keys(f"{prefix}/run/dit/"))
    for step in {3, last}:
        for name in ("samples.npz", "evaluation.json"):
            assert f"{prefix}/run/dit/eval_samples/checkpoint_{step:08d}/{name}" in evaluated, (step, name)
    w2 = subprocess.run(watch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out4 = w2.stdout + w2.stderr
    assert w2.returncode == 0 and "nothing to evaluate" in out4, out4[-3000:]

    # `train dit --resume s3://.../checkpoint_3` continues exactly: as the uninterrupted run did (compact),
    # as the same resume from a local copy does (full).
    print(f"to the resume: {time.time() - t0 / 1000:.0f} s")
    resumed = _resume_dit(raw, workdir, s3_ray_head, tmp_path, both_ways=not compact)
    shown_resume = resumed.pop("logs")
    if compact:
        final = tmp_path / "uninterrupted"
        storage.copy_dir(f"{workdir}/dit/checkpoint_{last:08d}", str(final))
        from safetensors.numpy import load_file

        resumed["disk"] = load_file(str(final / "model.safetensors"))
    for name in resumed["s3"]:
        np.testing.assert_array_equal(resumed["s3"][name], resumed["disk"][name], err_msg=name)

    # The secret key is nowhere it could be read by others.
    secret = s3.secret_key
    shown = [recipe.read_text(), out, out2, out3, out4, *shown_resume, *encode_logs]
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


def _resume_dit(raw: dict, workdir: str, head, tmp_path, both_ways: bool) -> dict:
    """Two more DiT steps from ``dit/checkpoint_00000003``: resumed from the bucket into the bucket
    and (``both_ways``) from a local copy onto local disk, each a Ray job; returns the final weights."""
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

    runs = {"s3": (f"{workdir}/dit/checkpoint_00000003", f"{workdir}/dit_resumed")}
    if both_ways:
        local_ckpt = tmp_path / "checkpoint_00000003"
        storage.copy_dir(f"{workdir}/dit/checkpoint_00000003", str(local_ckpt))
        runs["disk"] = (str(local_ckpt), str(tmp_path / "dit_resumed"))
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
