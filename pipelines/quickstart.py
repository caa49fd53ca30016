"""The quickstart's own code: its packaged recipe, its MLflow run, the summary and the memorisation check.

``jobs/quickstart.py`` parses the command line and calls ``run_quickstart``; the recipe is the
packaged ``vitdit/recipes/quickstart.yaml`` (its comments give the reason for each setting), run by
``pipelines.recipe.run_pipeline``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

from pipelines.progress import ConsoleReporter
from pipelines.recipe import (
    JobMain,
    check_redo,
    in_process_runner,
    parse_recipe,
    plan,
    run_pipeline,
    stage_command,
)
from pipelines.tracking import PipelineRun
from vitdit.errors import VitditError

log = logging.getLogger(__name__)

RECIPE_NAME = "quickstart"  # vitdit/recipes/quickstart.yaml
# Targets of the full run, checked and printed at the end.
TARGETS = {"vit_val_accuracy": 0.97, "dit_sample_accuracy": 0.90}
MLFLOW_EXPERIMENT = "vitdit-quickstart"


@dataclasses.dataclass(frozen=True)
class QuickstartTask:
    """One ``--task``: its packaged recipe, the targets its summary checks, what its summary reports."""

    name: str
    recipe: str  # vitdit/recipes/<recipe>.yaml
    targets: Mapping[str, float]
    text_to_image: bool = False  # an MM-DiT drawing numbers from their names (the numbers task)


TASKS = {
    # Class-conditional DiT on the bundled digits.
    "digits": QuickstartTask("digits", RECIPE_NAME, TARGETS),
    # Text-to-image: two-digit numbers from their English names (vitdit.numbers). The held-out
    # target is the "composition shows" line; the seen one is the quality bar.
    "numbers": QuickstartTask(
        "numbers",
        "numbers",
        {"vit_val_accuracy": 0.97, "number_accuracy_seen": 0.90, "number_accuracy_held_out": 0.50},
        text_to_image=True,
    ),
}


def get_task(name: str) -> QuickstartTask:
    try:
        return TASKS[name]
    except KeyError:
        raise VitditError(f"--task {name!r}: unknown (known: {', '.join(TASKS)})") from None


# Experiments the stages log to (their default names): created up front with their artifacts
# under the workdir, so nothing lands in the current directory's ./mlruns.
STAGE_EXPERIMENTS = (
    "vitdit-vae",
    "vitdit-vit",
    "vitdit-dit",
    "vitdit-mmdit",
    "vitdit-sample",
    "vitdit-eval",
    MLFLOW_EXPERIMENT,
)


# --- the recipe ----------------------------------------------------------------------------------


def recipe_documents(task: str = "digits") -> tuple[dict[str, Any], dict[str, Any]]:
    """(the task's packaged recipe, its --smoke-test overrides): the YAML file's two documents."""
    import yaml

    from vitdit.recipes import recipe_text

    recipe, smoke = yaml.safe_load_all(recipe_text(get_task(task).recipe))
    return recipe, smoke


def build_recipe(
    workdir: str, tracking_uri: str | None, smoke_test: bool = False, task: str = "digits"
) -> dict[str, Any]:
    """The task's packaged recipe as a `vitdit pipeline` dict for ``workdir`` (absolute)."""
    raw, smoke = copy.deepcopy(recipe_documents(task))
    if smoke_test:
        raw["name"] = smoke.get("name", raw["name"])
        for stage, args in smoke["stages"].items():
            raw["stages"][stage].update(args)
    raw["workdir"] = workdir
    raw["tracking_uri"] = tracking_uri
    return raw


def recipe_yaml(smoke_test: bool = False, task: str = "digits") -> str:
    """``--print-recipe``: the packaged file's recipe with its comments (smoke sizes: without)."""
    if not smoke_test:
        from vitdit.recipes import recipe_text

        return recipe_text(get_task(task).recipe).split("\n---\n")[0].rstrip("\n") + "\n"
    import yaml

    raw = build_recipe(f"runs/{get_task(task).recipe}-smoke", None, smoke_test=True, task=task)
    return yaml.safe_dump(raw, sort_keys=False)


@contextlib.contextmanager
def tracking_env(uri: str) -> Iterator[None]:
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


def ensure_experiments(tracking_uri: str, artifact_root: str | None) -> None:
    """Create the stages' experiments, described, with artifacts under ``artifact_root``.

    A local store's default artifact root is ./mlruns of whatever directory a stage runs in;
    ``artifact_root`` None leaves it to the server (a tracking server keeps its own).
    """
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import get_or_create_experiment

    client = MlflowClient(tracking_uri)
    for name in STAGE_EXPERIMENTS:
        location = os.path.join(artifact_root, name) if artifact_root else None
        get_or_create_experiment(client, name, artifact_location=location)


# --- the summary -----------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any] | None:
    """A stage's JSON output for the summary; an unreadable one is reported as missing, not fatal."""
    from pipelines.storage import read_json

    try:
        return read_json(path)
    except VitditError:
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


def memorization(recipe, out_path: str, task: str = "digits") -> dict[str, Any]:
    """Nearest-training-image distances of the samples and of the real val images → ``out_path``."""
    from pipelines.evaluate import read_reference
    from vitdit import samples as layout
    from vitdit.memorization import memorization_report

    images, labels = layout.read_samples(recipe.path("samples"))
    if get_task(task).text_to_image:
        # Against the training composites, at 16 px: each glyph is a native 8×8 digit there. Labels
        # index prompts, not the composites' classes: not passed.
        root, size, sample_labels = recipe.path("numbers"), 16, None
    else:
        # Compared at 8 px: the digits' native size (the 16 px images are bicubic upscales of it).
        root, size, sample_labels = recipe.path("data"), 8, labels
    train, _, _ = read_reference(os.path.join(root, "train"), images.shape[1])
    val, _, _ = read_reference(os.path.join(root, "val"), images.shape[1])
    report = memorization_report(images, train, val, size=size, sample_labels=sample_labels)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    return report


def held_out_grid(recipe, out_path: str) -> str | None:
    """A labelled grid of the samples of the held-out numbers (one row per prompt) → ``out_path``."""
    from vitdit import numbers
    from vitdit import samples as layout

    images, labels = layout.read_samples(recipe.path("samples"))
    prompts = layout.read_config(recipe.path("samples")).get("prompts") or []
    recorded = _read_json(recipe.path("numbers", numbers.MANIFEST)) or {}
    held = set(recorded.get("held_out", numbers.HELD_OUT))
    keep = [i for i, y in enumerate(labels) if numbers.number_from_words(prompts[int(y)]) in held]
    if not keep:
        return None
    grid = layout.labeled_grid(images[keep], [prompts[int(labels[i])] for i in keep])
    grid.save(out_path)
    return out_path


def collect(
    recipe,
    results,
    seconds: float,
    smoke_test: bool,
    tracking_uri: str,
    cpu_shares: dict[str, float] | None = None,
    matmul_gflops: dict[str, float] | None = None,
    task: str = "digits",
) -> dict[str, Any]:
    """summary.json: metrics measured by the stages, every artifact's path, the stage table, the machine.

    ``cpu_shares``: this machine's CPU time during the run (``vitdit.mfu.cpu_time_shares``);
    ``matmul_gflops``: its matmul speed at the start (``cpu_matmul_gflops``).
    """
    from pipelines.recipe import _checkpoint
    from vitdit.mfu import cpu_model_name, has_cpu_bf16_matrix_units

    p = recipe.path
    spec = get_task(task)
    gen = "mmdit" if spec.text_to_image else "dit"  # the generative stage
    probes = {
        stage: record
        for stage in ("vae", "vit", gen)
        if (record := _read_json(p(stage, "precision.json"))) is not None
    }
    vit_ckpt, gen_ckpt = _checkpoint(recipe, "vit"), _checkpoint(recipe, gen)
    report = _read_json(p("eval", "report.json")) or {}
    ev = report.get("metrics", {})
    mem = _read_json(p("eval", "memorization.json")) or {}
    vit_trainer = _last_metric(p("vit", "train_log.jsonl"), "val/accuracy")
    if spec.text_to_image:
        # The reference is the numbers' val composites, which a digits classifier has no labels
        # for: the ViT's accuracy is the trainer's last validation on the digits' val split.
        num = {k.removeprefix("eval/numbers/"): v for k, v in ev.items() if k.startswith("eval/numbers/")}
        task_metrics: dict[str, Any] = {
            "vit_val_accuracy": vit_trainer,
            "mmdit_final_loss": _last_metric(p("mmdit", "train_log.jsonl"), "train/loss"),
            "number_accuracy": num.get("number"),
            "number_accuracy_seen": num.get("number_seen"),
            "number_accuracy_held_out": num.get("number_held_out"),
            # Per digit: the tens glyph and the units glyph read right, each group apart.
            **{
                f"digit_accuracy_{pos}_{grp}": num.get(f"{pos}_{grp}")
                for grp in ("seen", "held_out")
                for pos in ("tens", "units")
            },
            "samples_seen": None if num.get("count_seen") is None else int(num["count_seen"]),
            "samples_held_out": None if num.get("count_held_out") is None else int(num["count_held_out"]),
        }
    else:
        task_metrics = {
            # The classifier's accuracy on all val images (the evaluate stage's own pass over
            # them), and the last validation the trainer logged (it may use the EMA weights).
            "vit_val_accuracy": ev.get("eval/reference/accuracy"),
            "vit_val_accuracy_trainer": vit_trainer,
            "dit_final_loss": _last_metric(p("dit", "train_log.jsonl"), "train/loss"),
            "dit_sample_accuracy": ev.get("eval/accuracy"),
            "dit_sample_accuracy_per_class": {
                k.removeprefix("eval/accuracy/"): v for k, v in ev.items() if k.startswith("eval/accuracy/")
            },
        }
    metrics: dict[str, Any] = {
        **task_metrics,
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
        f"{gen}_checkpoint": gen_ckpt,
        "samples": p("samples"),
        "sample_images": p("samples", "images"),
        "samples_npz": p("samples", "samples.npz"),
        "grid": p("samples", "grid.png"),
        **(
            {"numbers": p("numbers"), "held_out_grid": p("samples", "held_out_grid.png")}
            if spec.text_to_image
            else {}
        ),
        "eval_report": p("eval", "report.json"),
        "memorization_report": p("eval", "memorization.json"),
        "mlflow_db": db,
        "summary": p("summary.json"),
    }
    targets = {}
    if not smoke_test:
        for key, want in spec.targets.items():
            got = metrics.get(key)
            targets[key] = {"target": want, "value": got, "met": got is not None and got >= want}
    return {
        "recipe": recipe.name,
        "task": task,
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
    if summary.get("task") == "numbers":
        rows = [
            ("ViT val accuracy (digits)", m["vit_val_accuracy"]),
            (f"numbers drawn right, seen ({_fmt(m['samples_seen'])} samples)", m["number_accuracy_seen"]),
            (
                f"numbers drawn right, held out ({_fmt(m['samples_held_out'])} samples)",
                m["number_accuracy_held_out"],
            ),
            (
                "tens / units digit right, seen",
                f"{_fmt(m['digit_accuracy_tens_seen'])} / {_fmt(m['digit_accuracy_units_seen'])}",
            ),
            (
                "tens / units digit right, held out",
                f"{_fmt(m['digit_accuracy_tens_held_out'])} / {_fmt(m['digit_accuracy_units_held_out'])}",
            ),
        ]
    else:
        rows = [
            ("ViT val accuracy", m["vit_val_accuracy"]),
            ("DiT samples classified as their class", m["dit_sample_accuracy"]),
        ]
    rows += [
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
    if summary.get("task") == "numbers":
        print("  (FD/KID/precision/recall: digits-ViT features of whole composites, samples against the")
        print("   real val composites; nearest-train distances against the training composites)")
    per_class = m.get("dit_sample_accuracy_per_class") or {}
    if per_class:
        print("  per class: " + " ".join(f"{k}:{_fmt(v)}" for k, v in sorted(per_class.items())))
    for key, t in summary["targets"].items():
        print(f"  target {key} >= {t['target']}: {'met' if t['met'] else 'MISSED'} ({_fmt(t['value'])})")
    for line in machine_lines(summary.get("machine") or {}):
        print(line)
    print(f"\nsample grid:  {a['grid']}")
    if a.get("held_out_grid"):
        print(f"held out:     {a['held_out_grid']}")
    print(f"summary:      {a['summary']}")
    print(f"MLflow UI:    {summary['mlflow_ui']}")


# --- the run ---------------------------------------------------------------------------------------


def run_quickstart(
    workdir: str,
    jobs: str | Mapping[str, JobMain] = "jobs",
    *,
    verbose: bool = False,
    tracking_uri: str | None = None,
    smoke_test: bool = False,
    redo: tuple[str, ...] = (),
    check_flags=None,
    dry_run: bool = False,
    task: str = "digits",
) -> int:
    """Run the packaged recipe in ``workdir``; print the stages as they go and the summary last.

    ``jobs``: where the stages' jobs are (``pipelines.recipe.in_process_runner``); ``verbose``: their
    printed output on the terminal rather than in ``WORKDIR/logs/<stage>.log``;
    ``check_flags(recipe)`` checks every stage key is a flag of its job before anything runs.
    Returns the exit code: 0, or the first failed stage's.
    """
    from pipelines.tracking import resolve_tracking_uri

    workdir = os.path.abspath(os.path.expanduser(workdir))
    uri = resolve_tracking_uri(tracking_uri or os.path.join(workdir, "mlflow.db"))
    spec = get_task(task)
    raw = build_recipe(workdir, uri, smoke_test, task)
    recipe = parse_recipe(raw, source=f"vitdit quickstart (vitdit/recipes/{spec.recipe}.yaml)")
    if check_flags is not None:
        check_flags(recipe)
    check_redo(recipe, redo)
    if dry_run:
        for stage, argv, complete in plan(recipe, strict=False):
            state = "complete, skip" if complete else "to run"
            print(f"{stage.name:9s} [{state}] {stage_command(stage, argv)}")
        return 0

    from vitdit.mfu import cpu_time_shares, cpu_times

    t0, cpu_before = time.perf_counter(), cpu_times()
    print(f"vitdit quickstart: {recipe.name} in {workdir} (MLflow: {uri})", flush=True)
    matmul_gflops = cpu_matmul_gflops()
    os.makedirs(workdir, exist_ok=True)
    with tracking_env(uri):
        # A tracking server keeps its own artifact root; a SQLite store's artifacts go under workdir.
        ensure_experiments(uri, os.path.join(workdir, "mlartifacts") if uri.startswith("sqlite:") else None)
        run = PipelineRun(uri)
        run.start(
            raw,
            run_name=f"{recipe.name} · {os.path.basename(workdir)}",
            tags={"vitdit.workdir": workdir, "smoke_test": str(smoke_test)},
        )
        status = "FAILED"
        try:
            # No ray.init here: each Ray stage joins or starts the local cluster itself (the first
            # starts it, the others reuse it), so a re-run whose stages are all done starts no Ray.
            runner = in_process_runner(jobs, log_dir=None if verbose else recipe.path("logs"))
            results = run_pipeline(recipe, runner, redo=redo, reporters=[ConsoleReporter(), run])
            failed = [r for r in results if r.status == "failed"]
            if failed:
                print(
                    f"stage {failed[0].name} failed (exit {failed[0].exit_code}); re-run the same command "
                    "to resume from it",
                    file=sys.stderr,
                )
                return failed[0].exit_code or 1
            memorization(recipe, recipe.path("eval", "memorization.json"), task)
            if spec.text_to_image:
                held_out_grid(recipe, recipe.path("samples", "held_out_grid.png"))
            seconds, shares = time.perf_counter() - t0, cpu_time_shares(cpu_before, cpu_times())
            summary = collect(
                recipe,
                results,
                seconds,
                smoke_test,
                uri,
                cpu_shares=shares,
                matmul_gflops=matmul_gflops,
                task=task,
            )
            summary["mlflow_run_id"] = run.run_id
            summary_path = recipe.path("summary.json")
            with open(summary_path, "w") as f:
                json.dump(summary, f, indent=2)
            run.log_summary(summary, summary_path)
            status = "FINISHED"
        finally:
            run.end(status)
    print_summary(summary)
    return 0
