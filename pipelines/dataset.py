"""An imported image data set on disk: how an import is written, and how it is read back.

An import is a folder holding three files, written by ``DatasetWriter`` and nothing else:

    images.parquet   one row per image (the interchange copy: compressed, any Arrow tool reads it)
    images.arrow     the same rows as an uncompressed Arrow IPC file, for reading
    manifest.json    counts, splits, preprocessing, file checksums; written last

Rows are sorted by split, then class, so every class is one contiguous run of rows and every
split one contiguous run of classes. The Arrow file exists because a Parquet read always decodes
into fresh memory: the IPC file is memory-mapped instead, so any number of workers on a node share
one copy of the pixels in the page cache and an episode copies only its own images.

The manifest is what makes a folder an import: both data files are written under temporary names
and renamed into place, and the manifest is renamed into place after them, so a folder that lacks
it (an import that died half way) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
PARQUET = "images.parquet"
ARROW = "images.arrow"
FORMAT = "orch-images"
FORMAT_VERSION = 1
# Rows per record batch: large enough that a class rarely spans batches, small enough to stream.
BATCH_ROWS = 4096
_OWN_FILES = {MANIFEST, PARQUET, ARROW}
# What the ``alphabet`` column holds, as the manifest counts it: Omniglot's alphabets, or the
# superclasses of CIFAR-100 and tieredImageNet.
GROUPS = ("alphabets", "superclasses")


class DatasetError(ValueError):
    """An image data set, or a file meant to become one, that orch cannot use.

    The message is one line that names the file and what is wrong with it.
    """


# Per-image metadata columns an importer may add after the common ones; the manifest's
# ``extra_columns`` names those an import holds, in this order.
EXTRA_COLUMNS = {
    # CUB-200-2011's bounding_boxes.txt: x, y, width, height in the source image's pixels.
    "bbox": pa.list_(pa.float32(), 4),
    # Width and height of the source image as decoded, before any crop or resize.
    "source_size": pa.list_(pa.int32(), 2),
}


def schema(values_per_image: int, extra_columns: Sequence[str] = ()) -> pa.Schema:
    """Columns of an import; ``pixels`` is ``C*H*W`` uint8 values, row-major ``[C, H, W]``."""
    unknown = [c for c in extra_columns if c not in EXTRA_COLUMNS]
    if unknown:
        raise DatasetError(f"unknown extra column {unknown[0]!r}; known: {', '.join(EXTRA_COLUMNS)}")
    return pa.schema([
        pa.field("pixels", pa.list_(pa.uint8(), values_per_image), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        # The level above the class: Omniglot's alphabet, the superclass of CIFAR-100 classes
        # and of tieredImageNet's; null for data sets without one.
        pa.field("alphabet", pa.string()),
        pa.field("split", pa.string(), nullable=False),
        # Where the image came from ("archive.zip:member" or a file path), and its sha256.
        pa.field("source", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        *[pa.field(name, EXTRA_COLUMNS[name]) for name in extra_columns],
    ])


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- writing ------------------------------------------------------------------------------------


class DatasetWriter:
    """Streams rows into an import folder; ``finish`` makes it complete, ``abort`` leaves no trace.

    Use it as a context manager: an exception inside the block removes the partial files, and an
    existing import in ``out`` is only replaced by ``finish``.
    """

    def __init__(self, out: Path, *, channels: int, size: int, overwrite: bool = False,
                 extra_columns: Sequence[str] = ()):
        self.out = Path(out)
        self.shape = (channels, size, size)
        self.schema = schema(channels * size * size, extra_columns)
        check_target(self.out, overwrite=overwrite)
        self._created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self._partial = {name: self.out / f".{name}.partial" for name in (PARQUET, ARROW)}
        self._parquet = pq.ParquetWriter(self._partial[PARQUET], self.schema, compression="zstd")
        self._arrow = pa.ipc.new_file(str(self._partial[ARROW]), self.schema)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0
        self._closed = False

    def add_rows(self, rows: pa.Table) -> None:
        """Append rows (already in the import's schema); written in record batches of at least
        ``BATCH_ROWS`` rows, so the files do not depend on how the rows were handed in."""
        if not rows.schema.equals(self.schema):
            raise ValueError(f"rows have columns {rows.schema.names}, expected {self.schema.names}")
        self._pending.append(rows)
        self._pending_rows += rows.num_rows
        if self._pending_rows >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending).combine_chunks()
        for batch in table.to_batches():
            self._parquet.write_batch(batch)
            self._arrow.write_batch(batch)
        self.rows += table.num_rows
        self._pending, self._pending_rows = [], 0

    def finish(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Close the data files, move them into place, then write the manifest (last)."""
        self._flush()
        self._close()
        files = {}
        for name, partial in self._partial.items():
            files[name] = {"bytes": partial.stat().st_size, "sha256": sha256_file(partial),
                           "rows": self.rows}
        complete = {"format": FORMAT, "version": FORMAT_VERSION, **manifest,
                    "shape": list(self.shape), "files": files}
        # An old import in this folder stops being valid the moment its data files are replaced.
        (self.out / MANIFEST).unlink(missing_ok=True)
        for name, partial in self._partial.items():
            os.replace(partial, self.out / name)
        staged = self.out / f".{MANIFEST}.partial"
        staged.write_text(json.dumps(complete, indent=2, sort_keys=False) + "\n")
        with open(staged, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, self.out / MANIFEST)
        return complete

    def abort(self) -> None:
        self._close()
        for partial in self._partial.values():
            partial.unlink(missing_ok=True)
        if self._created and not any(self.out.iterdir()):
            self.out.rmdir()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._parquet.close()
            self._arrow.close()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()
        else:
            self._close()


def check_target(out: Path, *, overwrite: bool) -> None:
    """Refuse ``out`` unless it is absent, empty, or an import (replaced only with ``overwrite``);
    files named ``*.partial`` are an unfinished import's and allowed."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder; choose another --out")
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    foreign = sorted(n for n in names if n not in _OWN_FILES and not n.endswith(".partial"))
    if foreign:
        raise DatasetError(f"{out}: folder holds other files ({', '.join(foreign[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}); import into an empty folder")
    if MANIFEST in names and not overwrite:
        raise DatasetError(f"{out}: already holds an import; pass --overwrite to replace it")


# -- reading ------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the import in ``path``; refuses folders that are not complete imports."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: no such folder; create it with `orch data import ...`")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        partial = any(p.name.endswith(".partial") or p.name in _OWN_FILES for p in path.iterdir())
        what = "an unfinished import (no manifest.json)" if partial else "no manifest.json"
        raise DatasetError(f"{path}: {what}; not a complete orch import, run `orch data import ...`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise DatasetError(f"{manifest_path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{manifest_path}: not an orch image manifest (format != {FORMAT!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{manifest_path}: format version {manifest.get('version')!r}, this orch "
                           f"reads version {FORMAT_VERSION}; re-import the data")
    return manifest


def check_files(path: Path, manifest: Mapping[str, Any]) -> None:
    """Cheap integrity checks run at every open: sizes, Parquet footer, row counts."""
    for name in (PARQUET, ARROW):
        expected = manifest["files"][name]
        file = path / name
        if not file.exists():
            raise DatasetError(f"{file}: missing; the import is incomplete, re-run `orch data import`")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise DatasetError(f"{file}: {size} bytes, the manifest says {expected['bytes']} "
                               "(truncated or modified); re-run `orch data import`")
    parquet = path / PARQUET
    try:
        rows = pq.ParquetFile(parquet).metadata.num_rows
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"{parquet}: not a readable Parquet file ({_one_line(error)})") from None
    if rows != manifest["files"][PARQUET]["rows"]:
        raise DatasetError(f"{parquet}: {rows} rows, the manifest says "
                           f"{manifest['files'][PARQUET]['rows']}")


def verify(path: Path, manifest: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Full check: every data file's sha256 against the manifest, and a full Parquet decode."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    check_files(path, manifest)
    for name in (PARQUET, ARROW):
        actual = sha256_file(path / name)
        if actual != manifest["files"][name]["sha256"]:
            raise DatasetError(f"{path / name}: sha256 {actual[:12]}... does not match the "
                               f"manifest's {manifest['files'][name]['sha256'][:12]}...; re-import")
    try:
        pq.read_table(path / PARQUET, columns=["class_id"])
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"{path / PARQUET}: not a readable Parquet file ({_one_line(error)})") from None
    return {name: manifest["files"][name]["sha256"] for name in (PARQUET, ARROW)}


@dataclass
class ImageDataset:
    """An import opened for sampling: pixels memory-mapped, classes indexed by row range."""

    path: Path
    manifest: dict[str, Any]
    # Row ranges of each class id: rows class_start[c] .. class_start[c] + class_count[c].
    class_start: np.ndarray
    class_count: np.ndarray
    # Class ids of each split (contiguous, ascending).
    split_classes: dict[str, np.ndarray]
    _chunks: list[np.ndarray]
    _offsets: np.ndarray
    _mmap: Any

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["shape"])  # type: ignore[return-value]

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.manifest["preprocessing"])

    def pixels(self, rows: np.ndarray) -> np.ndarray:
        """uint8 ``[len(rows), C, H, W]``: copies only the requested rows out of the mapping."""
        out = np.empty((len(rows), *self.shape), dtype=np.uint8)
        chunk = np.searchsorted(self._offsets, rows, side="right") - 1
        for c in np.unique(chunk):
            selected = chunk == c
            out[selected] = self._chunks[c][rows[selected] - self._offsets[c]]
        return out


def open_dataset(path: str | os.PathLike[str], *, verify_checksums: bool = False) -> ImageDataset:
    """Open the import in ``path`` for reading; ``DatasetError`` if it is not complete and intact."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify_checksums:
        verify(path, manifest)
    else:
        check_files(path, manifest)
    arrow = path / ARROW
    try:
        mapping = pa.memory_map(str(arrow), "r")
        reader = pa.ipc.open_file(mapping)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"{arrow}: not a readable Arrow file ({_one_line(error)})") from None
    expected = schema(int(np.prod(manifest["shape"])), manifest.get("extra_columns", ()))
    if not reader.schema.equals(expected):
        raise DatasetError(f"{arrow}: columns do not match the manifest's image shape "
                           f"{manifest['shape']}; re-import")
    shape = tuple(manifest["shape"])
    chunks = [b.column("pixels").flatten().to_numpy(zero_copy_only=True).reshape(-1, *shape)
              for b in batches]
    counts = [len(b) for b in batches]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = int(offsets[-1])
    if rows != manifest["files"][ARROW]["rows"]:
        raise DatasetError(f"{arrow}: {rows} rows, the manifest says {manifest['files'][ARROW]['rows']}")
    if not batches:
        raise DatasetError(f"{arrow}: holds no images; re-import")
    class_ids = np.concatenate([b.column("class_id").to_numpy() for b in batches])
    if np.any(np.diff(class_ids) < 0):
        raise DatasetError(f"{arrow}: rows are not sorted by class; re-import")
    class_count = np.bincount(class_ids, minlength=manifest["classes"]).astype(np.int64)
    class_start = np.concatenate([[0], np.cumsum(class_count)[:-1]]).astype(np.int64)
    split_classes = {}
    for split, info in manifest["splits"].items():
        low, high = info["class_ids"]
        split_classes[split] = np.arange(low, high, dtype=np.int64)
    return ImageDataset(path, manifest, class_start, class_count, split_classes, chunks,
                        offsets[:-1], mapping)


def summary(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What ``orch data info --json`` prints: counts overall and per split, preprocessing, files."""
    out: dict[str, Any] = {"kind": manifest["kind"]}
    for group in GROUPS:
        if manifest.get(group) is not None:
            out[group] = manifest[group]
    out.update({"classes": manifest["classes"], "images": manifest["images"],
                "shape": manifest["shape"], "splits": {}})
    for split, info in manifest["splits"].items():
        entry = {"classes": info["classes"], "images": info["images"]}
        for group in GROUPS:
            if info.get(group) is not None:
                entry[group] = info[group]
        out["splits"][split] = entry
    for optional in ("crop", "extra_columns"):
        if manifest.get(optional):
            out[optional] = manifest[optional]
    out.update({"split_rule": manifest["split_rule"], "preprocessing": manifest["preprocessing"],
                "duplicates_skipped": manifest.get("duplicates_skipped", 0),
                "sources": manifest.get("sources", []),
                "files": {name: dict(info) for name, info in manifest["files"].items()}})
    return out


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
