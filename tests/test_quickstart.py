"""`vitdit quickstart`: the packaged recipe, the memorisation check, and the whole smoke run.

The smoke run (`--smoke-test`) runs every stage for real (Ray Train fits, Ray Data encode and
sampling, MLflow in a SQLite store) at tiny sizes, then runs again to show finished stages are
skipped.
"""

from __future__ import annotations

import json
import os
import sys
import time

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import quickstart
from pipelines.recipe import STAGES as ALL_STAGES
from pipelines.recipe import parse_recipe
from vitdit.errors import VitditError
from vitdit.memorization import memorization_report, nearest_distances, to_vectors

# The digits quickstart runs every stage but the text-to-image ones (configs/numbers.yaml has those).
STAGES = tuple(s for s in ALL_STAGES if s.name not in ("numbers", "mmdit"))

# --- the memorisation check (no Ray) ---------------------------------------------------------------


def _digits(n: int, seed: int, res: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, res, res, 3), dtype=np.uint8)


def test_nearest_distances_match_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
    d, idx = nearest_distances(q, r, chunk=3)  # chunking must not change the answer
    full = np.linalg.norm(q[:, None, :] - r[None, :, :], axis=-1)
    np.testing.assert_allclose(d, full.min(1), rtol=1e-10)
    np.testing.assert_array_equal(idx, full.argmin(1))


def test_copies_are_flagged_and_new_images_are_not():
    train, val = _digits(50, 0), _digits(100, 1)
    copies = train[[3, 10, 42]]
    rep = memorization_report(copies, train, val, size=8, sample_labels=np.array([1, 2, 3]))
    assert rep["samples"]["median"] == 0.0
    assert rep["copy_fraction"] == 1.0 and rep["ratio_median"] == 0.0
    assert sorted(c["train_index"] for c in rep["closest_samples"]) == [3, 10, 42]
    assert rep["closest_samples"][0]["label"] in (1, 2, 3)
    fresh = _digits(100, 2)  # drawn like the val images: as far from train as val is
    rep = memorization_report(fresh, train, val, size=8)
    assert 0.9 < rep["ratio_median"] < 1.1 and rep["copy_fraction"] < 0.05


def test_memorization_inputs_are_checked():
    assert to_vectors(_digits(4, 0), size=8).shape == (4, 64)  # 16 px area-averaged to 8 px
    assert to_vectors(_digits(4, 0)[..., 0]).max() <= 1.0
    with pytest.raises(VitditError, match="samples"):
        memorization_report(np.zeros((0, 8, 8, 3), np.uint8), _digits(3, 0), _digits(3, 1))
    with pytest.raises(VitditError, match="differ in size"):
        memorization_report(_digits(2, 0, 8), _digits(3, 0, 16), _digits(3, 1, 16), size=None)


# --- the built-in recipe (no Ray) ------------------------------------------------------------------


@pytest.mark.parametrize("smoke", [False, True])
def test_builtin_recipe_is_a_valid_pipeline_recipe(tmp_path, smoke):
    raw = quickstart.build_recipe(str(tmp_path), f"sqlite:///{tmp_path}/mlflow.db", smoke_test=smoke)
    recipe = parse_recipe(raw, source="quickstart")
    assert list(recipe.stages) == [s.name for s in STAGES]  # every digits stage, in order
    for stage in ("vae", "vit", "dit"):  # one worker with both cores each (the 2-worker path: test_train_*)
        assert (
            recipe.stages[stage].get("num_workers", 1) == 1 and recipe.stages[stage]["cpus_per_worker"] == 2
        )
        assert recipe.stages[stage].get("precision", "auto") == "auto"  # measured by the probe
    if not smoke:
        assert recipe.stages["dit"]["model"] == "DiT-digits/2"
        assert recipe.stages["sample"]["num_samples"] >= 10 * 20  # 20 per class
        assert 0.99 <= recipe.stages["dit"]["ema_decay"] < 0.9999  # a short run needs a short EMA
    # The smoke test must not mutate the full recipe.
    assert quickstart.recipe_documents()[0]["stages"]["dit"]["steps"] >= 2000


@pytest.mark.parametrize("smoke", [False, True])
def test_print_recipe_round_trips_to_vitdit_pipeline(tmp_path, capsys, smoke):
    from jobs.quickstart import main

    assert main(["--print-recipe"] + (["--smoke-test"] if smoke else [])) == 0
    text = capsys.readouterr().out
    recipe = parse_recipe(yaml.safe_load(text), source="printed", base_dir=str(tmp_path))
    want = quickstart.build_recipe(str(tmp_path), None, smoke_test=smoke)
    assert recipe.stages == want["stages"] and recipe.name == want["name"]
    if not smoke:  # the packaged file as it is: its comments give the reasons for the settings
        assert recipe.workdir == str(tmp_path / "runs" / "quickstart")
        assert "# ViT-digits/8 (4 patches of 8 px)" in text and "---" not in text


def test_the_recipe_ships_as_package_data():
    """vitdit/recipes/quickstart.yaml is read through importlib.resources, so an installed wheel has it."""
    from importlib import resources

    path = resources.files("vitdit.recipes") / "quickstart.yaml"
    assert path.is_file()
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml")) as f:
        pyproject = f.read()
    assert 'vitdit = ["*.json", "**/*.json", "**/*.yaml"]' in pyproject  # what ships vitdit/recipes/*.yaml
    with pytest.raises(VitditError, match="no packaged recipe 'nope'"):
        from vitdit.recipes import recipe_text

        recipe_text("nope")


# --- the smoke run (Ray, MLflow, every stage) -----------------------------------------------------


def _runs(uri: str, experiment: str, since_ms: int = 0) -> list:
    """The experiment's runs started at or after ``since_ms`` (the session's server is shared)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} missing from {uri}"
    return [r for r in client.search_runs([exp.experiment_id]) if r.info.start_time >= since_ms]


@pytest.mark.ray
def test_quickstart_smoke_through_ray_job_api_then_rerun_skips(ray_head, mlflow_server, tmp_path):
    """The pipeline's integration test and the quickstart's smoke test in one run of the real parts.

    `python -m jobs.quickstart --smoke-test` (the built-in recipe at tiny sizes) is submitted
    through the Ray job API to a Ray head on loopback, logging to a real `mlflow server`; then the
    tracking server must hold the runs with their params, metrics, the sample grid and the
    evaluation metrics, and every artifact of the summary must exist. A second run, in-process,
    skips every finished stage (and so starts no Ray).
    """
    import io

    from pipelines.submit import submit

    t0 = int(time.time() * 1000)  # other tests log to the same server: count only this test's runs
    work = tmp_path / "qs"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log = io.StringIO()
    argv = ["--smoke-test", "--workdir", str(work), "--tracking-uri", mlflow_server]
    outcome = submit(ray_head.address, "quickstart", argv, working_dir=root, python=sys.executable, out=log)
    out = log.getvalue()
    assert outcome.status == "SUCCEEDED", out[-6000:]

    summary = json.loads((work / "summary.json").read_text())
    assert summary["tracking_uri"] == mlflow_server
    assert [s["status"] for s in summary["stages"]] == ["done"] * len(STAGES)
    a = summary["artifacts"]
    for key in ("latents_manifest", "samples_npz", "grid", "eval_report", "memorization_report", "summary"):
        assert os.path.isfile(a[key]), key
    assert os.path.isfile(os.path.join(a["vae"], "config.json"))
    for key in ("vit_checkpoint", "dit_checkpoint"):
        assert os.path.isfile(os.path.join(a[key], "model.safetensors")), key
    assert a["samples"] == str(work / "samples")
    pngs = sorted(os.listdir(a["sample_images"]))
    assert len(pngs) == 20 and pngs[0] == "000000_0.png"
    with np.load(a["samples_npz"]) as npz:
        assert npz["arr_0"].shape == (20, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
        assert list(npz["arr_1"][:10]) == list(range(10))
    m = summary["metrics"]
    for key in ("vit_val_accuracy", "dit_sample_accuracy", "fd", "kid", "precision", "recall", "floor_fd"):
        assert isinstance(m[key], float) and np.isfinite(m[key]), (key, m[key])
    assert 0.0 <= m["dit_sample_accuracy"] <= 1.0 and len(m["dit_sample_accuracy_per_class"]) == 10
    assert m["nn_distance_samples_median"] > 0 and m["nn_distance_val_median"] > 0
    assert summary["targets"] == {}  # no accuracy targets in a smoke run
    machine = summary["machine"]  # what the times were measured on, and how busy the host was
    shares = machine["cpu_time_shares"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["busy"] > 0.1  # the stages worked
    # Every training stage recorded the precision it trained at; "auto" ones with the probe's figures.
    assert set(machine["cpu_train_precision"]) == {"vae", "vit", "dit"}
    for stage, record in machine["precision_probe"].items():
        assert record["precision"] in ("fp32", "bf16"), stage
        if record["requested"] == "auto":
            assert {"fp32", "bf16"} <= set(record["figures"]), stage
            assert f"{stage} trained in {record['precision']}" in out
    assert "CPU time during the run: busy" in out
    assert min(machine["matmul_gflops"].values()) > 0 and "2048² matmul at the start" in out
    assert a["grid"] in out and "mlflow ui" in out  # the job's own output, streamed back
    # Quiet by default: one counter line per stage start and end, no relayed Ray worker lines.
    for k, stage in enumerate(STAGES, 1):
        assert f"[{k}/{len(STAGES)}] {stage.name:8s} vitdit " in out, stage.name
        assert f"[{k}/{len(STAGES)}] {stage.name:8s} done in " in out, stage.name
    assert "step 3/3 · loss " in out  # the trainers' progress, read from their train_log.jsonl
    assert "PlacementGroupCleaner" not in out and "(RayTrainWorker" not in out
    assert out.rstrip().endswith(f"MLflow UI:    {summary['mlflow_ui']}")  # the summary comes last

    # The tracking server holds every stage's run: params, metrics, the grid, the evaluation.
    client = mlflow.MlflowClient(mlflow_server)
    for exp in ("vitdit-vae", "vitdit-vit", "vitdit-dit", "vitdit-sample", "vitdit-eval"):
        assert _runs(mlflow_server, exp, t0), exp
    for exp in ("vitdit-vae", "vitdit-vit", "vitdit-dit"):
        (run,) = _runs(mlflow_server, exp, t0)
        assert run.data.params and any(k.startswith("train/") for k in run.data.metrics), exp
    (eval_run,) = _runs(mlflow_server, "vitdit-eval", t0)
    assert {"eval/accuracy", "eval/fd", "eval/kid"} <= set(eval_run.data.metrics)
    (dit_run,) = _runs(mlflow_server, "vitdit-dit", t0)
    grids = [f.path for f in _all_artifacts(client, dit_run.info.run_id) if f.path.endswith(".png")]
    assert grids, "no sample grid on the DiT run"
    qs_run = next(
        r
        for r in _runs(mlflow_server, quickstart.MLFLOW_EXPERIMENT, t0)
        if r.info.run_id == summary["mlflow_run_id"]
    )
    assert qs_run.info.run_id == summary["mlflow_run_id"]
    assert qs_run.data.metrics["quickstart/dit_sample_accuracy"] == pytest.approx(m["dit_sample_accuracy"])
    # The quickstart's run spans the whole run: created before the first stage's, ended after them.
    assert qs_run.info.status == "FINISHED" and qs_run.info.run_name == "quickstart-smoke · qs"
    assert qs_run.info.start_time < dit_run.info.start_time < qs_run.info.end_time
    assert qs_run.data.params["stages.dit.steps"] == "3"
    assert all(qs_run.data.tags[f"stage.{s.name}"] == "done" for s in STAGES)
    assert dit_run.info.run_name == "dit DiT-test/2 · 3 steps"
    exp = client.get_experiment_by_name(quickstart.MLFLOW_EXPERIMENT)
    assert "vitdit quickstart" in exp.tags["mlflow.note.content"]

    # A second run reuses every finished stage.
    from jobs.quickstart import main

    assert main(argv) == 0
    again = json.loads((work / "summary.json").read_text())
    assert [s["status"] for s in again["stages"]] == ["skipped"] * len(STAGES)
    assert again["seconds"] < summary["seconds"] / 2
    assert again["metrics"]["dit_sample_accuracy"] == m["dit_sample_accuracy"]
    assert len(_runs(mlflow_server, "vitdit-dit", t0)) == 1  # nothing retrained


def _all_artifacts(client, run_id: str, path: str | None = None) -> list:
    out = []
    for f in client.list_artifacts(run_id, path):
        out.extend(_all_artifacts(client, run_id, f.path) if f.is_dir else [f])
    return out


# --- the numbers quickstart: text-to-image, the same orchestration ---------------------------------


@pytest.mark.ray
@pytest.mark.slow  # 107 s: the digits smoke above is the default run's one end-to-end quickstart
def test_numbers_quickstart_smoke_reports_number_accuracy_and_the_held_out_grid(
    ray_session, mlflow_server, tmp_path, capsys
):
    """`vitdit quickstart --task numbers --smoke-test`: every stage of the numbers recipe for real at
    tiny sizes (the numbers set, a VAE, captioned latents, a ViT on the digits, an MM-DiT with its own
    text tower, sampling from every number's words, evaluation with --numbers), in this process on
    the suite's Ray session; the summary reports number accuracy on seen and held-out numbers, the
    held-out grid, FD and the copy check, and the quickstart's MLflow run holds them."""
    from jobs.quickstart import main
    from vitdit import numbers

    t0 = int(time.time() * 1000)
    work = tmp_path / "qsn"
    argv = ["--task", "numbers", "--smoke-test", "--workdir", str(work), "--tracking-uri", mlflow_server]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((work / "summary.json").read_text())
    assert summary["task"] == "numbers" and summary["recipe"] == "numbers-smoke"
    names = [s["name"] for s in summary["stages"]]
    assert names == ["data", "numbers", "vae", "encode", "vit", "mmdit", "sample", "evaluate"]
    assert all(s["status"] == "done" for s in summary["stages"])
    m, a = summary["metrics"], summary["artifacts"]
    # 90 samples, one per number 10..99 from its words: 80 seen, 10 held out.
    assert (m["samples_seen"], m["samples_held_out"]) == (80, len(numbers.HELD_OUT))
    for key in ("number_accuracy_seen", "number_accuracy_held_out", "digit_accuracy_tens_seen",
                "digit_accuracy_units_held_out", "fd", "copy_fraction", "vit_val_accuracy"):  # fmt: skip
        assert isinstance(m[key], float) and 0.0 <= m[key] <= max(1.0, m[key]), (key, m[key])
    assert os.path.isfile(os.path.join(a["mmdit_checkpoint"], "model.safetensors"))
    # The checkpoint carries its tokenizer: it samples from words with nothing beside it.
    config = json.loads(open(os.path.join(a["mmdit_checkpoint"], "config.json")).read())
    assert config["text"]["kind"] == "own" and "forty" in config["text"]["tokenizer"]
    with Image.open(a["held_out_grid"]) as grid:  # one labelled row per held-out number
        assert grid.height >= len(numbers.HELD_OUT) * 16
    sampling = json.loads((work / "samples" / "sampling.json").read_text())
    assert sampling["prompts"][:2] == ["ten", "eleven"] and len(sampling["prompts"]) == 90
    assert "numbers drawn right, held out (10 samples)" in out and a["held_out_grid"] in out
    assert summary["targets"] == {}  # no targets in a smoke run
    (run,) = [
        r
        for r in _runs(mlflow_server, quickstart.MLFLOW_EXPERIMENT, t0)
        if r.info.run_id == summary["mlflow_run_id"]
    ]
    assert run.data.metrics["quickstart/number_accuracy_held_out"] == pytest.approx(
        m["number_accuracy_held_out"]
    )
    assert run.info.run_name == "numbers-smoke · qsn"
    arts = {f.path for f in _all_artifacts(mlflow.MlflowClient(mlflow_server), run.info.run_id)}
    assert "held_out_grid.png" in arts and "summary.json" in arts
    assert _runs(mlflow_server, "vitdit-mmdit", t0)  # the MM-DiT stage logged its own run
