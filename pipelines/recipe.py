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
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

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
        return "/".join([self.workdir.rstrip("/"), *parts])


def _is_uri(s: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", s))


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
    if not _is_uri(workdir):
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
                if need not in inputs and PRODUCER[need] not in stages:
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


def _exists(path: str) -> bool:
    """A file exists, local or behind a pyarrow filesystem URI (s3://, gs://)."""
    if not _is_uri(path):
        return os.path.exists(path)
    import pyarrow.fs as pafs

    try:
        fs, p = pafs.FileSystem.from_uri(path)
        return fs.get_file_info(p).type != pafs.FileType.NotFound
    except (OSError, ValueError) as e:  # unreachable storage, missing credentials
        raise VitditError(f"{path}: cannot check whether it exists ({e})") from e


def _checkpoint(r: Recipe, stage: str) -> str:
    return r.path(stage, f"checkpoint_{int(r.stages[stage]['steps']):08d}")


def _images(r: Recipe) -> str:
    return r.inputs.get("images") or r.path("data")


def _vae(r: Recipe) -> str:
    return r.inputs.get("vae") or r.path("vae", "vae")


def _latents(r: Recipe) -> str:
    return r.inputs.get("latents") or r.path("latents")


def _dit_checkpoint(r: Recipe) -> str:
    return r.inputs.get("checkpoint") or _checkpoint(r, "dit")


def _classifier(r: Recipe) -> str:
    return r.inputs.get("classifier") or _checkpoint(r, "vit")


def _has(r: Recipe, need: str) -> bool:
    return need in r.inputs or PRODUCER[need] in r.stages


def _marker(r: Recipe, stage: str) -> str:
    return r.path(MARKER_DIR, f"{stage}.json")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of the stage table: which job runs, how its wiring flags come from the recipe, when it is done."""

    name: str
    module: str  # jobs.<module>
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
        lambda r: {"output": r.path("data"), "resolution": r.resolution},
        lambda r: _exists(_marker(r, "data")),
        marker=True,
    ),
    Stage(
        "vae",
        "train_vae",
        lambda r: {"images": _images(r), "output": r.path("vae"), "resolution": r.resolution},
        lambda r: _exists(r.path("vae", "vae", "config.json")),
        needs=("images",),
        required_args=("steps",),
    ),
    Stage(
        "encode",
        "encode_latents",
        lambda r: {
            "input": _images(r) + "/train",
            "output": r.path("latents"),
            "vae": _vae(r),
            "resolution": r.resolution,
        },
        lambda r: _exists(r.path("latents", "manifest.json")),
        needs=("images", "vae"),
    ),
    Stage(
        "vit",
        "train_vit",
        lambda r: {"images": _images(r), "output": r.path("vit"), "resolution": r.resolution},
        lambda r: _exists(_checkpoint(r, "vit") + "/model.safetensors"),
        needs=("images",),
        required_args=("steps",),
    ),
    Stage(
        "dit",
        "train_dit",
        # --vae only decodes the sample grids logged during training: passed when there is one.
        lambda r: {
            "latents": _latents(r),
            "output": r.path("dit"),
            "vae": _vae(r) if _has(r, "vae") else None,
        },
        lambda r: _exists(_checkpoint(r, "dit") + "/model.safetensors"),
        needs=("latents",),
        required_args=("steps",),
    ),
    Stage(
        "sample",
        "sample",
        lambda r: {"checkpoint": _dit_checkpoint(r), "vae": _vae(r), "output": r.path("samples")},
        lambda r: _exists(r.path("samples", "samples.npz")),
        needs=("checkpoint", "vae"),
    ),
    Stage(
        "evaluate",
        "evaluate",
        lambda r: {
            "samples": r.path("samples"),
            "reference": _images(r) + "/val",
            "classifier": _classifier(r),
            "report": r.path("eval", "report.json"),
        },
        lambda r: _exists(r.path("eval", "report.json")),
        needs=("images", "classifier"),
    ),
)
# Which stage produces each input when the recipe does not give it.
PRODUCER = {"images": "data", "vae": "vae", "latents": "encode", "checkpoint": "dit", "classifier": "vit"}
# A stand-in recipe to read the wiring flag names (every stage that needs `steps` has it).
_WIRING_PROBE = Recipe("probe", "/probe", 8, {"vae": {}, "vit": {"steps": 1}, "dit": {"steps": 1}}, {}, None)


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


# --- running -----------------------------------------------------------------------------------

# runner(stage, argv) -> exit code. Local: call jobs.<module>.main in-process; cluster: submit it.
Runner = Callable[[Stage, list[str]], int]


def local_runner(stage: Stage, argv: list[str]) -> int:
    """Run a stage's job in this process (it joins the Ray session the pipeline started)."""
    import importlib

    mod = importlib.import_module(f"jobs.{stage.module}")
    try:
        return int(mod.main(argv, prog=f"vitdit pipeline: {stage.name}") or 0)
    except SystemExit as e:  # argparse exits on a bad flag in the recipe
        return int(e.code) if isinstance(e.code, int) else 2


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


def run_pipeline(
    recipe: Recipe, runner: Runner = local_runner, redo: tuple[str, ...] = ()
) -> list[StageResult]:
    """Run the recipe's stages in order, skipping complete ones; stops at the first failure.

    ``redo`` names stages to run even when complete (their jobs decide whether that resumes or
    overwrites). Returns one result per stage; the first failed stage is the place a re-run resumes.
    """
    bad = sorted(set(redo) - set(recipe.stages))
    if bad:
        raise VitditError(
            f"--redo {','.join(bad)}: not a stage of {recipe.source} ({', '.join(recipe.stages)})"
        )
    results: list[StageResult] = []
    failed = False
    for stage, argv, complete in plan(recipe):
        if failed:
            results.append(StageResult(stage.name, "not run"))
            continue
        if complete and stage.name not in redo:
            log.info("stage %s: output complete, skipped", stage.name)
            results.append(StageResult(stage.name, "skipped"))
            continue
        log.info("stage %s: vitdit %s %s", stage.name, stage.module, " ".join(argv))
        t0 = time.perf_counter()
        code = runner(stage, argv)
        seconds = time.perf_counter() - t0
        if code == 0 and not stage.marker and not stage.complete(recipe):
            # The job said it succeeded but its output is not where the pipeline looks: a wiring bug.
            log.error("stage %s: exited 0 but its output is not complete", stage.name)
            code = 1
        if code != 0:
            failed = True
            results.append(StageResult(stage.name, "failed", seconds, code))
            continue
        if stage.marker:
            _write_marker(recipe, stage, argv)
        results.append(StageResult(stage.name, "done", seconds))
    return results


def _write_marker(recipe: Recipe, stage: Stage, argv: list[str]) -> None:
    body = json.dumps({"stage": stage.name, "module": stage.module, "argv": argv, "finished_at": time.time()})
    path = _marker(recipe, stage.name)
    if _is_uri(path):
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_output_stream(p) as f:
            f.write(body.encode())
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(body)
    os.replace(tmp, path)  # atomic: a marker is either absent or whole
