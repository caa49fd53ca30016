"""Reading a latent data set (the output of ``vitdit encode``): the one reader every consumer uses.

``read_latents(uri)`` checks the manifest (its absence means the data set is incomplete) and that
the data set was made with the VAE and resolution the consumer expects, then reads exactly the parts
the manifest lists. Columns and dtypes: ``vitdit.latents``. ``mean``/``std`` (and ``mean_flip``/
``std_flip``) are fixed-shape tensor columns C×H×W, so ``iter_torch_batches`` yields B×C×H×W tensors;
``text_emb`` (L×width) and ``pooled_emb`` (width) likewise when the data set has a text encoder, and
``read_empty_caption`` gives the encoding of "" that goes with them. ``caption`` is a string column.
"""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines.images import filesystem_for
from vitdit.errors import VitditError
from vitdit.latents import (
    CAPTION,
    EMPTY_CAPTION_NAME,
    FLIP_COLUMNS,
    ID,
    LABEL,
    LATENT_COLUMNS,
    MANIFEST_NAME,
    POOLED_EMB,
    TEXT_EMB,
    Manifest,
    VAEIdentity,
)


def read_manifest(uri: str) -> Manifest:
    """The manifest of the latent data set at ``uri``; VitditError when absent or unreadable."""
    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise VitditError(f"{uri}: no such latent data set (path does not exist)")
    mpath = posixpath.join(path, MANIFEST_NAME)
    if fs.get_file_info(mpath).type != pafs.FileType.File:
        raise VitditError(
            f"{uri}: no {MANIFEST_NAME}, so the latent data set is incomplete (its encode job is still "
            "running or stopped part way); re-run the same `vitdit encode` command to finish it"
        )
    with fs.open_input_stream(mpath) as f:
        text = f.read().decode()
    return Manifest.from_json(text, where=f"{uri}/{MANIFEST_NAME}")


def read_empty_caption(uri: str, manifest: Manifest | None = None):
    """(text_emb L×width, pooled_emb width) float32 tensors of the caption "" of the data set at
    ``uri`` (the negative prompt of classifier-free guidance, and what caption dropout substitutes),
    or None when the data set has no text embeddings. VitditError when the file is missing or its
    shapes disagree with the manifest."""
    manifest = manifest or read_manifest(uri)
    if manifest.text is None:
        return None
    from safetensors.torch import load  # torch only here: this module also feeds Ray Data workers

    fs, path = filesystem_for(uri)
    fpath = posixpath.join(path, manifest.text.get("empty_caption", EMPTY_CAPTION_NAME))
    if fs.get_file_info(fpath).type != pafs.FileType.File:
        raise VitditError(f"{uri}: the manifest records a text encoder but {fpath} is missing")
    with fs.open_input_stream(fpath) as f:
        try:
            tensors = load(f.read())
        except Exception as e:  # safetensors raises its own SafetensorError on a damaged file
            raise VitditError(f"{fpath}: unreadable ({e})") from e
    text, pooled = tensors.get(TEXT_EMB), tensors.get(POOLED_EMB)
    if text is None or pooled is None:
        raise VitditError(
            f"{fpath}: expected tensors {TEXT_EMB!r} and {POOLED_EMB!r}, found {sorted(tensors)}"
        )
    if tuple(text.shape) != manifest.text_shape or tuple(pooled.shape) != (manifest.pooled_width,):
        raise VitditError(
            f"{fpath}: shapes {tuple(text.shape)} and {tuple(pooled.shape)}, the manifest says "
            f"{manifest.text_shape} and ({manifest.pooled_width},)"
        )
    return text, pooled


def part_paths(uri: str, manifest: Manifest) -> tuple[object, list[str]]:
    """(filesystem, absolute paths of the parts the manifest lists)."""
    fs, path = filesystem_for(uri)
    return fs, [posixpath.join(path, p["path"]) for p in manifest.parts]


def read_latents(
    uri: str,
    expect_vae: VAEIdentity | None = None,
    expect_resolution: int | None = None,
    expect_latent_shape: tuple[int, int, int] | None = None,
    columns: list[str] | None = None,
) -> tuple[ray.data.Dataset, Manifest]:
    """(Ray Dataset of the latent rows, manifest) of the data set at ``uri``.

    ``columns`` reads only those (e.g. ``["label", "mean", "std"]``: ``iter_torch_batches`` cannot
    turn the string ``id`` column into a tensor).

    Raises VitditError when the manifest is missing, DatasetMismatchError when the data set was made
    with another VAE, resolution or latent shape than expected.
    """
    manifest = read_manifest(uri)
    manifest.check_compatible(
        vae=expect_vae, resolution=expect_resolution, latent_shape=expect_latent_shape, where=uri
    )
    if not manifest.parts:
        raise VitditError(f"{uri}: the manifest lists no parts (an empty latent data set)")
    fs, paths = part_paths(uri, manifest)
    missing = [p for p in paths if fs.get_file_info(p).type != pafs.FileType.File]
    if missing:
        raise VitditError(
            f"{uri}: {len(missing)} part(s) listed in the manifest are missing, e.g. {missing[0]}"
        )
    return read_parquet_parts(paths, fs, columns), manifest


def read_parquet_parts(paths: list[str], filesystem, columns: list[str] | None = None) -> ray.data.Dataset:
    """``ray.data.read_parquet`` of known files through Ray's V1 Parquet reader.

    Ray 2.60's default reader (DataSourceV2) starts a pool of FooterReader actors (32 by default)
    on every execution of the data set, to read the files' footers before reading them. On the
    2-CPU test machine, 1,438 latent rows in 2 parts: 4.2-8.6 s per execution with V2, 0.26-0.94 s
    with V1 (``benchmarks/data_start.py``, RESULTS.md). A training run executes its data sets more
    than once (validation, epochs that stream), and the manifest already names every part, so V2's
    listing buys nothing here. V1 reads the same rows in the same order.

    One block per part (``override_num_blocks``), whatever the cluster: left to itself Ray sizes the
    read by the CPUs available at the time (twice their number for small data: 8 blocks for the
    digits' 2 parts on 4 CPUs, 4 on 2). The blocks decide which rows ``streaming_split`` gives which
    training worker, so a run restarted after a node loss, or resumed on a smaller or larger cluster,
    trained on other rows per rank than the run it continues (measured on two loopback nodes: the
    loss at the first logged step after the restart 0.41114 against 0.41162 uninterrupted).
    """
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False  # read_parquet picks the reader when it is called
    try:
        return ray.data.read_parquet(
            paths, filesystem=filesystem, columns=columns, override_num_blocks=len(paths)
        )
    finally:
        ctx.use_datasource_v2 = before


def load_latents_numpy(
    uri: str, expect_vae: VAEIdentity | None = None
) -> tuple[dict[str, np.ndarray], Manifest]:
    """The whole data set as numpy arrays, without Ray (small data sets, tests, quickstart checks).

    Returns ``{"id", "label", "mean", "std"[, "mean_flip", "std_flip"][, "caption"][, "text_emb",
    "pooled_emb"]}`` with N×C×H×W latents, N×L×width and N×width text embeddings.
    """
    manifest = read_manifest(uri)
    manifest.check_compatible(vae=expect_vae, where=uri)
    fs, paths = part_paths(uri, manifest)
    cols = ["id", LABEL, *LATENT_COLUMNS, *(FLIP_COLUMNS if manifest.flips else ())]
    cols += [CAPTION] if manifest.has_captions else []
    shapes = {c: tuple(manifest.latent_shape) for c in (*LATENT_COLUMNS, *FLIP_COLUMNS)}
    if manifest.text is not None:
        cols += [TEXT_EMB, POOLED_EMB]
        shapes.update({TEXT_EMB: manifest.text_shape, POOLED_EMB: (manifest.pooled_width,)})
    out: dict[str, list] = {c: [] for c in cols}
    for p in paths:
        with fs.open_input_file(p) as fh:
            t = pq.read_table(fh)
        for c in cols:
            if c == CAPTION and c not in t.column_names:  # parts written without captions
                out[c].append(np.array([""] * t.num_rows, dtype=object))
                continue
            col = t.column(c).combine_chunks()
            if c in shapes:
                out[c].append(_tensor_column_to_numpy(col, shapes[c]))
            else:
                out[c].append(np.asarray(col.to_pylist() if c in (ID, CAPTION) else col.to_numpy()))
    arrays = {c: np.concatenate(v) if v else np.zeros((0,)) for c, v in out.items()}
    arrays[LABEL] = arrays[LABEL].astype(np.int32)
    return arrays, manifest


def _tensor_column_to_numpy(col, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-shape tensor column → N×shape array, whether or not Ray's extension type is registered."""
    if hasattr(col, "to_numpy") and getattr(col.type, "extension_name", "").startswith("ray.data"):
        return np.asarray(col.to_numpy()).reshape((-1, *shape))
    storage = col.storage if hasattr(col, "storage") else col
    flat = storage.flatten()
    while hasattr(flat, "flatten") and not hasattr(flat.type, "bit_width"):
        flat = flat.flatten()
    return np.asarray(flat.to_numpy(zero_copy_only=False)).reshape((-1, *shape))  # N, *shape


def held_out(row_id: str, fraction: float) -> bool:
    """Whether a row belongs to the validation slice: a stable hash of its id, not its position."""
    h = int.from_bytes(hashlib.blake2b(str(row_id).encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


class SplitById:
    """map_batches: keep the rows on one side of the id-hash split, drop the string id column.

    It lives here, in a module that does not import torch, because Ray Data runs it in its own worker
    processes: a UDF whose module imports torch makes each fresh process spend seconds importing it
    (the first execution of the validation split: 8.0 s that way, 1.3 s torch-free, in
    ``benchmarks/data_start.py``).
    """

    def __init__(self, fraction: float, want_val: bool):
        self.fraction, self.want_val = fraction, want_val

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = np.array([held_out(i, self.fraction) == self.want_val for i in batch[ID]], dtype=bool)
        return {k: v[mask] for k, v in batch.items() if k != ID}


def read_captions(uri: str, manifest: Manifest | None = None) -> list[str]:
    """Every caption of a latent data set, in part order (what a text tower's tokenizer is built from)."""
    manifest = manifest or read_manifest(uri)
    if not manifest.has_captions:
        return []
    fs, paths = part_paths(uri, manifest)
    out: list[str] = []
    for path in paths:
        out.extend(
            str(c) for c in pq.read_table(path, filesystem=fs, columns=[CAPTION]).column(CAPTION).to_pylist()
        )
    return out


class TokenizeCaptions:
    """map_batches: the ``caption`` column → ``input_ids`` (N×L int32) of a caption tokenizer.

    Torch-free, like :class:`SplitById`, for the same reason (fresh Ray Data workers)."""

    def __init__(self, tokenizer_json: str, max_length: int):
        from vitdit.captions import CaptionTokenizer

        self.tokenizer = CaptionTokenizer(tokenizer_json, max_length)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vitdit.captions import INPUT_IDS

        ids, _ = self.tokenizer.ids_numpy([str(c) for c in batch[CAPTION]])
        out = {k: v for k, v in batch.items() if k != CAPTION}
        out[INPUT_IDS] = ids.astype(np.int32)
        return out
