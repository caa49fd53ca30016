"""Precompute VAE latents with Ray Data: read → preprocess (CPU tasks) → encode (actor pool) → parts.

Exactly-once output, whatever happens to the driver (docs/latent-dataset.md):

1. The source is listed in sorted order into numbered chunks (``pipelines.images``); chunk ``k``
   becomes ``part-<k>.parquet`` and nothing else does.
2. ``_settings.json`` records everything that would change the manifest before any work starts; a
   re-run with other settings is refused unless ``--overwrite``.
3. The driver streams encoded rows, and when every image of a chunk has come back it writes the
   part under a temporary name and renames it, then writes ``_progress/chunk-<k>.json`` (row count
   and quarantined inputs) the same way. A chunk is finished iff its marker exists; a re-run
   reads only unfinished chunks and rewrites their parts whole.
4. ``quarantine.jsonl`` and, last, ``manifest.json`` are assembled from the markers.

Rows reach the driver only as latents (16 KB per 256² image at float16), never as pixels.

Captions (``caption`` column, "" when an image has none) are always written. With
``--text-encoder`` the same actors that run the VAE also run the text encoder and add ``text_emb``
and ``pooled_emb``: each row's latents and embeddings leave the actor together, one model pair per
GPU shares its memory, and a CPU cluster gives its cores to one pool instead of splitting them
between two. The encoding of "" (``empty_caption.safetensors``, what classifier-free guidance and
caption dropout use) is computed once by a Ray task with an actor's resources before the pool starts.
Without ``--text-encoder`` only the captions are stored and the trainer's text tower tokenizes them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import posixpath
import time
import uuid
import warnings
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

import vitdit
from pipelines import storage
from pipelines.images import (
    CHUNK,
    ERROR,
    IMAGE,
    IMAGE_FLIP,
    ImageSource,
    Preprocess,
    filesystem_for,
    read_image_source,
)
from pipelines.runtime import init_ray, set_torch_threads
from vitdit import latents as L
from vitdit.errors import VitditError
from vitdit.preprocess import to_unit_range
from vitdit.text import describe_text_encoder
from vitdit.vae import encode_posterior, latent_shape, load_vae, vae_identity

log = logging.getLogger(__name__)

SETTINGS_NAME = "_settings.json"
PROGRESS_DIR = "_progress"
PRECISIONS = ("fp32", "bf16", "fp16")
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Per-row flag from the actors to the driver (counted, not stored): the caption was cut to L tokens.
TRUNCATED = "text_truncated"
# Per-row Ray node id of the actor that encoded it (not stored in the parts; each chunk's marker
# lists its nodes, which shows where the work ran on a cluster).
NODE = "encoded_on"


@dataclasses.dataclass
class EncodeConfig:
    """``vitdit encode``: every field is a ``--kebab-case`` flag."""

    input: str = dataclasses.field(
        metadata={"help": "image source: folder, webdataset tars or parquet (path or URI)"}
    )
    output: str = dataclasses.field(metadata={"help": "latent data set directory or URI"})
    vae: str = dataclasses.field(metadata={"help": "diffusers AutoencoderKL: hub name or local directory"})
    resolution: int = dataclasses.field(
        default=256, metadata={"help": "image side after the ADM centre crop"}
    )
    flip: bool = dataclasses.field(default=False, metadata={"help": "also encode the mirrored image"})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "images per VAE forward pass"})
    num_actors: int | None = dataclasses.field(
        default=None, metadata={"help": "encoder actors (default: one per GPU, or 1 without GPUs)"}
    )
    num_gpus_per_actor: float | None = dataclasses.field(
        default=None, metadata={"help": "GPUs per encoder actor (default: 1 when the cluster has GPUs)"}
    )
    num_cpus_per_actor: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "CPUs (= torch threads) per encoder actor (default: 1 with GPUs, else what is left after one reader)"
        },
    )
    precision: str = dataclasses.field(
        default="fp32", metadata={"help": "compute precision of the VAE", "choices": PRECISIONS}
    )
    storage_dtype: str = dataclasses.field(
        default="float16", metadata={"help": "dtype of the stored mean/std", "choices": L.STORAGE_DTYPES}
    )
    format: str = dataclasses.field(
        default="auto",
        metadata={"help": "source format", "choices": ("auto", "folder", "webdataset", "parquet")},
    )
    image_column: str = dataclasses.field(
        default="image", metadata={"help": "parquet: column of image bytes"}
    )
    label_column: str | None = dataclasses.field(default="label", metadata={"help": "parquet: label column"})
    id_column: str | None = dataclasses.field(
        default=None, metadata={"help": "parquet: id column (default: <file>/<row>)"}
    )
    caption_column: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "parquet: caption column (default: a column named 'caption' where a file has one; "
            "'' for none). Folders take <stem>.txt sidecars, tars <key>.txt or <key>.json's \"caption\""
        },
    )
    text_encoder: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "local directory of a transformers CLIP text model or T5 encoder and its tokenizer: "
            "also store each caption's text_emb / pooled_emb and empty_caption.safetensors. Without it "
            "only the captions are stored (the trainer's own text tower tokenizes them)"
        },
    )
    text_max_length: int | None = dataclasses.field(
        default=None,
        metadata={"help": "tokens per caption, padded or truncated (default: the tokenizer's limit)"},
    )
    text_batch_size: int | None = dataclasses.field(
        default=None, metadata={"help": "captions per text encoder forward pass (default: --batch-size)"}
    )
    part_size: int = dataclasses.field(
        default=1000,
        metadata={
            "help": "images per output part for folder sources (tar shards and parquet row groups are parts)"
        },
    )
    vae_revision: str | None = dataclasses.field(default=None, metadata={"help": "hub revision of --vae"})
    address: str | None = dataclasses.field(
        default=None, metadata={"help": "Ray cluster address (default: start a local one)"}
    )
    overwrite: bool = dataclasses.field(
        default=False, metadata={"help": "replace an existing output made with other settings"}
    )
    max_failures: int = dataclasses.field(
        default=3,
        metadata={
            "help": "times a lost encoder actor or node restarts the stream from the unfinished parts "
            "(finished parts are kept) before the job fails"
        },
    )


# ---------------------------------------------------------------------------------------------
# The GPU (or CPU) stage


class EncodeText:
    """Callable: ``caption`` → ``text_emb`` N×L×width and ``pooled_emb`` N×pooled_width in the
    storage dtype, and ``text_truncated`` (bool) for the driver's count of captions cut to L tokens.

    Rows with a non-empty ``error`` get zeros (the driver quarantines them). The encoder runs in the
    compute precision's dtype (bf16 halves a T5-XXL's memory) and returns float32.
    """

    def __init__(
        self,
        path: str,
        max_length: int | None = None,
        precision: str = "fp32",
        storage_dtype: str = "float16",
        batch_size: int | None = None,
        device: str | torch.device = "cpu",
    ):
        from vitdit.text import TextEncoder

        self.encoder = TextEncoder(path, device=device, dtype=_TORCH_DTYPES[precision], max_length=max_length)
        self.storage = np.dtype(storage_dtype)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = [str(c) for c in batch[L.CAPTION]]
        n, enc = len(captions), self.encoder
        text = np.zeros((n, enc.max_length, enc.width), dtype=self.storage)
        pooled = np.zeros((n, enc.pooled_width), dtype=self.storage)
        truncated = np.zeros(n, dtype=bool)
        good = np.flatnonzero([not e for e in batch[ERROR]]) if ERROR in batch else np.arange(n)
        step = self.batch_size or max(1, len(good))
        for start in range(0, len(good), step):
            rows = good[start : start + step]
            ids, cut = enc.tokenize([captions[i] for i in rows])
            tokens, vec = enc.encode_ids(ids)
            text[rows] = tokens.cpu().numpy().astype(self.storage)
            pooled[rows] = vec.cpu().numpy().astype(self.storage)
            truncated[rows] = cut
        if not (np.isfinite(text).all() and np.isfinite(pooled).all()):
            # float16 holds up to 65504: a text tower with larger activations needs float32 storage.
            raise VitditError(
                f"--text-encoder {enc.path}: embeddings overflow --storage-dtype {self.storage.name} "
                "(or the encoder produced NaN/inf at this precision); use --storage-dtype float32"
            )
        return {**batch, L.TEXT_EMB: text, L.POOLED_EMB: pooled, TRUNCATED: truncated}


def encode_empty_caption(
    path: str, max_length: int | None, precision: str, use_gpu: bool = False, num_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(text_emb L×width, pooled_emb width) float32 of the caption "", computed exactly as the rows
    are (same precision and device kind); run as a Ray task with an encoder actor's resources."""
    set_torch_threads(num_threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    enc = EncodeText(path, max_length, precision, "float32", device=device).encoder
    tokens, pooled = enc.encode([""])
    return tokens[0].cpu().numpy(), pooled[0].cpu().numpy()


class EncodeLatents:
    """map_batches callable class: ``image`` (+ ``image_flip``) → posterior ``mean``/``std``
    (+ ``text_emb``/``pooled_emb`` of the ``caption`` when ``text_encoder`` is given).

    Loads the VAE (and the text encoder) once per actor. Rows with a non-empty ``error`` are passed
    through with zero latents (the driver quarantines them) so a batch never fails for one bad image.
    """

    def __init__(
        self,
        vae: str,
        revision: str | None = None,
        precision: str = "fp32",
        storage_dtype: str = "float16",
        use_gpu: bool = False,
        num_threads: int | None = None,
        text_encoder: str | None = None,
        text_max_length: int | None = None,
        text_batch_size: int | None = None,
    ):
        self.threads = set_torch_threads(num_threads)
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        # A VAE on object storage is downloaded once per node (storage.local_dir's cache).
        self.vae = load_vae(storage.local_dir(vae), device=self.device, revision=revision)
        self.autocast = precision != "fp32"
        self.amp_dtype = _TORCH_DTYPES[precision]
        self.storage = np.dtype(storage_dtype)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.text = (
            EncodeText(text_encoder, text_max_length, precision, storage_dtype, text_batch_size, self.device)
            if text_encoder
            else None
        )

    def _encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(to_unit_range(images)).to(self.device)  # N, 3, R, R in [-1, 1]
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.autocast):
            mean, std = encode_posterior(self.vae, x)
        # Stored dtype is independent of the compute precision.
        return (
            mean.float().cpu().numpy().astype(self.storage),
            std.float().cpu().numpy().astype(self.storage),
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch[IMAGE]
        n, r = len(images), images.shape[1]
        good = np.array([not e for e in batch[ERROR]], dtype=bool)
        shape = (self.latent_channels, r // self.factor, r // self.factor)
        flips = IMAGE_FLIP in batch
        outs = {
            c: np.zeros((n, *shape), dtype=self.storage)
            for c in (*L.LATENT_COLUMNS, *(L.FLIP_COLUMNS if flips else ()))
        }
        k = int(good.sum())
        if k:
            # Original and mirrored images go through one forward pass: fewer, larger matmuls.
            x = np.concatenate([images[good], batch[IMAGE_FLIP][good]]) if flips else images[good]
            mean, std = self._encode(x)
            outs[L.MEAN][good], outs[L.STD][good] = mean[:k], std[:k]
            if flips:
                outs[L.MEAN_FLIP][good], outs[L.STD_FLIP][good] = mean[k:], std[k:]
        passthrough = {c: batch[c] for c in batch if c not in (IMAGE, IMAGE_FLIP)}
        out = {**passthrough, **outs, NODE: np.full(n, self.node_id, dtype=object)}
        return self.text(out) if self.text is not None else out


# ---------------------------------------------------------------------------------------------
# Output directory helpers (any pyarrow filesystem)


class _Output:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem_for(uri)

    def path(self, *names: str) -> str:
        return posixpath.join(self.root, *names)

    def exists(self, *names: str) -> bool:
        return self.fs.get_file_info(self.path(*names)).type != pafs.FileType.NotFound

    def read_text(self, *names: str) -> str:
        with self.fs.open_input_stream(self.path(*names)) as f:
            return f.read().decode()

    def read_json(self, *names: str) -> Any:
        return json.loads(self.read_text(*names))

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write under a temporary name, then rename: readers never see half a file."""
        final = self.path(name)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)

    def write_table_atomic(self, name: str, table) -> None:
        final = self.path(name)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            pq.write_table(table, f)
        self.fs.move(tmp, final)

    def list(self, sub: str = "") -> list[str]:
        base = self.path(sub) if sub else self.root
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        return sorted(
            posixpath.relpath(i.path, self.root)
            for i in self.fs.get_file_info(pafs.FileSelector(base, recursive=False))
        )

    def ours(self) -> list[str]:
        """Every entry this job writes (what --overwrite removes)."""
        names = [n for n in self.list() if n.startswith(L.PART_PREFIX) or ".tmp-" in n]
        fixed = (L.MANIFEST_NAME, L.QUARANTINE_NAME, L.EMPTY_CAPTION_NAME, SETTINGS_NAME, PROGRESS_DIR)
        names += [n for n in fixed if self.exists(n)]
        return names

    def remove(self, names: list[str]) -> None:
        for n in names:
            p = self.path(n)
            if self.fs.get_file_info(p).type == pafs.FileType.Directory:
                self.fs.delete_dir(p)
            else:
                self.fs.delete_file(p)


def part_name(index: int) -> str:
    return f"{L.PART_PREFIX}{index:05d}.parquet"


def marker_name(index: int) -> str:
    return f"{PROGRESS_DIR}/chunk-{index:05d}.json"


# ---------------------------------------------------------------------------------------------
# The job


def _settings(
    cfg: EncodeConfig, source: ImageSource, identity: L.VAEIdentity, shape, text: dict | None = None
) -> dict:
    """Everything that changes the output; compared on a re-run before any work."""
    return {
        "format_version": L.FORMAT_VERSION,  # parts of two formats must not mix in one data set
        "text_encoder": text,  # None: captions only
        "caption_column": cfg.caption_column,
        "vae": dataclasses.asdict(identity),
        "resolution": cfg.resolution,
        "flips": cfg.flip,
        "storage_dtype": cfg.storage_dtype,
        "latent_shape": list(shape),
        "source_uri": source.uri,
        "source_format": source.format,
        "source_fingerprint": source.fingerprint,
        "part_size": cfg.part_size,  # changes which ids land in which part
        "class_names": source.class_names,
    }


def _diff(old: dict, new: dict) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if k == "vae" and isinstance(a, dict) and isinstance(b, dict):
            same = (
                a.get("sha256") == b.get("sha256")
                if a.get("sha256") and b.get("sha256")
                else (a.get("name_or_path"), a.get("revision")) == (b.get("name_or_path"), b.get("revision"))
            )
            if same and (a.get("scaling_factor"), a.get("shift_factor")) == (
                b.get("scaling_factor"),
                b.get("shift_factor"),
            ):
                continue
        if k == "text_encoder" and isinstance(a, dict) and isinstance(b, dict):
            # The same weights moved to another directory are the same encoder.
            a, b = ({n: v for n, v in d.items() if n != "path"} for d in (a, b))
        if a != b:
            out.append(f"{k}: {_short(a)} -> {_short(b)}")
    return out


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


def _check_resumable(out: _Output, settings: dict, overwrite: bool) -> None:
    """Refuse to mix settings in one output; with overwrite, clear what an earlier run wrote."""
    existing = out.ours()
    if not existing:
        return
    if overwrite:
        log.info("--overwrite: removing %d entries of an earlier run in %s", len(existing), out.uri)
        out.remove(existing)
        return
    if out.exists(SETTINGS_NAME):
        old = out.read_json(SETTINGS_NAME)
        version = old.pop("format_version", 1)  # format 1 recorded none
        diff = _diff(old, {k: v for k, v in settings.items() if k != "format_version"})
        if diff:
            raise VitditError(
                f"{out.uri}: holds a latent data set made with other settings ({'; '.join(diff)}); "
                "use another --output, or pass --overwrite to replace it"
            )
        if version != settings["format_version"] and not out.exists(L.MANIFEST_NAME):
            # A finished older data set stays readable as it is; an unfinished one cannot be
            # completed in a newer format (its parts would lack the caption column).
            raise VitditError(
                f"{out.uri}: an unfinished latent data set of format {version} (an older vitdit); finish it "
                f"with that version, or pass --overwrite to encode it again in format {L.FORMAT_VERSION}"
            )
        return
    raise VitditError(
        f"{out.uri}: holds latent files ({', '.join(existing[:3])}) but no {SETTINGS_NAME}, so it cannot be "
        "resumed safely; use another --output, or pass --overwrite to replace them"
    )


def _resolve_resources(cfg: EncodeConfig) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor) from the flags and the cluster."""
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    g = cfg.num_gpus_per_actor if cfg.num_gpus_per_actor is not None else (1.0 if gpus > 0 else 0.0)
    if g > 0 and gpus == 0:
        raise VitditError(f"--num-gpus-per-actor {g}: the Ray cluster has no GPUs")
    n = cfg.num_actors or (max(1, int(gpus // g)) if g > 0 else 1)
    if cfg.num_cpus_per_actor is not None:
        c = cfg.num_cpus_per_actor
    elif g > 0:
        c = 1.0
    else:
        # CPU-only: the actors get what one reader task leaves, so torch uses the machine's cores.
        c = float(max(1, int((cpus - 1) // n)))
    if n * c > cpus:
        raise VitditError(f"--num-actors {n} × {c} CPUs each: more than the cluster's {cpus:g} CPUs")
    return n, g, c


def _validate(cfg: EncodeConfig) -> None:
    if cfg.resolution <= 0:
        raise VitditError(f"--resolution {cfg.resolution}: must be positive")
    if cfg.batch_size < 1:
        raise VitditError(f"--batch-size {cfg.batch_size}: must be at least 1")
    if cfg.precision not in PRECISIONS:
        raise VitditError(f"--precision {cfg.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if cfg.storage_dtype not in L.STORAGE_DTYPES:
        raise VitditError(
            f"--storage-dtype {cfg.storage_dtype!r}: choose one of {', '.join(L.STORAGE_DTYPES)}"
        )
    if cfg.max_failures < 0:
        raise VitditError(f"--max-failures {cfg.max_failures}: must be 0 or more")
    if cfg.num_actors is not None and cfg.num_actors < 1:
        raise VitditError(f"--num-actors {cfg.num_actors}: must be at least 1")
    if cfg.text_batch_size is not None and cfg.text_batch_size < 1:
        raise VitditError(f"--text-batch-size {cfg.text_batch_size}: must be at least 1")
    if cfg.text_encoder is None and (cfg.text_max_length is not None or cfg.text_batch_size is not None):
        raise VitditError("--text-max-length / --text-batch-size: only with --text-encoder")


def build_dataset(
    source: ImageSource, chunks, cfg: EncodeConfig, num_actors: int, gpus: float, cpus: float
) -> ray.data.Dataset:
    """The streaming pipeline over ``chunks``: read + preprocess tasks, then the encoder actor pool."""
    ds = source.dataset_for(chunks, captions=True)
    # A plain callable instance runs as tasks, fused with the read: bytes never cross the object store.
    ds = ds.map_batches(Preprocess(cfg.resolution, flip=cfg.flip), batch_size=cfg.batch_size)
    # Ray 2.60 has no named map_batches parameter for scheduling_strategy / max_restarts; its
    # **ray_remote_args path works and warns that it goes in Ray 2.64 (pyproject allows <3: this
    # is what to move when Ray names them).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        return _encoder_stage(ds, cfg, num_actors, gpus, cpus)


def _encoder_stage(ds: ray.data.Dataset, cfg: EncodeConfig, num_actors: int, gpus: float, cpus: float):
    return ds.map_batches(
        EncodeLatents,
        fn_constructor_kwargs={
            "vae": cfg.vae,
            "revision": cfg.vae_revision,
            "precision": cfg.precision,
            "storage_dtype": cfg.storage_dtype,
            "use_gpu": gpus > 0,
            "num_threads": int(cpus),
            "text_encoder": cfg.text_encoder,
            "text_max_length": cfg.text_max_length,
            "text_batch_size": cfg.text_batch_size,
        },
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=gpus,
        num_cpus=cpus,
        # One actor per node first: Ray Data otherwise lets the scheduler pack them onto the
        # driver's node while it has room (seen with 2 CPU-only nodes: both actors on the head).
        scheduling_strategy="SPREAD",
        # A lost actor fails the stream at once (the driver restarts it from the unfinished parts,
        # see _encode_chunks). Ray Data's default, restarting the actor forever, hung on a small
        # cluster that lost a node: the restarted actor waited for a CPU the read tasks held.
        max_restarts=0,
    )


def _source_of(chunk, id_: str) -> str:
    """Where a quarantined input came from: its file, its tar shard member, or its parquet row group."""
    if chunk.kind == "files":
        return chunk.members[chunk.ids.index(id_)]
    if chunk.kind == "tar":
        return f"{chunk.path}#{chunk.members[chunk.ids.index(id_)]}"
    return f"{chunk.path}#row_group={chunk.row_group}"


class _ChunkWriter:
    """Driver side: collects streamed rows per chunk; writes a chunk's part once it is complete."""

    def __init__(self, out: _Output, chunks, flips: bool, text: bool = False):
        self.out = out
        self.chunks = {c.index: c for c in chunks}
        self.flips = flips
        self.text = text
        self.seen = {c.index: 0 for c in chunks}
        self.rows: dict[int, list[dict[str, np.ndarray]]] = {c.index: [] for c in chunks}
        self.bad: dict[int, list[tuple[str, str]]] = {c.index: [] for c in chunks}
        self.nodes: dict[int, set[str]] = {c.index: set() for c in chunks}
        self.encoded = 0
        self.quarantined = 0
        self.done = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        chunk_col = np.asarray(batch[CHUNK])
        for k in np.unique(chunk_col):
            k = int(k)
            sel = chunk_col == k
            sub = {c: v[sel] for c, v in batch.items()}
            self.nodes[k].update(str(n) for n in sub.get(NODE, ()) if n)
            bad = np.array([bool(e) for e in sub[ERROR]], dtype=bool)
            for i in np.flatnonzero(bad):
                self.bad[k].append((str(sub[L.ID][i]), str(sub[ERROR][i])))
            if (~bad).any():
                self.rows[k].append({c: v[~bad] for c, v in sub.items()})
            self.seen[k] += int(sel.sum())
            if self.seen[k] == self.chunks[k].num_images:
                self._finish(k)
            elif self.seen[k] > self.chunks[k].num_images:
                raise RuntimeError(f"chunk {k}: {self.seen[k]} rows for {self.chunks[k].num_images} images")

    def _finish(self, k: int) -> None:
        from ray.data.block import BlockAccessor

        chunk = self.chunks[k]
        cols = [L.ID, L.LABEL, L.CAPTION, *L.LATENT_COLUMNS, *(L.FLIP_COLUMNS if self.flips else ())]
        cols += [*L.TEXT_COLUMNS] if self.text else []
        parts = self.rows.pop(k)
        n = sum(len(p[L.ID]) for p in parts)
        part = None
        captioned = sum(int(sum(bool(c) for c in p[L.CAPTION])) for p in parts)
        truncated = sum(int(p[TRUNCATED].sum()) for p in parts) if self.text else 0
        if n:
            merged = {c: np.concatenate([p[c] for p in parts]) for c in cols}
            # Rows in listing order: the same part bytes whatever order the actors finished in.
            order_of = {id_: i for i, id_ in enumerate(chunk.ids)}
            order = np.argsort([order_of[str(i)] for i in merged[L.ID]], kind="stable")
            batch = {c: merged[c][order] for c in cols}
            batch[L.ID] = np.array([str(i) for i in batch[L.ID]], dtype=object)
            batch[L.LABEL] = batch[L.LABEL].astype(np.int32)
            batch[L.CAPTION] = np.array([str(c) for c in batch[L.CAPTION]], dtype=object)
            part = part_name(k)
            self.out.write_table_atomic(part, BlockAccessor.batch_to_block(batch))
        quarantine = [{"id": i, "source": _source_of(chunk, i), "reason": r} for i, r in self.bad.pop(k)]
        marker = {
            "chunk": k,
            "part": part,
            "num_rows": n,
            "captioned": captioned,
            "truncated": truncated,
            "quarantine": quarantine,
            "nodes": sorted(self.nodes.pop(k)),
        }
        # The marker is written after the part: a chunk counts as finished only when both exist.
        self.out.write_atomic(marker_name(k), json.dumps(marker).encode())
        self.encoded += n
        self.quarantined += len(quarantine)
        self.done += 1


def _write_empty_caption(out: _Output, cfg: EncodeConfig, text: dict, gpus: float, cpus: float) -> None:
    """``empty_caption.safetensors``: the encoding of "" by a task with an encoder actor's resources
    (the driver may have no GPU, and a T5-XXL does not belong in its memory)."""
    from safetensors.numpy import save

    task = ray.remote(encode_empty_caption).options(num_gpus=gpus, num_cpus=cpus, max_retries=1)
    tokens, pooled = ray.get(
        task.remote(cfg.text_encoder, cfg.text_max_length, cfg.precision, gpus > 0, int(cpus))
    )
    expect = ((text["max_length"], text["width"]), (text["pooled_width"],))
    if (tokens.shape, pooled.shape) != expect:
        raise RuntimeError(f"empty caption encoded as {tokens.shape}, {pooled.shape}; expected {expect}")
    data = save({L.TEXT_EMB: np.ascontiguousarray(tokens), L.POOLED_EMB: np.ascontiguousarray(pooled)})
    out.write_atomic(L.EMPTY_CAPTION_NAME, data)


_LOST = (
    ray.exceptions.ActorDiedError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OwnerDiedError,
    ray.exceptions.WorkerCrashedError,
)


def _lost_worker(e: BaseException) -> bool:
    """Whether an error from the stream (or one it wraps) is a lost actor, worker or node."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, _LOST):
            return True
        e = e.__cause__ or e.__context__
    return False


def _alive_cpus() -> float:
    """CPUs of the nodes the GCS holds alive (``ray.cluster_resources()`` can still count a dead node's)."""
    return sum(float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive"))


def _node_death_s() -> float:
    """At most how long the GCS takes to mark a killed node DEAD: its health check's failure threshold
    times its period, plus one check's timeout (Ray's ``RAY_health_check_*`` settings, read as the
    driver's Ray reads them; Ray 2.60's defaults give 3 s × 5 + 10 s = 25 s)."""
    try:
        from ray._raylet import Config

        period, threshold = Config.health_check_period_ms(), Config.health_check_failure_threshold()
        return (period * threshold + Config.health_check_timeout_ms()) / 1000
    except Exception:  # a private API: should it move, Ray 2.60's defaults
        return 25.0


def _actors_that_fit(n_actors: int, gpus: float, cpus: float, wait_s: float = 60.0) -> int:
    """After a lost actor or node: how many CPU actors the cluster that is left holds beside one CPU for
    the read and preprocess tasks, once the failed stream's actors have given their CPUs back.

    Both halves matter on a small cluster: two 1-CPU actors restarted on the 2-CPU node that is left,
    or one new actor beside one not yet released, leave no CPU for the reads and the stream never
    starts. And the lost actor's error comes before the GCS knows its node is dead: until the GCS's
    health check marks it (``_node_death_s``), the node table and ``ray.available_resources()``
    still count the dead node's CPUs, free. So the count is trusted once a node has left the table or
    that time has passed. Waits at most ``max(wait_s, _node_death_s())``.
    """
    if gpus > 0:
        return n_actors
    start = time.monotonic()
    settle_s = _node_death_s()
    alive_before = _alive_cpus()
    while True:
        alive = _alive_cpus()
        n = max(1, min(n_actors, int((alive - 1) // cpus)))
        free = float(ray.available_resources().get("CPU", 0))
        waited = time.monotonic() - start
        settled = alive < alive_before or waited >= settle_s
        if (settled and free >= n * cpus + 1) or waited > max(wait_s, settle_s):
            return n
        time.sleep(0.5)


def _encode_chunks(
    source, todo, out: _Output, cfg: EncodeConfig, text: bool, n_actors: int, gpus: float, cpus: float
) -> None:
    """Stream ``todo`` through the actor pool and write each finished chunk. When an actor or its
    node is lost, start again from the chunks that have no marker yet (at most ``max_failures``
    times), with as many actors as the cluster that is left can hold beside one reader."""
    failures = 0
    while todo:
        ds = build_dataset(source, todo, cfg, n_actors, gpus, cpus)
        writer = _ChunkWriter(out, todo, cfg.flip, text=text)
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        try:
            for batch in batches:
                writer.add(batch)
        except Exception as e:
            if not _lost_worker(e):
                raise
            # Stop the failed stream now, so its actors and tasks give their CPUs back: left to the
            # garbage collector, the surviving actor held its CPU and the restart waited out its 60 s.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            del batches, ds
            failures += 1
            left = [c for c in todo if not out.exists(marker_name(c.index))]
            if failures > cfg.max_failures:
                raise VitditError(
                    f"encode: lost an encoder actor or node {failures} times (--max-failures "
                    f"{cfg.max_failures}); {len(left)} parts unfinished in {out.uri}: run the same "
                    "command again to finish them (finished parts are kept)"
                ) from None
            n_actors = _actors_that_fit(n_actors, gpus, cpus)
            log.warning(
                "encode: lost an encoder actor or node (%s); restarting from the %d unfinished parts "
                "with %d actor(s) (failure %d of %d)",
                type(e).__name__, len(left), n_actors, failures, cfg.max_failures,
            )  # fmt: skip
            todo = left
            continue
        unfinished = [k for k, c in writer.chunks.items() if writer.seen[k] != c.num_images]
        if unfinished:
            raise RuntimeError(f"parts {unfinished[:5]} did not receive all their rows")
        return


def encode_dataset(cfg: EncodeConfig) -> dict[str, Any]:
    """Run (or resume) the encode job; returns a summary with read / encoded / quarantined counts.

    Raises VitditError for bad input: a missing source, settings that differ from an existing
    output without ``overwrite``, or a source whose every image is unusable.
    """
    _validate(cfg)
    t0 = time.perf_counter()
    source = read_image_source(
        cfg.input,
        format=cfg.format,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        id_column=cfg.id_column,
        part_size=cfg.part_size,
        caption_column=cfg.caption_column,
    )
    # Checked (and its weights hashed) before any work: a bad path fails in one line, not in an actor.
    text = describe_text_encoder(cfg.text_encoder, cfg.text_max_length) if cfg.text_encoder else None
    local_vae = storage.local_dir(cfg.vae) if storage.is_uri(cfg.vae) else cfg.vae
    vae = load_vae(local_vae, revision=cfg.vae_revision)
    identity = vae_identity(vae, local_vae, cfg.vae_revision)
    if local_vae != cfg.vae:  # the manifest names the VAE where everyone can find it, not this cache
        identity = dataclasses.replace(identity, name_or_path=cfg.vae)
    shape = latent_shape(vae, cfg.resolution)
    del vae
    if cfg.precision == "fp16" and cfg.num_gpus_per_actor == 0:
        raise VitditError("--precision fp16 needs GPUs (CPU kernels lack fp16); use bf16 or fp32")

    out = _Output(cfg.output)
    settings = _settings(cfg, source, identity, shape, text)
    _check_resumable(out, settings, cfg.overwrite)
    if not out.exists(SETTINGS_NAME):
        out.fs.create_dir(out.root, recursive=True)
        out.write_atomic(SETTINGS_NAME, json.dumps(settings, indent=2, sort_keys=True).encode())
    out.fs.create_dir(out.path(PROGRESS_DIR), recursive=True)
    stale = [n for n in out.list() + out.list(PROGRESS_DIR) if ".tmp-" in n]
    out.remove(stale)  # temporaries of a killed run

    todo = [c for c in source.chunks if not out.exists(marker_name(c.index))]
    resumed = len(source.chunks) - len(todo)
    if out.exists(L.MANIFEST_NAME) and not todo:
        # Complete already: report it and touch nothing.
        log.info("%s is already complete", cfg.output)
        done = L.Manifest.from_json(out.read_text(L.MANIFEST_NAME), where=out.path(L.MANIFEST_NAME))
        return {
            "output": cfg.output,
            "read": source.num_images,
            "encoded": done.num_rows,
            "quarantined": done.num_quarantined,
            "captioned": done.captioned,
            "uncaptioned": done.uncaptioned,
            "truncated": (done.text or {}).get("num_truncated", 0),
            "parts": len(done.parts),
            "resumed_parts": resumed,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    if text is not None and not out.exists(L.EMPTY_CAPTION_NAME):
        init_ray(cfg.address)
        _write_empty_caption(out, cfg, text, *_resolve_resources(cfg)[1:])
    if todo:
        init_ray(cfg.address)
        n_actors, gpus, cpus = _resolve_resources(cfg)
        if cfg.precision == "fp16" and gpus == 0:
            raise VitditError("--precision fp16 needs GPUs (CPU kernels lack fp16); use bf16 or fp32")
        log.info(
            "encoding %d images in %d parts (%d already finished) with %d actor(s) × %g GPU / %g CPU",
            sum(c.num_images for c in todo), len(todo), resumed, n_actors, gpus, cpus,
        )  # fmt: skip
        _encode_chunks(source, todo, out, cfg, text is not None, n_actors, gpus, cpus)

    markers = [out.read_json(marker_name(c.index)) for c in source.chunks]
    encoded = sum(m["num_rows"] for m in markers)
    captioned = sum(m["captioned"] for m in markers)
    truncated = sum(m["truncated"] for m in markers)
    quarantine = [q for m in markers for q in m["quarantine"]]
    if encoded == 0:
        reasons = sorted({q["reason"] for q in quarantine})
        raise VitditError(
            f"{cfg.input}: all {len(quarantine)} inputs are unusable, nothing to encode "
            f"(reasons: {'; '.join(reasons[:3])}); see {out.path(PROGRESS_DIR)}"
        )
    out.write_atomic(L.QUARANTINE_NAME, "".join(json.dumps(q) + "\n" for q in quarantine).encode())
    if truncated:
        log.warning(
            "%d of %d captions were longer than %d tokens and were truncated by the text encoder's tokenizer",
            truncated, encoded, text["max_length"],
        )  # fmt: skip
    manifest = L.Manifest(
        num_rows=encoded,
        latent_shape=tuple(shape),
        storage_dtype=cfg.storage_dtype,
        vae=identity,
        resolution=cfg.resolution,
        class_names=list(source.class_names),
        flips=cfg.flip,
        source_uri=source.uri,
        source_fingerprint=source.fingerprint,
        num_quarantined=len(quarantine),
        parts=[{"path": m["part"], "num_rows": m["num_rows"]} for m in markers if m["part"]],
        vitdit_version=vitdit.__version__,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        text=None
        if text is None
        else {**text, "empty_caption": L.EMPTY_CAPTION_NAME, "num_truncated": truncated},
        captioned=captioned,
        uncaptioned=encoded - captioned,
    )
    out.write_atomic(L.MANIFEST_NAME, manifest.to_json().encode())  # last: the data set is complete
    return {
        "output": cfg.output,
        "read": source.num_images,
        "encoded": encoded,
        "quarantined": len(quarantine),
        "captioned": captioned,
        "uncaptioned": encoded - captioned,
        "truncated": truncated,
        "parts": len(manifest.parts),
        "resumed_parts": resumed,
        "seconds": round(time.perf_counter() - t0, 2),
    }
