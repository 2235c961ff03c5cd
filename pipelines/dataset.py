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

An import is read from a local folder or from a copy of that folder behind any ``pyarrow.fs``
URI (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``, ``file://...``), so that every node of
a cluster reads the same import without a shared disk. The manifest and the checks read the URI
in place; the Arrow file is copied once per node into a local cache, checked against the
manifest's digest, and memory-mapped from there as a local one is (``local_arrow_file``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from filelock import FileLock

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


# -- reading ----------------------------------------------------------------------------------


# Where imports read through a URI are copied to on each node (one file per import, named by its
# digest); default ~/.cache/orch/imports.
CACHE_ENV = "ORCH_DATA_CACHE"


def is_uri(where: str | os.PathLike[str]) -> bool:
    """True for a ``pyarrow.fs`` URI (``s3://...``, ``gs://...``, ``hdfs://...``, ``file://...``),
    False for a local path."""
    return "://" in str(where)


@dataclass(frozen=True)
class Location:
    """Where an import lives: a local folder, or a folder (an object prefix) behind a
    ``pyarrow.fs`` URI. Every read of an import goes through ``fs``, so a bucket and a local
    disk are read by the same code."""

    given: str  # as the user wrote it: the sweep file's data.path, --data
    fs: pafs.FileSystem
    root: str  # the folder inside ``fs``

    @property
    def local(self) -> bool:
        """True where the files are on this machine's disk (a path or a ``file://`` URI)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, name: str) -> str:
        """``name``'s path inside ``fs``."""
        return f"{self.root}/{name}"

    def show(self, name: str | None = None) -> str:
        """The folder (or ``name`` inside it) for messages: a URI without its query options."""
        base = self.given.split("?", 1)[0].rstrip("/") if is_uri(self.given) else self.given
        if name is None:
            return base
        return f"{base}/{name}" if is_uri(self.given) else str(Path(base) / name)

    def __str__(self) -> str:
        return self.show()


def locate(where: str | os.PathLike[str] | Location) -> Location:
    """The import folder at a local path or a ``pyarrow.fs`` URI, with options as
    ``pyarrow.fs.FileSystem.from_uri`` reads them (``s3://bucket/prefix?region=eu-west-1``,
    ``?endpoint_override=HOST:PORT&scheme=http`` for an S3-compatible server). Credentials come
    from the environment (``AWS_ACCESS_KEY_ID``..., an instance role): a URI that carries a
    secret is refused, since data paths are recorded with every run and model."""
    if isinstance(where, Location):
        return where
    given = str(where)
    if not is_uri(given):
        return Location(given, pafs.LocalFileSystem(), str(Path(given)))
    parts = urlsplit(given)
    if parts.password:
        shown = f"{parts.scheme}://{parts.hostname or ''}{parts.path}"
        raise DatasetError(f"{shown}: the URI holds a secret, which would be recorded with every "
                           "run that reads it; give credentials by the environment instead "
                           "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an instance role, "
                           "GOOGLE_APPLICATION_CREDENTIALS)")
    try:
        fs, root = pafs.FileSystem.from_uri(given)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise DatasetError(f"{given.split('?', 1)[0]}: cannot open this URI "
                           f"({_one_line(error)})") from None
    return Location(given, fs, root.rstrip("/"))


def _info(location: Location, name: str | None = None) -> pafs.FileInfo:
    path = location.root if name is None else location.path(name)
    try:
        return location.fs.get_file_info(path)
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"{location.show(name)}: cannot read ({_one_line(error)})") from None


def _reimport(location: Location) -> str:
    """How to replace a damaged import: import again, and upload again where it is remote."""
    return "re-run `orch data import`" if location.local else \
        "re-run `orch data import` and upload the folder again"


def read_manifest(where: str | os.PathLike[str] | Location) -> dict[str, Any]:
    """The manifest of the import at ``where`` (a folder or a URI); refuses folders that are not
    complete imports."""
    location = locate(where)
    if _info(location).type != pafs.FileType.Directory:
        raise DatasetError(f"{location}: no such folder; create it with `orch data import ...`")
    if _info(location, MANIFEST).type != pafs.FileType.File:
        try:
            names = {info.base_name for info in location.fs.get_file_info(
                pafs.FileSelector(location.root, allow_not_found=True))}
        except (pa.ArrowException, OSError):
            names = set()
        partial = any(n.endswith(".partial") or n in _OWN_FILES for n in names)
        what = "an unfinished import (no manifest.json)" if partial else "no manifest.json"
        raise DatasetError(f"{location}: {what}; not a complete orch import, run `orch data import ...`")
    try:
        with location.fs.open_input_stream(location.path(MANIFEST)) as stream:
            manifest = json.loads(stream.read())
    except (pa.ArrowException, OSError, ValueError) as error:
        raise DatasetError(f"{location.show(MANIFEST)}: unreadable manifest "
                           f"({_one_line(error)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{location.show(MANIFEST)}: not an orch image manifest "
                           f"(format != {FORMAT!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{location.show(MANIFEST)}: format version {manifest.get('version')!r}, "
                           f"this orch reads version {FORMAT_VERSION}; re-import the data")
    return manifest


def check_files(where: str | os.PathLike[str] | Location, manifest: Mapping[str, Any]) -> None:
    """Cheap integrity checks run at every open: sizes, Parquet footer, row counts."""
    location = locate(where)
    for name in (PARQUET, ARROW):
        expected = manifest["files"][name]
        info = _info(location, name)
        if info.type != pafs.FileType.File:
            raise DatasetError(f"{location.show(name)}: missing; the import is incomplete, "
                               f"{_reimport(location)}")
        if info.size != expected["bytes"]:
            raise DatasetError(f"{location.show(name)}: {info.size} bytes, the manifest says "
                               f"{expected['bytes']} (truncated or modified); {_reimport(location)}")
    try:
        with location.fs.open_input_file(location.path(PARQUET)) as handle:
            rows = pq.ParquetFile(handle).metadata.num_rows
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"{location.show(PARQUET)}: not a readable Parquet file "
                           f"({_one_line(error)})") from None
    if rows != manifest["files"][PARQUET]["rows"]:
        raise DatasetError(f"{location.show(PARQUET)}: {rows} rows, the manifest says "
                           f"{manifest['files'][PARQUET]['rows']}")


def _sha256_of(location: Location, name: str, *, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    try:
        with location.fs.open_input_stream(location.path(name)) as stream:
            while block := stream.read(chunk):
                digest.update(block)
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"{location.show(name)}: cannot read ({_one_line(error)})") from None
    return digest.hexdigest()


def verify(where: str | os.PathLike[str] | Location,
           manifest: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Full check: every data file's sha256 against the manifest, and a full Parquet decode."""
    location = locate(where)
    manifest = manifest or read_manifest(location)
    check_files(location, manifest)
    for name in (PARQUET, ARROW):
        actual = _sha256_of(location, name)
        if actual != manifest["files"][name]["sha256"]:
            raise DatasetError(f"{location.show(name)}: sha256 {actual[:12]}... does not match the "
                               f"manifest's {manifest['files'][name]['sha256'][:12]}...; re-import")
    try:
        pq.read_table(location.path(PARQUET), columns=["class_id"], filesystem=location.fs)
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"{location.show(PARQUET)}: not a readable Parquet file "
                           f"({_one_line(error)})") from None
    return {name: manifest["files"][name]["sha256"] for name in (PARQUET, ARROW)}


def cache_folder() -> Path:
    """Where this node keeps its copies of imports read through a URI (``$ORCH_DATA_CACHE``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "orch" / "imports")


def local_arrow_file(location: Location, manifest: Mapping[str, Any], *,
                     recheck: bool = False) -> Path:
    """The import's Arrow file on this machine's disk, to memory-map: the file itself for a
    local import; for one behind a URI, this node's copy in ``cache_folder()``, downloaded once
    (under a lock, so the workers of a node share one download and one page-cache copy), its
    sha256 checked against the manifest before it is used. Episodes read from the copy are the
    same as from the folder it was uploaded from. ``recheck``: hash an existing copy again."""
    if location.local:
        return Path(location.path(ARROW))
    expected = manifest["files"][ARROW]
    folder = cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetError(f"{folder}: cannot create the data cache ({error.strerror}); set "
                           f"{CACHE_ENV} to a writable folder") from None
    copy = folder / f"{expected['sha256']}.arrow"
    with FileLock(str(copy) + ".lock"):
        if copy.is_file() and copy.stat().st_size == expected["bytes"]:
            if not recheck or sha256_file(copy) == expected["sha256"]:
                return copy
        _download(location, ARROW, copy, expected["sha256"])
    return copy


def _download(location: Location, name: str, target: Path, sha256: str) -> None:
    """Copy ``name`` to ``target`` through a temporary file, renamed only once its digest is
    ``sha256``: a copy torn by a kill or a changed upload is never used."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with location.fs.open_input_stream(location.path(name)) as stream, \
                open(staging, "wb") as out:
            while block := stream.read(1 << 22):
                digest.update(block)
                out.write(block)
    except (pa.ArrowException, OSError) as error:
        staging.unlink(missing_ok=True)
        raise DatasetError(f"{location.show(name)}: cannot copy it to {target.parent} "
                           f"({_one_line(error)})") from None
    if digest.hexdigest() != sha256:
        staging.unlink(missing_ok=True)
        raise DatasetError(f"{location.show(name)}: sha256 {digest.hexdigest()[:12]}... does not "
                           f"match the manifest's {sha256[:12]}...; {_reimport(location)}")
    os.replace(staging, target)


@dataclass
class ImageDataset:
    """An import opened for sampling: pixels memory-mapped, classes indexed by row range."""

    location: Location
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


def open_dataset(where: str | os.PathLike[str] | Location, *,
                 verify_checksums: bool = False) -> ImageDataset:
    """Open the import at ``where`` (a folder or a ``pyarrow.fs`` URI) for reading;
    ``DatasetError`` if it is not complete and intact."""
    location = locate(where)
    manifest = read_manifest(location)
    if verify_checksums:
        verify(location, manifest)
    else:
        check_files(location, manifest)
    arrow = local_arrow_file(location, manifest, recheck=verify_checksums)
    shown = location.show(ARROW)
    try:
        mapping = pa.memory_map(str(arrow), "r")
        reader = pa.ipc.open_file(mapping)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"{shown}: not a readable Arrow file ({_one_line(error)})") from None
    expected = schema(int(np.prod(manifest["shape"])), manifest.get("extra_columns", ()))
    if not reader.schema.equals(expected):
        raise DatasetError(f"{shown}: columns do not match the manifest's image shape "
                           f"{manifest['shape']}; re-import")
    shape = tuple(manifest["shape"])
    chunks = [b.column("pixels").flatten().to_numpy(zero_copy_only=True).reshape(-1, *shape)
              for b in batches]
    counts = [len(b) for b in batches]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = int(offsets[-1])
    if rows != manifest["files"][ARROW]["rows"]:
        raise DatasetError(f"{shown}: {rows} rows, the manifest says {manifest['files'][ARROW]['rows']}")
    if not batches:
        raise DatasetError(f"{shown}: holds no images; re-import")
    class_ids = np.concatenate([b.column("class_id").to_numpy() for b in batches])
    if np.any(np.diff(class_ids) < 0):
        raise DatasetError(f"{shown}: rows are not sorted by class; re-import")
    class_count = np.bincount(class_ids, minlength=manifest["classes"]).astype(np.int64)
    class_start = np.concatenate([[0], np.cumsum(class_count)[:-1]]).astype(np.int64)
    split_classes = {}
    for split, info in manifest["splits"].items():
        low, high = info["class_ids"]
        split_classes[split] = np.arange(low, high, dtype=np.int64)
    return ImageDataset(location, manifest, class_start, class_count, split_classes, chunks,
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
