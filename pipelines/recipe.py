"""Pipeline recipes: one YAML file that runs data → VAE → encode → ViT → DiT → sample → evaluate.

A recipe (see ``configs/digits.yaml``)::

    name: digits                    # names the run; [A-Za-z0-9_.-]
    workdir: runs/digits            # every stage writes under it: local path or URI (s3://, gs://)
    resolution: 16                  # image side shared by the stages
    tracking_uri: null              # MLflow; default $MLFLOW_TRACKING_URI, else ./mlflow.db
    inputs:                         # what exists already, instead of a stage producing it
      images: s3://bucket/imagenet  # an image root with train/ and val/ (replaces stage `data`)
      vae: stabilityai/sd-vae-ft-ema   # a diffusers VAE (replaces stage `vae`)
    stages:                         # run in the fixed order of STAGES; leave one out to skip it
      vae: {steps: 600}
      dit: {model: DiT-digits/2, steps: 3000}
      ...

A stage's arguments are the job's own flags (``steps`` → ``--steps``); the flags that wire stages
together (inputs and outputs) are set here and may not be given. A stage whose output is complete
(``STAGES[i].complete``) is skipped; anything else re-runs the stage with the same arguments, and
every stage job resumes its partial output (encode skips finished parts, training restarts from its
last checkpoint), so a failed pipeline re-runs from where it stopped.

Credentials never go into a recipe: keys or values that look like one are refused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from pipelines import storage
from vitdit.errors import VitditError

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("name", "workdir", "resolution", "tracking_uri", "inputs", "stages", "description")
INPUT_KEYS = ("images", "vae", "latents", "checkpoint", "classifier")
MARKER_DIR = "_pipeline"  # under workdir: one JSON per finished stage that has no natural marker


# --- the recipe --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe; ``workdir`` is absolute (or a URI)."""

    name: str
    workdir: str
    resolution: int
    stages: dict[str, dict[str, Any]]  # stage name → the job's own flags
    inputs: dict[str, str]
    tracking_uri: str | None = None
    source: str = "<recipe>"

    def path(self, *parts: str) -> str:
        """A path under workdir (URIs joined with '/')."""
        return storage.join(self.workdir, *parts)


def check_no_credentials(obj: Any, where: str) -> None:
    """Refuse keys named like credentials and values that are credentials, anywhere in ``obj``."""
    from pipelines.submit import is_secret_name, looks_like_secret_value

    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if is_secret_name(str(k)):
                raise VitditError(
                    f"{where}.{k}: looks like a credential; credentials come from the environment "
                    "(or the cluster's instance role), never from a recipe"
                )
            check_no_credentials(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_no_credentials(v, f"{where}[{i}]")
    elif isinstance(obj, str) and looks_like_secret_value(obj):
        raise VitditError(
            f"{where}: the value looks like a credential (an access key or a user:password URI); "
            "credentials come from the environment, never from a recipe"
        )


def parse_recipe(raw: Any, source: str = "<recipe>", base_dir: str | None = None) -> Recipe:
    """Validate a recipe dict; every error names the bad field. Relative local workdirs resolve against ``base_dir`` (default: cwd)."""
    if not isinstance(raw, Mapping):
        raise VitditError(f"{source}: a recipe is a YAML mapping, got {type(raw).__name__}")
    check_no_credentials(raw, source)
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise VitditError(
            f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(TOP_LEVEL_KEYS)})"
        )

    def field(key: str, typ: type | tuple, required: bool = True, default: Any = None) -> Any:
        if key not in raw or raw[key] is None:
            if required:
                raise VitditError(f"{source}: {key}: required")
            return default
        val = raw[key]
        if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
            want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise VitditError(f"{source}: {key}: expected {want}, got {val!r}")
        return val

    name = field("name", str)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise VitditError(f"{source}: name: {name!r} may only hold letters, digits, '_', '.', '-'")
    workdir = field("workdir", str)
    if not storage.is_uri(workdir):
        workdir = os.path.abspath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(workdir)))
    resolution = field("resolution", int)
    if resolution < 8:
        raise VitditError(f"{source}: resolution: {resolution} is too small (8 or more)")
    tracking_uri = field("tracking_uri", str, required=False)
    inputs = field("inputs", dict, required=False, default={})
    for k, v in inputs.items():
        if k not in INPUT_KEYS:
            raise VitditError(f"{source}: inputs.{k}: unknown input (known: {', '.join(INPUT_KEYS)})")
        if not isinstance(v, str) or not v:
            raise VitditError(f"{source}: inputs.{k}: expected a path or URI, got {v!r}")
    stages_raw = field("stages", dict)
    stages: dict[str, dict[str, Any]] = {}
    by_name = {s.name: s for s in STAGES}
    for sname, args in stages_raw.items():
        if sname not in by_name:
            raise VitditError(f"{source}: stages.{sname}: unknown stage (stages: {', '.join(by_name)})")
        args = {} if args is None else args
        if not isinstance(args, Mapping):
            raise VitditError(
                f"{source}: stages.{sname}: expected a mapping of the job's flags, got {args!r}"
            )
        for k, v in args.items():
            flag = str(k).replace("_", "-")
            if flag in by_name[sname].wired:
                raise VitditError(
                    f"{source}: stages.{sname}.{k}: set by the pipeline (it wires the stages together under workdir)"
                )
            if flag in ("address", "tracking-uri"):
                raise VitditError(f"{source}: stages.{sname}.{k}: set for the whole pipeline, not per stage")
            if not isinstance(v, str | int | float | bool | list | type(None)):
                raise VitditError(f"{source}: stages.{sname}.{k}: expected a scalar or a list, got {v!r}")
        for k in by_name[sname].required_args:
            if k not in args:
                raise VitditError(
                    f"{source}: stages.{sname}.{k}: required (the pipeline finds the final checkpoint by it)"
                )
            if not isinstance(args[k], int) or isinstance(args[k], bool) or args[k] <= 0:
                raise VitditError(
                    f"{source}: stages.{sname}.{k}: expected a positive integer, got {args[k]!r}"
                )
        stages[sname] = dict(args)
    recipe = Recipe(name, workdir, resolution, stages, dict(inputs), tracking_uri, source)
    for s in STAGES:  # every stage needs its inputs: from an earlier stage or from `inputs`
        if s.name in stages:
            for need in s.needs:
                if need not in inputs and not any(p in stages for p in PRODUCERS[need]):
                    raise VitditError(
                        f"{source}: stages.{s.name}: needs {need!r}: add stage {PRODUCER[need]!r} or inputs.{need}"
                    )
    return recipe


def load_recipe(path: str) -> Recipe:
    """Read and validate a recipe YAML file."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise VitditError(f"recipe {path}: cannot read ({e})") from e
    except yaml.YAMLError as e:
        raise VitditError(f"recipe {path}: not valid YAML ({e})") from e
    return parse_recipe(raw, source=path)


# --- the stages --------------------------------------------------------------------------------


def _checkpoint(r: Recipe, stage: str) -> str:
    return r.path(stage, f"checkpoint_{int(r.stages[stage]['steps']):08d}")


def _images(r: Recipe) -> str:
    """The images the generative stages learn from: given, or the numbers set, or the digits."""
    return r.inputs.get("images") or (r.path("numbers") if "numbers" in r.stages else r.path("data"))


def _classifier_images(r: Recipe) -> str:
    """The classifier's images: with a numbers set, the digits it reads glyph by glyph."""
    return r.path("data") if "numbers" in r.stages and "data" in r.stages else _images(r)


def _vae(r: Recipe) -> str:
    return r.inputs.get("vae") or r.path("vae", "vae")


def _latents(r: Recipe) -> str:
    return r.inputs.get("latents") or r.path("latents")


def _dit_checkpoint(r: Recipe) -> str:
    return r.inputs.get("checkpoint") or _checkpoint(r, "mmdit" if "mmdit" in r.stages else "dit")


def _classifier(r: Recipe) -> str:
    return r.inputs.get("classifier") or _checkpoint(r, "vit")


def _has(r: Recipe, need: str) -> bool:
    return need in r.inputs or any(p in r.stages for p in PRODUCERS[need])


def _marker(r: Recipe, stage: str) -> str:
    return r.path(MARKER_DIR, f"{stage}.json")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of the stage table: which job runs, how its wiring flags come from the recipe, when it is done."""

    name: str
    module: str  # jobs.<module>
    command: str  # the `vitdit` sub-command that runs it (its words, e.g. "train vae")
    wiring: Callable[[Recipe], dict[str, Any]]  # flags that connect it to the other stages
    complete: Callable[[Recipe], bool]  # its output is complete: skip it
    needs: tuple[str, ...] = ()  # inputs (keys of INPUT_KEYS) it reads
    required_args: tuple[str, ...] = ()  # recipe args it must be given
    marker: bool = False  # completion is recorded by the pipeline (the job writes no marker itself)

    @property
    def wired(self) -> tuple[str, ...]:
        return tuple(k.replace("_", "-") for k in self.wiring(_WIRING_PROBE))


STAGES: tuple[Stage, ...] = (
    Stage(
        "data",
        "data_digits",
        "data digits",
        lambda r: {"output": r.path("data"), "resolution": r.resolution},
        lambda r: storage.exists(_marker(r, "data")),
        marker=True,
    ),
    Stage(
        "numbers",
        "data_numbers",
        "data numbers",
        lambda r: {"output": r.path("numbers"), "resolution": r.resolution},
        lambda r: storage.exists(_marker(r, "numbers")),
        marker=True,
    ),
    Stage(
        "vae",
        "train_vae",
        "train vae",
        lambda r: {"images": _images(r), "output": r.path("vae"), "resolution": r.resolution},
        lambda r: storage.exists(r.path("vae", "vae", "config.json")),
        needs=("images",),
        required_args=("steps",),
    ),
    Stage(
        "encode",
        "encode_latents",
        "encode",
        lambda r: {
            "input": _images(r) + "/train",
            "output": r.path("latents"),
            "vae": _vae(r),
            "resolution": r.resolution,
        },
        lambda r: storage.exists(r.path("latents", "manifest.json")),
        needs=("images", "vae"),
    ),
    Stage(
        "vit",
        "train_vit",
        "train vit",
        lambda r: {"images": _classifier_images(r), "output": r.path("vit"), "resolution": r.resolution},
        lambda r: storage.exists(_checkpoint(r, "vit") + "/model.safetensors"),
        needs=("images",),
        required_args=("steps",),
    ),
    Stage(
        "dit",
        "train_dit",
        "train dit",
        # --vae only decodes the sample grids logged during training: passed when there is one.
        lambda r: {
            "latents": _latents(r),
            "output": r.path("dit"),
            "vae": _vae(r) if _has(r, "vae") else None,
        },
        lambda r: storage.exists(_checkpoint(r, "dit") + "/model.safetensors"),
        needs=("latents",),
        required_args=("steps",),
    ),
    Stage(
        "mmdit",
        "train_mmdit",
        "train mmdit",
        lambda r: {
            "latents": _latents(r),
            "output": r.path("mmdit"),
            "vae": _vae(r) if _has(r, "vae") else None,
        },
        lambda r: storage.exists(_checkpoint(r, "mmdit") + "/model.safetensors"),
        needs=("latents",),
        required_args=("steps",),
    ),
    Stage(
        "sample",
        "sample",
        "sample",
        lambda r: {
            "checkpoint": _dit_checkpoint(r),
            "vae": _vae(r),
            "output": r.path("samples"),
            # A text-to-image model of the numbers set samples every number from its words.
            "prompts_file": r.path("numbers", "prompts.txt")
            if {"numbers", "mmdit"} <= set(r.stages)
            else None,
        },
        lambda r: storage.exists(r.path("samples", "samples.npz")),
        needs=("checkpoint", "vae"),
    ),
    Stage(
        "evaluate",
        "evaluate",
        "evaluate",
        lambda r: {
            "samples": r.path("samples"),
            "reference": _images(r) + "/val",
            "classifier": _classifier(r),
            "report": r.path("eval", "report.json"),
            "numbers": True if "numbers" in r.stages and "mmdit" in r.stages else None,
        },
        lambda r: storage.exists(r.path("eval", "report.json")),
        needs=("images", "classifier"),
    ),
)
# Which stage produces each input when the recipe does not give it.
PRODUCER = {"images": "data", "vae": "vae", "latents": "encode", "checkpoint": "dit", "classifier": "vit"}
# Every stage that can produce each input (the first is the one an error message suggests).
PRODUCERS = {
    **{k: (v,) for k, v in PRODUCER.items()},
    "images": ("data", "numbers"),
    "checkpoint": ("dit", "mmdit"),
}
# A stand-in recipe to read the wiring flag names (every stage that needs `steps` has it).
_WIRING_PROBE = Recipe(
    "probe",
    "/probe",
    8,
    {"numbers": {}, "vae": {}, "vit": {"steps": 1}, "dit": {"steps": 1}, "mmdit": {"steps": 1}},
    {},
    None,
)


def to_flags(args: Mapping[str, Any]) -> list[str]:
    """``{"steps": 10, "use_gpu": False, "block_out_channels": [32, 64]}`` → job flags (None omits a flag)."""
    out: list[str] = []
    for k, v in args.items():
        flag = "--" + str(k).replace("_", "-")
        if v is None:
            continue
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, list | tuple):
            out += [flag, ",".join(str(x) for x in v)]
        else:
            out += [flag, str(v)]
    return out


def stage_argv(recipe: Recipe, stage: Stage) -> list[str]:
    """The full argv of a stage's job: the pipeline's wiring flags, then the recipe's flags for it."""
    return to_flags(stage.wiring(recipe)) + to_flags(recipe.stages.get(stage.name, {}))


def stage_command(stage: Stage, argv: list[str]) -> str:
    """The stage as a pasteable shell command: ``vitdit train vae --output /w/vae --steps 300 ...``."""
    return shlex.join(["vitdit", *stage.command.split(), *argv])


def train_log(recipe: Recipe, stage: Stage) -> tuple[str, int] | None:
    """(the trainer's train_log.jsonl, its total steps) for a training stage with a local output."""
    steps = recipe.stages.get(stage.name, {}).get("steps")
    if "steps" not in stage.required_args or steps is None or storage.is_uri(recipe.workdir):
        return None
    return recipe.path(stage.name, "train_log.jsonl"), int(steps)


def check_stage_keys(recipe: Recipe, flags_of: Callable[[Stage], set[str]]) -> None:
    """Every key of every stage is one of ``flags_of(stage)`` (its job's long flags), else a
    VitditError naming the key and the nearest flag: a typo fails before anything runs."""
    import difflib

    for stage in STAGES:
        keys = recipe.stages.get(stage.name)
        if not keys:
            continue
        flags = flags_of(stage)
        for key in keys:
            flag = "--" + str(key).replace("_", "-")
            if flag not in flags:
                near = difflib.get_close_matches(flag, sorted(flags), n=1)
                hint = f" (did you mean {near[0][2:].replace('-', '_')}?)" if near else ""
                raise VitditError(
                    f"{recipe.source}: stages.{stage.name}.{key}: not a flag of `vitdit {stage.command}`{hint}"
                )


# --- running -----------------------------------------------------------------------------------

# runner(stage, argv) -> exit code. Local: call the job's main in-process; cluster: submit it.
Runner = Callable[[Stage, list[str]], int]
# A job's entrypoint: main(argv, prog=...) -> exit code.
JobMain = Callable[..., "int | None"]


def in_process_runner(jobs: str | Mapping[str, JobMain], log_dir: str | None = None) -> Runner:
    """Run each stage's job in this process (it joins the Ray session the pipeline started).

    ``jobs``: the package holding the job modules (``"jobs"``: ``jobs.<module>.main``), imported by
    name when a stage runs, or a mapping {module: main}. The caller (``jobs/``) says which, so the
    runner imports nothing from ``jobs`` itself (imports go jobs → pipelines).

    ``log_dir``: a job's own printed output (its result lines, an evaluation's JSON) goes to
    ``<log_dir>/<stage>.log`` instead of the terminal, and its last lines are shown if it fails;
    stderr (warnings, errors, tracebacks) always reaches the terminal.
    """

    def main_of(stage: Stage) -> JobMain:
        if isinstance(jobs, Mapping):
            if stage.module not in jobs:
                raise VitditError(f"stage {stage.name}: no entrypoint for job {stage.module!r}")
            return jobs[stage.module]
        import importlib

        return importlib.import_module(f"{jobs}.{stage.module}").main

    def call(stage: Stage, argv: list[str]) -> int:
        main = main_of(stage)
        try:
            return int(main(argv, prog=f"vitdit {stage.command}") or 0)
        except SystemExit as e:  # argparse exits on a bad flag in the recipe
            return int(e.code) if isinstance(e.code, int) else 2
        except Exception:  # noqa: BLE001 - the stage failed: show why, and let the pipeline report it
            import traceback

            traceback.print_exc(file=sys.stderr)
            return 1

    def run(stage: Stage, argv: list[str]) -> int:
        if log_dir is None:
            return call(stage, argv)
        import contextlib

        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, f"{stage.name}.log")
        with open(path, "a") as f, contextlib.redirect_stdout(f):
            print(stage_command(stage, argv), flush=True)
            code = call(stage, argv)
        if code != 0:
            with open(path) as f:
                tail = f.readlines()[-20:]
            print(f"--- last lines of {path}:\n{''.join(tail).rstrip()}\n---", file=sys.stderr)
        return code

    return run


def cluster_runner(address: str, working_dir: str = ".", python: str | None = None) -> Runner:
    """Submit each stage as its own Ray job to ``address`` and wait for it."""
    from pipelines.submit import submit

    def run(stage: Stage, argv: list[str]) -> int:
        return submit(address, stage.module, argv, working_dir=working_dir, python=python).exit_code

    return run


@dataclasses.dataclass
class StageResult:
    name: str
    status: str  # "skipped" (complete), "done", "failed", "not run"
    seconds: float = 0.0
    exit_code: int = 0


def plan(recipe: Recipe, strict: bool = True) -> list[tuple[Stage, list[str], bool | None]]:
    """(stage, argv, complete) for every stage of the recipe, in order.

    With ``strict=False`` a stage whose output cannot be checked (unreachable storage) gets None.
    """
    out: list[tuple[Stage, list[str], bool | None]] = []
    for s in STAGES:
        if s.name not in recipe.stages:
            continue
        try:
            complete: bool | None = s.complete(recipe)
        except VitditError:
            if strict:
                raise
            complete = None
        out.append((s, stage_argv(recipe, s), complete))
    return out


class Reporter(Protocol):
    """What a pipeline run tells its caller as it goes (console lines, an MLflow run)."""

    def stage_started(
        self, index: int, total: int, name: str, command: str, train_log: tuple[str, int] | None
    ) -> None: ...

    def stage_finished(
        self, index: int, total: int, name: str, status: str, seconds: float, exit_code: int
    ) -> None: ...


def check_redo(recipe: Recipe, redo: Sequence[str]) -> None:
    """``--redo`` may name only stages of the recipe (checked before anything runs, dry run included)."""
    bad = sorted(set(redo) - set(recipe.stages))
    if bad:
        raise VitditError(
            f"--redo {','.join(bad)}: not a stage of {recipe.source} ({', '.join(recipe.stages)})"
        )


def run_pipeline(
    recipe: Recipe,
    runner: Runner,
    redo: tuple[str, ...] = (),
    reporters: Sequence[Reporter] = (),
) -> list[StageResult]:
    """Run the recipe's stages in order, skipping complete ones; stops at the first failure.

    ``redo`` names stages to run even when complete (their jobs decide whether that resumes or
    overwrites). Each of ``reporters`` hears of every stage as it starts and ends. Returns one
    result per stage; the first failed stage is the place a re-run resumes.
    """
    check_redo(recipe, redo)
    results: list[StageResult] = []
    failed = False
    steps = plan(recipe)

    def finish(k: int, result: StageResult) -> None:
        results.append(result)
        for r in reporters:
            r.stage_finished(k, len(steps), result.name, result.status, result.seconds, result.exit_code)

    for k, (stage, argv, complete) in enumerate(steps, 1):
        if failed:
            results.append(StageResult(stage.name, "not run"))
            continue
        if complete and stage.name not in redo:
            finish(k, StageResult(stage.name, "skipped"))
            continue
        for r in reporters:
            r.stage_started(k, len(steps), stage.name, stage_command(stage, argv), train_log(recipe, stage))
        t0 = time.perf_counter()
        code = runner(stage, argv)
        seconds = time.perf_counter() - t0
        if code == 0 and not stage.marker and not stage.complete(recipe):
            # The job said it succeeded but its output is not where the pipeline looks: a wiring bug.
            log.error("stage %s: exited 0 but its output is not complete", stage.name)
            code = 1
        if code != 0:
            failed = True
            finish(k, StageResult(stage.name, "failed", seconds, code))
            continue
        if stage.marker:
            _write_marker(recipe, stage, argv)
        finish(k, StageResult(stage.name, "done", seconds))
    return results


def _write_marker(recipe: Recipe, stage: Stage, argv: list[str]) -> None:
    # Atomic: a marker is either absent or whole.
    payload = {"stage": stage.name, "module": stage.module, "argv": argv, "finished_at": time.time()}
    storage.write_json(_marker(recipe, stage.name), payload, indent=None)


def run_recipe(
    recipe: Recipe, runner: Runner, redo: tuple[str, ...] = (), dry_run: bool = False, local: bool = True
) -> int:
    """``vitdit pipeline``'s body: print the plan (``dry_run``) or run it; returns the exit code.

    Every stage logs to one MLflow store: the recipe's, else $MLFLOW_TRACKING_URI, else ./mlflow.db
    (absolute; ``local`` runs only: a cluster's jobs need a store they can reach). The pipeline gets
    its own run there (experiment vitdit-pipeline), RUNNING from the first stage to the last.
    """
    from pipelines.progress import ConsoleReporter, format_seconds
    from pipelines.tracking import PipelineRun, resolve_tracking_uri

    check_redo(recipe, redo)
    if dry_run:
        for stage, argv, complete in plan(recipe, strict=False):
            state = {True: "complete, skip", False: "to run", None: "output unreachable"}[complete]
            print(f"{stage.name:9s} [{state}] {stage_command(stage, argv)}")
        return 0
    uri = recipe.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    reporters: list[Reporter] = [ConsoleReporter()]
    run = None
    if uri or local:
        os.environ["MLFLOW_TRACKING_URI"] = uri = resolve_tracking_uri(uri)
        run = PipelineRun(uri, "vitdit-pipeline")
        raw = {
            "name": recipe.name,
            "workdir": recipe.workdir,
            "inputs": recipe.inputs,
            "stages": recipe.stages,
        }
        run.start(raw, run_name=f"{recipe.name} · {os.path.basename(recipe.workdir.rstrip('/'))}")
        reporters.append(run)
    status = "FAILED"
    try:
        results = run_pipeline(recipe, runner, redo=redo, reporters=reporters)
        failed = [r for r in results if r.status == "failed"]
        status = "FAILED" if failed else "FINISHED"
    finally:
        if run is not None:
            run.end(status)
    print(f"\npipeline {recipe.name} ({recipe.workdir}):")
    for r in results:
        extra = f" in {format_seconds(r.seconds)}" if r.status in ("done", "failed") else ""
        code = f" (exit {r.exit_code})" if r.status == "failed" else ""
        print(f"  {r.name:9s} {r.status}{extra}{code}")
    if failed:
        print(f"stage {failed[0].name} failed; re-run the same command to resume from it", file=sys.stderr)
        return failed[0].exit_code or 1
    return 0
