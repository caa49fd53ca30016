"""Batch sampling from a DiT checkpoint: a Ray Data actor pool of DiT + VAE decoder.

The job is a data set of *chunks* of sample indices (chunk c = indices [c·B, (c+1)·B)) mapped by
:class:`SampleGenerator` actors, each of which loads the DiT and the VAE once in ``__init__``.
Sample i gets label ``classes[i % len(classes)]`` and its initial and step noise from its own
generator seeded by ``(seed, i)``, and every chunk runs as one model batch of the same indices, so
sample i is identical whatever the number of actors (Ray may split or merge blocks of a plain
``range(N)``; a chunk is the unit of work instead, so the batch composition never changes).

The driver writes each chunk's PNGs as it arrives (atomically), so a killed job re-run with the
same flags samples only the missing chunks; it then assembles ``samples.npz`` and ``grid.png``
(``vitdit.samples``) and logs the grid and the sampling config to MLflow in a run of experiment
``vitdit-sample`` tagged with the training run's id (``vitdit.training_run_id``), or into an
existing run (``mlflow_run_id``, what scheduled evaluation uses).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import posixpath
import time
from typing import Any

import numpy as np
import torch

from pipelines import storage
from vitdit import samples as layout
from vitdit.dit_release import checkpoint_info, infer_release_config, load_dit  # noqa: F401 - re-exported
from vitdit.errors import VitditError

log = logging.getLogger(__name__)

SAMPLERS = ("auto", "ddpm", "ddim", "euler")  # auto: DDIM for a diffusion model, Euler for a flow model
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Settings that change what sample i is: a re-run into the same --output must keep them.
_DETERMINING = (
    "checkpoint",
    "vae",
    "classes",
    "cfg_scale",
    "sampler",
    "sampling_steps",
    "seed",
    "ema",
    "batch_size",
    "prompts",
    "shift",
)


@dataclasses.dataclass
class SampleConfig:
    checkpoint: str = dataclasses.field(
        metadata={"help": "checkpoint dir, run dir (latest checkpoint) or a facebookresearch/DiT .pt"}
    )
    output: str = dataclasses.field(metadata={"help": "samples directory (images/, samples.npz, grid.png)"})
    num_samples: int = dataclasses.field(default=100, metadata={"help": "total number of samples"})
    vae: str | None = dataclasses.field(default=None, metadata={"help": "VAE (default: the checkpoint's)"})
    classes: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "comma-separated class ids (default: all classes)"}
    )
    cfg_scale: float = dataclasses.field(default=1.0, metadata={"help": "classifier-free guidance scale"})
    guided_channels: int | None = dataclasses.field(
        default=None, metadata={"help": "guide only the first K latent channels (3 = DiT's quirk)"}
    )
    prompt: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={"repeat": True, "help": "MM-DiT: a prompt (repeatable); sample i gets prompt i mod count"},
    )
    prompts_file: str | None = dataclasses.field(
        default=None, metadata={"help": 'MM-DiT: prompts, one per line (or .jsonl with a "prompt" key)'}
    )
    text_encoder: str | None = dataclasses.field(
        default=None, metadata={"help": "MM-DiT: text encoder directory (default: the checkpoint's)"}
    )
    shift: float | None = dataclasses.field(
        default=None, metadata={"help": "flow models: Euler time shift (default: the training run's)"}
    )
    sampler: str = dataclasses.field(
        default="auto", metadata={"choices": SAMPLERS, "help": "DDIM/DDPM for diffusion, Euler for flow"}
    )
    sampling_steps: int = dataclasses.field(default=50, metadata={"help": "denoising steps per sample"})
    eta: float = dataclasses.field(default=0.0, metadata={"help": "DDIM eta"})
    seed: int = dataclasses.field(default=0, metadata={"help": "sample i's noise depends only on (seed, i)"})
    ema: bool = dataclasses.field(default=True, metadata={"help": "use the EMA weights (--no-ema: raw)"})
    num_actors: int = dataclasses.field(
        default=1, metadata={"help": "sampling actors (one GPU each with GPUs)"}
    )
    batch_size: int = dataclasses.field(default=16, metadata={"help": "samples per chunk (one model batch)"})
    cpus_per_actor: float = dataclasses.field(
        default=1.0, metadata={"help": "CPUs per sampling actor, also its torch threads"}
    )
    use_gpu: bool | None = dataclasses.field(
        default=None, metadata={"help": "one GPU per actor (default: when the cluster has GPUs)"}
    )
    precision: str = dataclasses.field(
        default="auto",
        metadata={
            "choices": PRECISIONS,
            "help": "autocast precision; auto: bf16 on GPUs that support it, else fp32",
        },
    )
    overwrite: bool = dataclasses.field(
        default=False, metadata={"help": "replace samples made with other flags"}
    )
    mlflow: bool = dataclasses.field(default=True, metadata={"help": "log the grid and config to MLflow"})
    tracking_uri: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "MLflow store (default: the training run's, else $MLFLOW_TRACKING_URI, else ./mlflow.db)"
        },
    )
    experiment: str = dataclasses.field(default="vitdit-sample", metadata={"help": "MLflow experiment"})
    mlflow_run_id: str | None = dataclasses.field(default=None, metadata={"help": "log into this run"})
    address: str | None = dataclasses.field(default=None, metadata={"help": "Ray address (default: local)"})


# --- the actor ------------------------------------------------------------------------------------


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index``: a hash of (seed, index), independent of batching."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def chunk_indices(chunk: int, batch_size: int, num_samples: int) -> range:
    return range(chunk * batch_size, min((chunk + 1) * batch_size, num_samples))


def generate_chunks(generator, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A sampling actor's ``__call__``: each chunk id → its samples as one model batch."""
    out: dict[str, list] = {"index": [], "label": [], "image": []}
    for chunk in batch["chunk"]:
        idx = chunk_indices(int(chunk), generator.cfg.batch_size, generator.cfg.num_samples)
        images, labels = generator.generate(idx)
        out["index"].append(np.asarray(idx, dtype=np.int64))
        out["label"].append(labels)
        out["image"].append(images)
    return {k: np.concatenate(v) for k, v in out.items()}


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class SampleGenerator:
    """Ray Data actor: chunk ids in, {"index", "label", "image" (uint8 N×H×W×3)} out.

    Loads the DiT and the VAE once; also usable without Ray (``generate(indices)``).
    """

    def __init__(
        self, config: dict[str, Any], vae_name: str, vae_factors: dict[str, Any], classes: list[int]
    ):
        import ray

        from pipelines.runtime import set_torch_threads
        from vitdit.diffusion import create_diffusion
        from vitdit.vae import load_vae

        # Inside an actor: the CPUs it was given (Ray sets OMP_NUM_THREADS=1). Outside Ray (unit
        # tests) the default is right, and asking Ray's runtime context would start a cluster.
        if ray.is_initialized():
            set_torch_threads()
        self.cfg = SampleConfig(**config)
        self.device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.classes = list(classes)
        # Checkpoint and VAE may be URIs: each node downloads them once (storage.local_dir's cache).
        checkpoint = storage.local_dir(self.cfg.checkpoint)
        self.model = load_dit(checkpoint, use_ema=self.cfg.ema).to(self.device)
        self.vae = load_vae(_local_model(vae_name), device=self.device)
        self.vae_factors = vae_factors
        info = checkpoint_info(checkpoint)
        self.sampler = _resolve_sampler(self.cfg, info)
        diff = dict(info["diffusion"])
        # A flow-trained DiT: Euler on its velocity, its timestep embedding fed scale·t (the trainer's).
        self.flow = diff if diff.get("objective") == "flow" else None
        respacing = (
            f"ddim{self.cfg.sampling_steps}" if self.sampler == "ddim" else str(self.cfg.sampling_steps)
        )
        allowed = set(inspect.signature(create_diffusion).parameters) - {"timestep_respacing"}
        diff = {k: v for k, v in diff.items() if k in allowed}
        diff["learn_sigma"] = self.model.config.learn_sigma
        self.diffusion = create_diffusion(timestep_respacing=respacing, **diff)
        self.autocast = _autocast_dtype(self.cfg.precision, self.device)

    def _model_fn(self):
        from vitdit.diffusion.samplers import cfg_model

        cfg = self.cfg
        if cfg.cfg_scale != 1.0:
            fn = cfg_model(self.model, cfg.cfg_scale, self.model.config.num_classes, cfg.guided_channels)
        else:
            fn = self.model
        if self.autocast is None:
            return fn

        def cast(x, t, y):
            with torch.autocast(self.device.type, dtype=self.autocast):
                return fn(x, t, y).float()

        return cast

    def _flow_sample(self, noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Euler from noise (t = 1) to t = 0, guided against the null class when cfg_scale ≠ 1."""
        from vitdit.diffusion.flow import cfg_velocity, euler_sample, scale_timesteps

        model = scale_timesteps(self.model, float(self.flow.get("timestep_scale", 1000.0)))

        def plain(x, t, labels):
            with torch.autocast(
                self.device.type, dtype=self.autocast or torch.float32, enabled=bool(self.autocast)
            ):
                return model(x, t, labels).float()

        shift = self.cfg.shift if self.cfg.shift is not None else float(self.flow.get("shift", 1.0))
        scale = self.cfg.cfg_scale
        if scale == 1.0:
            velocity = lambda x, t: plain(x, t, y)
        else:
            null = torch.full_like(y, self.model.config.num_classes)
            velocity = lambda x, t: cfg_velocity(plain, x, t, y, null, scale)
        return euler_sample(velocity, noise, self.cfg.sampling_steps, shift=shift)

    @torch.no_grad()
    def generate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images N×H×W×3 and labels of the given sample indices (one model batch)."""
        from vitdit.diffusion.samplers import ddim_sample, ddpm_sample
        from vitdit.vae import decode_latents

        mc = self.model.config
        indices = [int(i) for i in indices]
        labels = np.array([layout.label_for_index(i, self.classes) for i in indices], dtype=np.int64)
        gens = [torch.Generator().manual_seed(sample_seed(self.cfg.seed, i)) for i in indices]
        shape = (mc.in_channels, mc.input_size, mc.input_size)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device)  # N, C, h, w
        y = torch.from_numpy(labels).to(self.device)
        if self.flow is not None:
            z = self._flow_sample(noise, y)
            images = decode_latents(self.vae, z, self.vae_factors)  # N, 3, H, W in [-1, 1]
            return layout.to_uint8(images), labels
        fn = self._model_fn()
        if self.sampler == "ddim":
            z = ddim_sample(fn, self.diffusion, noise, {"y": y}, eta=self.cfg.eta, generator=gens)
        else:
            z = ddpm_sample(fn, self.diffusion, noise, {"y": y}, generator=gens)
        images = decode_latents(self.vae, z, self.vae_factors)  # N, 3, H, W in [-1, 1]
        return layout.to_uint8(images), labels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return generate_chunks(self, batch)


# --- the driver -----------------------------------------------------------------------------------


@dataclasses.dataclass
class SampleResult:
    output: str
    num_samples: int
    num_generated: int  # this run (the rest existed from an earlier run)
    seconds: float
    mlflow_run_id: str | None
    config: dict[str, Any]


def _checkpoint_info(checkpoint: str) -> dict[str, Any]:
    """A DiT's ``checkpoint_info``, or an MM-DiT's (same keys plus "text")."""
    from pipelines.sample_mmdit import mmdit_checkpoint_info
    from vitdit.checkpoint import read_config, resolve_checkpoint_dir
    from vitdit.dit_release import is_release_file

    checkpoint = storage.local_dir(checkpoint) if storage.is_uri(checkpoint) else checkpoint
    if not is_release_file(checkpoint) and os.path.isdir(checkpoint):
        path = resolve_checkpoint_dir(checkpoint)
        config = read_config(path)
        if config.get("kind") == "mmdit":
            return mmdit_checkpoint_info(path, config)
    return checkpoint_info(checkpoint)


def _resolve_sampler(cfg: SampleConfig, info: dict[str, Any]) -> str:
    flow = (info.get("diffusion") or {}).get("objective") == "flow"
    if cfg.sampler == "auto":
        return "euler" if flow else "ddim"
    if flow != (cfg.sampler == "euler"):
        kind = "rectified-flow" if flow else "diffusion"
        raise VitditError(
            f"--sampler {cfg.sampler}: the checkpoint is a {kind} model; use "
            f"{'euler' if flow else 'ddim or ddpm'} (or auto)"
        )
    return cfg.sampler


def resolve_sampling(cfg: SampleConfig) -> tuple[dict[str, Any], dict[str, Any], list[int]]:
    """(checkpoint info, resolved sampling config for sampling.json, labels); validates the flags.

    Labels are class ids for a DiT and prompt indices for an MM-DiT (``resolved["prompts"]``)."""
    if cfg.num_samples <= 0:
        raise VitditError(f"--num-samples {cfg.num_samples}: must be positive")
    if cfg.batch_size <= 0 or cfg.num_actors <= 0:
        raise VitditError(f"--batch-size {cfg.batch_size} / --num-actors {cfg.num_actors}: must be positive")
    if cfg.sampling_steps <= 0:
        raise VitditError(f"--sampling-steps {cfg.sampling_steps}: must be positive")
    info = _checkpoint_info(cfg.checkpoint)
    if storage.is_uri(cfg.checkpoint):  # recorded where everyone finds it, not as this node's cache
        info = {**info, "path": cfg.checkpoint}
    sampler = _resolve_sampler(cfg, info)
    prompts: list[str] = []
    text_encoder = None
    if info["kind"] == "mmdit":
        from pipelines.sample_mmdit import read_prompts, resolve_text_encoder, warn_truncated

        if cfg.classes:
            raise VitditError("--classes: an MM-DiT checkpoint samples from text; use --prompt")
        prompts = read_prompts(cfg.prompt, cfg.prompts_file)
        text_encoder = resolve_text_encoder(info, cfg.text_encoder)
        warn_truncated(info, text_encoder, prompts)
        classes = list(range(len(prompts)))
    else:
        if cfg.prompt or cfg.prompts_file:
            raise VitditError(
                "--prompt/--prompts-file: the checkpoint is a class-conditional DiT; use --classes"
            )
        num_classes = int(info["model_config"]["num_classes"])
        classes = list(cfg.classes) or list(range(num_classes))
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise VitditError(f"--classes {bad}: the model has classes 0..{num_classes - 1}")
        if cfg.cfg_scale != 1.0 and info["model_config"].get("class_dropout_prob", 0) <= 0:
            raise VitditError(f"--cfg-scale {cfg.cfg_scale}: the model was trained without a null class")
    if cfg.vae:
        vae_name = cfg.vae
    elif info["vae"]:
        vae_name = info["vae"]["name_or_path"]
    else:
        raise VitditError(f"--checkpoint {cfg.checkpoint}: records no VAE; pass --vae")
    flow = (info.get("diffusion") or {}).get("objective") == "flow"
    shift = (cfg.shift if cfg.shift is not None else info["diffusion"].get("shift", 1.0)) if flow else None
    resolved = {
        **{k: getattr(cfg, k) for k in _DETERMINING if hasattr(cfg, k)},
        "checkpoint": info["path"],
        "vae": vae_name,
        "classes": classes,
        "sampler": sampler,
        "prompts": prompts,
        "text_encoder": text_encoder,
        "shift": shift,
        "model_kind": "mmdit" if info["kind"] == "mmdit" else "dit",
        # A label names what sample i was asked for: its class, or (MM-DiT) its prompt, so that the
        # evaluator scores class accuracy only where a prompt is exactly a classifier's class name.
        "class_names": prompts if info["kind"] == "mmdit" else info["class_names"],
        "num_samples": cfg.num_samples,
        "guided_channels": cfg.guided_channels,
        "eta": cfg.eta,
        "precision": cfg.precision,
        "step": info["step"],
        "training_run": info["mlflow"],
        "model_config": info["model_config"],
    }
    return info, resolved, classes


def _check_existing(output: str, resolved: dict[str, Any], overwrite: bool) -> None:
    old = layout.read_config(output)
    if not old:
        return
    changed = [k for k in _DETERMINING if k in old and json_equal(old[k], resolved[k]) is False]
    if changed and not overwrite:
        raise VitditError(
            f"--output {output}: holds samples made with other {', '.join(changed)}; "
            "choose another directory or pass --overwrite"
        )
    if changed:
        import shutil

        shutil.rmtree(os.path.join(output, layout.IMAGES_DIR), ignore_errors=True)


def json_equal(a: Any, b: Any) -> bool:
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    return norm(a) == norm(b)


def run_sampling(cfg: SampleConfig) -> SampleResult:
    """Generate ``cfg.num_samples`` samples into ``cfg.output`` (resumable), then log to MLflow."""
    import ray

    from pipelines.runtime import init_ray

    t0 = time.time()
    if storage.is_uri(cfg.output) and not cfg.output.startswith("file://"):
        return _run_sampling_to_uri(cfg)
    info, resolved, classes = resolve_sampling(cfg)
    output = os.path.abspath(cfg.output.removeprefix("file://"))
    os.makedirs(output, exist_ok=True)
    _check_existing(output, resolved, cfg.overwrite)

    from vitdit.vae import load_vae, vae_identity

    # The scale factors come from the VAE's own config (never hard-coded); loading it on the driver
    # also fails fast on a bad --vae before any actor starts.
    local_vae = _local_model(resolved["vae"])
    vae = load_vae(local_vae)
    identity = vae_identity(vae, local_vae)
    if local_vae != resolved["vae"]:
        identity = dataclasses.replace(identity, name_or_path=resolved["vae"])
    if info["vae"] and cfg.vae and info["vae"].get("sha256") and identity.sha256 != info["vae"].get("sha256"):
        log.warning(
            "--vae %s differs from the VAE the checkpoint was trained with (%s)", cfg.vae, info["vae"]
        )
    factors = dataclasses.asdict(identity)
    resolved["vae_identity"] = factors
    del vae

    num_chunks = math.ceil(cfg.num_samples / cfg.batch_size)
    done = layout.existing_indices(output)
    todo = [
        c
        for c in range(num_chunks)
        if any(i not in done for i in chunk_indices(c, cfg.batch_size, cfg.num_samples))
    ]
    generated = 0
    if todo:
        init_ray(cfg.address)
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
        actor_cfg = dataclasses.replace(
            cfg, use_gpu=use_gpu, sampler=resolved["sampler"], shift=resolved["shift"]
        )
        generator_cls: type = SampleGenerator
        if resolved["model_kind"] == "mmdit":
            from pipelines.sample_mmdit import PromptSampleGenerator

            # The actors see the resolved prompts and the checkpoint directory itself (a run
            # directory's latest checkpoint could move on while they start).
            actor_cfg = dataclasses.replace(
                actor_cfg,
                checkpoint=info["path"],
                prompt=tuple(resolved["prompts"]),
                prompts_file=None,
                text_encoder=resolved["text_encoder"],
            )
            generator_cls = PromptSampleGenerator
        actor_cfg = dataclasses.asdict(actor_cfg)
        actors = min(cfg.num_actors, len(todo))
        log.info(
            "sampling %d of %d samples in %d chunks of %d with %d actor(s)%s",
            sum(len(chunk_indices(c, cfg.batch_size, cfg.num_samples)) for c in todo),
            cfg.num_samples, len(todo), cfg.batch_size, actors, " on GPUs" if use_gpu else "",
        )  # fmt: skip
        ds = ray.data.from_items([{"chunk": c} for c in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            generator_cls,
            fn_constructor_kwargs={
                "config": actor_cfg,
                "vae_name": resolved["vae"],
                "vae_factors": factors,
                "classes": classes,
            },  # fmt: skip
            batch_size=1,  # one chunk = one model batch of cfg.batch_size samples
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=cfg.cpus_per_actor,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            layout.write_images(output, batch["index"], batch["image"], batch["label"])
            generated += len(batch["index"])
            log.info("sampled %d/%d", len(layout.existing_indices(output)), cfg.num_samples)
    if resolved["prompts"]:
        from pipelines.sample_mmdit import write_prompts_file

        write_prompts_file(output, resolved["prompts"], cfg.num_samples)
    layout.finalize(output, cfg.num_samples, resolved)
    seconds = time.time() - t0
    run_id = log_sampling(cfg, resolved, output, seconds) if cfg.mlflow else None
    return SampleResult(output, cfg.num_samples, generated, seconds, run_id, resolved)


def _local_model(name: str) -> str:
    """A VAE named by URI as a local directory (downloaded once per node); hub names and local paths as they are."""
    return storage.local_dir(name) if storage.is_uri(name) and not name.startswith("file://") else name


def staging_dir(output: str) -> str:
    """The local directory where samples for the URI ``output`` are made before the upload."""
    import hashlib
    import tempfile

    return os.path.join(
        tempfile.gettempdir(), "vitdit-staging", hashlib.sha256(output.encode()).hexdigest()[:20]
    )


def _run_sampling_to_uri(cfg: SampleConfig) -> SampleResult:
    """Sampling into object storage: into a local staging directory, then uploaded.

    The staging directory is keyed by the output URI and starts as a copy of what the URI holds
    (whatever an earlier run left in it locally is dropped: the URI is the truth, and a bucket
    emptied or re-created since must not meet stale samples), so a re-run after a crash resumes from
    the samples that were uploaded (the upload happens once, at the end: a run killed before it starts
    over). It is removed after the upload. The MLflow run records the URI.
    """
    import shutil

    stage = staging_dir(cfg.output)
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    if storage.exists(cfg.output):
        storage.copy_dir(cfg.output, stage)
    result = run_sampling(dataclasses.replace(cfg, output=stage, mlflow=False))
    storage.copy_dir(stage, cfg.output)
    run_id = log_sampling(cfg, result.config, stage, result.seconds, where=cfg.output) if cfg.mlflow else None
    shutil.rmtree(stage, ignore_errors=True)
    return dataclasses.replace(result, output=cfg.output, mlflow_run_id=run_id)


def log_sampling(
    cfg: SampleConfig, resolved: dict[str, Any], output: str, seconds: float, where: str | None = None
) -> str | None:
    """Grid + sampling config to MLflow, tagged with the training run; returns the run id.

    ``output`` is the local directory holding them; ``where`` the URI they were uploaded to, if any."""
    where = where or output
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import bound_http_waits, resolve_tracking_uri

    bound_http_waits()
    training = resolved.get("training_run") or {}
    uri = resolve_tracking_uri(cfg.tracking_uri or training.get("tracking_uri"))
    try:
        client = MlflowClient(uri)
        if cfg.mlflow_run_id:
            run_id = cfg.mlflow_run_id
        else:
            exp = client.get_experiment_by_name(cfg.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
            run_id = client.create_run(
                exp_id, run_name=f"sample-{posixpath.basename(where.rstrip('/'))}"
            ).info.run_id
        tags = {
            "vitdit.kind": "sample",
            "vitdit.checkpoint": resolved["checkpoint"],
            "vitdit.samples": where,
        }
        if training.get("run_id"):
            tags["vitdit.training_run_id"] = training["run_id"]
        if resolved.get("step") is not None:
            tags["vitdit.step"] = str(resolved["step"])
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        params = {
            f"sample.{k}": str(resolved[k])[:500] for k in (*_DETERMINING, "num_samples", "eta", "precision")
        }
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
        client.log_metric(run_id, "sample/seconds", seconds, step=int(resolved.get("step") or 0))
        client.log_artifact(run_id, os.path.join(output, layout.GRID_NAME), "samples")
        client.log_artifact(run_id, os.path.join(output, layout.CONFIG_NAME), "samples")
        if not cfg.mlflow_run_id:
            client.set_terminated(run_id)
        log.info("sampling logged to MLflow run %s at %s", run_id, uri)
        return run_id
    except Exception as e:  # noqa: BLE001 - the samples are on disk; tracking is best effort
        if cfg.mlflow_run_id:  # the caller (scheduled evaluation) relies on this run getting them
            raise VitditError(
                f"logging the samples into MLflow run {cfg.mlflow_run_id} at {uri} failed: {e}"
            ) from e
        log.warning("MLflow logging of the samples failed: %s", e)
        return None
