"""The latent data set contract: column names, dtypes and the manifest.

Defined once here and imported by every writer (``pipelines.encode``) and reader
(``pipelines.latents.read_latents``, training, tests). See docs/latent-dataset.md.

Layout of a latent data set directory (or URI prefix)::

    manifest.json              written last: its presence means the data set is complete
    part-*.parquet             one row per image
    quarantine.jsonl           one JSON line per unusable input: {"id", "source", "reason"}
    empty_caption.safetensors  with a text encoder only: the encoding of "" (tensors "text_emb"
                               L x width and "pooled_emb" width, float32), written before the manifest

Format 2 added the ``caption`` column (always written), the optional ``text_emb``/``pooled_emb``
columns and the manifest's ``text``, ``captioned`` and ``uncaptioned``; format 1 manifests still read
(their data sets have no captions: ``uncaptioned`` is their row count).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from vitdit.errors import DatasetMismatchError, VitditError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
EMPTY_CAPTION_NAME = "empty_caption.safetensors"
QUARANTINE_NAME = "quarantine.jsonl"
PART_PREFIX = "part-"

# Columns of part-*.parquet.
ID = "id"  # string: path relative to the root (folder), "<shard>/<__key__>" (tar), id column or "<file>/<row>" (parquet)
LABEL = "label"  # int32; -1 when unlabelled
MEAN = "mean"  # C x H x W posterior mean, storage dtype
STD = "std"  # C x H x W posterior std, storage dtype
MEAN_FLIP = "mean_flip"  # only when the data set has flips
STD_FLIP = "std_flip"
CAPTION = "caption"  # string; "" when the image has none (format 2 on, always present)
TEXT_EMB = "text_emb"  # L x width token embeddings, storage dtype; only with a text encoder
POOLED_EMB = "pooled_emb"  # width pooled embedding, storage dtype; only with a text encoder
LATENT_COLUMNS = (MEAN, STD)
FLIP_COLUMNS = (MEAN_FLIP, STD_FLIP)
TEXT_COLUMNS = (TEXT_EMB, POOLED_EMB)
STORAGE_DTYPES = ("float16", "float32")


@dataclasses.dataclass
class VAEIdentity:
    """What identifies the VAE that made (and must decode) a latent data set."""

    name_or_path: str
    revision: str | None  # hub revision, or None for a local directory
    sha256: str | None  # hash of the weights file(s) for a local directory
    scaling_factor: float
    shift_factor: float | None
    latent_channels: int

    def same_as(self, other: VAEIdentity) -> bool:
        """Same weights: equal hashes when both have one, else equal names and revisions."""
        if self.sha256 and other.sha256:
            return self.sha256 == other.sha256
        return (self.name_or_path, self.revision) == (other.name_or_path, other.revision)


@dataclasses.dataclass
class Manifest:
    """manifest.json of a latent data set."""

    num_rows: int
    latent_shape: tuple[int, int, int]  # C, H, W
    storage_dtype: str
    vae: VAEIdentity
    resolution: int
    class_names: list[str]
    flips: bool
    source_uri: str
    source_fingerprint: str
    num_quarantined: int
    parts: list[dict[str, Any]]  # [{"path": "part-00000.parquet", "num_rows": 123}, ...] relative paths
    vitdit_version: str
    format_version: int = FORMAT_VERSION
    created_at: str | None = None
    # The text encoder whose embeddings the data set holds (None: captions only). Keys: path, kind
    # ("clip" | "t5"), sha256, max_length (L), padding, width, pooled_width, tokens, pooled,
    # empty_caption (file name), num_truncated (captions cut to L tokens).
    text: dict[str, Any] | None = None
    captioned: int = 0  # rows with a non-empty caption
    uncaptioned: int = 0  # rows whose caption is ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_captions(self) -> bool:
        """Whether the parts have the ``caption`` column (format 2 on)."""
        return self.format_version >= 2

    @property
    def text_shape(self) -> tuple[int, int] | None:
        """(L, width) of ``text_emb``, or None without a text encoder."""
        return None if self.text is None else (int(self.text["max_length"]), int(self.text["width"]))

    @property
    def pooled_width(self) -> int | None:
        """Width of ``pooled_emb``, or None without a text encoder."""
        return None if self.text is None else int(self.text["pooled_width"])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise VitditError(f"{where}: not valid JSON ({e})") from e
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            raise VitditError(
                f"{where}: latent data set format version {version!r}, this vitdit reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        if version == 1:  # before captions: every row is uncaptioned
            raw.setdefault("uncaptioned", raw.get("num_rows", 0))
        try:
            raw["vae"] = VAEIdentity(**raw["vae"])
            raw["latent_shape"] = tuple(raw["latent_shape"])
            return cls(**raw)
        except (KeyError, TypeError) as e:
            raise VitditError(f"{where}: malformed manifest ({e})") from e

    def check_compatible(
        self,
        *,
        vae: VAEIdentity | None = None,
        resolution: int | None = None,
        latent_shape: tuple[int, int, int] | None = None,
        where: str = "latent data set",
    ) -> None:
        """Raise DatasetMismatchError when this data set was made another way than expected."""
        problems = []
        if vae is not None and not self.vae.same_as(vae):
            problems.append(f"made with VAE {self.vae.name_or_path!r}, expected {vae.name_or_path!r}")
        if resolution is not None and self.resolution != resolution:
            problems.append(f"resolution {self.resolution}, expected {resolution}")
        if latent_shape is not None and tuple(self.latent_shape) != tuple(latent_shape):
            problems.append(f"latent shape {tuple(self.latent_shape)}, expected {tuple(latent_shape)}")
        if problems:
            raise DatasetMismatchError(f"{where}: " + "; ".join(problems))
