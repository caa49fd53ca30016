"""The latent data set contract: column names, dtypes and the manifest.

Defined once here and imported by every writer (``pipelines.encode``) and reader
(``pipelines.latents.read_latents``, training, tests). See DESIGN.md, "Latent dataset".

Layout of a latent data set directory (or URI prefix)::

    manifest.json        written last: its presence means the data set is complete
    part-*.parquet       one row per image
    quarantine.jsonl     one JSON line per unusable input: {"id", "source", "reason"}
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from vitdit.errors import DatasetMismatchError, VitditError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.jsonl"
PART_PREFIX = "part-"

# Columns of part-*.parquet.
ID = "id"  # string: path relative to the root (folder), "<shard>/<__key__>" (tar), id column or "<file>/<row>" (parquet)
LABEL = "label"  # int32; -1 when unlabelled
MEAN = "mean"  # C x H x W posterior mean, storage dtype
STD = "std"  # C x H x W posterior std, storage dtype
MEAN_FLIP = "mean_flip"  # only when the data set has flips
STD_FLIP = "std_flip"
LATENT_COLUMNS = (MEAN, STD)
FLIP_COLUMNS = (MEAN_FLIP, STD_FLIP)
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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise VitditError(f"{where}: not valid JSON ({e})") from e
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise VitditError(
                f"{where}: latent data set format version {version!r}, this vitdit reads {FORMAT_VERSION}"
            )
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
