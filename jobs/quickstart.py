"""``vitdit quickstart``: the whole system on one machine, on real data, in minutes (no GPU, no network).

    vitdit quickstart                          # ./quickstart: every stage, ~10 min on 2 CPU cores
    vitdit quickstart --workdir /tmp/qs        # elsewhere; a second run skips the finished stages
    vitdit quickstart --smoke-test             # the same stages at tiny sizes, a minute or two
    vitdit quickstart --print-recipe > my.yaml # the built-in recipe, to edit and run with `vitdit pipeline`

Runs the built-in recipe below through ``vitdit pipeline``'s orchestration on a local Ray cluster:

1. ``data``: scikit-learn's handwritten digits exported at 16 px (``WORKDIR/data/{train,val}``);
2. ``vae`` + ``encode``: a small AutoencoderKL (Ray Train), then the train split encoded to
   8×8×4 latents (Ray Data, ``WORKDIR/latents/manifest.json``);
3. ``vit``: a ViT classifier on the train images, validated on val (Ray Train, 1 worker × 2 threads);
4. ``dit``: a class-conditional DiT on the latents (Ray Train, 1 worker × 2 threads, compiled);
5. ``sample`` + ``evaluate``: 20 samples of every class (Ray Data actors, ``WORKDIR/samples``),
   scored by the ViT (accuracy per class, FD, KID, precision/recall) against the real val images
   and the VAE's reconstruction floor; then the memorisation check (``vitdit.memorization``);
6. one MLflow store (``WORKDIR/mlflow.db``), a summary table, ``WORKDIR/summary.json``.

Why these settings: see the comments in ``RECIPE`` (numbers from a plain-PyTorch feasibility run,
docs/facts.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from typing import Any

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main

# The built-in recipe (the format of `vitdit pipeline`, pipelines/recipe.py), embedded here because
# an installed copy has no configs/ directory. `workdir` and `tracking_uri` are filled in at run time.
RECIPE: dict[str, Any] = {
    "name": "quickstart",
    "description": "bundled sklearn digits at 16 px, small VAE, ViT-digits/4 classifier, DiT-digits/2",
    "resolution": 16,
    "stages": {
        "data": {},
        # The working VAE of docs/facts.md: (32, 64) blocks → 16 px to 8×8×4 latents; KL 1e-2 keeps the
        # posterior noisy enough for the DiT (1e-4 gave a near-deterministic latent and failed).
        # 300 steps: the validation L1 was flat from step 300 on (0.029 at 300, 0.032 at 600, measured);
        # one worker with both cores (a 1-thread worker took 3.7 min for 600 steps).
        "vae": {
            "steps": 300,
            "cpus_per_worker": 2.0,
            "global_batch_size": 64,
            "lr": 1e-3,
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "latent_channels": 4,
            "kl_weight": 1e-2,
        },
        "encode": {"storage_dtype": "float32"},
        # 1,437 training digits: 1,000 steps of 128 is ~89 epochs. 600 steps plateaued at 96.7% val
        # accuracy as the cosine schedule reached 0; 1,000 steps gave 98.6% in one run and 96.9% in
        # another (another data order): 1,200 for a margin over the 97% target.
        "vit": {
            "model": "ViT-digits/4",
            "steps": 1200,
            "global_batch_size": 128,
            "lr": 1e-3,
            "warmup_steps": 50,
            "lr_schedule": "cosine",
            # One worker with both cores: in bf16 on an AMD EPYC, 1,266 img/s against 1,130 for two
            # 1-thread DDP workers (fp32: 750 against 793); one Ray worker group and no all-reduce
            # (benchmarks/quickstart_levers.py). The 2-worker path is tested by the trainer's tests.
            "num_workers": 1,
            "cpus_per_worker": 2.0,
            "precision": "auto",
            # Validation every 100 steps (~9 epochs) rather than every epoch (the ViT job's default):
            # the summary's accuracy is the evaluate stage's own pass over all val images.
            "eval_every": 100,
        },
        # Class conditioning is what takes the DiT long: it appears at a step count, not an image
        # count (measured in-process on these latents, EMA 0.998, DDIM 50, CFG 4, ViT-classified
        # samples): lr 1e-3 gave 22% at step 1,500 at batch 128 and at batch 256 alike, and 87%
        # after 3,000 steps of 128; lr 3e-3 gave 81-84% at 1,500, 96.5-98.5% at 2,000 and 99.5% at
        # 2,500 (two seeds), lr 2e-3 90.5% at 2,000. So: batch 128 (half the compute per step of
        # the earlier 256) at lr 3e-3 for 2,500 steps, which has a margin over the 90% target.
        # EMA 0.998 (time constant 500 steps): the release's 0.9999 averages over ~10k steps, i.e.
        # would still be mostly the random initialisation here.
        "dit": {
            "model": "DiT-digits/2",
            "steps": 2500,
            # torch.compile: 1,359 vs 760 img/s per thread for a bf16 step at micro-batch 128 (measured);
            # at this recipe's micro-batch 64 it gains less (790 vs 685 img/s in one in-process run)
            # and compiling takes 70-80 s on a cold cache, so it about breaks even here.
            "compile": True,
            "global_batch_size": 128,
            "lr": 3e-3,
            "warmup_steps": 100,
            "lr_schedule": "cosine",
            "ema_decay": 0.998,
            # One worker with both cores, compiled: 2,025 img/s in bf16 on the EPYC against 1,533 for
            # two 1-thread workers eager (benchmarks/quickstart_levers.py); batch 64 instead of 128
            # ran no faster end to end (smaller matmuls) and is not taken.
            "num_workers": 1,
            "cpus_per_worker": 2.0,
            "precision": "auto",
            "eval_every": 500,
            "checkpoint_every": 1000,
        },
        # 20 per class, DDIM 50 steps; CFG 1 gave 75-86% recognised, 2-4 gave >= 98.5% (docs/facts.md).
        "sample": {
            "num_samples": 200,
            "cfg_scale": 4.0,
            "sampler": "ddim",
            "sampling_steps": 50,
            "batch_size": 50,
            "num_actors": 2,
        },
        "evaluate": {},
    },
}

# --smoke-test: the same stages and artifacts at tiny sizes (tests/test_quickstart.py runs it).
SMOKE_OVERRIDES: dict[str, dict[str, Any]] = {
    "vae": {"steps": 3, "global_batch_size": 32, "block_out_channels": [8, 16], "norm_num_groups": 4},
    "encode": {"batch_size": 128},
    "vit": {"model": "ViT-test/4", "steps": 3, "global_batch_size": 32, "warmup_steps": 0},
    "dit": {
        "model": "DiT-test/2",
        "compile": False,  # compiling costs a minute; the smoke run checks the plumbing
        "steps": 3,
        "global_batch_size": 32,
        "warmup_steps": 0,
        "eval_every": 3,
        "checkpoint_every": 3,
        "grid_samples": 10,
        "grid_steps": 2,
    },
    "sample": {"num_samples": 20, "sampling_steps": 4, "batch_size": 10, "num_actors": 1},
    "evaluate": {"max_reference": 100, "kid_subsets": 10},
}

# Targets of the full run, checked and printed at the end.
TARGETS = {"vit_val_accuracy": 0.97, "dit_sample_accuracy": 0.90}
MLFLOW_EXPERIMENT = "vitdit-quickstart"
# Experiments the stages log to (their default names): created up front with their artifacts
# under the workdir, so nothing lands in the current directory's ./mlruns.
STAGE_EXPERIMENTS = (
    "vitdit-vae",
    "vitdit-vit",
    "vitdit-dit",
    "vitdit-sample",
    "vitdit-eval",
    MLFLOW_EXPERIMENT,
)


@dataclasses.dataclass
class QuickstartConfig:
    workdir: str = dataclasses.field(
        default="./quickstart",
        metadata={"help": "every stage writes under it; a re-run skips finished stages"},
    )
    smoke_test: bool = dataclasses.field(
        default=False,
        metadata={"help": "the same stages at tiny sizes (a minute or two; no accuracy targets)"},
    )
    tracking_uri: str | None = dataclasses.field(
        default=None, metadata={"help": "MLflow store (default: sqlite:///WORKDIR/mlflow.db, absolute)"}
    )
    redo: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "comma-separated stages to run even when their output is complete"}
    )
    dry_run: bool = dataclasses.field(
        default=False, metadata={"help": "print each stage's command and state, exit"}
    )
    print_recipe: bool = dataclasses.field(
        default=False, metadata={"help": "print the built-in recipe as YAML (for `vitdit pipeline`) and exit"}
    )


def build_recipe(workdir: str, tracking_uri: str, smoke_test: bool = False) -> dict[str, Any]:
    """The built-in recipe as a `vitdit pipeline` dict for ``workdir`` (absolute)."""
    raw = copy.deepcopy(RECIPE)
    if smoke_test:
        raw["name"] = "quickstart-smoke"
        for stage, args in SMOKE_OVERRIDES.items():
            raw["stages"][stage].update(args)
    raw["workdir"] = workdir
    raw["tracking_uri"] = tracking_uri
    return raw


@contextlib.contextmanager
def _tracking_env(uri: str) -> Iterator[None]:
    """Every stage job reads MLFLOW_TRACKING_URI; restore the caller's value afterwards."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def ensure_experiments(tracking_uri: str, artifact_root: str) -> None:
    """Create the stages' experiments with artifacts under ``artifact_root`` (a local store's default is ./mlruns)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for name in STAGE_EXPERIMENTS:
        if client.get_experiment_by_name(name) is None:
            client.create_experiment(name, artifact_location=os.path.join(artifact_root, name))


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _last_metric(log_path: str, key: str) -> float | None:
    """The last value of ``key`` in a trainer's train_log.jsonl."""
    value = None
    try:
        with open(log_path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    row = json.loads(line)
                    if key in row:
                        value = float(row[key])
    except OSError:
        return None
    return value


def memorization(recipe, out_path: str) -> dict[str, Any]:
    """Nearest-training-image distances of the samples and of the real val images → ``out_path``."""
    from pipelines.evaluate import read_reference
    from vitdit import samples as layout
    from vitdit.memorization import memorization_report

    images, labels = layout.read_samples(recipe.path("samples"))
    train, _, _ = read_reference(recipe.path("data", "train"), images.shape[1])
    val, _, _ = read_reference(recipe.path("data", "val"), images.shape[1])
    # Compared at 8 px: the digits' native size (the 16 px images are bicubic upscales of it).
    report = memorization_report(images, train, val, size=8, sample_labels=labels)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    return report


def collect(
    recipe,
    results,
    seconds: float,
    smoke_test: bool,
    tracking_uri: str,
    cpu_shares: dict[str, float] | None = None,
    matmul_gflops: dict[str, float] | None = None,
) -> dict[str, Any]:
    """summary.json: metrics measured by the stages, every artifact's path, the stage table, the machine.

    ``cpu_shares``: this machine's CPU time during the run (``vitdit.mfu.cpu_time_shares``);
    ``matmul_gflops``: its matmul speed at the start (``cpu_matmul_gflops``).
    """
    from pipelines.recipe import _checkpoint
    from vitdit.mfu import cpu_model_name, has_cpu_bf16_matrix_units

    p = recipe.path
    probes = {
        stage: record
        for stage in ("vae", "vit", "dit")
        if (record := _read_json(p(stage, "precision.json"))) is not None
    }
    vit_ckpt, dit_ckpt = _checkpoint(recipe, "vit"), _checkpoint(recipe, "dit")
    report = _read_json(p("eval", "report.json")) or {}
    ev = report.get("metrics", {})
    mem = _read_json(p("eval", "memorization.json")) or {}
    metrics: dict[str, Any] = {
        # The classifier's accuracy on all val images (the evaluate stage's own pass over them),
        # and the last validation the trainer logged (it may use the EMA weights when enabled).
        "vit_val_accuracy": ev.get("eval/reference/accuracy"),
        "vit_val_accuracy_trainer": _last_metric(p("vit", "train_log.jsonl"), "val/accuracy"),
        "dit_final_loss": _last_metric(p("dit", "train_log.jsonl"), "train/loss"),
        "dit_sample_accuracy": ev.get("eval/accuracy"),
        "dit_sample_accuracy_per_class": {
            k.removeprefix("eval/accuracy/"): v for k, v in ev.items() if k.startswith("eval/accuracy/")
        },
        **{
            name: ev.get(f"eval/{key}")
            for name, key in [("fd", "fd"), ("kid", "kid"), ("precision", "precision"), ("recall", "recall")]
        },
        **{
            f"floor_{name}": ev.get(f"eval/floor/{key}")
            for name, key in [
                ("fd", "fd"),
                ("kid", "kid"),
                ("precision", "precision"),
                ("recall", "recall"),
                ("accuracy", "accuracy"),
            ]
        },  # fmt: skip
        "nn_distance_samples_median": (mem.get("samples") or {}).get("median"),
        "nn_distance_val_median": (mem.get("val") or {}).get("median"),
        "nn_distance_ratio": mem.get("ratio_median"),
        "copy_fraction": mem.get("copy_fraction"),
    }
    db = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else None
    artifacts = {
        "workdir": recipe.workdir,
        "data": p("data"),
        "vae": p("vae", "vae"),
        "latents_manifest": p("latents", "manifest.json"),
        "vit_checkpoint": vit_ckpt,
        "dit_checkpoint": dit_ckpt,
        "samples": p("samples"),
        "sample_images": p("samples", "images"),
        "samples_npz": p("samples", "samples.npz"),
        "grid": p("samples", "grid.png"),
        "eval_report": p("eval", "report.json"),
        "memorization_report": p("eval", "memorization.json"),
        "mlflow_db": db,
        "summary": p("summary.json"),
    }
    targets = {}
    if not smoke_test:
        for key, want in TARGETS.items():
            got = metrics.get(key)
            targets[key] = {"target": want, "value": got, "met": got is not None and got >= want}
    return {
        "recipe": recipe.name,
        "smoke_test": smoke_test,
        "seconds": round(seconds, 1),
        "stages": [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 1)} for r in results],
        "metrics": metrics,
        "targets": targets,
        "artifacts": artifacts,
        "tracking_uri": tracking_uri,
        "mlflow_ui": f"mlflow ui --backend-store-uri {tracking_uri}",
        "machine": {
            "cpu_model": cpu_model_name(),
            "cpus": os.cpu_count(),
            "amx_bf16": has_cpu_bf16_matrix_units(),
            # What each training stage trained at, and (for --precision auto) the probe's figures.
            "cpu_train_precision": {k: v.get("precision") for k, v in probes.items()},
            "precision_probe": probes,
            # Shares of this machine's CPU time during the run: "steal" is time a hypervisor gave to
            # other guests, which slows every stage (the README's times are from idle machines).
            "cpu_time_shares": cpu_shares,
            "matmul_gflops": matmul_gflops,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }


def log_summary(summary: dict[str, Any], summary_path: str) -> str | None:
    """One run in experiment vitdit-quickstart: the scalar metrics, summary.json, grid, memorisation report."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(MLFLOW_EXPERIMENT)
    run = client.create_run(exp_id, run_name=summary["recipe"])
    now = int(time.time() * 1000)
    scalars = {k: float(v) for k, v in summary["metrics"].items() if isinstance(v, int | float)}
    scalars.update({f"seconds/{s['name']}": s["seconds"] for s in summary["stages"]})
    scalars["seconds/total"] = summary["seconds"]
    machine = summary.get("machine") or {}
    scalars.update({f"cpu_share/{k}": v for k, v in (machine.get("cpu_time_shares") or {}).items()})
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(f"quickstart/{k}", v, now, 0) for k, v in scalars.items()],
        params=[
            Param("smoke_test", str(summary["smoke_test"])),
            Param("workdir", summary["artifacts"]["workdir"]),
            Param("cpu_model", str(machine.get("cpu_model"))[:500]),
        ],
    )
    for key in ("grid", "memorization_report", "eval_report"):
        path = summary["artifacts"][key]
        if os.path.exists(path):
            client.log_artifact(run.info.run_id, path)
    client.log_artifact(run.info.run_id, summary_path)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def cpu_matmul_gflops(seconds: float = 0.5) -> dict[str, float] | None:
    """GFLOP/s of a 2048×2048 matmul in fp32 and in bf16, on every core, measured once.

    Taken at the start of a run, before any stage, so a slow host shows next to the stage times: the
    same kind of 2-core VM measured 217 GFLOP/s (fp32, 4096²) one day and 154 on another, when the
    quickstart took 17.9 and 22.6 min.
    """
    try:
        import torch

        from vitdit.mfu import measure_matmul_tflops
    except ImportError:
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return {
            p: round(1000.0 * measure_matmul_tflops(p, size=2048, seconds=seconds), 1)
            for p in ("fp32", "bf16")
        }
    finally:
        torch.set_num_threads(threads)


# Above this share of CPU time taken by the hypervisor, the summary warns that stage times are slow.
STEAL_WARNING = 0.05


def machine_lines(machine: dict[str, Any]) -> list[str]:
    """The summary's machine line, and a warning when a hypervisor took much of the CPU during the run."""
    cpu = machine.get("cpu_model") or "unknown CPU"
    amx = "AMX-BF16" if machine.get("amx_bf16") else "no AMX-BF16"
    lines = [f"  machine: {cpu}, {machine.get('cpus')} CPUs ({amx})"]
    matmul = machine.get("matmul_gflops")
    if matmul:
        lines.append(
            "  2048² matmul at the start: " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in matmul.items())
        )
    for stage, record in (machine.get("precision_probe") or {}).items():
        line = f"  {stage} trained in {record.get('precision')}"
        figures = record.get("figures") or {}
        steps = [f"{p} {f['step_ms']:.0f} ms" for p, f in figures.items() if f.get("step_ms")]
        if record.get("requested") == "auto" and steps:
            line += f" (probe: a step in {', '.join(steps)}{'; cached' if record.get('cached') else ''})"
        elif record.get("requested") not in (None, "auto"):
            line += " (set in the recipe)"
        lines.append(line)
    shares = machine.get("cpu_time_shares")
    if shares:
        lines.append(
            "  CPU time during the run: "
            + ", ".join(f"{k} {100 * shares[k]:.0f}%" for k in ("busy", "idle", "steal"))
        )
        if shares["steal"] >= STEAL_WARNING:
            lines.append(
                f"  note: the hypervisor gave {100 * shares['steal']:.0f}% of this machine's CPU time to "
                "other guests (steal): stage times are slower than on an idle machine"
            )
    return lines


def print_summary(summary: dict[str, Any]) -> None:
    m, a = summary["metrics"], summary["artifacts"]
    print(f"\nvitdit quickstart ({summary['recipe']}) in {summary['seconds']:.0f} s, workdir {a['workdir']}")
    print("  stage      status    seconds")
    for s in summary["stages"]:
        print(f"  {s['name']:10s} {s['status']:9s} {s['seconds']:7.1f}")
    rows = [
        ("ViT val accuracy", m["vit_val_accuracy"]),
        ("DiT samples classified as their class", m["dit_sample_accuracy"]),
        ("FD (ViT features) samples / VAE floor", f"{_fmt(m['fd'])} / {_fmt(m['floor_fd'])}"),
        ("KID samples / VAE floor", f"{_fmt(m['kid'])} / {_fmt(m['floor_kid'])}"),
        ("precision / recall", f"{_fmt(m['precision'])} / {_fmt(m['recall'])}"),
        (
            "nearest-train distance, samples / real val (median)",
            f"{_fmt(m['nn_distance_samples_median'])} / {_fmt(m['nn_distance_val_median'])}",
        ),
        ("samples closer to a train image than any val image", m["copy_fraction"]),
    ]
    print("\n  metric" + " " * 47 + "value")
    for name, v in rows:
        print(f"  {name:52s} {_fmt(v)}")
    per_class = m.get("dit_sample_accuracy_per_class") or {}
    if per_class:
        print("  per class: " + " ".join(f"{k}:{_fmt(v)}" for k, v in sorted(per_class.items())))
    for key, t in summary["targets"].items():
        print(f"  target {key} >= {t['target']}: {'met' if t['met'] else 'MISSED'} ({_fmt(t['value'])})")
    for line in machine_lines(summary.get("machine") or {}):
        print(line)
    print(f"\nsample grid:  {a['grid']}")
    print(f"summary:      {a['summary']}")
    print(f"MLflow UI:    {summary['mlflow_ui']}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "vitdit quickstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(parser, QuickstartConfig)
    cfg = dataclass_from_args(QuickstartConfig, parser.parse_args(argv))

    def body() -> int:
        from pipelines.recipe import local_runner, parse_recipe, plan, run_pipeline
        from pipelines.tracking import resolve_tracking_uri

        workdir = os.path.abspath(os.path.expanduser(cfg.workdir))
        uri = resolve_tracking_uri(cfg.tracking_uri or os.path.join(workdir, "mlflow.db"))
        raw = build_recipe(workdir, uri, cfg.smoke_test)
        if cfg.print_recipe:
            import yaml

            raw["workdir"], raw["tracking_uri"] = "runs/quickstart", None
            print(yaml.safe_dump(raw, sort_keys=False), end="")
            return 0
        recipe = parse_recipe(raw, source="vitdit quickstart (built-in recipe)")
        from jobs.pipeline import check_stage_flags

        check_stage_flags(recipe)
        if cfg.dry_run:
            for stage, stage_argv, complete in plan(recipe, strict=False):
                state = "complete, skip" if complete else "to run"
                print(f"{stage.name:9s} [{state}] vitdit-job {stage.module} {' '.join(stage_argv)}")
            return 0

        from vitdit.mfu import cpu_time_shares, cpu_times

        t0, cpu_before = time.perf_counter(), cpu_times()
        matmul_gflops = cpu_matmul_gflops()
        os.makedirs(workdir, exist_ok=True)
        with _tracking_env(uri):
            if uri.startswith("sqlite:"):  # a tracking server keeps its own artifact root
                ensure_experiments(uri, os.path.join(workdir, "mlartifacts"))
            from ray.data import DataContext

            # Ray Data's bars, relayed from every training worker, bury the stage logs.
            DataContext.get_current().enable_progress_bars = False
            # No ray.init here: each Ray stage joins or starts the local cluster itself (the first
            # starts it, the others reuse it), so a re-run whose stages are all done starts no Ray.
            results = run_pipeline(recipe, local_runner, redo=cfg.redo)
            failed = [r for r in results if r.status == "failed"]
            if failed:
                for r in results:
                    print(f"  {r.name:9s} {r.status}")
                print(
                    f"stage {failed[0].name} failed (exit {failed[0].exit_code}); re-run the same command "
                    "to resume from it",
                    file=sys.stderr,
                )
                return failed[0].exit_code or 1
            memorization(recipe, recipe.path("eval", "memorization.json"))
            seconds, shares = time.perf_counter() - t0, cpu_time_shares(cpu_before, cpu_times())
            summary = collect(
                recipe, results, seconds, cfg.smoke_test, uri, cpu_shares=shares, matmul_gflops=matmul_gflops
            )
            summary_path = recipe.path("summary.json")
            with open(summary_path, "w") as f:
                json.dump(summary, f, indent=2)
            try:
                summary["mlflow_run_id"] = log_summary(summary, summary_path)
            except Exception as e:  # noqa: BLE001 - the summary is on disk; tracking is best effort
                print(f"warning: logging the summary to MLflow failed: {e}", file=sys.stderr)
                summary["mlflow_run_id"] = None
            with open(summary_path, "w") as f:  # again, now with the quickstart run's id
                json.dump(summary, f, indent=2)
        print_summary(summary)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
