"""Ray Data image sources: ImageFolder trees, webdataset tar shards and parquet files of bytes.

Every source is first *listed* on the driver, in sorted order, into numbered ``Chunk``s: runs of
``part_size`` files of a folder, one tar shard, or one parquet row group. The listing fixes each
image's ``id`` and the chunk it belongs to, so an encode job can write one output part per chunk and
skip finished chunks on a re-run (exactly-once output, docs/design.md). The Ray Dataset then reads the
chunks in parallel (one read task per chunk) into rows ``id`` (str), ``label`` (int32, -1 when
unlabelled), ``bytes`` (binary) and ``chunk`` (int64), and ``caption`` (str, "" when the image has
none) when asked for.

Captions follow each format's convention: a sidecar ``<stem>.txt`` beside the image in a folder
(``cat.png`` → ``cat.txt``; ``.txt`` files are never images, and one without an image is ignored);
a ``<key>.txt`` member, else a ``<key>.json`` member's ``"caption"`` string, in a webdataset tar;
a string column in parquet (``caption_column``; by default a column named ``caption`` when a file
has one). Captions are read by the read tasks, not the listing, and stripped of surrounding
whitespace. A caption file that cannot be read or decoded quarantines its image with the reason: a
wrong caption is worse than none.

Reading never fails on one bad file: unreadable members reach ``Preprocess`` as empty bytes and
are quarantined there with a reason (``error`` column), as Ray's ``read_images`` cannot do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines import storage
from vitdit.errors import VitditError
from vitdit.latents import CAPTION
from vitdit.preprocess import DEFAULT_MAX_PIXELS, BadImageError, preprocess_bytes

FORMATS = ("auto", "folder", "webdataset", "parquet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
DEFAULT_PART_SIZE = 1000
CAPTION_EXTENSION = ".txt"  # folder sidecars and tar members; tars also take a .json "caption"
DEFAULT_CAPTION_COLUMN = "caption"

# Columns of the rows that sources and Preprocess produce.
ID, LABEL, BYTES, CHUNK, IMAGE, IMAGE_FLIP, ERROR = (
    "id",
    "label",
    "bytes",
    "chunk",
    "image",
    "image_flip",
    "error",
)


@dataclasses.dataclass
class Chunk:
    """One unit of reading and of output: its images' ids are fixed by the sorted listing."""

    index: int
    kind: str  # "files" | "tar" | "parquet"
    path: str  # the tar or parquet file (filesystem path); "" for "files"
    ids: list[str]
    labels: list[int]
    members: list[str]  # files: file paths; tar: image member names; parquet: unused
    row_group: int = -1  # parquet only
    image_column: str = "image"
    # files and tar: the caption file / member of each image ("" for none); parquet: unused
    captions: list[str] = dataclasses.field(default_factory=list)
    caption_column: str | None = None  # parquet only: the column holding this row group's captions

    @property
    def num_images(self) -> int:
        return len(self.ids)


@dataclasses.dataclass
class ImageSource:
    """A listed image source: its chunks, class names and fingerprint; ``dataset`` reads it."""

    uri: str
    format: str
    class_names: list[str]
    fingerprint: str
    chunks: list[Chunk]
    filesystem: Any  # pyarrow FileSystem

    @property
    def num_images(self) -> int:
        return sum(c.num_images for c in self.chunks)

    @property
    def dataset(self) -> ray.data.Dataset:
        """All images as a Ray Dataset of rows ``id``, ``label``, ``bytes``, ``chunk``."""
        return self.dataset_for(self.chunks)

    def dataset_for(self, chunks: list[Chunk], captions: bool = False) -> ray.data.Dataset:
        """The images of ``chunks`` only (e.g. the unfinished ones of a resumed job).

        ``captions`` adds the ``caption`` column (off by default: image-only training would pay one
        more read per image of a folder with sidecars).
        """
        if not chunks:
            raise VitditError(f"{self.uri}: no images to read")
        items = [{"chunk": dataclasses.asdict(c)} for c in chunks]
        # One block per chunk so chunks are read by parallel tasks.
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        return ds.flat_map(_ChunkReader(self.filesystem, captions=captions))


# ---------------------------------------------------------------------------------------------
# Listing (driver side)


def filesystem_for(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI such as s3://bucket/key.

    One place resolves every filesystem (``storage.filesystem``): S3 there gets bounded timeouts
    and the endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (docs/object-storage.md).
    """
    return storage.filesystem(uri)


def _info(fs, path: str, uri: str | None = None):
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise VitditError(f"{uri or path}: cannot read ({storage.storage_error(e)})") from e


def _not_found(fs, path: str, uri: str) -> VitditError:
    """The error for a missing input: a missing bucket says so (pyarrow reports it as NotFound)."""
    storage.check_bucket(fs, path, uri)
    return VitditError(f"{uri}: no such file or directory")


def resolve_splits(root_uri: str) -> tuple[str, str | None]:
    """``(<root>/train, <root>/val)`` when ``<root>/train`` exists (val only if it exists too),
    else ``(root, None)``: every stage trains on train/ and validates on val/ (docs/design.md)."""
    fs, path = filesystem_for(root_uri)
    if _info(fs, path, root_uri).type == pafs.FileType.NotFound:
        raise _not_found(fs, path, root_uri)
    base = root_uri.rstrip("/")
    if _info(fs, posixpath.join(path, "train")).type == pafs.FileType.Directory:
        has_val = _info(fs, posixpath.join(path, "val")).type == pafs.FileType.Directory
        return f"{base}/train", (f"{base}/val" if has_val else None)
    return root_uri, None


def _list_files(fs, path: str) -> list[pafs.FileInfo]:
    """Every regular, non-hidden file under ``path``, sorted by path."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        raise VitditError(f"{path}: cannot list ({storage.storage_error(e)})") from e
    out = []
    for i in infos:
        rel = posixpath.relpath(i.path, path)
        if i.type == pafs.FileType.File and not any(p.startswith((".", "_")) for p in rel.split("/")):
            out.append(i)
    return sorted(out, key=lambda i: i.path)


def _detect_format(files: list[pafs.FileInfo]) -> str:
    exts = {posixpath.splitext(f.path)[1].lower() for f in files}
    if ".tar" in exts:
        return "webdataset"
    if ".parquet" in exts:
        return "parquet"
    return "folder"


def _fingerprint(fmt: str, entries: list[tuple[str, int]], extra: dict) -> str:
    """sha256 of the sorted (relative path, size) listing and the reading options.

    Sizes, not mtimes: re-exporting identical files must not look like a new source.
    """
    h = hashlib.sha256(json.dumps({"format": fmt, **extra}, sort_keys=True).encode())
    for rel, size in entries:
        h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()


def _list_folder(fs, root: str, files: list[pafs.FileInfo], part_size: int) -> tuple[list[Chunk], list[str]]:
    rels = [posixpath.relpath(f.path, root) for f in files]
    # Class names come from every file, sidecars included, as before captions existed: an old data
    # set's labels do not move.
    class_dirs = sorted({r.split("/", 1)[0] for r in rels if "/" in r})
    # A .txt file is a caption, never an image: the ids of the images do not change when sidecars
    # are added beside them.
    sidecars = {posixpath.splitext(f.path)[0]: f.path for f in files if _is_caption_file(f.path)}
    pairs = [(r, f) for r, f in zip(rels, files) if not _is_caption_file(f.path)]
    if class_dirs:
        # Files beside the class folders (a README, a LICENSE) belong to no class: skipped.
        keep = [(r, f) for r, f in pairs if "/" in r]
        index = {c: i for i, c in enumerate(class_dirs)}
        labels = [index[r.split("/", 1)[0]] for r, _ in keep]
    else:
        keep = pairs
        labels = [-1] * len(keep)
    captions = [sidecars.get(posixpath.splitext(f.path)[0], "") for _, f in keep]
    chunks = []
    for start in range(0, len(keep), part_size):
        sl = slice(start, start + part_size)
        chunks.append(
            Chunk(
                index=len(chunks),
                kind="files",
                path="",
                ids=[r for r, _ in keep[sl]],
                labels=labels[sl],
                members=[f.path for _, f in keep[sl]],
                captions=captions[sl],
            )
        )
    return chunks, class_dirs


def _is_caption_file(path: str) -> bool:
    return path.lower().endswith(CAPTION_EXTENSION)


def _read_cls(data: bytes) -> int:
    try:
        return int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return -1


def _list_tar(fs, path: str) -> tuple[list[str], list[str], list[int], list[str]]:
    """(keys, image member names, labels, caption member names or "") of one webdataset shard,
    in member order. A key's ``.txt`` member is its caption, else its ``.json`` member's."""
    images: dict[str, str] = {}
    labels: dict[str, int] = {}
    texts: dict[str, str] = {}
    jsons: dict[str, str] = {}
    order: list[str] = []
    try:
        with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = m.name.removeprefix("./")
                base = posixpath.basename(name)
                if base.startswith("."):
                    continue
                # webdataset: the key is everything before the first dot of the basename.
                dot = base.find(".")
                if dot <= 0:
                    continue
                key = posixpath.join(posixpath.dirname(name), base[:dot])
                ext = base[dot:].lower()
                if ext in IMAGE_EXTENSIONS and key not in images:
                    images[key] = m.name
                    order.append(key)
                elif ext == ".cls":
                    f = tar.extractfile(m)
                    labels[key] = _read_cls(f.read() if f else b"")
                elif ext == CAPTION_EXTENSION:
                    texts.setdefault(key, m.name)
                elif ext == ".json":
                    jsons.setdefault(key, m.name)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise VitditError(f"{path}: unreadable tar shard ({e})") from e
    captions = [texts.get(k) or jsons.get(k, "") for k in order]
    return order, [images[k] for k in order], [labels.get(k, -1) for k in order], captions


def _list_webdataset(fs, root: str, files: list[pafs.FileInfo]) -> tuple[list[Chunk], list[str]]:
    tars = [f for f in files if f.path.lower().endswith(".tar")]
    with ThreadPoolExecutor(max_workers=8) as pool:  # I/O bound, object stores like parallel reads
        listed = list(pool.map(lambda f: _list_tar(fs, f.path), tars))
    chunks = []
    for f, (keys, members, labels, captions) in zip(tars, listed):
        if not keys:
            continue
        shard = posixpath.relpath(f.path, root)[: -len(".tar")]
        chunks.append(
            Chunk(
                index=len(chunks),
                kind="tar",
                path=f.path,
                ids=[f"{shard}/{k}" for k in keys],
                labels=labels,
                members=members,
                captions=captions,
            )
        )
    top = max((max(c.labels) for c in chunks), default=-1)
    return chunks, [str(i) for i in range(top + 1)]


def _list_parquet(
    fs,
    root: str,
    files: list[pafs.FileInfo],
    image_column: str,
    label_column: str | None,
    id_column: str | None,
    caption_column: str | None = None,
) -> tuple[list[Chunk], list[str]]:
    pfiles = [f for f in files if f.path.lower().endswith(".parquet")]
    raw_labels: list[tuple[int, int, list]] = []  # (file index, row group, labels)
    chunks: list[Chunk] = []
    for f in pfiles:
        rel = posixpath.relpath(f.path, root)
        try:
            with fs.open_input_file(f.path) as fh:
                pf = pq.ParquetFile(fh)
                names = pf.schema_arrow.names
                if image_column not in names:
                    raise VitditError(f"{f.path}: no image column {image_column!r} (columns: {names})")
                for col in (label_column, id_column, caption_column):
                    if col and col not in names:
                        hint = "; pass --label-column '' for unlabelled data" if col == label_column else ""
                        raise VitditError(f"{f.path}: no column {col!r} (columns: {names}){hint}")
                captions = caption_column or (
                    DEFAULT_CAPTION_COLUMN
                    if caption_column is None and DEFAULT_CAPTION_COLUMN in names
                    else None
                )
                if captions:
                    ctype = pf.schema_arrow.field(captions).type
                    if not (
                        pa.types.is_string(ctype)
                        or pa.types.is_large_string(ctype)
                        or pa.types.is_null(ctype)
                    ):
                        raise VitditError(
                            f"{f.path}: caption column {captions!r} holds {ctype}, expected strings"
                            + ("; pass --caption-column '' to ignore it" if caption_column is None else "")
                        )
                row = 0
                for g in range(pf.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    cols = [c for c in (label_column, id_column) if c and c in names]
                    t = pf.read_row_group(g, columns=cols) if cols else None
                    if id_column:
                        ids = [str(v) for v in t.column(id_column).to_pylist()]
                    else:
                        ids = [f"{rel}/{row + i}" for i in range(n)]
                    labels = (
                        t.column(label_column).to_pylist() if label_column and label_column in names else None
                    )
                    raw_labels.append((len(chunks), g, labels or [None] * n))
                    chunks.append(
                        Chunk(
                            index=len(chunks),
                            kind="parquet",
                            path=f.path,
                            ids=ids,
                            labels=[],
                            members=[],
                            row_group=g,
                            image_column=image_column,
                            caption_column=captions,
                        )
                    )
                    row += n
        except VitditError:
            raise
        except (OSError, ValueError) as e:
            raise VitditError(f"{f.path}: unreadable parquet file ({e})") from e
    # Integer labels are class indices; string labels become indices into their sorted names.
    values = [v for _, _, ls in raw_labels for v in ls if v is not None]
    if values and all(isinstance(v, str) for v in values):
        class_names = sorted(set(values))
        index = {c: i for i, c in enumerate(class_names)}
        to_int = lambda v: -1 if v is None else index[v]
    else:
        try:
            top = max((int(v) for v in values), default=-1)
        except (TypeError, ValueError) as e:
            raise VitditError(f"column {label_column!r}: labels must be all integers or all strings") from e
        class_names = [str(i) for i in range(top + 1)]
        to_int = lambda v: -1 if v is None else int(v)
    for ci, _, ls in raw_labels:
        chunks[ci].labels = [to_int(v) for v in ls]
    return chunks, class_names


def read_image_source(
    uri: str,
    format: str = "auto",
    image_column: str = "image",
    label_column: str | None = "label",
    id_column: str | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    caption_column: str | None = None,
) -> ImageSource:
    """List an image source (folder, webdataset tars or parquet; local path or pyarrow URI).

    ``part_size`` images of a folder form one chunk (one output part of an encode job); a tar shard
    or a parquet row group is one chunk. ``caption_column`` (parquet): None takes a column named
    ``caption`` where a file has one, "" takes none, another name must exist in every file. Raises
    VitditError naming ``uri`` when it is missing, empty, or malformed (duplicate ids, missing columns).
    """
    if format not in FORMATS:
        raise VitditError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if part_size < 1:
        raise VitditError(f"--part-size {part_size}: must be at least 1")
    fs, path = filesystem_for(uri)
    info = _info(fs, path, uri)
    if info.type == pafs.FileType.NotFound:
        raise _not_found(fs, path, uri)
    if info.type == pafs.FileType.File:
        root, files = posixpath.dirname(path), [info]
    else:
        root, files = path, _list_files(fs, path)
    if not files:
        raise VitditError(f"{uri}: no files found")
    fmt = _detect_format(files) if format == "auto" else format
    if fmt == "folder":
        if info.type == pafs.FileType.File:
            raise VitditError(f"{uri}: a single file is not an image folder; pass its directory")
        chunks, class_names = _list_folder(fs, root, files, part_size)
        extra: dict = {}
    elif fmt == "webdataset":
        chunks, class_names = _list_webdataset(fs, root, files)
        extra = {}
    else:
        chunks, class_names = _list_parquet(
            fs, root, files, image_column, label_column, id_column, caption_column
        )
        extra = {"image_column": image_column, "label_column": label_column, "id_column": id_column}
        if caption_column is not None:  # only when set: the fingerprints of older sources stay as they were
            extra["caption_column"] = caption_column
    if not chunks or not any(c.ids for c in chunks):
        raise VitditError(f"{uri}: no images found (format {fmt})")
    seen: set[str] = set()
    for c in chunks:
        for i in c.ids:
            if i in seen:
                raise VitditError(f"{uri}: duplicate image id {i!r}; ids must be unique")
            seen.add(i)
    entries = [(posixpath.relpath(f.path, root), f.size or 0) for f in files]
    return ImageSource(
        uri=uri if storage.is_uri(uri) else os.path.abspath(os.path.expanduser(uri)),
        format=fmt,
        class_names=class_names,
        fingerprint=_fingerprint(fmt, entries, extra),
        chunks=chunks,
        filesystem=fs,
    )


# ---------------------------------------------------------------------------------------------
# Reading (Ray tasks)


class _ChunkReader:
    """flat_map UDF: one chunk descriptor → its rows ``id``, ``label``, ``bytes``, ``chunk``
    (+ ``caption`` when ``captions``).

    A file that cannot be read yields empty bytes and its read error in ``error``, so Preprocess
    quarantines it with the real reason instead of failing the task. So does an unreadable caption.
    """

    def __init__(self, filesystem, captions: bool = False):
        self.fs = filesystem
        self.captions = captions

    def __call__(self, item: dict) -> Iterator[dict]:
        c = Chunk(**item["chunk"])
        if c.kind == "files":
            caption_files = c.captions or [""] * len(c.ids)
            for id_, label, path, cap_path in zip(c.ids, c.labels, c.members, caption_files):
                data, err = self._read_file(path)
                caption, cap_err = self._read_caption_file(cap_path) if self.captions else (None, "")
                yield self._row(id_, label, c.index, data, err or cap_err, caption)
        elif c.kind == "tar":
            yield from self._read_tar(c)
        else:
            yield from self._read_parquet(c)

    def _row(self, id_: str, label: int, chunk: int, data: bytes, err: str, caption: str | None) -> dict:
        row = _row(id_, label, chunk, data, err)
        if self.captions:
            row[CAPTION] = caption or ""
        return row

    def _read_file(self, path: str) -> tuple[bytes, str]:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read(), ""
        except OSError as e:
            return b"", f"unreadable file: {e}"

    def _read_caption_file(self, path: str) -> tuple[str, str]:
        if not path:
            return "", ""
        data, err = self._read_file(path)
        if err:
            return "", f"caption {path}: {err}"
        return _decode_caption(data, path, json_member=False)

    def _read_tar(self, c: Chunk) -> Iterator[dict]:
        wanted = dict(zip(c.members, range(len(c.members))))
        caption_of = {m: i for i, m in enumerate(c.captions) if m} if self.captions else {}
        found: dict[int, bytes] = {}
        found_captions: dict[int, bytes] = {}
        err = ""
        try:
            with self.fs.open_input_stream(c.path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                for m in tar:
                    i = wanted.get(m.name)
                    if i is not None and i not in found:
                        f = tar.extractfile(m)
                        found[i] = f.read() if f else b""
                    j = caption_of.get(m.name)
                    if j is not None and j not in found_captions:
                        f = tar.extractfile(m)
                        found_captions[j] = f.read() if f else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            err = f"unreadable tar member: {e}"
        for i, (id_, label) in enumerate(zip(c.ids, c.labels)):
            caption, cap_err = None, ""
            if self.captions and c.captions and c.captions[i]:
                member = c.captions[i]
                if i in found_captions:
                    where = f"{c.path}#{member}"
                    caption, cap_err = _decode_caption(found_captions[i], where, member.endswith(".json"))
                else:
                    cap_err = err or f"caption member {member} missing"
            if i in found:
                yield self._row(id_, label, c.index, found[i], cap_err, caption)
            else:
                yield self._row(id_, label, c.index, b"", err or "tar member missing", caption)

    def _read_parquet(self, c: Chunk) -> Iterator[dict]:
        cols = [c.image_column]
        if self.captions and c.caption_column:
            cols.append(c.caption_column)
        try:
            with self.fs.open_input_file(c.path) as fh:
                t = pq.ParquetFile(fh).read_row_group(c.row_group, columns=cols)
            values = t.column(c.image_column).to_pylist()
            captions = t.column(c.caption_column).to_pylist() if len(cols) > 1 else [None] * len(c.ids)
        except (OSError, ValueError) as e:
            values, err = [None] * len(c.ids), f"unreadable parquet row group: {e}"
            captions = [None] * len(c.ids)
        else:
            err = ""
        for id_, label, v, caption in zip(c.ids, c.labels, values, captions):
            if isinstance(v, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
                v = v.get("bytes")
            caption = caption.strip() if caption else ""
            if v is None:
                yield self._row(id_, label, c.index, b"", err or "no image bytes (null)", caption)
            else:
                yield self._row(id_, label, c.index, bytes(v), "", caption)


def _decode_caption(data: bytes, where: str, json_member: bool) -> tuple[str, str]:
    """(caption, error) of a caption file's bytes: UTF-8 text, or JSON with a "caption" string."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return "", f"caption {where}: not UTF-8 text ({e.reason} at byte {e.start})"
    if not json_member:
        return text.strip(), ""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        return "", f"caption {where}: not valid JSON ({e.msg} at line {e.lineno})"
    caption = meta.get("caption") if isinstance(meta, dict) else None
    if caption is None:
        return "", ""  # metadata without a caption: an uncaptioned image
    if not isinstance(caption, str):
        return "", f'caption {where}: "caption" is a {type(caption).__name__}, expected a string'
    return caption.strip(), ""


def _row(id_: str, label: int, chunk: int, data: bytes, read_error: str) -> dict:
    # A read error travels in ERROR so Preprocess quarantines the row with the real reason.
    return {ID: id_, LABEL: np.int32(label), BYTES: data, CHUNK: np.int64(chunk), ERROR: read_error}


# ---------------------------------------------------------------------------------------------
# Preprocessing (Ray tasks; a plain callable, unit-tested without Ray)


class Preprocess:
    """map_batches UDF: rows with ``bytes`` → ``image`` uint8 N×R×R×3 (+ ``image_flip``).

    Bad rows are kept with a zero image and a non-empty ``error`` (the quarantine reason), so one
    bad file never fails a batch; ``split_errors`` separates them. Other columns pass through.
    """

    def __init__(self, resolution: int, flip: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS):
        if resolution <= 0:
            raise VitditError(f"--resolution {resolution}: must be positive")
        self.resolution = resolution
        self.flip = flip
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = batch[BYTES]
        n = len(data)
        r = self.resolution
        images = np.zeros((n, r, r, 3), dtype=np.uint8)
        prior = batch.get(ERROR)
        errors = np.array(["" if prior is None else str(prior[i]) for i in range(n)], dtype=object)
        for i in range(n):
            if errors[i]:
                continue
            try:
                images[i] = preprocess_bytes(bytes(data[i]), r, max_pixels=self.max_pixels)
            except BadImageError as e:
                errors[i] = e.reason
        out = {k: v for k, v in batch.items() if k not in (BYTES, ERROR)}
        out[IMAGE] = images
        if self.flip:
            out[IMAGE_FLIP] = np.ascontiguousarray(images[:, :, ::-1])  # N, H, W, C: mirror W
        out[ERROR] = errors
        if LABEL in out:
            out[LABEL] = np.asarray(out[LABEL], dtype=np.int32)
        return out


def split_errors(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(good rows, bad rows) of a batch with an ``error`` column (empty string = good)."""
    bad = np.array([bool(e) for e in batch[ERROR]], dtype=bool)
    return {k: v[~bad] for k, v in batch.items()}, {k: v[bad] for k, v in batch.items()}


def preprocess_good_rows(batch: dict, resolution: int) -> dict:
    """Ray Data UDF of the ViT and VAE trainers: decode → RGB → ADM centre crop → resize; rows that
    fail are dropped (``vitdit encode`` is where they are quarantined and named)."""
    good, _bad = split_errors(Preprocess(resolution)(batch))
    return {IMAGE: good[IMAGE], LABEL: good[LABEL]}
