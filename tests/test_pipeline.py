"""`vitdit pipeline`: recipe validation, stage wiring, ordering, skipping complete stages, resuming.

The orchestration tests drive ``run_pipeline`` with a runner (the seam that chooses in-process or
Ray-job execution): the ``data`` stage runs the real job; the other stages' runner writes exactly
the artifact that the real job writes last (manifest.json, the final checkpoint, samples.npz, the
report), so ordering, skipping and resuming are tested without minutes of training. The real
stages run end to end in ``test_recipe_through_ray_job_api_logs_to_mlflow``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os

import pytest
import yaml

from pipelines.recipe import (
    STAGES,
    in_process_runner,
    load_recipe,
    parse_recipe,
    plan,
    run_pipeline,
    stage_argv,
    stage_command,
)
from vitdit.errors import VitditError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_MODULES = sorted({s.module for s in STAGES})
local_runner = in_process_runner("jobs")


def _recipe_dict(workdir, **stages) -> dict:
    default = {
        "data": {},
        "vae": {"steps": 2},
        "encode": {},
        "vit": {"steps": 3},
        "dit": {"steps": 4},
        "sample": {"num_samples": 10},
        "evaluate": {},
    }
    return {"name": "t", "workdir": str(workdir), "resolution": 16, "stages": stages or default}


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r.pop("name"), r"name: required"),
        (lambda r: r.update(resolution="16"), r"resolution: expected int"),
        (lambda r: r.update(workdri="x"), r"unknown key\(s\) workdri"),
        (lambda r: r["stages"].update(trian_dit={}), r"stages\.trian_dit: unknown stage"),
        (
            lambda r: r["stages"]["encode"].update(output="/elsewhere"),
            r"stages\.encode\.output: set by the pipeline",
        ),
        (lambda r: r["stages"]["dit"].pop("steps"), r"stages\.dit\.steps: required"),
        (lambda r: r["stages"]["vit"].update(steps=0), r"stages\.vit\.steps: expected a positive integer"),
        (
            lambda r: r["stages"].pop("dit"),
            r"stages\.sample: needs 'checkpoint': add stage 'dit' or inputs\.checkpoint",
        ),
        (lambda r: r["stages"]["vae"].update(lr={"a": 1}), r"stages\.vae\.lr: expected a scalar or a list"),
        (lambda r: r.update(inputs={"vea": "x"}), r"inputs\.vea: unknown input"),
        (
            lambda r: r["stages"]["dit"].update(address="http://x"),
            r"stages\.dit\.address: set for the whole pipeline",
        ),
    ],
)
def test_bad_recipe_errors_name_the_field(tmp_path, edit, match):
    raw = _recipe_dict(tmp_path)
    edit(raw)
    with pytest.raises(VitditError, match=match):
        parse_recipe(raw, source="bad.yaml")


def test_bad_yaml_file_is_a_clear_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(VitditError, match=r"r\.yaml: not valid YAML"):
        load_recipe(str(p))
    from jobs.pipeline import main

    assert main([str(tmp_path / "missing.yaml")]) == 2


def test_shipped_recipes_are_valid():
    digits = load_recipe(os.path.join(ROOT, "configs/digits.yaml"))
    assert [s.name for s, _, _ in plan(digits)] == [
        "data",
        "vae",
        "encode",
        "vit",
        "dit",
        "sample",
        "evaluate",
    ]
    assert os.path.isabs(digits.workdir)
    imagenet = load_recipe(os.path.join(ROOT, "configs/imagenet-256.yaml"))
    assert imagenet.workdir.startswith("s3://") and imagenet.inputs["vae"] == "stabilityai/sd-vae-ft-ema"
    assert imagenet.stages["dit"]["model"] == "DiT-XL/2"
    for stage in STAGES:
        if stage.name in imagenet.stages:
            argv = stage_argv(imagenet, stage)
            paths = [
                argv[i + 1]
                for i, a in enumerate(argv[:-1])
                if a in ("--input", "--output", "--images", "--latents")
            ]
            assert all(p.startswith("s3://") for p in paths), (stage.name, paths)  # no head-local paths


def test_stages_are_wired_output_to_input(tmp_path):
    r = parse_recipe(_recipe_dict(tmp_path))
    argv = {s.name: stage_argv(r, s) for s, _, _ in plan(r)}

    def flag(stage, name):
        a = argv[stage]
        return a[a.index("--" + name) + 1]

    w = str(tmp_path)
    assert flag("data", "output") == f"{w}/data"
    assert flag("encode", "input") == f"{w}/data/train"
    assert flag("encode", "vae") == flag("sample", "vae") == f"{w}/vae/vae"
    assert flag("dit", "latents") == flag("encode", "output")
    assert flag("sample", "checkpoint") == f"{w}/dit/checkpoint_00000004"
    assert flag("evaluate", "classifier") == f"{w}/vit/checkpoint_00000003"
    assert flag("evaluate", "samples") == flag("sample", "output")
    assert flag("sample", "num-samples") == "10"


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_wired_flags_exist_in_the_stage_jobs(tmp_path, module, capsys):
    """Every flag the pipeline passes to a job is one that job's --help lists."""
    if importlib.util.find_spec(f"jobs.{module}") is None:
        pytest.skip(f"jobs/{module}.py does not exist yet")
    mod = importlib.import_module(f"jobs.{module}")
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    help_text = capsys.readouterr().out
    r = parse_recipe(_recipe_dict(tmp_path))
    for stage in STAGES:
        if stage.module == module:
            for name, value in stage.wiring(r).items():
                if value is not None:
                    assert f"--{name.replace('_', '-')}" in help_text, f"jobs.{module} has no --{name}"
            for name in r.stages.get(stage.name, {}):
                assert f"--{name.replace('_', '-')}" in help_text, f"jobs.{module} has no --{name}"


# --- orchestration ---------------------------------------------------------------------------------


class Runner:
    """Records the order of stages; runs the real `data` job; fails the stages named in ``fail``."""

    def __init__(self, recipe, fail=()):
        self.recipe, self.fail, self.calls = recipe, set(fail), []

    def __call__(self, stage, argv):
        self.calls.append(stage.name)
        if stage.name in self.fail:
            return 3
        if stage.name == "data":
            return local_runner(stage, argv)
        w = self.recipe.workdir
        final = {
            "vae": f"{w}/vae/vae/config.json",
            "encode": f"{w}/latents/manifest.json",
            "vit": f"{w}/vit/checkpoint_00000003/model.safetensors",
            "dit": f"{w}/dit/checkpoint_00000004/model.safetensors",
            "sample": f"{w}/samples/samples.npz",
            "evaluate": f"{w}/eval/report.json",
        }[stage.name]
        os.makedirs(os.path.dirname(final), exist_ok=True)
        open(final, "w").close()
        return 0


def test_runs_in_order_stops_at_a_failure_and_resumes_there(tmp_path):
    r = parse_recipe(_recipe_dict(tmp_path / "run"))
    first = Runner(r, fail={"encode"})
    results = run_pipeline(r, first)
    assert first.calls == ["data", "vae", "encode"]
    assert [x.status for x in results] == [
        "done",
        "done",
        "failed",
        "not run",
        "not run",
        "not run",
        "not run",
    ]
    assert results[2].exit_code == 3
    assert os.path.isdir(tmp_path / "run/data/train/7")  # the real data job ran
    # A partial encode output (parts but no manifest) is not "complete": the re-run redoes it.
    (tmp_path / "run/latents").mkdir(parents=True)
    (tmp_path / "run/latents/part-00000.parquet").write_bytes(b"partial")
    second = Runner(r)
    results = run_pipeline(r, second)
    assert second.calls == ["encode", "vit", "dit", "sample", "evaluate"]
    assert [x.status for x in results] == ["skipped", "skipped", "done", "done", "done", "done", "done"]
    third = Runner(r)
    assert all(x.status == "skipped" for x in run_pipeline(r, third)) and third.calls == []
    fourth = Runner(r)
    run_pipeline(r, fourth, redo=("sample",))
    assert fourth.calls == ["sample"]
    with pytest.raises(VitditError, match=r"--redo trian: not a stage"):
        run_pipeline(r, fourth, redo=("trian",))


def test_a_job_that_exits_0_without_its_output_fails_the_stage(tmp_path):
    r = parse_recipe(_recipe_dict(tmp_path, vae={"steps": 2}, data={}))
    results = run_pipeline(r, lambda stage, argv: 0)  # data writes nothing, but data has a marker
    assert [x.status for x in results] == ["done", "failed"]


def test_pipeline_cli_runs_the_data_stage_and_skips_it_next_time(tmp_path):
    from jobs.pipeline import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({"name": "d", "workdir": str(tmp_path / "w"), "resolution": 8, "stages": {"data": {}}})
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(recipe), "--address", "http://127.0.0.1:1", "--dry-run"]) == 0
    assert "[to run] vitdit data digits --output" in out.getvalue()
    assert main([str(recipe), "--address", "http://127.0.0.1:1"]) == 2  # unreachable job server: clear error
    r = load_recipe(str(recipe))
    assert [x.status for x in run_pipeline(r, local_runner)] == ["done"]
    marker = json.loads((tmp_path / "w/_pipeline/data.json").read_text())
    assert marker["module"] == "data_digits" and "--resolution" in marker["argv"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(recipe), "--dry-run"]) == 0
    assert "data      [complete, skip]" in out.getvalue()


# --- the pipeline integration test -----------------------------------------------------------------
# It lives in tests/test_quickstart.py (test_quickstart_smoke_through_ray_job_api_then_rerun_skips):
# the quickstart's built-in recipe at smoke sizes is submitted through the Ray job API to a Ray head
# on loopback with a real `mlflow server`, so one pipeline run serves both issues' tests.


def test_a_stage_key_that_is_no_flag_of_its_job_fails_before_anything_runs(tmp_path, capsys):
    """A typo in a stage's flags used to pass --dry-run and fail mid-pipeline, after hours of stages."""
    from jobs.pipeline import check_stage_flags, main

    raw = _recipe_dict(tmp_path / "w")
    raw["stages"]["dit"]["global_batch_sze"] = 64
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main([str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "stages.dit.global_batch_sze: not a flag of `vitdit train dit`" in err
    assert "did you mean global_batch_size?" in err
    assert not (tmp_path / "w").exists()  # nothing ran
    check_stage_flags(parse_recipe(_recipe_dict(tmp_path / "w")))  # the good recipe passes
    raw["stages"]["dit"].pop("global_batch_sze")
    raw["stages"]["vit"]["compile"] = False  # a boolean flag's --no- form exists too
    check_stage_flags(parse_recipe(raw))


# --- what a run prints and records -------------------------------------------------------------------


class _Parsed(Exception):
    """Raised instead of running a job: carries the namespace its parser produced."""


def test_logged_commands_are_real_cli_commands(tmp_path, monkeypatch):
    """Each stage's logged command, split by a shell, is a `vitdit` sub-command with the stage's flags."""
    import argparse
    import shlex

    from jobs import cli

    real_parse = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(real_parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    raw = _recipe_dict(tmp_path / "a dir; with 'quotes'")  # the shell must see one word per path
    raw["stages"]["vae"]["block_out_channels"] = [32, 64]
    raw["stages"]["dit"]["compile"] = False
    r = parse_recipe(raw)
    for stage, argv, _ in plan(r):
        words = shlex.split(stage_command(stage, argv))
        assert words[0] == "vitdit" and "jobs." not in " ".join(words) and "_" not in words[1]
        modules = [m for w, m, _ in cli.COMMANDS if words[1 : 1 + len(w.split())] == w.split()]
        assert modules == [f"jobs.{stage.module}"], (stage.name, words[:3])
        with pytest.raises(_Parsed) as parsed:
            cli.main(words[1:])
        ns = vars(parsed.value.args[0])
        for key, value in stage.wiring(r).items():
            if value is not None:
                assert str(ns[key]) == str(value), (stage.name, key)
    vae = next(s for s in STAGES if s.name == "vae")
    with pytest.raises(_Parsed) as parsed:
        cli.main(shlex.split(stage_command(vae, stage_argv(r, vae)))[1:])
    ns = vars(parsed.value.args[0])
    assert ns["steps"] == 2 and tuple(ns["block_out_channels"]) == (32, 64)
    assert ns["output"] == str(tmp_path / "a dir; with 'quotes'" / "vae")
    dit = next(s for s in STAGES if s.name == "dit")
    with pytest.raises(_Parsed) as parsed:
        cli.main(shlex.split(stage_command(dit, stage_argv(r, dit)))[1:])
    assert vars(parsed.value.args[0])["compile"] is False


def test_console_shows_a_counter_per_stage_times_and_failures(tmp_path):
    from pipelines.progress import ConsoleReporter

    r = parse_recipe(_recipe_dict(tmp_path / "run"))
    out, err = io.StringIO(), io.StringIO()
    run_pipeline(r, Runner(r, fail={"vit"}), reporters=[ConsoleReporter(out, err)])
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/7] data     vitdit data digits --output ")
    assert lines[1].startswith("[1/7] data     done in ")
    assert any(line.startswith("[3/7] encode   vitdit encode --input ") for line in lines)
    assert err.getvalue().startswith("[4/7] vit      FAILED (exit 3) after ")
    assert not any(line.startswith("[5/7]") for line in lines)  # nothing runs after a failure
    out = io.StringIO()
    run_pipeline(r, Runner(r), reporters=[ConsoleReporter(out, err)])
    assert out.getvalue().splitlines()[0] == "[1/7] data     output complete, skipped"


def test_step_progress_reads_the_trainer_log_and_gives_an_eta(tmp_path):
    from pipelines.progress import StepProgress, format_seconds

    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"step": 5, "train/loss": 9.0}) + "\n")  # an earlier run's rows
    out = io.StringIO()
    p = StepProgress(str(log), total=100, prefix="dit", out=out, every_s=0.0)
    with open(log, "a") as f:
        f.write(json.dumps({"step": 10, "train/loss": 0.5}) + "\n")
        f.write(json.dumps({"step": 10, "val/loss": 0.7}) + "\n")  # a validation row: no loss
    p.poll()
    p._first = (p._first[0] - 10.0, 10)  # as if step 10 was seen 10 s ago
    with open(log, "a") as f:
        f.write(json.dumps({"step": 30, "train/loss": 0.25}) + '\n{"step": 4')  # a row half written
    p.poll()
    lines = out.getvalue().splitlines()
    assert lines[0] == "      dit step 10/100 · loss 0.5000"
    assert lines[1].startswith("      dit step 30/100 · loss 0.2500 · 2.0 steps/s · ETA 35 s")
    assert format_seconds(3725) == "1 h 02 min" and format_seconds(61) == "1 min 01 s"


def test_pipeline_run_is_running_during_the_stages_then_failed(tmp_path):
    """`vitdit pipeline`'s MLflow run exists from the first stage on, logs each outcome, ends FAILED."""
    from mlflow.tracking import MlflowClient

    from pipelines.recipe import run_recipe
    from pipelines.tracking import EXPERIMENT_DESCRIPTIONS

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = _recipe_dict(tmp_path / "run")
    raw["tracking_uri"] = uri
    r = parse_recipe(raw)
    client = MlflowClient(uri)
    seen = {}

    def runner(stage, argv):
        (run,) = client.search_runs([client.get_experiment_by_name("vitdit-pipeline").experiment_id])
        seen[stage.name] = (run.info.status, dict(run.data.tags))
        return Runner(r, fail={"encode"})(stage, argv)

    assert run_recipe(r, runner) == 3
    assert seen["data"][0] == "RUNNING" and seen["encode"][0] == "RUNNING"
    assert seen["encode"][1]["stage.vae"] == "done" and seen["encode"][1]["stage.encode"] == "running"
    exp = client.get_experiment_by_name("vitdit-pipeline")
    assert exp.tags["mlflow.note.content"] == EXPERIMENT_DESCRIPTIONS["vitdit-pipeline"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED" and run.info.run_name == "t · run"
    assert run.data.tags["stage.encode"] == "failed" and "stage.vit" not in run.data.tags
    assert run.data.params["stages.dit.steps"] == "4" and run.data.params["name"] == "t"
    assert run.data.tags["command.vae"].startswith("vitdit train vae --images ")
    assert {"seconds/data", "seconds/vae", "seconds/encode"} <= set(run.data.metrics)


def test_training_runs_get_a_descriptive_name_and_described_experiment(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.train.mlflow_logger import RunHandle

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    handle = RunHandle(uri, "vitdit-dit")
    run_id = handle.start(run_name="dit")
    handle.log_params({"steps": 3000, "model.model_name": "DiT-digits/2", "lr": 0.003})
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.run_name == "dit DiT-digits/2 · 3000 steps"
    assert "DiT training" in client.get_experiment_by_name("vitdit-dit").tags["mlflow.note.content"]
    other = RunHandle(uri, "vitdit-vae")
    run_id = other.start(run_name="my-vae")
    other.log_params({"steps": 300, "model.model_name": "AutoencoderKL"})
    assert client.get_run(run_id).info.run_name == "vae AutoencoderKL · 300 steps · my-vae"
    reopened = RunHandle(uri, "vitdit-vae")
    reopened.start(run_name="ignored", resume_run_id=run_id)
    reopened.log_params({"steps": 600})
    assert client.get_run(run_id).info.run_name == "vae AutoencoderKL · 300 steps · my-vae"  # kept
